"""`plinth plot` of a masked-autoencoder run: held-out images as the encoder saw them (hidden
patches blanked), the decoder's reconstruction, and the originals, one column per image.

    plinth plot runs/mae-fashion      # writes curves.png and reconstructions.png
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from plinth.errors import PlinthError
from plinth.files import atomic_file
from plinth.train import checkpoint
from plinth.vision.images import ImagePrep, unlabelled_images
from plinth.vision.mae import random_masks
from plinth.vision.pretrain import MAE_CONFIG, held_out, read_mae


def is_mae_run(run_dir) -> bool:
    folder = checkpoint.latest(run_dir)
    return folder is not None and (folder / MAE_CONFIG).is_file()


def plot_reconstructions(run_dir, count: int = 8, out=None) -> Path:
    """Reconstructions by the run's newest checkpoint of `count` held-out images (the first of the
    run's validation set, with masks drawn from seed 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    folder = checkpoint.latest(run_dir)
    if folder is None or not (folder / MAE_CONFIG).is_file():
        raise PlinthError(f"{run_dir} has no masked-autoencoder checkpoint to draw reconstructions from")
    model, settings = read_mae(folder)
    recipe = json.loads((run_dir / "recipe.json").read_text())
    prep = ImagePrep.from_config(model.config)
    pixels = unlabelled_images(recipe["data"], prep)
    held = held_out(len(pixels), recipe["seed"], recipe["val_images"])[0][:count]
    images = prep.normalize(pixels[held])
    masks = random_masks(len(images), model.config.n_patches, settings["mask_ratio"], torch.Generator().manual_seed(0))
    masked, rebuilt = model.reconstruct(images, masks)
    fig, axes = plt.subplots(3, len(images), figsize=(1.3 * len(images), 4.2), squeeze=False)
    for row, (title, batch) in enumerate([("masked", masked), ("reconstruction", rebuilt), ("original", images)]):
        for column, image in enumerate(batch):
            shown = (image * prep.std + prep.mean).clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
            axes[row][column].imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
            axes[row][column].axis("off")
        axes[row][0].set_title(title, loc="left", fontsize=9)
    fig.suptitle(f"{run_dir.resolve().name}, {folder.name}: {settings['mask_ratio']:.0%} of patches hidden")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "reconstructions.png"
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
