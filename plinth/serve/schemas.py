"""Request bodies of the OpenAI-compatible API (pydantic) and their mapping to `SamplingParams`;
the error shape (`error_body`) and `APIError`, which carries it with an HTTP status; and the
response models and error statuses that /openapi.json documents (the routes build their JSON
themselves: these only describe it).

Field names, types and ranges follow OpenAI's API reference, so the official client's requests
validate unchanged; a few common extensions (top_k, min_p, repetition_penalty) are accepted as vLLM
does. Types are strict, as OpenAI's are: `"stream": "yes"` or `"echo": 0` is an error, not a guess
(a number field still takes an integer, an integer field a whole number such as 5.0). Unknown fields are ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from plinth.generate import SamplingParams
from plinth.vision.imagine import MAX_STEPS

SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's \uXXXX escapes allow unpaired halves; Unicode text does not


class Strict(BaseModel):
    """Every part of a request: OpenAI's types, without pydantic's coercions (e.g. "yes" or 0 for a
    boolean, "5" for an integer; an `int` field takes 5.0, as JSON Schema's integer does). Subclasses' own model_config adds to this one."""
    model_config = ConfigDict(strict=True)


class Body(Strict):
    """A whole request body: also no lone UTF-16 surrogate in any string or key, used or not (JSON's
    \\uXXXX escapes allow one; no tokenizer or UTF-8 encoder takes it, so it would fail far from here),
    and a number without a fraction, such as 5.0, is an integer, as JSON Schema reads it (a float
    field takes an integer all the same)."""

    @model_validator(mode="before")
    @classmethod
    def _json_data(cls, data):
        found = lone_surrogate(data)
        if found is not None:  # a ValidationError, not a ValueError: its loc names the field, not the body
            loc, value, message = found
            problem = PydanticCustomError("lone_surrogate", f"{message}; send the character or a full surrogate pair")
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(type=problem, loc=loc,
                                                                                       input=value)])
        return whole_numbers(data)


def whole_numbers(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: whole_numbers(item) for key, item in value.items()}
    return [whole_numbers(item) for item in value] if isinstance(value, list) else value


def lone_surrogate(value, loc: tuple = ()) -> tuple[tuple, object, str] | None:
    """(location, value, what is wrong) for the first lone surrogate in parsed JSON, or None. The
    message shows it as an escape: with the character itself it could not be sent either."""
    if isinstance(value, str):
        match = SURROGATE.search(value)
        return (loc, value, f"lone UTF-16 surrogate {escape(match)} at character {match.start()}") if match else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and (match := SURROGATE.search(key)):
            return loc, value, f"lone UTF-16 surrogate {escape(match)} in a key"
        if (found := lone_surrogate(item, (*loc, key))) is not None:
            return found
    return None


def escape(match: re.Match) -> str:
    return f"\\u{ord(match[0]):04x}"


class RetrievalOptions(Strict):
    """plinth's extension to chat completions: add passages from a served index (plinth.serve.retrieval).
    Unlike the other bodies it refuses unknown fields, so a misspelt option is an error, not ignored."""
    model_config = ConfigDict(extra="forbid")
    index: str                                    # a NAME from `plinth serve --index NAME=FOLDER`
    k: int = Field(4, ge=1, le=50)                # passages to retrieve (those that fit the context are used)
    where: dict[str, Any] | None = None           # chunk field → shell pattern or value, as `plinth index query --where`
    mode: Literal["hybrid", "dense", "lexical"] = "hybrid"  # ranking, as `Index.search`


# What `_stops` enforces, for the schema only: the validator keeps its own message for a bad value.
Stop = Union[Annotated[str, WithJsonSchema({"type": "string", "minLength": 1})],
             Annotated[list[str], WithJsonSchema({"type": "array", "items": {"type": "string", "minLength": 1},
                                                  "maxItems": 4})], None]


# What the handlers enforce of prompts, embedding inputs and logit biases, for the schema
# only: the handlers keep their own messages (OpenAI's wording) for a bad value. Token ids' upper
# bound depends on the served model: /openapi.json adds it (plinth.serve.openapi.describe_served).
MAX_EMBEDDING_INPUTS = 2048  # as OpenAI allows
TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


def texts_or_tokens(most: int | None = None, **text) -> WithJsonSchema:
    """A string, strings, token ids or lists of token ids; `most` bounds the list of inputs."""
    bound = {"maxItems": most} if most else {}
    return WithJsonSchema({"anyOf": [{"type": "string", **text},
                                     {"type": "array", "items": {"type": "string", **text}, "minItems": 1, **bound},
                                     TOKEN_IDS, {"type": "array", "items": TOKEN_IDS, "minItems": 1, **bound}]})


LOGIT_BIAS = {"anyOf": [{"type": "null"}, {
    "type": "object", "propertyNames": {"pattern": "^(0|[1-9][0-9]*)$", "description": "A token id"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}]}


def requires(field: str, value, needs: str, needed, default=None) -> dict:
    """A JSON Schema rule, for /openapi.json, that `field` set to `value` (any non-null value if None)
    needs `needs` set to `needed` (left out, if that is its `default`), as a request validator or
    handler enforces."""
    given = {"not": {"type": "null"}} if value is None else {"const": value}
    then = {"properties": {needs: {"const": needed}}}
    return {"if": {"properties": {field: given}, "required": [field]},
            "then": then if needed == default else {**then, "required": [needs]}}


class FunctionDefinition(Strict):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema for the arguments")
    strict: bool | None = None  # plinth always enforces the schema of a forced call


class FunctionTool(Strict):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class ForcedFunction(Strict):
    """tool_choice naming the one function to call."""
    type: Literal["function"] = "function"
    function: FunctionName


class JsonSchemaFormat(Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the reply must match")
    strict: bool | None = None  # plinth always enforces the schema


class TextFormat(Strict):
    type: Literal["text", "json_object"]


class SchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, SchemaFormat], Field(discriminator="type")]


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str = Field(min_length=1, description="A data: URI (base64) or an http(s) URL of the image")
    detail: Literal["auto", "low", "high"] = "auto"  # accepted; an image's tokens do not depend on it here


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(Strict):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    def as_template_input(self) -> dict:
        """The message as plinth.vision.image_chat.split_images takes it: content text or a list of
        parts (dicts), `developer` read as `system`, and the tool fields (`tool_calls`,
        `tool_call_id`) when present."""
        content = self.content
        if isinstance(content, list):
            content = [part.model_dump() for part in content]
        extra = {k: v for k, v in (self.model_extra or {}).items() if k in ("tool_calls", "tool_call_id") and v}
        name = {"name": self.name} if self.name else {}
        return {"role": "system" if self.role == "developer" else self.role, "content": content or "", **name, **extra}


class SamplingFields(Body):
    """What chat and text completions share."""
    model_config = ConfigDict(extra="ignore")
    model: str
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: Stop = None
    seed: int | None = None
    logit_bias: Annotated[dict[str, float] | None, WithJsonSchema(LOGIT_BIAS)] = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for token, bias in (value or {}).items():
            if not re.fullmatch(r"[0-9]+", token):
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    def sampling(self, max_tokens: int, logprobs: int | None, choice: int = 0,
                 defaults: dict | None = None, seed: int | None = None, grammar: str | None = None) -> SamplingParams:
        """Parameters for choice number `choice` (with a seed, each of n choices gets its own).
        Fields the request leaves unset take the model's recommended `defaults`, then OpenAI's;
        `seed` stands in for a seed the request does not give."""
        seed = self.seed if self.seed is not None else seed
        set_fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                          repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                          frequency_penalty=self.frequency_penalty)
        return SamplingParams(max_tokens=max_tokens, stop=list(self.stop or []), logprobs=logprobs,
                              seed=None if seed is None else seed + choice, ignore_eos=self.ignore_eos, grammar=grammar,
                              logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
                              **{**(defaults or {}), **{k: v for k, v in set_fields.items() if v is not None}})


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [requires("top_logprobs", None, "logprobs", True),
                                                           requires("stream_options", None, "stream", True)]})
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    retrieval: RetrievalOptions | None = None  # plinth's extension: add passages from a served index
    tools: list[FunctionTool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], ForcedFunction, None] = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def plan_options(self) -> dict:
        """tools, tool_choice, parallel_tool_calls and response_format as plinth.serve.chat_tools.plan takes them."""
        return {"tools": [tool.model_dump(exclude_none=True) for tool in self.tools or []],
                "tool_choice": self.tool_choice.model_dump() if isinstance(self.tool_choice, ForcedFunction)
                else self.tool_choice, "parallel": self.parallel_tool_calls,
                "response_format": self.response_format and self.response_format.model_dump(by_alias=True)}

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [requires("max_tokens", 0, "echo", True),
                                                           requires("stream_options", None, "stream", True),
                                                           requires("echo", True, "stream", False, default=False)]})
    prompt: Annotated[Union[str, list[str], list[int], list[list[int]]], texts_or_tokens(minLength=1)] = Field(
        min_length=1)
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo, to score the prompt
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Annotated[str | None, WithJsonSchema({"anyOf": [{"const": ""}, {"type": "null"}],
                                                  "description": "Not supported: fill-in-the-middle"})] = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class EmbeddingRequest(Body):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: Annotated[Union[str, list[str], list[int], list[list[int]]], texts_or_tokens(most=MAX_EMBEDDING_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Only the model's own number of dimensions is served")


def served_only(*values, note: str) -> WithJsonSchema:
    """For the schema only: the values of one of OpenAI's fields that this server serves. The field
    takes all of OpenAI's, so that the handler can answer the others with a 400 saying why."""
    return WithJsonSchema({"anyOf": [{"enum": list(values)}, {"type": "null"}], "description": note})


class ImageGenerationRequest(Body):
    """OpenAI's image generation request. Fields the served generator has no use for are taken and
    ignored where that changes nothing (quality, style, moderation, user, ...); a value it cannot
    serve (a `url` response, JPEG output, a transparent background, a stream) is a 400 from the
    handler, and /openapi.json offers only what it serves. `seed`, `steps` and `guidance` are
    plinth's extensions; steps and guidance take ImageGenerator.check's ranges (its messages)."""
    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(max_length=32000, description="What to draw; an empty prompt draws without one")
    model: str | None = None
    n: int | None = Field(None, ge=1, le=10)
    size: Annotated[str | None, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "null"}], "description":
                                                "WIDTHxHEIGHT: only the model's own size, or auto"})] = None
    response_format: Annotated[Literal["url", "b64_json"] | None, served_only(
        "b64_json", note="Images come back as base64 PNG in the response, never as URLs")] = None
    output_format: Annotated[Literal["png", "webp", "jpeg", "gif", "svg"] | None, served_only(
        "png", note="Images are PNG")] = None
    background: Annotated[Literal["transparent", "opaque", "auto"] | None, served_only(
        "opaque", "auto", note="Images are opaque")] = None
    stream: Annotated[bool | None, served_only(False, note="Not supported: the images come in one response")] = None
    # ignored: `steps` sets the effort
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None            # ignored (OpenAI's legacy field)
    complexity: Literal["low", "medium", "high"] | None = None  # ignored
    moderation: Literal["low", "auto"] | None = None            # ignored: no moderation here
    output_compression: int | None = Field(None, ge=0, le=100)  # ignored: PNG is lossless
    partial_images: int | None = Field(None, ge=0, le=3)        # ignored: only for streams
    user: str | None = None                                     # ignored
    safety_identifier: str | None = None                        # ignored
    # at most 2^53 - 1: the integers every JSON reader holds exactly (JavaScript's, and a float-reading fuzzer's)
    seed: int | None = Field(None, ge=0, le=2**53 - 1, description="Seeds the noise: the same request with the "
                             "same seed gets the same images (plinth's extension)")
    steps: Annotated[int | None, WithJsonSchema({
        "anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_STEPS}, {"type": "null"}],
        "description": "Sampling steps (plinth's extension; default: the model's)"})] = None
    guidance: Annotated[float | None, WithJsonSchema({  # 20: ImageGenerator.check's bound, which the handler applies
        "anyOf": [{"type": "number", "minimum": 0, "maximum": 20}, {"type": "null"}],
        "description": "Classifier-free guidance: 0 ignores the prompt, 1 is the prompt alone (plinth's extension; "
                       "default: the model's)"})] = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error with an HTTP status, rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers
