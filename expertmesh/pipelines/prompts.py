"""A request's prompt as token ids, at the HTTP edge: text encoded with the checkpoint's
tokenizer, a conversation rendered by its own chat template (transformers'
apply_chat_template), a chat over a context registered as messages cut to what follows the
context's tokens; every id checked against the vocabulary and the server's prompt limit."""

from __future__ import annotations

import json
from typing import Any

from expertmesh.model.chat_template import ChatTemplate, ChatTemplateError
from expertmesh.pipelines import openai_schema as oa
from expertmesh.pipelines.api_errors import ApiError
from expertmesh.pipelines.openai_tools import ToolPlan, ToolsError


class Prompts:
    def __init__(self, tokenizer: Any, vocab_size: int, max_prompt_tokens: int, chat_template: ChatTemplate | None,
                 checkpoint: str) -> None:
        self.tokenizer, self.vocab_size, self.max_prompt_tokens = tokenizer, vocab_size, max_prompt_tokens
        self.chat_template, self.checkpoint = chat_template, checkpoint

    def encode(self, text: str, param: str, special: bool = False) -> list[int]:
        if not getattr(self.tokenizer, "available", True):  # token ids in, but text comes out
            raise ApiError(400, self.tokenizer.reason, param=param, code="no_tokenizer")
        return self.tokenizer.encode(text, add_special_tokens=special)

    def prompt(self, prompt: str | list[int], special: bool = True) -> list[int]:
        """A prompt's token ids, checked. Text of a completion gets the tokenizer's special tokens
        (a bos where its config adds one, as vLLM's completions); a rendered chat does not (the
        template wrote them)."""
        if not getattr(self.tokenizer, "available", True):  # completions return text
            raise ApiError(400, f"{self.tokenizer.reason} (the Python API: Mesh.generate); completions "
                           "return text", param="prompt", code="no_tokenizer")
        ids = self.encode(prompt, "prompt", special) if isinstance(prompt, str) else list(prompt)
        vocab = self.vocab_size
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(413, f"prompt of {len(ids)} tokens is over the limit of "
                           f"{self.max_prompt_tokens} tokens", param="prompt", code="prompt_too_long")
        return ids

    def render(self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None,
               kwargs: dict | None = None) -> str:
        """Messages through the checkpoint's own chat template (as apply_chat_template(tokenize=False))."""
        if self.chat_template is None:
            raise ApiError(400, f"the checkpoint {self.checkpoint!r} has no chat template "
                           "(chat_template in tokenizer_config.json, or chat_template.jinja); use /v1/completions "
                           "(or register text or token_ids)", param="messages", code="no_chat_template")
        try:
            return self.chat_template.render(messages, add_generation_prompt=generation_prompt, tools=tools,
                                             **(kwargs or {}))
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), param="messages", code="chat_template_error") from None

    def chat(self, body: oa.ChatCompletionRequest, context=None) -> tuple[list[int], ToolPlan]:
        """The conversation (and its tools) through the chat template, as token ids; and what the
        tools make of the answer. Over a context registered as messages, the conversation is those
        messages and the request's, and the ids are what follows the context's tokens (which must
        be a prefix of the whole conversation's)."""
        if self.chat_template is None:
            self.render([], False)  # the 400 that says so
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            tools = body.tool_plan(self.chat_template.shows_tools())
        except ToolsError as exc:
            raise ApiError(400, str(exc), param=exc.param, code="invalid_tools") from None
        messages = [m.for_template() for m in body.messages]
        head = json.loads(context.chat) if context is not None and context.chat is not None else []
        text = self.render(head + messages, body.add_generation_prompt, list(tools.tools) or None,
                           body.chat_template_kwargs)
        if not head:
            return self.prompt(text, special=False), tools
        ids = self.encode(text, "messages")
        registered = self.encode(self.render(head, False, None, body.chat_template_kwargs), "messages")
        if len(registered) != context.num_tokens or ids[:len(registered)] != registered:
            raise ApiError(400, f"the chat template renders this conversation so that context {context.id!r} "
                           f"({context.num_tokens} tokens, registered as messages) is not a token prefix of it "
                           f"({'tools, or ' if tools.tools else ''}chat_template_kwargs change how its messages "
                           "render, or the template rewrites earlier turns); send the whole conversation "
                           "without context_id", param="messages", code="context_not_a_prefix")
        return self.prompt(ids[len(registered):], special=False), tools
