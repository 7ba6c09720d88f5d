"""GGUF (llama.cpp's format): read a model file into a plinth config, state dict and tokenizer.

The `gguf` package parses the file and dequantizes its blocks; this module maps names, undoes the
layout changes llama.cpp made, and builds the config from the file's metadata.

    config, state_dict, tokenizer, dtype = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.tokenizer import GEMMA_TEMPLATE, Tokenizer
from plinth.weights.keys import map_key

GGUF_TO_PLINTH = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attn_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attn.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attn.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attn.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attn.wo.weight",
    "blk.{}.attn_q_norm.weight": "layers.{}.attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "layers.{}.attn.k_norm.weight",
    "blk.{}.post_attention_norm.weight": "layers.{}.post_attn_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.mlp_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.w_gate.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.w_up.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.w_down.weight",
    "blk.{}.post_ffw_norm.weight": "layers.{}.post_mlp_norm.weight",
}

# Tensor types plinth dequantizes (through gguf.quants), each checked against transformers in tests.
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's rows as (x0, y0, x1, y1, ...) for GGML's RoPE; plinth (like
    Hugging Face) rotates halves (x0, x1, ..., y0, y1, ...). Undo llama.cpp's permutation."""
    rows, cols = w.shape
    assert rows % (2 * n_heads) == 0, f"{rows} rows do not split into {n_heads} heads of pairs"
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `unpermute_rotary`: plinth's halves layout → llama.cpp's interleaved pairs."""
    rows, cols = w.shape
    assert rows % (2 * n_heads) == 0, f"{rows} rows do not split into {n_heads} heads of pairs"
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


@dataclass(frozen=True)
class Architecture:
    """How to read one `general.architecture`: its config, fixes to apply to named tensors, and the
    chat template for files that carry none."""
    config: Callable[[dict, str, set], ModelConfig]
    fixes: dict[str, Callable[[torch.Tensor, ModelConfig], torch.Tensor]]
    chat_template: str | None = None


def _base_config(meta: dict, arch: str, names: set) -> dict:
    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise PlinthError(f"GGUF metadata lacks '{arch}.{key}'; the file is incomplete or not a {arch} model")
        return value

    unsupported = {key: meta[f"{arch}.{key}"] for key in ("rope.scaling.type", "attn_logit_softcapping")
                   if meta.get(f"{arch}.{key}") not in (None, "none")}
    if unsupported:
        raise PlinthError(f"this {arch} GGUF uses {', '.join(f'{k}={v!r}' for k, v in unsupported.items())}, "
                          "which plinth does not implement; its outputs would be wrong")
    n_heads = get("attention.head_count")
    return dict(
        vocab_size=len(meta.get("tokenizer.ggml.tokens", [])) or get("vocab_size"),
        dim=get("embedding_length"), n_layers=get("block_count"), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        head_dim=meta.get(f"{arch}.attention.key_length") or get("embedding_length") // n_heads,
        ffn_dim=get("feed_forward_length"), max_seq_len=get("context_length"),
        norm_eps=get("attention.layer_norm_rms_epsilon"), rope_theta=get("rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in names)


def _llama_config(meta, arch, names):
    return ModelConfig(**_base_config(meta, arch, names))


# What llama.cpp's gemma3 loader takes where a file does not say it.
GEMMA3_GLOBAL_EVERY = 6             # every sixth layer (5, 11, 17, ...) attends globally, the rest in a window
GEMMA3_LOCAL_ROPE_THETA = 10000.0   # the sliding-window layers' rotary base (newer files: `rope.freq_base_swa`)


def _gemma3_config(meta, arch, names):
    """Gemma 3: GeGLU (tanh GELU), RMSNorm on each query/key head, norms after attention and after the
    MLP too, embeddings scaled by √width, a sliding window on all layers but every sixth, two rotary
    bases (`rope.freq_base` for the global layers; the local one is `rope.freq_base_swa`, which only
    newer files carry: without it, 10,000, as llama.cpp takes it). Norm weights are stored as (1 + w)
    already, which is what plinth's RMSNorm multiplies by. The softmax scale is
    1/√query_pre_attn_scalar, which no key carries: head_dim up to 12B (the 27B's is width/heads, as
    llama.cpp knows by its 62 layers; 4B and up also stretch the global rotary base,
    `rope.scaling.type`, which `_base_config` refuses)."""
    base = _base_config(meta, arch, names)
    window = meta.get(f"{arch}.attention.sliding_window")
    if window is None:
        raise PlinthError(f"GGUF metadata lacks '{arch}.attention.sliding_window'; the file is incomplete")
    return ModelConfig(**base, mlp="geglu", qk_norm=True, sandwich_norm=True, embed_scale=True,
                       attn_scale=meta.get(f"{arch}.attention.scale", base["head_dim"] ** -0.5), sliding_window=window,
                       global_every=_global_every(meta.get(f"{arch}.attention.sliding_window_pattern"),
                                                  base["n_layers"], GEMMA3_GLOBAL_EVERY),
                       rope_local_theta=meta.get(f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA),
                       final_softcap=meta.get(f"{arch}.final_logit_softcapping"))


def _global_every(pattern: list | None, n_layers: int, default: int) -> int:
    """N such that every Nth layer is global, from a per-layer `sliding_window_pattern` (True =
    sliding) where the file has one."""
    if pattern is None:
        return default
    for every in range(1, n_layers + 1):
        if pattern == [(i + 1) % every != 0 for i in range(n_layers)]:
            return every
    raise PlinthError(f"sliding_window_pattern {pattern!r} is not 'every Nth layer global', the only "
                      "layout plinth runs")


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(config=_llama_config, fixes={
        "attn.wq.weight": lambda w, c: unpermute_rotary(w, c.n_heads),
        "attn.wk.weight": lambda w, c: unpermute_rotary(w, c.n_kv_heads),
    }),
    # llama.cpp stores Gemma's Q/K rows as Hugging Face has them (its RoPE for gemma3 is the NeoX,
    # rotate-halves kind, plinth's own): nothing to undo.
    "gemma3": Architecture(config=_gemma3_config, fixes={}, chat_template=GEMMA_TEMPLATE),
}


def open_gguf(path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise PlinthError(f"no such model file: {path}")
    try:
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:  # a cut-off download leaves tensors shorter than their header says
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} holds {t.data.nbytes} of {t.n_bytes} bytes")
    except Exception as e:  # the reader raises many kinds on a damaged file; all mean the same thing here
        raise PlinthError(f"{path} is not a readable GGUF file ({e}); it may be truncated or another "
                          "format: download it again or check the path") from e
    return reader


def metadata(reader: gguf.GGUFReader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()}


def dequantize(tensor) -> torch.Tensor:
    """One GGUF tensor as float32, in PyTorch's dimension order (GGUF lists dimensions reversed)."""
    qtype = Q(tensor.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        raise PlinthError(f"tensor {tensor.name} is stored as {qtype.name}, which plinth cannot read; "
                          f"supported types: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}. "
                          "Re-quantize the model to one of them (e.g. with llama.cpp's llama-quantize)")
    values = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


# GGML types of at most 4 bits a weight: int4 in memory keeps their precision (Q4_1's very codes).
FOUR_BIT_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q3_K, Q.Q2_K})


def compact_dtype(reader: gguf.GGUFReader) -> str:
    """int4 where 4-bit types hold most of the blocks' matrix weights, else int8. A file's type
    (`general.file_type`) does not say: a "Q4_K_M" file keeps some matrices at 6 or 8 bits, and
    rows that are not a multiple of 256 fall back to Q5_0 or Q8_0 (all of Gemma 3 270M's 640-wide
    ones: 76% of its block weights are 5 to 8 bits, which int4 would round again)."""
    weights = {True: 0, False: 0}
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            weights[Q(t.tensor_type) in FOUR_BIT_TYPES] += int(t.n_elements)
    return "int4" if weights[True] > weights[False] else "int8"


def read_gguf(path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, str]:
    """Config, float32 state dict, tokenizer, and the compact dtype that best keeps the file's precision."""
    reader = open_gguf(path)
    meta = metadata(reader)
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise PlinthError(f"{Path(path).name}: architecture {arch_name!r} is not supported; "
                          f"plinth reads: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[arch_name]
    names = {t.name for t in reader.tensors}
    config = arch.config(meta, arch_name, names)
    state_dict = {}
    for tensor in reader.tensors:
        name = map_key(tensor.name, GGUF_TO_PLINTH)
        value = dequantize(tensor)
        for suffix, fix in arch.fixes.items():
            if name.endswith(suffix):
                value = fix(value, config)
        state_dict[name] = value
    return config, state_dict, Tokenizer.from_gguf(meta, arch.chat_template), compact_dtype(reader)
