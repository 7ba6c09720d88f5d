"""Image classification tasks: a fine-tuned image classifier's accuracy on a labelled test set,
with its standard error (`plinth eval runs/vit-fashion/final --tasks fashion-mnist`)."""
from __future__ import annotations

import torch

from plinth.adapt.classify import Finetuned
from plinth.errors import PlinthError
from plinth.eval.stats import mean_stderr
from plinth.vision.images import ImagePrep, labelled_images

BATCH = 256


@torch.inference_mode()
def image_accuracy(loaded, source: str, limit: int = 0) -> dict:
    """Top-1 accuracy on `source`'s test images (fashion-mnist: its 10,000 test images; a folder or
    JSONL: all of it); `limit` > 0 takes the first that many."""
    head = loaded.head
    if not loaded.model.config.is_image or head is None or head.labels is None:
        raise PlinthError(f"{loaded.name} is not an image classifier; this task needs a run of `plinth finetune` "
                          "on an image model with task: classify (e.g. recipes/vit-fashion.yaml)")
    prep = ImagePrep.from_config(loaded.model.config)
    found = labelled_images(source, prep, head.labels, split="test")
    pixels, labels = (found.pixels[:limit], found.labels[:limit]) if limit else (found.pixels, found.labels)
    model = Finetuned(loaded.model, head).eval()
    predicted = torch.cat([model(prep.normalize(pixels[i:i + BATCH])).argmax(-1) for i in range(0, len(pixels), BATCH)])
    accuracy, stderr = mean_stderr((predicted == labels).float().tolist())
    return {"metric": "accuracy", "value": accuracy, "stderr": stderr, "n": len(labels), "unit": "images",
            "chance": 1 / len(head.labels),
            "per_class": {name: float((predicted[labels == i] == i).float().mean()) for i, name in enumerate(head.labels)
                          if (labels == i).any()}}
