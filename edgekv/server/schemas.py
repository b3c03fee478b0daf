"""Request and response bodies in the OpenAI chat-completions shape, plus the `edgekv` extension field.

Only what edgekv serves is modelled; unknown request fields are ignored (clients send many), wrong types
in known fields are a 400: booleans and numbers are strict (no "yes" -> True, no true -> 1)."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Lenient):
    """A clip (edgekv's extension, in vLLM's shape): a data: URL (video/mp4, webm...) or an allowed path."""

    type: Literal["video_url"]
    video_url: ImageURL


ContentPart = Union[TextPart, ImagePart, VideoPart]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]   # the last two: 400 (app)
    content: Union[str, list[ContentPart], None] = None


class EdgeKVOptions(BaseModel):
    """The request's `edgekv` extension field: overrides the server's --method/--budget for new media."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    budget: Union[StrictInt, StrictFloat, StrictStr, None] = None


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class JSONSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Union[StrictInt, StrictFloat, None] = Field(default=None, ge=0)
    top_p: Union[StrictInt, StrictFloat, None] = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**64)   # numpy's generator takes no negative seed
    stop: Union[str, list[str], None] = None
    n: StrictInt = 1
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # OpenAI fields edgekv does not serve: present and not empty -> 400, never silently ignored
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    edgekv: EdgeKVOptions | None = None


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
