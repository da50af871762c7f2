"""A checkpoint's own chat template, rendered as Hugging Face transformers renders it.

The template comes from the checkpoint (`chat_template.jinja`, `chat_template.json`, or
`chat_template` in `tokenizer_config.json`, a string or a list of named templates) and runs
in Jinja's immutable sandbox with transformers' helpers: `raise_exception`, `strftime_now`,
a `tojson` that does not escape HTML, `trim_blocks`/`lstrip_blocks`, loop controls, and the
tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables. A chat template is
code from whoever published the checkpoint: the sandbox refuses attribute access to Python's
internals, and a template's own `raise_exception` becomes `ChatTemplateError` with its message.

The rendered text is tokenized without the tokenizer's special tokens (the template writes
them), as `apply_chat_template(tokenize=True)` does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

CONFIG_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its own `raise_exception`, or a render error)."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class ChatTemplate:
    """One checkpoint's chat template(s) and special tokens, compiled once."""

    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str], source: str) -> None:
        if "default" not in templates:
            raise ValueError(f"{source}: no default chat template among {sorted(templates)}")
        self.templates, self.special_tokens, self.source = templates, special_tokens, source
        self._compiled: dict[str, Any] = {}
        self._shows_tools: bool | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "ChatTemplate | None":
        """The checkpoint's chat template; None when it has none."""
        d = Path(checkpoint_dir)
        config: dict[str, Any] = {}
        if (d / "tokenizer_config.json").is_file():
            config = json.loads((d / "tokenizer_config.json").read_text())
        special = {k: t for k in SPECIAL if (t := _token_text(config.get(k))) is not None}
        if (d / "special_tokens_map.json").is_file():  # older checkpoints keep them here
            mapped = json.loads((d / "special_tokens_map.json").read_text())
            special = {**{k: t for k in SPECIAL if (t := _token_text(mapped.get(k))) is not None}, **special}
        templates: dict[str, str] = {}
        raw = config.get("chat_template")
        source = d / "tokenizer_config.json"
        if (d / "chat_template.jinja").is_file():
            raw, source = (d / "chat_template.jinja").read_text(), d / "chat_template.jinja"
        elif (d / "chat_template.json").is_file():
            raw, source = json.loads((d / "chat_template.json").read_text()).get("chat_template"), d / "chat_template.json"
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            templates = {t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t}
        if not templates:
            return None
        return cls(templates, special, str(source))

    def _template(self, name: str):
        if name not in self._compiled:
            self._compiled[name] = _environment().from_string(self.templates[name])
        return self._compiled[name]

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The conversation as the model reads it (apply_chat_template(tokenize=False))."""
        import jinja2

        name = "tool_use" if tools and "tool_use" in self.templates else "default"
        try:
            return self._template(name).render(messages=messages, tools=tools, documents=None,
                                               add_generation_prompt=add_generation_prompt,
                                               **self.special_tokens, **kwargs)
        except jinja2.exceptions.TemplateError as exc:  # raise_exception, a syntax error, the sandbox
            raise ChatTemplateError(f"the chat template ({self.source}) refused the conversation: {exc}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as exc:  # a template's own bug on this input
            raise ChatTemplateError(f"the chat template ({self.source}) failed on the conversation: "
                                    f"{type(exc).__name__}: {exc}") from None


    def shows_tools(self) -> bool:
        """Does the template put a request's tools in front of the model (renders them at all)?"""
        if self._shows_tools is None:
            probe = [{"role": "user", "content": "hi"}]
            tool = {"type": "function", "function": {"name": "probe_tool_name", "description": "d",
                                                     "parameters": {"type": "object", "properties": {}}}}
            try:
                self._shows_tools = "probe_tool_name" in self.render(probe, tools=[tool])
            except ChatTemplateError:
                self._shows_tools = False
        return self._shows_tools


def _environment():
    """Jinja's immutable sandbox, configured as transformers configures it."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
