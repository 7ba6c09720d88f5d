"""Log-likelihood scoring throughput: plinth's batched scorer against EleutherAI's
lm-evaluation-harness running Hugging Face transformers (`--model hf`) on the same items, with the
accuracy of each, in one run. The model is SmolLM2-135M-Instruct in float32 for both (transformers
dequantises the GGUF exactly, so both compute the same function).

    .venv/bin/python benchmarks/eval.py                          # 200 held-out sentiment items
    .venv/bin/python benchmarks/eval.py --task topic --limit 100 --threads 1
    .venv/bin/python benchmarks/eval.py --extra-dtypes bfloat16     # also plinth with bf16 weights

Both are timed from a loaded model to the accuracy (lm-eval's time includes building its
requests from the task file, a small part). Targets (issue 7): the same accuracy within ±0.5
point, and plinth ≥ 2× faster. Results go to benchmarks/results/eval.json.

plinth's scorer sends its float32 products to oneDNN where that keeps float32 precision
(plinth/onednn.py; about twice MKL's speed on AMD CPUs). A last row, for information, runs lm-eval
under the same setting, to show how much of the lead that accounts for (`--no-anchor-onednn` skips it).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import plinth
from plinth import hub
from plinth.eval import datasets
from plinth.eval.tasks import EvalOptions, multiple_choice
from plinth.files import write_atomic
from plinth.loglik import BATCH_TOKENS
from plinth.onednn import float32_on_onednn, keeps_float32

TASK_YAML = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def items_for(task: str, limit: int) -> list[datasets.ChoiceItem]:
    return {"sentiment": datasets.sentiment_items, "topic": datasets.topic_items}[task](limit)


def run_plinth(items, batch_tokens: int, dtype: str) -> dict:
    loaded = plinth.load("smollm2-135m-instruct", dtype=dtype)
    start = time.perf_counter()
    result = multiple_choice(loaded, items, EvalOptions(batch_tokens=batch_tokens))
    seconds = time.perf_counter() - start
    return {"accuracy": result["value"], "seconds": seconds, "items_per_s": len(items) / seconds,
            "choices_per_s": result["choices_scored"] / seconds}


def run_lm_eval_hf(items, batch_size: int, onednn: bool = False) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    gguf = hub.resolve("smollm2-135m-instruct")
    lm = HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32", batch_size=batch_size,
              device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder, "items.jsonl")
        data.write_text("".join(json.dumps({"context": i.context, "choices": list(i.choices), "gold": i.gold}) + "\n"
                                for i in items))
        Path(folder, "bench_mc.yaml").write_text(TASK_YAML.format(data=data))
        start = time.perf_counter()
        with float32_on_onednn() if onednn else nullcontext():
            out = simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=TaskManager(include_path=folder),
                                  batch_size=batch_size)
        seconds = time.perf_counter() - start
    choices = sum(len(i.choices) for i in items)
    return {"accuracy": out["results"]["bench_mc"]["acc,none"], "seconds": seconds,
            "items_per_s": len(items) / seconds, "choices_per_s": choices / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["sentiment", "topic"], default="sentiment")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS, help="plinth: padded tokens per forward pass")
    parser.add_argument("--hf-batch-size", type=int, default=16, help="lm-eval hf: requests per forward pass")
    parser.add_argument("--threads", type=int, help="torch threads for both (default: torch's, all cores); on a "
                        "machine shared with other work, 1 avoids OpenMP threads waiting for each other")
    parser.add_argument("--extra-dtypes", default="", help="plinth rows besides float32, for information "
                        "(e.g. bfloat16: faster where the CPU has bf16 instructions, but not the same function)")
    parser.add_argument("--no-anchor-onednn", dest="anchor_onednn", action="store_false",
                        help="skip the informational lm-eval run with float32 products on oneDNN")
    parser.add_argument("--out", default="benchmarks/results/eval.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    items = items_for(args.task, args.limit)
    rows = {}
    for dtype in ["float32"] + [d for d in args.extra_dtypes.split(",") if d]:
        name = "plinth" if dtype == "float32" else f"plinth {dtype}"
        rows[name] = run_plinth(items, args.batch_tokens, dtype)
        print(f"{name}: {rows[name]}", flush=True)
    rows["lm-eval hf"] = run_lm_eval_hf(items, args.hf_batch_size)
    if args.anchor_onednn and keeps_float32():
        rows["lm-eval hf+onednn"] = run_lm_eval_hf(items, args.hf_batch_size, onednn=True)
    ours, theirs = rows["plinth"], rows["lm-eval hf"]
    summary = {"accuracy_difference_points": 100 * (ours["accuracy"] - theirs["accuracy"]),
               "speedup": ours["items_per_s"] / theirs["items_per_s"]}
    print(f"{args.task}: {len(items)} items, {sum(len(i.choices) for i in items)} choices, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'engine':17} {'accuracy':>9} {'seconds':>8} {'items/s':>8} {'choices/s':>10}")
    for name, r in rows.items():
        print(f"{name:17} {r['accuracy']:9.4f} {r['seconds']:8.1f} {r['items_per_s']:8.2f} {r['choices_per_s']:10.2f}")
    print(f"accuracy difference {summary['accuracy_difference_points']:+.2f} points (target ±0.5); "
          f"plinth {summary['speedup']:.2f}× faster (target ≥ 2×)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({"settings": vars(args), "results": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
