"""What a fine-tuning run trains and keeps: which weights train (`make_trainable`), and what a
checkpoint holds of them (`FinetuneWeights`). `r` is a FinetuneRecipe (plinth/adapt/finetune.py);
text and image+text fine-tuning (plinth/adapt/image_text.py) share both.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from plinth.adapt import lora
from plinth.adapt.adapted import FINETUNE_CONFIG, base_reference
from plinth.adapt.classify import Finetuned, Head
from plinth.model import Transformer
from plinth.train import checkpoint
from plinth.weights.native import read_native, write_model


def make_trainable(r, net: Transformer):
    """All weights trainable (full), LoRA adapters on a frozen base (4-bit for QLoRA), or none (probe)."""
    if r.method in ("lora", "qlora"):
        if r.method == "qlora":
            lora.quantize_base(net)  # every block projection in 4-bit, adapters or not
        lora.attach_lora(net, r.lora_rank, r.lora_alpha, r.lora_dropout, r.lora_targets)
    else:
        net.requires_grad_(r.method == "full")


class FinetuneWeights(checkpoint.Weights):
    """A fine-tuning checkpoint holds what was trained: the adapter, all backbone weights (full), the
    head; plus finetune.json, which names the base and the task."""

    def __init__(self, r):
        self.r = r

    def write(self, model: Finetuned, folder: Path):
        self.write_backbone(model.backbone, folder)
        if model.head is not None:
            model.head.save(folder)

    def write_backbone(self, net, folder: Path):
        """The trained part of a language or image backbone, and finetune.json."""
        r = self.r
        if r.method in ("lora", "qlora"):
            lora.save_adapter(net, folder, base=base_reference(r.base), nf4_base=r.method == "qlora")
        elif r.method == "full":
            write_model(net, folder)
        labelled = r.task in ("label", "classify")  # regression and chat have no label set
        config = {"base": base_reference(r.base), "task": r.task, "method": r.method,
                  "labels": r.labels if labelled else None, "instruction": r.instruction}
        (folder / FINETUNE_CONFIG).write_text(json.dumps(config, indent=2))

    def read(self, model: Finetuned, folder: Path):
        self.read_backbone(model.backbone, folder)
        if model.head is not None:
            model.head.load_state_dict(Head.load(folder).state_dict())

    def read_backbone(self, net, folder: Path):
        if self.r.method in ("lora", "qlora"):
            lora.load_adapter_weights(net, load_file(str(folder / lora.ADAPTER_FILE)))
        elif self.r.method == "full":
            net.load_weights(read_native(folder)[1])
