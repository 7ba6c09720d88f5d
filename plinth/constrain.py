"""Constrained decoding: a grammar masks every next token, so the output always matches a JSON schema
(OpenAI's `response_format`) or a Lark grammar (tool calls).

The grammar work is llguidance's (a Rust Earley parser and lexer walked over a trie of the
vocabulary, a well-kept library rather than a hand-written parser): it compiles a JSON schema and
computes the set of allowed next tokens fast enough to run at every decoding step. plinth only
turns requests into grammars, gives each sequence its own `Constraint`, and applies the mask
before sampling.

    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"schema": schema}})
    m.generate(prompt, grammar=grammar)      # or SamplingParams(grammar=grammar)
"""
from __future__ import annotations

import json
from functools import lru_cache

import jsonschema
import llguidance
import llguidance.numpy  # not llguidance.torch: importing that loads torch.compile's machinery
import torch

from plinth.errors import PlinthError

# One fixed layout: `{"a": 1, "b": [2, 3]}`. Small models given free whitespace tend to fill it with
# endless newlines; with none allowed every token carries content and outputs stay short.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_BITS = torch.arange(32, dtype=torch.int32)  # bit i of each int32 word of the mask is token 32·word + i


def json_schema_grammar(schema: dict) -> str:
    """A grammar for JSON that validates against `schema`. Raises PlinthError for an invalid schema
    (saying where) or a feature the grammar compiler does not implement (naming it)."""
    if not isinstance(schema, dict):
        raise PlinthError(f"a JSON schema must be an object, got {type(schema).__name__}: {schema!r}")
    try:
        dialect_validator(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "the top level"
        raise PlinthError(f"invalid JSON schema at {where}: {e.message}") from e
    # as JSON text: llguidance cannot convert a Python int beyond 64 bits, which JSON and Python allow
    return checked(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT),
                   "JSON schema")


def dialect_validator(schema: dict) -> type:
    """The jsonschema validator of the dialect the schema's `$schema` names (the latest without one).
    jsonschema's own lookup fails with a TypeError on a `$schema` that is not a string and only warns
    about an unknown URI (then llguidance fails fetching it), so both are a PlinthError here."""
    if "$schema" not in schema:
        return jsonschema.validators.validator_for(schema)
    dialect = schema["$schema"]
    validator = jsonschema.validators.validator_for(schema, default=None) if isinstance(dialect, str) else None
    if validator is None:
        latest = jsonschema.validators.validator_for({}).META_SCHEMA["$id"]
        raise PlinthError(f"invalid JSON schema at $schema: {dialect!r} is not the URI of a JSON Schema draft; "
                          f'use "{latest}" or leave $schema out')
    return validator


def lark_grammar(lark: str) -> str:
    """A grammar from Lark text (llguidance's dialect: `%json {schema}` embeds a JSON schema)."""
    return checked(llguidance.LLMatcher.grammar_from_lark(lark), "grammar")


def checked(grammar: str, what: str) -> str:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        message = messages[0]
        if "Unimplemented" in message or "Unknown format" in message:
            raise PlinthError(f"unsupported {what} feature: {message}; constrained decoding (llguidance) does "
                              "not implement it: remove it or express it with supported keywords")
        raise PlinthError(f"invalid {what}: {message}")
    return grammar


def response_format_grammar(response_format) -> str | None:
    """OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", ...}), or a pydantic
    model class, as a grammar; None for plain text."""
    if hasattr(response_format, "model_json_schema"):
        return json_schema_grammar(response_format.model_json_schema())
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise PlinthError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return json_schema_grammar(spec["schema"])
    raise PlinthError(f"unknown response_format {response_format!r}: use "
                      '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}')


@lru_cache(maxsize=8)
def vocabulary(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary (a token trie; ~0.3 s for 49k tokens, so built once).
    Every stop token may end the output once the grammar is complete."""
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                  eos_token=sorted(tokenizer.stop_ids))


class Constraint:
    """The grammar state of one sequence: which tokens may come next, advanced token by token."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int):
        self.matcher = llguidance.LLMatcher(vocabulary(tokenizer, vocab_size), grammar, log_level=0)
        self._fail_if_broken()
        self.vocab_size = vocab_size
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)  # (1, ⌈V/32⌉) int32

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output inside the grammar."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask)
        return ((torch.from_numpy(self.bitmask[0]).unsqueeze(-1) >> _BITS) & 1).view(-1)[:self.vocab_size].bool()

    def advance(self, token: int):
        self.matcher.consume_token(token)
        self._fail_if_broken()

    @property
    def complete(self) -> bool:
        """The output is a full match and the grammar allows nothing more (only a stop token)."""
        return self.matcher.is_stopped()

    def _fail_if_broken(self):
        if self.matcher.is_error():
            raise PlinthError(f"constrained decoding failed: {self.matcher.get_error()}")

