"""Request bodies of Ollama's API (pydantic), read from a request by `parsed`, and their `options`
mapped onto `SamplingParams`.

Field names and types follow Ollama's API reference and its official Python client
(`ollama._types`), so that client's requests validate unchanged. Types are strict, as Ollama's Go
decoder is (`"stream": "yes"` is an error; null is a field left out, as Go reads it), on the same
`Body` as the OpenAI routes' requests (no lone UTF-16 surrogates; 5.0 is an integer). Unknown
fields are ignored, and so are unknown `options`, as Ollama only logs them; of the options Ollama
knows, those plinth has no sampler for (mirostat, typical_p, tfs_z, repeat_last_n,
penalize_newline, num_keep) and the runner's (num_ctx, num_gpu, num_thread, ...) are taken and
change nothing: the server's own flags set its context window and hardware.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Union

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plinth.generate import SamplingParams
from plinth.serve.schemas import Body, FunctionTool, Strict

# Ollama's own defaults (its api.DefaultOptions) for what neither the request nor the model's card
# sets, so a request that sets nothing samples as it would on Ollama. Its repeat_penalty default
# (1.1 over the last 64 tokens) is left out: plinth's penalty has no window, and 1.1 over a whole
# conversation would be another sampler.
OLLAMA_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.9)
KeepAlive = Union[float, str, None]  # a duration ("5m", seconds): taken and ignored, the model stays loaded


class Options(Strict):
    """The `options` plinth samples with; every other key is ignored (see the module docstring)."""
    model_config = ConfigDict(extra="ignore")
    num_predict: int | None = None     # tokens to generate; -1 (Ollama's default), -2 or 0: until the context ends
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None            # negative (Ollama's default, -1): not given
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    def token_limit(self) -> int | None:
        return self.num_predict if self.num_predict and self.num_predict > 0 else None

    def sampling(self, max_tokens: int, logprobs: int | None, defaults: dict, seed: int | None,
                 grammar: str | None) -> SamplingParams:
        """The request's options over the model's recommended `defaults`, over Ollama's; `seed`
        stands in for one the request does not give (the server's --seed)."""
        given = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                     repetition_penalty=self.repeat_penalty, presence_penalty=self.presence_penalty,
                     frequency_penalty=self.frequency_penalty)
        if self.seed is not None and self.seed >= 0:
            seed = self.seed
        return SamplingParams(max_tokens=max_tokens, stop=list(self.stop or []), logprobs=logprobs, seed=seed,
                              grammar=grammar, **{**OLLAMA_DEFAULTS, **defaults,
                                                  **{k: v for k, v in given.items() if v is not None}})


class ToolCallFunction(Strict):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(Strict):
    model_config = ConfigDict(extra="ignore")
    function: ToolCallFunction


class Message(Strict):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None     # base64 of each image's file bytes (PNG, JPEG, WebP, GIF)
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None        # a tool result's function

    def as_template_input(self) -> dict:
        """The message as plinth.vision.image_chat.split_images and plinth.tools.render take it:
        images as content parts before the text (LLaVA's "<image>\\nquestion"), calls with their
        arguments as objects, a tool result named by its function."""
        content: str | list[dict] = self.content or ""
        if self.images:
            content = [*map(image_part, self.images), {"type": "text", "text": content}]
        message = {"role": self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_name:
            message["name"] = self.tool_name
        return message


def image_part(payload: str) -> dict:
    """Ollama's image, the file's bytes in base64, as the data: URI an image_url part carries; the
    image's real type is read from its bytes."""
    return {"type": "image_url", "image_url": {"url": f"data:image/*;base64,{payload}"}}


class Generation(Body):
    """What /api/chat and /api/generate share."""
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    stream: bool | None = None         # None (left out or null): true, Ollama streams by default
    format: Union[Literal["", "json"], dict[str, Any], None] = None  # "json", or a JSON schema the reply matches
    options: Options | None = None
    keep_alive: KeepAlive = None
    think: Union[bool, Literal["low", "medium", "high"], None] = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def streams(self) -> bool:
        return self.stream is not False

    @property
    def sampling_options(self) -> Options:
        return self.options or Options()

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatRequest(Generation):
    messages: list[Message] | None = None  # none: only "load" the model, as Ollama answers
    tools: list[FunctionTool] | None = None


class GenerateRequest(Generation):
    prompt: str | None = None          # empty (and no images): only "load" the model, as Ollama answers
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool | None = None
    images: list[str] | None = None
    context: list[int] | None = None   # a previous answer's `context`: its prompt and reply, as token ids


class EmbedRequest(Body):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    input: Union[str, list[str]]
    truncate: bool | None = None       # false: an input over the model's limit is a 400, not cut
    dimensions: int | None = Field(None, ge=1)
    options: dict[str, Any] | None = None  # nothing to set for an embedding model
    keep_alive: KeepAlive = None


class EmbeddingsRequest(Body):
    """The older /api/embeddings: one text."""
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class ModelRequest(Body):
    """/api/show and /api/pull: a model's name."""
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    verbose: bool | None = None
    stream: bool | None = None
    insecure: bool | None = None


async def parsed(request: Request, model: type[BaseModel]):
    """The request body as `model`. Ollama reads every body as JSON whatever its Content-Type (its
    documentation's `curl -d` sends application/x-www-form-urlencoded), so these routes do too; a
    bad body is the RequestValidationError FastAPI raises for the other routes (their 400)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as e:  # also bytes that are not UTF-8
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": str(e)}]) from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(), body=data) from e
