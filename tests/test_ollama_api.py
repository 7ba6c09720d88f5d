"""Ollama's API on `plinth serve`, driven by the official `ollama` client: a real server of a tiny
random model (and the packaged MiniLM embedder) on a loopback port, with an API key; the tiny
image+text model and an image generator served in-process behind uvicorn on loopback."""
import base64
import io
import json

import httpx
import jsonschema
import pytest

from plinth import tools as toolkit
from plinth.engine import Engine
from plinth.serve.state import ServerState
from plinth.weights.native import write_model
from tests.conftest import BAR_QUESTION, bar, byte_tokenizer, live, tiny_model
from tests.test_serve import start_server, stop
from tests.test_serve_limits import tiny_embedder

ollama = pytest.importorskip("ollama")
KEY = "test-key"
ASK = [{"role": "user", "content": "What is the temperature in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_temperature", "description": "Current temperature in a city, in degrees Celsius.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
# A reply that is nothing but a call (Llama 3's bare JSON) is a call: a client forces one with
# `format`, Ollama's only way to constrain a reply (it has no tool_choice)
CALL = {"type": "object", "properties": {"name": {"const": "get_temperature"},
                                         "arguments": WEATHER["function"]["parameters"]},
        "required": ["name", "arguments"], "additionalProperties": False}
AGE = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "available": {"type": "boolean"}},
       "required": ["age", "available"], "additionalProperties": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_model(tiny_model(max_seq_len=2048), folder)  # the byte-level tool prompt is long
    byte_tokenizer().save(folder)
    return folder


@pytest.fixture(scope="module")
def server(folder):
    proc, base = start_server(str(folder), "--api-key", KEY, "--seed", "0", "--max-batch", "4", "--threads", "1")
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, headers={"Authorization": f"Bearer {KEY}"})


def post(server, path, body, key=KEY):
    """`body` as it is (bytes), or as JSON with \\uXXXX escapes, which also carry a lone surrogate."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server}{path}", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- generation ------------------------------------------------------------------------------------
def test_chat_streams_json_lines_by_default_ending_with_counts(server, client):
    with httpx.stream("POST", f"{server}/api/chat", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": "tiny", "messages": ASK, "options": {"num_predict": 6, "seed": 3}}) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines()]
    *pieces, last = lines
    assert pieces and not any(p["done"] for p in pieces) and last["done"] and last["message"]["content"] == ""
    assert last["done_reason"] == "length" and last["eval_count"] == 6
    for field in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_duration"):
        assert isinstance(last[field], int), field
    assert last["total_duration"] >= last["prompt_eval_duration"] + last["eval_duration"] > 0
    streamed = "".join(p["message"]["content"] for p in pieces)
    whole = client.chat(model="tiny", messages=ASK, options={"num_predict": 6, "seed": 3})
    assert whole.message.content == streamed and whole.done and whole.done_reason == "length"
    assert whole.prompt_eval_count == last["prompt_eval_count"] == len(prompt_ids(ASK))
    parts = list(client.chat(model="tiny", messages=ASK, options={"num_predict": 6, "seed": 3}, stream=True))
    assert "".join(p.message.content for p in parts) == streamed and parts[-1].done


def prompt_ids(messages, tools=None) -> list[int]:
    """The prompt the server builds for a conversation, as the OpenAI routes render it."""
    tokenizer = byte_tokenizer()
    return tokenizer.encode(toolkit.render(tokenizer, messages, tools), add_bos=False)


def test_options_seed_num_predict_and_stop(client):
    def text(**options):
        return client.generate(model="tiny", prompt="Once upon a time", raw=True, options=options)

    first, again, other = text(seed=7, num_predict=16), text(seed=7, num_predict=16), text(seed=8, num_predict=16)
    assert first.response == again.response != other.response
    assert first.done_reason == "length" and first.eval_count == 16
    greedy = text(temperature=0, num_predict=24).response
    stop = greedy[10:13]
    cut = text(temperature=0, num_predict=24, stop=[stop])
    assert cut.response == greedy[:greedy.index(stop)] and cut.done_reason == "stop"


def test_generate_templates_the_prompt_and_continues_from_its_context(client):
    answer = client.generate(model="tiny", prompt="Hi", system="Be brief.",
                             options={"temperature": 0, "num_predict": 5})
    expected = prompt_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert answer.prompt_eval_count == len(expected) and answer.context[:len(expected)] == expected
    assert len(answer.context) == len(expected) + answer.eval_count  # the prompt and the reply, as token ids
    follow = client.generate(model="tiny", prompt="More", context=answer.context, options={"num_predict": 3})
    assert follow.prompt_eval_count == len(answer.context) + len(prompt_ids([{"role": "user", "content": "More"}]))
    raw = client.generate(model="tiny", prompt="Hi", raw=True, options={"num_predict": 3})
    assert raw.prompt_eval_count == len(byte_tokenizer().encode("Hi")) and raw.context is None
    assert client.generate(model="tiny").done_reason == "load"  # an empty prompt loads the model, as Ollama's
    assert client.chat(model="tiny", messages=[]).done_reason == "load"


def test_format_json_and_a_schema_give_valid_json(client):
    reply = client.chat(model="tiny", messages=[{"role": "user", "content": "Ollama is 22. Reply in JSON."}],
                        format=AGE, options={"num_predict": 200})
    jsonschema.validate(json.loads(reply.message.content), AGE)
    assert reply.done_reason == "stop"
    options = {"num_predict": 40, "seed": 1}
    parts = list(client.generate(model="tiny", prompt="JSON please", format="json", stream=True, options=options))
    text = "".join(p.response for p in parts)
    assert text.startswith("{") and parts[-1].done  # JSON mode: an object, however far it got in 40 tokens
    assert client.generate(model="tiny", prompt="JSON please", format="json", options=options).response == text


def test_logprobs(client):
    reply = client.chat(model="tiny", messages=ASK, logprobs=True, top_logprobs=2,
                        options={"temperature": 0, "num_predict": 4})
    assert len(reply.logprobs) == reply.eval_count == 4
    for entry in reply.logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy takes the top


# ---- tools -----------------------------------------------------------------------------------------
def test_a_call_comes_back_as_tool_calls_and_its_result_continues_the_chat(client):
    options = {"num_predict": 300, "seed": 2}
    reply = client.chat(model="tiny", messages=ASK, tools=[WEATHER], format=CALL, options=options)
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_temperature" and reply.done_reason == "stop"
    jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])
    assert not reply.message.content
    parts = list(client.chat(model="tiny", messages=ASK, tools=[WEATHER], format=CALL, options=options, stream=True))
    streamed = [c for p in parts for c in p.message.tool_calls or []]
    assert streamed == [call] and not "".join(p.message.content for p in parts)

    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
               {"role": "tool", "content": "18", "tool_name": "get_temperature"}]
    answer = client.chat(model="tiny", messages=history, tools=[WEATHER], options={"num_predict": 4})
    sent = ollama.Tool.model_validate(WEATHER).model_dump(exclude_none=True)  # the client keeps only Ollama's fields
    assert answer.done and answer.prompt_eval_count == len(prompt_ids(
        [*ASK, {"role": "assistant", "content": "", "tool_calls": [{"function": {
            "name": "get_temperature", "arguments": dict(call.function.arguments)}}]},
         {"role": "tool", "content": "18", "name": "get_temperature"}], [sent]))


# ---- embeddings and models ---------------------------------------------------------------------------
def test_embed_gives_the_openai_routes_vectors(server, client):
    texts = ["A cat sits on the mat.", "Stock prices fell."]
    result = client.embed(model="all-minilm-l6-v2", input=texts)
    openai_vectors = post(server, "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": texts}).json()["data"]
    assert result.embeddings == [row["embedding"] for row in openai_vectors]
    assert len(result.embeddings[0]) == 384 and result.prompt_eval_count > 0
    assert sum(x * x for x in result.embeddings[0]) == pytest.approx(1, abs=1e-5)
    assert client.embeddings(model="all-minilm-l6-v2", prompt=texts[0]).embedding == result.embeddings[0]
    with pytest.raises(ollama.ResponseError, match="over this model's limit of 256 tokens") as caught:
        client.embed(model="all-minilm-l6-v2", input="word " * 400, truncate=False)
    assert caught.value.status_code == 400
    assert len(client.embed(model="all-minilm-l6-v2", input="word " * 400).embeddings[0]) == 384  # cut to fit


def test_list_show_ps_version_and_pull(server, client, folder):
    served = str(folder)  # the name the server was started with
    assert [m.model for m in client.list().models] == [served, "all-minilm-l6-v2"]
    shown = client.show(served)
    assert shown.capabilities == ["completion", "tools"] and "<|im_start|>" in shown.template
    assert shown.modelinfo["plinth.context_length"] == 2048 and "num_ctx 2048" in shown.parameters
    assert shown.details.quantization_level in ("int4", "int8", "float32", "bfloat16")
    assert client.show("all-minilm-l6-v2").capabilities == ["embedding"]
    assert client.show("any other name").modelinfo == shown.modelinfo  # served anyway, without --strict-models
    running = {m.model: m for m in client.ps().models}
    assert running[served].context_length == 2048 and running[served].size > 0 and running[served].size_vram == 0
    assert post(server, "/api/version", None).status_code == 405  # a GET route
    assert httpx.get(f"{server}/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()["version"]
    assert client.pull("all-minilm-l6-v2").status == "success"  # served already
    with pytest.raises(ollama.ResponseError, match="plinth pull smollm2-135m-instruct") as caught:
        client.pull("smollm2-135m-instruct")
    assert caught.value.status_code == 400


# ---- errors ------------------------------------------------------------------------------------------
CHAT = {"model": "tiny", "messages": ASK, "stream": False, "options": {"num_predict": 2}}


@pytest.mark.parametrize("path, body, words", [
    ("/api/chat", b'{"model": "tiny", "messages": [', "not valid JSON"),
    ("/api/chat", {**CHAT, "messages": "hi"}, "messages"),
    ("/api/chat", {**CHAT, "stream": "yes"}, "stream"),
    ("/api/chat", {**CHAT, "options": {"temperature": "hot"}}, "options.temperature"),
    ("/api/chat", {**CHAT, "options": {"top_p": 0}}, "options.top_p"),
    ("/api/chat", {**CHAT, "options": {"num_predict": 5000}}, "maximum context length is 2048"),
    ("/api/chat", {**CHAT, "format": "xml"}, "format"),
    ("/api/chat", {**CHAT, "format": {"type": "nonsense"}}, "invalid JSON schema"),
    ("/api/chat", {**CHAT, "think": True}, "does not support thinking"),
    ("/api/chat", {**CHAT, "messages": [{"role": "user", "content": "a\ud800b"}]}, "surrogate"),
    ("/api/chat", {**CHAT, "messages": [{"role": "user", "content": "?", "images": [png(bar(0))]}]}, "reads text only"),
    ("/api/chat", {**CHAT, "tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
    ("/api/generate", {"model": "tiny", "prompt": "Hi", "template": "{{ .Prompt }}"}, "template"),
    ("/api/generate", {"model": "tiny", "prompt": "Hi", "suffix": "end"}, "fill-in-the-middle"),
    ("/api/generate", {"model": "tiny", "prompt": "Hi", "raw": True, "system": "Be brief."}, "raw"),
    ("/api/generate", {"model": "tiny", "prompt": "Hi", "context": [99999]}, "context"),
    ("/api/embed", {"model": "all-minilm-l6-v2", "input": "hi", "dimensions": 7}, "384 dimensions"),
    ("/api/embed", {"model": "all-minilm-l6-v2", "input": 5}, "input"),
    ("/api/show", {}, "model"),
])
def test_bad_input_is_a_400_in_ollamas_shape_and_the_server_goes_on(server, client, path, body, words):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and words in error and set(r.json()) == {"error"}
    assert client.chat(model="tiny", messages=ASK, options={"num_predict": 2}).done


def test_routing_errors_and_the_api_key_have_ollamas_shape_too(server):
    assert post(server, "/api/delete", {"model": "tiny"}).json() == {"error": "Not Found"}
    r = httpx.get(f"{server}/api/chat", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}
    r = post(server, "/api/tags", None, key="wrong")
    assert r.status_code == 401 and "API key" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=server).list()
    assert caught.value.status_code == 401
    r = post(server, "/api/chat", b"x" * (8 * 2**20 + 1))
    assert r.status_code == 413 and "8388608 bytes" in r.json()["error"]


def test_curl_style_bodies_are_read_as_json(server):
    """Ollama's documentation sends `curl -d '{...}'`: a JSON body labelled as a form."""
    r = httpx.post(f"{server}/api/generate", content=json.dumps({"model": "tiny", "prompt": "Hi", "stream": False,
                                                                "options": {"num_predict": 2}}),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["done"]


# ---- other served models, in-process behind uvicorn on loopback ------------------------------------------
@pytest.fixture
def strict(tokenizer):
    """A tiny model and embedder served with --strict-models: (its URL, its engine)."""
    # speculate=False: a lone request's guessed-token passes would go past faults injected into Engine._run
    engine = Engine(tiny_model(), tokenizer, max_batch=2, max_len=128, threads=1, speculate=False)
    engine.start()
    try:
        for url in live(ServerState(engine, tokenizer, "tiny", strict_models=True, embedder=tiny_embedder()[0])):
            yield url, engine
    finally:
        engine.stop()


def test_an_unknown_model_is_a_404_with_strict_models(strict):
    client = ollama.Client(host=strict[0])
    for call in (lambda: client.chat(model="llama3", messages=ASK), lambda: client.generate(model="llama3", prompt="x"),
                 lambda: client.embed(model="llama3", input="w1"), lambda: client.show("llama3")):
        with pytest.raises(ollama.ResponseError, match="'llama3' not found") as caught:
            call()
        assert caught.value.status_code == 404
    assert client.chat(model="tiny", messages=ASK, options={"num_predict": 2}).done
    # the embedder is listed, but in memory (`ps`) only once it has embedded something
    assert [m.model for m in client.list().models] == ["tiny", "tiny-embed"]
    assert [m.model for m in client.ps().models] == ["tiny"]
    assert client.embed(model="tiny-embed", input="w1 w2").embeddings
    assert [m.model for m in client.ps().models] == ["tiny", "tiny-embed"]


def test_a_fault_after_streaming_began_is_a_last_error_line(strict, monkeypatch):
    url, engine = strict
    original, steps = engine._run, []

    def fail_on_second_step(group, *most):
        steps.append(1)
        if len(steps) > 1:
            raise RuntimeError("simulated fault")
        return original(group, *most)

    monkeypatch.setattr(engine, "_run", fail_on_second_step)
    pieces = []
    with pytest.raises(ollama.ResponseError, match="simulated fault"):
        for part in ollama.Client(host=url).generate(model="tiny", prompt="Hi", raw=True, stream=True,
                                                      options={"num_predict": 20, "temperature": 0}):
            pieces.append(part)
    assert len(pieces) <= 1 and not any(p.done for p in pieces)  # a first token's line, at most, then the error


@pytest.fixture(scope="module")
def vlm(toy_vlm):
    import plinth
    m = plinth.load(str(toy_vlm[1]))
    engine = Engine(m.model, m.tokenizer, max_batch=4, max_len=96, threads=1, vision=m.vision)
    engine.start()
    try:
        yield from live(ServerState(engine, m.tokenizer, "vlm"))
    finally:
        engine.stop()


def test_images_go_to_an_image_text_model(vlm):
    client = ollama.Client(host=vlm)

    def where(i, **kwargs):
        question = [{"role": "user", "content": BAR_QUESTION, "images": [png(bar(i))]}]
        return client.chat(model="vlm", messages=question, options={"temperature": 0, "num_predict": 8}, **kwargs)

    up, down = where(1000), where(1001)
    assert (up.message.content, down.message.content) == ("up", "down")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png(bar(1000))}}
    question = [{"role": "user", "content": [image, {"type": "text", "text": BAR_QUESTION}]}]
    openai = httpx.post(f"{vlm}/v1/chat/completions",
                        json={"model": "vlm", "temperature": 0, "max_tokens": 8, "messages": question}).json()
    assert up.prompt_eval_count == openai["usage"]["prompt_tokens"]  # its image tokens count, as on the OpenAI route
    assert "".join(p.message.content for p in where(1001, stream=True)) == "down"
    generated = client.generate(model="vlm", prompt=BAR_QUESTION, images=[png(bar(1000))],
                                options={"temperature": 0, "num_predict": 8})
    assert generated.response == "up" and generated.context is None  # image slots cannot be sent back
    assert client.show("vlm").capabilities == ["completion", "tools", "vision"]
    not_an_image = base64.b64encode(b"no").decode()
    with pytest.raises(ollama.ResponseError, match="could not be decoded as an image") as caught:
        client.chat(model="vlm", messages=[{"role": "user", "content": "?", "images": [not_an_image]}])
    assert caught.value.status_code == 400


@pytest.fixture
def generator():
    from plinth.config import preset
    from plinth.vision.diffusion import Denoiser
    from plinth.vision.imagine import ImageGenerator
    embedder = tiny_embedder()[0]
    denoiser = Denoiser(preset("dit-tiny"), embedder.dimensions)
    denoiser.init_weights()  # untrained: these routes refuse before drawing anything
    engine = Engine.tasks_only(threads=1)
    engine.start()
    try:
        yield from live(ServerState(engine, None, "toy", generator=ImageGenerator(denoiser, embedder, {}, "toy")))
    finally:
        engine.stop()


def test_an_image_generator_answers_chat_and_generate_with_a_400(generator):
    client = ollama.Client(host=generator)
    for call in (lambda: client.chat(model="toy", messages=ASK), lambda: client.generate(model="toy", prompt="Hi")):
        with pytest.raises(ollama.ResponseError, match="generates images") as caught:
            call()
        assert caught.value.status_code == 400
    assert client.show("toy").capabilities == ["image"]
    assert [m.model for m in client.list().models] == ["toy"]
