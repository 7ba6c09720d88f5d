"""Tool calling: OpenAI-style tool schemas, rendering them into the prompt, parsing the calls a model
writes, and a small agent loop that runs Python functions for the model.

A model whose chat template knows tools (it uses the `tools` variable) renders them itself. Others,
SmolLM2 among them (its GGUF template has no tools), get plinth's default tool prompt, in the format
SmolLM2-Instruct was tuned on:

    system:    <TOOL_PROMPT with each tool's JSON inside <tools></tools>>
    assistant: <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>
    user:      <tool_response>{"name": "get_weather", "content": "18 °C"}</tool_response>

Calls are read from `<tool_call>` tags (a JSON object or a list of them) or from a reply that is
nothing but such JSON. When a call is required, a grammar forces that exact shape
(`call_grammar`), so the arguments always parse and match the tool's parameters.

    m = plinth.load("smollm2-135m-instruct")
    m.run_tools([{"role": "user", "content": "Weather in Paris?"}], functions=[get_weather])[-1]["content"]
"""
from __future__ import annotations

import inspect
import json
import re
import typing
import uuid
from dataclasses import dataclass

import jsonschema

from plinth.constrain import JSON_LAYOUT, json_schema_grammar, lark_grammar
from plinth.errors import PlinthError

# The shape SmolLM2-Instruct was tuned on (its model card; Ollama's smollm2 template): tools as JSON
# inside <tools>, calls as a JSON list inside <tool_call>, results as a user turn in <tool_response>.
TOOL_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. "
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose. "
    "If a function result is already given, use it to answer the question.\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n"
    "To call functions, reply with only a list of calls in this format, with no other text:\n"
    '<tool_call>[\n{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}}\n]</tool_call>'
)
OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str            # JSON text, exactly as the model wrote it
    id: str = ""
    error: str | None = None  # why the arguments cannot be used (do not parse, or do not fit the schema)

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_openai(self) -> dict:
        function = {"name": self.name, "arguments": self.arguments}
        if self.error:  # an extension field: the arguments are returned as produced, flagged
            function["parse_error"] = self.error
        return {"id": self.id, "type": "function", "function": function}


# ---- schemas -----------------------------------------------------------------------------------------
def check_tools(tools: list[dict]) -> dict[str, dict]:
    """OpenAI tool definitions → {name: parameters schema}; a clear error for a malformed one."""
    out = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise PlinthError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": '
                              f'{{...}}}}}}, got {tool!r}')
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        json_schema_grammar(parameters)  # says where a schema is invalid, names an unsupported feature
        out[function["name"]] = parameters
    return out


def tool_from_function(fn) -> dict:
    """An OpenAI tool definition for a Python function, from its signature and docstring."""
    types = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
    properties, required = {}, []
    hints = typing.get_type_hints(fn)  # resolves annotations written as strings
    for name, p in inspect.signature(fn).parameters.items():
        properties[name] = {"type": types[hints[name]]} if hints.get(name) in types else {}
        if p.default is inspect.Parameter.empty:
            required.append(name)
    return {"type": "function", "function": {
        "name": fn.__name__, "description": inspect.getdoc(fn) or "",
        "parameters": {"type": "object", "properties": properties, "required": required,
                       "additionalProperties": False}}}


# ---- rendering -----------------------------------------------------------------------------------------
def render(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    """The prompt text for a conversation that may use tools."""
    if not tools:
        return tokenizer.apply_chat_template([plain(m) for m in messages])
    if "tools" in tokenizer.chat_template:  # the model's own template knows how it was taught tools
        return tokenizer.apply_chat_template([with_parsed_arguments(m) for m in messages], tools=tools)
    prompt = TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    rendered = [plain(m) for m in messages]
    if rendered and rendered[0]["role"] == "system":
        rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + prompt}
    else:
        rendered.insert(0, {"role": "system", "content": prompt})
    return tokenizer.apply_chat_template(rendered)


def plain(message: dict) -> dict:
    """A message as text a template without tool support renders: calls and results in the default format."""
    if message["role"] == "tool":
        result = {"name": message.get("name") or message.get("tool_call_id", ""), "content": message.get("content") or ""}
        return {"role": "user", "content": f"<tool_response>{json.dumps(result, ensure_ascii=False)}</tool_response>"}
    content = message.get("content") or ""
    if message.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": loads_or_text(c["function"].get("arguments"))}
                 for c in message["tool_calls"]]
        content += OPEN + json.dumps(calls, ensure_ascii=False) + CLOSE
    return {"role": message["role"], "content": content}


def with_parsed_arguments(message: dict) -> dict:
    """Chat templates expect call arguments as objects; OpenAI sends them as JSON text."""
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": loads_or_text(c["function"].get("arguments"))}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def loads_or_text(text):
    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text


# ---- forcing calls ------------------------------------------------------------------------------------
class UnknownTool(PlinthError):
    """tool_choice names a function the request's tools do not define: a rule between two fields,
    which the server's 400 marks with `code` (no JSON Schema of the request can state it)."""
    code = "unknown_tool"


def call_grammar(tools: dict[str, dict], only: str | None = None, parallel: bool = True) -> str:
    """A grammar for `<tool_call>[calls]</tool_call>`: one call of `only`, or one or more (one unless
    `parallel`) calls of any tool, each with arguments valid for that tool."""
    if only is not None and only not in tools:
        raise UnknownTool(f"tool_choice names the function {only!r}, but tools define only {sorted(tools)}")
    names = [only] if only else list(tools)
    calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": declared_only(tools[n])},
              "required": ["name", "arguments"], "additionalProperties": False} for n in names]
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, "x-guidance": JSON_LAYOUT}
    if only or not parallel:
        schema["maxItems"] = 1
    return lark_grammar(f'start: "{OPEN}" calls "{CLOSE}"\ncalls: %json {json.dumps(schema)}\n')


def declared_only(parameters: dict) -> dict:
    """A forced call carries only the declared parameters unless the schema says otherwise (JSON
    Schema's default allows any extra key, which small models fill with invented ones)."""
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


# ---- parsing ----------------------------------------------------------------------------------------
def parse(text: str, tools: dict[str, dict] | None = None) -> tuple[str, list[ToolCall]]:
    """Model output → (text content, tool calls). Arguments that do not parse or do not fit the
    tool's schema are kept as written, with `error` saying why."""
    start = text.find(OPEN)
    if start >= 0:
        content, bodies = text[:start].strip(), re.findall(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + "|$)",
                                                           text[start:], re.S)
    elif text.lstrip().startswith(("{", "[")) and '"name"' in text:  # a bare JSON call (Llama 3 style)
        content, bodies = "", [text]
    else:
        return text, []
    calls = [call for body in bodies for call in parse_body(body.strip(), tools)]
    return (content, calls) if calls else (text, [])


def parse_body(body: str, tools: dict[str, dict] | None) -> list[ToolCall]:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:  # keep what the model wrote, flagged, if a function name is legible
        name = re.search(r'"name"\s*:\s*"([^"]+)"', body)
        return [ToolCall(name.group(1), body, error=f"the call is not valid JSON ({e})")] if name else []
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        arguments = item.get("arguments", item.get("parameters", {}))
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(item["name"], text, error=argument_error(item["name"], text, tools)))
    return calls


def argument_error(name: str, arguments: str, tools: dict[str, dict] | None) -> str | None:
    if tools is not None and name not in tools:
        return f"there is no tool named {name!r}; tools: {sorted(tools)}"
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        return f"the arguments are not valid JSON ({e})"
    if tools is not None:
        try:
            jsonschema.validate(value, tools[name])
        except jsonschema.ValidationError as e:
            return f"the arguments do not fit the parameters schema: {e.message}"
    return None


class CallStream:
    """Streamed text → what may be shown now. Plain text passes through; from the moment the output
    may be a tool call (a `<tool_call>` tag, or JSON at the start) it is held back, and the calls
    are parsed when generation ends."""

    def __init__(self, tools: dict[str, dict]):
        self.tools, self.text, self.shown = tools, "", 0

    def add(self, piece: str) -> str:
        self.text += piece
        held = self._hold_from()
        out = self.text[self.shown:held]
        self.shown = max(self.shown, held)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(text not yet shown, tool calls)."""
        _, calls = parse(self.text, self.tools)
        if not calls:
            out, self.shown = self.text[self.shown:], len(self.text)
            return out, []
        tag = self.text.find(OPEN)  # text before a tag is content; a bare JSON call has none
        return (self.text[self.shown:tag] if tag > self.shown else ""), calls

    def _hold_from(self) -> int:
        if not self.text.strip() or self.text.lstrip()[0] in "{[":
            return 0  # nothing yet, or perhaps a bare JSON call
        tag = self.text.find(OPEN)
        if tag >= 0:
            return tag
        for n in range(min(len(OPEN) - 1, len(self.text)), 0, -1):  # a tag may be starting
            if OPEN.startswith(self.text[-n:]):
                return len(self.text) - n
        return len(self.text)


# ---- the agent loop ------------------------------------------------------------------------------------
def run_tools(model, messages: list[dict], tools: list[dict] | None = None, functions=(), max_rounds: int = 5,
              tool_choice: str | dict = "auto", **options) -> list[dict]:
    """Let `model` call `functions` (Python callables, or a {name: callable} dict) until it answers in
    text; `tools` default to definitions made from the functions' signatures and docstrings. Returns the whole
    conversation: the given messages, each assistant turn with its calls, each tool result, the answer.
    A failing function's error goes back to the model as the result, as an API would return it.
    tool_choice "required" or {"function": {"name": ...}} forces the first round's call (by grammar),
    then the model is free to answer, as the OpenAI Agents SDK's `reset_tool_choice` does."""
    registry = dict(functions) if isinstance(functions, dict) else {fn.__name__: fn for fn in functions}
    tools = tools or [tool_from_function(fn) for fn in registry.values()]
    schemas = check_tools(tools)
    messages = list(messages)
    grammar = forced_grammar(schemas, tool_choice)
    for _ in range(max_rounds):
        prompt = render(model.tokenizer, messages, tools)
        text = model.generate(model.tokenizer.encode(prompt, add_bos=False), grammar=grammar, **options)
        grammar = None
        content, calls = parse(text, schemas)
        messages.append({"role": "assistant", "content": content or None,
                         "tool_calls": [c.as_openai() for c in calls] or None})
        if not calls:
            return messages
        for call in calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                             "content": call_function(registry, call)})
    return messages


def forced_grammar(tools: dict[str, dict], tool_choice, parallel: bool = True) -> str | None:
    """The grammar OpenAI's `tool_choice` asks for: None for "auto" and "none" (the model decides)."""
    if tool_choice == "required":
        return call_grammar(tools, parallel=parallel)
    if isinstance(tool_choice, dict):
        return call_grammar(tools, only=(tool_choice.get("function") or {}).get("name"))
    if tool_choice not in ("auto", "none"):
        raise PlinthError(f'tool_choice must be "none", "auto", "required" or {{"type": "function", '
                          f'"function": {{"name": ...}}}}, got {tool_choice!r}')
    return None


def call_function(registry: dict, call: ToolCall) -> str:
    if call.error:
        return f"error: {call.error}"
    if call.name not in registry:
        return f"error: no function named {call.name!r} is registered"
    try:
        result = registry[call.name](**json.loads(call.arguments))
    except Exception as e:  # noqa: BLE001 - the model sees the failure and may retry differently
        return f"error: {type(e).__name__}: {e}"
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
