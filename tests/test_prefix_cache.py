"""The engine's prefix cache and its growing KV cache: a request that starts with tokens a cache row
holds (a finished request's, or a running one's) reuses whole prefill pieces of them and gets
exactly what it would have got without; eviction takes the slot freed longest ago, never a running
request's; the cache holds only what is used."""
import httpx
import pytest

from plinth.engine import Engine
from plinth.generate import SamplingParams
from plinth.kv_cache import KEY_BLOCK, KVCache
from tests.conftest import server_state

pytestmark = pytest.mark.usefixtures("no_grad")
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SYSTEM = list(b"You are a careful assistant who answers in one short sentence. " * 3)  # 3 key blocks


CHUNK = 32  # the engines' prefill chunk, and so their prefill pieces: prefixes are reused in whole pieces


def chunks(n):
    return n // CHUNK * CHUNK


def test_a_chat_turn_reuses_the_last_turns_rows_and_answers_the_same(model, tokenizer):
    engine, fresh = (Engine(model, tokenizer, max_batch=4, max_len=512, chunk=CHUNK) for _ in range(2))
    first = SYSTEM + list(b"Q: what is a cat?\nA:")
    (turn1,) = engine.generate_many([first], GREEDY)
    second = first + turn1.tokens + list(b"\nQ: and a dog?\nA:")  # what a client resends: history + new question
    before = engine.stats.cached_tokens
    (turn2,) = engine.generate_many([second], GREEDY)
    # the first turn's prompt was prefilled in chunks; its answer's rows were made one token at a
    # time, which another way of cutting would change in the last bits: the whole chunks are reused
    assert engine.stats.cached_tokens - before == chunks(len(first)) > 0
    (unseen,) = fresh.generate_many([second], GREEDY)
    assert turn2.tokens == unseen.tokens and fresh.stats.cached_tokens == 0


def test_clients_sharing_a_system_prompt_prefill_it_once(model, tokenizer):
    prompts = [SYSTEM + list(f"Q{i}: say {i}".encode()) for i in range(4)]
    params = [SamplingParams(max_tokens=6, temperature=0.8, seed=i, ignore_eos=True) for i in range(4)]
    engine = Engine(model, tokenizer, max_batch=4, max_len=256, chunk=CHUNK)
    completions = engine.generate_many(prompts, params)
    assert engine.stats.cached_tokens == 3 * chunks(len(SYSTEM) + 1)  # the three later ones waited, then copied
    for prompt, p, completion in zip(prompts, params, completions):
        fresh = Engine(model, tokenizer, max_batch=1, max_len=256, chunk=CHUNK)
        assert completion.tokens == fresh.generate_many([prompt], p)[0].tokens


def test_eviction_takes_the_slot_freed_longest_ago_and_spares_running_requests(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=256, chunk=CHUNK)
    a, b = SYSTEM + list(b"first"), list(b"Something else entirely, " * 4)
    engine.generate_many([a], GREEDY)
    engine.generate_many([b], GREEDY)                      # slot 0 keeps a's rows, slot 1 b's
    long_running = engine.submit(list(b"zzz"), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True),
                                 lambda step: None)
    engine.step()                                          # it takes a's slot, the one freed longest ago
    assert long_running.slot == 0 and list(engine.kept) == [1]
    before = engine.stats.cached_tokens
    engine.generate_many([b + list(b"more")], GREEDY)     # b's rows are still there
    assert engine.stats.cached_tokens - before == chunks(len(b)) > 0
    assert long_running.slot == 0 and not long_running.cancelled and long_running in engine.running


def test_requests_with_another_adapter_do_not_share_rows(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=256, chunk=CHUNK)
    engine.generate_many([SYSTEM + list(b"x")], GREEDY)
    engine.kept = {slot: (7, tokens) for slot, (_, tokens) in engine.kept.items()}  # as if made with adapter 7
    before = engine.stats.cached_tokens
    engine.generate_many([SYSTEM + list(b"y")], GREEDY)
    assert engine.stats.cached_tokens == before


def test_the_cache_grows_with_use_and_gives_memory_back():
    from plinth.config import preset
    cache = KVCache(preset("tiny", vocab_size=259), slots=8, max_len=1000, grow=True)
    assert cache.nbytes == 0
    cache.reserve(2, 10)
    assert (cache.rows, cache.positions) == (2, KEY_BLOCK)
    cache.reserve(3, 10)
    assert cache.rows == 4                                 # rows double: 16 requests arriving grow it 4 times
    cache.fit(2, 10)
    cache.k[0][1, :, 5] = 3.0
    cache.reserve(2, KEY_BLOCK + 1)                        # whole blocks, by at least a quarter: copies are rare
    assert cache.positions == 2 * KEY_BLOCK and bool((cache.k[0][1, :, 5] == 3.0).all())
    cache.reserve(2, 2 * KEY_BLOCK + 1)
    assert cache.positions == 3 * KEY_BLOCK
    cache.reserve(2, 8 * KEY_BLOCK + 1)
    assert cache.positions == 9 * KEY_BLOCK
    cache.reserve(2, 9 * KEY_BLOCK + 1)
    assert cache.positions == 12 * KEY_BLOCK               # 9 blocks + a quarter, rounded up to whole blocks
    cache.reserve(8, 1000)
    assert cache.positions == 1024                         # max_len in whole key blocks, never beyond
    with pytest.raises(ValueError):
        cache.reserve(9, 10)
    cache.fit(2, 10)
    assert (cache.rows, cache.positions) == (2, KEY_BLOCK) and bool((cache.k[0][1, :, 5] == 3.0).all())
    cache.fit(2, 10)
    assert cache.nbytes == 2 * cache.layers * cache.k[0].numel() * 4


async def test_usage_reports_the_cached_prompt_tokens(model, tokenizer):
    from plinth.serve.app import create_app
    with server_state(model, tokenizer, max_batch=2, max_len=512, chunk=CHUNK) as state:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://t") as c:
            body = {"model": "tiny", "prompt": bytes(SYSTEM).decode() + "Q: hi", "max_tokens": 4, "temperature": 0}
            first = (await c.post("/v1/completions", json=body)).json()
            second = (await c.post("/v1/completions", json=body)).json()
            chat = {"model": "tiny", "input": "Hi there", "instructions": bytes(SYSTEM).decode(), "max_output_tokens": 4}
            responses = [(await c.post("/v1/responses", json=chat)).json()["usage"] for _ in range(2)]
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == chunks(second["usage"]["prompt_tokens"] - 1) > 0
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert responses[1]["input_tokens_details"]["cached_tokens"] == chunks(responses[1]["input_tokens"] - 1) > 0


def test_smollm2_answers_the_same_with_and_without_the_prefix_cache():
    import plinth
    m = plinth.load()  # int4: bfloat16 activations, where any change of summation order shows
    source = open(__file__.replace("tests/test_prefix_cache.py", "plinth/engine.py")).read()
    history = m.tokenizer.apply_chat_template([{"role": "system", "content": source[:2500]},
                                               {"role": "user", "content": "What does _admit do?"}],
                                              add_generation_prompt=True)
    first = m.tokenizer.encode(history)
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=0)
    engine = Engine(m.model, m.tokenizer, max_batch=2)
    (answer,) = engine.generate_many([first], params)
    second = first + answer.tokens + m.tokenizer.encode("<|im_start|>user\nAnd _finish?<|im_end|>\n<|im_start|>assistant\n")
    (cached,) = engine.generate_many([second], params)
    assert engine.stats.cached_tokens == len(first) // engine.piece * engine.piece >= 512
    (fresh,) = Engine(m.model, m.tokenizer, max_batch=2).generate_many([second], params)
    assert cached.tokens == fresh.tokens
    assert [s.choice.logprob for s in cached.steps] == [s.choice.logprob for s in fresh.steps]  # bit for bit


def test_a_copy_into_a_cache_grown_during_a_forward_pass_works(model, tokenizer):
    """The cache's tensors are remade inside the forward pass's inference mode when it grows there;
    copying a running request's rows for a later request must still work (it once raised, and the
    request was lost from the queue, so generate_many waited forever)."""
    long = SYSTEM + list(b"the same question")
    prompts = [long, list(b"another"), list(b"and another"), long]  # the last waits for the first, then copies
    engine = Engine(model, tokenizer, max_batch=4, max_len=256, chunk=CHUNK)
    completions = engine.generate_many(prompts, GREEDY, timeout=60)
    assert engine.stats.cached_tokens == chunks(len(long) - 1)
    assert completions[3].tokens == completions[0].tokens
