"""Fine-tuning data in memory: tokenized examples, the deterministic batches the training loop
reads, and JSONL reading that names the bad line and field.

An `Example` is model input ids and targets. Language-model examples have one target per input
(the next token, or IGNORE where no loss is taken: prompts, user turns); classification examples
have a single target, the label index; regression examples a single float. Batches pad inputs with
PAD (-1, never a real token id) and targets with IGNORE, so the model wrapper knows each row's length.
Packed rows (`pack`: several short examples in one row) also carry each token's example number, so
that the model restarts positions and attends only within each example, as if it ran alone.

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
from plinth.loss import IGNORE

PAD = -1


@dataclass
class Example:
    tokens: list[int]
    targets: list[int] | list[float]  # token or class ids; or one number (regression)
    documents: list[int] | None = None  # packed rows: the number of the example each token belongs to


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: inputs with PAD, targets with IGNORE. Float targets (one
    number per example) stay float: the training loop takes squared error for them. Packed rows
    give x of shape (B, 2, T): the token ids, then each token's example number (padding, PAD in
    both, is an example of its own)."""
    width = max(len(e.tokens) for e in examples)
    target_width = max(len(e.targets) for e in examples)
    packed = examples[0].documents is not None
    x = torch.full((len(examples), 2, width) if packed else (len(examples), width), PAD, dtype=torch.long)
    dtype = torch.float32 if isinstance(examples[0].targets[0], float) else torch.long
    y = torch.full((len(examples), target_width), IGNORE, dtype=dtype)
    for row, e in enumerate(examples):
        if packed:
            x[row, :, :len(e.tokens)] = torch.tensor([e.tokens, e.documents])
        else:
            x[row, :len(e.tokens)] = torch.tensor(e.tokens)
        y[row, :len(e.targets)] = torch.tensor(e.targets)
    return x, y


def model_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's (B, T) token ids, and for packed rows the (B, T) example numbers (else None)."""
    return (x[:, 0], x[:, 1]) if x.dim() == 3 else (x, None)


class ExampleData:
    """Train and validation examples, served as the training loop's batches.

    choices: for label tasks, the token id that starts each label's answer (accuracy is the share of
    rows whose highest-scoring choice, at the first target position, is the right one); for
    classification heads, the label count; None for open-ended text (chat). weights: how likely each
    training example is to be drawn, relative to the others (None: all alike).
    """

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, seed: int,
                 choices: list[int] | int | None = None, weights: np.ndarray | None = None):
        for split, examples in (("train", train), ("validation", val)):
            if not examples:
                raise PlinthError(f"the {split} split is empty; add examples or lower val_examples/max_examples")
        self.train, self.val, self.batch_size, self.seed, self.choices = train, val, batch_size, seed, choices
        self.p = None if weights is None else weights / weights.sum()

    collate = staticmethod(collate)  # a subclass may batch its own kind of example

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples drawn by a generator seeded with (seed, step, micro): resumable, order-free."""
        rng = np.random.default_rng([self.seed, step, micro])
        picks = rng.choice(len(self.train), size=min(self.batch_size, len(self.train)), replace=False, p=self.p)
        return self.collate([self.train[i] for i in picks])

    def val_batches(self, count: int):
        """The first `count` batches of the validation examples, always the same ones (0 = all)."""
        B = self.batch_size
        stop = len(self.val) if count == 0 else min(len(self.val), count * B)
        for start in range(0, stop, B):
            yield self.collate(self.val[start:min(stop, start + B)])


def pack(examples: list[Example], length: int) -> list[Example]:
    """Concatenate consecutive short examples into rows of at most `length` tokens (fewer padded
    positions per batch). Each token is labelled with its example's number in the row, so that
    attention stays within the example and its positions start at 0 (as torchtune's
    PackedDataset): a packed example's logits are those it has alone. Each keeps its loss mask."""
    rows, current = [], Example([], [], [])
    for e in examples:
        if current.tokens and len(current.tokens) + len(e.tokens) > length:
            rows.append(current)
            current = Example([], [], [])
        number = current.documents[-1] + 1 if current.documents else 0
        current.tokens += e.tokens
        current.targets += e.targets
        current.documents += [number] * len(e.tokens)
    if current.tokens:
        rows.append(current)
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
