"""The task registry: each task is its data plus a scoring rule, and reports one number ± its
standard error (and a few more numbers beside it).

- multiple choice (sentiment, topic, a .jsonl task file): every choice is scored by its
  log-likelihood after the context, all of them in padded batches (`plinth.loglik.score`);
  `accuracy` takes the likeliest choice, `accuracy_norm` the likeliest per byte of the choice (so
  long choices are not penalised for being long), as lm-evaluation-harness's acc / acc_norm.
- humaneval: generated code, scored by execution (pass@k).
- perplexity: bits per byte of text sources (plinth.eval.perplexity).
- fashion-mnist: an image classifier's accuracy on the test images (plinth.eval.image_classification).
- easy-vqa: an image+text model's exact-match answers to questions about images (plinth.eval.vqa).

    run_task("sentiment", plinth.load("smollm2-135m-instruct"), EvalOptions(limit=200))
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from plinth.errors import PlinthError
from plinth.eval import datasets, humaneval
from plinth.eval.image_classification import image_accuracy
from plinth.eval.perplexity import perplexity
from plinth.eval.stats import mean_stderr
from plinth.eval.vqa import vqa_accuracy
from plinth.loglik import BATCH_TOKENS, score


@dataclass
class EvalOptions:
    limit: int | None = None            # items (documents for perplexity, problems for humaneval); None = all
    batch_tokens: int = BATCH_TOKENS    # padded tokens per forward pass of the scorer
    sources: tuple[str, ...] = ("python-docs",)  # perplexity: source names or paths
    window: int | None = None           # perplexity: tokens per window (default min(1024, context))
    stride: int | None = None           # perplexity: tokens between window starts (default window / 2)
    samples: int = 1                    # humaneval: completions per problem (1 = greedy)
    ks: tuple[int, ...] = (1,)          # humaneval: pass@k reported for each k
    timeout: float = 10.0               # humaneval: seconds per program

    def __post_init__(self):
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise PlinthError(f"limit={self.limit!r}: evaluate at least 1 item, or give no limit for all of them")
        if not self.sources:
            raise PlinthError("no perplexity sources given; name a source (python-docs, python-stdlib) or a path")

    @property
    def items(self) -> int:
        """The limit as the data loaders take it: 0 = all."""
        return self.limit or 0


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the context and of the continuation as they are tokenized after it, the way
    lm-evaluation-harness splits them (trailing spaces of the context move to the continuation;
    the whole text is tokenized once and cut at the context's length), so that both tools score
    exactly the same tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def multiple_choice(loaded, items: list[datasets.ChoiceItem], options: EvalOptions) -> dict:
    requests = [encode_pair(loaded.tokenizer, item.context, choice) for item in items for choice in item.choices]
    with tqdm(total=len(requests), desc="choices", unit="choice", disable=None) as bar:  # no bar when not a terminal
        scored = iter(score(loaded.model, requests, batch_tokens=options.batch_tokens, progress=bar.update))
    correct, correct_norm = [], []
    for item in items:
        logprobs = [sum(next(scored).logprobs) for _ in item.choices]
        per_byte = [lp / len(c.encode("utf-8")) for lp, c in zip(logprobs, item.choices)]
        correct.append(float(max(range(len(logprobs)), key=logprobs.__getitem__) == item.gold))
        correct_norm.append(float(max(range(len(per_byte)), key=per_byte.__getitem__) == item.gold))
    (acc, stderr), (acc_norm, norm_stderr) = mean_stderr(correct), mean_stderr(correct_norm)
    return {"metric": "accuracy", "value": acc, "stderr": stderr, "accuracy_norm": acc_norm,
            "accuracy_norm_stderr": norm_stderr, "n": len(items), "unit": "items", "choices_scored": len(requests),
            "chance": mean_stderr([1 / len(item.choices) for item in items])[0]}


def perplexity_task(loaded, options: EvalOptions) -> dict:
    """Bits per byte of each source; the headline number is the first source's."""
    sources = {s: perplexity(loaded, s, limit=options.items, window=options.window, stride=options.stride,
                             batch_tokens=options.batch_tokens) for s in options.sources}
    first = sources[options.sources[0]]
    return {"metric": "bits_per_byte", "value": first["bits_per_byte"], "stderr": first["bits_per_byte_stderr"],
            "n": first["tokens"], "unit": "tokens", "sources": sources}


@dataclass(frozen=True)
class Task:
    about: str
    run: Callable[[object, EvalOptions], dict]  # (LoadedModel, options) → result


TASKS: dict[str, Task] = {
    "perplexity": Task("bits per byte and perplexity of text sources (--sources)", perplexity_task),
    "sentiment": Task("movie-review sentence → negative/positive (human ratings), log-likelihood choice",
                      lambda m, o: multiple_choice(m, datasets.sentiment_items(o.items), o)),
    "topic": Task("WordNet gloss → its lexicographer class among 5, log-likelihood choice",
                  lambda m, o: multiple_choice(m, datasets.topic_items(o.items), o)),
    "humaneval": Task("write a Python function from its docstring; pass@k by running the tests",
                      lambda m, o: humaneval.evaluate(m, o.items, o.samples, o.ks, timeout=o.timeout)),
    "fashion-mnist": Task("an image classifier's accuracy on Fashion-MNIST's 10,000 test images",
                          lambda m, o: image_accuracy(m, "fashion-mnist", o.items)),
    "easy-vqa": Task("an image+text model's exact-match answers to easy-VQA's 9,673 test questions",
                     lambda m, o: vqa_accuracy(m, "easy-vqa", o.items)),
}


def check_tasks(names: list[str]) -> list[str]:
    """The task names, or an error listing the known tasks; a path to a .jsonl file is a task too."""
    if not names:
        raise PlinthError(f"no tasks given; choose from: {', '.join(TASKS)} (or a .jsonl task file)")
    for name in names:
        if name not in TASKS and not (name.endswith(".jsonl") and Path(name).is_file()):
            known = "; ".join(f"{n} ({t.about})" for n, t in TASKS.items())
            raise PlinthError(f"unknown task {name!r}. Known tasks: {known}; or the path of a .jsonl file of "
                              '{"context", "choices", "gold"} lines')
    return names


def run_task(name: str, loaded, options: EvalOptions) -> dict:
    start = time.perf_counter()
    if name in TASKS:
        result = TASKS[name].run(loaded, options)
    else:
        result = multiple_choice(loaded, datasets.choice_file(Path(name), options.items), options)
    seconds = time.perf_counter() - start
    return {**result, "seconds": seconds, f"{result['unit']}_per_second": result["n"] / seconds if seconds else None}
