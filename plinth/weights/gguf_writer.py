"""Write a plinth model as a GGUF file that llama.cpp and Ollama run: the llama architecture (SmolLM2,
plinth's own pretrained models) or gemma3 (Gemma 3 and its fine-tunes).

The `gguf` package's GGUFWriter writes the binary format and `gguf.quants` quantizes; this module
supplies llama.cpp's metadata keys and tensor names (GGUF_TO_PLINTH inverted), puts llama's Q/K back
into llama.cpp's interleaved rotary layout, and describes the tokenizer (byte-level BPE as llama.cpp's
"gpt2" vocabulary, SentencePiece as its "llama" one).

    loaded = plinth.load("runs/pretrain-tiny/final", dtype="float32")
    write_gguf(loaded.model, loaded.tokenizer, "out/model.gguf", dtype="q4_0")

or from the shell: `plinth export runs/lora-sentiment/final --merge --to gguf out/model.gguf --gguf-type q4_0`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.files import atomic_file
from plinth.model import fused_parts
from plinth.tokenizer import (BYTE, BYTE_PIECE, CONTROL, NORMAL, PRE_TOKENIZERS, UNUSED, USER_DEFINED,
                              Tokenizer)
from plinth.weights.gguf import GEMMA3_GLOBAL_EVERY, GGUF_TO_PLINTH, permute_rotary
from plinth.weights.hf import GEMMA3_FLAGS, LLAMA_FLAGS, export_architecture
from plinth.weights.keys import invert, map_key

# --gguf-type → (GGML type of the matrices, of the output matrix, general.file_type); norms (1-D) stay
# F32 whatever the choice. These are the types gguf.quants can write: no k-quants (Q4_K, Q6_K). Under
# 8 bits the output matrix (or the tied embedding that serves as it) is Q8_0: its error reaches every
# logit, so llama.cpp's quantizer keeps it at Q6_K, or Q8_0 where Q6_K does not fit.
GGUF_TYPES = {
    "f32": (Q.F32, Q.F32, F.ALL_F32), "f16": (Q.F16, Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, Q.Q8_0, F.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, Q.Q8_0, F.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, Q.Q8_0, F.MOSTLY_Q5_0), "q4_1": (Q.Q4_1, Q.Q8_0, F.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, Q.Q8_0, F.MOSTLY_Q4_0),
}
# A matrix whose rows are not whole quantization blocks is written in this type instead, as llama.cpp's
# converter does.
FALLBACK_TYPE = Q.F16


@dataclass(frozen=True)
class Layout:
    """How to write one `general.architecture`."""
    flags: dict             # the config flags that make it: a value, or a test of the config
    fixes: dict[str, Callable[[torch.Tensor, ModelConfig], torch.Tensor]]  # by name suffix: plinth's layout → the file's
    metadata: Callable[[gguf.GGUFWriter, ModelConfig], None] = lambda writer, config: None  # keys beyond the common ones


def _gemma3_metadata(writer: gguf.GGUFWriter, c: ModelConfig):
    writer.add_sliding_window(c.sliding_window)
    writer.add_rope_freq_base_swa(c.rope_local_theta or c.rope_theta)  # the local layers' rotary base
    if c.global_every != GEMMA3_GLOBAL_EVERY:  # llama.cpp's default, which its converter leaves out
        writer.add_sliding_window_pattern([c.is_sliding(i) for i in range(c.n_layers)])
    if c.final_softcap is not None:
        writer.add_final_logit_softcapping(c.final_softcap)


GGUF_ARCHITECTURES = {
    # llama.cpp interleaves each head's rotary pairs; plinth rotates halves (see unpermute_rotary).
    "llama": Layout(LLAMA_FLAGS, fixes={"attn.wq.weight": lambda w, c: permute_rotary(w, c.n_heads),
                                        "attn.wk.weight": lambda w, c: permute_rotary(w, c.n_kv_heads)}),
    # Gemma's RoPE is the rotate-halves kind and its norms are stored as (1 + w), both as plinth has them.
    # llama.cpp derives the softmax scale from head_dim, which must hold.
    "gemma3": Layout({**GEMMA3_FLAGS,
                      "attn_scale": lambda c: c.attn_scale is None or math.isclose(c.attn_scale, c.head_dim ** -0.5),
                      "sliding_window": lambda c: c.sliding_window is not None},
                     fixes={}, metadata=_gemma3_metadata),
}


def write_gguf(model, tokenizer: Tokenizer, path, dtype: str = "f16", log=print) -> Path:
    """Write `model` (adapters already merged) and `tokenizer` to `path`, a new file: written
    under a temporary name beside it, then renamed, so a crash never leaves a half file at `path`.
    `log` gets a note naming the matrices written as FALLBACK_TYPE, if any."""
    if dtype not in GGUF_TYPES:
        why = " (the gguf package cannot quantize to it)" if dtype.upper() in Q.__members__ else ""
        raise PlinthError(f"cannot write GGUF type {dtype!r}{why}; plinth writes {', '.join(GGUF_TYPES)}. "
                          "For another type, quantize an f16 export with llama.cpp's llama-quantize")
    config, path = model.config, Path(path)
    arch = export_architecture(config, {name: a.flags for name, a in GGUF_ARCHITECTURES.items()}, "GGUF")
    if path.exists():
        raise PlinthError(f"{path} already exists; choose a new file name (nothing was overwritten)")
    matrix_type, output_type, file_type = GGUF_TYPES[dtype]
    output = "token_embd.weight" if config.tie_embeddings else "output.weight"
    fallbacks = []
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(path.stem)
        tokens = _write_tokenizer(writer, tokenizer, config.vocab_size)
        _write_config(writer, config, len(tokens), file_type)
        GGUF_ARCHITECTURES[arch].metadata(writer, config)
        for name, tensor in _tensors(model, GGUF_ARCHITECTURES[arch].fixes):
            data, qtype = _encode(tensor, output_type if name == output else matrix_type)
            writer.add_tensor(name, data, raw_dtype=qtype)
            if qtype == FALLBACK_TYPE != matrix_type:
                fallbacks.append(name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if fallbacks:
        log(f"note: {len(fallbacks)} matrices have rows that are not whole {dtype} blocks and were written as "
            f"{FALLBACK_TYPE.name.lower()}: {', '.join(fallbacks)}")
    return path


def _write_config(writer: gguf.GGUFWriter, c: ModelConfig, vocab_size: int, file_type: F):
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    if c.head_dim != c.dim // c.n_heads:  # llama.cpp assumes dim / heads unless told
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(model, fixes: dict):
    """(llama.cpp name, float32 tensor in PyTorch order) for each weight; no `output.weight` when tied."""
    c, to_gguf = model.config, invert(GGUF_TO_PLINTH)
    for name, tensor in _unfused(model.state_dict(), c).items():
        if c.tie_embeddings and name == "output.weight":
            continue
        if not tensor.is_floating_point():
            raise PlinthError(f"{name} is stored as {tensor.dtype}; export from float weights: "
                              "plinth.load(MODEL, dtype='float32'), or `plinth export`")
        value = tensor.detach().float().cpu()
        for suffix, fix in fixes.items():
            if name.endswith(suffix):
                value = fix(value, c)
        yield map_key(name, to_gguf), value


def _unfused(state: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """Split the projections an inference model fused (`Transformer.fuse`) back into their parts."""
    fused, out = fused_parts(c), {}
    for name, tensor in state.items():
        layer, _, leaf = name.rpartition(".")       # "layers.0.attn.wqkv", "weight"
        prefix, _, projection = layer.rpartition(".")
        if projection not in fused:
            out[name] = tensor
            continue
        parts = fused[projection]
        out.update({f"{prefix}.{part}.{leaf}": piece for part, piece in zip(parts, tensor.split(list(parts.values())))})
    return out


def _encode(tensor: torch.Tensor, qtype: Q) -> tuple[np.ndarray, Q]:
    """The tensor's bytes in `qtype`; norms stay F32, and a matrix whose rows do not fill whole
    quantization blocks falls back to FALLBACK_TYPE."""
    if tensor.ndim == 1:
        qtype = Q.F32
    elif tensor.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = FALLBACK_TYPE
    data = tensor.numpy()
    return (data if qtype == Q.F32 else gguf.quants.quantize(data, qtype)), qtype


# ---- the vocabulary ---------------------------------------------------------------------------------
# The normalizer of a SentencePiece BPE (plinth.tokenizer builds it so; so are Gemma's tokenizer.json):
# spaces become "▁", and no space is added in front of the text.
SPACES_AS_PIECES = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}


def _tokenizer_model(tok: Tokenizer, spec: dict) -> str:
    """`tokenizer.ggml.model` for this tokenizer: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)."""
    model = spec["model"]
    if model["type"] == "BPE" and tok.byte_level:
        return "gpt2"
    if model["type"] == "BPE" and model.get("byte_fallback") and spec["normalizer"] == SPACES_AS_PIECES \
            and spec["pre_tokenizer"] is None:
        return "llama"
    raise PlinthError(f"the tokenizer is a {model['type']} with normalizer {spec['normalizer']} and pre-tokenizer "
                      f"{spec['pre_tokenizer']}; plinth writes GGUF vocabularies of byte-level BPE and of "
                      "SentencePiece BPE (byte fallback, spaces as '▁', no space prefix) tokenizers only")


def _write_tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int) -> list[str]:
    """Tokens, their llama.cpp types, special ids and chat template, and what the tokenizer model needs
    besides (VOCABULARIES); returns the token list written."""
    spec = json.loads(tok.backend.to_str())
    kind = _tokenizer_model(tok, spec)
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_size or set(by_id) != set(range(len(by_id))):
        raise PlinthError(f"the tokenizer's {len(by_id)} ids do not fit the model's {vocab_size} embedding rows")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):  # rows past the tokenizer (padding to a round size) become unused tokens
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(UNUSED if i not in by_id else CONTROL if i in tok.special_ids else USER_DEFINED if i in added
                     else BYTE if kind == "llama" and BYTE_PIECE.fullmatch(tokens[-1]) else NORMAL)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    VOCABULARIES[kind](writer, tok, spec, tokens, types)
    for add, token_id in ((writer.add_bos_token_id, tok.bos_id), (writer.add_eos_token_id, tok.eos_id),
                          (writer.add_pad_token_id, tok.eos_id)):  # plinth pads with EOS (never attended)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_chat_template(tok.chat_template)
    return tokens


def _byte_level_vocabulary(writer: gguf.GGUFWriter, tok: Tokenizer, spec: dict, tokens, types):
    """"gpt2": the merges, and the name of the pre-tokenizer's split."""
    writer.add_tokenizer_pre(_pre_name(tok))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])


def _sentencepiece_vocabulary(writer: gguf.GGUFWriter, tok: Tokenizer, spec: dict, tokens, types):
    """"llama": scores instead of merges. llama.cpp (and plinth's reader) merge into the highest-scoring
    token first, so a normal token scores minus the rank of the first merge that makes it (tokens no
    merge makes, such as single characters, rank after them); bytes score 0 and the rest -1000, as
    SentencePiece files have them."""
    first_merge = {}
    for merge in spec["model"]["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_merge.setdefault(left + right, len(first_merge))
    writer.add_token_scores([-float(first_merge.get(t, len(first_merge) + i)) if kind == NORMAL
                             else 0.0 if kind == BYTE else -1000.0 for i, (t, kind) in enumerate(zip(tokens, types))])
    if spec["model"].get("unk_token") is not None:
        writer.add_unk_token_id(tok.backend.token_to_id(spec["model"]["unk_token"]))
    writer.add_add_space_prefix(False)


# `tokenizer.ggml.model` → what its vocabulary needs beyond tokens and types.
VOCABULARIES = {"gpt2": _byte_level_vocabulary, "llama": _sentencepiece_vocabulary}


def _pre_name(tok: Tokenizer) -> str:
    """`tokenizer.ggml.pre`: the source GGUF's value; else the name whose split this tokenizer's
    pre-tokenizer is (plinth-trained tokenizers are "smollm"); else "gpt2", the split byte-level
    BPE tokenizers such as GPT-2's `ByteLevel(use_regex=True)` use."""
    if tok.gguf_pre:
        return tok.gguf_pre
    ours = json.loads(tok.backend.to_str())["pre_tokenizer"]
    for name, build in PRE_TOKENIZERS.items():
        if name == "default":  # llama.cpp's "default" is another split than plinth's alias of GPT-2's
            continue
        probe = HFTokenizer(models.BPE())
        probe.pre_tokenizer = build()
        if json.loads(probe.to_str())["pre_tokenizer"] == ours:
            return name
    return "gpt2"
