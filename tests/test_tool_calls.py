"""Tool calling and response_format in /v1/chat/completions, driven by the official `openai` client
against the in-process app: on the tiny random model (a forced call is valid even from noise) and
on SmolLM2 for a two-tool task."""
import json

import httpx
import jsonschema
import pytest

from plinth import tools as toolkit
from plinth.errors import PlinthError
from plinth.serve.app import create_app
from plinth.serve.state import ServerState
from plinth.engine import Engine
from tests.conftest import tiny_model

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_temperature", "description": "Current temperature in a city, in degrees Celsius.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
ASK = [{"role": "user", "content": "What is the temperature in Paris?"}]


def serve(model, tokenizer, name):
    engine = Engine(model, tokenizer, max_batch=4, max_len=2048)
    engine.start()
    app = create_app(ServerState(engine, tokenizer, name))
    client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", max_retries=0,
                                http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))
    return engine, client


@pytest.fixture
def client(tokenizer):
    engine, client = serve(tiny_model(max_seq_len=2048), tokenizer, "tiny")  # the byte-level tool prompt is long
    yield client
    engine.stop()


def check_calls(message):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def test_required_and_named_calls_always_have_valid_arguments(client):
    for seed in range(4):
        r = await client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, ADD], seed=seed,
                                                 tool_choice="required", max_tokens=800)
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(r.choices[0].message)
    r = await client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, ADD], max_tokens=800, seed=0,
                                             tool_choice={"type": "function", "function": {"name": "add"}})
    check_calls(r.choices[0].message)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["add"]


async def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(3):
        r = await client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, ADD], seed=seed,
                                                 tool_choice="required", parallel_tool_calls=False, max_tokens=800)
        assert len(r.choices[0].message.tool_calls) == 1


async def test_tool_choice_none_answers_in_text(client):
    r = await client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none",
                                             max_tokens=5, seed=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"


async def test_streamed_tool_calls_assemble_to_the_unstreamed_ones(client):
    body = dict(model="tiny", messages=ASK, tools=[WEATHER, ADD], tool_choice="required", seed=7, max_tokens=800)
    whole = (await client.chat.completions.create(**body)).choices[0].message.tool_calls
    calls, finish = {}, None
    async for chunk in await client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:  # assembled as OpenAI's docs show
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(c.function.name, c.function.arguments)
                                                                      for c in whole]


async def test_tool_results_continue_the_conversation(client):
    first = (await client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], seed=1,
                                                  tool_choice="required", max_tokens=800)).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [first.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "18.5"}]
    r = await client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=3, seed=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_default_tool_prompt_renders_calls_and_results(tokenizer):
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_temperature", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_temperature", "content": "18.5"}]
    prompt = toolkit.render(tokenizer, messages, [WEATHER])
    assert '<tools>{"type": "function", "function": {"name": "get_temperature"' in prompt
    assert '<tool_call>[{"name": "get_temperature", "arguments": {"city": "Paris"}}]</tool_call>' in prompt
    assert '<tool_response>{"name": "get_temperature", "content": "18.5"}</tool_response>' in prompt


async def test_arguments_that_do_not_fit_are_returned_flagged_not_a_500(client):
    """Force a bare-JSON call whose arguments break the tool's schema (city is a number)."""
    wrong = {"type": "object", "properties": {"name": {"const": "get_temperature"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["city"], "additionalProperties": False}}, "required": ["name", "arguments"],
        "additionalProperties": False}
    r = await client.chat.completions.with_raw_response.create(
        model="tiny", messages=ASK, tools=[WEATHER], max_tokens=100, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": wrong}})
    call = json.loads(r.content)["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_temperature" and json.loads(call["arguments"])["city"] in range(10)
    assert "do not fit the parameters schema" in call["parse_error"]


def test_parsing_keeps_broken_arguments_as_written():
    content, calls = toolkit.parse('Sure.<tool_call>[{"name": "add", "arguments": {"a": 1, "b": }]</tool_call>', SCHEMAS)
    assert content.startswith("Sure") or content == ""
    assert calls[0].name == "add" and '"b": }' in calls[0].arguments and "not valid JSON" in calls[0].error
    assert toolkit.parse("Just text.", SCHEMAS) == ("Just text.", [])
    _, calls = toolkit.parse('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', SCHEMAS)
    assert "no tool named 'nope'" in calls[0].error


async def test_response_format_through_the_official_client(client):
    pydantic = pytest.importorskip("pydantic")

    class Reading(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=8)  # a random model's strings end only at a limit
        celsius: int

    r = await client.chat.completions.parse(model="tiny", messages=ASK, response_format=Reading, max_tokens=300,
                                            seed=0)
    assert isinstance(r.choices[0].message.parsed, Reading)


@pytest.mark.parametrize("body, param, words, code", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name", "required",
     None),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "'fly'",
     "unknown_tool"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "sometimes", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strnig"}}}}}}, "response_format", "properties/a/type", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "if": {}, "then": {}}}}}, "response_format", "unsupported", None),
])
async def test_bad_tool_and_format_fields_are_400(model, tokenizer, body, param, words, code):
    engine = Engine(model, tokenizer, max_batch=1, max_len=256)
    engine.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ServerState(engine, tokenizer, "t"))),
                                     base_url="http://test") as http:
            r = await http.post("/v1/chat/completions", json={"model": "t", "messages": ASK, **body})
    finally:
        engine.stop()
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and words in error["message"] and error["code"] == code


@pytest.mark.slow
async def test_smollm2_looks_up_a_value_then_computes_with_it():
    """The client's two-tool loop on the real model, each call forced by grammar (auto: the 135M model
    answers in prose). It picks the right lookup; whether it feeds the value on is measured in
    benchmarks/structured.py, since a 135M model often does not."""
    import plinth
    m = plinth.load("smollm2-135m-instruct")
    engine, client = serve(m.model, m.tokenizer, "smollm2")
    messages = [{"role": "user", "content": "Get the temperature in Paris, then add 10 to it."}]
    try:
        first = (await client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER, ADD],
                                                      tool_choice="required", parallel_tool_calls=False,
                                                      temperature=0, max_tokens=60)).choices[0].message
        call = first.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_temperature", {"city": "Paris"})
        messages += [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": "18"}]
        second = await client.chat.completions.create(
            model="smollm2", messages=messages, tools=[WEATHER, ADD], temperature=0, max_tokens=60,
            tool_choice={"type": "function", "function": {"name": "add"}})
    finally:
        engine.stop()
    check_calls(second.choices[0].message)
    assert second.choices[0].message.tool_calls[0].function.name == "add"


def test_run_tools_executes_the_registered_functions(tokenizer):
    from plinth.loaded import LoadedModel
    m = LoadedModel(tiny_model(max_seq_len=2048), tokenizer, "tiny")
    seen = []

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        seen.append((a, b))
        return a + b

    def get_temperature(city: str) -> float:
        """Current temperature in a city."""
        raise KeyError(city)

    tools = [WEATHER, ADD]  # bounded schemas: the random model's strings end
    conversation = m.run_tools(ASK, tools, [add, get_temperature], tool_choice="required", max_rounds=1,
                               seed=0, max_tokens=800)
    calls = conversation[1]["tool_calls"]
    results = conversation[2:]
    assert calls and len(results) == len(calls)
    for call, result in zip(calls, results):
        assert result["role"] == "tool" and result["tool_call_id"] == call["id"]
        arguments = json.loads(call["function"]["arguments"])
        expected = str(arguments["a"] + arguments["b"]) if call["function"]["name"] == "add" else "error: KeyError"
        assert result["content"].startswith(expected)
    assert len(seen) == sum(c["function"]["name"] == "add" for c in calls)
    with pytest.raises(PlinthError, match="tool_choice must be"):
        m.run_tools(ASK, tools, [add], tool_choice="always")


def test_streamed_text_passes_and_calls_are_held_back():
    stream = toolkit.CallStream(SCHEMAS)
    shown = [stream.add(p) for p in ["It is ", "warm <tool", "_call>[{\"name\": \"add\", ", "\"arguments\": {\"a\": 1, \"b\": 2}}]</tool_call>"]]
    assert shown == ["It is ", "warm ", "", ""]  # "<tool" might open a tag: held until it is known
    rest, calls = stream.finish()
    assert rest == "" and [(c.name, c.arguments, c.error) for c in calls] == [("add", '{"a": 1, "b": 2}', None)]
    plain = toolkit.CallStream(SCHEMAS)
    assert [plain.add(p) for p in ["a <", "b"]] == ["a ", "<b"] and plain.finish() == ("", [])


def test_bare_json_and_parallel_calls_parse():
    _, calls = toolkit.parse('{"name": "add", "parameters": {"a": 1, "b": 2}}', SCHEMAS)  # Llama 3 style
    assert [(c.name, c.arguments) for c in calls] == [("add", '{"a": 1, "b": 2}')]
    _, calls = toolkit.parse('<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                             '{"name": "get_temperature", "arguments": {"city": "Oslo"}}]</tool_call>', SCHEMAS)
    assert [c.name for c in calls] == ["add", "get_temperature"] and not any(c.error for c in calls)


def test_a_forced_call_carries_only_the_declared_parameters(tokenizer):
    from plinth.loaded import LoadedModel
    m = LoadedModel(tiny_model(), tokenizer, "tiny")
    loose = {"dial": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["x"]}}  # JSON Schema would allow any extra key here
    grammar = toolkit.call_grammar(loose, only="dial")
    for seed in range(5):
        _, calls = toolkit.parse(m.generate("Hi", grammar=grammar, seed=seed, max_tokens=100), loose)
        assert list(json.loads(calls[0].arguments)) == ["x"]


def test_a_template_that_knows_tools_renders_them_itself():
    from tests.conftest import byte_tokenizer
    tok = byte_tokenizer()
    tok.chat_template = ("{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}{% for m in messages %}"
                         "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments.city }}]"
                         "{% endfor %}{% endfor %}")
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_temperature", "arguments": '{"city": "Oslo"}'}}]}]
    assert toolkit.render(tok, messages, [WEATHER, ADD]) == "[tool get_temperature][tool add][call get_temperature Oslo]"


async def test_a_streamed_json_schema_answer_validates(client):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1, "maxItems": 4}
    for seed in range(2):
        pieces = []
        async for chunk in await client.chat.completions.create(
                model="tiny", messages=ASK, stream=True, seed=seed, max_tokens=200, n=2,
                response_format={"type": "json_schema", "json_schema": {"name": "numbers", "schema": schema}}):
            pieces += [(c.index, c.delta.content or "") for c in chunk.choices]
        for index in (0, 1):
            jsonschema.validate(json.loads("".join(p for i, p in pieces if i == index)), schema)
