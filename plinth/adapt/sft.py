"""Chat supervised fine-tuning data: conversations rendered through the model's own chat template,
with the loss taken on the assistant turns only.

    example = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    conversations = load_conversations("chitchat")   # or a JSONL file of {"messages": [...]}

Which tokens belong to an assistant turn is found from the template itself: the text rendered up to
the turn (with the generation prompt) and the text rendered through it bound the turn's characters,
and the tokenizer's character offsets map them to tokens. No per-template markers are hard-coded.
"""
from __future__ import annotations

import json

from plinth.adapt.examples import Example, read_jsonl
from plinth.data.chitchat import chitchat_conversations
from plinth.errors import PlinthError
from plinth.loss import IGNORE

ROLES = ("system", "user", "assistant")


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character span of each assistant turn,
    including the template's end-of-turn marker (so the model learns to stop)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not text.startswith(through) or not through.startswith(before):
            raise PlinthError("the chat template renders a conversation's beginning differently from the "
                              "whole; SFT needs a template whose earlier turns render the same way")
        spans.append((len(before), len(through)))
    return text, spans


def render(tokenizer, messages: list[dict], max_len: int | None = None) -> Example:
    """Token ids and next-token targets, IGNORE except on tokens inside assistant turns."""
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = encoding.ids
    trained = [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
    if max_len is not None:
        ids, trained = ids[:max_len + 1], trained[:max_len + 1]
    # position t predicts token t+1: a target counts when the predicted token is the assistant's
    targets = [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)]
    return Example(ids[:-1], targets)


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise PlinthError(f"{where}: field 'messages' must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PlinthError(f"{where}: messages[{k}] must be {{'role': one of {', '.join(ROLES)}, "
                              f"'content': text}}, got {json.dumps(m)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        raise PlinthError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def load_conversations(source: str) -> list[list[dict]]:
    """`chitchat`, or a JSONL file with one {"messages": [{"role", "content"}, ...]} per line."""
    if source == "chitchat":
        return chitchat_conversations()
    return [check_messages(r["messages"], f"{source}, line {line}") for line, r in read_jsonl(source, {"messages": list})]
