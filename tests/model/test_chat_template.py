"""A checkpoint's chat template renders as transformers' apply_chat_template renders it, from
either file transformers writes it to; a template's own refusal and the sandbox become
ChatTemplateError; the built-in model ships its template."""

import json

import pytest

from expertmesh.model.chat_template import ChatTemplate, ChatTemplateError
from expertmesh.model.default import SHIPPED

CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}"
    "{{- messages[0].content + '\\n\\n' }}{%- endif %}{{- '# Tools\\n<tools>' }}{%- for tool in tools %}"
    "{{- '\\n' }}{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- else %}"
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "Zürich or Paris"}},
                                               "required": ["city"]}}}]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " Hi <b>there</b> "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again, in Zürich?"}],
]


def hf_tokenizer_dir(tmp_path, template: str):
    """A real fast tokenizer saved by transformers with `template` as its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = template
    fast.save_pretrained(str(tmp_path))
    return tmp_path, fast


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_renders_as_transformers(tmp_path, template, chat, generation_prompt):
    path, hf = hf_tokenizer_dir(tmp_path, template)
    ours = ChatTemplate.from_checkpoint(path)
    messages = CHATS[chat]
    if template is LLAMA3 and messages[0]["role"] == "system":
        with pytest.raises(ChatTemplateError, match="roles must alternate"):
            ours.render(messages, add_generation_prompt=generation_prompt)
        return
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.render(messages, add_generation_prompt=generation_prompt) == want


def test_tools_render_as_transformers(tmp_path):
    path, hf = hf_tokenizer_dir(tmp_path, CHATML)
    want = hf.apply_chat_template(CHATS[1], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    got = ChatTemplate.from_checkpoint(path).render(CHATS[1], tools=TOOLS)
    assert got == want and "Zürich or Paris" in got  # tojson keeps non-ASCII, as transformers'
    assert ChatTemplate.from_checkpoint(path).shows_tools()  # the model reads them: tool_choice auto is served
    assert not ChatTemplate.from_checkpoint(SHIPPED).shows_tools()  # the built-in template has no place for them


def test_tokenizer_config_json_and_named_templates(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
        "chat_template": [{"name": "default", "template": LLAMA3}, {"name": "tool_use", "template": CHATML}]}))
    t = ChatTemplate.from_checkpoint(tmp_path)
    assert t.render(CHATS[0]).startswith("<s><|start_header_id|>user")  # bos from an AddedToken dict
    assert "# Tools" in t.render(CHATS[0], tools=TOOLS)  # the tool_use template when tools are given


def test_no_template_is_none_and_the_sandbox_holds(tmp_path):
    assert ChatTemplate.from_checkpoint(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        ChatTemplate.from_checkpoint(tmp_path).render(CHATS[0])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content.upper() }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="failed|refused"):  # a template's bug on this input: a 400, not a 500
        ChatTemplate.from_checkpoint(tmp_path).render([{"role": "user", "content": 5}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError):  # the immutable sandbox: no mutation of what it is given
        ChatTemplate.from_checkpoint(tmp_path).render(CHATS[0])


def test_the_built_in_model_ships_its_template():
    t = ChatTemplate.from_checkpoint(SHIPPED)
    assert t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]) == \
        "<|system|>\nS\n<|user|>\nQ\n<|assistant|>\n"
