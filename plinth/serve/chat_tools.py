"""Tools and structured output in /v1/chat/completions: what a request's `tools`, `tool_choice`,
`parallel_tool_calls` and `response_format` mean for the prompt, the grammar and the reply.

`plan()` turns the request into the prompt text and an optional grammar; `reply_message()` turns a
finished choice into OpenAI's message (`tool_calls`, finish_reason "tool_calls"); `CallDeltas`
does the same for a stream, in OpenAI's chunk shape: text deltas while the output is text, then,
for each call, one delta with its id and name and one with its arguments.
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


class PlanError(PlinthError):
    """A request's tool or format fields are wrong; `param` names the field (HTTP 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def plan(body, tokenizer, messages: list[dict]) -> ChatPlan:
    """`messages`: the request's, as template input (with retrieved passages, if it asked for them)."""
    try:
        grammar = response_format_grammar(body.response_format and body.response_format.model_dump(by_alias=True))
    except PlinthError as e:
        raise PlanError(str(e), "response_format") from e
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not isinstance(choice, str):
        choice = choice.model_dump()
    if not tools or choice == "none":
        return ChatPlan(toolkit.render(tokenizer, messages, None), grammar)
    try:
        schemas = toolkit.check_tools(tools)
    except PlinthError as e:
        raise PlanError(str(e), "tools") from e
    try:
        grammar = toolkit.forced_grammar(schemas, choice, body.parallel_tool_calls) or grammar
    except PlinthError as e:
        raise PlanError(str(e), "tool_choice") from e
    return ChatPlan(toolkit.render(tokenizer, messages, tools), grammar, schemas, body.parallel_tool_calls)


def reply_message(text: str, finish_reason: str | None, chat_plan: ChatPlan) -> tuple[dict, str | None]:
    """(the assistant message, the finish reason) for a finished choice."""
    if chat_plan.tools is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = toolkit.parse(text, chat_plan.tools)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    calls = calls if chat_plan.parallel else calls[:1]
    return ({"role": "assistant", "content": content or None, "tool_calls": [c.as_openai() for c in calls]},
            "tool_calls" if finish_reason == "stop" else finish_reason)


class CallDeltas:
    """One streamed choice: text pieces in, OpenAI delta dicts out."""

    def __init__(self, chat_plan: ChatPlan):
        self.plan = chat_plan
        self.stream = toolkit.CallStream(chat_plan.tools) if chat_plan.tools is not None else None

    def add(self, text: str, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """(deltas to send, finish reason) for one generated piece."""
        if self.stream is None:
            return ([{"content": text}] if text else []), finish_reason
        shown = self.stream.add(text)
        deltas = [{"content": shown}] if shown else []
        if finish_reason is None:
            return deltas, None
        rest, calls = self.stream.finish()
        deltas += [{"content": rest}] if rest else []
        calls = calls if self.plan.parallel else calls[:1]
        for i, call in enumerate(calls):
            head = call.as_openai()
            arguments = head["function"].pop("arguments")
            deltas.append({"tool_calls": [{"index": i, **head, "function": {**head["function"], "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": arguments}}]})
        return deltas, ("tool_calls" if calls and finish_reason == "stop" else finish_reason)
