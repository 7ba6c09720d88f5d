"""Sliding-window layers keep a ring of their last positions in the KV cache (plinth/kv_cache.py):
decoding far past the window, prefilling a prompt longer than the ring in one pass or in the
engine's pieces, batching, speculative verify passes and the prefix cache all give what a plain
forward pass over the whole sequence (the window applied by masks, no cache) gives, while a local
layer holds at most a ring's positions."""
import copy

import pytest
import torch

from plinth.engine import Engine
from plinth.generate import SamplingParams
from plinth.kv_cache import KVCache, whole_key_blocks
from plinth.model import DECODE_TOKENS
from plinth.quant import compact_
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")
WINDOW = 16
RING = whole_key_blocks(WINDOW + DECODE_TOKENS)  # slack 0: a 64-position ring, a quarter of the context
CHUNK = 32                                       # the engines' prefill pieces: slack chunk - piece = 0, the same ring
GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=0)


def sliding_model(dtype="float32"):
    """Two local layers (a 16-token window) and a global one. Weights scaled up: at its init scale a
    random model just repeats its last token, which any cache gets right. int8: the compact weights
    whose kernels give a row the same bits in any pass (float GEMMs do not), for bit-for-bit checks."""
    model = tiny_model(n_layers=3, sliding_window=WINDOW, global_every=3)
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.mul_(6)
    return compact_(model, dtype)


def ids(n, seed=1):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_follows_the_full_forward(model, prompt, new, logprobs=None):
    """The generated tokens are the greedy choices of a plain forward pass over the whole sequence
    (teacher-forced), with its log-probabilities where given."""
    logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1:-1].float()
    assert logits.argmax(-1).tolist() == new
    if logprobs is not None:
        expected = torch.log_softmax(logits, -1)[torch.arange(len(new)), torch.tensor(new)]
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=1e-4)


def test_decoding_far_past_the_window_in_a_ring_equals_the_full_forward():
    model = sliding_model()
    cache = KVCache.for_model(model, 1, 256, slack=0)
    assert cache.rings == [RING, RING, None]
    tokens = ids(40)
    steps = [model(torch.tensor([tokens]), cache=cache.view(), last=torch.tensor([39]))[0]]
    for _ in range(150):  # the ring wraps twice
        tokens.append(int(steps[-1].argmax()))
        steps.append(model(torch.tensor([tokens[-1:]]), cache=cache.view(len(tokens) - 1))[0, 0])
    full = model(torch.tensor([tokens]))[0, 39:]
    torch.testing.assert_close(torch.stack(steps[:-1]), full[:-1], atol=1e-4, rtol=1e-4)
    assert full[:-1].argmax(-1).tolist() == tokens[40:]
    # local layers hold a ring, the global one every position; the cache says so
    assert [k.shape[2] for k in cache.k] == [RING, RING, 256]
    full_cache = KVCache.for_model(model, 1, 256)
    assert cache.nbytes == cache.bytes_per_row(256) == full_cache.nbytes * (2 * RING + 256) // (3 * 256)


def test_a_verify_pass_over_a_ring_gives_each_token_the_bits_of_decoding_it_alone():
    """Speculative decoding's passes of several tokens, also after a pass whose guesses were
    rejected (their keys left in the ring past the accepted ones)."""
    model = sliding_model("int8")
    cache = KVCache.for_model(model, 1, 256, slack=0)
    tokens = ids(100, seed=2)
    model(torch.tensor([tokens[:70]]), cache=cache.view())
    snapshot = copy.deepcopy(cache)
    alone = torch.stack([model(torch.tensor([[t]]), cache=cache.view(70 + i))[0, 0] for i, t in enumerate(tokens[70:])])
    first = model(torch.tensor([tokens[70:85]]), cache=snapshot.view(70))[0]  # DECODE_TOKENS - 1 tokens
    assert torch.equal(first, alone[:15])
    again = model(torch.tensor([tokens[71:86]]), cache=snapshot.view(71))[0]  # 14 of them rejected, written over
    assert torch.equal(again, alone[1:16])


def test_a_prompt_longer_than_the_ring_in_one_pass_in_pieces_and_in_rows_at_other_positions(tokenizer):
    """generate_stream's path (the whole prompt in one pass), the engine's (pieces), and a batched
    pass whose rows start at different positions all agree with the plain forward."""
    model = sliding_model()
    prompt = ids(200, seed=3)
    cache = KVCache.for_model(model, 2, 256, slack=0)
    out = model(torch.tensor([prompt]), cache=cache.view(), last=torch.tensor([199]))[0]
    new = []
    for _ in range(20):
        new.append(int(out.argmax()))
        out = model(torch.tensor([new[-1:]]), cache=cache.view(199 + len(new)))[0, 0]
    assert_follows_the_full_forward(model, prompt, new)
    (engine_out,) = Engine(model, tokenizer, max_batch=1, max_len=256, chunk=CHUNK).generate_many([prompt], GREEDY)
    assert engine_out.tokens[:20] == new
    assert_follows_the_full_forward(model, prompt, engine_out.tokens, [s.choice.logprob for s in engine_out.steps])
    # two rows, 60 and 100 tokens in, each fed 20 more in one pass (the window's keys gathered per row)
    other = KVCache.for_model(model, 2, 256, slack=0)
    model(torch.tensor([prompt[:60]]), cache=other.view(0, torch.tensor([0])))
    model(torch.tensor([prompt[:100]]), cache=other.view(0, torch.tensor([1])))
    rows = torch.tensor([prompt[60:80], prompt[100:120]])
    both = model(rows, cache=other.view(torch.tensor([60, 100])))
    torch.testing.assert_close(both[0], model(torch.tensor([prompt[:80]]))[0, 60:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], model(torch.tensor([prompt[:120]]))[0, 100:], atol=1e-4, rtol=1e-4)


def engine(model, tokenizer, **options):
    return Engine(model, tokenizer, max_batch=4, max_len=256, chunk=CHUNK, **options)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_engine_gives_a_row_the_same_output_alone_batched_and_from_a_prefix_longer_than_the_window(tokenizer, dtype):
    model = sliding_model(dtype)
    system = ids(100, seed=4)
    prompts = [system + list(b"one"), list(b"short"), system + list(b"two, and more"), ids(150, seed=5)]
    batched = engine(model, tokenizer)
    completions = batched.generate_many(prompts, GREEDY)
    assert batched.stats.cached_tokens == 96  # the second system prompt waited for the first's, then copied it
    for prompt, completion in zip(prompts, completions):
        (alone,) = engine(model, tokenizer, prefix_cache=False).generate_many([prompt], GREEDY)
        assert completion.tokens == alone.tokens
        logprobs = [s.choice.logprob for s in completion.steps]
        if dtype == "int8":
            assert logprobs == [s.choice.logprob for s in alone.steps]  # bit for bit
        else:  # float32 throughout: close to attending over every position by masks
            assert_follows_the_full_forward(model, prompt, completion.tokens, logprobs)
    local, global_ = batched.cache.k[0].shape[2], batched.cache.k[2].shape[2]
    assert local == RING and global_ >= 150 + 30 - 1  # held: the long request's row, kept


@pytest.mark.parametrize("answer, reused", [(5, True), (40, False)])
def test_a_finished_rows_prefix_is_reused_only_while_its_ring_still_holds_the_window_before_it(tokenizer, answer, reused):
    model = sliding_model()
    first = ids(103, seed=6)
    params = SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True)
    chat = engine(model, tokenizer)
    (turn1,) = chat.generate_many([first], params)
    second = first + turn1.tokens + list(b"and then?")
    (turn2,) = chat.generate_many([second], GREEDY)
    assert chat.stats.cached_tokens == (96 if reused else 0)
    (fresh,) = engine(model, tokenizer, prefix_cache=False).generate_many([second], GREEDY)
    assert turn2.tokens == fresh.tokens
    assert [s.choice.logprob for s in turn2.steps] == [s.choice.logprob for s in fresh.steps]
