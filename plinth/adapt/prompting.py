"""Solve a labelling task with no training: zero-shot and k-shot prompts, and answers read back
into the label set.

A prompt is a chat: optional labelled examples as earlier user/assistant turns, then the question.
The label is read either by scoring (the label whose first token the model finds most likely right
after the prompt: always a valid label, one forward pass) or by generating a short reply and
finding the first label it names (`parse_answer`).

    task = PromptTask("Is this movie review positive or negative?", ["negative", "positive"])
    task = task.with_shots(pick_shots(train_examples, k=8))
    predict(plinth.load("smollm2-135m-instruct"), task, ["A joyless, plodding mess."])  # ['negative']

    plinth prompt smollm2-135m-instruct --labels negative,positive "A joyless, plodding mess."
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from plinth.errors import PlinthError
from plinth.kv_cache import KVCache


@dataclass(frozen=True)
class PromptTask:
    instruction: str
    labels: tuple[str, ...]
    shots: tuple[tuple[str, str], ...] = field(default=())  # (text, label) examples shown first

    def __post_init__(self):
        labels = tuple(self.labels)
        if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x.strip() for x in labels):
            raise PlinthError(f"labels must be two or more distinct non-empty strings, got {list(labels)}")
        object.__setattr__(self, "labels", labels)
        for text, label in self.shots:
            check_label(label, labels)

    def question(self, text: str) -> str:
        return f"{self.instruction}\nAnswer with one word: {' or '.join(self.labels)}.\n\n{text}"

    def messages(self, text: str, answer: str | None = None) -> list[dict]:
        """The conversation that asks about `text` (and, for training, ends with its answer)."""
        turns = []
        for shot_text, shot_label in self.shots:
            turns += [{"role": "user", "content": self.question(shot_text)},
                      {"role": "assistant", "content": shot_label}]
        turns.append({"role": "user", "content": self.question(text)})
        if answer is not None:
            turns.append({"role": "assistant", "content": check_label(answer, self.labels)})
        return turns

    def with_shots(self, shots) -> "PromptTask":
        return replace(self, shots=tuple((t, label) for t, label in shots))


def check_label(label: str, labels) -> str:
    if label not in labels:
        raise PlinthError(f"label {label!r} is not in the label set {list(labels)}; fix the data or the `labels` list")
    return label


def pick_shots(examples, k: int, labels, seed: int = 0) -> list[tuple[str, str]]:
    """k (text, label) pairs from `examples` (objects with .text and .label), labels taking turns so
    that every label is shown, in a fixed order for a given seed."""
    rng = np.random.default_rng(seed)
    by_label = {label: [e for e in examples if e.label == label] for label in labels}
    for label, items in by_label.items():
        if not items:
            raise PlinthError(f"no example labelled {label!r} to show; k-shot needs every label")
        rng.shuffle(items)
    return [(by_label[labels[i % len(labels)]][i // len(labels)].text, labels[i % len(labels)]) for i in range(k)]


def parse_answer(reply: str, labels) -> str | None:
    """The label a free-text reply names first (case-insensitive, whole words), or None."""
    found = [(m.start(), label) for label in labels
             for m in [re.search(rf"\b{re.escape(label.lower())}\b", reply.lower())] if m]
    return min(found)[1] if found else None


def prompt_ids(tokenizer, task: PromptTask, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(task.messages(text), add_generation_prompt=True)
    return tokenizer.encode(rendered, add_bos=False)


def answer_tokens(tokenizer, task: PromptTask) -> list[int]:
    """The token that starts each label when the assistant answers; they must differ to be scored."""
    prompt = tokenizer.apply_chat_template(task.messages("x"), add_generation_prompt=True)
    start = len(tokenizer.encode(prompt, add_bos=False))
    firsts = [tokenizer.encode(prompt + label, add_bos=False)[start] for label in task.labels]
    if len(set(firsts)) != len(firsts):
        raise PlinthError(f"labels {list(task.labels)} start with the same token; choose labels that begin "
                          "differently (e.g. other words), or read answers with mode='generate'")
    return firsts


@torch.inference_mode()
def score(model, tokenizer, task: PromptTask, texts: list[str]) -> list[str]:
    """For each text, the label whose first token is most likely right after the prompt.

    Every prompt starts with the same tokens (system turn, instruction, k-shot examples): their keys
    and values are computed once into a KV cache, and each text runs only its own tokens after them."""
    if not texts:
        return []
    choices = torch.tensor(answer_tokens(tokenizer, task))
    prompts = [prompt_ids(tokenizer, task, text) for text in texts]
    longest = max(len(p) for p in prompts)
    if longest > model.config.max_seq_len:
        raise PlinthError(f"a prompt has {longest} tokens, more than the model's context of "
                          f"{model.config.max_seq_len}; use fewer or shorter examples (shots)")
    shared = min(len(p) for p in prompts) - 1  # keep at least one token of each prompt to run
    for p in prompts[1:]:
        shared = next((i for i in range(shared) if p[i] != prompts[0][i]), shared)
    cache = KVCache.for_model(model, 1, longest)
    if shared:
        model(torch.tensor([prompts[0][:shared]]), cache=cache.view(), last=torch.tensor([shared - 1]))
    predictions = []
    for ids in prompts:
        rest = ids[shared:]
        logits = model(torch.tensor([rest]), cache=cache.view(shared), last=torch.tensor([len(rest) - 1]))[0]
        predictions.append(task.labels[int(logits[choices].argmax())])
    return predictions


def predict(loaded, task: PromptTask, texts: list[str], mode: str = "score") -> list[str | None]:
    """Labels for `texts` from a `plinth.load(...)` model: by scoring, or by a greedy reply read
    with `parse_answer` (None where the reply names no label)."""
    if mode == "score":
        return score(loaded.model, loaded.tokenizer, task, texts)
    if mode != "generate":
        raise PlinthError(f"mode={mode!r}; choose score or generate")
    return [parse_answer(loaded.chat(task.messages(t), temperature=0, max_tokens=8), task.labels) for t in texts]
