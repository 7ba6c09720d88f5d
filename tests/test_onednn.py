"""plinth/onednn.py: float32 products inside `float32_on_onednn()` keep float32 precision, and the
process-wide setting comes back as it was, also when the block fails."""
import pytest
import torch

from plinth import onednn


def relative_error(a, b):
    exact = a.double() @ b.double()
    return float((a @ b).double().sub(exact).abs().max() / exact.abs().max())


def test_products_in_the_block_keep_float32_precision_and_the_setting_comes_back():
    before = torch.backends.mkldnn.matmul.fp32_precision
    generator = torch.Generator().manual_seed(1)
    x, w = torch.randn(300, 576, generator=generator), torch.randn(576, 1536, generator=generator)
    strict = relative_error(x, w)
    with onednn.float32_on_onednn():
        routed = relative_error(x, w)
        if onednn.keeps_float32():
            assert torch.backends.mkldnn.matmul.fp32_precision == onednn.ROUTE
    assert routed < 1e-5 and routed < 20 * strict  # bfloat16 arithmetic would be ~1e-3
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    with pytest.raises(RuntimeError), onednn.float32_on_onednn():
        raise RuntimeError("boom")
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_where_the_route_would_lose_precision_nothing_changes(monkeypatch):
    monkeypatch.setattr(onednn, "keeps_float32", lambda: False)
    before = torch.backends.mkldnn.matmul.fp32_precision
    with onednn.float32_on_onednn():
        assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_the_probe_rejects_bfloat16_arithmetic(monkeypatch):
    """The probe's threshold separates the two precisions: a route that rounded to bfloat16 fails it."""
    onednn.keeps_float32.cache_clear()
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, b: real_matmul(a.bfloat16(), b.bfloat16()).float() if a.dtype == torch.float32
                        else real_matmul(a, b))
    try:
        assert not onednn.keeps_float32()
    finally:
        monkeypatch.undo()
        onednn.keeps_float32.cache_clear()


def test_paused_runs_a_part_of_the_block_with_the_setting_from_outside():
    before = torch.backends.mkldnn.matmul.fp32_precision
    with onednn.paused():  # outside any block: nothing to pause
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    with onednn.float32_on_onednn():
        inside = torch.backends.mkldnn.matmul.fp32_precision
        with onednn.paused():
            assert torch.backends.mkldnn.matmul.fp32_precision == before
        assert torch.backends.mkldnn.matmul.fp32_precision == inside
    assert torch.backends.mkldnn.matmul.fp32_precision == before
