"""EleutherAI's lm-evaluation-harness (`lm_eval --model local-completions`) against a real
`plinth serve`, on a task whose data ships in tests/lm_eval_task/: its accuracy and every
choice's log-likelihood equal `plinth eval` on the same items."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plinth.eval.datasets import choice_file
from plinth.eval.tasks import EvalOptions, encode_pair, run_task
from plinth.loglik import score
from tests.test_serve import start_server, stop

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow
TASK_DIR = Path(__file__).parent / "lm_eval_task"


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--dtype", "float32", "--embedding-model", "none")
    yield base
    stop(proc)


def run_lm_eval(base: str, tokenizer_dir: Path, out: Path) -> tuple[dict, list[dict]]:
    model_args = (f"model=smollm2,base_url={base}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={tokenizer_dir},num_concurrent=1,max_retries=1,tokenized_requests=True")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", "plinth_mc", "--include_path", str(TASK_DIR), "--output_path", str(out), "--log_samples",
           "--batch_size", "16"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["plinth_mc"]
    samples = [json.loads(line) for line in next(out.rglob("samples_plinth_mc_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def test_lm_eval_through_plinth_serve_agrees_with_plinth_eval(server, smollm2_fp32, tmp_path):
    smollm2_fp32.tokenizer.save(tmp_path)  # tokenizer.json for lm-eval's (Hugging Face) tokenizer
    lm_eval, samples = run_lm_eval(server, tmp_path, tmp_path / "out")

    items_path = TASK_DIR / "items.jsonl"
    ours = run_task(str(items_path), smollm2_fp32, EvalOptions())
    assert ours["n"] == len(samples) == 20
    assert lm_eval["acc,none"] == pytest.approx(ours["value"], abs=1e-9)
    assert lm_eval["acc_norm,none"] == pytest.approx(ours["accuracy_norm"], abs=1e-9)
    assert lm_eval["acc_stderr,none"] == pytest.approx(ours["stderr"], abs=1e-9)

    tok = smollm2_fp32.tokenizer
    for item, sample in zip(choice_file(items_path), samples):
        scored = score(smollm2_fp32.model, [encode_pair(tok, item.context, c) for c in item.choices])
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert theirs == pytest.approx([sum(s.logprobs) for s in scored], abs=1e-3)
