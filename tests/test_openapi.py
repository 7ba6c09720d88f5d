"""/openapi.json documents what the server really does (issue 17, defect 6): its error statuses with
OpenAI's error body (400, never FastAPI's default 422), and 200 schemas that real responses from a
tiny in-process server validate against."""
import re

import httpx
import jsonschema
import pytest

from plinth.serve.app import create_app
from plinth.serve.openapi import decimal_at_most
from tests.test_serve_limits import serve, tiny_embedder

V1 = {("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/embeddings", "post"),
      ("/v1/models", "get")}


@pytest.fixture
def served(tokenizer):
    embedder, _ = tiny_embedder()
    engine, state = serve(tokenizer, embedder)
    yield httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://test")
    engine.stop()


@pytest.fixture
async def doc(served):
    return (await served.get("/openapi.json")).json()


def check(doc: dict, schema: dict, instance):
    """Validate `instance` against an OpenAPI schema whose $refs point into the document's components."""
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(instance)


def response_schema(doc, path, method, status="200", media="application/json") -> dict:
    return doc["paths"][path][method]["responses"][status]["content"][media]["schema"]


async def test_no_route_documents_fastapis_422(doc):
    assert "422" not in str(doc["paths"]) and "HTTPValidationError" not in doc["components"]["schemas"]


async def test_every_v1_route_documents_its_errors_in_openais_shape(doc):
    for path, method in V1:
        statuses = doc["paths"][path][method]["responses"]
        assert {"401", "413", "503"} <= set(statuses), path
        if method == "post":
            assert {"400", "404"} <= set(statuses), path
            assert response_schema(doc, path, method, "400") == {"$ref": "#/components/schemas/ErrorResponse"}
    error = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}
    check(doc, {"$ref": "#/components/schemas/ErrorResponse"}, error)
    with pytest.raises(jsonschema.ValidationError):
        check(doc, {"$ref": "#/components/schemas/ErrorResponse"}, {"detail": [{"msg": "bad"}]})


async def test_a_real_400_matches_the_documented_error(served, doc):
    r = await served.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "n": 99})
    assert r.status_code == 400
    check(doc, response_schema(doc, "/v1/completions", "post", "400"), r.json())


async def test_real_responses_match_the_documented_200s(served, doc):
    chat = await served.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True,
        "top_logprobs": 2})
    completion = await served.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2,
                                                             "echo": True, "logprobs": 1})
    embeddings = await served.post("/v1/embeddings", json={"model": "tiny-embed", "input": ["w1 w2", "w3"]})
    models = await served.get("/v1/models")
    for path, method, r in [("/v1/chat/completions", "post", chat), ("/v1/completions", "post", completion),
                            ("/v1/embeddings", "post", embeddings), ("/v1/models", "get", models)]:
        assert r.status_code == 200, r.text
        check(doc, response_schema(doc, path, method), r.json())
    with pytest.raises(jsonschema.ValidationError):  # the schemas do check: a chat response is no completion
        check(doc, response_schema(doc, "/v1/completions", "post"), chat.json())


async def test_streams_metrics_and_the_chat_page_have_their_media_types(served, doc):
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert "text/event-stream" in doc["paths"][path]["post"]["responses"]["200"]["content"]
    assert "text/html" in doc["paths"]["/"]["get"]["responses"]["200"]["content"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4"]
    for path in ("/", "/metrics"):  # their errors are JSON all the same
        assert list(doc["paths"][path]["get"]["responses"]["503"]["content"]) == ["application/json"]
    assert (await served.get("/metrics")).headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    health = await served.get("/health")
    check(doc, response_schema(doc, "/health", "get"), health.json())


async def test_request_schemas_carry_the_rules_the_server_enforces(served, doc):
    def request_schema(path):
        return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    chat, completion = request_schema("/v1/chat/completions"), request_schema("/v1/completions")
    embeddings = request_schema("/v1/embeddings")
    messages = [{"role": "user", "content": "Hi"}]
    for path, schema, bad in [
            ("/v1/completions", completion, {"model": "tiny", "prompt": ""}),
            ("/v1/completions", completion, {"model": "tiny", "prompt": [[]]}),
            ("/v1/completions", completion, {"model": "tiny", "prompt": [999_999]}),
            ("/v1/completions", completion, {"model": "tiny", "prompt": "Hi", "logit_bias": {"999999": 1}}),
            ("/v1/chat/completions", chat, {"model": "tiny", "messages": messages, "response_format": {}}),
            ("/v1/chat/completions", chat, {"model": "tiny", "messages": messages, "tools": [{}]}),
            ("/v1/chat/completions", chat, {"model": "tiny", "messages": messages, "response_format": {
                "type": "json_schema", "json_schema": {"schema": {}, "strict": {}}}}),
            ("/v1/embeddings", embeddings, {"model": "tiny-embed", "input": "Hi", "dimensions": 1}),
            ("/v1/embeddings", embeddings, {"model": "tiny-embed", "input": [999_999]}),
            ("/v1/chat/completions", chat, {"model": "tiny", "messages": messages, "stop": list("abcde")}),
            ("/v1/chat/completions", chat, {"model": "tiny", "messages": messages, "top_logprobs": 2}),
            ("/v1/completions", completion, {"model": "tiny", "prompt": "Hi", "stop": ""}),
            ("/v1/completions", completion, {"model": "tiny", "prompt": "Hi", "max_tokens": 0})]:
        with pytest.raises(jsonschema.ValidationError):
            check(doc, schema, bad)
        assert (await served.post(path, json=bad)).status_code == 400  # the schema says what the server does
    check(doc, chat, {"model": "tiny", "messages": messages, "stop": list("abcd"), "logprobs": True, "top_logprobs": 2})
    check(doc, completion, {"model": "tiny", "prompt": "Hi", "max_tokens": 0, "echo": True})
    tokens = {"model": "tiny-embed", "input": [[5, 6], [7]]}
    check(doc, embeddings, tokens)
    by_ids = await served.post("/v1/embeddings", json=tokens)
    assert by_ids.status_code == 200 and len(by_ids.json()["data"]) == 2, by_ids.text


@pytest.mark.parametrize("largest", [0, 5, 9, 10, 19, 100, 255, 999, 1000, 49151])
def test_token_id_pattern_matches_exactly_the_ids_of_the_vocabulary(largest):
    pattern = re.compile(decimal_at_most(largest))
    assert [k for k in range(3 * largest + 50) if pattern.match(str(k))] == list(range(largest + 1))
    assert not pattern.match("01") and not pattern.match("") and not pattern.match("-1")


async def test_the_api_key_and_served_indexes_are_documented(tokenizer):
    embedder, _ = tiny_embedder()
    engine, state = serve(tokenizer, embedder)
    try:
        for key, secured in [(None, False), ("secret", True)]:
            state.api_key = key
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)),
                                         base_url="http://test") as http:
                doc = (await http.get("/openapi.json")).json()
            assert ("securitySchemes" in doc["components"]) is secured
            for path, operations in doc["paths"].items():
                for operation in operations.values():
                    assert ("security" in operation) is (secured and path.startswith("/v1/")), path
            assert doc["components"]["schemas"]["RetrievalOptions"]["properties"]["index"]["enum"] == []
    finally:
        engine.stop()
