"""`plinth plot RUN_DIR`: training curves (loss and validation, learning rate, tokens/s or
images/s) to a PNG; for a masked-autoencoder run, plinth/vision/reconstructions.py adds its figure;
for a run that wrote sample grids at its evaluations (an image generator), they are shown side by
side over time.

    plinth plot runs/pretrain-tiny            # writes runs/pretrain-tiny/curves.png
    plinth plot runs/dit-fashion              # also samples.png
"""
from __future__ import annotations

import json
from pathlib import Path

from plinth.errors import PlinthError
from plinth.files import atomic_file


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlinthError(f"no metrics.jsonl in {run_dir}; give the folder of a training run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir, out=None) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise PlinthError(f"{run_dir}/metrics.jsonl is empty: the run has not logged a step yet")
    steps = [r["step"] for r in rows]
    evals = [r for r in rows if "val_loss" in r]
    fig, (loss_ax, lr_ax, speed_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    loss_ax.plot(steps, [r["loss"] for r in rows], label="train loss", linewidth=1)
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    lr_ax.plot(steps, [r["lr"] for r in rows])
    lr_ax.set_ylabel("learning rate")
    images = all("img_s" in r for r in rows)  # an image run counts its speed in images
    speed_ax.plot(steps, [r["img_s" if images else "tok_s"] for r in rows], linewidth=1)
    speed_ax.set_ylabel("images/s" if images else "tokens/s")
    speed_ax.set_xlabel("step")
    fig.suptitle(Path(run_dir).resolve().name)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100, format=out.suffix[1:] or "png")  # the temporary name has no image suffix
    plt.close(fig)
    return out


def sample_grids(run_dir) -> list[Path]:
    """The sample grids a run wrote at its evaluations (samples/step-NNNNNN.png), oldest first."""
    return sorted((Path(run_dir) / "samples").glob("step-*.png"))


def plot_samples(run_dir, most: int = 6, out=None) -> Path:
    """Up to `most` of the run's sample grids, evenly spread over its evaluations and the last one
    always among them, side by side with their steps: how the samples improved."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = sample_grids(run_dir)
    if not grids:
        raise PlinthError(f"{run_dir} has no sample grids (samples/step-*.png); an image generator's run writes "
                          "one at each evaluation")
    chosen = sorted({grids[round(i * (len(grids) - 1) / max(1, most - 1))] for i in range(min(most, len(grids)))})
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.6), squeeze=False)
    for ax, path in zip(axes[0], chosen):
        image = Image.open(path)
        ax.imshow(image, cmap="gray" if image.mode == "L" else None, vmin=0, vmax=255)
        ax.set_title(f"step {int(path.stem.removeprefix('step-'))}", fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{Path(run_dir).resolve().name}: samples at each evaluation (one row per class)")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "samples.png"
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
