"""Tokenizer: a Hugging Face `tokenizers` tokenizer plus the model's special tokens and chat template.

Built from a GGUF's vocabulary (`Tokenizer.from_gguf`) or from a `tokenizer.json`
(`Tokenizer.from_file`). Text is encoded by `tokenizers` (never a hand-written BPE); decoding goes
through each token's raw bytes so that streamed text never splits a UTF-8 character.

    tok = Tokenizer.from_file("tokenizer.json")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from plinth.errors import PlinthError

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end an assistant turn in common chat formats; any present as special tokens stop generation.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>", "<|eom_id|>")

# Special tokens of tokenizers plinth trains; the first ends every document.
TRAINED_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Used when a model ships no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Gemma's turn format, for Gemma files that ship no template: a system message opens the first user
# turn, the assistant's role is "model", turns alternate starting with the user, and `<end_of_turn>`
# (a stop token, see END_OF_TURN) closes each.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 is even) %}"
    "{{ raise_exception('Gemma turns alternate user, assistant, user, ... after an optional system message') }}"
    "{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (first if loop.first else '') + ((message['content'] or '') | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_CHARS = bytes_to_unicode()
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}

# Pre-tokenizer splits keyed by GGUF `tokenizer.ggml.pre`: the regex the vocabulary was trained with.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(*splits: str):
    steps = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
    return pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    "default": lambda: _byte_level(GPT2_SPLIT),
    "gpt2": lambda: _byte_level(GPT2_SPLIT),
    "smollm": lambda: _byte_level(r"\p{N}", GPT2_SPLIT),  # every digit its own piece, then GPT-2's split
    "llama-bpe": lambda: _byte_level(LLAMA3_SPLIT),
    "llama3": lambda: _byte_level(LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(QWEN2_SPLIT),
}


def _byte_level_bpe(meta: dict, tokens: list[str], types: list[int]):
    """llama.cpp's "gpt2" vocabulary: byte-level BPE with its merges, split first by the regex of
    `tokenizer.ggml.pre`."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise PlinthError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}")
    alphabet = set(CHAR_BYTES)
    # A token written outside the byte alphabet is plain text; spell it in the alphabet.
    spelled = [t if set(t) <= alphabet else "".join(BYTE_CHARS[b] for b in t.encode()) for t in tokens]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    return backend, dict(byte_level=True, gguf_pre=pre)


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int]):
    """llama.cpp's "llama" vocabulary: SentencePiece BPE (Llama 1/2, Gemma). Spaces become "▁"; then
    adjacent pieces merge, always the merge that makes the highest-scoring normal token first; a
    character outside the vocabulary falls back to its UTF-8 bytes (the <0xNN> tokens). The file
    stores no merges: they are every split of a normal token into two normal tokens, ranked by the
    token's score (ties by id). User-defined tokens (Gemma's runs of spaces, tabs and newlines) are
    matched whole before merging (see `Tokenizer.from_gguf`), as SentencePiece and llama.cpp do."""
    if meta.get("tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default when the key is absent
        raise PlinthError("this GGUF's SentencePiece vocabulary adds a space before the text (add_space_prefix), "
                          "which plinth does not support yet; load the model's Hugging Face folder instead")
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise PlinthError("the GGUF's SentencePiece vocabulary has no token scores (tokenizer.ggml.scores), "
                          "which rank its merges; the file is incomplete")
    rank = {t: (-score, i) for i, (t, kind, score) in enumerate(zip(tokens, types, scores)) if kind == NORMAL}
    merges = [(left, right) for _, left, right in sorted(
        (rank[t], t[:k], t[k:]) for t in rank for k in range(1, len(t)) if t[:k] in rank and t[k:] in rank)]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=True,
                                     unk_token=tokens[unk] if unk is not None else None, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, dict(byte_level=False)


# GGUF `tokenizer.ggml.model` → (meta, tokens, token types) → (HF tokenizer, Tokenizer options).
GGUF_VOCABULARIES = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token, standing for one raw byte


class Tokenizer:
    """Encode/decode text and render chat prompts for one model."""

    def __init__(self, backend: HFTokenizer, *, bos_id: int | None, eos_id: int | None,
                 chat_template: str | None = None, add_bos: bool = False, byte_level: bool = True,
                 gguf_pre: str | None = None):
        self.backend = backend
        self.gguf_pre = gguf_pre  # the source GGUF's `tokenizer.ggml.pre`, kept so that a GGUF export repeats it
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos
        self.byte_level = byte_level
        self.chat_template = chat_template or CHATML_TEMPLATE

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, meta: dict, chat_template: str | None = None) -> "Tokenizer":
        """The tokenizer a GGUF's metadata describes, built by the entry of GGUF_VOCABULARIES for its
        `tokenizer.ggml.model`. chat_template: used when the file has none (the architecture's turn
        format, see plinth/weights/gguf.py)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in GGUF_VOCABULARIES:
            raise PlinthError(f"unsupported GGUF tokenizer model {kind!r}; plinth reads "
                              f"{', '.join(repr(k) for k in GGUF_VOCABULARIES)} vocabularies. Load the model's "
                              "Hugging Face folder (tokenizer.json) instead")
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        backend, options = GGUF_VOCABULARIES[kind](meta, tokens, types)
        # Control tokens are markup matched whole wherever they appear; user-defined ones are text
        # that llama.cpp (and SentencePiece) also match whole, longest first, and never merge.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == USER_DEFINED])
        return cls(backend, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                   chat_template=meta.get("tokenizer.chat_template") or chat_template,
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")), **options)

    @classmethod
    def from_file(cls, path, config: dict | None = None) -> "Tokenizer":
        """A `tokenizer.json`, with special ids and chat template from a `tokenizer_config.json`-like dict."""
        backend = HFTokenizer.from_file(str(path))
        config = config or {}

        def token_id(key):
            token = config.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if token else None

        return cls(backend, bos_id=token_id("bos_token"), eos_id=token_id("eos_token"),
                   chat_template=config.get("chat_template"), add_bos=bool(config.get("add_bos_token", False)),
                   byte_level=isinstance(backend.decoder, decoders.ByteLevel), gguf_pre=config.get("gguf_pre"))

    @classmethod
    def train(cls, texts, vocab_size: int) -> "Tokenizer":
        """A byte-level BPE trained on `texts` (an iterable of strings), with chat special tokens;
        digits split one by one (as SmolLM2's tokenizer does), the ChatML template."""
        if vocab_size < 256 + len(TRAINED_SPECIALS) + 1:
            raise PlinthError(f"vocab_size={vocab_size} is too small: 256 byte tokens and "
                              f"{len(TRAINED_SPECIALS)} special tokens need at least {256 + len(TRAINED_SPECIALS) + 1}")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = PRE_TOKENIZERS["smollm"]()
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TRAINED_SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(texts, trainer)
        eos = backend.token_to_id(TRAINED_SPECIALS[0])
        return cls(backend, bos_id=eos, eos_id=eos, chat_template=CHATML_TEMPLATE)

    def save(self, folder):
        """tokenizer.json + tokenizer_config.json (special tokens, chat template, and the source GGUF's
        pre-tokenizer name where there is one), as HF folders have; the folder is made if it does not
        exist. A tokenizer that adds BOS saves a post-processor adding it, so that `tokenizers` and
        transformers give `encode`'s ids (plinth itself encodes without post-processing)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._with_bos_processor().save(str(folder / "tokenizer.json"))
        token = self.backend.id_to_token
        config = {"bos_token": token(self.bos_id) if self.bos_id is not None else None,
                  "eos_token": token(self.eos_id) if self.eos_id is not None else None,
                  "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        if self.gguf_pre:
            config["gguf_pre"] = self.gguf_pre
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    def _with_bos_processor(self) -> HFTokenizer:
        """The backend, or where `encode` adds a BOS that its post-processing does not, a copy whose
        post-processor adds it after whatever the backend's own does."""
        if not self.add_bos or self.bos_id is None or self.backend.encode("").ids[:1] == [self.bos_id]:
            return self.backend
        bos = self.backend.id_to_token(self.bos_id)
        template = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                 special_tokens=[(bos, self.bos_id)])
        copy = HFTokenizer.from_str(self.backend.to_str())
        own = copy.post_processor
        copy.post_processor = template if own is None else processors.Sequence([own, template])
        return copy

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls.from_file(folder / "tokenizer.json", config)

    # ---- vocabulary ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_ids(self) -> set[int]:
        return {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}

    @cached_property
    def stop_ids(self) -> set[int]:
        """Token ids that end generation: EOS and the end-of-turn tokens of chat formats."""
        ids = {self.backend.token_to_id(t) for t in END_OF_TURN} & self.special_ids
        return ids | ({self.eos_id} if self.eos_id is not None else set())

    @cached_property
    def _bytes(self) -> list[bytes]:
        """Raw bytes of every token; special tokens decode to nothing (they are markup, not text).
        Byte-level tokens map back through GPT-2's alphabet and byte-fallback tokens (<0xNN>) are
        their byte, so a character split over several tokens streams whole (see generate.py)."""
        fallback = isinstance(self.backend.model, models.BPE) and self.backend.model.byte_fallback
        out, rest = [], []
        for i in range(self.vocab_size):
            piece = self.backend.id_to_token(i) or ""
            byte = BYTE_PIECE.fullmatch(piece) if fallback else None
            if i in self.special_ids:
                out.append(b"")
            elif self.byte_level and set(piece) <= CHAR_BYTES.keys():
                out.append(bytes(CHAR_BYTES[c] for c in piece))
            elif byte:
                out.append(bytes([int(byte.group(1), 16)]))
            else:
                out.append(None)
                rest.append(i)
        # Text pieces through the tokenizer's own decoder, all at once (SentencePiece's "▁" → " ").
        for i, text in zip(rest, self.backend.decode_batch([[i] for i in rest], skip_special_tokens=False)):
            out[i] = text.encode()
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    # ---- text ----------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """How one token reads on its own (for logprobs tables); special tokens keep their markup."""
        if token_id in self.special_ids:
            return self.backend.id_to_token(token_id)
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # ---- chat ----------------------------------------------------------------------------------
    @cached_property
    def _template(self):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise PlinthError(f"the model's chat template does not parse ({e}); "
                              "pass a working template with chat_template=...") from e

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render a conversation into the prompt text the model was trained on."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise PlinthError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        def token(i):
            return self.backend.id_to_token(i) if i is not None else ""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=token(self.bos_id), eos_token=token(self.eos_id), **extra)
        except jinja2.TemplateError as e:
            raise PlinthError(f"the chat template rejected the conversation: {e}") from e


def _raise_template_error(message):
    raise jinja2.TemplateError(message)
