"""Write a plinth model as a llama-architecture GGUF file that llama.cpp and Ollama run.

The `gguf` package's GGUFWriter writes the binary format and `gguf.quants` quantizes; this module
supplies llama.cpp's metadata keys and tensor names (GGUF_TO_PLINTH inverted), puts Q/K back into
llama.cpp's interleaved rotary layout, and describes the tokenizer.

    loaded = plinth.load("runs/pretrain-tiny/final", dtype="float32")
    write_gguf(loaded.model, loaded.tokenizer, "out/model.gguf", dtype="q8_0")

or from the shell: `plinth export runs/lora-sentiment/final --merge --to gguf out/model.gguf`.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.files import atomic_file
from plinth.model import fused_parts
from plinth.tokenizer import CONTROL, NORMAL, PRE_TOKENIZERS, UNUSED, USER_DEFINED, Tokenizer
from plinth.weights.gguf import GGUF_TO_PLINTH, permute_rotary
from plinth.weights.hf import require_llama
from plinth.weights.keys import invert, map_key

# dtype → (GGML type of the matrices, general.file_type). Norms (1-D) stay F32 whatever the choice.
DTYPES = {"f32": (Q.F32, LlamaFileType.ALL_F32), "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
          "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0)}

# The inverse of the reader's fixes: plinth's rotate-halves Q/K rows → llama.cpp's interleaved pairs.
LLAMA_FIXES = {
    "attn.wq.weight": lambda w, c: permute_rotary(w, c.n_heads),
    "attn.wk.weight": lambda w, c: permute_rotary(w, c.n_kv_heads),
}


def write_gguf(model, tokenizer: Tokenizer, path, dtype: str = "f16") -> Path:
    """Write `model` (adapters already merged) and `tokenizer` to `path`, a new file: written
    under a temporary name beside it, then renamed, so a crash never leaves a half file at `path`."""
    if dtype not in DTYPES:
        raise PlinthError(f"unknown GGUF type {dtype!r}; choose one of {', '.join(DTYPES)}")
    config, path = model.config, Path(path)
    require_llama(config, "GGUF")
    if path.exists():
        raise PlinthError(f"{path} already exists; choose a new file name (nothing was overwritten)")
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(path.stem)
        tokens = _write_tokenizer(writer, tokenizer, config.vocab_size)
        _write_config(writer, config, len(tokens), DTYPES[dtype][1])
        for name, tensor in _llama_tensors(model):
            data, qtype = _encode(tensor, DTYPES[dtype][0])
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _write_config(writer: gguf.GGUFWriter, c: ModelConfig, vocab_size: int, file_type: LlamaFileType):
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


def _llama_tensors(model):
    """(llama.cpp name, float32 tensor in PyTorch order) for each weight; no `output.weight` when tied."""
    c, to_gguf = model.config, invert(GGUF_TO_PLINTH)
    for name, tensor in _unfused(model.state_dict(), c).items():
        if c.tie_embeddings and name == "output.weight":
            continue
        if not tensor.is_floating_point():
            raise PlinthError(f"{name} is stored as {tensor.dtype}; export from float weights: "
                              "plinth.load(MODEL, dtype='float32'), or `plinth export`")
        value = tensor.detach().float().cpu()
        for suffix, fix in LLAMA_FIXES.items():
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
    quantization blocks falls back to F16 (as llama.cpp's own converter does)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if tensor.ndim == 1 or qtype == Q.F32:
        qtype = Q.F32
    elif tensor.shape[-1] % block:
        qtype = Q.F16
    data = tensor.numpy()
    return (data if qtype == Q.F32 else gguf.quants.quantize(data, qtype)), qtype


def _write_tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int) -> list[str]:
    """llama.cpp's "gpt2" (byte-level BPE) vocabulary; returns the token list written."""
    spec = json.loads(tok.backend.to_str())
    if spec["model"]["type"] != "BPE" or not tok.byte_level:
        raise PlinthError(f"the tokenizer is {spec['model']['type']}, not byte-level BPE; plinth writes "
                          "GGUF vocabularies of byte-level BPE tokenizers only")
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_size or set(by_id) != set(range(len(by_id))):
        raise PlinthError(f"the tokenizer's {len(by_id)} ids do not fit the model's {vocab_size} embedding rows")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):  # rows past the tokenizer (padding to a round size) become unused tokens
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(UNUSED if i not in by_id else CONTROL if i in tok.special_ids
                     else USER_DEFINED if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tok.bos_id), (writer.add_eos_token_id, tok.eos_id),
                          (writer.add_pad_token_id, tok.eos_id)):  # plinth pads with EOS (never attended)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_chat_template(tok.chat_template)
    return tokens


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
