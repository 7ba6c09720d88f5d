"""The one training loop, for pretraining and (with other data, loss masks and trainable
parameters) fine-tuning. Read top to bottom: schedule, optimizer, resume, then per step:
micro-batches → loss normalised by the step's unmasked target tokens → clip → AdamW step → log,
evaluate, sample, save (also on the last step).

    plinth pretrain recipes/pretrain-tiny.yaml            # Ctrl-C or kill -9 at any time, then
    plinth pretrain recipes/pretrain-tiny.yaml --resume   # continues bit for bit
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from plinth.config import preset
from plinth.cpu_share import CpuShare
from plinth.data.shards import TokenData
from plinth.errors import PlinthError
from plinth.files import write_atomic
from plinth.generate import SamplingParams, generate_stream
from plinth.heap import freed_memory_kept
from plinth.loss import IGNORE
from plinth.model import Block, Transformer
from plinth.onednn import float32_on_onednn
from plinth.tokenizer import Tokenizer
from plinth.train import checkpoint
from plinth.train.dist import Dist, setup
from plinth.train.memory import check_fits


@contextlib.contextmanager
def training_runtime(device: torch.device = torch.device("cpu")):
    """What training on CPU runs under: float32 products on oneDNN's kernels where they stay
    float32 (plinth/onednn.py; the MFU peak is measured the same way), and freed memory kept for
    the next step instead of faulted in anew (plinth/heap.py). GPU memory has its own allocator."""
    if device.type != "cpu":
        yield
        return
    with float32_on_onednn(), freed_memory_kept():
        yield


def lr_multiplier(step: int, r) -> float:
    """Linear warmup, then cosine decay or warmup-stable-decay, down to min_lr_ratio."""
    if step < r.warmup_steps:
        return (step + 1) / r.warmup_steps
    if r.schedule == "cosine":
        progress = min(1.0, (step - r.warmup_steps) / max(1, r.max_steps - r.warmup_steps))
        return r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = r.max_steps * (1 - r.decay_fraction)
    if step < decay_start:
        return 1.0
    return 1 - (1 - r.min_lr_ratio) * (step - decay_start) / max(1, r.max_steps - decay_start)


def build_optimizer(model, r) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms, biases). A model may scale some parts'
    learning rates: `lr_scales`, {parameter name prefix: factor} (an image+text model's encoder).
    Fused kernel where available."""
    inner = getattr(model, "module", model)  # under DDP, names start with "module."
    scales = getattr(inner, "lr_scales", {})
    params = [(name.removeprefix("module."), p) for name, p in model.named_parameters() if p.requires_grad]

    def scale_of(name: str) -> float:
        return next((factor for prefix, factor in scales.items() if name.startswith(prefix)), 1.0)

    groups = []  # unscaled first, decayed then not: the order checkpoints of earlier runs hold
    for scale in [1.0] + sorted(set(scales.values()) - {1.0}):
        mine = [p for name, p in params if scale_of(name) == scale]
        groups += [{"params": [p for p in mine if p.dim() >= 2], "weight_decay": r.weight_decay, "lr_scale": scale},
                   {"params": [p for p in mine if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    try:
        return torch.optim.AdamW(groups, lr=r.lr, betas=tuple(r.betas), fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/torch: the foreach one
        return torch.optim.AdamW(groups, lr=r.lr, betas=tuple(r.betas), foreach=True)


def bf16_supported(device: torch.device = torch.device("cpu")) -> bool:
    """Native bfloat16 matmuls (AVX-512 BF16 / AMX on CPU, Ampere or newer on GPU): where autocast
    pays."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(r, device: torch.device = torch.device("cpu")) -> torch.dtype | None:
    """bfloat16 where the recipe's `autocast` asks for it ("auto": where the hardware has native
    bfloat16 matmuls), else None (float32)."""
    if r.autocast == "bfloat16" or (r.autocast == "auto" and bf16_supported(device)):
        return torch.bfloat16
    return None


def autocast(r, device: torch.device = torch.device("cpu")):
    dtype = autocast_dtype(r, device)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def measured_peak_flops(dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                        size: int = 2048, tries: int = 5) -> float:
    """Best FLOP/s of a large matmul in `dtype` (the one training's products run in) on `device`:
    the denominator of the MFU estimate (CPUs publish no single peak figure; the best of several
    runs approaches what the cores do)."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout) alone
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    best = float("inf")
    for _ in range(tries + 1):  # the first product also pays for kernel set-up: one more try
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def flops_per_token(params: int, n_layers: int, dim: int, seq_len: int, trainable: int | None = None,
                    through_blocks: bool = True, per_row: int = 0) -> float:
    """Forward + backward: 6 per parameter per token, plus attention (PaLM's estimate). Frozen
    parameters (LoRA) skip their weight gradient: 4 per parameter, 2 more per trainable one.
    Without anything to train in the blocks (a linear probe) nothing flows back through them: 2
    per parameter and a third of the attention, plus the trainable ones' backward. `per_row`
    (trained) parameters act once per row, not per position (a diffusion model's conditioning and
    adaptive-norm modulations): their 6 per row are shared among the row's seq_len positions."""
    params, trainable = params - per_row, (params if trainable is None else trainable) - per_row
    shared = 6 * per_row / seq_len
    if not through_blocks:
        return 2 * params + 4 * trainable + 4 * n_layers * dim * seq_len + shared
    return 4 * params + 2 * trainable + 12 * n_layers * dim * seq_len + shared


def step_size(data, batches, seconds: float) -> tuple[int, dict]:
    """Token positions a step computed (rows × positions, padding included; packed x: B, 2, T), and
    its speed: tokens/s, and images/s for image data (which says how many positions an image is)."""
    per_image = getattr(data, "tokens_per_image", None)
    if per_image is None:  # an image+text batch's x is (token ids, images): its positions are the ids'
        computed = sum(ids.shape[0] * ids.shape[-1] for ids in (x[0] if isinstance(x, tuple) else x for x, _ in batches))
        return computed, {"tok_s": computed / seconds}
    images = sum((x[0] if isinstance(x, tuple) else x).shape[0] for x, _ in batches)  # a tuple: images first
    return images * per_image, {"tok_s": images * per_image / seconds, "img_s": images / seconds}


def target_count(y) -> int:
    """How many targets of a batch take part in the loss: every float target (regression has one
    per row, never padded), the ids other than IGNORE otherwise."""
    return y.numel() if y.is_floating_point() else int((y != IGNORE).sum())


@torch.no_grad()
def evaluate(model, data: TokenData, r) -> dict:
    """Validation loss, and bits per byte (comparable across tokenizers) overall and per source.
    Every process evaluates the same batches (under FSDP2 each forward is a collective)."""
    model.eval()
    device = next(model.parameters()).device
    result = {}
    for source in [None] + data.val_sources():
        total, count = 0.0, 0
        for x, y in data.val_batches(r.eval_batches, source):
            x, y = x.to(device), y.to(device)
            with autocast(r, device):
                total += float(model(x, targets=y))
            count += y.numel()
        loss = total / count
        suffix = f"/{source}" if source else ""
        result[f"val_loss{suffix}"] = loss
        result[f"val_bpb{suffix}"] = loss / math.log(2) / data.val_bytes_per_token(source)
    model.train()
    return result


def sample(model, tokenizer, prompt: str, tokens: int = 48) -> str:
    model.eval()
    steps = generate_stream(model, tokenizer, tokenizer.encode(prompt),
                            SamplingParams(max_tokens=tokens, temperature=0))
    text = prompt + "".join(s.text for s in steps)
    model.train()
    return text


def pretrain(recipe, resume: bool = False, log=print, dist_mode: str = "none") -> Path:
    d = setup(dist_mode, recipe.batch_size)
    try:
        data = TokenData(recipe.data_dir, recipe.seq_len, recipe.batch_size, recipe.seed, recipe.mixture)
        tokenizer = Tokenizer.from_folder(recipe.data_dir)
        config = preset(recipe.preset, **{"vocab_size": tokenizer.vocab_size, "max_seq_len": recipe.seq_len,
                                          **recipe.model})
        torch.manual_seed(recipe.seed)  # the same initial weights on every process
        model = Transformer(config)
        model.to_empty(device=d.device)
        model.init_weights()
        return train(model, tokenizer, data, recipe, resume, log if d.main else lambda *_: None, d=d)
    finally:
        d.close()


@torch.enable_grad()  # whatever the caller's autograd mode
def train(model, tokenizer, data, r, resume: bool, log=print, evaluate=evaluate,
          store: checkpoint.Weights = checkpoint.MODEL_WEIGHTS, d: Dist = Dist()) -> Path:
    """Train `model` on `data.batch(step, micro)` → (inputs, targets); `model(inputs,
    targets=targets)` returns the loss summed over the targets other than IGNORE. Fine-tuning
    passes its own `evaluate(model, data, r)` and a `store` that saves only what it trains (e.g. a
    LoRA adapter); pretraining under torchrun passes `d`."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    check_fits(config, params, trainable, r, r.batch_size // d.world, d.device, d.world if d.mode == "fsdp2" else 1)
    out = Path(r.out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    metrics_path, step = out / "metrics.jsonl", 0
    if resume:  # weights before wrapping: loading replaces the tensors the optimizer and FSDP2 hold
        step, trainer = restore(out, model, metrics_path if d.main else None, store)
        model.to(d.device)
    elif checkpoint.latest(out) is not None:
        raise PlinthError(f"{out} already holds a run; continue it with --resume, or set another name/out_dir")
    elif d.main:
        metrics_path.write_text("")
    d.barrier()  # nobody trains until rank 0 has checked and prepared the run folder
    for module in model.modules():  # the Transformer may sit inside a fine-tuning wrapper
        if isinstance(module, Transformer):
            module.activation_checkpointing = r.activation_checkpointing
        if r.compile and isinstance(module, Block):  # per block: the way that composes with DDP and FSDP2
            module.compile()
    model = d.wrap(model)
    optimizer = build_optimizer(model, r)
    if resume:
        d.load_optimizer(model, optimizer, trainer["optimizer"])
        torch.set_rng_state(trainer["rng"])
        log(f"resumed from step {step}")
    if d.main:
        write_atomic(out / "recipe.json", json.dumps(r.__dict__, indent=2))
    model.train()
    step_tokens = r.batch_size * r.seq_len * r.grad_accum
    through_blocks = any(p.requires_grad for m in model.modules() if isinstance(m, Block) for p in m.parameters())
    length = getattr(data, "tokens_per_image", r.seq_len)  # how far each position attends
    per_row = model.per_row_parameters() if hasattr(model, "per_row_parameters") else 0
    step_flops = flops_per_token(params, config.n_layers, config.dim, length, trainable, through_blocks,
                                 per_row) * step_tokens
    with training_runtime(d.device), open(metrics_path, "a") if d.main else contextlib.nullcontext() as metrics:
        peak = measured_peak_flops(autocast_dtype(r, d.device) or torch.float32, d.device) * d.world
        started, first_step = time.perf_counter(), step
        # On CPU, one thread fewer while another process keeps a core busy (plinth/cpu_share.py).
        share = CpuShare(torch.get_num_threads()) if d.device.type == "cpu" else None
        while step < r.max_steps:
            last_step = step == r.max_steps - 1
            lr = r.lr * lr_multiplier(step, r)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints of earlier runs have no lr_scale
            tick = time.perf_counter()
            batches = [data.batch(step, micro) for micro in range(r.grad_accum)]
            targets = sum(target_count(y) for _, y in batches)  # normalise over the whole global step
            loss_sum = 0.0
            for micro, (x, y) in enumerate(batches):
                x, y = d.rows(x), d.rows(y)
                with d.gradient_sync(model, micro == len(batches) - 1):
                    with autocast(r, d.device):
                        loss = model(x, targets=y)
                    (loss * d.loss_scale / targets).backward()
                loss_sum += float(loss.detach())
            train_loss = d.sum(loss_sum) / targets
            if not math.isfinite(train_loss):
                raise PlinthError(f"the loss became {train_loss} at step {step + 1}; stopped before saving it. "
                                  f"Lower lr (now {r.lr}) or grad_clip, then --resume from the last good checkpoint")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(d.inner(model), "after_step"):  # state the new weights feed (a diffusion model's moving average)
                d.inner(model).after_step()
            if share is not None:
                share.adjust()
            step += 1
            seconds = time.perf_counter() - tick
            computed, speed = step_size(data, batches, seconds)
            record = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm, "step_s": seconds,
                      "tokens": step * step_tokens, **speed, "mfu": step_flops * computed / step_tokens / seconds / peak}
            if step % r.eval_every == 0 or last_step:
                record.update(evaluate(model, data, r))
                if r.sample_prompt:
                    record["sample"] = sample(d.inner(model), tokenizer, r.sample_prompt)
            if d.main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if step % r.log_every == 0 or last_step or "val_loss" in record:
                eta = (time.perf_counter() - started) / (step - first_step) * (r.max_steps - step)
                extra = "".join(f" {key} {record[key]:.3f}" for key in ("val_loss", "val_bpb", "val_acc", "val_pearson") if key in record)
                rate = f"{record['img_s']:.0f} img/s" if "img_s" in record else f"{record['tok_s']:.0f} tok/s"
                log(f"step {step}/{r.max_steps} loss {train_loss:.4f}{extra} lr {lr:.2e} "
                    f"{rate} mfu {record['mfu']:.1%} eta {eta:.0f}s")
                if "sample" in record:
                    log(f"  sample: {record['sample']!r}")
            if step % r.save_every == 0 or last_step:
                weights, optimizer_state = d.full_state(model, optimizer)
                if d.main:
                    checkpoint.save(out, step, d.inner(model), tokenizer,
                                    {"optimizer": optimizer_state, "step": step, "rng": torch.get_rng_state()},
                                    store if weights is None else store.gathered(weights))
    return out / "latest"


def restore(out: Path, model, metrics_path: Path | None, store: checkpoint.Weights) -> tuple[int, dict]:
    """Load the newest complete checkpoint's weights; drop metrics logged after it (they will be
    redone). Returns the step and the trainer state (optimizer, RNG)."""
    folder = checkpoint.latest(out)
    if folder is None:
        raise PlinthError(f"nothing to resume in {out}: no complete checkpoint yet; start without --resume")
    store.read(model, folder)
    trainer = checkpoint.trainer_state(folder)
    step = trainer["step"]
    if metrics_path is not None and metrics_path.is_file():
        lines = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_atomic(metrics_path, "".join(line + "\n" for line in lines))
    return step, trainer
