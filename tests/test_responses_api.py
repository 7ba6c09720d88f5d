"""OpenAI's Responses API on a real `plinth serve` of the tiny random model (byte tokenizer) on
loopback, driven by the official `openai` client (`responses.create / stream / parse / retrieve /
delete`) and by the OpenAI Agents SDK at its defaults. A random model's text is noise, so the
tests pin what does not depend on it: shapes, statuses, token counts, reproducibility, calls and
JSON forced by grammar, and that a continuation reads what it continues; the toy image+text model
shows an input_image is seen."""
import base64
import io
import json
import time
from typing import Annotated

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from plinth.serve.response_store import ResponseStore
from plinth.weights.native import write_model
from tests.conftest import BAR_QUESTION, bar, byte_tokenizer, tiny_model
from tests.test_serve import start_server, stop

openai = pytest.importorskip("openai")
agents = pytest.importorskip("agents")
agents.set_tracing_disabled(True)  # tracing would export to OpenAI's servers

WEATHER = {"type": "function", "name": "get_temperature", "description": "Current temperature in a city, in °C.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}, "strict": True}
ADD = {"type": "function", "name": "add", "description": "Add two numbers.",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                                       "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                      "required": ["a", "b"], "additionalProperties": False}, "strict": True}
ASK = "What is the temperature in Paris?"


class Reading(BaseModel):
    city: str = Field(max_length=8)  # a random model's strings end only at a limit
    celsius: int = Field(ge=-99, le=99)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_model(tiny_model(max_seq_len=2048), folder)  # the byte-level tool prompt is long
    byte_tokenizer().save(folder)
    proc, base = start_server(str(folder), "--max-model-len", "2048", "--max-batch", "4", "--seed", "0",
                              "--embedding-model", "none")
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def test_text_and_item_inputs_are_the_same_conversation(client):
    forms = ["Hello there", [{"role": "user", "content": "Hello there"}],
             [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}]]
    answers = [client.responses.create(model="tiny", input=form, max_output_tokens=6) for form in forms]
    first = answers[0]
    served = client.models.list().data[0].id  # the folder: a request's model name is not checked
    assert first.id.startswith("resp_") and first.object == "response" and first.model == served
    assert first.output[0].type == "message" and first.output[0].content[0].type == "output_text"
    assert first.output[0].content[0].annotations == []
    # the server's seed: the same prompt, the same text
    assert len({(a.output_text, a.usage.input_tokens) for a in answers}) == 1


def test_max_output_tokens_makes_an_incomplete_response(client):
    r = client.responses.create(model="tiny", input="Hello", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"
    assert (r.usage.output_tokens, r.usage.total_tokens) == (5, r.usage.input_tokens + 5)
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    # the chat template's opening is in the prefix cache after any earlier request (tests/test_prefix_cache.py)
    assert 0 <= r.usage.input_tokens_details.cached_tokens < r.usage.input_tokens
    assert r.max_output_tokens == 5 and r.store is True and r.tools == [] and r.parallel_tool_calls is True


def test_instructions_and_history_go_into_the_prompt_and_are_echoed(client):
    plain = client.responses.create(model="tiny", input="Hi", max_output_tokens=2)
    told = client.responses.create(model="tiny", input="Hi", instructions="Answer in French.", max_output_tokens=2,
                                   metadata={"run": "7"}, user="ada", truncation="disabled")
    assert told.instructions == "Answer in French." and told.metadata == {"run": "7"} and told.user == "ada"
    assert told.usage.input_tokens > plain.usage.input_tokens + len("Answer in French.")  # byte tokens, plus a turn
    history = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
               {"role": "user", "content": "Again"}]
    longer = client.responses.create(model="tiny", input=history, max_output_tokens=2)
    assert longer.usage.input_tokens > plain.usage.input_tokens + len("Be brief.Hello!Again")


def test_temperature_zero_and_a_seed_reproduce_the_answer(client):
    greedy = [client.responses.create(model="tiny", input="Count", temperature=0, max_output_tokens=8).output_text
              for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [client.responses.create(model="tiny", input="Count", temperature=1.0, max_output_tokens=8,
                                      extra_body={"seed": seed}).output_text for seed in (1, 1, 2, 3)]
    assert seeded[0] == seeded[1] and len(set(seeded)) > 1
    r = client.responses.create(model="tiny", input="Count", temperature=0.5, top_p=0.9, max_output_tokens=1)
    assert (r.temperature, r.top_p) == (0.5, 0.9)


def test_a_stream_sends_the_typed_events_in_order(client):
    events = list(client.responses.create(model="tiny", input="Hello", max_output_tokens=5, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == deltas == events[-4].text and final.usage.output_tokens == 5
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    unstreamed = client.responses.create(model="tiny", input="Hello", max_output_tokens=5)
    assert unstreamed.output_text == deltas  # the server's seed: streaming changes nothing


def test_the_stream_helper_assembles_a_completed_response(client):
    with client.responses.stream(model="tiny", input="Weather?", text_format=Reading, max_output_tokens=300) as s:
        deltas = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    assert final.status == "completed" and final.output_text == deltas
    assert isinstance(final.output_parsed, Reading)


def test_parse_fills_a_pydantic_model_through_text_format(client):
    r = client.responses.parse(model="tiny", input="Weather in Paris as JSON", text_format=Reading,
                               max_output_tokens=300)
    assert r.status == "completed" and isinstance(r.output_parsed, Reading)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Reading"


def check_call(item, tool):
    assert item.type == "function_call" and item.call_id.startswith("call_") and item.status == "completed"
    assert item.name == tool["name"]
    jsonschema.validate(json.loads(item.arguments), tool["parameters"])


def test_a_forced_call_then_its_output_continue_the_conversation(client):
    first = client.responses.create(model="tiny", input=ASK, tools=[WEATHER, ADD], max_output_tokens=400,
                                    tool_choice={"type": "function", "name": "get_temperature"})
    assert [item.type for item in first.output] == ["function_call"] and first.status == "completed"
    call = first.output[0]
    check_call(call, WEATHER)
    assert first.tool_choice.name == "get_temperature" and [t.name for t in first.tools] == ["get_temperature", "add"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18.5"}
    # the whole history sent again, as the Agents SDK does, and the same by previous_response_id
    explicit = client.responses.create(model="tiny", input=[{"role": "user", "content": ASK},
                                                            call.model_dump(exclude_none=True), result],
                                       tools=[WEATHER, ADD], max_output_tokens=4)
    chained = client.responses.create(model="tiny", previous_response_id=first.id, input=[result],
                                      tools=[WEATHER, ADD], max_output_tokens=4)
    assert (chained.output_text, chained.usage.input_tokens) == (explicit.output_text, explicit.usage.input_tokens)
    assert chained.usage.input_tokens > first.usage.input_tokens + len(call.arguments)
    assert chained.previous_response_id == first.id


def test_required_calls_stream_as_function_call_items(client):
    with client.responses.stream(model="tiny", input=ASK, tools=[ADD], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=400) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                         "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert len(final.output) == 1
    check_call(final.output[0], ADD)
    assert events[3].delta == final.output[0].arguments and events[2].item.call_id == final.output[0].call_id


def test_previous_response_id_continues_a_stored_conversation(client):
    first = client.responses.create(model="tiny", input="My name is Ada.", instructions="Be kind.",
                                    max_output_tokens=3)
    chained = client.responses.create(model="tiny", input="What is my name?", previous_response_id=first.id,
                                      max_output_tokens=3)
    history = [{"role": "user", "content": "My name is Ada."}, *[item.model_dump() for item in first.output],
               {"role": "user", "content": "What is my name?"}]
    explicit = client.responses.create(model="tiny", input=history, max_output_tokens=3)
    # the earlier instructions are not carried over, as OpenAI's are not
    assert (chained.output_text, chained.usage.input_tokens) == (explicit.output_text, explicit.usage.input_tokens)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_an_unknown_unstored_or_deleted_response_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="tiny", input="Hi", previous_response_id="resp_unknown")
    assert caught.value.body["param"] == "previous_response_id" and "resp_unknown" in caught.value.message
    unstored = client.responses.create(model="tiny", input="Hi", store=False, max_output_tokens=1)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="Hi", previous_response_id=unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(unstored.id)


def test_the_store_keeps_the_newest_responses_for_a_limited_time():
    store = ResponseStore(most=2, seconds=0.2)
    for i in range(3):
        store.put({"id": f"resp_{i}"}, [{"type": "message", "role": "user", "content": str(i)}])
    assert store.get("resp_0") is None and store.get("resp_2").items[0]["content"] == "2"
    time.sleep(0.25)
    assert store.get("resp_1") is None and store.get("resp_2") is None


@pytest.mark.parametrize("fields, param, words", [
    ({"tools": [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools",
     "built-in tools are not served by plinth: web_search, file_search"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1", "detail": "auto"}]}]},
     "input", "file_id: uploaded files are not served"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA",
                                              "detail": "auto"}]}]}, "input", "reads text only"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0", "input items of type message, function_call"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "minProperties": "x"}}}},
     "text.format", "schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "nope"),
    ({"input": "Hi", "max_output_tokens": 4000}, "max_output_tokens", "maximum context length"),
    ({"background": True}, "background", "not supported"),
])
def test_what_is_not_served_is_a_400_naming_it(client, server, fields, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**{"model": "tiny", "input": "Hi", **fields})
    assert caught.value.body["param"] == param and words in caught.value.message
    if param == "tool_choice":  # the one rule between fields here, coded as the schemathesis hooks read it
        assert caught.value.code == "unknown_tool"
    assert httpx.get(f"{server}/health").status_code == 200


async def test_the_agents_sdk_at_its_defaults_runs_a_tool_and_answers(server):
    @agents.function_tool
    def get_temperature(city: Annotated[str, Field(max_length=10)]) -> int:
        """Current temperature in a city, in degrees Celsius."""
        return {"Paris": 18}.get(city, 0)

    # the forced first call, then reset_tool_choice lets the model answer: in JSON, so that the
    # random model's answer ends
    agent = agents.Agent(name="weather", instructions="Use the tool, then answer.", tools=[get_temperature],
                         model="tiny", output_type=Reading,
                         model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                             max_tokens=300))
    provider = agents.OpenAIProvider(base_url=f"{server}/v1", api_key="none")  # the Responses API is its default
    result = await agents.Runner.run(agent, ASK, max_turns=3, run_config=agents.RunConfig(model_provider=provider))
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert result.new_items[0].raw_item.name == "get_temperature"
    assert isinstance(result.final_output, Reading)
    assert [r.response_id[:5] for r in result.raw_responses] == ["resp_", "resp_"]


# ---- images ----------------------------------------------------------------------------------------
def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


@pytest.fixture(scope="module")
def vlm_client(toy_vlm):
    proc, base = start_server(str(toy_vlm[1]), "--seed", "0", "--embedding-model", "none")
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    stop(proc)


def test_an_image_model_reads_input_images(vlm_client):
    def ask(i):
        content = [{"type": "input_image", "image_url": data_uri(bar(i)), "detail": "low"},
                   {"type": "input_text", "text": BAR_QUESTION}]
        return vlm_client.responses.create(model="any", input=[{"role": "user", "content": content}], temperature=0,
                                           max_output_tokens=8)
    up, down = ask(1000), ask(1001)
    assert (up.output_text, down.output_text) == ("up", "down")
    text_only = vlm_client.responses.create(model="any", input=BAR_QUESTION, temperature=0, max_output_tokens=8)
    assert up.usage.input_tokens > text_only.usage.input_tokens  # the image's tokens count as input
