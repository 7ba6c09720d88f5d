"""What Ollama's clients ask about models: /api/tags (installed models), /api/ps (loaded ones) and
/api/show (one model's details). A plinth server holds its models from start to exit, so it lists
the models it serves, each in both: the served model, its LoRA adapters and its embedding model.

What Ollama reads from its model files is told from plinth's: the weights in memory (their bytes,
their parameters and plinth's dtype for `quantization_level`), the context window (`--max-model-len`),
the chat template (Jinja, where Ollama's is a Go template), the model card's sampling settings, and
`capabilities` from what the server does with the model. Every model is plinth's one Transformer,
so `general.architecture` is "plinth" and the shape keys are `plinth.*`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from fastapi import APIRouter, Request

from plinth import hub
from plinth.errors import PlinthError
from plinth.quant import Int4Linear, Int8Linear
from plinth.serve.ollama_schemas import ModelRequest, parsed
from plinth.serve.openai_api import server_state
from plinth.serve.schemas import APIError
from plinth.serve.state import ServerState

NEVER = "2999-12-31T23:59:59Z"  # /api/ps's expires_at: a served model stays loaded until the server exits

router = APIRouter()


@dataclass
class Served:
    """One model the server answers with, as Ollama's listings describe it."""
    name: str
    modules: list[torch.nn.Module]     # its weights (an image+text model's encoder included)
    capabilities: list[str]            # Ollama's words: completion, tools, vision, embedding, image
    context: int | None                # tokens per sequence, for a model that reads tokens
    parent: str = ""                   # an adapter's base model
    template: str = ""                 # its chat template
    parameters: dict = field(default_factory=dict)  # Modelfile PARAMETERs: sampling defaults, stops, num_ctx

    @property
    def config(self):
        return self.modules[0].config

    def details(self) -> dict:
        source = source_path(self.parent or self.name)
        return {"parent_model": self.parent, "format": weights_format(source), "family": "plinth",
                "families": ["plinth"], "parameter_size": human(parameter_count(self.modules)),
                "quantization_level": dtype_name(self.modules)}

    def listing(self, state: ServerState) -> dict:
        """The fields /api/tags and /api/ps share."""
        source = source_path(self.parent or self.name)
        changed = source.stat().st_mtime if source else state.started
        identity = f"{self.name}\n{source}\n{changed}".encode()  # changes when the served files do
        return {"name": self.name, "model": self.name, "size": weight_bytes(self.modules),
                "digest": hashlib.sha256(identity).hexdigest(), "details": self.details(),
                "modified_at": datetime.fromtimestamp(changed, timezone.utc).isoformat().replace("+00:00", "Z")}


def served(state: ServerState, name: str) -> Served:
    """The served model that `name` names: the embedder's name, an adapter's, or (resolved as the
    generation routes resolve names) the served model's."""
    if state.embedder is not None and name == state.embedder.name:  # listed without reading its weights
        return Served(name, [state.embedder.outline()], ["embedding"], state.embedder.max_tokens)
    name = state.resolve_model(name)
    if state.generator is not None:
        return Served(name, [state.generator.denoiser], ["image"], None)
    engine, tokenizer = state.engine, state.tokenizer
    stops = sorted(tokenizer.backend.id_to_token(i) for i in tokenizer.stop_ids)
    parameters = {**state.sampling_defaults, "stop": stops, "num_ctx": engine.max_len}
    return Served(name, [engine.model] + ([engine.vision] if engine.vision is not None else []),
                  ["completion", "tools"] + (["vision"] if engine.vision is not None else []), engine.max_len,
                  parent=state.name if name in state.adapters else "", template=tokenizer.chat_template,
                  parameters=parameters)


@router.get("/tags")
async def tags(request: Request):
    state = server_state(request)
    return {"models": [served(state, name).listing(state) for name in state.model_names()]}


@router.get("/ps")
async def ps(request: Request):
    state = server_state(request)
    models = []
    for name in state.model_names():
        if state.embedder is not None and name == state.embedder.name and not state.embedder.read:
            continue  # as Ollama's: models in memory, and the embedder's weights are read at its first use
        model = served(state, name)
        on_device = next(model.modules[0].parameters()).device.type != "cpu"
        models.append({**model.listing(state), "expires_at": NEVER,
                       "size_vram": weight_bytes(model.modules) if on_device else 0, "context_length": model.context})
    return {"models": models}


@router.post("/show")
async def show(request: Request):
    state = server_state(request)
    body = await parsed(request, ModelRequest)
    try:
        model = served(state, body.model)
    except APIError as e:
        raise APIError(404, f"model '{body.model}' not found; this server has: {', '.join(state.model_names())}") from e
    lines = [f"{key} {value}" for key, values in model.parameters.items()
             for value in (values if isinstance(values, list) else [values])]
    config = model.config
    info = {"general.architecture": "plinth", "general.parameter_count": parameter_count(model.modules),
            "plinth.embedding_length": config.dim, "plinth.block_count": config.n_layers,
            "plinth.attention.head_count": config.n_heads,
            "plinth.attention.head_count_kv": config.n_kv_heads or config.n_heads}
    if model.context is not None:
        info.update({"plinth.context_length": model.context, "plinth.vocab_size": config.vocab_size})
    source = source_path(model.parent or model.name) or model.name
    return {"modelfile": "\n".join(["# served by plinth", f"FROM {source}", *(f"PARAMETER {line}" for line in lines)])
            + "\n",
            "parameters": "\n".join(lines), "template": model.template, "details": model.details(),
            "model_info": info, "capabilities": model.capabilities,
            "modified_at": model.listing(state)["modified_at"]}


def source_path(name: str) -> Path | None:
    """Where a served name's files are, if it names them (a known model, a file or a folder)."""
    try:
        return hub.resolve(name)
    except PlinthError:
        return None


def weights_format(source: Path | None) -> str:
    if source is None:
        return ""
    return "gguf" if source.suffix == ".gguf" else "safetensors" if (source / "config.json").is_file() else "plinth"


def parameter_count(modules: list[torch.nn.Module]) -> int:
    """Parameters, counting a compacted layer's (int8/int4 codes in buffers) by its weight's shape."""
    return sum(sum(p.numel() for p in m.parameters()) + sum(layer.in_features * layer.out_features
                                                          for layer in m.modules()
                                                          if isinstance(layer, (Int4Linear, Int8Linear)))
               for m in modules)


def weight_bytes(modules: list[torch.nn.Module]) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def dtype_name(modules: list[torch.nn.Module]) -> str:
    """plinth's name for how the weights are held (plinth.quant.DTYPES): int4, int8, or a float dtype."""
    layers = [layer for m in modules for layer in m.modules()]
    if any(isinstance(layer, Int4Linear) for layer in layers):
        return "int4"
    if any(isinstance(layer, Int8Linear) for layer in layers):
        return "int8"
    return str(next(modules[0].parameters()).dtype).removeprefix("torch.")


def human(count: int) -> str:
    """A parameter count as Ollama writes it: 135M, 1.7B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}" if unit == "B" else f"{count / size:.0f}{unit}"
    return str(count)
