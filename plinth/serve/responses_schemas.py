"""The Responses API's request body (pydantic, validated) and its response bodies (documented for
/openapi.json only: plinth/serve/responses.py builds the JSON itself), as OpenAI's API reference
and the official client's types have them.

What plinth serves of a request: `input` as text or items (messages with text and image parts,
earlier replies, function calls and their outputs), `instructions`, `previous_response_id` and
`store`, `max_output_tokens`, `temperature`, `top_p`, function `tools` with `tool_choice` and
`parallel_tool_calls`, `text.format` (text, json_object, json_schema), `stream`; `seed` is plinth's
extension. `metadata`, `user`, `truncation`, `reasoning`, `include` and `text.verbosity` are taken
(echoed or ignored: they change nothing here), and unknown fields are ignored, as in the other
bodies (schemas.py). What it cannot serve is taken so that the handler answers a 400 that says why
(OpenAI's built-in tools, an image by `file_id`, `background`, `conversation`, `prompt`), and is not
offered by /openapi.json.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema, field_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from plinth.generate import SamplingParams
from plinth.serve.schemas import Body, Strict, served_only


# ---- input items -----------------------------------------------------------------------------------
class InputText(Strict):
    type: Literal["input_text"]
    text: str


class InputImage(Strict):
    model_config = ConfigDict(json_schema_extra={"required": ["type", "image_url"]})
    type: Literal["input_image"]
    image_url: Annotated[str | None, WithJsonSchema({
        "type": "string", "minLength": 1, "description": "A data: URI (base64) or an http(s) URL of the image"})] = None
    file_id: SkipJsonSchema[str | None] = None  # no Files API here: a 400 says to send image_url
    detail: Literal["low", "high", "auto", "original"] = "auto"  # accepted; an image's tokens do not depend on it


class OutputText(Strict):
    """An earlier reply's text, as a client sends its history back (annotations, logprobs ignored)."""
    type: Literal["output_text"]
    text: str


class Refusal(Strict):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[Union[InputText, InputImage, OutputText, Refusal], Field(discriminator="type")]


class InputMessage(Strict):
    """A message, as OpenAI's EasyInputMessage (no `type`) or an input or output message item (its
    `id` and `status` ignored); `developer` is read as `system`."""
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[Part]]


class FunctionCallItem(Strict):
    """A function call the model made, sent back with its output to continue the conversation."""
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[InputText]]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def item_type(item) -> str | None:
    """A message may leave out its `type`, as OpenAI's EasyInputMessage does."""
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)


Item = Annotated[Union[Annotated[InputMessage, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
                       Annotated[FunctionCallOutputItem, Tag("function_call_output")]],
                 Discriminator(item_type, custom_error_type="input_item", custom_error_message=(
                     "plinth takes input items of type message, function_call and function_call_output"))]


# ---- tools and output format -------------------------------------------------------------------------
class ResponsesFunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema for the arguments")
    strict: bool | None = None  # plinth always enforces the schema of a forced call


class ResponsesForcedFunction(Strict):
    """tool_choice naming the one function to call."""
    type: Literal["function"]
    name: str


class ResponsesTextFormat(Strict):
    type: Literal["text", "json_object"]


class ResponsesSchemaFormat(Strict):
    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the reply must match")
    description: str | None = None
    strict: bool | None = None  # plinth always enforces the schema


class ResponsesTextConfig(Strict):
    format: Annotated[Union[ResponsesTextFormat, ResponsesSchemaFormat], Field(discriminator="type")] = Field(
        default_factory=lambda: ResponsesTextFormat(type="text"))
    verbosity: Literal["low", "medium", "high"] | None = None  # ignored


class ResponseRequest(Body):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None                      # the served model when left out
    input: Union[str, list[Item]]
    instructions: str | None = None               # a system message first; not carried to a continuation
    previous_response_id: str | None = None
    store: bool | None = None                     # keep the response for previous_response_id (default true)
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None                       # plinth's extension, as chat completions' seed
    tools: list[ResponsesFunctionTool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], ResponsesForcedFunction, None] = None
    parallel_tool_calls: bool | None = None       # default true
    text: ResponsesTextConfig | None = None
    metadata: dict[str, str] | None = None        # echoed
    user: str | None = None                       # echoed
    truncation: Literal["auto", "disabled"] | None = None  # echoed: a prompt that does not fit is a 400
    reasoning: dict[str, Any] | None = None       # echoed: the model does not reason apart from its reply
    include: list[str] | None = None              # ignored: there is nothing extra to include
    background: Annotated[bool | None, served_only(False, note="Not supported: responses are answered, or "
                                                               "streamed, in the request")] = None
    conversation: SkipJsonSchema[Any] = None      # the Conversations API is not served: a 400 says so
    prompt: SkipJsonSchema[Any] = None            # nor stored prompt templates

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, tools):
        hosted = [t["type"] for t in tools if isinstance(t, dict) and isinstance(t.get("type"), str)
                  and t["type"] != "function"] if isinstance(tools, list) else []
        if hosted:  # named here, not as a mismatch of the function tool's fields
            raise PydanticCustomError("hosted_tool", "{message}", {"message": (
                f"OpenAI's built-in tools are not served by plinth: {', '.join(dict.fromkeys(hosted))}; give "
                "function tools ({\"type\": \"function\", \"name\": ..., \"parameters\": {...}}) and run them in "
                "your code")})
        return tools

    def input_items(self) -> list[dict]:
        """The input as items (text is one user message), as JSON."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return [item.model_dump(exclude_none=True) for item in self.input]

    def plan_options(self) -> dict:
        """tools, tool_choice, parallel_tool_calls and text.format as plinth.serve.chat_tools.plan
        takes them: in chat completions' shapes."""
        tools = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                 for tool in self.tools or []]
        choice = self.tool_choice
        if isinstance(choice, ResponsesForcedFunction):
            choice = {"type": "function", "function": {"name": choice.name}}
        form = self.text_config().format
        response_format = ({"type": "json_schema", "json_schema": form.model_dump(by_alias=True, exclude={"type"})}
                           if isinstance(form, ResponsesSchemaFormat) else form.model_dump())
        return {"tools": tools, "tool_choice": choice, "parallel": self.parallel_tool_calls is not False,
                "response_format": response_format}

    def text_config(self) -> ResponsesTextConfig:
        return self.text or ResponsesTextConfig()

    def sampling(self, max_tokens: int, defaults: dict, seed: int | None, grammar: str | None) -> SamplingParams:
        """As chat completions' (schemas.SamplingFields.sampling): the request's temperature and
        top_p over the model's recommended `defaults`; `seed` stands in for one the request does not give."""
        chosen = {name: value for name, value in (("temperature", self.temperature), ("top_p", self.top_p))
                  if value is not None}
        return SamplingParams(max_tokens=max_tokens, grammar=grammar, seed=self.seed if self.seed is not None else seed,
                              **{**defaults, **chosen})


# ---- what /openapi.json documents of the answers -------------------------------------------------------
class ResponseText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]]             # always empty: no citations here
    logprobs: list[dict[str, Any]]                # always empty


class ResponseMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[ResponseText]


class ResponseCall(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str                                  # what the function_call_output item names
    name: str
    arguments: str                                # JSON text
    status: Literal["in_progress", "completed", "incomplete"]
    parse_error: str | None = None                # plinth's extension: the arguments did not parse or fit


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int                             # the prompt's, with an image's tokens
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A response; streamed (`stream: true`), typed server-sent events, each named by its `type`."""
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[Annotated[Union[ResponseMessage, ResponseCall], Field(discriminator="type")]]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict[str, Any] | None
    store: bool
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    truncation: Literal["auto", "disabled"]
    usage: ResponseUsage | None                   # null until the response is done
    user: str | None
    metadata: dict[str, str]


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"]
    deleted: Literal[True]
