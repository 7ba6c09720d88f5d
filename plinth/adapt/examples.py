"""Fine-tuning data in memory: tokenized examples, the deterministic batches the training loop
reads, and JSONL reading that names the bad line and field.

An `Example` is model input ids and targets. Language-model examples have one target per input
(the next token, or IGNORE where no loss is taken: prompts, user turns); classification examples
have a single target, the label index; regression examples a single float. Batches pad inputs with
PAD (-1, never a real token id) and targets with IGNORE, so the model wrapper knows each row's length.

    data = ExampleData(train, val, batch_size=8, seed=0)
    x, y = data.batch(step=3, micro=0)       # the same tensors on every run and after a resume
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plinth.errors import PlinthError
from plinth.train.loop import IGNORE

PAD = -1


@dataclass
class Example:
    tokens: list[int]
    targets: list[int] | list[float]  # token or class ids; or one number (regression)


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: inputs with PAD, targets with IGNORE. Float targets (one
    number per example) stay float: the training loop takes squared error for them."""
    width = max(len(e.tokens) for e in examples)
    target_width = max(len(e.targets) for e in examples)
    x = torch.full((len(examples), width), PAD, dtype=torch.long)
    dtype = torch.float32 if isinstance(examples[0].targets[0], float) else torch.long
    y = torch.full((len(examples), target_width), IGNORE, dtype=dtype)
    for row, e in enumerate(examples):
        x[row, :len(e.tokens)] = torch.tensor(e.tokens)
        y[row, :len(e.targets)] = torch.tensor(e.targets)
    return x, y


class ExampleData:
    """Train and validation examples, served as the training loop's batches.

    choices: for label tasks, the token id that starts each label's answer (accuracy is the share of
    rows whose highest-scoring choice, at the first target position, is the right one); for
    classification heads, the label count; None for open-ended text (chat).
    """

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, seed: int,
                 choices: list[int] | int | None = None):
        for split, examples in (("train", train), ("validation", val)):
            if not examples:
                raise PlinthError(f"the {split} split is empty; add examples or lower val_examples/max_examples")
        self.train, self.val, self.batch_size, self.seed, self.choices = train, val, batch_size, seed, choices

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples drawn by a generator seeded with (seed, step, micro): resumable, order-free."""
        rng = np.random.default_rng([self.seed, step, micro])
        picks = rng.choice(len(self.train), size=min(self.batch_size, len(self.train)), replace=False)
        return collate([self.train[i] for i in picks])

    def val_batches(self, count: int):
        """The first `count` batches of the validation examples, always the same ones (0 = all)."""
        B = self.batch_size
        stop = len(self.val) if count == 0 else min(len(self.val), count * B)
        for start in range(0, stop, B):
            yield collate(self.val[start:min(stop, start + B)])


def pack(examples: list[Example], length: int) -> list[Example]:
    """Concatenate consecutive short examples into rows of at most `length` tokens (fewer padded
    positions per batch). Attention is not blocked between packed examples; each keeps its own
    loss mask, so only its own target tokens count."""
    rows, tokens, targets = [], [], []
    for e in examples:
        if tokens and len(tokens) + len(e.tokens) > length:
            rows.append(Example(tokens, targets))
            tokens, targets = [], []
        tokens, targets = tokens + e.tokens, targets + e.targets
    if tokens:
        rows.append(Example(tokens, targets))
    return rows


def read_jsonl(path, fields: dict[str, type | tuple[type, ...]]) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL file, each record checked to have `fields` of the given
    types (a type, or a tuple of types any of which will do); a bad record is an error naming its
    line and field."""
    path = Path(path)
    if not path.is_file():
        raise PlinthError(f"no such data file: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlinthError(f"{path}, line {number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise PlinthError(f"{path}, line {number}: each line must be a JSON object")
        for name, kind in fields.items():
            if name not in record:
                raise PlinthError(f"{path}, line {number}: missing field {name!r}")
            if not isinstance(record[name], kind):
                expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise PlinthError(f"{path}, line {number}: field {name!r} must be {expected}, "
                                  f"got {type(record[name]).__name__}")
        records.append((number, record))
    if not records:
        raise PlinthError(f"{path} holds no records")
    return records
