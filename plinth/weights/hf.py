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
from safetensors.torch import load_file, save_file

from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.weights.keys import invert, map_key

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


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: a config.json that names its `model_type` (plinth's own
    checkpoints have a config.json too, in plinth's field names)."""
    config = path / "config.json"
    return path.is_dir() and config.is_file() and "model_type" in json.loads(config.read_text())


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
    files = sorted(folder.glob("model*.safetensors"))  # model.safetensors or model-00001-of-00002.safetensors
    if not files:
        raise PlinthError(f"{folder} has no .safetensors weights (plinth never unpickles .bin files)")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    tensors = arch.prepare(tensors)
    state = {map_key(name, arch.table): value.float() for name, value in tensors.items()
             if not any(part in name for part in arch.ignored)}
    return arch.config(raw), state


# What the llama architecture is, in plinth's config flags: RMSNorm pre-norm, RoPE, SwiGLU, nothing more.
LLAMA_FLAGS = dict(mlp="swiglu", norm="rms", bias=False, position="rope", post_norm=False, embed_norm=False,
                   qk_norm=False, sandwich_norm=False, embed_scale=False, attn_scale=None, sliding_window=None,
                   causal=True, final_softcap=None, rope_local_theta=None)


def require_llama(config: ModelConfig, target: str):
    """Raise, naming every flag that differs, unless `config` is one the llama architecture can express."""
    different = [f"{name}={getattr(config, name)!r}" for name, value in LLAMA_FLAGS.items()
                 if getattr(config, name) != value]
    if different:
        raise PlinthError(f"only llama-architecture models export to {target} for now; this one has "
                          f"{', '.join(different)}, which the llama architecture cannot express")


def write_hf_folder(model, folder):
    """A llama-architecture model → `model.safetensors` + `config.json` that Hugging Face
    `transformers` loads as LlamaForCausalLM (plinth's rotary layout is already theirs)."""
    c = model.config
    require_llama(c, "Hugging Face")
    to_hf = invert(LLAMA_TO_PLINTH)
    state = {name: tensor for name, tensor in model.state_dict().items() if not (c.tie_embeddings and name == "output.weight")}
    save_file({map_key(name, to_hf): t.detach().float().contiguous() for name, t in state.items()},
              str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
              "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
              "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
              "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "torch_dtype": "float32"}
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))
