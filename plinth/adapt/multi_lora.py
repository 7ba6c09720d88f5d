"""Several LoRA adapters served at once by one model: each request picks one by model name, and
requests with different adapters (or none) still share every batched forward pass.

The base stays compact and fused for inference; each adapted layer adds, per batch row, its
adapter's low-rank update (x · Aᵀ · Bᵀ · alpha/r) — a few small matmuls beside the shared one.
Adapters of fused projections (q/k/v, gate/up) are stacked: A's rows side by side, B block-diagonal
into the fused output, so one pair of matmuls serves all parts.

    ids = serve_adapters(loaded.model, {"sentiment": "runs/lora-sentiment/final"})   # {"sentiment": 1}
    loaded.model(tokens, adapters=torch.tensor([0, ids["sentiment"]]))   # row 0: base model, row 1: "sentiment"

Each forward pass names its rows' adapters explicitly (`adapters=`, the engine passes every
request's own); the layers read them from `plinth.model.ADAPTER_ROWS` for the pass's duration.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from plinth.adapt.lora import ADAPTER_FILE, PROJECTIONS, base_fingerprint, read_adapter_config
from plinth.errors import PlinthError
from plinth.model import ADAPTER_ROWS, fused_parts


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, updates: dict[int, tuple]):
        super().__init__()
        self.base = base
        self.updates = updates  # adapter id → (A (r', in), B (out, r'), scale), float32
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x):
        y = self.base(x)
        rows = ADAPTER_ROWS.get()  # (B,) adapter ids of this forward pass's rows, or None
        if rows is None:
            return y
        for adapter in rows.unique().tolist():
            if adapter not in self.updates:
                continue
            A, B, scale = self.updates[adapter]
            picked = rows == adapter
            delta = (x[picked].float() @ A.T) @ B.T * scale  # (n, T, out)
            y[picked] = y[picked] + delta.to(y.dtype)
        return y


def part_sizes(fused: dict, name: str, layer: nn.Module) -> dict[str, int]:
    """Output width of each part of a projection (one part unless fused; `fused`: model.fused_parts)."""
    return fused.get(name, {name: layer.out_features})


def stacked_update(tensors: dict, layer: str, name: str, sizes: dict[str, int], used: set):
    """One (A, B) for a fused layer from its parts' adapters; None if no part is adapted."""
    As, offset, blocks = [], 0, []
    for part, width in sizes.items():
        key = f"{layer}.{part}"
        if f"{key}.lora_a" in tensors:
            used |= {f"{key}.lora_a", f"{key}.lora_b"}
            As.append(tensors[f"{key}.lora_a"].float())
            blocks.append((offset, tensors[f"{key}.lora_b"].float()))
        offset += width
    if not As:
        return None
    A = torch.cat(As)  # (parts·r, in)
    B = torch.zeros(offset, A.shape[0])
    for i, (start, b) in enumerate(blocks):  # block-diagonal: part i's output rows use its own rank columns
        r = b.shape[1]
        B[start:start + b.shape[0], i * r:(i + 1) * r] = b
    return A, B


def serve_adapters(model: nn.Module, adapters: dict[str, str]) -> dict[str, int]:
    """Attach every adapter to an inference model (in place). Returns each adapter name's id
    (1, 2, ...), what a forward pass's `adapters=` rows hold."""
    ids, updates = {}, {}
    fingerprint, fused = base_fingerprint(model), fused_parts(model.config)
    for number, (name, folder) in enumerate(adapters.items(), 1):
        config = read_adapter_config(folder)
        if config["base_fingerprint"] != fingerprint:
            raise PlinthError(f"adapter {name!r} ({folder}) was trained on base model {config['base']!r}, "
                              f"not on the served model; serve it with {config['base']!r}")
        tensors = load_file(str(Path(folder) / ADAPTER_FILE))
        scale, used = config["alpha"] / config["rank"], set()
        for layer_name, module in model.named_modules():
            for child_name, child in module.named_children():
                if child_name not in fused and child_name not in PROJECTIONS:
                    continue
                update = stacked_update(tensors, layer_name, child_name, part_sizes(fused, child_name, child), used)
                if update is not None:
                    updates.setdefault(f"{layer_name}.{child_name}", {})[number] = (*update, scale)
        if used != set(tensors):
            raise PlinthError(f"adapter {name!r} ({folder}) has tensors for layers the served model lacks: "
                              f"{sorted(set(tensors) - used)[:3]}")
        ids[name] = number
    for full_name, per_adapter in updates.items():
        parent_name, child_name = full_name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, MultiLoRALinear(getattr(parent, child_name), per_adapter))
    return ids
