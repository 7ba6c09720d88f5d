"""LoRA layers against an independent reference computation, merging, saving and loading, QLoRA."""
import copy

import pytest
import torch

from plinth.adapt.lora import (NF4_CODES, NF4Linear, adapter_state, attach_lora, load_adapter, lora_layers, merge_lora,
                               quantize_base, save_adapter)
from plinth.errors import PlinthError
from tests.conftest import tiny_model

TOKENS = torch.tensor([[5, 70, 200, 33, 9, 120, 7, 64]])


def randomise_adapter(model, seed=1):
    """B starts at zero (the adapter is a no-op); give it values so the checks mean something."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.normal_(0, 0.05)


def test_lora_layer_equals_reference_weight_update():
    model = tiny_model()
    base_weight = model.layers[0].attn.wq.weight.detach().clone()
    attach_lora(model, rank=4, alpha=8, targets=["wq"])
    randomise_adapter(model)
    layer = model.layers[0].attn.wq
    A, B = layer.lora_a.detach(), layer.lora_b.detach()
    x = torch.randn(3, 64)
    reference = x @ (base_weight + (8 / 4) * B @ A).T  # W + (alpha/r)·B·A, computed here independently
    torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)


def test_only_adapter_trains_and_starts_as_base():
    model = tiny_model()
    before = model(TOKENS)
    names = attach_lora(model, rank=2, alpha=4, targets=["wq", "wv", "w_down"])
    assert len(names) == 3 * model.config.n_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}" for n in names for part in ("lora_a", "lora_b")}
    torch.testing.assert_close(model(TOKENS), before)  # B = 0: the adapted model is the base model


def test_merged_logits_equal_base_plus_adapter():
    model = tiny_model()
    attach_lora(model, rank=4, alpha=16, targets=["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"])
    randomise_adapter(model)
    with torch.no_grad():
        adapted = model(TOKENS)
        merge_lora(model)
        assert not lora_layers(model)
        torch.testing.assert_close(model(TOKENS), adapted, atol=1e-4, rtol=0)


def test_adapter_saves_alone_and_loads_onto_its_base(tmp_path):
    model = tiny_model()
    attach_lora(model, rank=4, alpha=8, targets=["wq", "wv"])
    randomise_adapter(model)
    save_adapter(model, tmp_path, base="tiny-test")
    assert {p.name for p in tmp_path.iterdir()} == {"adapter.safetensors", "adapter.json"}
    assert (tmp_path / "adapter.safetensors").stat().st_size < 50_000  # adapter tensors only, no base
    fresh = tiny_model()
    config = load_adapter(fresh, tmp_path)
    assert config["rank"] == 4 and config["targets"] == ["wq", "wv"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS), model(TOKENS))


def test_adapter_for_another_base_is_refused(tmp_path):
    model = tiny_model(seed=0)
    attach_lora(model, rank=2, alpha=4)
    save_adapter(model, tmp_path, base="tiny-seed-0")
    with pytest.raises(PlinthError, match="trained on base model 'tiny-seed-0'"):
        load_adapter(tiny_model(seed=1), tmp_path)


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(PlinthError, match="rank 65 does not fit"):
        attach_lora(tiny_model(), rank=65, targets=["wq"])
    with pytest.raises(PlinthError, match="unknown LoRA target"):
        attach_lora(tiny_model(), targets=["query"])


def test_nf4_picks_the_nearest_code_of_each_block():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False)
    q = NF4Linear(linear, block=64)
    w = linear.weight.detach().reshape(-1, 64)
    absmax = w.abs().amax(1, keepdim=True)
    # brute force: distance from every weight to every scaled code, take the closest
    candidates = NF4_CODES[None, None, :] * absmax[:, :, None]  # (blocks, 1, 16)
    nearest = candidates.squeeze(1).gather(1, (w[:, :, None] - candidates).abs().argmin(-1))
    torch.testing.assert_close(q.dequantize(), nearest.reshape(64, 128))
    assert q.packed.numel() == w.numel() // 2 and q.packed.dtype == torch.uint8


def test_qlora_gradients_flow_through_the_4bit_base():
    model = tiny_model()
    reference = copy.deepcopy(model)
    quantize_base(model)
    attach_lora(model, rank=4, alpha=8, targets=["wq", "w_down"])
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.startswith("layers"))
    with torch.no_grad():  # 4-bit base stays close to the float model
        assert torch.nn.functional.cosine_similarity(model(TOKENS).flatten(), reference(TOKENS).flatten(), 0) > 0.99
    model(TOKENS).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_b"))
    randomise_adapter(model)
    with torch.no_grad():
        adapted = model(TOKENS)
        merge_lora(model)
        torch.testing.assert_close(model(TOKENS), adapted, atol=1e-4, rtol=0)
    assert adapter_state(model) == {}
