"""Sentence embeddings from a BERT-style encoder folder (sentence-transformers layout), run by
plinth's own Transformer: mean of the token vectors, L2-normalised, as sentence-transformers'
all-MiniLM-L6-v2 pipeline (Transformer → mean Pooling → Normalize) does.

    embedder = Embedder.load("all-minilm-l6-v2")
    vectors = embedder.embed(["A cat sits.", "A dog runs."])    # (2, 384), unit length
"""
from __future__ import annotations

import json

import torch

from plinth import hub
from plinth.errors import PlinthError
from plinth.model import Transformer
from plinth.weights.hf import read_hf_folder
from plinth.weights.load import build
from tokenizers import Tokenizer as HFTokenizer


class Embedder:
    def __init__(self, model: Transformer, tokenizer: HFTokenizer, name: str, max_tokens: int):
        self.model, self.tokenizer, self.name, self.max_tokens = model, tokenizer, name, max_tokens

    @classmethod
    def load(cls, name_or_folder: str = hub.DEFAULT_EMBEDDER) -> "Embedder":
        folder = hub.resolve(name_or_folder)
        if not (folder / "tokenizer.json").is_file():
            raise PlinthError(f"{folder} has no tokenizer.json; an embedding model folder needs one")
        config, state = read_hf_folder(folder)
        if config.causal:
            raise PlinthError(f"{folder} is a causal language model; embeddings need a bidirectional encoder")
        model = build(config, state)
        settings = folder / "sentence_bert_config.json"
        max_tokens = json.loads(settings.read_text()).get("max_seq_length", config.max_seq_len) if settings.is_file() \
            else config.max_seq_len
        tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(min(max_tokens, config.max_seq_len))  # as sentence-transformers truncates
        return cls(model, tokenizer, name_or_folder if name_or_folder in hub.KNOWN_MODELS else folder.name,
                   max_tokens)

    @torch.inference_mode()
    def embed_with_counts(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """(N, dim) unit vectors, and the number of tokens read. One text per forward pass: no padding,
        so no attention mask is needed and each vector is independent of its batch."""
        vectors, tokens = [], 0
        for text in texts:
            ids = self.tokenizer.encode(text).ids  # with [CLS] ... [SEP], like the reference pipeline
            tokens += len(ids)
            vectors.append(self.model.features(torch.tensor([ids]))[0].mean(0))
        return torch.nn.functional.normalize(torch.stack(vectors), dim=-1), tokens

    def embed(self, texts: list[str] | str) -> torch.Tensor:
        return self.embed_with_counts([texts] if isinstance(texts, str) else list(texts))[0]
