"""Several LoRA adapters served by one engine: requests choose by model name, share batches, and each
gets exactly what its adapter merged into the base would produce."""
import copy
import time

import httpx
import pytest
import torch

from plinth.adapt.lora import attach_lora, load_adapter, lora_layers, merge_lora, save_adapter
from plinth.adapt.multi_lora import serve_adapters
from plinth.errors import PlinthError
from plinth.generate import SamplingParams, generate_stream
from plinth.quant import compact_
from plinth.serve.app import create_app
from plinth.serve.state import ServerState
from plinth.engine import Engine
from tests.conftest import tiny_model

PROMPT = [72, 101, 108, 108, 111, 32]  # "Hello "
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def make_adapter(folder, seed, targets):
    folder.mkdir()
    model = tiny_model()
    attach_lora(model, rank=4, alpha=8, targets=targets)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.normal_(0, 0.3)
    save_adapter(model, folder, base="tiny")
    return folder


@pytest.fixture
def adapters(tmp_path):
    return {"terse": str(make_adapter(tmp_path / "a", 1, ["wq", "wv", "w_down"])),
            "chatty": str(make_adapter(tmp_path / "b", 2, ["wk", "wo", "w_gate", "w_up"]))}


def reference(adapter, tokenizer) -> list[int]:
    """Greedy tokens of the base with `adapter` merged in (no adapter: the base)."""
    model = tiny_model()
    if adapter:
        load_adapter(model, adapter)
        merge_lora(model)
    compact_(model, "float32")
    with torch.no_grad():
        return [s.choice.token for s in generate_stream(model, tokenizer, PROMPT, copy.deepcopy(GREEDY))]


def served_model(adapters):
    model = compact_(tiny_model(), "float32")
    return model, serve_adapters(model, adapters)


def test_one_batch_serves_each_request_its_own_adapter(adapters, tokenizer):
    model, ids = served_model(adapters)
    assert ids == {"terse": 1, "chatty": 2}
    engine = Engine(model, tokenizer, max_batch=4, max_len=64)
    outputs = {name: [] for name in ("base", "terse", "chatty")}
    batches = []
    original = engine._run
    engine._run = lambda group, *most: batches.append(len(group)) or original(group, *most)
    with engine._wake:  # queue all three before the engine thread starts: they run as one batch
        for name in outputs:
            engine.submit(PROMPT, copy.deepcopy(GREEDY), lambda step, n=name: outputs[n].append(step.choice.token),
                          adapter=ids.get(name, 0))
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while any(len(tokens) < 8 for tokens in outputs.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.stop()
    assert max(batches) == 3  # decoded together
    assert outputs["base"] == reference(None, tokenizer)
    assert outputs["terse"] == reference(adapters["terse"], tokenizer)
    assert outputs["chatty"] == reference(adapters["chatty"], tokenizer)
    assert len({tuple(t) for t in outputs.values()}) == 3  # the adapters really change the output


async def test_api_lists_adapters_and_routes_by_model_name(adapters, tokenizer):
    model, ids = served_model(adapters)
    engine = Engine(model, tokenizer, max_batch=2, max_len=64)
    engine.start()
    state = ServerState(engine, tokenizer, "tiny", strict_models=True, adapters=ids)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://t") as c:
            names = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            assert names == ["tiny", "terse", "chatty"]
            body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            r = await c.post("/v1/completions", json={**body, "model": "chatty"})
            assert r.status_code == 200 and r.json()["model"] == "chatty"
            assert r.json()["choices"][0]["text"] == tokenizer.decode(reference(adapters["chatty"], tokenizer))
            assert (await c.post("/v1/completions", json={**body, "model": "nope"})).status_code == 404
    finally:
        engine.stop()


def test_an_adapter_for_another_base_is_refused(adapters):
    model = compact_(tiny_model(seed=3), "float32")
    with pytest.raises(PlinthError, match="trained on base model 'tiny'"):
        serve_adapters(model, adapters)
