"""`plinth serve` driven by the official `openai` client, on a free loopback port."""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*extra, port=None):
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "plinth", "serve", "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--api-key", API_KEY, "--max-batch", "16", "--seed", "0")  # reproducible sampling
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def post(server, path, body, key=API_KEY, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"content": body} if isinstance(body, (bytes, str)) else {"json": body}
    return httpx.post(f"{server}{path}", headers=headers, timeout=timeout, **payload)


def test_the_issue_example_prints_a_sentiment_label(client):
    prompt = "Determine the sentiment of this review: 'I love this product, it works great!'"
    response = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    assert "positive" in response.choices[0].message.content.lower()
    assert response.model == "smollm2-135m-instruct"  # says which model really answered
    assert response.choices[0].finish_reason in ("stop", "length")
    again = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    assert again.choices[0].message.content == response.choices[0].message.content  # --seed: reproducible


def test_models_and_usage(client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       temperature=0, max_tokens=40)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 40 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_with_usage(client):
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    finish = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finish == [chunks[-2].choices[0].finish_reason] and finish[0] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= 12 and text


def test_n_stop_seed_and_length(client):
    r = client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0.7, seed=3, n=2, stop=[" 8"])
    assert len(r.choices) == 2 and {c.index for c in r.choices} == {0, 1}
    for c in r.choices:
        assert " 8" not in c.text
    again = client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0.7, seed=3, n=2, stop=[" 8"])
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_logprobs(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy picks the top
    r = client.completions.create(model="m", prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2)
    assert len(r.choices[0].logprobs.token_logprobs) == 3 and len(r.choices[0].logprobs.top_logprobs[0]) == 2


def test_auth(server):
    assert post(server, "/v1/chat/completions", {}, key=None).status_code == 401
    assert post(server, "/v1/chat/completions", {}, key="wrong").json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200  # health needs no key


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 7}, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
])
def test_bad_requests_are_400_in_openai_shape(server, body, param):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_context_overflow_names_both_numbers(server):
    r = post(server, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 9000})
    # the context is the model's own by default (--max-model-len)
    assert r.status_code == 400 and "8192" in r.json()["error"]["message"] and "9000" in r.json()["error"]["message"]


def test_malformed_json_unknown_route_and_huge_body(server):
    assert post(server, "/v1/chat/completions", b"{not json").status_code == 400
    assert post(server, "/v1/chat/completions", b"\xff\xfe\x00garbage").status_code == 400
    r = httpx.get(f"{server}/v1/nope", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    assert post(server, "/v1/completions", b"x" * (9 * 1024 * 1024)).status_code == 413
    chunked = (b"x" * 1024 * 1024 for _ in range(9))  # no content-length: counted as it arrives
    assert httpx.post(f"{server}/v1/completions", content=chunked, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60).status_code == 413


def test_garbage_never_kills_the_engine(server, client):
    junk = [{"model": 1, "messages": 2}, {"model": "m", "prompt": [[-5]]}, {"model": "m", "prompt": [10 ** 12]},
            {"model": "m", "prompt": "x", "max_tokens": 10 ** 18}, {"model": "m", "prompt": "x", "n": 10 ** 9},
            {"model": "m", "prompt": "x", "logit_bias": {"abc": 1}}, {"model": "m", "prompt": "x", "stop": [""]},
            [], "null", {"model": "m", "prompt": "x", "temperature": float("inf")}]
    for body in junk:
        r = post(server, "/v1/completions", json.dumps(body) if not isinstance(body, str) else body)
        assert 400 <= r.status_code < 500, (body, r.text)
    assert client.completions.create(model="m", prompt="Hello", max_tokens=3).choices[0].text is not None
    assert httpx.get(f"{server}/health").status_code == 200


def test_concurrent_streams_match_single_runs(client):
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]

    def ask(i, stream=True):
        settings = dict(temperature=0) if i % 2 == 0 else dict(temperature=0.8, top_p=0.9, seed=i)
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompts[i]}],
                                           max_tokens=24, stream=stream, **settings)
        return "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert all(together)
    for i in range(0, 16, 2):  # greedy: batching must not change a single token
        assert together[i] == ask(i, stream=False), i
    for i in range(1, 16, 2):  # seeded sampling is per sequence too
        assert together[i] == ask(i, stream=False), i


def test_client_disconnect_cancels_its_sequence(server, client):
    def metric(name):
        text = httpx.get(f"{server}/metrics").text
        return float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "_total ")))

    before = metric("plinth_requests_cancelled")
    with httpx.stream("POST", f"{server}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "m", "prompt": "Tell a long story", "max_tokens": 2000, "stream": True,
                            "ignore_eos": True}, timeout=30) as r:
        next(r.iter_lines())
    with pytest.raises(httpx.ReadTimeout):  # non-streamed, abandoned by the client
        post(server, "/v1/completions", {"model": "m", "prompt": "Tell a long story", "max_tokens": 2000,
                                         "ignore_eos": True}, timeout=1.0)
    deadline = time.monotonic() + 10
    while metric("plinth_requests_cancelled") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric("plinth_requests_cancelled") >= before + 2
    assert metric("plinth_running") == 0


def test_metrics_exposition(server, client):
    client.completions.create(model="m", prompt="Hi", max_tokens=2)
    text = httpx.get(f"{server}/metrics").text
    for name in ("plinth_http_requests_total", "plinth_prompt_tokens_total", "plinth_generation_tokens_total",
                 "plinth_batch_size", "plinth_queue_depth", "plinth_time_to_first_token_seconds_bucket",
                 "plinth_inter_token_latency_seconds_bucket"):
        assert name in text


def test_strict_models_and_sigterm_drain():
    proc, base = start_server("--strict-models", "--grace", "60")
    try:
        r = httpx.post(f"{base}/v1/completions", json={"model": "gpt-4o-mini", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, f"{base}/v1/completions", timeout=60, json={
                "model": "smollm2-135m-instruct", "prompt": "Once", "max_tokens": 400, "ignore_eos": True})
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused = httpx.post(f"{base}/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "x"})
            assert refused.status_code == 503 and "Retry-After" in refused.headers
            finished = slow.result()
            assert finished.status_code == 200 and finished.json()["usage"]["completion_tokens"] == 400
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean drain
    finally:
        if proc.poll() is None:
            proc.kill()


def test_embeddings_match_sentence_transformers(client):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from plinth import hub
    texts = ["A man is eating food.", "The weather is lovely today.", "Ünïcödé 😀 " * 200]
    r = client.embeddings.create(model="text-embedding-3-small", input=texts)
    assert r.model == "all-minilm-l6-v2" and len(r.data) == 3 and r.usage.prompt_tokens > 0
    reference = sentence_transformers.SentenceTransformer(str(hub.resolve("all-minilm-l6-v2")), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True)
    for item, vector in zip(r.data, expected):
        cosine = sum(a * b for a, b in zip(item.embedding, vector.tolist()))
        assert cosine >= 0.999
    ids = [reference.tokenizer(text, truncation=True, max_length=256)["input_ids"] for text in texts]
    by_ids = client.embeddings.create(model="text-embedding-3-small", input=ids)  # the embedding model's token ids
    assert [item.embedding for item in by_ids.data] == [item.embedding for item in r.data]


def test_embeddings_as_float_lists(server):
    r = post(server, "/v1/embeddings", {"model": "m", "input": "hello", "encoding_format": "float"})
    vector = r.json()["data"][0]["embedding"]
    assert len(vector) == 384 and abs(sum(x * x for x in vector) - 1) < 1e-4
    assert post(server, "/v1/embeddings", {"model": "m", "input": []}).status_code == 400


CHROMIUM = "/usr/bin/chromium"
# headless in CI: no sandbox (root in a container), no GPU, no background network chatter
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def test_chat_page_streams_an_answer_in_chromium(server):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            assert page.text_content("#model") == "(enter the API key)"  # the page asks for the key
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('model').textContent === 'smollm2-135m-instruct'")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "40")
            page.fill("#prompt", "What is the capital of France?")
            page.press("#prompt", "Enter")
            page.wait_for_function("[...document.querySelectorAll('.assistant')].some(m => m.textContent.includes('Paris'))",
                                   timeout=60_000)
            page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
            status = page.text_content("#status")
            assert "tokens/s" in status and int(status.split()[0]) > 1  # it streamed, token by token
            page.fill("#prompt", "And of Germany?")  # the conversation is kept: a second turn
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg').length === 4 && !document.getElementById('send').disabled",
                                   timeout=60_000)
            assert page.locator(".error").count() == 0
        finally:
            browser.close()
