"""Constrained decoding: whatever the model (here a tiny random one, the hardest case: it has no idea
of JSON), the output parses and validates against the schema, checked by `jsonschema`."""
import argparse
import json
import random

import jsonschema
import pytest

from plinth.cli.common import output_grammar
from plinth.constrain import json_schema_grammar, lark_grammar, response_format_grammar
from plinth.errors import PlinthError
from plinth.generate import SamplingParams
from plinth.loaded import LoadedModel
from plinth.engine import Engine
from tests.conftest import byte_tokenizer, tiny_model
from tests.test_cli import plinth


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random JSON schema whose every instance is short (bounded strings and arrays, closed objects),
    so that even a random model finishes well within the token limit."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "anyOf"] + ["object", "array"] * (depth < 2)
    kind = rng.choice(kinds)
    if kind == "string":
        schema = {"type": "string", "maxLength": rng.randint(0, 6)}
        if rng.random() < 0.3:
            schema["minLength"] = rng.randint(0, schema["maxLength"])
        if rng.random() < 0.2:
            schema = {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{1,3}$"}
        return schema
    if kind == "integer":
        low = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 5000)}
    if kind == "number":
        return {"type": "number", "minimum": -10.5, "maximum": 99.25} if rng.random() < 0.5 else {"type": "number"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(2)]}
    if kind == "object":
        names = rng.sample(["id", "name", "size", "tags", "ok", "when", "kind"], rng.randint(0, 4))
        properties = {name: random_schema(rng, depth + 1) for name in names}
        return {"type": "object", "properties": properties, "additionalProperties": False,
                "required": [n for n in names if rng.random() < 0.7]}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 2)}
    return {"type": kind}


@pytest.fixture(scope="module")
def tiny():
    return LoadedModel(tiny_model(), byte_tokenizer(), "tiny")


def test_random_schemas_always_validate_even_for_a_random_model(tiny):
    rng = random.Random(0)
    for case in range(30):
        schema = random_schema(rng)
        fmt = {"type": "json_schema", "json_schema": {"name": "case", "schema": schema}}
        out = tiny.generate(rng.choice(["Hi", "JSON:", "{", "x" * 30]), response_format=fmt, max_tokens=400,
                            seed=case, temperature=rng.choice([0, 0.7, 1.0, 1.5]))
        jsonschema.validate(json.loads(out), schema)  # raises, naming the case, if it does not


def test_json_object_is_an_object(tiny):
    out = tiny.generate("Hi", response_format={"type": "json_object"}, max_tokens=2000, seed=3)
    assert isinstance(json.loads(out), dict)


def test_a_pydantic_model_is_a_schema(tiny):
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=0, le=99)  # bounded: a random model's numbers end only at a limit
        label: bool

    out = tiny.generate("P", response_format=Point, max_tokens=400, seed=0)
    assert isinstance(Point.model_validate_json(out), Point)


def test_without_a_constraint_the_random_model_does_not_write_json(tiny):
    """The tests above are not passing by luck: unconstrained, this model writes noise."""
    with pytest.raises(json.JSONDecodeError):
        json.loads(tiny.generate("{", max_tokens=20, seed=0))


def test_each_engine_sequence_follows_its_own_schema(model, tokenizer):
    schemas = [{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["n"], "additionalProperties": False},
               {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 2},
               {"type": "boolean"}]
    engine = Engine(model, tokenizer, max_batch=4, max_len=256)
    params = [SamplingParams(max_tokens=60, seed=i, grammar=json_schema_grammar(schema) if schema else None)
              for i, schema in enumerate(schemas + [None])]  # the last one is unconstrained, in the same batch
    results = engine.generate_many([[65, 66]] * len(params), params, timeout=60)
    for i, schema in enumerate(schemas):
        jsonschema.validate(json.loads(results[i].text), schema)


def test_an_invalid_schema_says_where():
    with pytest.raises(PlinthError, match=r"at properties/age/type: 'integr' is not valid"):
        json_schema_grammar({"type": "object", "properties": {"age": {"type": "integr"}}})
    with pytest.raises(PlinthError, match="must be an object"):
        json_schema_grammar(["not", "a", "schema"])


def test_an_unsupported_feature_is_named():
    with pytest.raises(PlinthError, match=r"unsupported JSON schema feature.*\bif\b"):
        json_schema_grammar({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}})


def test_response_format_shapes():
    assert response_format_grammar(None) is None and response_format_grammar({"type": "text"}) is None
    with pytest.raises(PlinthError, match="json_schema needs"):
        response_format_grammar({"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(PlinthError, match="unknown response_format"):
        response_format_grammar({"type": "xml"})
    with pytest.raises(PlinthError, match="invalid grammar"):
        lark_grammar("start: undefined_rule")


@pytest.mark.slow
def test_smollm2_answers_in_the_schema(smollm2_fp32):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    out = smollm2_fp32.chat([{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
                            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
                            max_tokens=40, temperature=0)
    answer = json.loads(out)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["city"]


def test_the_cli_names_a_bad_schema_file_and_exits_2(tmp_path):
    bad = tmp_path / "schema.json"
    bad.write_text('{"type": "object", "properties": {"a": {"minimum": "zero"}}}')
    result = plinth("generate", "hi", "--json-schema", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid JSON schema at properties/a/minimum" in result.stderr
    with pytest.raises(PlinthError, match="cannot read a JSON schema"):
        output_grammar(argparse.Namespace(json_schema=str(tmp_path / "missing.json"), json=False))


@pytest.mark.slow
def test_the_cli_answers_in_the_schema(tmp_path):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    result = plinth("chat", "--json-schema", str(tmp_path / "schema.json"), "--temperature", "0",
                    stdin="What is the capital of France?\n")
    jsonschema.validate(json.loads(result.stdout.splitlines()[1].removeprefix("> ")), schema)
