"""What every route of the server shares, as one typed object: the engine and tokenizer (or the
image generator served instead of a language model), the names served (model, LoRA adapters,
embedder), the retrieval indexes, the server's options, its metrics, and the drain flag and
in-flight count that a graceful shutdown waits on (then `abort_in_flight`).

`create_app(state)` puts it on the app; routes read it back with `request.app.state.plinth`. Its
methods are the checks and the engine calls that every generation route makes the same way:
`resolve_model`, `default_seed`, `check_length` and `run`; `in_steps` runs other long model work
(embeddings, echo scoring, image generation) as small engine tasks. `text_model` and
`image_generator` answer a route the served model cannot take with a 400 saying which it can, and
`embedding_model` an embeddings route with a 404 when no embedder answers the name.
"""
from __future__ import annotations

import asyncio
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from fastapi import Request

from plinth import hub
from plinth.engine import Engine, EngineDown, QueueFull
from plinth.errors import PlinthError
from plinth.retrieval.embedder import Embedder
from plinth.retrieval.index import Index
from plinth.serve.metrics import Metrics
from plinth.serve.response_store import ResponseStore
from plinth.serve.schemas import APIError
from plinth.tokenizer import Tokenizer
from plinth.vision.image_sources import ImageLimits
from plinth.vision.imagine import ImageGenerator


@dataclass(eq=False)
class ServerState:
    """What the routes share: the engine, the names served, and the server's options."""
    engine: Engine
    tokenizer: Tokenizer | None                 # None when an image generator is served
    name: str                                   # the served model, as requests name it
    strict_models: bool = False                 # refuse a request naming another model (else it is served anyway)
    api_key: str | None = None                  # the Bearer token /v1/ and /api/ routes require, if any
    embedder: Embedder | None = None            # answers /v1/embeddings and searches the indexes
    seed: int | None = None                     # seeds requests that give none (see default_seed)
    indexes: dict[str, Index] = field(default_factory=dict)  # name → retrieval Index that chat requests may name
    adapters: dict[str, int] = field(default_factory=dict)   # served LoRA adapter name → engine adapter id
    image_limits: ImageLimits = field(default_factory=ImageLimits)  # what an image part may be (no local files)
    generator: ImageGenerator | None = None     # the served image generator (on a tasks-only engine), if any
    responses: ResponseStore = field(default_factory=ResponseStore)  # the Responses API's stored responses
    started: int = field(init=False)            # Unix time, the `created` of /v1/models
    sampling_defaults: dict = field(init=False)  # the model's recommended sampling, under the request's own
    metrics: Metrics = field(init=False)
    draining: bool = field(init=False, default=False)  # shutting down: new requests get 503
    in_flight: int = field(init=False, default=0)      # requests being answered, which draining waits for

    def __post_init__(self):
        self.started = int(time.time())
        self.sampling_defaults = hub.sampling_defaults(self.name)
        self.metrics = Metrics(self.engine)

    def model_names(self) -> list[str]:
        return [self.name, *self.adapters] + ([self.embedder.name] if self.embedder else [])

    def resolve_model(self, requested: str) -> str:
        """The model that answers: the requested one, or (unless --strict-models) the served one."""
        if requested in self.adapters:
            return requested
        if requested == self.name or not self.strict_models:
            return self.name
        raise APIError(404, f"The model '{requested}' does not exist; this server has: {', '.join(self.model_names())}",
                       param="model", code="model_not_found")

    def embedding_model(self, requested: str) -> Embedder:
        """The embedder that answers a request naming `requested`, or a 404 (no embedder served, or
        another name with --strict-models)."""
        if self.embedder is None:
            raise APIError(404, "this server has no embedding model; start it with --embedding-model", param="model",
                           code="model_not_found")
        if self.strict_models and requested != self.embedder.name:
            raise APIError(404, f"The model '{requested}' does not exist; embeddings come from '{self.embedder.name}'",
                           param="model", code="model_not_found")
        return self.embedder

    def text_model(self):
        """A 400 for the text routes when the served model draws images."""
        if self.generator is not None:
            raise APIError(400, f"the model {self.name} generates images and does not write text; use "
                                "/v1/images/generations", param="model")

    def image_generator(self) -> ImageGenerator:
        """The served image generator, or a 400 when the served model writes text."""
        if self.generator is None:
            raise APIError(400, f"the model {self.name} does not generate images: it writes text (use "
                                "/v1/chat/completions); serve an image generator for /v1/images/generations, e.g. "
                                "plinth serve runs/dit-fashion/final", param="model")
        return self.generator

    def default_seed(self, prompt: list[int] | str) -> int | None:
        """With --seed, a request that sets no seed is seeded from the server's seed and its prompt
        (token ids, or an image prompt's text), so the same request always gets the same answer
        (reproducible deployments and tests)."""
        if self.seed is None:
            return None
        return (self.seed + zlib.crc32(json.dumps(prompt).encode())) % 2**31

    def check_length(self, prompt_tokens: int, max_tokens: int | None, param: str = "max_tokens") -> int:
        """The completion's token limit, or a 400 naming both numbers when it cannot fit; `param`
        is the request's field for the limit."""
        window = self.engine.max_len
        wanted = prompt_tokens + (max_tokens or 1)
        if wanted > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                                f"{wanted} tokens ({prompt_tokens} in the prompt, {max_tokens or 1} for the completion). "
                                f"Please reduce the prompt or {param}.", param=param, code="context_length_exceeded")
        return max_tokens or window - prompt_tokens

    def run(self, jobs, http_request: Request | None = None, model: str | None = None, images=None):
        """Submit one engine request per job now (so errors come before any response); `images`, an
        image+text request's (plinth.engine.ImageInput), go with each. Returns an
        async iterator of (choice index, Step), a function that cancels whatever is unfinished (call
        it when the response ends, however it ends: a stream may never start iterating), and the
        engine requests, one per job (their `cached` prompt tokens go in usage)."""
        if len(jobs) > self.engine.max_queue:
            raise APIError(400, f"this request asks for {len(jobs)} completions (prompts × n); this server "
                                f"queues at most {self.engine.max_queue}: send fewer", param="n")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        adapter = self.adapters.get(model, 0)

        def emit_to(index):  # called on the engine thread: hand the event over to this event loop
            return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        try:  # nothing of a request runs unless all of it is accepted
            submitted = self.engine.submit_all([(prompt, params, emit_to(index), adapter, images)
                                                for index, prompt, params in jobs])
        except PlinthError as e:
            if isinstance(e, QueueFull):
                raise APIError(429, f"server busy: {e}", type_="rate_limit_error", headers={"Retry-After": "1"}) from e
            if isinstance(e, EngineDown):
                raise APIError(503, str(e), type_="server_error") from e
            raise APIError(400, str(e)) from e
        return self._events(queue, submitted, http_request), lambda: self._cancel(submitted), submitted

    async def _events(self, queue: asyncio.Queue, requests, http_request):
        remaining, started, last = len(requests), time.monotonic(), {}
        checked = started
        try:
            while remaining:
                try:
                    index, event = await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if not self.engine.thread_alive():
                        raise APIError(503, "the engine thread has stopped", type_="server_error")
                    index = event = None
                now = time.monotonic()
                if http_request is not None and now - checked > 0.25:  # non-streamed: watch for a hang-up
                    checked = now
                    if await http_request.is_disconnected():
                        return
                if event is None:
                    continue
                if isinstance(event, Exception):
                    raise event
                self.metrics.token_latency(now - last.get(index, started), first=index not in last)
                last[index] = now
                if event.finish_reason:
                    remaining -= 1
                yield index, event
        finally:
            self._cancel(requests)

    async def in_steps(self, fn: Callable, items: list, size: Callable, budget: int,
                       http_request: Request | None = None, most: int | None = None) -> list:
        """`fn(group)` for consecutive groups of `items` (see `groups`), each a separate engine task,
        and their results concatenated. Between tasks the engine runs a decoding step and its
        heartbeat advances, so long work neither stalls the streams being decoded nor reads as a
        stalled engine on /health; a client that hangs up stops the work at the next group (499)."""
        results = []
        for group in groups(items, size, budget, most):
            if http_request is not None and await http_request.is_disconnected():
                raise APIError(499, "the client closed the request")
            results.extend(await asyncio.wrap_future(self.engine.call(fn, group)))
        return results

    def abort_in_flight(self):
        """End every engine request still running, when the shutdown grace is over: a stream's last
        event, or a non-streamed request's 503, says 'server shutting down' (the stream code sends an
        APIError as it is), so the client knows to retry elsewhere instead of seeing a cut connection."""
        self.engine.abort_all(APIError(503, "server shutting down", type_="server_error", headers={"Retry-After": "5"}))

    def _cancel(self, requests):
        for r in requests:
            if r.seq.finish_reason is None:
                self.engine.cancel(r)


def groups(items: list, size: Callable, budget: int, most: int | None = None) -> Iterator[list]:
    """Consecutive items in groups whose `size`s add up to at most `budget` (an item bigger than
    that goes alone) and of at most `most` items."""
    group, total = [], 0
    for item in items:
        if group and (total + size(item) > budget or len(group) == most):
            yield group
            group, total = [], 0
        group.append(item)
        total += size(item)
    if group:
        yield group
