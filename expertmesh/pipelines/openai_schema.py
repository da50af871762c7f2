"""Request and response bodies of the OpenAI-compatible HTTP API (pydantic, at the edge)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from expertmesh.model.grammar import GrammarSpec
from expertmesh.model.sampling import MAX_LOGPROBS, SamplingParams
from expertmesh.pipelines.openai_tools import Tool, ToolChoice, ToolPlan, plan

MAX_STOP = 16  # stop strings (OpenAI's 4 is too few for lm-eval's: humaneval sends 5 + the eos text; vLLM: no limit)
MAX_N = 16  # completions per prompt
MAX_PROMPTS = 64  # prompts in one completions request

# OpenAI fields this server accepts but does nothing with, and the values that mean "nothing"
# (anything else is a 400 that names the field: a request is never silently served differently)
INERT = {"store": (False, None), "metadata": (None,),
         "service_tier": ("auto", "default", None), "skip_special_tokens": (True,),
         "spaces_between_special_tokens": (True,), "suffix": (None, ""), "best_of": (None, 1),
         "functions": (None, []), "function_call": (None, "none")}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, description="the schema's name")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="a JSON Schema")
    strict: bool | None = Field(None, description="accepted; the grammar is always enforced")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> GrammarSpec | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return GrammarSpec("json_object")
        if self.json_schema is None:
            raise ValueError("response_format: type json_schema needs json_schema.schema")
        return GrammarSpec("json_schema", json.dumps(self.json_schema.schema_))


def _token_keys(schema: dict) -> None:
    """logit_bias's keys as patternProperties (what generators and validators read; propertyNames
    is not honoured by all)."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "object":
            names = branch.pop("propertyNames", {})
            branch.pop("additionalProperties", None)
            branch["patternProperties"] = {names.get("pattern", "^[0-9]{1,9}$"): {
                "type": "number", "minimum": -100, "maximum": 100}}
            branch["additionalProperties"] = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="one more chunk before [DONE]: the usage, choices empty")


class _Sampling(BaseModel):
    """The sampling fields both APIs share (OpenAI's, and vLLM's extra ones: top_k, min_p,
    repetition_penalty, min_tokens, ignore_eos, stop_token_ids). A field left out takes the
    checkpoint's generation_config.json default where it has one (temperature, top_p, top_k,
    min_p, repetition_penalty), as vLLM does, else OpenAI's."""

    # a field this server does not serve is refused with a 400 naming it (unserved()); the schema
    # declares none beyond those it serves
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})
    user: str | None = Field(None, max_length=256, description="the end user's id (accepted, not used)")
    model: str = Field(description="served model id (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=0, description="tokens to generate at most (completions: 16; chat: "
                                                         "the server's max_completion_tokens)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass; default 1")
    top_k: int | None = Field(None, ge=-1, description="keep the k most likely tokens (0 or -1: all)")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="drop tokens below min_p times the top one's probability")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted once from tokens already generated")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted per occurrence in the output")
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0,
                                             description="divides (multiplies, when negative) the logits of tokens "
                                                         "of the prompt and output; 1: none")
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100.0, le=100.0)]
                     ] | None = Field(None, max_length=1024, json_schema_extra=_token_keys,
                                      description="token id (as a string) -> bias added to its logit")
    min_tokens: int = Field(0, ge=0, description="eos and stop token ids cannot end the completion before this many")
    ignore_eos: bool = Field(False, description="the checkpoint's eos ids do not end the completion")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64,
                                                                     description="token ids that end the completion")
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        max_length=MAX_STOP)] | None = Field(None, description=f"up to {MAX_STOP} non-empty strings that end the "
                                                               "completion")
    seed: int | None = Field(None, ge=0, le=2**53 - 1,  # exact in every JSON parser (doubles)
                             description="sampling seed (reproducible output); choice i of n draws with seed + i")
    stream: bool = Field(False, description="server-sent events, one chunk per token")
    stream_options: StreamOptions | None = Field(None, description="with stream: include_usage")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: the answer "
                                                   "is drawn token by token among what the grammar allows")
    n: int = Field(1, ge=1, le=MAX_N, description="completions per prompt")
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

    def unserved(self) -> list[str]:
        """Fields of the request this server does not serve, given a value that would matter."""
        out = []
        for name, value in (self.model_extra or {}).items():
            inert = INERT.get(name, ())
            if name in INERT and (inert is None or value in inert):
                continue
            out.append(name)
        return sorted(out)

    def _max_new_tokens(self, default: int) -> int:
        return default if self.max_tokens is None else self.max_tokens

    def sampling_params(self, defaults: dict | None = None, max_new_tokens: int = 16, logprobs: int | None = None,
                        prompt_logprobs: int | None = None, choice: int = 0,
                        grammar: GrammarSpec | None = None) -> SamplingParams:
        """Every sampling option of this body, as the router's sampler takes them (vLLM's
        `to_sampling_params`); `defaults`: the checkpoint's generation_config.json sampling values;
        `grammar`: the answer's grammar where not the response format's (a forced tool call's)."""
        d = defaults or {}
        pick = lambda name, fallback: getattr(self, name) if getattr(self, name) is not None else d.get(name, fallback)
        top_k = pick("top_k", 0)
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            bias[int(key)] = value
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            seed=None if self.seed is None else self.seed + choice, stop=tuple(self.stop_list()),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            top_k=max(0, top_k), min_p=pick("min_p", 0.0), presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias=tuple(bias.items()), min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar or (self.response_format.grammar() if self.response_format is not None else None))


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1)] | TokenIds | Annotated[
        list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)] | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description="text, token ids, or a batch of either (not empty)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="log-probabilities of each token and of the k most likely ones")
    echo: bool = Field(False, description="the prompt's text (and with logprobs its tokens') before the completion")

    def prompts(self) -> list[str | list[int]]:
        """The batch: a string or a token list is one prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="who speaks")
    content: str | list[TextPart] | None = Field(None, description="what is said (text, or text parts)")
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls (its earlier turn)")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")
    type: Literal["text"] | None = Field(None, description="accepted, changes nothing (lm-eval 0.4.9-0.4.11 send "
                                                           "it on every message; vLLM ignores it)")

    def for_template(self) -> dict:
        """As chat templates read a message: content a string (text parts joined by newlines)."""
        m = self.model_dump(exclude_none=True, exclude={"type"})
        if isinstance(self.content, list):
            m["content"] = "\n".join(part.text for part in self.content)
        elif self.content is None:
            m["content"] = ""
        if self.tool_calls:
            m["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        return m


def _json_or_text(arguments: str):
    import json

    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=0, description="tokens to generate at most (OpenAI's "
                                                                    "newer name for max_tokens; wins over it)")
    logprobs: bool = Field(False, description="log-probabilities of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the k most likely "
                                                                            "tokens' at each position")
    add_generation_prompt: bool = Field(True, description="end the rendered conversation with the assistant's "
                                                          "turn opening (the chat template's)")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the chat template")
    tools: list[Tool] | None = Field(None, description="functions the model may call (rendered by the chat "
                                                       "template)")
    tool_choice: ToolChoice | None = Field(None, description="none, auto (the model chooses; only where the chat "
                                                             "template shows tools), required, or a named function "
                                                             "(forced calls are drawn under the tools' schemas)")

    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer")

    def tool_plan(self, template_shows_tools: bool) -> ToolPlan:
        """What the tools make of the answer (openai_tools.py); ToolsError: what is wrong."""
        return plan(self.tools, self.tool_choice, template_shows_tools, self.parallel_tool_calls is not False)

    def _max_new_tokens(self, default: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return default if self.max_tokens is None else self.max_tokens


SOURCES = ("text", "token_ids", "messages")


def _one_source_schema(schema: dict) -> None:
    """Declare what `_one_source` enforces: exactly one of text / token_ids / messages, none null."""
    schema["oneOf"] = [{"required": [name]} for name in SOURCES]
    for name in SOURCES:
        schema["properties"][name].pop("default", None)


class ContextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_source_schema)
    text: str = Field(None, min_length=1, description="context text (give exactly one of text, token_ids, messages)")
    token_ids: list[int] = Field(None, min_length=1,
                                 description="context token ids (give exactly one of text, token_ids, messages)")
    messages: list[ChatMessage] = Field(None, min_length=1,
                                        description="a conversation (e.g. a system message holding a document), "
                                                    "rendered by the chat template with no generation prompt; a chat "
                                                    "over the context continues it")
    mode: Literal["exact", "blockwise"] = Field("exact", description="registration mode")
    visibility: Literal["private", "shared"] = Field("private", description="shared: every tenant may use it")
    name: str | None = Field(None, max_length=256, description="a label for the context")
    background: StrictBool = Field(False, description="answer 202 at once with the registration's id; GET "
                                                "/v1/contexts/{id}/registration reports its progress, and the "
                                                "context once it is ready")

    @model_validator(mode="after")
    def _one_source(self):
        given = [name for name in SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, token_ids or messages (got {given or 'none'})")
        if not getattr(self, given[0]):
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
    chat: bool = Field(False, description="registered as messages: a chat over it continues that conversation")


class ContextRegistration(BaseModel):
    """A registration started with background: true, as it stands."""

    id: str = Field(description="the context's id (it is listed once ready)")
    object: Literal["context.registration"] = "context.registration"
    status: Literal["registering", "ready", "failed"]
    num_tokens: int
    tokens_done: int = Field(description="tokens whose KV is computed (or reused from the store)")
    tokens_per_s: float
    eta_s: float | None = Field(description="seconds left at the rate so far (registering only)")
    error: str | None = None
    context: ContextObject | None = Field(None, description="the context, once ready")


class ContextList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ContextObject]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    context_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions log-probabilities: per token its text, its log-probability
    (None for a prompt's first token), the k most likely tokens' and the offset of its text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, description="the functions the model calls (with tools)")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    for v in comps["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        item = v.get("items", {})
        if item.get("type") == "integer":
            ids.append(item)
        elif item.get("type") == "array":  # a batch of token lists
            ids.append(item["items"])
    for item in ids:
        item.update(minimum=0, maximum=vocab_size - 1)
    for name, field in (("CompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_tokens"),
                        ("ChatCompletionRequest", "max_completion_tokens")):
        prop = comps[name]["properties"][field]
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") == "integer":
                branch["maximum"] = max_completion_tokens
    return schema
