"""`plinth eval MODEL --tasks T1,T2 --limit N`: run tasks on one model, write runs/eval-*/results.json.

The results file is rewritten (atomically) after every task, so a long evaluation that stops
half-way keeps what it finished; `plinth report` reads these files.

    plinth eval smollm2-135m-instruct --tasks perplexity,sentiment,topic,humaneval --limit 200
    plinth eval runs/pretrain-tiny/latest --tasks perplexity
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from plinth import hub
from plinth.data.sources import read_source
from plinth.errors import PlinthError
from plinth.eval.tasks import EvalOptions, check_tasks, run_task
from plinth.files import write_atomic

# Scoring runs in padded batches (compute-bound), where compact weights buy little; float32 is the
# exact dequantisation, so the numbers match other tools that evaluate the same file.
DEFAULT_DTYPE = "float32"


def training_run(model_path: Path) -> str | None:
    """The training run folder (with metrics.jsonl) a checkpoint came from, for the report's curves."""
    run = model_path.resolve().parent if model_path.is_dir() else None
    return str(run) if run is not None and (run / "metrics.jsonl").is_file() else None


def new_folder(out: Path, model_path: Path) -> Path:
    """runs/eval-<model>-<time>, never an existing folder (two runs may start in the same second)."""
    resolved = model_path.resolve()
    name = resolved.stem if resolved.is_file() else f"{resolved.parent.name}-{resolved.name}"
    base = out / f"eval-{re.sub(r'[^A-Za-z0-9._]+', '-', name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise PlinthError(f"could not make a new folder beside {base}; clean up {out}")


def run_eval(model: str, tasks: list[str], options: EvalOptions, dtype: str | None = None,
             out: str | Path = "runs", progress=print, adapter: str | None = None) -> Path:
    """Evaluate `model` (with a LoRA `adapter` merged in, if given) on `tasks`; returns the
    results.json path."""
    import plinth

    check_tasks(tasks)
    if "perplexity" in tasks:  # a mistyped source fails now, not after the model has loaded
        for source in options.sources:
            next(read_source(source, limit=1), None)
    dtype = dtype or DEFAULT_DTYPE
    loaded = plinth.load(model, dtype=dtype, adapter=adapter)
    path = hub.resolve(model)
    folder = None  # made when the first task has a result: a run that fails at once leaves nothing
    results = {"model": model, "model_path": str(path), "adapter": adapter, "dtype": dtype,
               "training_run": training_run(Path(adapter) if adapter else path),
               "options": dataclasses.asdict(options), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tasks": {}}
    for name in tasks:
        progress(f"{name}: running")
        result = run_task(name, loaded, options)
        results["tasks"][name] = result
        folder = folder or new_folder(Path(out), Path(adapter) if adapter else path)
        write_atomic(folder / "results.json", json.dumps(results, indent=2))
        progress(f"{name}: {result['metric']} {result['value']:.4f} ± {result['stderr']:.4f} "
                 f"({result['n']} {result['unit']}, {result['seconds']:.1f} s)")
    return folder / "results.json"
