"""/v1/completions with `echo` and `logprobs` in-process on the tiny model: the prompt's token
logprobs in OpenAI's legacy shape, checked against a direct forward pass."""
import httpx
import pytest
import torch

from plinth.serve.app import create_app
from plinth.serve.state import ServerState
from plinth.engine import Engine


@pytest.fixture
def served(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_len=128)
    engine.start()
    state = ServerState(engine, tokenizer, "tiny")
    yield httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://test")
    engine.stop()


def reference(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)  # (T, V)


async def test_echo_with_max_tokens_0_scores_every_prompt_token(served, model, tokenizer):
    prompt = "Hi, é!"
    r = await served.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "echo": True,
                                                     "logprobs": 2, "max_tokens": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = tokenizer.encode(prompt)
    logprobs = reference(model, ids)
    lp = choice["logprobs"]
    assert choice["text"] == prompt
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                     abs=1e-4)
    top = logprobs[0].topk(2)
    assert list(lp["top_logprobs"][1].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 4, 5]  # é is two byte tokens; both start at character 4
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


async def test_echo_in_front_of_a_completion_as_lm_eval_asks(served, model, tokenizer):
    ids = tokenizer.encode("def f(x):")
    r = await served.post("/v1/completions", json={"model": "tiny", "prompt": [ids, ids[:3]], "echo": True,
                                                     "logprobs": 1, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for choice, prompt in zip(choices, [ids, ids[:3]]):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1  # the prompt, then the one generated token
        logprobs = reference(model, prompt)
        generated = int(logprobs[-1].argmax())  # greedy
        assert lp["token_logprobs"][-1] == pytest.approx(float(logprobs[-1, generated]), abs=1e-4)
        assert lp["token_logprobs"][1:-1] == pytest.approx(
            [float(logprobs[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=1e-4)
        assert choice["text"] == tokenizer.decode(prompt + [generated])
        assert lp["text_offset"][-1] == len(tokenizer.decode(prompt))


async def test_echo_without_logprobs_and_bad_echo_requests(served):
    r = await served.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "echo": True, "max_tokens": 0})
    assert r.status_code == 200 and r.json()["choices"][0] | {"index": 0} == {
        "index": 0, "text": "abc", "logprobs": None, "finish_reason": "length"}
    for body, param in [({"echo": True, "stream": True}, "echo"), ({"max_tokens": 0}, "max_tokens"),
                        ({"echo": True, "max_tokens": 0, "prompt": ""}, "prompt"),
                        ({"echo": True, "max_tokens": 0, "prompt": "x" * 200}, "max_tokens")]:
        r = await served.post("/v1/completions", json={"model": "tiny", "prompt": "abc", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
