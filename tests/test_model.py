"""The Transformer on tiny random configs: cached decoding, batching and masks agree with full recompute."""
import pytest
import torch

from plinth.config import ModelConfig, preset
from plinth.errors import PlinthError
from plinth.kv_cache import KVCache
from plinth.model import SHORT_ROWS, Positions, Transformer, attention_mask
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")


def tokens(n, seed=1, batch=1):
    return torch.randint(0, 259, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, dict(sliding_window=4, global_every=2, rope_local_theta=100.0),
                                       dict(qk_norm=True, sandwich_norm=True, embed_scale=True, mlp="geglu")])
def test_kv_cache_decode_equals_full_recompute(overrides):
    model = tiny_model(**overrides)
    ids = tokens(20)
    full = model(ids)
    cache = KVCache.for_model(model, 1, 32)
    pieces = [model(ids[:, :8], cache=cache.view())]  # prefill 8, then one token at a time
    for i in range(8, 20):
        pieces.append(model(ids[:, i:i + 1], cache=cache.view(i)))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_full():
    model = tiny_model(sliding_window=5, global_every=2)
    ids = tokens(24)
    cache = KVCache.for_model(model, 1, 24)
    chunks = [model(ids[:, i:i + 6], cache=cache.view(i)) for i in range(0, 24, 6)]
    torch.testing.assert_close(torch.cat(chunks, 1), model(ids), atol=1e-5, rtol=1e-5)


def test_batched_rows_at_different_positions_match_single_runs():
    """The serving path: rows in arbitrary cache slots, each at its own position, padded to one length."""
    model = tiny_model()
    a, b = tokens(10, seed=2), tokens(6, seed=3)
    cache = KVCache.for_model(model, 4, 16)
    slots = torch.tensor([3, 1])
    padded = torch.zeros(2, 10, dtype=torch.long)
    padded[0], padded[1, :6] = a[0], b[0]
    out = model(padded, cache=cache.view(0, slots), last=torch.tensor([9, 5]))  # prefill both
    torch.testing.assert_close(out[0], model(a)[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(b)[0, -1], atol=1e-5, rtol=1e-5)
    step = torch.tensor([[7], [9]])  # one decode step, each row at its own position
    out = model(step, cache=cache.view(torch.tensor([10, 6]), slots))
    torch.testing.assert_close(out[0, 0], model(torch.cat([a, step[:1]], 1))[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 0], model(torch.cat([b, step[1:]], 1))[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 70])
def test_decoding_attention_gives_a_row_the_same_bits_alone_or_in_any_batch(window):
    """What lets the server batch without changing outputs: a decoding row's attention output is
    bit-identical alone or beside rows of other lengths, in cache slots with gaps between them."""
    config = preset("tiny", vocab_size=259, dim=256, n_heads=4, n_kv_heads=2, sliding_window=window, global_every=2)
    attn = Transformer(config).layers[0].attn  # _decode uses no weights; head_dim 64 like real models
    cache = KVCache(config, slots=8, max_len=256)
    generator = torch.Generator().manual_seed(0)
    for layer in cache.k + cache.v:
        layer.normal_(generator=generator)
    lengths, slots = torch.tensor([5, 130, 64, 200]), torch.tensor([0, 2, 3, 7])  # keys straddle blocks
    q = torch.randn(4, 4, 1, 64, generator=generator)

    def decode(rows):
        return attn._decode(q[rows], cache.view(lengths[rows] - 1, slots[rows]))

    batched = decode([0, 1, 2, 3])
    for row in range(4):
        assert torch.equal(decode([row])[0], batched[row])
        assert torch.equal(decode(list(range(row, 4)))[0], batched[row])
    keys, values = cache.k[0][7, :, :200], cache.v[0][7, :, :200]  # and row 3 is attention over its keys
    if window:
        keys, values = keys[:, -window:], values[:, -window:]
    expected = torch.softmax(q[3].view(2, 2, 64) @ keys.transpose(1, 2) * attn.scale, -1) @ values
    torch.testing.assert_close(batched[3].view(2, 2, 64), expected)


def test_attention_mask_against_loops():
    q_pos = torch.tensor([[3, 4, 5]])
    mask = attention_mask(q_pos, key_len=6, causal=True, window=2)[0, 0]
    expected = [[int(k <= q and q - k < 2) for k in range(6)] for q in (3, 4, 5)]
    assert mask.int().tolist() == expected
    assert attention_mask(q_pos, 6, causal=False, window=None).all()


def test_sliding_window_limits_what_a_token_sees():
    """A change to a token outside every layer's window must not change the last logits."""
    model = tiny_model(sliding_window=3, global_every=100)  # every layer local
    ids = tokens(12)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 259
    # 2 layers × window 3: position 11 depends on positions ≥ 11 - 2*(3-1) = 7
    torch.testing.assert_close(model(ids)[0, -1], model(changed)[0, -1])
    assert not torch.allclose(model(ids)[0, 1], model(changed)[0, 1])


def test_embeds_input_equals_token_input():
    model = tiny_model()
    ids = tokens(7)
    torch.testing.assert_close(model(embeds=model.tok_embeddings(ids)), model(ids))


def test_bidirectional_sees_the_future():
    model = tiny_model(causal=False)
    ids = tokens(6)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 259
    assert not torch.allclose(model(ids)[0, 0], model(changed)[0, 0])


def test_init_weights_and_tying():
    model = Transformer(preset("tiny"))
    assert model.tok_embeddings.weight.is_meta  # nothing allocated until asked
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert abs(float(model.layers[0].attn.wq.weight.std()) - 0.02) < 0.005
    assert float(model.layers[0].attn_norm.weight.mean()) == 1.0


def test_load_weights_names_missing_and_unexpected_keys():
    model = tiny_model()
    state = {k: v for k, v in model.state_dict().items() if k != "norm.weight"}
    state["bogus.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="missing: norm.weight.*unexpected: bogus.weight"):
        Transformer(model.config).load_weights(state)


def test_position_past_context_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="context window"):
        model(tokens(4), cache=KVCache.for_model(model, 1).view(254))


@pytest.mark.parametrize("bad, message", [(dict(n_heads=3, n_kv_heads=2), "multiple of n_kv_heads"),
                                          (dict(mlp="relu"), "swiglu"), (dict(dim=0), "positive"),
                                          (dict(colour="red"), "unknown model config field")])
def test_bad_config_is_a_clear_error(bad, message):
    with pytest.raises(PlinthError, match=message):
        ModelConfig.from_dict({**dict(dim=64, n_heads=4), **bad})


@pytest.mark.parametrize("causal", [True, False])  # text; and bidirectional: encoders, a ViT
@torch.enable_grad()
def test_short_bf16_rows_attend_by_matmuls_within_a_few_bfloat16_steps(causal):
    """bfloat16 rows up to SHORT_ROWS tokens take `_by_matmuls`: outputs and gradients
    within a few bfloat16 steps (2^-8 relative) of float64 attention, each key head shared
    by its group of query heads; PyTorch's fused kernel in bfloat16 shown for scale."""
    attention = tiny_model(n_heads=4, n_kv_heads=2, dim=64).layers[0].attn
    attention.causal = causal
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 40, 16, generator=g) for heads in (4, 2, 2))
    where = Positions(2, 40, 0, "cpu")
    assert where.whole(None) and 40 <= SHORT_ROWS
    bf16 = [t.bfloat16() for t in (q, k, v)]
    assert torch.equal(attention._prefill(*bf16, where), attention._by_matmuls(*bf16))

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        return [out.detach().double()] + [t.grad.double() for t in inputs]

    exact = run(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal, scale=attention.scale),
        torch.float64)
    ours = run(attention._by_matmuls, torch.bfloat16)
    fused = run(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=attention.scale, enable_gqa=True), torch.bfloat16)
    for mine, theirs, truth in zip(ours, fused, exact):
        step = float(truth.abs().max()) * 2 ** -8
        assert (mine - truth).abs().max() < 4 * step and (theirs - truth).abs().max() < 4 * step
