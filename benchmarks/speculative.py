"""Speculative decoding benchmark: decode speed with and without prompt-lookup drafts, per task.

    nice -n 19 .venv/bin/python benchmarks/speculative.py              # prints a table
    .venv/bin/python benchmarks/speculative.py --rounds 5 --max-tokens 256
    .venv/bin/python benchmarks/speculative.py --compile    # both through the compiled programs

Model: the default (SmolLM2-135M-Instruct, int4), 2 threads, greedy, the model's chat template.
Tasks (the first two are input-grounded: the answer copies long runs of the prompt):
  rewrite     "Rewrite this function with type hints" over a ~300-token function of this repository
              (plinth/tokenizer.py `_byte_level_bpe`)
  quote       "Quote it exactly, word for word" after ~1,200 characters of docs/serving.md
  open-ended  a short story from a one-line request: little to copy, so the drafter should
              switch itself off and the speed stay that of plain decoding

How each figure is measured: each round runs every task plain and speculative, the order of the
two alternating between rounds so that drift in the machine's load falls on both alike. Decode
tok/s is (tokens - 1) / (time of the last token - time of the first): the first token needs only
the prefill, which speculation does not change. Figures are medians over --rounds; the ratio is
speculative / plain. Acceptance is the share of drafted tokens the model confirmed, and tokens per
pass how many tokens each forward pass produced; `same` says whether every run of both modes produced
the same tokens (it must: tests/test_speculative.py). Results go to benchmarks/results/speculative.json (or --out); each records
the 1-minute load average: well above 2 means other work shared the CPUs.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch

import plinth
from plinth.files import write_atomic
from plinth.generate import SamplingParams, generate_stream
from plinth.speculative import PromptLookup

THREADS = 2
ROOT = Path(__file__).resolve().parent.parent


def function_source(path: Path, name: str) -> str:
    source = path.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(source, node)
    raise SystemExit(f"{path} has no top-level {name!r}; pick another function for the rewrite task")


def passage(path: Path, first: str, chars: int = 1200) -> str:
    """About `chars` characters of `path` from `first` on, ending at a full stop."""
    text = path.read_text()
    if first not in text:
        raise SystemExit(f"{path} no longer has {first!r}; pick another passage to quote")
    start = text.index(first)
    return text[start:text.rindex(".", start, start + chars) + 1]


def tasks() -> dict[str, str]:
    code = function_source(ROOT / "plinth" / "tokenizer.py", "_byte_level_bpe")
    quoted = passage(ROOT / "docs" / "serving.md", "`plinth serve` answers")
    return {
        "rewrite": f"Rewrite this function with type hints. Reply with the code only.\n\n```python\n{code}\n```",
        "quote": f"Here is a passage from the documentation:\n\n{quoted}\n\nQuote it exactly, word for word.",
        "open-ended": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    }


def run(m, prompt: list[int], max_tokens: int, speculate: bool) -> dict:
    # compiled, a verify pass has room for a fixed number of guesses
    drafter = (PromptLookup() if m.decoder is None else PromptLookup(max_draft=m.decoder.guesses)) \
        if speculate else False
    stamps, tokens = [], []
    for step in generate_stream(m.model, m.tokenizer, prompt, SamplingParams(max_tokens=max_tokens, temperature=0),
                                speculate=drafter, decoder=m.decoder):
        stamps.append(time.perf_counter())
        tokens.append(step.choice.token)
    result = {"tokens": tokens, "decode_tok_s": (len(tokens) - 1) / (stamps[-1] - stamps[0])}
    if speculate:
        result.update(proposed=drafter.proposed, accepted=drafter.accepted,
                      passes=len(tokens) - 1 - drafter.accepted)  # after the prefill's token
    return result


def measure(m, args) -> list[dict]:
    prompts = {name: m.tokenizer.encode(m.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                                       add_generation_prompt=True))
               for name, text in tasks().items()}
    for prompt in prompts.values():  # warm-up: first-call allocations and kernel selection
        run(m, prompt, 16, True)
    runs = {name: {False: [], True: []} for name in prompts}
    for r in range(args.rounds):
        for name, prompt in prompts.items():
            for speculate in ((False, True) if r % 2 == 0 else (True, False)):
                runs[name][speculate].append(run(m, prompt, args.max_tokens, speculate))
                print(f"round {r + 1}/{args.rounds} {name:<11} {'speculative' if speculate else 'plain':<12}"
                      f"{runs[name][speculate][-1]['decode_tok_s']:7.1f} tok/s", flush=True)
    return [summary(name, len(prompts[name]), runs[name]) for name in prompts]


def summary(name: str, prompt_tokens: int, runs: dict[bool, list[dict]]) -> dict:
    plain, spec = runs[False], runs[True]
    last = spec[-1]
    plain_rate = statistics.median(r["decode_tok_s"] for r in plain)
    spec_rate = statistics.median(r["decode_tok_s"] for r in spec)
    return {"task": name, "prompt_tokens": prompt_tokens, "new_tokens": len(last["tokens"]),
            "same_output": all(r["tokens"] == plain[0]["tokens"] for r in plain + spec),
            "plain_tok_s": plain_rate, "speculative_tok_s": spec_rate, "ratio": spec_rate / plain_rate,
            "acceptance": last["accepted"] / last["proposed"] if last["proposed"] else None,
            "tokens_per_pass": (len(last["tokens"]) - 1) / last["passes"],
            "plain_runs_tok_s": [r["decode_tok_s"] for r in plain],
            "speculative_runs_tok_s": [r["decode_tok_s"] for r in spec],
            "drafted": last["proposed"], "accepted": last["accepted"]}


def report(results: list[dict]):
    print(f"\n{'task':<12}{'prompt':>7}{'new':>6}{'plain tok/s':>13}{'spec tok/s':>12}{'ratio':>8}"
          f"{'accepted':>10}{'tok/pass':>10}{'same':>6}")
    for r in results:
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        print(f"{r['task']:<12}{r['prompt_tokens']:>7}{r['new_tokens']:>6}{r['plain_tok_s']:>13.1f}"
              f"{r['speculative_tok_s']:>12.1f}{r['ratio']:>7.2f}×{acceptance:>10}{r['tokens_per_pass']:>10.2f}"
              f"{'yes' if r['same_output'] else 'NO':>6}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per task (median taken)")
    parser.add_argument("--max-tokens", type=int, default=256, help="token limit per reply (greedy; EOS ends it)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speculative.json")
    parser.add_argument("--compile", action="store_true", help="plain and speculative decoding both through the "
                        "compiled programs (plinth/compiled_decode.py), built first if not kept")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    m = plinth.load().compile() if args.compile else plinth.load()
    results = measure(m, args)
    report(results)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(model=m.name, threads=THREADS, torch=version("torch"), machine=platform.platform(),
                    python=platform.python_version(), loadavg_1min=os.getloadavg()[0])
    write_atomic(args.out, json.dumps({"settings": settings, "results": results}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
