"""Adapting SmolLM2-135M-Instruct to movie-review sentiment, every way plinth offers, side by side:
zero-shot and 8-shot prompting, linear probe, LoRA, QLoRA and full fine-tuning — test accuracy,
trainable parameters, peak memory, wall time. Then the foundation-model thesis on plinth's own
tiny model: pretrained (recipes/pretrain-tiny.yaml) vs the same architecture from random init,
fine-tuned the same way for the same steps. Last, regression (recipes/regress-sentiment.yaml): a
head predicting each sentence's mean human rating, with LoRA and as a linear probe; its "test acc"
is the sign accuracy, and it also reports Pearson and Spearman correlation with the ratings.

    .venv/bin/python benchmarks/adapt.py                           # small budget for 2 CPU cores
    .venv/bin/python benchmarks/adapt.py --steps 150 --test 0      # the recipes' own length, whole test split
    .venv/bin/python benchmarks/adapt.py --methods regress,regress-probe   # the regression rows only

Data: the vaderSentiment 3.3.2 movie-review sentences (plinth/data/sentiment.py; fixed split by
sentence id). Every method runs in its own process, so its peak memory (the process's peak resident
set, reset after the model is loaded) is its own. Accuracy is the same criterion for every
language-model method: the label whose first token scores highest after the prompt. Results go to
benchmarks/results/adapt.json.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from plinth.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("zero-shot", "8-shot", "probe", "lora", "qlora", "full", "tiny-pretrained", "tiny-random",
           "regress", "regress-probe")
RECIPES = {"probe": "classify-sentiment", "lora": "lora-sentiment", "qlora": "qlora-sentiment", "full": "full-sentiment",
           "tiny-pretrained": "classify-sentiment", "tiny-random": "classify-sentiment",
           "regress": "regress-sentiment", "regress-probe": "regress-sentiment"}


# ---- measuring ---------------------------------------------------------------------------------------
def reset_peak_memory():
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM), after giving
    freed memory back to the system so that the loading's high-water mark does not count."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return memory_mb("VmRSS")


def memory_mb(field: str = "VmHWM") -> float:
    """The process's peak (VmHWM) or current (VmRSS) resident memory."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


# ---- one method, in a child process --------------------------------------------------------------------
def run_prompting(method: str, args, train, test) -> dict:
    from plinth import hub
    from plinth.adapt.prompting import PromptTask, pick_shots, score
    from plinth.adapt.finetune import FinetuneRecipe
    from plinth.weights.load import read_model

    r = FinetuneRecipe()
    net, tokenizer, _ = read_model(hub.resolve(r.base))
    task = PromptTask(r.instruction, tuple(r.labels))
    if method == "8-shot":
        task = task.with_shots(pick_shots(train, 8, task.labels, seed=0))
    resting = reset_peak_memory()
    start = time.perf_counter()
    predictions = score(net, tokenizer, task, [x.text for x in test])
    return {"accuracy": sum(p == x.label for p, x in zip(predictions, test)) / len(test), "trainable_params": 0,
            "train_seconds": 0.0, "eval_seconds": time.perf_counter() - start, "peak_mb": memory_mb(),
            "resting_mb": resting, "steps": 0, "train_examples": 0}


def random_twin(checkpoint_dir: Path, out: Path) -> Path:
    """The same architecture and tokenizer as a checkpoint, with fresh random weights."""
    from plinth.model import Transformer
    from plinth.tokenizer import Tokenizer
    from plinth.weights.native import read_native, write_model

    config, _ = read_native(checkpoint_dir)
    torch.manual_seed(0)
    out.mkdir(parents=True)
    model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    write_model(model, out)
    Tokenizer.from_folder(checkpoint_dir).save(out)
    return out


def run_finetuning(method: str, args, train, test, work: Path) -> dict:
    from plinth.adapt.examples import ExampleData
    from plinth.adapt.finetune import FinetuneRecipe, FinetuneWeights, build_examples, evaluate, prepare
    from plinth.train.loop import train as train_loop
    from plinth.train.recipe import load_recipe

    steps, batch = (args.tiny_steps, 16) if method.startswith("tiny") else (args.steps, args.batch_size)
    overrides = [f"--out_dir={work / method}", f"--max_steps={steps}", f"--batch_size={batch}",
                 f"--max_examples={steps * batch}", f"--val_examples={args.val}", f"--eval_every={steps}",
                 f"--save_every={steps}", "--log_every=5", "--eval_batches=0"]
    if method.startswith("tiny"):  # a small model trains fully; mean pooling suits its short context
        base = args.tiny_checkpoint if method == "tiny-pretrained" else random_twin(args.tiny_checkpoint, work / "random")
        overrides += [f"--base={base}", "--method=full", "--pooling=mean", "--lr=0.001", "--max_examples=0"]
    if method == "regress-probe":  # the head alone: the linear probe's learning rate
        overrides += ["--method=probe", "--lr=0.01"]
    r = load_recipe(FinetuneRecipe, ROOT / "recipes" / f"{RECIPES[method]}.yaml", overrides)
    model, tokenizer, data = prepare(r, log=lambda *_: None)
    targets = [x.score if r.task == "regress" else x.label for x in test]
    test_data = ExampleData(data.train, build_examples(r, tokenizer, [(x.text, t) for x, t in zip(test, targets)])[0],
                            r.batch_size, r.seed, data.choices)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    resting = reset_peak_memory()
    start = time.perf_counter()
    train_loop(model, tokenizer, data, r, False, lambda message: print(f"  [{method}] {message}", flush=True),
               evaluate=evaluate, store=FinetuneWeights(r))
    train_seconds, peak = time.perf_counter() - start, memory_mb()
    start = time.perf_counter()
    scores = regression_scores(model, test_data, r) if r.task == "regress" else {"accuracy": evaluate(model, test_data, r)["val_acc"]}
    return {**scores, "trainable_params": trainable, "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start, "peak_mb": peak, "resting_mb": resting, "steps": steps,
            "train_examples": min(steps * batch, len(data.train))}


@torch.no_grad()
def regression_scores(model, test_data, r) -> dict:
    """Sign accuracy (does the predicted rating fall on the right side of neutral, comparable with
    the classifiers' accuracy), and Pearson / Spearman correlation with the human ratings."""
    from plinth.adapt.finetune import correlations
    from plinth.train.loop import autocast

    model.eval()
    with autocast(r):
        predicted = torch.cat([model(x).float() for x, _ in test_data.val_batches(0)])
    truth = torch.tensor([e.targets[0] for e in test_data.val])
    correlation = correlations(predicted, truth)
    return {"accuracy": float(((predicted > 0) == (truth > 0)).float().mean()),
            "pearson": correlation["val_pearson"], "spearman": correlation["val_spearman"]}


def child(args):
    from plinth.data.sentiment import rating_splits, sentiment_splits

    torch.set_num_threads(args.threads)
    train, test = sentiment_splits()
    full_test = method_uses_full_test(args.child)
    # the file lists positive sentences first: a fixed random sample keeps both labels
    test = test if full_test or not args.test else random.Random(0).sample(test, min(args.test, len(test)))
    if args.child.startswith("regress"):  # the same test sentences, with their ratings as targets
        ratings = {x.id: x for x in rating_splits()[1]}
        test = [ratings[x.id] for x in test]
    with tempfile.TemporaryDirectory() as work:
        if args.child in ("zero-shot", "8-shot"):
            result = run_prompting(args.child, args, train, test)
        else:
            result = run_finetuning(args.child, args, train, test, Path(work))
    result["test_examples"] = len(test)
    Path(args.result).write_text(json.dumps(result))


def method_uses_full_test(method: str) -> bool:
    return method.startswith("tiny")  # the tiny model is quick to evaluate: use the whole test split


# ---- the table -----------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=32, help="optimizer steps per SmolLM2 fine-tuning method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--test", type=int, default=200, help="test sentences for the SmolLM2 methods (0 = all)")
    p.add_argument("--val", type=int, default=32, help="held-out training sentences evaluated at the end of training")
    p.add_argument("--tiny-steps", type=int, default=200, help="steps for the tiny pretrained/random comparison")
    p.add_argument("--tiny-checkpoint", type=Path, default=Path("runs/pretrain-tiny/latest"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="compute threads per method")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adapt.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    methods = args.methods.split(",")
    if any(m.startswith("tiny") for m in methods) and not (args.tiny_checkpoint / "config.json").is_file():
        print(f"skipping the tiny-model comparison: no checkpoint at {args.tiny_checkpoint} "
              "(make one with `plinth pretrain recipes/pretrain-tiny.yaml`, or pass --tiny-checkpoint)")
        methods = [m for m in methods if not m.startswith("tiny")]
    print(f"SmolLM2-135M-Instruct: {args.steps} steps × batch {args.batch_size} = {args.steps * args.batch_size} "
          f"training sentences (of 8,108), {args.test or 'all'} test sentences; tiny models: {args.tiny_steps} steps "
          f"× 16, whole test split; {args.threads} thread(s) per method")
    results = {}
    for method in methods:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            command = [sys.executable, __file__, "--child", method, "--result", f.name, *sys.argv[1:]]
            # Large tensors always get their own memory mapping, returned on free: otherwise glibc
            # raises its mmap threshold as tensors come and go and keeps freed memory, and the
            # peak resident set would count memory no longer in use.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            if subprocess.run(command, env=env).returncode != 0:
                print(f"{method}: failed (see above)")
                continue
            results[method] = json.loads(Path(f.name).read_text())
        print(f"{method}: {results[method]}", flush=True)
    report(results, args)


def report(results: dict, args):
    print(f"\n{'method':16} {'test acc':>8} {'trainable':>12} {'peak MB':>8} {'rest MB':>8} {'train s':>8} {'eval s':>7} {'test n':>6}")
    for method, r in results.items():
        print(f"{method:16} {r['accuracy']:8.1%} {r['trainable_params']:12,} {r['peak_mb']:8.0f} {r['resting_mb']:8.0f} "
              f"{r['train_seconds']:8.0f} {r['eval_seconds']:7.0f} {r['test_examples']:6}")
    for method, r in results.items():
        if "pearson" in r:
            print(f"{method}: test acc is the sign accuracy; Pearson r {r['pearson']:.3f}, "
                  f"Spearman {r['spearman']:.3f} with the human ratings")
    checks = {}
    if "lora" in results:
        checks["LoRA test accuracy ≥ 85%"] = results["lora"]["accuracy"] >= 0.85
    if "full" in results:
        for method, limit in (("lora", 0.60), ("qlora", 0.45)):
            if method in results:
                ratio = results[method]["peak_mb"] / results["full"]["peak_mb"]
                checks[f"{method} peak memory ≤ {limit:.0%} of full fine-tuning's (is {ratio:.0%})"] = ratio <= limit
    if "tiny-pretrained" in results and "tiny-random" in results:
        a, b, n = results["tiny-pretrained"]["accuracy"], results["tiny-random"]["accuracy"], results["tiny-random"]["test_examples"]
        se = math.sqrt((a * (1 - a) + b * (1 - b)) / n)  # standard error of the difference of two accuracies
        checks[f"pretrained tiny model beats random init by more than 2 standard errors "
               f"({a - b:+.1%} ± {se:.1%})"] = a - b > 2 * se
    for check, ok in checks.items():
        print(f"{'met ' if ok else 'NOT met'}  {check}")
    write_atomic(args.out, json.dumps({"settings": {k: str(v) for k, v in vars(args).items()
                                                    if k not in ("child", "result")},
                                       "results": results, "checks": checks}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
