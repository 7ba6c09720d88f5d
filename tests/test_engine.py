"""The continuous-batching engine on a tiny model: batching never changes what a request gets."""
import threading

import pytest

from plinth.errors import PlinthError
from plinth.generate import SamplingParams, generate_stream
from plinth.engine import Engine

pytestmark = pytest.mark.usefixtures("no_grad")


def alone(model, tokenizer, prompt, params):
    return [s.choice.token for s in generate_stream(model, tokenizer, prompt, params)]


def collect(engine, prompt, params, out):
    out[len(out)] = record = []
    return engine.submit(prompt, params, lambda step: record.append(step)), record


def drain(engine, limit=500):
    for _ in range(limit):
        if not engine.running and not engine.waiting:
            return
        engine.step()
    raise AssertionError("engine did not finish")


PROMPTS = [list(b"Hello there"), list(b"a"), list(b"The quick brown fox jumps over the lazy dog" * 2), list(b"xyz")]
PARAMS = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=7, temperature=0.9, seed=5, ignore_eos=True),
          SamplingParams(max_tokens=9, temperature=0, stop=["e"]),
          SamplingParams(max_tokens=15, top_k=3, seed=11, ignore_eos=True)]


def test_batched_results_equal_running_each_alone(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch=4, max_len=128, chunk=16)  # the long prompt prefills in chunks
    head_rows, head = [], model.output.forward
    monkeypatch.setattr(model.output, "forward", lambda h: head_rows.append(h.shape[0]) or head(h))
    records = engine.generate_many(PROMPTS, PARAMS, timeout=60)
    monkeypatch.undo()
    for (prompt, params), record in zip(zip(PROMPTS, PARAMS), records):
        assert record.tokens == alone(model, tokenizer, prompt, params)
        assert record.finish_reason in ("stop", "length")
    # the output layer ran for the sampled tokens only, not for prefill pieces before a prompt's end
    assert sum(head_rows) == sum(len(record.steps) for record in records)


def test_generate_many_on_the_engine_thread_gives_the_same_tokens_and_raises_a_request_error(model, tokenizer):
    """With the engine thread started, generate_many waits for it; a failing request's error is
    raised once every request has ended, and the engine goes on serving."""
    engine = Engine(model, tokenizer, max_batch=2, max_len=128)
    engine.start()
    try:
        assert [c.tokens for c in engine.generate_many(PROMPTS, PARAMS, timeout=60)] == \
            [alone(model, tokenizer, p, s) for p, s in zip(PROMPTS, PARAMS)]
        original = engine._run

        def fail_while_prefilling_the_second(group, *most):  # the pass fails whichever rows share it
            if any(r.tokens == PROMPTS[1] for r in group):
                raise RuntimeError("boom")
            return original(group, *most)
        engine._run = fail_while_prefilling_the_second
        with pytest.raises(RuntimeError, match="boom"):
            engine.generate_many([PROMPTS[0], PROMPTS[1]], PARAMS[0], timeout=60)
        engine._run = original
        assert engine.generate_many([PROMPTS[0]], PARAMS[0], timeout=60)[0].tokens == alone(model, tokenizer, PROMPTS[0], PARAMS[0])
    finally:
        engine.stop()


def test_generate_many_checks_every_prompt_first_ignores_the_queue_limit_and_keeps_its_deadline(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=64, max_queue=2)
    assert engine.generate_many([], PARAMS[0]) == []
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    out = engine.generate_many([[65]] * 5, short, timeout=60)  # more prompts than the queue takes from clients
    assert [c.tokens for c in out] == [alone(model, tokenizer, [65], short)] * 5
    with pytest.raises(PlinthError, match="context window"):  # the second prompt cannot fit: nothing is queued
        engine.generate_many([[65], [65] * 64], short)
    assert not engine.waiting and not engine.running
    with pytest.raises(TimeoutError, match="1 of 1 requests unfinished"):
        engine.generate_many([[65]], SamplingParams(max_tokens=50, ignore_eos=True), timeout=0)
    engine.step()  # the timed-out request was cancelled: it leaves at the next step
    assert not engine.waiting and not engine.running and engine.stats.cancelled == 1


def test_requests_join_and_leave_while_others_decode(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=128, chunk=8)
    out = {}
    collect(engine, PROMPTS[0], PARAMS[0], out)
    for _ in range(3):
        engine.step()
    for prompt, params in zip(PROMPTS[1:], PARAMS[1:]):  # more requests than slots: they queue
        collect(engine, prompt, params, out)
    assert len(engine.running) == 1 and len(engine.waiting) == 3
    drain(engine)
    for (prompt, params), record in zip(zip(PROMPTS, PARAMS), out.values()):
        assert [s.choice.token for s in record] == alone(model, tokenizer, prompt, params)
    assert sorted(engine.free_slots) == [0, 1]


def test_cancel_frees_the_slot_at_the_next_step(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_len=128)
    out = {}
    first, _ = collect(engine, PROMPTS[0], SamplingParams(max_tokens=100, ignore_eos=True), out)
    second, record = collect(engine, PROMPTS[1], PARAMS[0], out)
    engine.step()
    engine.step()
    engine.cancel(first)
    engine.step()
    assert first not in engine.running and second in engine.running
    drain(engine)
    assert len(record) == 12 and engine.stats.cancelled == 1


def test_a_failing_step_fails_its_requests_not_the_engine(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch=2, max_len=128)
    out = {}
    collect(engine, PROMPTS[0], PARAMS[0], out)
    original = engine._run
    monkeypatch.setattr(engine, "_run", lambda group, *most: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.step()
    assert isinstance(out[0][-1], RuntimeError) and not engine.running
    monkeypatch.setattr(engine, "_run", original)
    collect(engine, PROMPTS[1], PARAMS[0], out)
    drain(engine)
    assert [s.choice.token for s in out[1]] == alone(model, tokenizer, PROMPTS[1], PARAMS[0])


def test_engine_thread_serves_concurrent_submitters(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_len=128)
    engine.start()
    finished, results = threading.Semaphore(0), {i: [] for i in range(len(PROMPTS))}

    def emit_for(i):
        def emit(step):
            results[i].append(step.choice.token)
            if step.finish_reason:
                finished.release()
        return emit

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    threads = [threading.Thread(target=engine.submit, args=(p, params, emit_for(i))) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    try:
        assert all(finished.acquire(timeout=30) for _ in PROMPTS)
        assert engine.alive()
    finally:
        engine.stop()
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == alone(model, tokenizer, prompt, params)


def test_a_request_decoding_alone_speculates_and_gets_plain_decodings_tokens(model, tokenizer):
    prompt = list(b"abcdefgh abcdefgh abcdefgh abcdefgh ")  # a pattern worth guessing
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.9, seed=3, ignore_eos=True)]
    for p in params:
        guessing, plain = Engine(model, tokenizer, max_batch=2), Engine(model, tokenizer, max_batch=2, speculate=False)
        (fast,) = guessing.generate_many([prompt], p)
        (slow,) = plain.generate_many([prompt], p)
        assert fast.tokens == slow.tokens and len(fast.tokens) == 40
        assert [s.text for s in fast.steps] == [s.text for s in slow.steps]
        if p.temperature == 0:  # the tiny model repeats the pattern greedily: guesses are kept, passes saved
            assert guessing.stats.steps < plain.stats.steps
