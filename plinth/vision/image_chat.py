"""Conversations with images, as an image+text model reads them: OpenAI-style content parts in,
token ids with image slots out — the same way in training, `plinth.load(...).chat`, the CLI and
the server.

A message's content may be text or a list of parts: {"type": "text", "text": ...} and
{"type": "image_url", "image_url": {"url": ...}} (OpenAI's shape), or from Python
{"type": "image", "image": PIL image | path | uint8 array}. Each image part becomes IMAGE_MARK in
the text the chat template renders, followed by a newline (LLaVA's "<image>\\nquestion"; text parts
are joined as they are), and each mark becomes `tokens_per_image` image slots in the token ids.

    messages, images = split_images(messages)               # text-only messages + the images, in order
    text = tokenizer.apply_chat_template(messages)
    ids, trained = encode_with_images(tokenizer, text, 16)  # IMAGE_SLOT where image tokens go
"""
from __future__ import annotations

import torch

from plinth.engine import ImageInput, TextOnly
from plinth.errors import PlinthError
from plinth.vision.image_sources import load_image
from plinth.vision.images import ImagePrep
from plinth.vision.multimodal import IMAGE_SLOT

IMAGE_MARK = "<image>"
IMAGE_PARTS = ("image_url", "image", "input_image")


def split_images(messages: list[dict]) -> tuple[list[dict], list]:
    """Messages whose content is text (IMAGE_MARK where each image part was), and the image parts'
    payloads in order: an OpenAI `image_url` object ({"url", "detail"}) or a Python image. Text
    that itself contains IMAGE_MARK is refused, since the marks say where images go."""
    out, images = [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            if isinstance(content, str) and IMAGE_MARK in content:
                raise marked_text(i)
            out.append(message)
            continue
        pieces = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise PlinthError(f"messages[{i}].content[{k}]: a text part needs a 'text' string")
                if IMAGE_MARK in text:
                    raise marked_text(i)
                pieces.append(text)
            elif kind in IMAGE_PARTS:
                payload = part.get(kind)
                if payload is None:
                    raise PlinthError(f"messages[{i}].content[{k}]: an {kind} part needs its {kind!r} field")
                images.append(payload)
                pieces.append(IMAGE_MARK + "\n")
            else:
                raise PlinthError(f"messages[{i}].content[{k}]: unknown content part type {kind!r}; "
                                  f"use 'text' or 'image_url'")
        out.append({**message, "content": "".join(pieces)})
    return out, images


def marked_text(index: int) -> PlinthError:
    return PlinthError(f"messages[{index}] contains the text {IMAGE_MARK!r}, which marks where images go in "
                       "an image+text model's prompt; send images as image_url parts and remove the text")


def encode_with_images(tokenizer, text: str, tokens_per_image: int,
                       spans: list[tuple[int, int]] = ()) -> tuple[list[int], list[bool]]:
    """Token ids of rendered `text`, each IMAGE_MARK replaced by `tokens_per_image` IMAGE_SLOTs,
    and for each id whether it lies inside one of the character `spans` (the assistant turns that
    training learns; image slots never do). The text between marks is encoded piece by piece, as
    the same function does for every prompt, so training and serving see the same ids."""
    ids, trained, start = [], [], 0
    for n, piece in enumerate(text.split(IMAGE_MARK)):
        if n:
            ids += [IMAGE_SLOT] * tokens_per_image
            trained += [False] * tokens_per_image
            start += len(IMAGE_MARK)
        encoding = tokenizer.backend.encode(piece, add_special_tokens=False)
        ids += encoding.ids
        trained += [any(a <= start + offset < b for a, b in spans) for offset, _ in encoding.offsets]
        start += len(piece)
    return ids, trained


def engine_prompt(ids: list[int]) -> tuple[list[int], list[int]]:
    """Ids for the engine (image slots as token 0: any valid id, never read) and the slots' positions."""
    positions = [p for p, t in enumerate(ids) if t == IMAGE_SLOT]
    return [0 if t == IMAGE_SLOT else t for t in ids], positions


def image_prompt(tokenizer, vision, text: str, images: list, limits) -> tuple[list[int], ImageInput | None]:
    """The engine's prompt ids for rendered `text`, and its images: each part's payload loaded
    (plinth/vision/image_sources.py, within `limits`), fitted and normalised as the encoder's config
    says, with the prompt positions their tokens fill. None for a text-only prompt."""
    if not images:
        return tokenizer.encode(text, add_bos=False), None
    if vision is None:
        raise TextOnly()
    ids, _ = encode_with_images(tokenizer, text, vision.tokens_per_image)
    prompt, positions = engine_prompt(ids)
    prep = ImagePrep.from_config(vision.encoder.config)
    pixels = prep.batch([load_image(payload, limits) for payload in images])
    return prompt, ImageInput(pixels, torch.tensor(positions))
