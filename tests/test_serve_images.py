"""Images through the OpenAI chat API: `plinth serve` of an image+text model answers the official
`openai` client's image_url parts (data: URIs and http URLs on loopback), counts image tokens as
prompt tokens, streams, batches image requests with text ones; and every bad image input is a 400
in OpenAI's error shape after which the engine keeps serving."""
import base64
import http.server
import io
import threading

import pytest
from fastapi.testclient import TestClient

from plinth.engine import Engine
from plinth.serve.app import create_app
from plinth.serve.state import ServerState
from plinth.vision.image_chat import encode_with_images, split_images
from plinth.vision.image_sources import ImageLimits
from tests.conftest import BAR_QUESTION, bar
from tests.test_serve import start_server, stop

openai = pytest.importorskip("openai")


def data_uri(image, kind="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def ask(*urls, text=BAR_QUESTION) -> list[dict]:
    images = [{"type": "image_url", "image_url": {"url": url, "detail": "low"}} for url in urls]
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def pictures():
    """A loopback HTTP server with two bar images (stopped after the module)."""
    files = {"/up.png": data_uri(bar(1000)), "/down.png": data_uri(bar(1001))}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                self.send_error(404)
                return
            body = base64.b64decode(files[self.path].split(",", 1)[1])
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def served(toy_vlm):
    _, final = toy_vlm
    proc, base = start_server(str(final), "--seed", "0", "--embedding-model", "none")
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="none", max_retries=0)


def test_official_client_sends_data_uri_and_url_images(client, pictures, toy_vlm):
    import plinth
    up = client.chat.completions.create(model="any", messages=ask(data_uri(bar(1000))), temperature=0, max_tokens=8)
    down = client.chat.completions.create(model="any", messages=ask(f"{pictures}/down.png"), temperature=0,
                                          max_tokens=8)
    assert (up.choices[0].message.content, down.choices[0].message.content) == ("up", "down")
    # usage: the prompt's tokens include its image tokens, as the model reads them
    m = plinth.load(str(toy_vlm[1]))
    text = m.tokenizer.apply_chat_template(split_images(ask("x"))[0], add_generation_prompt=True)
    assert up.usage.prompt_tokens == len(encode_with_images(m.tokenizer, text, 4)[0])
    jpeg = client.chat.completions.create(model="any", messages=ask(data_uri(bar(1000).convert("RGB"), "JPEG")),
                                          temperature=0, max_tokens=8)  # a colour JPEG, for a grey model
    assert jpeg.choices[0].message.content == "up"


def test_streaming_two_images_and_text_requests_side_by_side(client, pictures):
    import concurrent.futures
    two = client.chat.completions.create(model="any", messages=ask(f"{pictures}/up.png", f"{pictures}/down.png"),
                                         temperature=0, max_tokens=4)
    one = client.chat.completions.create(model="any", messages=ask(f"{pictures}/up.png"), temperature=0, max_tokens=4)
    assert two.usage.prompt_tokens == one.usage.prompt_tokens + 4 + 1  # 4 image tokens and a newline more

    def streamed(messages):
        chunks = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=8, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    jobs = [ask(f"{pictures}/up.png"), [{"role": "user", "content": "hello"}], ask(f"{pictures}/down.png")] * 3
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(streamed, jobs))
    assert answers[0::3] == ["up"] * 3 and answers[2::3] == ["down"] * 3
    assert len(set(answers[1::3])) == 1  # a text request's answer does not depend on its neighbours


# ---- bad input: 400, and the engine keeps serving ---------------------------------------------------------
@pytest.fixture(scope="module")
def app_client(toy_vlm):
    import plinth
    m = plinth.load(str(toy_vlm[1]))
    engine = Engine(m.model, m.tokenizer, max_batch=4, max_len=96, vision=m.vision)
    text_engine = Engine(m.model, m.tokenizer, max_batch=2, max_len=96)  # the same language model, no encoder
    engine.start()
    text_engine.start()
    limits = ImageLimits(max_bytes=2000, timeout=0.5)
    try:
        yield (TestClient(create_app(ServerState(engine, m.tokenizer, "vlm", image_limits=limits))),
               TestClient(create_app(ServerState(text_engine, m.tokenizer, "text"))))
    finally:
        engine.stop()
        text_engine.stop()


def chat(client, messages, **extra):
    return client.post("/v1/chat/completions",
                       json={"model": "any", "messages": messages, "max_tokens": 4, "temperature": 0, **extra})


@pytest.mark.parametrize("content, fragment", [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}],
     "could not be decoded as an image"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}], "base64"),
    ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], "image/"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}], "over the limit of 2,000"),
    ([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/nothing.png"}}], "could not be fetched"),
    ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "file"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "ultra"}}], "detail"),
    ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}], "input_audio"),
    ([{"type": "text", "text": "<image> is where the picture goes"}], "marks where images go"),
])
def test_bad_image_inputs_are_400_and_the_engine_keeps_serving(app_client, content, fragment):
    vlm, _ = app_client
    response = chat(vlm, [{"role": "user", "content": content}])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and fragment in error["message"] + str(error["param"])
    assert chat(vlm, ask(data_uri(bar(1000)))).json()["choices"][0]["message"]["content"] == "up"


def test_an_unfetchable_url_is_a_400_naming_its_status(app_client, pictures):
    vlm, _ = app_client
    response = chat(vlm, ask(f"{pictures}/missing.png"))
    assert response.status_code == 400 and "404" in response.json()["error"]["message"]


def test_text_model_refuses_images_and_too_many_images_name_the_numbers(app_client):
    vlm, text = app_client
    response = chat(text, ask(data_uri(bar(1000))))
    assert response.status_code == 400 and "reads text only" in response.json()["error"]["message"]
    assert chat(text, [{"role": "user", "content": "hi"}]).status_code == 200
    response = chat(vlm, ask(*[data_uri(bar(i)) for i in range(20)]))  # 80 image tokens: past a 96-token window
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "maximum context length is 96 tokens" in error["message"]


def test_the_api_document_offers_image_parts_only_where_the_model_reads_them(app_client):
    def content_parts(client):
        content = client.get("/openapi.json").json()["components"]["schemas"]["ChatMessage"]["properties"]["content"]
        return next(option["items"] for option in content["anyOf"] if option.get("type") == "array")

    vlm, text = app_client
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in content_parts(vlm)["oneOf"]} == {"TextPart", "ImagePart"}
    assert content_parts(text) == {"$ref": "#/components/schemas/TextPart"}
