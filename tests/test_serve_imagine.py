"""An image generator served: `plinth serve RUN` of a tiny trained generator answers the official
`openai` client's images.generate with PNGs of the model's size, reproducible by seed and steered by
the prompt; every bad input is a 400 in OpenAI's error shape after which the server keeps serving; a
text model answers images with a 400 and the generator answers the text routes with one; /v1/models
and /openapi.json say what each serves."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import plinth
from plinth.engine import Engine
from plinth.serve.app import create_app
from plinth.serve.state import ServerState
from tests.conftest import server_state, top_minus_bottom
from tests.test_serve import start_server, stop

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(toy_generator):
    proc, base = start_server(str(toy_generator), "--seed", "0", "--embedding-model", "none", "--threads", "1")
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def patches(toy_generator) -> int:
    """Image tokens per image: the denoiser's patches (8×8 pixels in 2×2 patches: 16)."""
    model = json.loads((toy_generator / "diffusion.json").read_text())["model"]
    return (model["image_size"] // model["patch_size"]) ** 2


def pixels(response) -> torch.Tensor:
    """uint8 (N, 8, 8): the response's PNGs, each checked to be an 8×8 grey image."""
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in response.data]
    assert all((image.format, image.size, image.mode) == ("PNG", (8, 8), "L") for image in images)
    return torch.tensor(np.stack([np.asarray(image) for image in images]))


def draw(client, prompt="top", n=3, seed=1):
    """The issue's call; seed None: the request gives none."""
    return client.images.generate(model="any", prompt=prompt, n=n, size="8x8", response_format="b64_json",
                                  extra_body={"seed": seed} if seed is not None else None)


def test_official_client_gets_n_pngs_of_the_model_size(client, patches):
    response = draw(client, n=3)
    assert pixels(response).shape == (3, 8, 8)
    assert (response.size, response.output_format, response.background) == ("8x8", "png", "opaque")
    usage = response.usage  # the prompt's encoder tokens ([CLS] top [SEP]); image tokens: n × patches
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (3, 3 * patches, 3 + 3 * patches)
    assert usage.input_tokens_details.text_tokens == 3 and usage.output_tokens_details.image_tokens == 3 * patches
    assert all(item.url is None and item.revised_prompt is None for item in response.data)


def test_a_seed_gives_the_same_images_and_another_seed_others(client):
    first, again, other = draw(client, seed=1), draw(client, seed=1), draw(client, seed=2)
    assert [i.b64_json for i in again.data] == [i.b64_json for i in first.data]
    assert [i.b64_json for i in other.data] != [i.b64_json for i in first.data]
    assert len({i.b64_json for i in first.data}) == 3  # each image of a request has its own noise


def test_the_prompt_steers_the_images(client):
    top, bottom = pixels(draw(client, "top", n=8, seed=0)), pixels(draw(client, "bottom", n=8, seed=0))
    assert top_minus_bottom(top) > 0 > top_minus_bottom(bottom)


def test_an_empty_prompt_draws_without_one(client):
    response = draw(client, "", n=2)
    assert pixels(response).shape == (2, 8, 8) and response.usage.input_tokens == 0


def test_without_a_seed_the_servers_seed_makes_requests_reproducible(client):
    first, again = draw(client, seed=None, n=2), draw(client, seed=None, n=2)
    assert [i.b64_json for i in again.data] == [i.b64_json for i in first.data]  # --seed 0


def test_openai_fields_that_change_nothing_are_taken(client):
    response = client.images.generate(prompt="top", quality="high", style="natural", user="u", moderation="low",
                                      background="opaque", output_format="png", output_compression=50, size="auto",
                                      safety_identifier="someone", extra_body={"complexity": "low"})
    assert pixels(response).shape == (1, 8, 8)  # n left out: one image, of the model's size


@pytest.mark.parametrize("fields, param, words", [
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 11}, "n", "less than or equal to 10"),
    ({"size": "1024x1024"}, "size", "this model draws 8x8 images"),
    ({"size": "8x16"}, "size", "'8x8' or 'auto'"),
    ({"response_format": "url"}, "response_format", "give b64_json"),
    ({"output_format": "jpeg"}, "output_format", "returns PNG images"),
    ({"background": "transparent"}, "background", "opaque images"),
    ({"quality": "ultra"}, "quality", "'low'"),
    ({"extra_body": {"stream": True}}, "stream", "stream is not supported"),
    ({"extra_body": {"steps": 0}}, "steps", "steps=0"),
    ({"extra_body": {"steps": 1001}}, "steps", "steps=1001"),
    ({"extra_body": {"guidance": -1}}, "guidance", "guidance=-1"),
    ({"extra_body": {"guidance": 21}}, "guidance", "guidance=21"),
    ({"extra_body": {"seed": -1}}, "seed", "greater than or equal to 0"),
    ({"extra_body": {"seed": "one"}}, "seed", "valid integer"),
    ({"extra_body": {"prompt": 7}}, "prompt", "valid string"),
    ({"extra_body": {"prompt": "x" * 32001}}, "prompt", "at most 32000 characters"),
])
def test_bad_inputs_are_400s_naming_the_field_and_the_server_goes_on(client, fields, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="top", **fields)
    assert caught.value.status_code == 400 and caught.value.param == param
    assert words in caught.value.message
    assert pixels(draw(client, n=1)).shape == (1, 8, 8)


def test_a_request_without_a_prompt_is_a_400(served):
    response = httpx.post(f"{served}/v1/images/generations", json={"n": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert httpx.get(f"{served}/health").status_code == 200


def test_the_generator_answers_the_text_routes_with_a_400(client):
    with pytest.raises(openai.BadRequestError, match="generates images.*/v1/images/generations"):
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="generates images.*/v1/images/generations"):
        client.completions.create(model="any", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="generates images.*/v1/images/generations"):
        client.responses.create(model="any", input="hi")


def test_models_and_the_api_document_say_the_generator_draws_images(served):
    models = httpx.get(f"{served}/v1/models").json()["data"]
    assert [(m["input_modalities"], m["output_modalities"]) for m in models] == [(["text"], ["image"])]
    doc = httpx.get(f"{served}/openapi.json").json()
    assert "/v1/images/generations" in doc["paths"]
    assert not {"/v1/chat/completions", "/v1/completions", "/v1/responses"} & set(doc["paths"])
    size = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]["size"]
    assert size["anyOf"][0] == {"enum": ["auto", "8x8"]}
    documented = doc["paths"]["/v1/images/generations"]["post"]["responses"]["200"]["content"]["application/json"]
    response = httpx.post(f"{served}/v1/images/generations", json={"prompt": "top", "n": 2}, timeout=60)
    jsonschema.Draft202012Validator({**documented["schema"], "components": doc["components"]}).validate(response.json())


def test_a_text_model_answers_images_with_a_400(model, tokenizer):
    with server_state(model, tokenizer) as state:
        http = TestClient(create_app(state))
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", max_retries=0, http_client=http)
        with pytest.raises(openai.BadRequestError, match="does not generate images") as caught:
            client.images.generate(prompt="a cat")
        assert caught.value.param == "model"
        assert "/v1/images/generations" not in http.get("/openapi.json").json()["paths"]
        assert [m["output_modalities"] for m in http.get("/v1/models").json()["data"]] == [["text"]]


def test_without_any_seed_each_request_draws_new_images(toy_generator):
    engine = Engine.tasks_only(threads=1)  # the generator on the engine thread, as `plinth serve` runs it
    engine.start()
    try:
        generator = plinth.load(str(toy_generator)).generator
        http = TestClient(create_app(ServerState(engine, None, "toy", generator=generator)))
        first, again = [http.post("/v1/images/generations", json={"prompt": "top", "n": 2}) for _ in range(2)]
        assert first.status_code == again.status_code == 200
        assert first.json()["data"] != again.json()["data"]
    finally:
        engine.stop()


def test_generated_image_requests_get_documented_answers(served, tmp_path):
    """schemathesis over the generator's own /openapi.json, as tests/test_schemathesis.py runs it
    over a text model's: every request the document allows is served, every other one is a 4xx,
    and each answer matches its documented schema."""
    pytest.importorskip("schemathesis")
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    hooks = {"SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(Path(__file__).parent.parent)}
    run = subprocess.run([cli, "run", f"{served}/openapi.json", "--include-path", "/v1/images/generations",
                          "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--phases",
                          "coverage,fuzzing", "--max-examples", "25", "--seed", "0", "--request-timeout", "60",
                          "--no-color"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, **hooks})
    assert run.returncode == 0, run.stdout[-6000:]  # schemathesis exits 1 on any failed check
