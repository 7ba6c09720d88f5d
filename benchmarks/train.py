"""Training throughput: plinth's Transformer + AdamW against Hugging Face transformers'
LlamaForCausalLM + torch.optim.AdamW, same shapes, batch and sequence length, in one run.

    .venv/bin/python benchmarks/train.py                     # the pretrain-tiny model shape
    .venv/bin/python benchmarks/train.py --dim 512 --layers 8 --batch 8

Each engine runs warm-up steps, then timed optimizer steps (forward, backward, AdamW) on random
token batches, in float32 and under bfloat16 autocast (plinth's default where the CPU has native
bf16); reported: tokens/s, MFU against the measured matmul peak in that precision, and the
ratios. Every row runs in a fresh process, so none inherits another's allocator or kernel
settings, and the rows run in interleaved rounds (--rounds), the median round reported.
Results go to benchmarks/results/train.json.

plinth's training loop runs under `training_runtime()`: float32 products on oneDNN where that
keeps float32 precision (plinth/onednn.py; about twice MKL's speed on AMD CPUs) and freed memory
kept for the next step (plinth/heap.py); plinth runs that way here and the peak is measured that
way. Two last rows, for information, run transformers under the same runtime settings: what is
left of the lead there comes from the model and loss themselves.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import time

import torch
import torch.nn.functional as F

from plinth.config import preset
from plinth.files import write_atomic
from plinth.model import Transformer
from plinth.onednn import float32_on_onednn
from plinth.train.loop import flops_per_token, measured_peak_flops, training_runtime


def plinth_step_fn(args):
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                    n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=args.seq)
    model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(x, y):  # as the training loop: the model computes the summed loss itself
        loss = model(x, targets=y) / y.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def transformers_step_fn(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         intermediate_size=args.ffn, max_position_embeddings=args.seq, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, y):
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def measure(name, build, args, peak, precision, runtime: bool):
    """One row, in a fresh process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_here, (name, build, args, peak, precision, runtime))


def measure_here(name, build, args, peak, precision, runtime: bool):
    model, step = build(args)
    g = torch.Generator().manual_seed(1)
    batch = lambda: torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)  # noqa: E731
    times = []
    # around all steps, as around the training loop: kept memory is reused from one step to the next
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"), \
            training_runtime() if runtime else contextlib.nullcontext():
        for _ in range(args.warmup):
            rows = batch()
            step(rows[:, :-1], rows[:, 1:])
        for _ in range(args.steps):
            rows = batch()
            start = time.perf_counter()
            step(rows[:, :-1], rows[:, 1:])
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = args.batch * args.seq
    params = sum(p.numel() for p in model.parameters())
    mfu = flops_per_token(params, args.layers, args.dim, args.seq) * tokens / seconds / peak
    return {"engine": name, "precision": precision, "params": params, "step_s": seconds, "tok_s": tokens / seconds, "mfu": mfu}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("vocab", 4096), ("dim", 256), ("layers", 4), ("heads", 4), ("kv-heads", 2),
                          ("ffn", 768), ("seq", 256), ("batch", 16), ("warmup", 3), ("steps", 10), ("rounds", 3)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", default="benchmarks/results/train.json")
    args = parser.parse_args()
    with float32_on_onednn():  # each precision's MFU against the peak of products in that precision
        peaks = {"float32": measured_peak_flops(torch.float32), "bfloat16": measured_peak_flops(torch.bfloat16)}
    specs = [(engine, build, precision, engine == "plinth") for precision in ("float32", "bfloat16")
             for engine, build in (("plinth", plinth_step_fn), ("transformers", transformers_step_fn))]
    try:
        import transformers  # noqa: F401
        specs += [("transformers+runtime", transformers_step_fn, precision, True)
                  for precision in ("float32", "bfloat16")]
    except ImportError:
        print("transformers is not installed: skipping it")
        specs = [spec for spec in specs if spec[0] == "plinth"]
    runs = {(engine, precision): [] for engine, _, precision, _ in specs}
    for _ in range(args.rounds):  # rounds of every row, so the machine's drifts in speed reach all rows alike
        for engine, build, precision, runtime in specs:
            runs[engine, precision].append(measure(engine, build, args, peaks[precision], precision, runtime))
    rows = []
    for measured in runs.values():
        middle = sorted(measured, key=lambda r: r["step_s"])[len(measured) // 2]
        rows.append({**middle, "tok_s_runs": [r["tok_s"] for r in measured]})
    print(f"{'engine':20} {'precision':10} {'params':>10} {'step s':>8} {'tokens/s':>10} {'MFU':>6}  "
          "tokens/s per round")
    for r in rows:
        print(f"{r['engine']:20} {r['precision']:10} {r['params']:>10,} {r['step_s']:>8.3f} {r['tok_s']:>10.0f} "
              f"{r['mfu']:>6.1%}  {' '.join(f'{t:.0f}' for t in r['tok_s_runs'])}")
    speed = {(r["engine"], r["precision"]): r["tok_s"] for r in rows}
    for precision in ("float32", "bfloat16"):
        if ("transformers", precision) in speed:
            print(f"plinth / transformers, both {precision}: "
                  f"{speed[('plinth', precision)] / speed[('transformers', precision)]:.2f}×")
    for precision in ("float32", "bfloat16"):
        if ("transformers+runtime", precision) in speed:
            print(f"plinth / transformers under plinth's runtime settings too, both {precision}: "
                  f"{speed[('plinth', precision)] / speed[('transformers+runtime', precision)]:.2f}×")
    if ("transformers", "float32") in speed:
        print(f"plinth's default (bf16 autocast) / transformers' default (float32): "
              f"{speed[('plinth', 'bfloat16')] / speed[('transformers', 'float32')]:.2f}×")
    write_atomic(args.out, json.dumps({"settings": vars(args), "peak_flops": peaks, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
