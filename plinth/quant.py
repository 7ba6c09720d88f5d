"""Compact weights for fast CPU inference: int8 and int4 weight-only linear layers.

Decoding one token reads every weight once, so its speed is bound by the bytes of weight in
memory: int8 reads a quarter of float32, int4 an eighth. PyTorch ships the matching CPU kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); activations run in bfloat16. The int8
vocabulary projection multiplies in integers (`int8_logits`).

    compact_(model, "int8")    # swap every nn.Linear of a loaded model, in place

Each layer is made in two ways: `of(weight)` quantizes a float weight, and the constructor makes
an empty layer of the same shape, which `compact_shape_` puts in a model whose compact weights
are read from a file (plinth/weights/packed.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from plinth.errors import PlinthError

DTYPES = ("float32", "bfloat16", "int8", "int4")


class Int8Linear(nn.Module):
    """y = x · (q · scale)ᵀ with q int8 per output row (symmetric, one bf16 scale per row)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("q", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16))
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Int8Linear":
        w = weight.detach().float()
        layer = cls(w.shape[1], w.shape[0])
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
        layer.q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        layer.scale = scale.to(torch.bfloat16)
        return layer

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        return torch._weight_int8pack_mm(flat, self.q, self.scale).view(*x.shape[:-1], self.out_features)


def refine_top(logits: torch.Tensor, x: torch.Tensor, rows_of, k: int = 16) -> torch.Tensor:
    """Recompute in float32 the `k` highest of each row's logits (..., V), from the hidden states x
    (..., K) and `rows_of(top)`, the (M, k, K) weight rows of those tokens; in place, returned.

    The int kernels round their output to bfloat16, whose step near a logit of 25 is 0.125: close
    candidates tie or swap, which changes greedy output. Recomputing the few candidates that sampling
    can pick costs a few thousand multiply-adds per row."""
    flat, hidden = logits.view(-1, logits.shape[-1]), x.reshape(-1, x.shape[-1]).float()
    top = flat.topk(min(k, flat.shape[-1]), dim=-1).indices  # (M, k)
    flat.scatter_(1, top, torch.einsum("mk,mjk->mj", hidden, rows_of(top).float()))
    return logits


class Int8Head(Int8Linear):
    """The vocabulary projection in int8, returning float32 logits; the highest ones recomputed in
    float32 from the same int8 rows (`refine_top`).

    The vocabulary is the largest product of a batched decoding step, and `_weight_int8pack_mm`
    converts the weights for every 4 rows, so its time grows with the batch. Here the rows go
    through integer products instead (`int8_logits`), which read the weights once for the batch;
    a compiled program keeps `_weight_int8pack_mm`, for which inductor writes its own kernel."""

    def forward(self, x):
        if torch.compiler.is_compiling():
            logits = super().forward(x).float()
        else:
            logits = int8_logits(x.reshape(-1, self.in_features), self.q, self.scale).view(*x.shape[:-1], -1)
        return refine_top(logits, x, lambda top: self.q[top] * self.scale[top].float()[..., None])


def int8_logits(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) · (q · scale)ᵀ in float32, by integer products: each row of x as two int8 terms, the
    second the first's rounding error (x ≈ a·sa + b·sb), both against q in one `torch._int_mm`.
    Integer sums are exact in any order, so a row's logits are the same bits in any batch. Two
    terms keep them close to float32 products (closer than bfloat16 output) even for rows whose
    largest element is many times the rest, as a language model's hidden states are: one term,
    scaled to that element, loses the small ones."""
    x = x.float()
    first, first_scale = int8_rows(x)
    second, rest_scale = int8_rows(x - first * first_scale)
    products = torch._int_mm(torch.cat([first, second]).to(torch.int8), q.t())  # (2M, N), int32
    rows = len(x)
    logits = products[:rows].float().mul_(first_scale).add_(products[rows:].float().mul_(rest_scale))
    return logits.mul_(scale.float())


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x (M, K) as int8 values (held in float) and its scale (M, 1), symmetric."""
    scale = x.abs().amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(x / scale).clamp_(-127, 127), scale


class Int4Linear(nn.Module):
    """y = x · wᵀ with w stored as 4-bit codes in groups of `group` inputs, each group with its own
    scale and offset (w = q·scale + min). This is the layout of GGUF's Q4_1, so Q4_1 weights keep
    their exact codes.

    Every row, of a prompt or of a decoding step, goes through the same int4 kernel, which computes
    each row on its own: a sequence gets the same bits alone or in any batch, and a prompt's keys
    are those decoding would have made. A bfloat16 copy of the weights would prefill faster, but it
    is four times the int4 codes' memory (benchmarks/decode.py measures prefill)."""

    def __init__(self, in_features: int, out_features: int, group: int = 32):
        super().__init__()
        if in_features % group:
            raise PlinthError(f"int4 needs input width divisible by {group}, got {in_features}; use dtype='int8'")
        # The kernel's own layout of the codes, and per group (K/group, N, 2) its scale and zero.
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(in_features // group, out_features, 2, dtype=torch.bfloat16))
        self.group, self.in_features, self.out_features = group, in_features, out_features

    @classmethod
    def of(cls, weight: torch.Tensor, group: int = 32) -> "Int4Linear":
        w = weight.detach().float()
        N, K = w.shape
        layer = cls(K, N, group)
        g = w.reshape(N, K // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)  # (N, K/group)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
        # The kernel computes (q - 8)·scale + zero, so zero = min + 8·scale.
        zero = lo + 8 * scale
        layer.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        layer.scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return layer

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros)
        return out.view(*x.shape[:-1], self.out_features)


class Int4Head(Int4Linear):
    """The vocabulary projection of a model whose output layer is its input embedding (tied) in int4,
    returning float32 logits. The int4 logits choose each row's `refine` best candidates, and
    `refine_top` recomputes those in float32 from `rows`, the embedding's own bfloat16 rows (the same
    tensor, no copy): greedy choices and the top of the distribution are a bfloat16 output layer's.
    4-bit logits err more than int8's, so more candidates are recomputed (64, the top_k of common
    sampling settings); each costs a row of 2·K bytes, next to the layer's N·K/2."""

    refine = 64

    def __init__(self, in_features: int, out_features: int, group: int = 32):
        super().__init__(in_features, out_features, group)
        self.register_buffer("rows", torch.empty(out_features, in_features, dtype=torch.bfloat16))

    @classmethod
    def of(cls, weight: torch.Tensor, group: int = 32) -> "Int4Head":
        layer = super().of(weight, group)
        layer.rows = weight.detach()  # the embedding's storage: the input layer still reads these rows
        return layer

    def forward(self, x):
        return refine_top(super().forward(x).float(), x, lambda top: self.rows[top], self.refine)


def compact_(model: nn.Module, dtype: str) -> nn.Module:
    """Convert a loaded model in place to `dtype` (one of DTYPES) for inference.

    int4 applies to the blocks' layers; the output layer is an `Int8Head`, because 4-bit vocabulary
    logits visibly hurt quality for little gain, except where `_int4_head` says it is most of the
    weights: then an `Int4Head`, in int8 models too.
    """
    _check(dtype)
    model.fuse()
    if dtype == "float32":
        return model.float()
    model.to(torch.bfloat16)
    if dtype == "bfloat16":
        return model
    if next(model.parameters()).device.type != "cpu":
        raise PlinthError(f"dtype={dtype} uses CPU kernels; on an accelerator use dtype='bfloat16'")
    return _replace_linears(model, dtype, lambda kind, linear: kind.of(linear.weight))


def compact_shape_(model: nn.Module, dtype: str) -> nn.Module:
    """Give a model built on the meta device the layers `compact_(model, dtype)` would give it,
    empty, so that a state dict of compact weights loads into it (plinth/weights/packed.py)."""
    _check(dtype)
    model.fuse()
    if dtype in ("float32", "bfloat16"):
        return model
    with torch.device("meta"):
        return _replace_linears(model, dtype, lambda kind, linear: kind(linear.in_features, linear.out_features))


def _check(dtype: str):
    if dtype not in DTYPES:
        raise PlinthError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _int4_head(model: nn.Module) -> bool:
    """Whether the output layer is an `Int4Head`, whatever the blocks' dtype: where it is tied to the
    input embedding (whose rows it refines from) and holds most of the linear weights, so that it is
    most of what each decoding step reads, as a large vocabulary on a narrow model makes it (Gemma 3
    270M: 262,144 rows of 640, 63% of its weights)."""
    head, embedding = getattr(model, "output", None), getattr(model, "tok_embeddings", None)
    if not isinstance(head, nn.Linear) or embedding is None or head.weight is not embedding.weight \
            or head.in_features % 32:
        return False
    return 2 * head.weight.numel() > sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _replace_linears(model: nn.Module, dtype: str, make) -> nn.Module:
    head_kind = Int4Head if _int4_head(model) else Int8Head
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                head = f"{name}.{child_name}".lstrip(".") == "output"
                kind = head_kind if head else Int8Linear if dtype == "int8" else Int4Linear
                setattr(module, child_name, make(kind, child))
    return model
