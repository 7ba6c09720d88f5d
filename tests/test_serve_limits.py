"""Every request's work is bounded and the engine interleaves it with decoding (issue 17, defect 4):
OpenAI's input limits and per-request token budgets give 400s; embeddings and echo scoring run as
small engine tasks, so a concurrent generation keeps going, /health stays 200, and a client that
hangs up stops the work. In-process, on tiny random models and a tiny word-level embedder."""
import asyncio
import json
import time

import httpx
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from plinth.engine import Engine
from plinth.retrieval.embedder import Embedder
from plinth.serve import echo, openai_api
from plinth.serve.app import create_app
from plinth.serve.state import ServerState
from tests.conftest import tiny_model

WORDS = [f"w{i}" for i in range(250)]


def tiny_embedder(seconds_per_text: float = 0.0) -> tuple[Embedder, list[int]]:
    """A bidirectional tiny model behind a word-level tokenizer, and a list whose one number counts
    the forward passes (one per text); each pass takes at least `seconds_per_text`."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tokenizer.enable_truncation(64)
    model, calls = tiny_model(causal=False), [0]
    features = model.features

    def counted(*args, **kwargs):
        calls[0] += 1
        time.sleep(seconds_per_text)
        return features(*args, **kwargs)
    model.features = counted
    return Embedder(model.config, tokenizer, "tiny-embed", 64, lambda: model), calls


def serve(tokenizer, embedder=None):
    engine = Engine(tiny_model(), tokenizer, max_batch=2, max_len=128, threads=1)
    engine.start()
    return engine, ServerState(engine, tokenizer, "tiny", embedder=embedder)


@pytest.fixture
def served(tokenizer):
    embedder, calls = tiny_embedder()
    engine, state = serve(tokenizer, embedder)
    yield httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://test"), calls
    engine.stop()


async def test_over_openai_input_limits_is_400_naming_input(served, monkeypatch):
    client, calls = served
    r = await client.post("/v1/embeddings", json={"model": "tiny-embed", "input": ["w1"] * 2049})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    assert "2049 inputs, max 2048" in r.json()["error"]["message"] and calls[0] == 0
    monkeypatch.setattr(openai_api, "MAX_INPUT_TOKENS", 20)  # each input is [CLS] w1 w2 [SEP]: 4 tokens
    calls[0] = 0
    r = await client.post("/v1/embeddings", json={"model": "tiny-embed", "input": ["w1 w2"] * 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    assert "Requested 24 tokens, max 20 tokens per request" in r.json()["error"]["message"] and calls[0] == 0
    r = await client.post("/v1/embeddings", json={"model": "tiny-embed", "input": ["w1 w2"] * 5})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 20


async def test_echo_scoring_over_its_token_budget_is_400(served, monkeypatch):
    client, _ = served
    monkeypatch.setattr(echo, "MAX_SCORED_TOKENS", 10)
    body = {"model": "tiny", "prompt": ["abcdef", "ghijkl"], "echo": True, "max_tokens": 0}
    r = await client.post("/v1/completions", json={**body, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "would score 12 prompt tokens, max 10 per request" in r.json()["error"]["message"]
    assert (await client.post("/v1/completions", json=body)).status_code == 200  # nothing to score
    r = await client.post("/v1/completions", json={**body, "prompt": "abcdefghij", "logprobs": 1})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == 10


async def test_a_long_embeddings_request_lets_generation_and_health_go_on(tokenizer, monkeypatch):
    embedder, calls = tiny_embedder(seconds_per_text=0.002)
    engine, state = serve(tokenizer, embedder)
    monkeypatch.setattr(engine, "alive", lambda: Engine.alive(engine, stall_seconds=1.0))  # /health's stall limit...
    monkeypatch.setattr(openai_api, "TASK_INPUTS", 4)  # ...far above one task's time, on a busy machine
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://test")
    try:
        texts = [" ".join(WORDS[i % 200:i % 200 + 3]) for i in range(1500)]  # at least 3 s of forward passes: one task today
        embedding = asyncio.create_task(client.post("/v1/embeddings", json={"model": "tiny-embed", "input": texts}))
        while not calls[0]:
            await asyncio.sleep(0.01)
        chat = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 8,
                                                          "ignore_eos": True})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 8
        assert not embedding.done() and calls[0] < len(texts)  # decoding went on between the embedding tasks
        health = []
        while not embedding.done():
            health.append((await client.get("/health")).status_code)
            await asyncio.sleep(0.05)
        assert health and set(health) == {200}
        r = embedding.result()
        assert r.status_code == 200 and len(r.json()["data"]) == len(texts) and calls[0] == len(texts)
        assert r.json()["data"][7]["embedding"] == pytest.approx(embedder.embed(texts[7])[0].tolist(), abs=1e-6)
    finally:
        engine.stop()


async def hang_up_after(app, path: str, body: dict, calls: list[int], passes: int) -> tuple[int, int, int]:
    """Call the ASGI app as a client that hangs up once `passes` forward passes have run: returns the
    response status and the passes counted when it hung up and when the request ended."""
    sent, status, gone = [False], [None], [None]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        while calls[0] < passes:  # still connected; a poll for a hang-up cancels this wait
            await asyncio.sleep(0.01)
        gone[0] = gone[0] if gone[0] is not None else calls[0]
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status[0] = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("test", 1), "server": ("test", 80)}
    await app(scope, receive, send)
    return status[0], gone[0], calls[0]


async def test_a_client_that_hangs_up_stops_its_embeddings(tokenizer):
    embedder, calls = tiny_embedder()
    engine, state = serve(tokenizer, embedder)
    try:
        texts = [f"w{i % 200} w{i % 7}" for i in range(2000)]
        status, gone, ended = await hang_up_after(create_app(state), "/v1/embeddings",
                                                  {"model": "tiny-embed", "input": texts}, calls, passes=5)
        assert status == 499 and gone is not None
        assert ended - gone <= openai_api.TASK_INPUTS < len(texts) - ended  # at most the task running then
    finally:
        engine.stop()


async def test_a_client_that_hangs_up_stops_its_echo_scoring(tokenizer, monkeypatch):
    engine, state = serve(tokenizer)
    tasks, call = [0], engine.call
    monkeypatch.setattr(engine, "call", lambda fn, *args: tasks.__setitem__(0, tasks[0] + 1) or call(fn, *args))
    try:
        prompts = [f"prompt number {i}: " + "x" * 100 for i in range(100)]  # about 8 to a scoring batch (task)
        status, gone, ended = await hang_up_after(create_app(state), "/v1/completions",
                                                  {"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 0,
                                                   "max_tokens": 0}, tasks, passes=3)
        assert status == 499 and ended - gone <= 1 and ended < len(prompts) // 2
    finally:
        engine.stop()
