"""Ollama's API from the same engine: /api/chat, /api/generate, /api/embed (and the older
/api/embeddings), /api/pull and /api/version; the model listings /api/tags, /api/show and /api/ps
are in ollama_models.py. Tools that speak Ollama (its Python and JS clients, LangChain's
ChatOllama, Open WebUI, editor assistants) point at `http://HOST:PORT` instead of Ollama's :11434.

    curl http://127.0.0.1:8000/api/chat -d '{"model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Hi"}], "stream": false}'

Answers stream by default, as Ollama's do: newline-delimited JSON objects, the last with
`done: true`, `done_reason` and the token counts and durations (nanoseconds). Requests go through
the chat template, tool prompt and parsing, constrained decoding and image loading the OpenAI
routes use (openai_api.chat_prompt, chat_tools); only the shapes differ. Errors are Ollama's
`{"error": "..."}`: the app's handlers make them as for every route, and `OllamaErrors` reshapes
those on /api/ paths, so both APIs give the same statuses and messages.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Request

from plinth import hub
from plinth import tools as toolkit
from plinth.constrain import response_format_grammar
from plinth.errors import PlinthError
from plinth.generate import Step
from plinth.serve.chat_tools import ChatPlan, ReplyStream, split_calls
from plinth.serve.ollama_models import router as models_router
from plinth.serve.ollama_schemas import (ChatRequest, EmbeddingsRequest, EmbedRequest, Generation, GenerateRequest,
                                        Message, ModelRequest, parsed)
from plinth.serve.openai_api import CancellingStream, chat_prompt, embed, logprob_entry, server_state
from plinth.serve.schemas import MAX_EMBEDDING_INPUTS, APIError
from plinth.serve.state import ServerState
from plinth.vision.image_chat import split_images

# The Ollama release whose API these routes follow (structured outputs, tools in streams, /api/embed):
# clients that check /api/version before using a feature find it.
OLLAMA_VERSION = "0.9.0"
NDJSON = "application/x-ndjson"

router = APIRouter(prefix="/api")
router.include_router(models_router)


class OllamaErrors:
    """ASGI middleware: an error answer on an /api/ path, made in OpenAI's shape by the gate or the
    app's handlers like every other (401, 404, 405, 413, 400, 503, 500), reshaped to Ollama's
    `{"error": message}`, which its clients read. Other answers pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def reshape(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is complete: its length changes
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = ollama_error(b"".join(chunks))
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)


def ollama_error(body: bytes) -> bytes:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body  # not an error body of ours
    return json.dumps({"error": error["message"] if isinstance(error, dict) else error}).encode()


def now() -> str:
    """An answer's `created_at`: RFC 3339 in UTC, as Ollama writes it."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ---- generation ------------------------------------------------------------------------------------
@router.post("/chat")
async def chat(request: Request):
    started, state, body, model = await opened(request, ChatRequest)
    if not body.messages:  # Ollama's way to load a model: it is loaded already
        return {"model": model, "created_at": now(), "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": "load"}
    messages, images = split_images([m.as_template_input() for m in body.messages])
    prompt, chat_plan, pictures = await chat_prompt(
        state, messages, images, "messages", format_param="format",
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools or []],
        response_format=response_format(body.format))
    return await answer(state, request, body, Answer(model, prompt, started, state.tokenizer, chat_plan), pictures)


@router.post("/generate")
async def generate(request: Request):
    started, state, body, model = await opened(request, GenerateRequest)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model")
    if body.template:
        raise APIError(400, "template: Ollama's Go templates are not read here; the prompt goes through the model's "
                            "own chat template, or send raw: true with a prompt you have formatted yourself")
    if not body.prompt and not body.images:  # Ollama's way to load a model: it is loaded already
        return {"model": model, "created_at": now(), "response": "", "done": True, "done_reason": "load"}
    context = checked_context(state, body.context, body.images)
    if body.raw:
        if body.images or body.system:
            raise APIError(400, "a raw prompt is sent as it is: it takes no images or system; put them in the prompt "
                                "yourself, or leave raw out to have the chat template place them")
        try:
            grammar = response_format_grammar(response_format(body.format))
        except PlinthError as e:
            raise APIError(400, str(e), param="format") from e
        prompt, pictures = context + state.tokenizer.encode(body.prompt), None
        reply = Answer(model, prompt, started, state.tokenizer, ChatPlan(body.prompt, grammar), text=True)
    else:
        turns = [Message(role="system", content=body.system)] if body.system else []
        turns.append(Message(role="user", content=body.prompt, images=body.images))
        messages, images = split_images([m.as_template_input() for m in turns])
        prompt, chat_plan, pictures = await chat_prompt(state, messages, images, "prompt", format_param="format",
                                                        response_format=response_format(body.format))
        prompt = context + prompt
        reply = Answer(model, prompt, started, state.tokenizer, chat_plan, text=True, context=not images)
    return await answer(state, request, body, reply, pictures)


async def opened(request: Request, schema: type[Generation]) -> tuple[int, ServerState, Generation, str]:
    """What a generation route starts with: its start time, the server, the parsed body, the model it names."""
    started = time.monotonic_ns()
    state = server_state(request)
    body = await parsed(request, schema)
    return started, state, body, checked_model(state, body)


def checked_model(state: ServerState, body: Generation) -> str:
    """The model that answers, or a 4xx: another name with --strict-models (404, as Ollama's unknown
    model), an image generator, or thinking asked of a model that does not think (400, as Ollama)."""
    try:
        model = state.resolve_model(body.model)
    except APIError as e:
        raise APIError(404, f"model '{body.model}' not found; this server has: {', '.join(state.model_names())}") from e
    state.text_model()
    if body.think:
        raise APIError(400, f'"{model}" does not support thinking')
    return model


def response_format(format_: str | dict | None) -> dict | None:
    """Ollama's `format` ("json", or a JSON schema) as the response_format chat_tools.plan takes."""
    if format_ == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"schema": format_}} if isinstance(format_, dict) else None


def checked_context(state: ServerState, context: list[int] | None, images) -> list[int]:
    """/api/generate's `context`, a previous answer's token ids, checked against the vocabulary."""
    if not context:
        return []
    if images:
        raise APIError(400, "context and images together are not served: send the conversation to /api/chat")
    if not all(0 <= t < state.tokenizer.vocab_size for t in context):
        raise APIError(400, f"context holds token ids, each in [0, {state.tokenizer.vocab_size}): send back a "
                            "previous answer's context unchanged")
    return list(context)


async def answer(state: ServerState, request: Request, body: Generation, reply: "Answer", images):
    """Run the request and answer it: a stream of JSON lines, or one object with `stream: false`."""
    options = body.sampling_options
    limit = state.check_length(len(reply.prompt), options.token_limit(), "options.num_predict")
    params = options.sampling(limit, body.logprob_count(), state.sampling_defaults, state.default_seed(reply.prompt),
                              reply.plan.grammar)
    events, cancel, _ = state.run([(0, reply.prompt, params)], None if body.streams else request, reply.model, images)
    reply.submitted = time.monotonic_ns()
    if body.streams:
        return CancellingStream(lines(events, reply), cancel, media_type=NDJSON)
    try:
        async for _, step in events:
            reply.add(step)
    finally:
        cancel()
    return reply.final(streamed=False)


async def lines(events, reply: "Answer"):
    """The answer as Ollama streams it: an object per piece of text (and per tool call), then the final
    one; an error after the stream began is an `{"error"}` line, which Ollama's clients raise."""
    try:
        async for _, step in events:
            for chunk in reply.chunks(step):
                yield json.dumps(chunk) + "\n"
        yield json.dumps(reply.final(streamed=True)) + "\n"
    except APIError as e:
        yield json.dumps({"error": e.body["error"]["message"]}) + "\n"
    except Exception as e:  # noqa: BLE001 - a fault mid-stream is reported in-band, then the stream ends
        yield json.dumps({"error": f"generation failed: {e}"}) + "\n"


class Answer:
    """One answer as it is generated: its text, tokens, log-probabilities and timings, and the objects
    Ollama sends for it: chat's `message` (with `tool_calls` read as chat completions read them), or,
    with `text`, generate's `response` (and, with `context`, the token ids to continue from)."""

    def __init__(self, model: str, prompt: list[int], started: int, tokenizer, chat_plan: ChatPlan, text: bool = False,
                 context: bool = False):
        self.model, self.prompt, self.started, self.tokenizer = model, prompt, started, tokenizer
        self.plan, self.text_only, self.context = chat_plan, text, context
        self.stream = ReplyStream(chat_plan)
        self.pieces, self.tokens, self.logprobs = [], [], []
        self.shown = 0                                  # characters of the text streamed so far
        self.submitted = self.first = self.last = started  # monotonic ns: when it was queued, its first and last token
        self.done_reason = None

    def add(self, step: Step) -> list[dict]:
        """Take one generated token; returns its log-probability entry, if asked for, as a list."""
        self.last = time.monotonic_ns()
        if not self.tokens:
            self.first = self.last
        self.pieces.append(step.text)
        self.tokens.append(step.choice.token)
        entry = [logprob_entry(step, self.tokenizer)] if step.choice.logprob is not None else []
        self.logprobs += entry
        self.done_reason = step.finish_reason
        return entry

    def chunks(self, step: Step) -> list[dict]:
        """Take one generated token of a stream; returns the objects to send now (none while the text
        may be a tool call)."""
        entry = self.add(step)
        shown = self.stream.add(step.text)
        chunks = [self.chunk(shown, entry)] if shown or entry else []
        if step.finish_reason:
            rest, calls = self.stream.finish()
            calls = ollama_calls(calls)
            if calls is None:  # no calls, or calls that are not Ollama's: all the text is the answer
                rest = "".join(self.pieces)[self.shown:]
            chunks += [self.chunk(rest)] if rest else []
            chunks += [self.chunk("", calls=calls)] if calls else []
        return chunks

    def chunk(self, text: str, logprobs: list | None = None, calls: list | None = None) -> dict:
        self.shown += len(text)
        out = {"model": self.model, "created_at": now(), **self.body(text, calls), "done": False}
        return {**out, "logprobs": logprobs} if logprobs else out

    def body(self, text: str, calls: list | None = None) -> dict:
        if self.text_only:
            return {"response": text}
        message = {"role": "assistant", "content": text}
        return {"message": {**message, "tool_calls": calls} if calls else message}

    def final(self, streamed: bool) -> dict:
        """The last object: all the answer unless it was streamed, and the counts and durations."""
        if streamed:
            out = self.body("")
        else:
            text = "".join(self.pieces)
            content, calls = split_calls(text, self.plan)
            calls = ollama_calls(calls)
            out = self.body(content if calls else text, calls)
            out.update({"logprobs": self.logprobs} if self.logprobs else {})
        if self.context:
            out["context"] = self.prompt + self.tokens
        ended = time.monotonic_ns()
        return {"model": self.model, "created_at": now(), **out, "done": True, "done_reason": self.done_reason,
                "total_duration": ended - self.started, "load_duration": 0,  # loaded when the server started
                "prompt_eval_count": len(self.prompt), "prompt_eval_duration": self.first - self.submitted,
                "eval_count": len(self.tokens), "eval_duration": self.last - self.first}


def ollama_calls(calls: list[toolkit.ToolCall]) -> list[dict] | None:
    """Tool calls as Ollama gives them, arguments as a JSON object; None when there are none, or when
    one's arguments are not an object (a call cut short, say): the reply is then the text the model
    wrote, as Ollama leaves a call it cannot read."""
    converted = []
    for call in calls:
        arguments = toolkit.loads_or_text(call.arguments)
        if not isinstance(arguments, dict):
            return None
        converted.append({"function": {"name": call.name, "arguments": arguments}})
    return converted or None


# ---- embeddings ------------------------------------------------------------------------------------
@router.post("/embed")
async def embed_route(request: Request):
    started = time.monotonic_ns()
    state = server_state(request)
    body = await parsed(request, EmbedRequest)
    embedder = embedding_model(state, body.model)
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise APIError(400, f"this model's embeddings have {embedder.dimensions} dimensions; leave dimensions out")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"{len(texts)} inputs, max {MAX_EMBEDDING_INPUTS} per request; split them into smaller "
                            "batches")
    vectors, tokens = await embed(state, request, texts, truncate=body.truncate is not False)
    return {"model": embedder.name, "embeddings": [v.tolist() for v in vectors],
            "total_duration": time.monotonic_ns() - started, "load_duration": 0, "prompt_eval_count": tokens}


@router.post("/embeddings")
async def embeddings(request: Request):
    """The older route: one text, one vector (none for an empty prompt, as Ollama answers)."""
    state = server_state(request)
    body = await parsed(request, EmbeddingsRequest)
    embedding_model(state, body.model)
    if not body.prompt:
        return {"embedding": []}
    vectors, _ = await embed(state, request, [body.prompt])
    return {"embedding": vectors[0].tolist()}


def embedding_model(state: ServerState, requested: str):
    try:
        return state.embedding_model(requested)
    except APIError as e:  # in Ollama's words for a model it does not have
        served = (f"embeddings come from '{state.embedder.name}'" if state.embedder else
                  "this server has no embedding model; start it with --embedding-model")
        raise APIError(404, f"model '{requested}' not found: {served}") from e


# ---- the rest --------------------------------------------------------------------------------------
@router.post("/pull")
async def pull(request: Request):
    """Models are not downloaded over this API: a served one is there already; any other is
    installed on the server machine."""
    state = server_state(request)
    body = await parsed(request, ModelRequest)
    if body.model in state.model_names():
        return {"status": "success"}
    install = (f"`plinth pull {body.model}`" if body.model in hub.KNOWN_MODELS else
               f"`plinth pull NAME` (known names: {', '.join(hub.KNOWN_MODELS)}) or by copying a .gguf file or model "
               "folder there")
    raise APIError(400, f"this server does not download models over its API; it serves "
                        f"{', '.join(state.model_names())}. Models are installed on the server machine, with "
                        f"{install}, and served by restarting `plinth serve MODEL` there")


@router.get("/version")
async def version():
    return {"version": OLLAMA_VERSION}
