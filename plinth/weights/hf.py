"""Hugging Face model folders: `config.json` + `*.safetensors` (+ `tokenizer.json`) → plinth.

One name table and one config builder per `model_type`; tensors that plinth derives or does not
use are listed as such, anything else unknown is an error that names it.

    config, state_dict = read_hf_folder("path/to/all-MiniLM-L6-v2")
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.weights.keys import map_key

LLAMA_TO_PLINTH = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w_down.weight",
}

BERT_TO_PLINTH = {
    "embeddings.word_embeddings.weight": "tok_embeddings.weight",
    "embeddings.position_embeddings.weight": "pos_embeddings.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
}
for ours, theirs in {"attn.wq": "attention.self.query", "attn.wk": "attention.self.key",
                     "attn.wv": "attention.self.value", "attn.wo": "attention.output.dense",
                     "attn_norm": "attention.output.LayerNorm", "mlp.w_up": "intermediate.dense",
                     "mlp.w_down": "output.dense", "mlp_norm": "output.LayerNorm"}.items():
    for kind in ("weight", "bias"):
        BERT_TO_PLINTH[f"encoder.layer.{{}}.{theirs}.{kind}"] = f"layers.{{}}.{ours}.{kind}"


def _llama_config(c: dict) -> ModelConfig:
    return ModelConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                       n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads"),
                       head_dim=c.get("head_dim"), ffn_dim=c["intermediate_size"],
                       max_seq_len=c.get("max_position_embeddings", 2048), norm_eps=c.get("rms_norm_eps", 1e-6),
                       rope_theta=c.get("rope_theta", 10000.0), tie_embeddings=c.get("tie_word_embeddings", False))


def _bert_config(c: dict) -> ModelConfig:
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise PlinthError(f"BERT position_embedding_type {c['position_embedding_type']!r} is not supported")
    return ModelConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                       n_heads=c["num_attention_heads"], ffn_dim=c["intermediate_size"],
                       max_seq_len=c["max_position_embeddings"], norm_eps=c.get("layer_norm_eps", 1e-12),
                       tie_embeddings=True, mlp="gelu", norm="layer", bias=True, position="learned",
                       post_norm=True, embed_norm=True, causal=False)


def _prepare_bert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Task checkpoints (BertForX) prefix names with 'bert.'. BERT adds a token-type embedding;
    single-segment inputs always use type 0, so its row 0 is folded into every position embedding."""
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    types = tensors.pop("embeddings.token_type_embeddings.weight", None)
    if types is not None:
        tensors["embeddings.position_embeddings.weight"] = tensors["embeddings.position_embeddings.weight"] + types[0]
    return tensors


@dataclass(frozen=True)
class HFArchitecture:
    table: dict[str, str]
    config: Callable[[dict], ModelConfig]
    prepare: Callable[[dict], dict] = lambda tensors: tensors
    ignored: tuple[str, ...] = field(default=())  # tensors plinth does not use (pooler, cached buffers)


HF_ARCHITECTURES = {
    "llama": HFArchitecture(LLAMA_TO_PLINTH, _llama_config, ignored=("rotary_emb.inv_freq",)),
    "bert": HFArchitecture(BERT_TO_PLINTH, _bert_config, _prepare_bert,
                           ignored=("pooler.", "embeddings.position_ids", "cls.")),
}


def read_hf_folder(folder) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PlinthError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    raw = json.loads(config_path.read_text())
    model_type = raw.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise PlinthError(f"{folder}: model_type {model_type!r} is not supported; plinth reads: {', '.join(HF_ARCHITECTURES)}")
    arch = HF_ARCHITECTURES[model_type]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PlinthError(f"{folder} has no .safetensors weights (plinth never unpickles .bin files)")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    tensors = arch.prepare(tensors)
    state = {map_key(name, arch.table): value.float() for name, value in tensors.items()
             if not any(part in name for part in arch.ignored)}
    return arch.config(raw), state
