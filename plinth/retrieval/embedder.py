"""Sentence embeddings from a BERT-style encoder folder (sentence-transformers layout), run by
plinth's own Transformer: mean of the token vectors, L2-normalised, as sentence-transformers'
all-MiniLM-L6-v2 pipeline (Transformer → mean Pooling → Normalize) does.

    embedder = Embedder.load("all-minilm-l6-v2")
    vectors = embedder.embed(["A cat sits.", "A dog runs."])    # (2, 384), unit length
"""
from __future__ import annotations

import json
import threading
from typing import Callable

import torch

from plinth import hub
from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.model import Transformer
from plinth.weights.hf import read_hf_config, read_hf_folder
from plinth.weights.load import build
from tokenizers import Tokenizer as HFTokenizer


class Embedder:
    """The encoder's weights are read at the first embedding, not at `load`: a server that is never
    asked for embeddings never holds them. Everything a bad folder can get wrong is found at `load`."""

    def __init__(self, config: ModelConfig, tokenizer: HFTokenizer, name: str, max_tokens: int,
                 read_model: Callable[[], Transformer]):
        self.config, self.tokenizer, self.name, self.max_tokens = config, tokenizer, name, max_tokens
        self._read_model, self._model, self._reading = read_model, None, threading.Lock()

    @classmethod
    def load(cls, name_or_folder: str = hub.DEFAULT_EMBEDDER) -> "Embedder":
        folder = hub.resolve(name_or_folder)
        if not (folder / "tokenizer.json").is_file():
            raise PlinthError(f"{folder} has no tokenizer.json; an embedding model folder needs one")
        config = read_hf_config(folder)
        if config.causal:
            raise PlinthError(f"{folder} is a causal language model; embeddings need a bidirectional encoder")
        settings = folder / "sentence_bert_config.json"
        max_tokens = json.loads(settings.read_text()).get("max_seq_length", config.max_seq_len) if settings.is_file() \
            else config.max_seq_len
        max_tokens = min(max_tokens, config.max_seq_len)
        tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_tokens)  # as sentence-transformers truncates
        return cls(config, tokenizer, name_or_folder if name_or_folder in hub.KNOWN_MODELS else folder.name, max_tokens,
                   lambda: build(*read_hf_folder(folder)))

    @property
    def model(self) -> Transformer:
        with self._reading:  # requests embedding at once read the weights once
            if self._model is None:
                self._model = self._read_model()
        return self._model

    @property
    def read(self) -> bool:
        """Whether the weights are in memory."""
        return self._model is not None

    def outline(self) -> Transformer:
        """The encoder once read, else one of its shapes on the meta device (no memory): to count
        its parameters and bytes without reading them."""
        if self.read:
            return self.model
        with torch.device("meta"):
            return Transformer(self.config)

    @property
    def dimensions(self) -> int:
        return self.config.dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def encode(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        """Each text's token ids, with [CLS] ... [SEP] and cut to the model's limit, as the reference
        pipeline reads them; with `truncate` false a text over the limit is an error instead."""
        encodings = [self.tokenizer.encode(text) for text in texts]
        for text, encoding in zip(texts, encodings):
            if not truncate and encoding.overflowing:  # the tokens cut off, which truncation keeps here
                shown = text[:40] + "..." if len(text) > 40 else text
                raise PlinthError(f"the input {shown!r} is over this model's limit of {self.max_tokens} tokens; "
                                  "shorten it, or let it be cut (truncate: true)")
        return [encoding.ids for encoding in encodings]

    @torch.inference_mode()
    def embed_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """(N, dim) unit vectors of `encode`d texts. One text per forward pass: no padding, so no
        attention mask is needed and each vector is independent of its batch."""
        vectors = [self.model.features(torch.tensor([row]))[0].mean(0) for row in ids]
        return torch.nn.functional.normalize(torch.stack(vectors), dim=-1)

    def embed(self, texts: list[str] | str) -> torch.Tensor:
        return self.embed_ids(self.encode([texts] if isinstance(texts, str) else list(texts)))
