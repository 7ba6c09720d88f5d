"""LoRA: low-rank adapters swapped into an unchanged plinth `Transformer`, and QLoRA's 4-bit base.

A frozen linear layer W (out, in) gets a trainable update (alpha / r) · B · A, with A (r, in) and
B (out, r); B starts at zero, so training starts from exactly the base model. Only A and B are
trained and saved (a few MB), and `merge_lora` folds them into W for inference at no extra cost.

    names = attach_lora(model, rank=8, alpha=16, targets=("wq", "wv"))   # base frozen, A/B trainable
    save_adapter(model, "runs/x/adapter", base="smollm2-135m-instruct")
    load_adapter(other_model, "runs/x/adapter"); merge_lora(other_model)

QLoRA (`quantize_base`) keeps the frozen weights as 4-bit NF4 codes (Dettmers et al., 2023) and
dequantises them inside each matmul, so gradients reach A and B through the dequantised weights.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from plinth.errors import PlinthError

# The projections of a block that LoRA can adapt, by their name in plinth/model.py.
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"

# NF4: the 16 quantiles of a standard normal, scaled to [-1, 1] (QLoRA paper, appendix E), so that
# normally distributed weights use every code equally often.
NF4_CODES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


class NF4Linear(nn.Module):
    """A frozen linear layer stored as 4-bit NF4 codes, two per byte, one absmax scale per `block`
    weights. `forward` dequantises to the activations' dtype and multiplies: memory is ~4.5 bits
    per weight, and autograd sees an ordinary matmul, so the input gradient flows through it."""

    def __init__(self, linear: nn.Linear, block: int = 64):
        super().__init__()
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        if w.numel() % block:
            raise PlinthError(f"NF4 needs a weight count divisible by {block}, got {tuple(w.shape)}")
        blocks = w.reshape(-1, block)
        absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)  # (n_blocks,)
        normed = blocks / absmax[:, None]
        midpoints = (NF4_CODES[1:] + NF4_CODES[:-1]) / 2
        codes = torch.bucketize(normed, midpoints).to(torch.uint8).reshape(-1)  # nearest code, 0..15
        self.register_buffer("packed", codes[0::2] << 4 | codes[1::2])
        self.register_buffer("absmax", absmax)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.block = block
        self.train(linear.training)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        codes = torch.stack([self.packed >> 4, self.packed & 15], dim=-1).reshape(-1, self.block).long()
        w = NF4_CODES.to(self.absmax.device)[codes] * self.absmax[:, None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantize(dtype), bias)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) · B · A · dropout(x), with base frozen and A, B trainable."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, name: str = "layer"):
        super().__init__()
        n_out, n_in = base.out_features, base.in_features
        if not 0 < rank <= min(n_in, n_out):
            raise PlinthError(f"LoRA rank {rank} does not fit {name} ({n_out}×{n_in}): the rank must be "
                              f"between 1 and {min(n_in, n_out)}; lower `lora_rank`")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.in_features, self.out_features = n_in, n_out
        device = next(iter([*base.parameters(), *base.buffers()])).device
        # A: Kaiming-uniform like nn.Linear's init; B: zero, so the adapted model starts as the base.
        self.lora_a = nn.Parameter(torch.empty(rank, n_in, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)  # an adapter attached to a model in eval mode must not drop out

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def base_weight(self) -> torch.Tensor:
        return self.base.dequantize() if isinstance(self.base, NF4Linear) else self.base.weight.float()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """An ordinary linear layer computing the same function: W + (alpha / rank) · B · A."""
        weight = self.base_weight() + self.scale * (self.lora_b.float() @ self.lora_a.float())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None, device=weight.device)
        linear.weight.copy_(weight)
        if self.base.bias is not None:
            linear.bias.copy_(self.base.bias)
        return linear


def _swap(model: nn.Module, make, wanted) -> list[str]:
    """Replace every child module for which `wanted(name, module)` holds by `make(name, module)`."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}".lstrip(".")
            if wanted(child_name, child):
                setattr(parent, child_name, make(name, child))
                swapped.append(name)
    return swapped


def check_targets(targets) -> tuple[str, ...]:
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown or not targets:
        raise PlinthError(f"unknown LoRA target(s) {unknown or '(none given)'}; choose from {', '.join(PROJECTIONS)}")
    return tuple(targets)


def quantize_base(model: nn.Module, targets=PROJECTIONS) -> nn.Module:
    """QLoRA: store the blocks' linear layers named in `targets` as frozen 4-bit NF4 (in place)."""
    targets = check_targets(targets)
    _swap(model, lambda name, m: NF4Linear(m), lambda child_name, m: child_name in targets and isinstance(m, nn.Linear))
    return model


def attach_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                targets=("wq", "wv")) -> list[str]:
    """Freeze every parameter of `model`, then wrap the projections named in `targets` with LoRA
    layers (in place). Returns the names of the adapted layers."""
    targets = check_targets(targets)
    if getattr(model.layers[0].attn, "wqkv", None) is not None:
        raise PlinthError("this model's projections are fused for inference; attach LoRA to an unfused model "
                          "(plinth.weights.load.read_model) or load the adapter with plinth.load(..., adapter=DIR)")
    for p in model.parameters():
        p.requires_grad_(False)
    return _swap(model, lambda name, m: LoRALinear(m, rank, alpha, dropout, name),
                 lambda child_name, m: child_name in targets and isinstance(m, (nn.Linear, NF4Linear)))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only: {"layers.0.attn.wq.lora_a": (r, in), ...}."""
    return {f"{name}.{part}": getattr(m, part).detach().contiguous()
            for name, m in lora_layers(model).items() for part in ("lora_a", "lora_b")}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into a plain linear layer (in place): same outputs, no adapter cost."""
    _swap(model, lambda name, m: m.merged(), lambda child_name, m: isinstance(m, LoRALinear))
    return model


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of a base model's shape and input embeddings (tokens', or an image model's
    patches'), to tell bases apart. Embeddings are never quantised and are hashed at bfloat16
    precision, so the float and compact loads of one file agree."""
    config = json.dumps(model.config.to_dict(), sort_keys=True).encode()
    rows = model.input_layer.weight.detach()[:512].float().to(torch.bfloat16)
    return hashlib.sha256(config + rows.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


def save_adapter(model: nn.Module, folder, base: str, **extra):
    """Write adapter.safetensors + adapter.json (base model, its fingerprint, rank, alpha, targets)
    into `folder` (the caller's checkpoint writer makes this atomic)."""
    layers = lora_layers(model)
    if not layers:
        raise PlinthError("the model has no LoRA layers to save; call attach_lora first")
    first = next(iter(layers.values()))
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    config = {"base": base, "base_fingerprint": base_fingerprint(model), "rank": first.rank, "alpha": first.alpha,
              "dropout": getattr(first.dropout, "p", 0.0), "targets": targets, **extra}
    folder = Path(folder)
    save_file(adapter_state(model), str(folder / ADAPTER_FILE))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def read_adapter_config(folder) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise PlinthError(f"{folder} holds no LoRA adapter ({ADAPTER_CONFIG} is missing); give the folder a "
                          "LoRA fine-tuning run saved (e.g. runs/lora-sentiment/latest)")
    return json.loads(path.read_text())


def load_adapter(model: nn.Module, folder) -> dict:
    """Attach the adapter saved in `folder` to `model` (the base it was trained on) and load its
    weights. A different base is an error naming the expected one. Returns the adapter config."""
    config = read_adapter_config(folder)
    if config["base_fingerprint"] != base_fingerprint(model):
        raise PlinthError(f"the adapter in {folder} was trained on base model {config['base']!r} "
                          f"(fingerprint {config['base_fingerprint']}), not on this model "
                          f"(fingerprint {base_fingerprint(model)}); load it onto {config['base']!r}")
    if config.get("nf4_base") and not any(isinstance(m, NF4Linear) for m in model.modules()):
        quantize_base(model)  # a QLoRA adapter learned its update against the 4-bit base: use the same base
    if not lora_layers(model):
        attach_lora(model, config["rank"], config["alpha"], config["dropout"], config["targets"])
    load_adapter_weights(model, load_file(str(Path(folder) / ADAPTER_FILE)))
    return config


@torch.no_grad()
def load_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor]):
    """Copy saved A/B tensors into the model's LoRA layers; a missing or extra key is an error."""
    own = {f"{name}.{part}": getattr(m, part) for name, m in lora_layers(model).items() for part in ("lora_a", "lora_b")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise PlinthError(f"adapter weights do not fit the model's LoRA layers; missing: {missing[:4]}, "
                          f"unexpected: {unexpected[:4]}")
    for key, param in own.items():
        if state[key].shape != param.shape:
            raise PlinthError(f"adapter tensor {key} has shape {tuple(state[key].shape)}, the layer expects "
                              f"{tuple(param.shape)}")
        param.copy_(state[key])
