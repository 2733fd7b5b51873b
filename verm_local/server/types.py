"""Request and response models of the reward server (OpenAI-compatible where OpenAI has
the endpoint; vLLM's extra sampling fields accepted)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    # OpenAI clients send fields this server does not use (user, logprobs=false, ...).
    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: str


class ContentPart(_Open):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None
    image: ImageURL | str | None = None


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class JSONSchemaFormat(_Open):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class SamplingFields(_Open):
    """OpenAI's sampling fields and vLLM's extras (top_k, repetition_penalty)."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=5.0)
    seed: int | None = None
    ignore_eos: bool | None = None  # vLLM's extra: generate max_tokens (benchmarks)


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    n: int | None = Field(None, ge=1, le=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # OpenAI's field for "the backend configuration that may change a seeded answer":
    # verm-local-bi<revision> where a greedy answer does not depend on the batch it ran in,
    # verm-local-batch-dependent where it can.
    system_fingerprint: str | None = None
    deterministic: bool = False  # verm-local's extension: the same, as a flag


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a `stream: true` chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class JudgeRequest(SamplingFields):
    """POST /v1/judge: two images (data URLs or base64) and the task; decoding is the
    task's (`sampling`: default, greedy or rl), the fields above override it."""

    gt: str | ImageURL
    pred: str | ImageURL
    task: str = "chart"
    sampling: Literal["default", "greedy", "rl"] = "default"
    max_errors: int | None = Field(None, ge=0)
    free: bool = False


class CritiqueRequest(SamplingFields):
    """POST /v1/critique: the ground truth and either the code (rendered here, in the
    sandbox, as the authors render the task) or its rendered image; the judgement and the
    revision message `refine` would send back to a policy."""

    gt: str | ImageURL
    task: str = "chart"
    code: str | None = None
    pred: str | ImageURL | None = None
    sampling: Literal["default", "greedy", "rl"] = "default"
    max_errors: int | None = Field(None, ge=0)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "verm-local"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
