"""plinth: pretrain, load, adapt, evaluate and serve foundation models.

    import plinth
    m = plinth.load("smollm2-135m-instruct")
    print(m.chat([{"role": "user", "content": "Hello!"}]))

`plinth.load` is the facade over the loaders: `plinth.hub` turns a name into a path,
`plinth.adapt.adapted` reads fine-tuning runs on top of `plinth.weights.load` (GGUF, Hugging Face
folders, plinth checkpoints), and `plinth.quant` makes the weights compact for inference. It sits
here, at the top of the package, because reading a fine-tuned run needs adapt/ (LoRA, heads).
Importing `plinth` (or a light module such as `plinth.files`) does not import torch: the loaders
are imported on the first `load`.
"""
from __future__ import annotations

import time

from plinth import hub
from plinth.errors import PlinthError

__all__ = ["load", "LoadedModel", "PlinthError"]
__version__ = "0.1.0"


def load(model: str = hub.DEFAULT_MODEL, dtype: str | None = None, adapter: str | None = None):
    """Load a known model name, a .gguf file, a Hugging Face folder, or a plinth checkpoint /
    fine-tuning run folder; returns a `plinth.loaded.LoadedModel`.

    dtype: float32, bfloat16, int8 or int4. The default on CPU keeps a text model's weights compact,
    because decoding reads every weight once per token: int4 for files whose block matrices are mostly
    4-bit (their exact codes) with no adapter merged in, else int8; a large tied vocabulary layer
    (Gemma 3's) int4 either way; image models stay float32.
    adapter: a LoRA adapter folder, merged into the weights before they are made compact.
    A GGUF file's int4/int8 weights are kept after the first load and mapped by later ones
    (plinth/weights/packed.py).
    """
    import torch

    from plinth.adapt.adapted import read_adapted
    from plinth.loaded import LoadedModel
    from plinth.quant import compact_
    from plinth.weights.packed import packed_folder, read_packed, write_packed

    from plinth.vision.imagine import ImageGenerator, is_image_generator

    start = time.perf_counter()
    path = hub.resolve(model)
    if is_image_generator(path):  # a diffusion model: prompts in, images out (LoadedModel.imagine)
        generator = ImageGenerator.load(path, name=model)
        return LoadedModel(generator.denoiser.net, None, name=model, load_seconds=time.perf_counter() - start,
                           generator=generator)
    compact_file = path.suffix == ".gguf" and adapter is None and dtype in (None, "int4", "int8")
    packed = packed_folder(path, dtype) if compact_file else None
    if packed is not None and (kept := read_packed(packed)) is not None:  # made compact before: map it
        net, tokenizer, dtype = kept
        return LoadedModel(net, tokenizer, name=model, load_seconds=time.perf_counter() - start)
    net, tokenizer, compact, head, vision = read_adapted(path, adapter)
    if dtype is None:  # image models run batched, compute-bound forward passes: compact weights buy nothing
        dtype = compact if hasattr(torch, "_weight_int4pack_mm_for_cpu") and not net.config.is_image else "float32"
    compact_(net, dtype)
    if packed is not None:
        write_packed(packed, path, dtype, net, tokenizer)
    return LoadedModel(net, tokenizer, name=model, load_seconds=time.perf_counter() - start, head=head, vision=vision)


def __getattr__(name: str):
    if name == "LoadedModel":  # `plinth.LoadedModel` without importing torch at `import plinth`
        from plinth.loaded import LoadedModel
        return LoadedModel
    raise AttributeError(f"module 'plinth' has no attribute {name!r}")
