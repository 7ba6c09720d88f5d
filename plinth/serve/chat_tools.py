"""Tools and structured output in /v1/chat/completions and /v1/responses: what a request's
`tools`, `tool_choice`, `parallel_tool_calls` and `response_format` (the Responses API's
`text.format`) mean for the prompt, the grammar and the reply.

`plan()` turns them into the prompt text and an optional grammar; `split_calls()` reads a finished
reply as text and calls, and `ReplyStream` does the same for a stream. On top of those,
`reply_message()` gives chat's message (`tool_calls`, finish_reason "tool_calls") and `CallDeltas`
chat's chunk deltas: text deltas while the output is text, then, for each call, one delta with its
id and name and one with its arguments. (The Responses API's items are built in responses.py.)
"""
from __future__ import annotations

from dataclasses import dataclass

from plinth import tools as toolkit
from plinth.constrain import response_format_grammar
from plinth.errors import PlinthError


@dataclass
class ChatPlan:
    prompt: str                         # the rendered conversation
    grammar: str | None = None          # what the output must match (a forced call, or response_format)
    tools: dict[str, dict] | None = None  # {name: parameters schema} when the reply may hold calls
    parallel: bool = True

    def keep(self, calls: list[toolkit.ToolCall]) -> list[toolkit.ToolCall]:
        """The calls a reply may make: one unless parallel calls are allowed."""
        return calls if self.parallel else calls[:1]


class PlanError(PlinthError):
    """A request's tool or format fields are wrong; `param` names the field and `code`, if any, the
    rule broken (HTTP 400)."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def plan(tokenizer, messages: list[dict], tools: list[dict] | None = None, tool_choice: str | dict | None = None,
         parallel: bool = True, response_format: dict | None = None) -> ChatPlan:
    """`messages`: the request's, as template input (with retrieved passages, if it asked for them);
    the rest as chat completions' fields, as JSON: `tools` [{"type": "function", "function": {...}}],
    `tool_choice` "none" | "auto" | "required" | {"type": "function", "function": {"name"}}."""
    try:
        grammar = response_format_grammar(response_format)
    except PlinthError as e:
        raise PlanError(str(e), "response_format") from e
    tools = tools or []
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if not tools or choice == "none":
        return ChatPlan(toolkit.render(tokenizer, messages, None), grammar)
    try:
        schemas = toolkit.check_tools(tools)
    except PlinthError as e:
        raise PlanError(str(e), "tools") from e
    try:
        grammar = toolkit.forced_grammar(schemas, choice, parallel) or grammar
    except PlinthError as e:
        raise PlanError(str(e), "tool_choice", getattr(e, "code", None)) from e
    return ChatPlan(toolkit.render(tokenizer, messages, tools), grammar, schemas, parallel)


def split_calls(text: str, chat_plan: ChatPlan) -> tuple[str, list[toolkit.ToolCall]]:
    """A finished reply as (its text content, its tool calls); all of it is text when it has no calls."""
    if chat_plan.tools is None:
        return text, []
    content, calls = toolkit.parse(text, chat_plan.tools)
    return content, chat_plan.keep(calls)


def reply_message(text: str, finish_reason: str | None, chat_plan: ChatPlan) -> tuple[dict, str | None]:
    """(the assistant message, the finish reason) for a finished choice."""
    content, calls = split_calls(text, chat_plan)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    return ({"role": "assistant", "content": content or None, "tool_calls": [c.as_openai() for c in calls]},
            "tool_calls" if finish_reason == "stop" else finish_reason)


class ReplyStream:
    """One streamed reply: generated pieces in, the text that may be shown now out; at the end, the
    text held back and the calls (text passes straight through when the reply cannot hold calls)."""

    def __init__(self, chat_plan: ChatPlan):
        self.plan = chat_plan
        self.stream = toolkit.CallStream(chat_plan.tools) if chat_plan.tools is not None else None

    def add(self, text: str) -> str:
        return self.stream.add(text) if self.stream is not None else text

    def finish(self) -> tuple[str, list[toolkit.ToolCall]]:
        """(text not yet shown, tool calls)."""
        if self.stream is None:
            return "", []
        rest, calls = self.stream.finish()
        return rest, self.plan.keep(calls)


class CallDeltas:
    """One streamed choice: text pieces in, OpenAI delta dicts out."""

    def __init__(self, chat_plan: ChatPlan):
        self.reply = ReplyStream(chat_plan)

    def add(self, text: str, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """(deltas to send, finish reason) for one generated piece."""
        shown = self.reply.add(text)
        deltas = [{"content": shown}] if shown else []
        if finish_reason is None:
            return deltas, None
        rest, calls = self.reply.finish()
        deltas += [{"content": rest}] if rest else []
        for i, call in enumerate(calls):
            head = call.as_openai()
            arguments = head["function"].pop("arguments")
            deltas.append({"tool_calls": [{"index": i, **head, "function": {**head["function"], "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": arguments}}]})
        return deltas, ("tool_calls" if calls and finish_reason == "stop" else finish_reason)
