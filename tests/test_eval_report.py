"""`plinth eval` on a tiny checkpoint writes results.json; `plinth report` turns runs into one HTML
page with embedded plots; bad input exits 2 with a message, before any model is loaded."""
import base64
import json
import re

import pytest

from plinth.cli import main
from plinth.errors import PlinthError
from plinth.eval.report import write_report
from plinth.eval.run import run_eval
from plinth.eval.tasks import EvalOptions
from plinth.train import checkpoint
from tests.conftest import byte_tokenizer, tiny_model


@pytest.fixture
def trained_run(tmp_path):
    """A checkpoint inside a training run folder that logged metrics, as `plinth pretrain` leaves it."""
    run = tmp_path / "pretrain-tiny"
    checkpoint.save(run, 2, tiny_model(), byte_tokenizer(), {})
    rows = [{"step": s, "loss": 5.0 - s, "lr": 1e-3, "tok_s": 100.0} for s in (1, 2)] + [{"step": 2, "val_loss": 4.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps({"context": f"{i} + 1 =", "choices": [f" {i + 1}", f" {i + 2}"], "gold": 0}) + "\n"
                            for i in range(6)))
    (tmp_path / "notes.txt").write_text("plinth evaluates models. " * 20)
    return path


def test_eval_writes_results_and_report_compares_runs(tmp_path, trained_run, task_file):
    options = EvalOptions(limit=4, sources=(str(tmp_path / "notes.txt"),), window=32, stride=16)
    first = run_eval(str(trained_run / "latest"), [str(task_file), "perplexity"], options, out=tmp_path / "runs",
                     progress=lambda _: None)
    results = json.loads(first.read_text())
    assert results["training_run"] == str(trained_run.resolve())
    assert set(results["tasks"]) == {str(task_file), "perplexity"}
    accuracy = results["tasks"][str(task_file)]
    assert accuracy["n"] == 4 and 0 <= accuracy["value"] <= 1 and accuracy["stderr"] >= 0
    assert results["tasks"]["perplexity"]["sources"][str(tmp_path / "notes.txt")]["bytes"] == 500
    assert not list(first.parent.glob(".*.tmp"))  # written atomically: no temporary file left

    second = run_eval(str(trained_run / "latest"), [str(task_file)], EvalOptions(limit=6), dtype="bfloat16",
                      out=tmp_path / "runs", progress=lambda _: None)
    page = write_report([str(first.parent), str(second.parent)], tmp_path / "report.html").read_text()
    assert page.count("<tr>") == 3 and "± " in page and "[bfloat16, limit 6]" in page and "[float32, limit 4]" in page
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 3  # task scores, bits per byte per source, training curves
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)


def test_report_refuses_folders_that_are_not_eval_runs(tmp_path):
    with pytest.raises(PlinthError, match="no results.json"):
        write_report([str(tmp_path)], tmp_path / "r.html")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(PlinthError, match="not a results file"):
        write_report([str(tmp_path)], tmp_path / "r.html")


@pytest.mark.parametrize("args,message", [
    (["--tasks", "sentiment,nope"], "unknown task 'nope'"),
    (["--tasks", "sentiment", "--limit", "0"], "limit=0"),
    (["--tasks", "humaneval", "--k", "x"], "--k"),
    (["--tasks", "perplexity", "--sources", "no-such-corpus"], "unknown data source 'no-such-corpus'"),
])
def test_cli_bad_input_exits_2_with_a_message(args, message, capsys):
    assert main(["eval", "no-such-model", *args]) == 2
    assert message in capsys.readouterr().err
