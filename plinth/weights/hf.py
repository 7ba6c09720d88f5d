"""Hugging Face model folders: `config.json` + `*.safetensors` (+ `tokenizer.json`) ↔ plinth.

One name table and one config builder per `model_type`; tensors that plinth derives or does not
use are listed as such, anything else unknown is an error that names it. The architectures plinth
also writes (llama, gemma3_text) say which config flags make them, and how to write their config.json.

    config, state_dict = read_hf_folder("path/to/all-MiniLM-L6-v2")
    write_hf_folder(plinth.load("gemma3-270m", dtype="float32").model, "out/gemma-hf")
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.weights.gguf import GEMMA3_GLOBAL_EVERY, _global_every
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

# Gemma 3 names its pre-MLP norm `pre_feedforward_layernorm`; its `post_attention_layernorm` is the
# norm on the attention output (plinth's sandwich norm), not llama's pre-MLP norm.
GEMMA3_TO_PLINTH = {
    **LLAMA_TO_PLINTH,
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attn_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_mlp_norm.weight",
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


def _gemma3_config(c: dict) -> ModelConfig:
    """gemma3_text as transformers reads it: the layers `layer_types` calls sliding (else all but every
    sixth) attend within `sliding_window`; the rotary bases are `rope_parameters` (transformers 5) or
    `rope_theta` and `rope_local_base_freq` (4.x)."""
    if c.get("attn_logit_softcapping") is not None or c.get("rope_scaling") or c.get("use_bidirectional_attention"):
        raise PlinthError("this gemma3_text model uses attention soft-capping, rope scaling or bidirectional "
                          "attention, which plinth does not implement; its outputs would be wrong")
    n_layers, rope = c["num_hidden_layers"], c.get("rope_parameters") or {}
    sliding = [kind == "sliding_attention" for kind in c["layer_types"]] if c.get("layer_types") else None
    return ModelConfig(**_llama_config(c).to_dict() | dict(
        mlp="geglu", qk_norm=True, sandwich_norm=True, embed_scale=True, tie_embeddings=c.get("tie_word_embeddings", True),
        rope_theta=rope.get("full_attention", {}).get("rope_theta", c.get("rope_theta", 1e6)),
        rope_local_theta=rope.get("sliding_attention", {}).get("rope_theta", c.get("rope_local_base_freq", 1e4)),
        attn_scale=c.get("query_pre_attn_scalar", 256) ** -0.5, final_softcap=c.get("final_logit_softcapping"),
        sliding_window=c.get("sliding_window", 4096) if sliding is None or any(sliding) else None,
        global_every=_global_every(sliding, n_layers, GEMMA3_GLOBAL_EVERY)))


def _shift_norms(by: float) -> Callable[[dict], dict]:
    """Gemma's RMSNorm multiplies by (1 + w) and stores w; plinth's multiplies by its weight, so
    reading adds 1 to every norm weight and writing subtracts it."""
    return lambda tensors: {name: value + by if name.endswith("norm.weight") else value
                            for name, value in tensors.items()}


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


# What the llama architecture is, in plinth's config flags: RMSNorm pre-norm, RoPE, SwiGLU, nothing more.
LLAMA_FLAGS = dict(mlp="swiglu", norm="rms", bias=False, position="rope", post_norm=False, embed_norm=False,
                   qk_norm=False, sandwich_norm=False, embed_scale=False, attn_scale=None, sliding_window=None,
                   causal=True, final_softcap=None, rope_local_theta=None)
# Gemma 3: GeGLU, norms on each query/key head and around both sublayers, embeddings scaled by √width;
# its softmax scale, sliding-window layout and rotary bases are fields of config.json.
GEMMA3_FLAGS = dict(mlp="geglu", norm="rms", bias=False, position="rope", post_norm=False, embed_norm=False,
                    qk_norm=True, sandwich_norm=True, embed_scale=True, causal=True)


def _decoder_hf_config(c: ModelConfig) -> dict:
    """The config.json keys of a decoder's shape, as llama and Gemma 3 both name them."""
    return {"vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.ffn_dim,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
            "torch_dtype": "float32"}


def _llama_hf_config(c: ModelConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_decoder_hf_config(c),
            "hidden_act": "silu", "mlp_bias": False}


def _gemma3_hf_config(c: ModelConfig) -> dict:
    """config.json of transformers' Gemma3ForCausalLM, in the keys both transformers 4.5x and 5 read."""
    scalar = (c.attn_scale or c.head_dim ** -0.5) ** -2  # softmax scale = query_pre_attn_scalar ** -0.5
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **_decoder_hf_config(c),
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": _whole(scalar),
            "rope_local_base_freq": c.rope_local_theta or c.rope_theta, "sliding_window": c.sliding_window,
            "layer_types": ["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.n_layers)],
            "final_logit_softcapping": c.final_softcap, "attn_logit_softcapping": None}


def _whole(x: float) -> int | float:
    """`x` as an int where it is one up to float rounding (transformers types query_pre_attn_scalar int)."""
    return round(x) if math.isclose(x, round(x), rel_tol=1e-6) else x


@dataclass(frozen=True)
class HFArchitecture:
    table: dict[str, str]
    config: Callable[[dict], ModelConfig]
    prepare: Callable[[dict], dict] = lambda tensors: tensors
    ignored: tuple[str, ...] = field(default=())  # tensors plinth does not use (pooler, cached buffers)
    # Writing (None: plinth reads this architecture but does not write it): the config flags that make
    # it, its config.json, and plinth's tensors → its own (the inverse of `prepare`).
    flags: dict | None = None
    hf_config: Callable[[ModelConfig], dict] | None = None
    unprepare: Callable[[dict], dict] = lambda tensors: tensors


HF_ARCHITECTURES = {
    "llama": HFArchitecture(LLAMA_TO_PLINTH, _llama_config, ignored=("rotary_emb.inv_freq",),
                            flags=LLAMA_FLAGS, hf_config=_llama_hf_config),
    "gemma3_text": HFArchitecture(GEMMA3_TO_PLINTH, _gemma3_config, _shift_norms(1.0),
                                  flags=GEMMA3_FLAGS, hf_config=_gemma3_hf_config, unprepare=_shift_norms(-1.0)),
    "bert": HFArchitecture(BERT_TO_PLINTH, _bert_config, _prepare_bert,
                           ignored=("pooler.", "embeddings.position_ids", "cls.")),
}


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: a config.json that names its `model_type` (plinth's own
    checkpoints have a config.json too, in plinth's field names)."""
    config = path / "config.json"
    return path.is_dir() and config.is_file() and "model_type" in json.loads(config.read_text())


def read_hf_config(folder) -> ModelConfig:
    """The config of the Hugging Face model folder `folder`, after checking that it has weights plinth
    reads (without reading them)."""
    return _architecture(Path(folder))[1]


def read_hf_folder(folder) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    arch, config, files = _architecture(folder)
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    tensors = arch.prepare(tensors)
    state = {map_key(name, arch.table): value.float() for name, value in tensors.items()
             if not any(part in name for part in arch.ignored)}
    return config, state


def _architecture(folder: Path) -> tuple["HFArchitecture", ModelConfig, list[Path]]:
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
    return arch, arch.config(raw), files


def export_architecture(config: ModelConfig, candidates: dict[str, dict], target: str) -> str:
    """The first name in `candidates` (architecture → the flags that make it: a value, or a test of the
    config) whose flags `config` has; else an error naming, for each, the flags that differ."""
    misses = {}
    for name, flags in candidates.items():
        misses[name] = [f"{flag}={getattr(config, flag)!r}" for flag, allowed in flags.items()
                        if not (allowed(config) if callable(allowed) else getattr(config, flag) == allowed)]
        if not misses[name]:
            return name
    raise PlinthError(f"{target} export writes the {' or '.join(candidates)} architecture, and this model is none of "
                      "them: " + "; ".join(f"{name} cannot express {', '.join(m)}" for name, m in misses.items()))


def write_hf_folder(model, folder):
    """A llama or Gemma 3 model → `model.safetensors` + `config.json` that Hugging Face `transformers`
    loads as LlamaForCausalLM or Gemma3ForCausalLM (plinth's rotary layout is already theirs)."""
    c = model.config
    arch = HF_ARCHITECTURES[export_architecture(c, {n: a.flags for n, a in HF_ARCHITECTURES.items() if a.flags},
                                                "Hugging Face")]
    to_hf = invert(arch.table)
    state = {name: t.detach().float() for name, t in model.state_dict().items()
             if not (c.tie_embeddings and name == "output.weight")}
    save_file({map_key(name, to_hf): t.contiguous() for name, t in arch.unprepare(state).items()},
              str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    (Path(folder) / "config.json").write_text(json.dumps(arch.hf_config(c), indent=2))
