"""Request and response bodies of the OpenAI-compatible HTTP API (pydantic, at the edge)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP = 4


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="served model id (GET /v1/models)")
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the completion")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed (reproducible output)")
    stream: bool = Field(False, description="server-sent events, one chunk per token")
    n: int = Field(1, ge=1, le=1, description="completions per prompt (only 1)")
    context_id: str | None = Field(None, max_length=128, description="registered context to attend over")
    top_shards: int | None = Field(None, ge=1, le=4096, description="visit only the k best-scoring context shards")
    top_pages: int | None = Field(None, ge=1, le=1 << 24,
                                  description="in each shard, attend only the p best-bounded KV pages (Quest); "
                                              "None: every page (exact)")

    @model_validator(mode="after")
    def _stops(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(description="text, or token ids")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"] = Field(description="who speaks")
    content: str = Field(description="what is said")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")


class ContextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="context text (give text or token_ids)")
    token_ids: list[int] | None = Field(None, description="context token ids (give text or token_ids)")
    mode: Literal["exact", "blockwise"] = Field("exact", description="registration mode")
    visibility: Literal["private", "shared"] = Field("private", description="shared: every tenant may use it")
    name: str | None = Field(None, max_length=256, description="a label for the context")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of text or token_ids")
        if self.text is not None and not self.text or self.token_ids is not None and not self.token_ids:
            raise ValueError("the context is empty")
        return self


class ContextObject(BaseModel):
    id: str
    object: Literal["context"] = "context"
    num_tokens: int
    shards: list[int]
    owner: str
    visibility: str
    name: str | None
    mode: str
    created: int


class ContextList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ContextObject]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    context_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    pathway: dict


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    pathway: dict


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "expertmesh"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
