"""The numbers every task reports: a mean with its standard error, and the pass@k estimator.

    mean_stderr([1, 0, 1, 1])         # (0.75, 0.25)
    pass_at_k(n=10, c=3, k=5)         # chance that 5 of the 10 samples include a correct one
"""
from __future__ import annotations

import math


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    computed as a product so that large n does not overflow."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
