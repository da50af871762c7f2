"""The sampler's logit processing equals Hugging Face's processors where they exist
(repetition penalty, min new tokens, top-k, min-p, top-p), OpenAI's definitions where they do
not (presence and frequency penalties, logit bias); log-probabilities are log_softmax of the
raw logits; bad options are refused with what is allowed."""

import pytest
import torch
from transformers.generation import logits_process as lp

from expertmesh.model.sampling import SamplingParams, logprobs_of, process, sample

V = 50


def logits(seed=0):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_and_min_tokens_equal_hf():
    x, prompt, out = logits(1), [3, 7, 7, 11], [20, 3]
    params = SamplingParams(repetition_penalty=1.3)
    want = lp.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + out]), x.clone().view(1, -1))[0]
    assert torch.allclose(process(x, params, prompt, out, ()), want)
    params = SamplingParams(min_tokens=3)
    want = lp.MinNewTokensLengthLogitsProcessor(len(prompt), 3, [2, 9])(torch.tensor([prompt + out]),
                                                                         x.clone().view(1, -1))[0]
    assert torch.equal(process(x, params, prompt, out, (2, 9)), want)
    assert torch.equal(process(x, params, prompt, out + [1], (2, 9)), x)  # 3 tokens out: eos allowed again


def test_presence_frequency_and_bias_as_openai_defines_them():
    x, out = logits(2), [5, 5, 5, 8]
    got = process(x, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={8: -3.0, 9: 100}),
                  [1], out, ())
    want = x.clone()
    want[5] -= 3 * 0.25 + 0.5
    want[8] -= 1 * 0.25 + 0.5 + 3.0
    want[9] += 100
    assert torch.allclose(got, want)
    assert sample(x, SamplingParams(temperature=0, logit_bias={9: 100}), None) == 9


@pytest.mark.parametrize("name,params,warper", [
    ("top_k", SamplingParams(temperature=1.0, top_k=5), lp.TopKLogitsWarper(5)),
    ("min_p", SamplingParams(temperature=1.0, min_p=0.05), lp.MinPLogitsWarper(0.05)),
    ("top_p", SamplingParams(temperature=1.0, top_p=0.8), lp.TopPLogitsWarper(0.8)),
])
def test_truncation_keeps_the_tokens_hf_keeps(name, params, warper):
    x = logits(3)
    keep = torch.isfinite(warper(None, x.clone().view(1, -1))[0])
    drawn = {sample(x, params, torch.Generator().manual_seed(s)) for s in range(400)}
    assert drawn <= set(torch.nonzero(keep).view(-1).tolist()), name
    assert len(drawn) > 1


def test_logprobs_are_log_softmax_of_the_raw_logits():
    x = torch.stack([logits(4), logits(5)])
    got = logprobs_of(x, [3, 4], 3)
    ref = torch.log_softmax(x, dim=-1)
    assert [g.logprob for g in got] == pytest.approx([ref[0, 3].item(), ref[1, 4].item()], abs=1e-6)
    assert [t for t, _ in got[0].top] == torch.topk(ref[0], 3).indices.tolist()
    assert logprobs_of(x, [3, 4], 0)[0].top == ()


@pytest.mark.parametrize("kw,match", [
    ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 3}, r"\[-2, 2\]"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {1: 200}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"), ({"min_tokens": -1}, "min_tokens"), ({"logprobs": 21}, "logprobs"),
])
def test_bad_options_say_what_is_allowed(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
