"""Bad request bodies are a 400 in OpenAI's error shape naming the field, never a 500: lone UTF-16
surrogates in any string (on a live server, whose keep-alive connection must stay usable), JSON
schemas whose `$schema` is not a draft's URI, and fields of the wrong JSON type."""
import json

import httpx
import pytest

from plinth.constrain import json_schema_grammar
from plinth.errors import PlinthError
from plinth.serve.app import create_app
from tests.conftest import live, server_state

ASK = [{"role": "user", "content": "Hi"}]
CHAT, TEXT, EMBED = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
LONE = "a\ud800b"  # json.dumps writes it as the escape "a\ud800b", which JSON allows and Unicode does not


@pytest.fixture
def state(model, tokenizer):
    with server_state(model, tokenizer, max_batch=2, max_len=256) as state:
        yield state


@pytest.fixture
def url(state):
    """A real server: only it has keep-alive connections."""
    yield from live(state)


@pytest.fixture
async def client(state):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://test") as c:
        yield c


def local_port(response: httpx.Response) -> int:
    """The client end of the connection that carried `response`: the same port, the same connection."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]}, "messages.0.content.0.text"),
    (CHAT, {"messages": ASK, "tools": [{"type": "function", "function": {"name": LONE}}]}, "tools.0.function.name"),
    (CHAT, {"messages": ASK, "logit_bias": {"\udc00": 1}}, "logit_bias"),  # in a key
    (TEXT, {"prompt": LONE}, "prompt"),
    (TEXT, {"prompt": ["fine", LONE]}, "prompt.1"),
    (EMBED, {"input": LONE}, "input"),
    (EMBED, {"input": ["fine", LONE]}, "input.1"),
])
def test_a_lone_surrogate_is_400_naming_the_field_and_the_connection_stays_usable(url, path, body, param):
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", path, content=json.dumps({"model": "tiny", "max_tokens": 1, **body}),
                         headers={"Content-Type": "application/json"}) as bad:
            port = local_port(bad)  # before the body is read: a connection closed after it has no port
            bad.read()
        assert bad.status_code == 400, bad.text
        error = bad.json()["error"]
        assert error["param"] == param and "surrogate" in error["message"] and error["type"] == "invalid_request_error"
        good = http.post(TEXT, json={"model": "tiny", "prompt": "Hi", "max_tokens": 1})
        assert good.status_code == 200 and local_port(good) == port


@pytest.mark.parametrize("dialect", [{}, [], 5, None, "http://example.com/not-a-draft"])
async def test_a_schema_dialect_that_is_not_a_draft_uri_is_400_at_dollar_schema(client, dialect):
    schema = {"$schema": dialect, "type": "object"}
    with pytest.raises(PlinthError, match=r"invalid JSON schema at \$schema"):
        json_schema_grammar(schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    for body, param in [({"response_format": fmt}, "response_format"), ({"tools": [tool]}, "tools")]:
        r = await client.post(CHAT, json={"model": "tiny", "messages": ASK, "max_tokens": 1, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "invalid JSON schema at $schema" in r.json()["error"]["message"]
    assert json_schema_grammar({**schema, "$schema": "http://json-schema.org/draft-07/schema#"})  # a draft's URI works


@pytest.mark.parametrize("path, fields, param", [  # each a value pydantic's lax mode would coerce
    (CHAT, {"stream": "yes"}, "stream"),
    (CHAT, {"logprobs": 1}, "logprobs"),
    (CHAT, {"parallel_tool_calls": "false"}, "parallel_tool_calls"),
    (CHAT, {"n": 1.5}, "n"),
    (CHAT, {"n": True}, "n"),
    (CHAT, {"max_tokens": "4"}, "max_tokens"),
    (CHAT, {"temperature": "0.5"}, "temperature"),
    (CHAT, {"seed": 1.5}, "seed"),
    (CHAT, {"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    (CHAT, {"logit_bias": {"5": "1"}}, "logit_bias.5"),
    (CHAT, {"retrieval": {"index": "docs", "k": "2"}}, "retrieval.k"),
    (TEXT, {"echo": 0}, "echo"),
    (TEXT, {"prompt": [1.5, 2.0]}, "prompt"),
    (TEXT, {"logprobs": True}, "logprobs"),
    (EMBED, {"input": "Hi", "dimensions": "8"}, "dimensions"),
    (EMBED, {"input": [[1.5]]}, "input"),
])
async def test_a_field_of_the_wrong_type_is_400_naming_it(client, path, fields, param):
    body = {"model": "tiny", "messages": ASK, "prompt": "Hi", "max_tokens": 1, **fields}
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    named = r.json()["error"]["param"]
    assert named == param or named.startswith(param + "."), named  # a union field's loc adds the member tried


async def test_numbers_take_integers_as_openai_does(client):
    r = await client.post(CHAT, json={"model": "tiny", "messages": ASK, "max_tokens": 1, "temperature": 1,
                                      "top_p": 1, "presence_penalty": 0, "logit_bias": {"5": 1}})
    assert r.status_code == 200, r.text


async def test_integers_take_whole_numbers_as_json_schema_does(client):
    # 2.0 is the integer 2 in JSON Schema (and so for schemathesis); 1.5 is refused above.
    r = await client.post(CHAT, json={"model": "tiny", "messages": ASK, "max_tokens": 3.0, "n": 2.0, "seed": 7.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] <= 6
    whole = await client.post(TEXT, json={"model": "tiny", "prompt": [72.0, 105.0], "max_tokens": 2, "seed": 7})
    exact = await client.post(TEXT, json={"model": "tiny", "prompt": [72, 105], "max_tokens": 2, "seed": 7})
    assert whole.status_code == 200 and whole.json()["choices"] == exact.json()["choices"]
