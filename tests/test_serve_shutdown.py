"""Shutting `plinth serve` down (issue 17): after SIGTERM, in-flight requests get `--grace` seconds;
then those still running end with a final "server shutting down" error and the process exits, and
a second signal exits at once. Real server processes, on a tiny random model so they start in
seconds; its streams of thousands of tokens are still running when the signal comes. Also: a 405
keeps its Allow header, and the engine's abort_all."""
import contextlib
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from plinth.generate import SamplingParams
from plinth.serve.app import create_app
from plinth.weights.native import write_model
from tests.conftest import byte_tokenizer, server_state, tiny_model
from tests.test_serve import start_server

CONTEXT = 4096
LONG = {"model": "tiny", "prompt": "Once", "max_tokens": CONTEXT - 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Wider than the tiny preset: at dim 64 a step is mostly Python (under a millisecond on a fast CPU),
    and a stream must outlast the grace; at dim 512 it takes 2-6 ms, so a long stream lasts 8 s or more."""
    folder = tmp_path_factory.mktemp("tiny")
    write_model(tiny_model(max_seq_len=CONTEXT, dim=512, n_layers=4, ffn_dim=1536), folder)
    byte_tokenizer().save(folder)
    return folder


@contextlib.contextmanager
def serving(folder, grace: float):
    proc, base = start_server(str(folder), "--grace", str(grace), "--embedding-model", "none", "--max-batch", "4",
                              "--max-model-len", str(CONTEXT), "--threads", "1")
    try:
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_stream(base: str, started: threading.Event) -> list:
    """Every event of a long completion stream; `started` is set once its first token has arrived."""
    events = []
    with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                started.set()
    return events


def open_streams(pool, base: str, count: int):
    started = [threading.Event() for _ in range(count)]
    streams = [pool.submit(read_stream, base, event) for event in started]
    assert all(event.wait(30) for event in started), "the streams did not start"
    return streams


def test_requests_still_running_when_the_grace_ends_get_an_error_and_the_server_exits(tiny_folder):
    with ThreadPoolExecutor(4) as pool, serving(tiny_folder, grace=2) as (proc, base):
        streams = open_streams(pool, base, 3)
        whole = pool.submit(httpx.post, f"{base}/v1/completions", json=LONG, timeout=30)  # not streamed
        time.sleep(0.3)  # the non-streamed request is in flight too
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(2 + 4)  # before the fix: until the last stream ends (tens of seconds)
        assert time.monotonic() - sent > 1.5  # the grace was given
        for stream in streams:
            events = stream.result(5)
            assert len(events) > 1 and "choices" in events[0]
            assert events[-1]["error"]["message"] == "server shutting down"
        response = whole.result(5)
        assert response.status_code == 503 and response.json()["error"]["message"] == "server shutting down"


def test_a_second_signal_exits_at_once(tiny_folder):
    with ThreadPoolExecutor(1) as pool, serving(tiny_folder, grace=60) as (proc, base):
        open_streams(pool, base, 1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # draining: the stream has 60 s
        proc.send_signal(signal.SIGTERM)
        proc.wait(3)  # before the fix: the second signal was ignored until the stream ended


@pytest.fixture
def served(model, tokenizer):
    with server_state(model, tokenizer, max_batch=1, max_len=128) as state:
        yield state


async def test_405_keeps_its_allow_header(served):
    transport = httpx.ASGITransport(app=create_app(served))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert r.json()["error"]["message"] == "Method Not Allowed"


def test_abort_all_ends_running_and_queued_requests_and_the_engine_goes_on(served):
    engine, error, received = served.engine, RuntimeError("stop"), [[], []]
    for events in received:  # one slot: the first runs, the second waits
        engine.submit([1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True), events.append)
    engine.abort_all(error).result(5)
    assert [events[-1] for events in received] == [error, error]
    assert not engine.running and not engine.waiting
    assert engine.generate_many([[1, 2]], SamplingParams(max_tokens=3, ignore_eos=True), timeout=10)[0].finish_reason == "length"
