"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings
(an image generator's /v1/images/generations is in images_api.py).

Handlers turn a request into token ids and `SamplingParams`, submit one engine request per choice,
and relay the engine's `Step`s as a JSON response or as server-sent events. They never touch the
model: the engine thread owns it.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from plinth.errors import PlinthError
from plinth.engine import ImageInput
from plinth.generate import Step
from plinth.serve.chat_tools import CallDeltas, ChatPlan, plan, reply_message
from plinth.serve.echo import check_scoring_budget, echo_response, nothing_generated
from plinth.serve.retrieval import add_sources
from plinth.serve.openapi import ChatCompletion, Completion, EmbeddingList, ModelList, error_responses
from plinth.serve.schemas import (MAX_EMBEDDING_INPUTS, APIError, ChatCompletionRequest, CompletionRequest,
                                  EmbeddingRequest, error_body)
from plinth.serve.state import ServerState
from plinth.vision.image_chat import image_prompt, split_images

router = APIRouter()


def streamed(model, chunk: str) -> dict:
    """The 200 of a route that streams when asked: `model` as JSON, or server-sent events, each
    described as a parsed event (`data`, and the default `event` name), as SSE-aware tools read them."""
    event = {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string", "enum": ["message"]},
        "data": {"type": "string", "description": f"A {chunk} as JSON, an error object if generation fails after "
                                                  "the stream began, then [DONE]"}}}
    return {200: {"model": model, "content": {"text/event-stream": {"schema": event}}}}


@dataclass
class Choice:
    """What one choice has produced so far."""
    index: int
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # character offset of each token's text
    finish_reason: str | None = None


def server_state(request: Request) -> ServerState:
    return request.app.state.plinth  # put there by create_app


# ---- models ----------------------------------------------------------------------------------------
@router.get("/v1/models", responses={200: {"model": ModelList}, **error_responses(401, 413, 503)})
async def list_models(request: Request):
    state = server_state(request)
    # only the served model itself reads images or draws them; its adapters write text, the embedder embeds
    reads = ["text", "image"] if state.engine.vision is not None else ["text"]
    makes = ["image"] if state.generator is not None else ["text"]
    embedder = state.embedder.name if state.embedder else None

    def entry(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.started, "owned_by": "plinth",
                "input_modalities": reads if name == state.name else ["text"],
                "output_modalities": makes if name == state.name else ["embeddings"] if name == embedder else ["text"]}

    return {"object": "list", "data": [entry(name) for name in state.model_names()]}


# ---- generation ------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", responses={**streamed(ChatCompletion, "chat.completion.chunk"),
                                                       **error_responses(400, 401, 404, 413, 429, 503)})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = server_state(request)
    model = state.resolve_model(body.model)
    state.text_model()
    try:
        messages, images = split_images([m.as_template_input() for m in body.messages])
    except PlinthError as e:
        raise APIError(400, str(e), param="messages") from e
    sources = None
    if body.retrieval is not None:
        try:
            messages, sources = await add_sources(state, body.retrieval, messages,
                                                  body.token_limit() or min(512, state.engine.max_len // 4))
        except PlinthError as e:
            raise APIError(400, str(e), param="retrieval") from e
    prompt, chat_plan, pictures = await chat_prompt(state, messages, images, "messages", **body.plan_options())
    return await respond(state, request, body, model, [prompt], chat_plan, sources, pictures)


async def chat_prompt(state: ServerState, messages: list[dict], images: list, param: str,
                      format_param: str = "response_format", **options
                      ) -> tuple[list[int], ChatPlan, ImageInput | None]:
    """A conversation's prompt ids, plan (chat_tools.plan of the `options`) and images, for chat
    completions and the Responses API alike; a bad value is a 400 naming its field: the tools',
    `format_param` for response_format's, else `param`, the conversation's."""
    try:
        chat_plan = plan(state.tokenizer, messages, **options)
    except PlinthError as e:
        field = getattr(e, "param", param)
        raise APIError(400, str(e), param=format_param if field == "response_format" else field,
                       code=getattr(e, "code", None)) from e
    try:  # an image may be fetched over the network: off the event loop
        prompt, pictures = await asyncio.to_thread(image_prompt, state.tokenizer, state.engine.vision,
                                                   chat_plan.prompt, images, state.image_limits)
    except PlinthError as e:
        raise APIError(400, str(e), param=param) from e
    return prompt, chat_plan, pictures


@router.post("/v1/completions", responses={**streamed(Completion, "text_completion"),
                                                  **error_responses(400, 401, 404, 413, 429, 503)})
async def completions(body: CompletionRequest, request: Request):
    state = server_state(request)
    model = state.resolve_model(body.model)
    state.text_model()
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model", param="suffix")
    if body.echo and body.stream:
        raise APIError(400, "echo is not supported with stream; request without streaming", param="echo")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens: 0 generates nothing; it is only useful with echo", param="max_tokens")
    prompts = [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
    for ids in prompts:
        if any(not 0 <= t < state.tokenizer.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {state.tokenizer.vocab_size})", param="prompt")
    if body.echo and body.logprobs is not None:
        check_scoring_budget(prompts)
    if body.echo and body.max_tokens == 0:  # score the prompt, generate nothing
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty; give at least one token of text", param="prompt")
            state.check_length(len(ids), None)
        nothing = nothing_generated(model, prompts, body.n, body.logprobs is not None)
        return await echo_response(state, body, prompts, nothing, request)
    response = await respond(state, request, body, model, prompts)
    return await echo_response(state, body, prompts, response, request) if body.echo else response


async def respond(state: ServerState, request: Request, body: ChatCompletionRequest | CompletionRequest, model: str,
                  prompts: list[list[int]], chat_plan: ChatPlan | None = None, sources: list[dict] | None = None,
                  images: ImageInput | None = None):
    """Run a request and answer it; `chat_plan` for chat completions (None: text completions).
    `sources`, from retrieval, go in the body's `sources` field, or in a stream's first chunk;
    `images`, an image+text chat's, go with its prompt (whose image tokens count as prompt tokens)."""
    chat = chat_plan is not None
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    jobs = []  # (choice index, prompt, params)
    for p, prompt in enumerate(prompts):
        limit = state.check_length(len(prompt), body.token_limit())
        for i in range(body.n):
            params = body.sampling(limit, body.logprob_count(), i, state.sampling_defaults, state.default_seed(prompt),
                                   chat_plan.grammar if chat_plan else None)
            jobs.append((p * body.n + i, prompt, params))
    kind = "chat.completion" if chat else "text_completion"
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    events, cancel, submitted = state.run(jobs, request if not body.stream else None, model, images)
    prompt_tokens = PromptTokens(sum(len(p) for p in prompts), submitted[::body.n])  # a prompt's n choices share it
    cited = {"sources": sources} if sources is not None else {}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return CancellingStream(stream(events, state, model, kind, response_id, created, chat_plan, prompt_tokens,
                                       include_usage, len(jobs), cited), cancel)
    choices = {index: Choice(index) for index, _, _ in jobs}
    try:
        async for index, step in events:
            add_step(choices[index], step, state.tokenizer)
    finally:
        cancel()
    return {"id": response_id, "object": kind, "created": created, "model": model, "system_fingerprint": None,
            "choices": [choice_body(c, chat_plan) for c in choices.values()],
            "usage": prompt_tokens.usage(choices.values()), **cited}


class CancellingStream(StreamingResponse):
    """A stream (server-sent events, or Ollama's JSON lines) that cancels its engine requests when
    the response ends for any reason, including a client that hangs up before the first event."""

    def __init__(self, content, cancel, media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type)
        self.cancel = cancel

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel()


def add_step(choice: Choice, step: Step, tokenizer):
    choice.offsets.append(sum(len(t) for t in choice.text))  # where this token's text starts
    choice.text.append(step.text)
    choice.tokens.append(step.choice.token)
    choice.finish_reason = step.finish_reason
    if step.choice.logprob is not None:
        choice.logprobs.append(logprob_entry(step, tokenizer))


def logprob_entry(step: Step, tokenizer) -> dict:
    def entry(token, logprob):
        return {"token": tokenizer.token_text(token), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}
    return {**entry(step.choice.token, step.choice.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in step.choice.top or []]}


def completion_logprobs(entries: list[dict], offsets: list[int]) -> dict:
    """The legacy completions shape: parallel lists instead of one list of entries."""
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def choice_body(c: Choice, chat_plan: ChatPlan | None) -> dict:
    text = "".join(c.text)
    if chat_plan:
        logprobs = {"content": c.logprobs} if c.logprobs else None
        message, finish_reason = reply_message(text, c.finish_reason, chat_plan)
        return {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    logprobs = completion_logprobs(c.logprobs, c.offsets) if c.logprobs else None
    return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}


@dataclass
class PromptTokens:
    """A response's prompt tokens, and the engine requests (one per prompt) that say how many of
    them came from the prefix cache, which is known once they have started."""
    count: int
    requests: list

    def usage(self, choices) -> dict:
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": self.count, "completion_tokens": completion, "total_tokens": self.count + completion,
                "prompt_tokens_details": {"cached_tokens": sum(r.cached for r in self.requests)}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream(events, state: ServerState, model, kind, response_id, created, chat_plan, prompt_tokens, include_usage,
                 n_choices, cited: dict):
    """The response as server-sent events; `cited` ({"sources": ...} or {}) goes in the first chunk."""
    chat = chat_plan is not None
    kind += ".chunk" if chat else ""
    choices: dict[int, Choice] = {}
    deltas = {index: CallDeltas(chat_plan) for index in range(n_choices)} if chat else {}
    extra = {"usage": None} if include_usage else {}

    def chunk(choice_list, **fields):
        return sse({"id": response_id, "object": kind, "created": created, "model": model,
                    "system_fingerprint": None, "choices": choice_list, **extra, **fields})

    try:
        if chat:  # OpenAI opens every choice with the role; the sources come before any token
            for index in range(n_choices):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}], **(cited if index == 0 else {}))
        async for index, step in events:
            c = choices.setdefault(index, Choice(index))
            add_step(c, step, state.tokenizer)
            if not step.text and not step.finish_reason and step.choice.logprob is None:
                continue  # nothing to show yet (half a character, or text that may be a stop string)
            entry = [c.logprobs[-1]] if step.choice.logprob is not None else None
            if chat:
                pieces, finish_reason = deltas[index].add(step.text, step.finish_reason)
                if not pieces and not finish_reason and not entry:
                    continue  # text held back while it may be a tool call
                for delta in pieces[:-1]:
                    yield chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])
                yield chunk([{"index": index, "delta": pieces[-1] if pieces else {},
                              "logprobs": {"content": entry} if entry else None, "finish_reason": finish_reason}])
            else:
                logprobs = completion_logprobs(entry, c.offsets[-1:]) if entry else None
                yield chunk([{"index": index, "text": step.text, "logprobs": logprobs,
                              "finish_reason": step.finish_reason}])
        if include_usage:
            extra = {"usage": prompt_tokens.usage(choices.values())}
            yield chunk([])
        yield sse("[DONE]")
    except APIError as e:  # the response has started: the error goes in the stream
        yield sse(e.body)
    except Exception as e:  # noqa: BLE001 - a fault mid-stream is reported in-band, then the stream ends
        yield sse(error_body(f"generation failed: {e}", "server_error"))


# ---- embeddings ------------------------------------------------------------------------------------
MAX_INPUT_TOKENS = 300_000  # tokens per embeddings request, as OpenAI allows: clients size batches by these
TASK_CHARS = 65_536       # characters tokenized per engine task (a longer single input goes alone)
TASK_TOKENS = 1024        # tokens embedded per engine task...
TASK_INPUTS = 32          # ...and inputs: a forward pass per input, whose fixed cost dominates short inputs


@router.post("/v1/embeddings", responses={200: {"model": EmbeddingList}, **error_responses(400, 401, 404, 413, 503)})
async def embeddings(body: EmbeddingRequest, request: Request):
    state = server_state(request)
    embedder = state.embedding_model(body.model)
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise APIError(400, f"this model's embeddings have {embedder.dimensions} dimensions", param="dimensions")
    texts, ids = embedding_inputs(body, embedder)
    vectors, tokens = await embed(state, request, texts, ids)
    if body.encoding_format == "base64":  # what the official client asks for: little-endian float32 bytes
        encoded = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
    else:
        encoded = [v.tolist() for v in vectors]
    return JSONResponse({"object": "list", "model": state.embedder.name,
                         "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(encoded)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def embed(state: ServerState, request: Request, texts: list[str] | None, ids: list[list[int]] | None = None,
                truncate: bool = True) -> tuple[list, int]:
    """Unit vectors of `texts` (or of token `ids`) and how many tokens they are, as engine tasks; a
    400 over MAX_INPUT_TOKENS. A text over the model's limit is cut to it, or with `truncate` false
    refused with a 400."""
    embedder = state.embedder
    if ids is None:  # tokenizing is work too (seconds for megabytes of text): engine tasks, off the event loop
        ids = await state.in_steps(lambda group: embedder.encode(group, truncate), texts, len, TASK_CHARS, request)
    tokens = sum(len(row) for row in ids)
    if tokens > MAX_INPUT_TOKENS:
        raise APIError(400, f"Requested {tokens} tokens, max {MAX_INPUT_TOKENS} tokens per request: send fewer or "
                            "shorter inputs", param="input")
    vectors = await state.in_steps(embedder.embed_ids, ids, len, TASK_TOKENS, request, most=TASK_INPUTS)
    return vectors, tokens


def embedding_inputs(body: EmbeddingRequest, embedder) -> tuple[list[str] | None, list[list[int]] | None]:
    """The request's texts, or its token ids (the embedding model's own, cut to its limit as texts
    are), or a 400 naming `input`."""
    given = body.input
    inputs = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else given
    if not inputs:
        raise APIError(400, "input must be a non-empty string, list of strings or list of token ids", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"'$.input' is invalid: {len(inputs)} inputs, max {MAX_EMBEDDING_INPUTS} per request; "
                            "split them into smaller batches", param="input")
    if isinstance(inputs[0], str):
        return inputs, None
    if not all(row and all(0 <= t < embedder.vocab_size for t in row) for row in inputs):
        raise APIError(400, f"token id inputs must be non-empty lists of ids in [0, {embedder.vocab_size})",
                       param="input")
    return None, [row[:embedder.max_tokens] for row in inputs]
