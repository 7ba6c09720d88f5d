"""What the command groups share: the MODEL, sampling and recipe options, loading the model they
name, repeatable NAME=VALUE options, and streaming text to the terminal.

    plinth generate smollm2-135m-instruct "The capital of France is" --temperature 0 --max-tokens 20
    plinth serve --adapter sentiment=runs/lora-sentiment/final --index docs=idx/
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plinth import hub
from plinth.errors import PlinthError

# Sampling defaults for the terminal, as llama.cpp's CLI has them (the API keeps OpenAI's).
CLI_SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def add_subcommands(sub, name: str, help: str, description: str):
    """A command that only groups subcommands (`plinth index build`, `plinth index query`); returns
    the `sub` to add them to."""
    p = sub.add_parser(name, help=help, description=description)
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def add_model_args(p: argparse.ArgumentParser, dtype_default: str = "int4 for mostly 4-bit files, else int8"):
    p.add_argument("model", nargs="?", default=hub.DEFAULT_MODEL,
                   help=f"known name, or path to a .gguf file, Hugging Face folder, plinth checkpoint or "
                   f"fine-tuning run (default: {hub.DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "int8", "int4"],
                   help=f"weights in memory (default: {dtype_default})")


def add_sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=CLI_SAMPLING["temperature"], help="0 = greedy")
    g.add_argument("--top-k", type=int, default=CLI_SAMPLING["top_k"], help="0 = off")
    g.add_argument("--top-p", type=float, default=CLI_SAMPLING["top_p"])
    g.add_argument("--min-p", type=float, default=CLI_SAMPLING["min_p"])
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="answer with a JSON object (constrained decoding)")
    g.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid for the schema in FILE")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="decode through compiled programs (steps, and speculative decoding's verify passes): faster "
                   "per token. Default: through the programs `plinth compile` or `plinth serve` kept for the model, "
                   "else eagerly. --compile: compile them first if not kept (minutes, once for a model); "
                   "--no-compile: eagerly")


def sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                seed=args.seed, stop=args.stop, grammar=output_grammar(args))


def output_grammar(args) -> str | None:
    from plinth.constrain import json_schema_grammar, response_format_grammar
    if args.json_schema:
        try:
            return json_schema_grammar(json.loads(Path(args.json_schema).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PlinthError(f"cannot read a JSON schema from {args.json_schema}: {e}") from e
    return response_format_grammar({"type": "json_object"}) if args.json else None


def load_model(args):
    import plinth
    from plinth.generate import SamplingParams
    params = sampling(args) if hasattr(args, "max_tokens") else {}
    SamplingParams(**params).validate()  # reject bad values before spending seconds on loading
    from plinth.compiled_decode import compile_by_default
    model = plinth.load(args.model, dtype=args.dtype, adapter=getattr(args, "adapter", None))
    compile = getattr(args, "compile", False)  # None: not said, and the command has the option
    if compile or (compile is None and compile_by_default() and model.generator is None):
        model.compile(build=bool(compile))
    return model


def add_recipe_arg(p: argparse.ArgumentParser):
    """A recipe file's path, whose fields the command line overrides with --key=value
    (`main` hands those to the command as args.overrides)."""
    p.add_argument("recipe")
    p.set_defaults(recipe_overrides=True)


def name_values(items: list[str], error: str, empty_values: bool = False) -> dict[str, str]:
    """A repeatable NAME=VALUE option's items → {NAME: VALUE}, e.g. `--index docs=idx/` → {"docs": "idx/"}.
    `error` says what the option takes, with a {} where the malformed item goes."""
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not (value or empty_values):
            raise PlinthError(error.format(repr(item)))
        pairs[name] = value
    return pairs


def print_stream(pieces) -> str:
    """Write streamed text to stdout as it comes; returns the whole text."""
    text = []
    for piece in pieces:
        text.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    return "".join(text)
