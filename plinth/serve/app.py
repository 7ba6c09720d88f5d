"""The HTTP server: FastAPI app around the engine, with auth, limits, metrics, health and a chat page.

    plinth serve                                  # default model on http://127.0.0.1:8000
    plinth serve --api-key secret --port 9000
    plinth serve runs/dit-fashion/final           # an image generator: /v1/images/generations

HTTP handlers only queue work and await the engine's output; the engine thread owns the model.
Every error is OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status for
anything the client did, so the official client does not retry a bad request as if it were a fault;
on Ollama's /api/ routes the same error is Ollama's `{"error": message}` (ollama_api.OllamaErrors).
"""
from __future__ import annotations

import copy
import hmac
import os
import sys
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from plinth import compiled_decode, hub
from plinth.errors import PlinthError
from plinth.engine import Engine
from plinth.heap import freed_memory_returned
from plinth.serve.background_build import BackgroundBuild
from plinth.serve.images_api import router as images_router
from plinth.serve.ollama_api import OllamaErrors
from plinth.serve.ollama_api import router as ollama_router
from plinth.serve.openai_api import router
from plinth.serve.responses import router as responses_router
from plinth.serve.retrieval import load_indexes
from plinth.serve.openapi import ErrorResponse, Health, HealthError, describe_served, error_responses
from plinth.serve.schemas import APIError, error_body
from plinth.serve.state import ServerState

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 8 * 1024 * 1024
LAST_WRITE_SECONDS = 3.0  # how long shutdown waits for responses to finish once their requests were ended


class PrometheusText(PlainTextResponse):
    """/metrics: Prometheus' text exposition format, which its scrapers recognise by this version."""
    media_type = "text/plain; version=0.0.4"


class Gate:
    """ASGI middleware in front of every route: draining, API key, body size, request metrics."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, path = self.state, scope["path"]
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in scope["headers"]}
        if state.draining:
            return await reply(send, 503, error_body("the server is shutting down; retry on another instance",
                                                     "server_error"), {"Retry-After": "5"})
        given, wanted = headers.get("authorization", "").encode(), f"Bearer {state.api_key}".encode()
        if path.startswith(("/v1/", "/api/")) and state.api_key and not hmac.compare_digest(given, wanted):
            return await reply(send, 401, error_body("Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                                     code="invalid_api_key"))
        if int(headers.get("content-length", "0") or 0) > MAX_BODY_BYTES:
            return await reply(send, 413, error_body(f"request body is over {MAX_BODY_BYTES} bytes"))
        status, received = {}, [0]

        async def send_and_count(message):
            if status.get("code") == 413:  # already answered from receive_within_limit
                return
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def receive_within_limit():  # a chunked body has no content-length to check up front
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > MAX_BODY_BYTES and "code" not in status:
                await reply(send, 413, error_body(f"request body is over {MAX_BODY_BYTES} bytes"))
                status["code"] = 413
                return {"type": "http.disconnect"}  # the route stops reading and its reply is dropped
            return message

        state.in_flight += 1
        try:
            await self.app(scope, receive_within_limit, send_and_count)
        finally:
            state.in_flight -= 1
            state.metrics.request(path, status.get("code", 499))


async def reply(send, status: int, body: dict, headers: dict | None = None):
    response = JSONResponse(body, status_code=status, headers=headers)
    await response({"type": "http"}, None, send)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The message and param of the most specific error: of a union's members (content as text or
    as parts), the one that got furthest into the request says what is wrong."""
    errors = exc.errors()
    if errors[0].get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    paths = [error_path(error, exc.body) for error in errors]
    deepest = max(range(len(errors)), key=lambda i: len(paths[i]))  # the first of the deepest
    error, param = errors[deepest], ".".join(map(str, paths[deepest])) or None
    given = error.get("input")
    got = f" (got {given!r})" if isinstance(given, (str, int, float)) and len(repr(given)) <= 80 else ""
    return (f"invalid value for '{param}': {error.get('msg')}{got}" if param else
            f"invalid request: {error.get('msg')}{got}"), param


def error_path(error: dict, body) -> list:
    loc = list(error.get("loc", ()))
    return request_path(loc[1:] if loc[:1] == ["body"] else loc, body, error.get("type") == "missing")


def request_path(loc: list, body, missing: bool) -> list:
    """The part of pydantic's error location that is a path in the request: without the names of
    the union members it tried (e.g. `prompt.str` is `prompt`), plus the key of a missing field."""
    path, node = [], body
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) \
                and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and missing and i == len(loc) - 1:
            path.append(part)
    return path


def create_app(state: ServerState) -> OllamaErrors:
    app = FastAPI(title="plinth", docs_url=None, redoc_url=None)
    app.state.plinth = state
    app.include_router(router)
    app.include_router(images_router)
    # Ollama's API is described by Ollama's reference, not by this OpenAI-style document (its clients
    # read no OpenAPI), and its errors have Ollama's shape (OllamaErrors)
    app.include_router(ollama_router, include_in_schema=False)
    app.include_router(responses_router)
    generated = app.openapi

    def openapi():  # FastAPI's document, with what only the served models tell
        if app.openapi_schema is None:
            app.openapi_schema = describe_served(copy.deepcopy(generated()),
                                                 state.tokenizer.vocab_size if state.tokenizer else None,
                                                 state.embedder, state.indexes, bool(state.api_key),
                                                 state.engine.vision is not None,
                                                 state.generator.size if state.generator else None)
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        message, param = validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), param=None, code=code), status_code=exc.status_code,
                            headers=exc.headers)  # e.g. a 405's Allow, which names the methods the route takes

    @app.exception_handler(PlinthError)
    async def plinth_error(_, exc: PlinthError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(Exception)
    async def fault(_, exc: Exception):
        # Starlette re-raises after sending this, and uvicorn then closes the connection: say so, or a
        # client's next request on its pooled keep-alive connection fails.
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500,
                            headers={"Connection": "close"})

    @app.get("/health", responses={200: {"model": Health}, **error_responses(413), 503: {
        "model": HealthError | ErrorResponse, "description": "The engine thread is stalled or has stopped "
                                                            "(HealthError), or the server is shutting down"}})
    async def health():
        if state.engine.alive():
            return {"status": "ok", "running": len(state.engine.running), "waiting": state.engine.queue_depth}
        return JSONResponse({"status": "error", "message": "the engine thread is stalled or has stopped"},
                            status_code=503)

    @app.get("/metrics", response_class=PrometheusText, responses=error_responses(413, 503, json_route=False))
    async def metrics():
        return PrometheusText(state.metrics.render())

    @app.get("/", response_class=HTMLResponse, responses=error_responses(413, 503, json_route=False))
    async def chat_page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the chat page's scripts and styles

    return OllamaErrors(Gate(app, state))


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new requests with 503, let in-flight ones finish for up to `grace`
    seconds, then end those still running with a final "server shutting down" error and exit. A
    second signal ends them and exits at once.

    uvicorn alone would wait for open connections without limit, so a stream of thousands of tokens
    would outlive any grace an orchestrator gives before its SIGKILL."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float, on_exit=lambda: None):
        # After the abort, responses only have their last event to write; a client that does not
        # read it must not hold the exit, so uvicorn stops waiting for connections after this.
        config.timeout_graceful_shutdown = LAST_WRITE_SECONDS
        super().__init__(config)
        self.state, self.grace = state, grace
        # Called once the requests are ended: uvicorn then raises the signal again to exit by it,
        # so code after `run()` never runs after a signal.
        self.on_exit = on_exit

    def handle_exit(self, sig, frame):
        if self.state.draining:  # the second signal: _drain stops waiting, and nothing else waits
            self.force_exit = True
            return
        self.state.draining = True
        # A thread, because this runs in a signal handler on the event loop's thread, which must go on
        # serving the in-flight requests meanwhile.
        threading.Thread(target=self._drain, args=(sig, frame), daemon=True).start()

    def _drain(self, sig, frame):
        deadline = time.monotonic() + self.grace
        while self.state.in_flight and time.monotonic() < deadline and not self.force_exit:
            time.sleep(0.05)
        self.state.abort_in_flight()  # before uvicorn's shutdown, so streams still write their last event
        self.on_exit()
        super().handle_exit(sig, frame)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          strict_models: bool = False, max_batch: int = 16, max_len: int | None = None, grace: float = 30.0,
          embedding_model: str = "auto", dtype: str | None = None, seed: int | None = None,
          threads: int | None = None, indexes: dict[str, str] | None = None, adapters: dict[str, str] | None = None,
          prefix_cache: bool = True, compile: bool | None = None):
    """compile: True, decode through compiled programs, compiled first where not kept (minutes);
    False, eagerly; None, through kept programs, or eagerly while they are built in the background
    (plinth/serve/background_build.py), unless $PLINTH_COMPILE is 0."""
    import torch

    import plinth
    from plinth.adapt.multi_lora import serve_adapters
    from plinth.retrieval.embedder import Embedder
    # All model compute runs on the engine thread, with its own OpenMP team of `threads`. Loading
    # on all cores here would give this thread a second team: libgomp then counts more threads
    # than cores and stops its workers spin-waiting between parallel regions, so every decoding
    # step waits for sleeping workers to wake. Loading is no slower on one thread.
    torch.set_num_threads(1)
    freed_memory_returned()
    if embedding_model == "auto":
        embedding_model = hub.DEFAULT_EMBEDDER if hub.known_path(hub.DEFAULT_EMBEDDER) else "none"
    embedder = Embedder.load(embedding_model) if embedding_model != "none" else None
    served_indexes = load_indexes(indexes or {}, embedder)  # before the model: a bad --index fails fast
    loaded = plinth.load(model, dtype=dtype)
    generator = loaded.generator
    if generator is not None and (adapters or indexes or compile):
        raise PlinthError(f"{model} generates images: --adapter, --index and --compile are for language models (an "
                          "adapter changes one, an index adds passages to chats, --compile speeds up its decoding); "
                          "leave them out")
    adapter_ids = serve_adapters(loaded.model, adapters) if adapters else {}
    # an image generator draws as tasks on the engine thread, which has no language model to batch
    engine = Engine.tasks_only(threads) if generator is not None else Engine(
        loaded.model, loaded.tokenizer, max_batch=max_batch, max_len=max_len, threads=threads, vision=loaded.vision,
        prefix_cache=prefix_cache, compile=compile)
    engine.start()
    build = None
    if compile is None and adapters:
        print("plinth: decoding eagerly: with --adapter the model's layers change, and `plinth compile` builds "
              "programs for the model alone (--compile builds them for this one at start)", flush=True)
    elif generator is None and (compile or (compile is None and compiled_decode.compile_by_default())):
        if compile:
            print("plinth: compiling the decoding step and the verify pass (a few minutes the first time for a "
                  "model, a second after)", flush=True)
        try:
            compiled = engine.call(lambda: engine.use_compiled(build=bool(compile))).result()
        except PlinthError:
            raise
        except Exception as e:  # a kept program that does not load: serving goes on eagerly
            if compile:
                raise PlinthError(f"the compiled decoding programs do not load ({e}); remove "
                                  f"{compiled_decode.PROGRAM_CACHE} to build them again") from e
            print(f"plinth: the compiled decoding programs kept in {compiled_decode.PROGRAM_CACHE} do not load ({e}); "
                  "decoding eagerly (remove the folder to build them again)", file=sys.stderr, flush=True)
            compiled = True  # nothing to build
        if compiled and engine.decoder is not None:
            print(f"plinth: decoding through compiled programs ({compiled_decode.PROGRAM_CACHE}; --no-compile: "
                  "eagerly)", flush=True)
        elif not compiled:
            print("plinth: decoding eagerly while the compiled decoding programs are built in the background (a few "
                  "minutes, once for a model; `plinth compile` builds them ahead, --no-compile leaves them out)",
                  flush=True)
            build = BackgroundBuild(engine, model, dtype).start()
    state = ServerState(engine, loaded.tokenizer, model, strict_models=strict_models,
                        api_key=api_key or os.environ.get("PLINTH_API_KEY"), embedder=embedder, seed=seed,
                        indexes=served_indexes, adapters=adapter_ids, generator=generator)
    base = f"http://{host}:{port}"
    print(f"plinth: serving {model} — chat page {base}/  ·  OpenAI API {base}/v1  ·  Ollama API {base}/api",
          flush=True)
    if generator is not None:
        side, defaults = generator.size, generator.settings
        print(f"plinth: an image generator: {side}x{side} images at {base}/v1/images/generations "
              f"({defaults['steps']} steps, guidance {defaults['guidance']} by default)", flush=True)
    else:
        cache = engine.cache
        print(f"plinth: the KV cache grows with the tokens held, {cache.bytes_per_token / 2**10:.0f} KiB each: up to "
              f"{cache.bytes_per_row(engine.max_len) * max_batch / 2**30:.1f} GiB for {max_batch} sequences × "
              f"{engine.max_len} tokens (--max-batch, --max-model-len)", flush=True)
    stop_build = build.stop if build is not None else lambda: None
    server = GracefulServer(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning"), state, grace,
                            on_exit=stop_build)
    try:
        server.run()
    finally:
        stop_build()
        engine.stop()
