"""The OpenAI Agents SDK, unchanged, driving plinth through chat completions: its tool loop (forced
first call, then `reset_tool_choice` lets the model answer) runs end to end."""
import json
from typing import Annotated

import httpx
import pytest
from pydantic import Field

from plinth.serve.app import create_app
from plinth.serve.state import ServerState
from plinth.engine import Engine
from tests.conftest import tiny_model

agents = pytest.importorskip("agents")
openai = pytest.importorskip("openai")
agents.set_tracing_disabled(True)  # tracing would export to OpenAI's servers


@agents.function_tool
def get_temperature(city: Annotated[str, Field(max_length=10)]) -> int:
    """Current temperature in a city, in degrees Celsius."""
    return {"Paris": 18}.get(city, 0)


@agents.function_tool
def add(a: Annotated[int, Field(ge=-99, le=99)], b: Annotated[int, Field(ge=-99, le=99)]) -> int:
    """Add two numbers."""
    return a + b


async def run_agent(model, tokenizer, **settings):
    engine = Engine(model, tokenizer, max_batch=2, max_len=min(4096, model.config.max_seq_len))
    engine.start()
    client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", max_retries=0, http_client=httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(ServerState(engine, tokenizer, "plinth")))))
    agent = agents.Agent(name="calc", instructions="Use the tools to answer.", tools=[get_temperature, add],
                         model=agents.OpenAIChatCompletionsModel(model="plinth", openai_client=client),
                         model_settings=agents.ModelSettings(tool_choice="required", **settings))
    try:
        return await agents.Runner.run(agent, "Get the temperature in Paris, then add 10 to it.", max_turns=4)
    finally:
        engine.stop()


def tool_calls(result) -> list[tuple[str, dict]]:
    return [(item.raw_item.name, json.loads(item.raw_item.arguments)) for item in result.new_items
            if item.type == "tool_call_item"]


async def test_the_agents_sdk_loop_runs_on_the_tiny_model(tokenizer):
    result = await run_agent(tiny_model(max_seq_len=4096), tokenizer, max_tokens=300, extra_body={"seed": 0})
    calls = tool_calls(result)
    assert calls and calls[0][0] in ("get_temperature", "add")
    assert [i.type for i in result.new_items].count("tool_call_output_item") == len(calls)
    assert isinstance(result.final_output, str)


@pytest.mark.slow
async def test_the_agents_sdk_gets_smollm2_to_look_up_the_value():
    import plinth
    m = plinth.load("smollm2-135m-instruct")
    result = await run_agent(m.model, m.tokenizer, temperature=0, max_tokens=60)
    assert tool_calls(result)[0] == ("get_temperature", {"city": "Paris"})
    assert result.final_output.strip()
