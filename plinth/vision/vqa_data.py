"""Visual question answering data: (image, question, answer) records from easy-VQA's package or a
JSONL file, rendered through the language model's chat template as one-turn conversations (the
image, then the question; the answer is what the loss learns), and served as training batches.

    records = vqa_records("easy-vqa", "train")              # [(image path, question, answer), ...]
    shapes = with_answers(records, ["circle", "rectangle", "triangle"], "easy-vqa")  # those questions only
    data = VqaData.build(records, tokenizer, prep, tokens_per_image=16, batch_size=32, seed=0, val_images=200)
    (tokens, images), targets = data.batch(step=3, micro=0)  # the same tensors on every run and after a resume

easy-VQA comes from PyPI (`pip install --no-deps easy-vqa`): 64×64 images of one coloured shape,
questions about its shape and colour, 13 answers. Its files are read directly; nothing is downloaded.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from plinth.adapt.examples import PAD, ExampleData, read_jsonl
from plinth.adapt.sft import assistant_spans
from plinth.errors import PlinthError
from plinth.loss import IGNORE
from plinth.vision.data import mirror_at_random, step_generator
from plinth.vision.image_chat import encode_with_images, split_images
from plinth.vision.images import EASY_VQA, ImagePrep, easy_vqa_folder


def vqa_records(source: str, split: str = "train") -> list[tuple[Path, str, str]]:
    """(image path, question, answer) records: easy-VQA's `split` (train or test), or a JSONL file
    of {"image": path (relative to the file), "question", "answer"}."""
    if source == EASY_VQA:
        folder = easy_vqa_folder() / split
        questions = json.loads((folder / "questions.json").read_text())
        return [(folder / "images" / f"{image}.png", question, answer) for question, answer, image in questions]
    base = Path(source).parent
    return [(base / r["image"], r["question"], r["answer"])
            for _, r in read_jsonl(source, {"image": str, "question": str, "answer": str})]


def with_answers(records: list, answers: list[str], source: str) -> list:
    """The records whose answer is one of `answers` (all of them when it is empty): a first stage
    of training on one kind of question (easy-VQA's shapes, which a model otherwise learns last)."""
    if not answers:
        return records
    known = sorted({answer for _, _, answer in records})
    unknown = [answer for answer in answers if answer not in known]
    if unknown:
        raise PlinthError(f"answers {unknown} never answer a question of {source}; its answers are "
                          f"{', '.join(known)}. Fix the recipe's `answers` (or leave it empty for every question)")
    return [record for record in records if record[2] in answers]


def easy_vqa_answers() -> list[str]:
    return (easy_vqa_folder() / "answers.txt").read_text().split()


def conversation(question: str, answer: str | None = None) -> list[dict]:
    """One turn: the image, then the question; the answer as the assistant's reply (if given)."""
    user = {"role": "user", "content": [{"type": "image", "image": "_"}, {"type": "text", "text": question}]}
    return [user] + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def render(tokenizer, question: str, answer: str, tokens_per_image: int) -> tuple[list[int], list[int]]:
    """Input ids (IMAGE_SLOT for image tokens) and next-token targets, IGNORE but on the answer
    and the end of its turn."""
    messages, _ = split_images(conversation(question, answer))
    text, spans = assistant_spans(tokenizer, messages)
    ids, trained = encode_with_images(tokenizer, text, tokens_per_image, spans)
    return ids[:-1], [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)]


class VqaData(ExampleData):
    """Rendered examples (ids, targets, image number) over a shared uint8 image tensor (N, C, S, S);
    validation holds out whole images (every question about them), so it measures new images.
    flip: mirror each training image left-right with probability 1/2 (for questions that do not
    ask about left and right, as easy-VQA's do not)."""

    def __init__(self, train: list, val: list, pixels: torch.Tensor, prep: ImagePrep, batch_size: int, seed: int,
                 flip: bool = False, weights: np.ndarray | None = None):
        super().__init__(train, val, batch_size, seed, weights=weights)
        self.pixels, self.prep, self.flip = pixels, prep, flip

    @classmethod
    def build(cls, records, tokenizer, prep: ImagePrep, tokens_per_image: int, batch_size: int, seed: int,
              val_examples: int, max_examples: int = 0, flip: bool = False,
              balance_answers: float = 0.0) -> "VqaData":
        """balance_answers: draw each training question with probability proportional to its
        answer's count to the power −balance_answers (0: as they come; 1: every answer equally
        often), so that rare answers (easy-VQA's shapes, against its many yes/no) teach as much."""
        paths = sorted({path for path, _, _ in records})
        number = {path: i for i, path in enumerate(paths)}
        pixels = torch.from_numpy(np.stack([prep.pixels(path) for path in paths]))
        rendered = {}  # easy-VQA repeats its questions and answers: render each pair once
        examples = []
        answers = []
        for path, question, answer in records:
            key = (question, answer)
            if key not in rendered:
                rendered[key] = render(tokenizer, question, answer, tokens_per_image)
            examples.append((*rendered[key], number[path]))
            answers.append(answer)
        held = set(np.random.default_rng(seed).permutation(len(paths)).tolist()[:max(1, len(paths) // 10)])
        val = [e for e in examples if e[2] in held][:val_examples]
        train = [i for i, e in enumerate(examples) if e[2] not in held]
        train = train[:max_examples] if max_examples else train
        weights = None
        if balance_answers:
            counts = Counter(answers[i] for i in train)
            weights = np.array([counts[answers[i]] ** -balance_answers for i in train])
        return cls([examples[i] for i in train], val, pixels, prep, batch_size, seed, flip, weights)

    def batch(self, step: int, micro: int):
        (tokens, images), targets = super().batch(step, micro)
        if self.flip:
            images = mirror_at_random(images, step_generator(self.seed, step, micro, 1))
        return (tokens, images), targets

    def collate(self, examples: list) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        width = max(len(ids) for ids, _, _ in examples)
        x = torch.full((len(examples), width), PAD, dtype=torch.long)
        y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, (ids, targets, _) in enumerate(examples):
            x[row, :len(ids)], y[row, :len(targets)] = torch.tensor(ids), torch.tensor(targets)
        images = self.prep.normalize(self.pixels[[image for _, _, image in examples]])
        return (x, images), y
