"""The HTTP layer in-process on a tiny model: health follows the engine, and faults mid-stream
arrive as a final error event (the real-model server is in test_serve.py)."""
import json

import httpx
import pytest

from plinth.generate import SamplingParams
from plinth.serve.app import create_app
from plinth.serve.state import ServerState
from plinth.engine import Engine


@pytest.fixture
def served(model, tokenizer):
    # speculate=False: a lone request's guessed-token passes call the model directly, past the
    # faults these tests inject into Engine._run
    engine = Engine(model, tokenizer, max_batch=2, max_len=128, max_queue=1, speculate=False)
    engine.start()
    state = ServerState(engine, tokenizer, "tiny")
    yield state, httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://test")
    engine.stop()


async def test_health_fails_when_the_engine_thread_is_gone(served):
    state, client = served
    assert (await client.get("/health")).status_code == 200
    state.engine.stop()
    r = await client.get("/health")
    assert r.status_code == 503 and "engine" in r.json()["message"]


@pytest.fixture
def fault_on_second_step(served, monkeypatch):
    """The engine's second decoding step fails."""
    state, _ = served
    original, calls = state.engine._run, []

    def fail_on_second_step(group, *most):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated fault")
        return original(group, *most)

    monkeypatch.setattr(state.engine, "_run", fail_on_second_step)


async def test_a_fault_after_streaming_began_is_a_final_error_event(served, fault_on_second_step):
    state, client = served
    async with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 20,
                                                               "stream": True, "ignore_eos": True,
                                                               "logprobs": 0}) as r:  # every token is an event
        assert r.status_code == 200
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert len(json.loads(events[0])["choices"][0]["logprobs"]["tokens"]) == 1  # one token arrived first
    assert "simulated fault" in json.loads(events[-1])["error"]["message"]


async def test_a_fault_in_a_responses_stream_is_a_final_error_event(served, fault_on_second_step):
    _, client = served
    async with client.stream("POST", "/v1/responses", json={"input": "Hello", "max_output_tokens": 20, "seed": 0,
                                                             "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "error" and "response.completed" not in kinds  # the seed's first token is text
    assert "simulated fault" in events[-1]["message"] and events[-1]["code"] == "server_error"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


async def test_a_full_queue_is_429_with_retry_after(served):
    state, client = served
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 5}
    with state.engine._wake:  # hold the engine so the queue cannot drain, and fill it
        state.engine.submit([1, 2], SamplingParams(max_tokens=1), lambda step: None)
        r = await client.post("/v1/completions", json=body)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    r = await client.post("/v1/completions", json={**body, "n": 2})  # could never fit: not worth a retry
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


async def test_a_sampling_failure_fails_only_its_request(served):
    state, client = served
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3,
                                                   "temperature": 1e-39, "seed": 2**70, "logit_bias": {"5": 1}})
    assert r.status_code == 200  # a vanishing temperature is greedy; any integer seed works
    assert (await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "logit_bias": {"²": 1}})).status_code == 400
    assert (await client.post("/v1/completions", json={"model": "tiny", "prompt": []})).status_code == 400
    assert state.engine.thread_alive()
