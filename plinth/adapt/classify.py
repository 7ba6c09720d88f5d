"""Classification heads: a linear layer on the pooled final hidden states of a backbone.

With the backbone frozen this is a linear probe (how much of the task the pretrained features
already hold); with it trained too (fully or through LoRA) it is classic fine-tuning for labels.

    model = Finetuned(backbone, ClassifierHead(backbone.config.dim, ["negative", "positive"]))
    plinth.load("runs/classify-sentiment/final").classify(["What a delight."])   # ['positive']
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from plinth.errors import PlinthError
from plinth.train.loop import IGNORE

POOLING = ("last", "mean")
HEAD_FILE, HEAD_CONFIG = "head.safetensors", "head.json"


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) hidden states → (B, C): the last real token's (in a causal model it has seen the
    whole text), or the mean over real tokens. mask: (B, T), True on real tokens."""
    if how == "last":
        last = mask.sum(1) - 1  # right padding: the last real token of each row
        return hidden[torch.arange(hidden.shape[0]), last]
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1)


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, labels: list[str], pooling: str = "last"):
        super().__init__()
        if pooling not in POOLING:
            raise PlinthError(f"pooling={pooling!r}; choose one of {', '.join(POOLING)}")
        self.labels, self.pooling = list(labels), pooling
        self.linear = nn.Linear(dim, len(labels))
        nn.init.normal_(self.linear.weight, 0.0, 0.02)  # small, so starting scores are near uniform
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden, mask):
        return self.linear(pool(hidden, mask, self.pooling).float())

    def save(self, folder):
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / HEAD_FILE))
        (Path(folder) / HEAD_CONFIG).write_text(json.dumps({"labels": self.labels, "pooling": self.pooling}))

    @classmethod
    def load(cls, folder) -> "ClassifierHead":
        config = json.loads((Path(folder) / HEAD_CONFIG).read_text())
        state = load_file(str(Path(folder) / HEAD_FILE))
        head = cls(state["linear.weight"].shape[1], config["labels"], config["pooling"])
        head.load_state_dict(state)
        return head


class Finetuned(nn.Module):
    """What the training loop trains: a backbone, with a head for classification.

    Inputs are batches padded with negative ids (see plinth/adapt/examples.py). Without a head it
    returns the language model's logits (B, T, V); with one, label scores as (B, 1, labels), so the
    loop's next-token cross-entropy against (B, 1) targets is the classification loss."""

    def __init__(self, backbone: nn.Module, head: ClassifierHead | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.config = backbone.config

    def forward(self, x):
        mask = x >= 0
        tokens = x.clamp(min=0)  # padding becomes token 0 at the end of each row: causal, so unseen
        if self.head is None:
            return self.backbone(tokens)
        return self.head(self.backbone.features(tokens), mask)[:, None, :]

    def logits_at_targets(self, x, y):
        """Training: scores only where a target counts, (N, V) and (N,) (see train/loop.py)."""
        if self.head is not None:
            return self(x)[:, 0], y[:, 0]
        keep = y != IGNORE
        hidden = self.backbone.features(x.clamp(min=0))[keep]  # (N, C)
        logits = self.backbone.output(hidden)
        cap = self.config.final_softcap
        return (torch.tanh(logits / cap) * cap if cap is not None else logits), y[keep]


@torch.inference_mode()
def classify(loaded, texts: list[str] | str, batch_size: int = 16) -> list[str]:
    """Labels for `texts` from a loaded model that carries a classifier head."""
    if loaded.head is None:
        raise PlinthError(f"{loaded.name} has no classification head; train one with `plinth finetune "
                          "recipes/classify-sentiment.yaml`, or label by prompting (plinth.adapt.prompting)")
    texts = [texts] if isinstance(texts, str) else list(texts)
    model = Finetuned(loaded.model, loaded.head)
    labels = []
    for start in range(0, len(texts), batch_size):
        rows = [loaded.tokenizer.encode(t) or [0] for t in texts[start:start + batch_size]]
        x = torch.full((len(rows), max(map(len, rows))), -1)
        for i, row in enumerate(rows):
            x[i, :len(row)] = torch.tensor(row)
        labels += [loaded.head.labels[i] for i in model(x)[:, 0].argmax(-1).tolist()]
    return labels
