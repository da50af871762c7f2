"""The OpenAI request bodies at the edge take what lm-eval's API clients send, as vLLM takes it."""

import pytest
from pydantic import ValidationError

from expertmesh.pipelines.openai_schema import MAX_STOP, ChatCompletionRequest, CompletionRequest


def test_stop_takes_lm_eval_s_stop_lists():
    """lm-eval's local-completions sends a task's `until` strings plus the tokenizer's eos text as
    `stop` (humaneval: 5 + 1; OpenAI's limit of 4 refused them with a 422); vLLM sets no limit."""
    until = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "</s>"]
    body = CompletionRequest(model="expertmesh", prompt=[[5, 6, 7]], max_tokens=16, temperature=0, stop=until,
                             seed=1234)
    assert body.unserved() == [] and body.sampling_params().stop == tuple(until)
    assert MAX_STOP == 16
    CompletionRequest(model="expertmesh", prompt="a", stop=[str(i) for i in range(MAX_STOP)])
    with pytest.raises(ValidationError, match=f"at most {MAX_STOP}"):
        CompletionRequest(model="expertmesh", prompt="a", stop=[str(i) for i in range(MAX_STOP + 1)])
    with pytest.raises(ValidationError):
        CompletionRequest(model="expertmesh", prompt="a", stop=["\n", ""])  # an empty stop string: refused


def test_chat_messages_take_lm_eval_s_type_text():
    """lm-eval 0.4.9-0.4.11's local-chat-completions send `"type": "text"` on every message (a 422
    before); it changes nothing and the template does not see it. Any other value is still refused."""
    body = ChatCompletionRequest(model="expertmesh", messages=[
        {"role": "system", "content": "Be brief.", "type": "text"}, {"role": "user", "content": "Hi", "type": "text"}])
    assert [m.for_template() for m in body.messages] == [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hi"}]
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="expertmesh", messages=[{"role": "user", "content": "Hi", "type": "image_url"}])
    with pytest.raises(ValidationError):  # other unknown fields of a message stay refused
        ChatCompletionRequest(model="expertmesh", messages=[{"role": "user", "content": "Hi", "audio": {}}])
