"""OpenAI's image generation route, /v1/images/generations, for a served image generator
(plinth/vision/imagine.py): a prompt in, `n` PNG images out, base64-encoded (`b64_json`).

The engine thread owns the generator as it owns a language model: the images are drawn as engine
tasks (`ServerState.in_steps`), never on the HTTP handler's thread. A task draws a few images as
one batch, so a large request neither holds the engine for long (its heartbeat, other requests)
nor runs on after its client has gone.

    client.images.generate(model="any", prompt="an ankle boot", n=4, size="28x28", extra_body={"seed": 1})
"""
from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from functools import partial

import torch
from fastapi import APIRouter, Request

from plinth.errors import PlinthError
from plinth.serve.openai_api import server_state
from plinth.serve.openapi import ImagesResponse, error_responses
from plinth.serve.schemas import APIError, ImageGenerationRequest
from plinth.vision.imagine import ImageGenerator, to_image

router = APIRouter()

# Images × sampling steps per engine task: a request's images at the default 16 steps are one batch
# (n ≤ 10), while at 1,000 steps each image is a task of its own.
IMAGE_STEPS_PER_TASK = 256


@router.post("/v1/images/generations", responses={200: {"model": ImagesResponse},
                                                  **error_responses(400, 401, 404, 413, 503)})
async def generate_images(body: ImageGenerationRequest, request: Request):
    state = server_state(request)
    state.resolve_model(body.model if body.model is not None else state.name)
    generator = state.image_generator()
    side = check_served(body, generator.size)
    steps, guidance = sampling(body, generator)
    seed = body.seed if body.seed is not None else state.default_seed(body.prompt)
    seed = seed if seed is not None else random.randrange(2**31)  # no --seed either: new images every time
    n = body.n or 1
    pixels = await state.in_steps(partial(draw, generator, body.prompt, seed, steps, guidance), list(range(n)),
                                  lambda _: steps, IMAGE_STEPS_PER_TASK, request)
    images = await asyncio.to_thread(lambda: [png_base64(p) for p in pixels])  # encoding is work: off the event loop
    prompt_tokens = len(generator.embedder.encode([body.prompt])[0]) if body.prompt.strip() else 0  # "": not read
    image_tokens = n * generator.denoiser.config.n_patches
    return {"created": int(time.time()), "data": [{"b64_json": image} for image in images], "background": "opaque",
            "output_format": "png", "size": side,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": image_tokens,
                      "total_tokens": prompt_tokens + image_tokens,
                      "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
                      "output_tokens_details": {"text_tokens": 0, "image_tokens": image_tokens}}}


def check_served(body: ImageGenerationRequest, side: int) -> str:
    """The size of the images ("WxH"), or a 400 for a value of OpenAI's that this server cannot serve."""
    size = f"{side}x{side}"
    if body.size not in (None, "auto", size):
        raise APIError(400, f"size {body.size!r} is not available: this model draws {size} images; give "
                            f"size {size!r} or 'auto', or leave it out", param="size")
    if body.response_format == "url":
        raise APIError(400, "response_format 'url' is not supported: this server returns the images in the "
                            "response as base64 PNG; give b64_json or leave it out", param="response_format")
    if body.output_format not in (None, "png"):
        raise APIError(400, f"output_format {body.output_format!r} is not supported: this server returns PNG "
                            "images; give png or leave it out", param="output_format")
    if body.background == "transparent":
        raise APIError(400, "background 'transparent' is not supported: this model draws opaque images; give "
                            "opaque or auto, or leave it out", param="background")
    if body.stream:
        raise APIError(400, "stream is not supported for images: they come in one response; leave stream out",
                       param="stream")
    return size


def sampling(body: ImageGenerationRequest, generator: ImageGenerator) -> tuple[int, float]:
    """The request's steps and guidance (the model's where it gives none), or a 400 naming the one
    out of ImageGenerator.check's range."""
    default_steps, default_guidance = generator.settings["steps"], generator.settings["guidance"]
    steps = body.steps if body.steps is not None else default_steps
    guidance = body.guidance if body.guidance is not None else default_guidance
    for param, values in (("steps", (steps, default_guidance)), ("guidance", (steps, guidance))):
        try:
            generator.check(*values)
        except PlinthError as e:
            raise APIError(400, str(e), param=param) from e
    return steps, guidance


def draw(generator: ImageGenerator, prompt: str, seed: int, steps: int, guidance: float,
         indices: list[int]) -> list[torch.Tensor]:
    """One engine task: images `indices` of a request, drawn as one batch whose noise comes from
    seed + the first index (a request's first batch has the noise of `plinth imagine --seed`)."""
    return list(generator.generate([prompt] * len(indices), seed + indices[0], steps, guidance))


def png_base64(pixels: torch.Tensor) -> str:
    buffer = io.BytesIO()
    to_image(pixels).save(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()
