"""An OpenAI body as the router's requests, one per (prompt, choice), built whole at the HTTP
edge before admission: fields this server does not serve refused by name, a grammar (the
response format's or a forced tool call's) compiled once here so no batch waits on it, token ids
checked against the vocabulary, and a seed for every sampled request that has none (a request
whose router dies under it is replayed elsewhere: the same seed draws the tokens already sent)."""

from __future__ import annotations

import dataclasses
import secrets
import uuid

from expertmesh.engine.request import Request as RouterRequest
from expertmesh.model.grammar import Grammars
from expertmesh.pipelines import openai_schema as oa
from expertmesh.pipelines.api_errors import ApiError
from expertmesh.pipelines.openai_tools import ToolPlan


class RouterRequests:
    def __init__(self, grammars: Grammars, vocab_size: int, sampling_defaults: dict) -> None:
        """grammars: compiled lazily (the tokenizer's vocabulary is read at the first grammar)."""
        self.grammars, self.vocab_size, self.sampling_defaults = grammars, vocab_size, sampling_defaults

    def build(self, body: oa._Sampling, prompts: list[list[int]], tenant: str, max_new_tokens: int,
              logprobs: int | None, prompt_logprobs: int | None,
              tools: ToolPlan | None = None) -> list[RouterRequest]:
        """The router's requests for an OpenAI body, one per (prompt, choice), in the order of the
        answer's choices: built here, whole, before admission."""
        unserved = body.unserved()
        if unserved:
            raise ApiError(400, f"{', '.join(unserved)}: not supported by this server (a request is never "
                           f"served as if {'they' if len(unserved) > 1 else 'it'} were not there); see GET "
                           "/openapi.json for the fields it serves", param=unserved[0], code="unsupported_parameter")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        grammar = body.response_format.grammar() if body.response_format is not None else None
        param = "response_format"
        forced = tools.grammar() if tools is not None else None
        if forced is not None:
            if grammar is not None:
                raise ApiError(400, "response_format and a forced tool_choice both constrain the answer; give one",
                               param="response_format")
            grammar, param = forced, "tools"
        if grammar is not None:  # a schema the engine cannot compile: a 400 now, not an error mid-batch
            try:
                self.grammars.check(grammar)
            except ValueError as exc:
                raise ApiError(400, str(exc), param=param, code=f"invalid_{param}") from None
        vocab = self.vocab_size
        for param, ids in (("logit_bias", [int(k) for k in body.logit_bias or {}]),
                           ("stop_token_ids", body.stop_token_ids or [])):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)
        group = uuid.uuid4().hex[:24]
        out = []
        try:
            for p, ids in enumerate(prompts):
                for c in range(body.n):
                    params = body.sampling_params(self.sampling_defaults, max_new_tokens, logprobs, prompt_logprobs,
                                                  choice=c, grammar=grammar)
                    if params.seed is None and params.temperature > 0:  # a replay after a router's loss draws
                        params = dataclasses.replace(params, seed=secrets.randbits(63))  # the tokens already sent
                    i = p * body.n + c
                    out.append(RouterRequest(ids, body.context_id, params, tenant,
                                             f"cmpl-{group}" + (f"-{i}" if i else ""), body.top_shards,
                                             body.top_pages))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return out
