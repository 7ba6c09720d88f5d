"""`plinth serve`: a model over an OpenAI-compatible HTTP API with continuous batching, and a chat page at /;
`plinth compile`: its compiled decoding programs, built ahead.

    plinth serve smollm2-135m-instruct --port 8000 --api-key secret
    plinth serve --adapter sentiment=runs/lora-sentiment/final --index docs=idx/
    plinth serve runs/dit-fashion/final     # an image generator: /v1/images/generations
    plinth compile smollm2-135m-instruct    # minutes, once: the first `plinth serve` is then compiled at once
"""
from __future__ import annotations

import argparse

from plinth import hub
from plinth.cli.common import add_model_args, name_values
from plinth.errors import PlinthError


def cmd_serve(args):
    from plinth.serve.app import serve
    # Malformed items fail here, before seconds are spent loading anything.
    adapters = name_values(args.adapter,
                           "--adapter {} must look like NAME=DIR, e.g. sentiment=runs/lora-sentiment/final")
    indexes = name_values(args.index, "--index takes NAME=FOLDER (e.g. --index docs=idx/), got {}")
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, strict_models=args.strict_models,
          max_batch=args.max_batch, max_len=args.max_model_len, grace=args.grace, dtype=args.dtype,
          embedding_model=args.embedding_model, seed=args.seed, threads=args.threads, indexes=indexes,
          adapters=adapters, prefix_cache=args.prefix_cache, compile=args.compile)


def cmd_compile(args):
    import signal
    import sys
    import time

    import plinth
    from plinth.compiled_decode import PROGRAM_CACHE
    from plinth.engine import Engine
    # Stopped (a server that started this build shuts down): what is half-built is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    loaded = plinth.load(args.model, dtype=args.dtype)
    if loaded.generator is not None:
        raise PlinthError(f"{args.model} generates images; compiled decoding is for language models")
    # the programs of a serving engine's cache with these options: plinth serve then finds them
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1, max_len=args.max_model_len, threads=args.threads,
                    compile=True)
    start = time.perf_counter()
    engine.use_compiled()
    print(f"plinth: the compiled decoding programs of {args.model} on {engine.threads} threads are kept in "
          f"{PROGRAM_CACHE} ({time.perf_counter() - start:.0f} s)")


def register(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible server + chat page", description="Serve a model over an "
                       "OpenAI-compatible HTTP API with continuous batching, and a chat page at /. "
                       "An image generator's run (plinth pretrain recipes/dit-fashion.yaml) answers "
                       "/v1/images/generations instead of the text routes. "
                       "Example: plinth serve smollm2-135m-instruct --port 8000")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and /api (or set PLINTH_API_KEY)")
    p.add_argument("--strict-models", action="store_true", help="404 for model names not served (default: "
                   "any name is answered by the served model)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-model-len", type=int, help="context tokens per sequence (default: the model's own)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", help="compute every prompt "
                   "in full instead of reusing the cached rows of prompts that start the same way")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--threads", type=int, help="model compute threads, fixed (default: all cores, one fewer while "
                   "another process keeps a core busy)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="decoding steps and speculative "
                   "decoding's verify passes go through compiled programs: faster per token; a request's tokens "
                   "are the same in any batch, either way, but not eager decoding's. Default: through the programs "
                   "kept in ~/.cache/plinth/programs (loaded in under a second), else eagerly while they are built "
                   "in the background (a few minutes, once for a model). --compile: build them before serving; "
                   "--no-compile: eagerly")
    p.add_argument("--seed", type=int, help="seed requests that give none from this and their prompt, "
                   "so that the same request always gets the same answer")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="serve a LoRA adapter "
                   "as model NAME, beside the base (repeatable; requests choose by model name)")
    p.add_argument("--embedding-model", default="auto", help=f"model for /v1/embeddings: a name, a folder, "
                   f"'none', or 'auto' ({hub.DEFAULT_EMBEDDER} when installed)")
    p.add_argument("--index", action="append", default=[], metavar="NAME=FOLDER", help="serve a retrieval index "
                   "that chat requests may name (see README, Retrieval); repeatable")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("compile", help="build a model's compiled decoding programs ahead",
                       description="Build and keep the compiled decoding programs `plinth serve` uses with the same "
                       "options (and `plinth generate`, for a model without sliding-window layers), so that the "
                       "first start decodes compiled at once: a few minutes, once for a model, a machine and a "
                       "plinth version. Example: plinth compile smollm2-135m-instruct")
    add_model_args(p)
    p.add_argument("--threads", type=int, help="the thread count to tune the programs on (default: all cores)")
    p.add_argument("--max-model-len", type=int, help="as given to plinth serve (a sliding-window layer's cache "
                   "depends on it)")
    p.set_defaults(func=cmd_compile)
