"""`plinth report runs/eval-*/ --out report.html`: one self-contained HTML page comparing eval runs.

The page has a table of every task's number ± standard error per run, and PNG plots (matplotlib,
embedded as data URIs so the page is one file): task scores with error bars, bits per byte per
perplexity source, and the training curves of runs whose model is a checkpoint of a training run.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from plinth.errors import PlinthError
from plinth.files import write_atomic
from plinth.train.plot import read_metrics


def read_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        path = Path(p) / "results.json" if Path(p).is_dir() else Path(p)
        if not path.is_file():
            raise PlinthError(f"{p} is not an eval run: no results.json there; give folders that `plinth eval` wrote")
        try:
            run = json.loads(path.read_text())
            run["tasks"], run["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PlinthError(f"{path} is not a results file written by `plinth eval` ({e})") from e
        runs.append(run)
    if not runs:
        raise PlinthError("no eval runs given; pass the folders `plinth eval` wrote, e.g. runs/eval-*/")
    labels = [f"{Path(run['model']).name}" + (f" + {Path(run['adapter']).parent.name}" if run.get("adapter") else "") +
              f" [{run.get('dtype', '?')}" +
              (f", limit {run['options']['limit']}]" if run.get("options", {}).get("limit") else "]") for run in runs]
    for i, (run, label) in enumerate(zip(runs, labels)):
        run["label"] = label if labels.count(label) == 1 else f"{label} #{labels[:i + 1].count(label)}"
    return runs


def figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode()


def grouped_bars(runs: list[dict], groups: list[str], value, title: str, ylabel: str):
    """One group of bars per entry of `groups`, one bar per run, with standard-error bars;
    `value(run, group)` gives (value, stderr) or None where the run lacks that group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(runs)) / 2), 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs, ys, errs = [], [], []
        for g, group in enumerate(groups):
            found = value(run, group)
            if found is not None:
                xs.append(g + (i - (len(runs) - 1) / 2) * width)
                ys.append(found[0])
                errs.append(found[1])
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=run["label"])
    ax.set_xticks(range(len(groups)), [Path(g).name for g in groups])  # task files and sources by file name
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = figure_png(fig)
    plt.close(fig)
    return png


def training_curves(runs: list[dict]) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in runs if r.get("training_run") and (Path(r["training_run"]) / "metrics.jsonl").is_file()]
    if not trained:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for run in trained:
        rows = read_metrics(run["training_run"])
        ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r],
                linewidth=1, label=f"{run['label']}: train")
        evals = [r for r in rows if "val_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label=f"{run['label']}: validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training curves of the evaluated checkpoints")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = figure_png(fig)
    plt.close(fig)
    return png


def score_of(run: dict, task: str):
    result = run["tasks"].get(task)
    return (result["value"], result["stderr"]) if result else None


def bpb_of(run: dict, source: str):
    found = run["tasks"].get("perplexity", {}).get("sources", {}).get(source)
    return (found["bits_per_byte"], found["bits_per_byte_stderr"]) if found else None


def table(runs: list[dict], tasks: list[str]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    rows = []
    for run in runs:
        cells = []
        for task in tasks:
            r = run["tasks"].get(task)
            cells.append(f"<td>{r['metric']} {r['value']:.4f} ± {r['stderr']:.4f}<br>"
                         f"<small>{r['n']} {r.get('unit', '')}</small></td>" if r else "<td>—</td>")
        rows.append(f"<tr><th>{html.escape(run['label'])}<br><small>{html.escape(run['model_path'])}</small></th>"
                    f"{''.join(cells)}</tr>")
    return f"<table><tr><th>run</th>{head}</tr>{''.join(rows)}</table>"


def write_report(paths: list[str], out: str | Path = "report.html") -> Path:
    runs = read_runs(paths)
    tasks = list(dict.fromkeys(t for run in runs for t in run["tasks"]))
    scored = [t for t in tasks if t != "perplexity"]
    sources = list(dict.fromkeys(s for run in runs for s in run["tasks"].get("perplexity", {}).get("sources", {})))
    images = []
    if scored:
        images.append(("Task scores (± standard error)",
                       grouped_bars(runs, scored, score_of, "accuracy / pass@k per task", "score")))
    if sources:
        images.append(("Perplexity per source",
                       grouped_bars(runs, sources, bpb_of, "bits per byte per source (lower is better)", "bits/byte")))
    curves = training_curves(runs)
    if curves:
        images.append(("Training curves", curves))
    figures = "".join(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{png}'>" for title, png in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>plinth eval report</title><style>"
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
            "td,th{border:1px solid #ccc;padding:.4em;text-align:left;vertical-align:top}</style></head><body>"
            f"<h1>plinth eval report</h1><p>{len(runs)} run(s)</p>{table(runs, tasks)}{figures}</body></html>")
    out = Path(out)
    write_atomic(out, page)
    return out
