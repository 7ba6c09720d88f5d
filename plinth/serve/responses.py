"""OpenAI's Responses API: `POST /v1/responses` (what the OpenAI Agents SDK calls by default, and
`client.responses.create / stream / parse`), and `GET` / `DELETE /v1/responses/{id}` of a stored one.

A request's input items, after those of the response it continues (`previous_response_id`), become
a chat conversation (`chat_messages`), which takes the chat route's path: `chat_prompt` renders it
with its tool prompt, grammar (a forced call, `text.format`) and images; the engine generates;
chat_tools reads the reply as text and calls. The reply then becomes Responses output items: a
`message` with one `output_text` part, and a `function_call` item per call. Streamed, the same
items go out as OpenAI's typed events (`OutputEvents`), each with its `sequence_number`.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException

from plinth.errors import PlinthError
from plinth.generate import SamplingParams
from plinth.serve.chat_tools import ChatPlan, ReplyStream, split_calls
from plinth.serve.openai_api import CancellingStream, Choice, add_step, chat_prompt, server_state
from plinth.serve.openapi import error_responses
from plinth.serve.responses_schemas import DeletedResponse, ResponseObject, ResponseRequest
from plinth.serve.schemas import APIError
from plinth.serve.state import ServerState
from plinth.tools import ToolCall
from plinth.vision.image_chat import split_images

router = APIRouter()

# The events a stream may carry, in the order they come for a reply with text and then calls.
EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
          "response.output_text.delta", "response.output_text.done", "response.content_part.done",
          "response.output_item.done", "response.function_call_arguments.delta",
          "response.function_call_arguments.done", "response.completed", "response.incomplete", "error"]


def typed_events(model) -> dict:
    """The 200 of a route that streams when asked: `model` as JSON, or server-sent events named by
    their type, each as SSE-aware tools parse it (`event`, and `data`)."""
    event = {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string", "enum": EVENTS},
        "data": {"type": "string", "description": "The event as JSON: its `type` (the event's name), "
                                                  "`sequence_number` and fields, as OpenAI's"}}}
    return {200: {"model": model, "content": {"text/event-stream": {"schema": event}}}}


@router.post("/v1/responses", responses={**typed_events(ResponseObject),
                                         **error_responses(400, 401, 404, 413, 429, 503)})
async def create_response(body: ResponseRequest, request: Request):
    state = server_state(request)
    model = state.resolve_model(body.model) if body.model is not None else state.name
    state.text_model()
    for name in ("background", "conversation", "prompt"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by this server: send the whole request, and continue a "
                                "conversation with previous_response_id", param=name)
    conversation = (stored(state, body.previous_response_id, "previous_response_id").items
                    if body.previous_response_id else []) + body.input_items()
    try:
        messages, images = split_images(chat_messages(conversation, body.instructions))
    except PlinthError as e:
        raise APIError(400, str(e), param="input") from e
    prompt, chat_plan, pictures = await chat_prompt(state, messages, images, "input", "text.format",
                                                    **body.plan_options())
    limit = state.check_length(len(prompt), body.max_output_tokens, "max_output_tokens")
    draft = Draft(body, model, body.sampling(limit, state.sampling_defaults, state.default_seed(prompt),
                                             chat_plan.grammar), len(prompt))
    events, cancel, (submitted,) = state.run([(0, prompt, draft.params)], request if not body.stream else None, model,
                                             pictures)
    draft.request = submitted
    if body.stream:
        return CancellingStream(stream(events, state, draft, chat_plan, conversation), cancel)
    choice = Choice(0)
    try:
        async for _, step in events:
            add_step(choice, step, state.tokenizer)
    finally:
        cancel()
    status = outcome(choice)
    text, calls = split_calls("".join(choice.text), chat_plan)
    output = ([message_item(new_id("msg"), text, status)] if text or not calls else []) + [
        call_item(call, status) for call in calls]
    return finish(state, draft, output, choice, conversation)


@router.get("/v1/responses/{response_id}", responses={200: {"model": ResponseObject},
                                                      **error_responses(401, 404, 413, 503)})
async def get_response(response_id: str, request: Request):
    return stored(server_state(request), response_id).body


@router.delete("/v1/responses/{response_id}", responses={200: {"model": DeletedResponse},
                                                         **error_responses(401, 404, 413, 503)})
async def delete_response(response_id: str, request: Request):
    state = server_state(request)
    if not state.responses.delete(response_id):
        raise not_found(response_id, None)
    return {"id": response_id, "object": "response", "deleted": True}


@router.api_route("/v1/responses/{response_id}", methods=["HEAD", "OPTIONS", "PATCH", "POST", "PUT"],
                  include_in_schema=False)
async def other_methods():
    """A 405 whose Allow names both methods: Starlette's names only those of the path's first route."""
    raise HTTPException(405, headers={"Allow": "GET, DELETE"})


def stored(state: ServerState, response_id: str, param: str | None = None):
    found = state.responses.get(response_id)
    if found is None:
        raise not_found(response_id, param)
    return found


def not_found(response_id: str, param: str | None) -> APIError:
    return APIError(404, f"No stored response with id '{response_id}': it was made with store false, deleted, or "
                         "dropped (this server keeps a limited number, for a limited time); send the whole "
                         "conversation as input instead", param=param, code="response_not_found")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- input -----------------------------------------------------------------------------------------
def chat_messages(items: list[dict], instructions: str | None) -> list[dict]:
    """Responses input items as chat messages, as chat completions' template input: `instructions`
    first as a system message; a reply's function calls as its message's `tool_calls` (one chat
    turn); each call's output as a `tool` message that names its function."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    names = {}  # call_id → function name
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": chat_content(item["content"])})
        elif kind == "function_call":
            names[item["call_id"]] = item["name"]
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1] = {**messages[-1], "tool_calls": [*messages[-1].get("tool_calls", []), call]}
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:  # function_call_output
            output = item["output"]
            name = {"name": names[item["call_id"]]} if item["call_id"] in names else {}
            messages.append({"role": "tool", "tool_call_id": item["call_id"], **name,
                             "content": output if isinstance(output, str) else "".join(p["text"] for p in output)})
    return messages


def chat_content(content: str | list[dict]) -> str | list[dict]:
    """A message's content as chat content parts (text and image_url), which split_images reads."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part["type"] != "input_image":
            parts.append({"type": "text", "text": part.get("text", part.get("refusal"))})
        elif part.get("image_url"):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            how = "file_id: uploaded files are not served here" if part.get("file_id") else "no image_url"
            raise APIError(400, f"an input_image part has {how}; send the image as image_url, a "
                                "data:image/...;base64,... URI or an http(s) URL", param="input")
    return parts


# ---- output ----------------------------------------------------------------------------------------
@dataclass
class Draft:
    """What a response says besides its output: its id, and the request's settings, echoed."""
    body: ResponseRequest
    model: str
    params: SamplingParams
    prompt_tokens: int
    request: Any = None  # the engine request, once submitted: how many prompt tokens the prefix cache gave
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict], usage: dict | None = None) -> dict:
        body = self.body
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
                "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
                "previous_response_id": body.previous_response_id, "reasoning": body.reasoning,
                "store": body.store is not False, "temperature": self.params.temperature, "top_p": self.params.top_p,
                "text": body.text_config().model_dump(by_alias=True, exclude_none=True),
                "tool_choice": dump(body.tool_choice) if body.tool_choice is not None else "auto",
                "tools": [dump(tool) for tool in body.tools or []],
                "truncation": body.truncation or "disabled", "usage": usage, "user": body.user,
                "metadata": body.metadata or {}}


def dump(value):
    return value.model_dump(by_alias=True) if hasattr(value, "model_dump") else value


def outcome(choice: Choice) -> str:
    """A reply cut at its token limit is incomplete, as OpenAI's at max_output_tokens."""
    return "incomplete" if choice.finish_reason == "length" else "completed"


def finish(state: ServerState, draft: Draft, output: list[dict], choice: Choice, conversation: list[dict]) -> dict:
    """The finished response, stored with its conversation unless the request said store: false
    (or the client hung up before it finished)."""
    tokens = len(choice.tokens)
    response = draft.response(outcome(choice), output, {
        "input_tokens": draft.prompt_tokens, "input_tokens_details": {"cached_tokens": draft.request.cached},
        "output_tokens": tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": draft.prompt_tokens + tokens})
    if draft.body.store is not False and choice.finish_reason is not None:
        state.responses.put(response, conversation + output)
    return response


def message_item(item_id: str, text: str | None, status: str) -> dict:
    """A reply's text as a message item; `text` None: the item as it opens, with no part yet."""
    content = [] if text is None else [text_part(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: ToolCall, status: str) -> dict:
    item = {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": status}
    return {**item, "parse_error": call.error} if call.error else item


# ---- streaming -------------------------------------------------------------------------------------
class OutputEvents:
    """A streamed reply as OpenAI's typed events: the first text opens a message item (output 0),
    whose text goes out as deltas; at the end the message closes, and each call goes out as a
    function_call item with its arguments. `output` holds the finished items."""

    def __init__(self):
        self.sequence, self.output = 0, []
        self.message_id: str | None = None  # the open message item's
        self.text = ""

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def add_text(self, piece: str) -> list[str]:
        if not piece:
            return []
        events = self._open() if self.message_id is None else []
        self.text += piece
        return events + [self.event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                    content_index=0, delta=piece, logprobs=[])]

    def finish(self, rest: str, calls: list[ToolCall], status: str) -> list[str]:
        """The rest of the text, then the closing events; an empty reply is an empty message, as unstreamed."""
        events = self.add_text(rest) + (self._open() if self.message_id is None and not calls else [])
        if self.message_id is not None:
            item, at = message_item(self.message_id, self.text, status), dict(item_id=self.message_id, output_index=0,
                                                                            content_index=0)
            events += [self.event("response.output_text.done", **at, text=self.text, logprobs=[]),
                       self.event("response.content_part.done", **at, part=item["content"][0]),
                       self.event("response.output_item.done", output_index=0, item=item)]
            self.output.append(item)
        for call in calls:
            item, index = call_item(call, status), len(self.output)
            events += [self.event("response.output_item.added", output_index=index,
                                  item={**item, "arguments": "", "status": "in_progress"}),
                       self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                  delta=item["arguments"]),
                       self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  arguments=item["arguments"]),
                       self.event("response.output_item.done", output_index=index, item=item)]
            self.output.append(item)
        return events

    def _open(self) -> list[str]:
        self.message_id = new_id("msg")
        return [self.event("response.output_item.added", output_index=0,
                           item=message_item(self.message_id, None, "in_progress")),
                self.event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                           part=text_part(""))]


async def stream(events, state: ServerState, draft: Draft, chat_plan: ChatPlan, conversation: list[dict]):
    """The response as server-sent events; a failure after the stream began is an `error` event,
    which ends it (a shutdown's says "server shutting down")."""
    out, reply, choice = OutputEvents(), ReplyStream(chat_plan), Choice(0)
    try:
        yield out.event("response.created", response=draft.response("in_progress", []))
        yield out.event("response.in_progress", response=draft.response("in_progress", []))
        async for _, step in events:
            add_step(choice, step, state.tokenizer)
            for event in out.add_text(reply.add(step.text)):
                yield event
        for event in out.finish(*reply.finish(), outcome(choice)):
            yield event
        response = finish(state, draft, out.output, choice, conversation)
        yield out.event(f"response.{response['status']}", response=response)
    except APIError as e:
        error = e.body["error"]
        yield out.event("error", code=error["code"] or error["type"], message=error["message"], param=error["param"])
    except Exception as e:  # noqa: BLE001 - a fault mid-stream is reported in-band, then the stream ends
        yield out.event("error", code="server_error", message=f"generation failed: {e}", param=None)
