"""Heads on pooled final hidden states: class scores (classification) or one number (regression).

With the backbone frozen this is a linear probe (how much of the task the pretrained features
already hold); with it trained too (fully or through LoRA) it is classic fine-tuning for labels or
scores.

    model = Finetuned(backbone, Head(backbone.config.dim, ["negative", "positive"]))   # classification
    model = Finetuned(backbone, Head(backbone.config.dim, labels=None))                # regression
    plinth.load("runs/classify-sentiment/final").classify(["What a delight."])   # ['positive']
    plinth.load("runs/regress-sentiment/final").predict(["What a delight."])     # [2.7]
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from plinth.adapt.examples import model_inputs
from plinth.errors import PlinthError
from plinth.loss import IGNORE, summed_loss
from plinth.vision.images import ImagePrep

POOLING = ("last", "mean", "first")
KINDS = ("classification", "regression")
HEAD_FILE, HEAD_CONFIG = "head.safetensors", "head.json"


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, C) hidden states → (B, C): the last real token's (in a causal model it has seen the
    whole text), the mean over real tokens, or the first position's (an image model's class
    token). mask: (B, T), True on real tokens; None: every position is (image patches)."""
    if how == "first":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if how == "last":
        last = mask.sum(1) - 1  # right padding: the last real token of each row
        return hidden[torch.arange(hidden.shape[0]), last]
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1)


class Head(nn.Module):
    """A linear layer on pooled hidden states. labels: the class names, one score each
    (classification, trained with cross-entropy); None: a single number per text (regression,
    trained with squared error against float targets)."""

    def __init__(self, dim: int, labels: list[str] | None, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLING:
            raise PlinthError(f"pooling={pooling!r}; choose one of {', '.join(POOLING)}")
        self.labels, self.pooling = (None if labels is None else list(labels)), pooling
        self.kind = "regression" if labels is None else "classification"
        self.linear = nn.Linear(dim, 1 if labels is None else len(labels))
        nn.init.normal_(self.linear.weight, 0.0, 0.02)  # small, so starting scores are near uniform (or 0)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden, mask):
        """(B, labels) class scores, or (B,) numbers."""
        out = self.linear(pool(hidden, mask, self.pooling).float())
        return out[:, 0] if self.labels is None else out

    @torch.inference_mode()
    def outputs(self, loaded, inputs: list, batch_size: int = 16) -> torch.Tensor:
        """The head's raw outputs on the backbone `loaded.model`: (N, labels) class scores or (N,)
        numbers. `inputs`: texts, or for an image model, images (paths, PIL images or arrays),
        prepared as in training (plinth/vision/images.py)."""
        model = Finetuned(loaded.model, self)
        if loaded.model.config.is_image:
            prep = ImagePrep.from_config(loaded.model.config)
            return torch.cat([model(prep.batch(inputs[i:i + batch_size])) for i in range(0, len(inputs), batch_size)])
        out = []
        for start in range(0, len(inputs), batch_size):
            rows = [loaded.tokenizer.encode(t) or [0] for t in inputs[start:start + batch_size]]
            x = torch.full((len(rows), max(map(len, rows))), -1)
            for i, row in enumerate(rows):
                x[i, :len(row)] = torch.tensor(row)
            out.append(model(x))
        return torch.cat(out)

    def predict(self, loaded, inputs, batch_size: int = 16) -> list:
        """This head's answer for each input (see `outputs`): a label (classification) or a number
        (regression). `LoadedModel.predict` calls this."""
        inputs = [inputs] if isinstance(inputs, str) or not isinstance(inputs, (list, tuple)) else list(inputs)
        out = self.outputs(loaded, inputs, batch_size)
        return out.tolist() if self.labels is None else [self.labels[i] for i in out.argmax(-1).tolist()]

    def top_labels(self, loaded, inputs: list, k: int = 3) -> list[list[tuple[str, float]]]:
        """For each input, its `k` likeliest labels with their probabilities (a softmax of the scores)."""
        if self.labels is None:
            raise PlinthError(f"{loaded.name} has a regression head: it predicts numbers, not labels")
        probabilities = self.outputs(loaded, list(inputs)).float().softmax(-1)
        best = probabilities.topk(min(k, len(self.labels)), dim=-1)
        return [[(self.labels[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
                for row_p, row_i in zip(best.values, best.indices)]

    def classify(self, loaded, inputs, batch_size: int = 16) -> list[str]:
        """Labels for texts (or images), from a classification head. `LoadedModel.classify` calls this."""
        if self.labels is None:
            raise PlinthError(f"{loaded.name} has a regression head: it predicts numbers, not labels; "
                              "call .predict(texts)")
        return self.predict(loaded, inputs, batch_size)

    def save(self, folder):
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / HEAD_FILE))
        config = {"kind": self.kind, "labels": self.labels, "pooling": self.pooling}
        (Path(folder) / HEAD_CONFIG).write_text(json.dumps(config))

    @classmethod
    def load(cls, folder) -> "Head":
        config = json.loads((Path(folder) / HEAD_CONFIG).read_text())
        kind = config.get("kind", "classification")  # heads saved before regression existed name no kind
        if kind not in KINDS:
            raise PlinthError(f"{Path(folder) / HEAD_CONFIG}: unknown head kind {kind!r}; plinth knows {', '.join(KINDS)}")
        state = load_file(str(Path(folder) / HEAD_FILE))
        head = cls(state["linear.weight"].shape[1], config["labels"] if kind == "classification" else None,
                   config["pooling"])
        head.load_state_dict(state)
        return head


class Finetuned(nn.Module):
    """What the training loop trains: a backbone, with a head for classification or regression.

    Inputs are batches padded with negative ids, (B, T), or packed rows, (B, 2, T) (see
    plinth/adapt/examples.py); for an image backbone, normalised images (B, C, S, S). Without a head it returns the language model's logits (B, T, V);
    with one, the head's outputs: (B, labels) class scores or (B,) numbers, one per row."""

    def __init__(self, backbone: nn.Module, head: Head | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.config = backbone.config

    def forward(self, x, targets=None, keep=None):
        """The outputs above; with `targets` (B, T) token ids, or (B, 1) class ids or numbers for
        a head: instead, the loss summed over the targets that count (see plinth/loss.py). An image
        head's targets may carry, after the class id, the patches that run (see `logits_at_targets`).
        keep: (B, n) for an image model: run only these patches (training on part of each image)."""
        if targets is not None:
            if self.head is not None:
                return summed_loss(*self.logits_at_targets(x, targets))
            return self.backbone.output_loss(*self._features_at_targets(x, targets))
        if self.config.is_image:
            return self.head(self.backbone.features(images=x, keep=keep), None)
        tokens, documents = model_inputs(x)
        mask = tokens >= 0
        tokens = tokens.clamp(min=0)  # padding becomes token 0 at the end of each row: causal, so unseen
        if self.head is None:
            return self.backbone(tokens, documents=documents)
        return self.head(self.backbone.features(tokens, documents=documents), mask)

    def logits_at_targets(self, x, y):
        """Evaluation: scores only where a target counts, (N, V) and (N,). With a head, one target
        per row: (B, labels) and (B,) class ids, or (B,) and (B,) numbers. For an image model, y's
        further columns, if any, are the patches that run (plinth/vision/data.py `keep_patches`)."""
        if self.head is not None:
            return self(x, keep=y[:, 1:] if self.config.is_image and y.shape[1] > 1 else None), y[:, 0]
        hidden, kept = self._features_at_targets(x, y)
        return self.backbone.project(hidden), kept

    def _features_at_targets(self, x, y):
        """Final hidden states (N, C) and targets (N,) of the positions whose target counts: most
        positions of fine-tuning data are masked, and the vocabulary projection is the largest
        matmul (and activation) of a small model."""
        tokens, documents = model_inputs(x)
        keep = y != IGNORE
        return self.backbone.features(tokens.clamp(min=0), documents=documents)[keep], y[keep]
