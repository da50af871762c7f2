"""Request and response bodies of the OpenAI-compatible HTTP API (pydantic, at the edge)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from expertmesh.model.sampling import SamplingParams

MAX_STOP = 4


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="served model id (GET /v1/models)")
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        max_length=MAX_STOP)] | None = Field(None, description="up to 4 non-empty strings that end the completion")
    seed: int | None = Field(None, ge=0, le=2**53 - 1,  # exact in every JSON parser (doubles)
                             description="sampling seed (reproducible output)")
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

    def sampling_params(self) -> SamplingParams:
        """Every sampling option of this body, as the router's sampler takes them (vLLM's
        `to_sampling_params`)."""
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=tuple(self.stop_list()))


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] = Field(
        description="text, or token ids (not empty)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"] = Field(description="who speaks")
    content: str = Field(description="what is said")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")


def _one_source_schema(schema: dict) -> None:
    """Declare what `_one_source` enforces: exactly one of text / token_ids, neither null."""
    schema["oneOf"] = [{"required": ["text"]}, {"required": ["token_ids"]}]
    for name in ("text", "token_ids"):
        schema["properties"][name].pop("default", None)


class ContextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_source_schema)
    text: str = Field(None, min_length=1, description="context text (give exactly one of text or token_ids)")
    token_ids: list[int] = Field(None, min_length=1,
                                 description="context token ids (give exactly one of text or token_ids)")
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


def declare_limits(schema: dict, vocab_size: int, max_completion_tokens: int) -> dict:
    """An OpenAPI schema of this API with the serving limits it enforces: token ids inside the
    vocabulary, max_tokens up to the server's limit (known once the model is loaded)."""
    comps = schema["components"]["schemas"]
    ids = [comps["ContextRequest"]["properties"]["token_ids"]["items"]]
    ids += [v["items"] for v in comps["CompletionRequest"]["properties"]["prompt"]["anyOf"] if "items" in v]
    for item in ids:
        item.update(minimum=0, maximum=vocab_size - 1)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        comps[name]["properties"]["max_tokens"]["maximum"] = max_completion_tokens
    return schema
