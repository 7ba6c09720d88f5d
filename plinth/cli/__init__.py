"""The `plinth` command. Each subcommand parses its arguments and calls the library. One module per
command group registers its subcommands with `register(sub)`: models (list, pull, generate, chat),
train (data, tokenizer, pretrain), adapt (finetune, prompt, export), measure (plot, eval, report),
serve (serve, compile), retrieval (index, rag); common.py holds the options and helpers they share.

    plinth list
    plinth generate smollm2-135m-instruct "The capital of France is" --max-tokens 20
    plinth chat smollm2-135m-instruct

A mistake in the input (unknown model, bad file, bad value) prints one line saying what is wrong
and how to fix it, and exits with code 2.
"""
from __future__ import annotations

import argparse
import sys

from plinth.cli import adapt, measure, models, retrieval, serve, train
from plinth.errors import PlinthError

# In the order `plinth --help` lists their commands.
GROUPS = (models, train, adapt, measure, serve, retrieval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plinth", description="Pretrain, load, adapt, evaluate and serve foundation models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # subcommand name → its parser
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # A command sets `intermixed` when options may stand between its positionals (`generate MODEL
    # --adapter DIR "text"`); argparse takes those in one go only when parsing intermixed.
    if unknown and getattr(args, "intermixed", False):
        args = parser.commands[args.command].parse_intermixed_args(argv[argv.index(args.command) + 1:], args)
        unknown = []
    if unknown and not getattr(args, "recipe_overrides", False):  # only recipes (add_recipe_arg) take --key=value
        build_parser().parse_args(argv)  # reports the unknown arguments the usual way
    args.overrides = unknown
    try:
        args.func(args)
    except PlinthError as e:
        print(f"plinth: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `plinth generate ... | head`
        return 0
    return 0
