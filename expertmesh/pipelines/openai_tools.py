"""Function calling in the chat API: `tools`, `tool_choice`, and the `tool_calls` of an answer.

What a request's tools mean for its answer, as vLLM's OpenAI server does it:
- the tools are rendered by the checkpoint's chat template (its `tools` variable), whatever the
  choice, so the model reads them as it was trained to;
- `tool_choice` "none": the model answers in text;
- a named function (`{"type": "function", "function": {"name": ...}}`): the answer is drawn
  under that function's `parameters` schema (a grammar) and returned as one call of it
  (finish_reason "stop", as OpenAI's forced calls);
- "required": the answer is drawn under the schema of a JSON array of one or more calls
  `[{"name": ..., "parameters": {...}}]` (vLLM's form), each name one of the tools, its
  parameters that tool's schema (one at most with parallel_tool_calls false); finish_reason
  "tool_calls";
- "auto": the model chooses; its calls are read from its text in the Hermes form
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5, Qwen3, Hermes templates);
  only where the checkpoint's template shows the tools to the model at all (otherwise a 400
  that says to force a call instead). Text before the first call is the message's content.
An answer cut by max_tokens is returned as text (finish_reason "length"): it is no valid call.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.model.grammar import GrammarSpec

MAX_TOOLS = 128
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$", description="the function's name")
    description: str | None = Field(None, description="what it does (for the model)")
    parameters: dict[str, Any] | None = Field(None, description="its arguments, a JSON Schema object; "
                                                               "none: no arguments")
    strict: bool | None = Field(None, description="accepted; a forced call's arguments always fit the schema")


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = Field(description="only functions")
    function: FunctionDefinition


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolsError(ValueError):
    """A request's tools cannot be served as asked: (param, message)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class ToolCallOut:
    """A call of the answer: its id, the function's name, its arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools make of its answer (see the module's text)."""

    mode: Literal["none", "auto", "required", "named"]
    tools: tuple[dict, ...] = ()  # as the chat template reads them (OpenAI's tool objects)
    name: str | None = None  # the named function
    parallel: bool = True  # more than one call per answer (parallel_tool_calls)

    @property
    def active(self) -> bool:
        """The answer may be calls (the text is held until the end: it is parsed)."""
        return self.mode != "none"

    def grammar(self) -> GrammarSpec | None:
        """The grammar a forced call is drawn under; None: free text."""
        if self.mode == "named":
            return GrammarSpec("json_schema", json.dumps(_parameters(self._function(self.name))))
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                       "parameters": _parameters(t["function"])},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
            array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            return GrammarSpec("json_schema", json.dumps(array if self.parallel else {**array, "maxItems": 1}))
        return None

    def _function(self, name: str) -> dict:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)

    def parse(self, text: str, finish_reason: str) -> tuple[str | None, list[ToolCallOut], str]:
        """(content, calls, finish_reason) of an answer's text."""
        if self.mode == "none" or finish_reason == "length":
            return text, [], finish_reason
        if self.mode == "named":
            return None, [_call(self.name, text)], finish_reason
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:  # cannot happen under the grammar, but said rather than raised
                return text, [], finish_reason
            return None, [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in items], "tool_calls"
        calls = []
        for body in _HERMES.findall(text):
            try:
                c = json.loads(body)
            except ValueError:
                continue
            if not isinstance(c, dict) or c.get("name") not in {t["function"]["name"] for t in self.tools}:
                continue
            args = c.get("arguments", c.get("parameters", {}))
            calls.append(_call(c["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
        if not calls:
            return text, [], finish_reason
        calls = calls if self.parallel else calls[:1]
        content = text[: text.find("<tool_call>")].strip()
        return content or None, calls, "tool_calls"


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


def _call(name: str, arguments: str) -> ToolCallOut:
    return ToolCallOut(f"call_{uuid.uuid4().hex[:24]}", name, arguments)


def plan(tools: list[Tool] | None, choice: ToolChoice | None, template_shows_tools: bool,
         parallel: bool = True) -> ToolPlan:
    """The plan for a request's `tools` and `tool_choice`; ToolsError says what is wrong."""
    given = tuple(t.model_dump(exclude_none=True) for t in tools or ())
    if len(given) > MAX_TOOLS:
        raise ToolsError("tools", f"at most {MAX_TOOLS} tools, got {len(given)}")
    names = [t["function"]["name"] for t in given]
    if len(set(names)) != len(names):
        raise ToolsError("tools", f"tool names must be unique, got {names}")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ToolsError("tool_choice", f"tool_choice names function {choice.function.name!r}, which is not "
                                            f"among the tools {names}")
        return ToolPlan("named", given, choice.function.name, parallel)
    mode = choice or ("auto" if given else "none")
    if not given:
        if mode == "required":
            raise ToolsError("tool_choice", "tool_choice 'required' needs tools")
        return ToolPlan("none")
    if mode == "auto" and not template_shows_tools:
        raise ToolsError("tool_choice", "this checkpoint's chat template does not show tools to the model, so it "
                                        "cannot choose to call one (tool_choice 'auto'); force a call with "
                                        "tool_choice 'required' or {'type': 'function', 'function': {'name': ...}}, "
                                        "or give tool_choice 'none'")
    return ToolPlan(mode, given, parallel=parallel)
