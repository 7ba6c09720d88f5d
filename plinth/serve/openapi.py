"""What /openapi.json documents besides the request bodies (plinth/serve/schemas.py): each route's
response bodies and the error statuses it can answer, with OpenAI's error body.

The routes build their JSON themselves (openai_api.py); these models only document it, so clients
and fuzzers can check a response. They are never used to validate or serialise one.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str                                     # e.g. invalid_request_error, rate_limit_error, server_error
    param: str | None = None                      # the request field at fault, if one is
    code: str | None = None                       # e.g. model_not_found, invalid_api_key


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every non-2xx answer has (but /health's 503 from a stalled engine)."""
    error: ErrorDetail


ERRORS = {400: "Invalid request: the message names the bad value, `param` the field",
          401: "Missing or wrong API key (only when the server was started with one)",
          404: "Unknown model (with --strict-models), no embedding model served, or no stored response of that id",
          413: "The request body is over 8 MiB",
          429: "The engine's queue is full; retry after the Retry-After header's seconds",
          503: "The server is shutting down or its engine has stopped; retry on another instance",
          "default": "Any other error, e.g. 500 for a fault in the server"}


def error_responses(*statuses, json_route: bool = True) -> dict:
    """`responses=` for a route: OpenAI's error body under each status it can answer. Documenting
    "default" also keeps FastAPI from adding a 422 the server never sends (it answers 400).

    FastAPI files a `model` under the route's own media type, so a text route (`json_route=False`)
    names the schema by reference instead; a JSON route of the same app puts it in the components."""
    body = ({"model": ErrorResponse} if json_route else
            {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
    return {status: {**body, "description": ERRORS[status]} for status in (*statuses, "default")}


def describe_served(schema: dict, vocab_size: int | None, embedder, indexes, api_key: bool, reads_images: bool,
                    image_size: int | None = None) -> dict:
    """What only the running server knows, added to the generated document: the range of token ids
    (the language model's, and the embedding model's), the embeddings' dimensions, the names of the
    served retrieval indexes, whether /v1/ routes need the API key, and whether the model reads
    images (a text model answers image parts with a 400, so its document offers text parts only).

    The routes offered are the served model's: a language model's text routes (vocab_size), or an
    image generator's /v1/images/generations (image_size, the side of its square images). Each
    answers the other's with a 400, which a document must not invite."""
    paths = schema["paths"]
    if image_size is None:
        del paths["/v1/images/generations"]
    else:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            del paths[path]
    if api_key:
        schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        for path, operations in paths.items():
            for operation in operations.values() if path.startswith("/v1/") else ():
                operation["security"] = [{"apiKey": []}]
    parts = schema["components"]["schemas"]
    if image_size is not None:
        parts["ImageGenerationRequest"]["properties"]["size"] = {
            "anyOf": [{"enum": ["auto", f"{image_size}x{image_size}"]}, {"type": "null"}],
            "description": "The model's own size (auto and null stand for it): no other is served"}
    if vocab_size is not None:
        describe_text_model(parts, vocab_size, reads_images)
    parts["RetrievalOptions"]["properties"]["index"]["enum"] = sorted(indexes)  # none served: no retrieval
    if embedder is not None:
        request = parts["EmbeddingRequest"]["properties"]
        bound_token_ids(request["input"], embedder.vocab_size - 1)
        request["dimensions"] = {"anyOf": [{"const": embedder.dimensions}, {"type": "null"}],
                                 "description": "The embeddings' dimensions: only the model's own are served"}
    return schema


def describe_text_model(parts: dict, vocab_size: int, reads_images: bool):
    """A language model's requests: image parts only if it reads images, token ids below its vocabulary's size."""
    if not reads_images:
        for option in parts["ChatMessage"]["properties"]["content"]["anyOf"]:
            if option.get("type") == "array":
                option["items"] = {"$ref": "#/components/schemas/TextPart"}
        for option in parts["InputMessage"]["properties"]["content"]["anyOf"]:  # the Responses API's
            if option.get("type") == "array":
                union = option["items"]
                union["oneOf"].remove({"$ref": union["discriminator"]["mapping"].pop("input_image")})
    bound_token_ids(parts["CompletionRequest"]["properties"]["prompt"], vocab_size - 1)
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        for option in parts[request]["properties"]["logit_bias"]["anyOf"]:
            if "propertyNames" in option:  # JSON object keys are strings: a pattern bounds the ids they name
                option["propertyNames"]["pattern"] = decimal_at_most(vocab_size - 1)


def bound_token_ids(node, largest: int):
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = largest
        for child in node.values():
            bound_token_ids(child, largest)
    elif isinstance(node, list):
        for child in node:
            bound_token_ids(child, largest)


def decimal_at_most(largest: int) -> str:
    """A regular expression for the decimal integers 0 ... `largest`, without leading zeros: those
    with fewer digits, then, digit by digit, those with `largest`'s first digits and a smaller next one."""
    digits = str(largest)
    forms = [digits] + ([f"0|[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else [])
    for i, digit in enumerate(digits):
        lowest = 1 if i == 0 and len(digits) > 1 else 0
        if int(digit) > lowest:
            forms.append(f"{digits[:i]}[{lowest}-{int(digit) - 1}][0-9]{{{len(digits) - i - 1}}}")
    return "^(" + "|".join(forms) + ")$"


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    input_modalities: list[Literal["text", "image"]] = Field(
        description="What the model reads: a plinth extension, named as OpenRouter names it")
    output_modalities: list[Literal["text", "image", "embeddings"]] = Field(
        description="What the model makes: a plinth extension, named as OpenRouter names it")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose keys and values came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str
    parse_error: str | None = None                # plinth's extension: the arguments did not parse


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    """A chat completion; streamed (`stream: true`), `chat.completion.chunk` server-sent events."""
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage
    sources: list[dict[str, Any]] | None = None   # plinth's extension: with `retrieval`, the passages used


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists, one entry per token (null for an echoed prompt's first)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    """A text completion; streamed (`stream: true`), `text_completion` server-sent events."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str                  # a string: base64 of little-endian float32 (encoding_format)


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class GeneratedImage(BaseModel):
    b64_json: str                                 # a PNG, base64-encoded


class ImageTokens(BaseModel):
    text_tokens: int
    image_tokens: int


class ImageUsage(BaseModel):
    """OpenAI's image usage: input_tokens are the prompt's tokens in the generator's sentence encoder
    (0 for an empty prompt); output_tokens the image tokens made (n × patches per image)."""
    input_tokens: int
    input_tokens_details: ImageTokens
    output_tokens: int
    output_tokens_details: ImageTokens
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[GeneratedImage]
    background: Literal["opaque"]
    output_format: Literal["png"]
    size: str                                     # WIDTHxHEIGHT
    usage: ImageUsage


class Health(BaseModel):
    status: Literal["ok"]
    running: int                                  # sequences holding a KV-cache slot
    waiting: int                                  # requests queued for one


class HealthError(BaseModel):
    status: Literal["error"]
    message: str
