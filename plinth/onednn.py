"""Float32 matrix products on CPU through oneDNN instead of MKL, where that keeps them float32.

PyTorch hands a float32 matmul on CPU to MKL. On AMD CPUs MKL runs a generic AVX2 code path
while oneDNN's AVX-512 kernels run about twice as fast (benchmarks/train.py and
benchmarks/eval.py measure it; docs/benchmarks.md). The one switch PyTorch has for
sending float32 matmuls to oneDNN is `torch.backends.mkldnn.matmul.fp32_precision = "bf16"`,
which also allows oneDNN to compute them in bfloat16; oneDNN only does that on CPUs with AMX
tiles, and elsewhere runs its float32 kernels. So `float32_on_onednn()` turns the switch on
for a block of code only after a probe product on the running machine has come back with float32
precision; where it does not, the block runs exactly as before.

    with float32_on_onednn():
        loss = model(x)...           # training, log-likelihood scoring: large float32 products

Attention runs with the switch off (`paused()`): PyTorch's CPU attention kernel multiplies many
small blocks, and through oneDNN each of those calls costs more.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

ROUTE = "bf16"  # the fp32_precision value that sends float32 matmuls to oneDNN (see above)


@functools.cache
def keeps_float32() -> bool:
    """True where the oneDNN route exists and its float32 products have float32 precision: the
    probe's error against float64 must be of float32's size (about 1e-7 relative; bfloat16
    arithmetic gives about 4e-3)."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(matmul, "fp32_precision"):
        return False
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 512, generator=generator), torch.randn(512, 64, generator=generator)
    exact = a.double() @ b.double()
    with _route(ROUTE):
        probe = a @ b
    return bool(((probe.double() - exact).abs().max() / exact.abs().max()) < 1e-5)


@contextmanager
def _route(precision: str):
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


_outside: list[str] = []  # the setting before each open float32_on_onednn() block that switched it


@contextmanager
def float32_on_onednn():
    """Run the block's float32 matmuls on oneDNN's kernels where `keeps_float32()`; the setting
    is global to the process, so it is restored when the block ends."""
    if not keeps_float32():
        yield
        return
    _outside.append(torch.backends.mkldnn.matmul.fp32_precision)
    try:
        with _route(ROUTE):
            yield
    finally:
        _outside.pop()


@contextmanager
def paused():
    """Inside a float32_on_onednn() block, run this part with the setting it had outside."""
    if not _outside:
        yield
        return
    with _route(_outside[0]):
        yield
