"""The typed request, its sampling options and its result: checked where they are built, with
the numbers in the message; plain values that pickle whole (no Ray needed)."""

import dataclasses
import math
import pickle
import time

import numpy as np
import pytest

from expertmesh.engine.pathway import Pathway
from expertmesh.engine.request import Chunk, Request, Result
from expertmesh.engine.scheduler import Scheduler
from expertmesh.engine.sequence import Sequence
from expertmesh.model.sampling import SamplingParams


@pytest.mark.parametrize("fields, message", [
    ({"max_new_tokens": -1}, r"max_new_tokens must be an integer >= 0, got -1"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be an integer >= 0, got 2\.5"),
    ({"max_new_tokens": True}, r"max_new_tokens must be an integer >= 0, got True"),
    ({"temperature": -0.5}, r"temperature must be >= 0 and finite \(0: greedy\), got -0\.5"),
    ({"temperature": math.nan}, r"temperature must be >= 0 .*got nan"),
    ({"temperature": math.inf}, r"temperature must be >= 0 .*got inf"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0\.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1\.5"),
    ({"seed": 1.0}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\) or None, got 1\.0"),
    ({"seed": 1 << 64}, r"seed must be an integer .*got 18446744073709551616"),
    ({"stop_token_ids": (2, -3)}, r"stop_token_ids must be integers >= 0, got -3 in \[2, -3\]"),
    ({"stop_token_ids": "2"}, r"stop_token_ids must be a sequence of token ids, got '2'"),
    ({"stop": "END"}, r"stop must be a sequence of strings, got 'END'"),
    ({"stop": ("END", "")}, r"stop strings must be non-empty strings, got \['END', ''\]"),
    ({"ignore_eos": "yes"}, r"ignore_eos must be true or false, got 'yes'"),
])
def test_sampling_params_refuse_what_the_sampler_cannot_take(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_sampling_params_hold_plain_values():
    p = SamplingParams(np.int64(8), np.float32(0.5), 1, np.int64(3), [2, np.int64(7)], ["\n\n"])
    assert p == SamplingParams(8, 0.5, 1.0, 3, (2, 7), ("\n\n",))
    assert [type(v) for v in (p.max_new_tokens, p.temperature, p.top_p, p.seed)] == [int, float, float, int]
    assert type(p.stop_token_ids[1]) is int and isinstance(p.stop, tuple)
    assert hash(p) == hash(SamplingParams(8, 0.5, 1.0, 3, (2, 7), ("\n\n",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0
    assert SamplingParams(max_new_tokens=0).max_new_tokens == 0  # the prompt's step only


@pytest.mark.parametrize("fields, message", [
    ({"prompt_ids": []}, r"the prompt is empty; at least 1 token is needed"),
    ({"prompt_ids": [1, -4, 2]}, r"prompt token id -4 at index 1 is negative"),
    ({"prompt_ids": [1.0, 2.0]}, r"prompt token ids must be integers, got dtype float64"),
    ({"prompt_ids": [True, False]}, r"prompt token ids must be integers, got dtype bool"),
    ({"prompt_ids": "hello"}, r"prompt token ids must be integers, got a str"),
    ({"prompt_ids": [[1, 2], [3, 4]]}, r"prompt token ids must be a flat sequence, got shape \(2, 2\)"),
    ({"context_id": ""}, r"context_id must be a non-empty string or None, got ''"),
    ({"params": {"temperature": 0.5}}, r"params must be a SamplingParams, got dict"),
    ({"tenant": ""}, r"tenant must be a non-empty string, got ''"),
    ({"request_id": 7}, r"request_id must be a non-empty string or None, got 7"),
    ({"top_shards": 0}, r"top_shards must be >= 1 or None \(all shards\), got 0"),
    ({"top_pages": 0}, r"top_pages must be an integer >= 1 or None \(every page\), got 0"),
    ({"top_pages": True}, r"top_pages must be an integer >= 1 .*got True"),
    ({"deadline": math.inf}, r"deadline must be a time\.time\(\) in seconds \(> 0, finite\) or None, got inf"),
    ({"deadline": "soon"}, r"deadline must be .*got 'soon'"),
])
def test_request_refuses_what_no_router_can_run(fields, message):
    with pytest.raises(ValueError, match=message):
        Request(**({"prompt_ids": [1, 2, 3]} | fields))


def test_request_is_one_plain_value_that_crosses_whole():
    deadline = time.time() + 30
    r = Request(np.array([5, 6, 7]), "ctx-1", SamplingParams(4, seed=1), "acme", "cmpl-1", np.int64(2), 3, deadline)
    assert r.prompt_ids == (5, 6, 7) and all(type(t) is int for t in r.prompt_ids)
    assert type(r.top_shards) is int and r.top_pages == 3
    assert pickle.loads(pickle.dumps(r)) == r  # Ray's control plane pickles it
    assert 29 < r.seconds_left() <= 30 and Request([1]).seconds_left() is None
    assert dataclasses.replace(r, request_id="cmpl-1-1").params is r.params
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.tenant = "other"
    assert Request([1]) == Request((1,), None, SamplingParams(), "default")  # the defaults


def _sequence(**fields) -> Sequence:
    return Sequence("req-1", "generate", [1, 2, 3], 100, [], "ctx-1", SamplingParams(4), 2, **fields)


def test_result_is_built_from_the_sequence_once_and_stays_as_built():
    seq = _sequence()
    first = seq.result()  # before any step
    assert first == Result("req-1", (), None, 3, 0, 100, {}, None, first.total_s) and first.total_s >= 0
    seq.layer_shards = [(0, 1), (1,)]
    seq.freeze_pathway()
    seq.output += [9, 8]
    seq.group_tokens.update({1: 4, 0: 2})
    seq.pathway_visits |= {1, 0}
    seq.page_reads[1] = {"memory": 3}
    seq.t_first, seq.finish_reason = seq.t_submit + 0.25, "length"
    res = seq.result()
    assert (res.token_ids, res.finish_reason, res.prompt_tokens, res.completion_tokens, res.context_tokens) == (
        (9, 8), "length", 3, 2, 100)
    assert res.ttft_s == pytest.approx(0.25) and res.total_s >= 0
    assert res.pathway == {"context_id": "ctx-1", "shards": [0, 1], "shards_per_layer": [[0, 1], [1]],
                           "expert_group_tokens": {0: 2, 1: 4}, "pages": {1: {"memory": 3}}}
    seq.output.append(7)  # the sequence goes on; the answer already given does not change
    assert res.token_ids == (9, 8) and res.completion_tokens == 2
    assert pickle.loads(pickle.dumps(res)) == res
    no_context = Sequence("req-2", "generate", [1], 0, [], None, SamplingParams(), 2)
    assert no_context.result().context_tokens == 0
    assert isinstance(seq.pathway, Pathway)


def test_a_chunk_is_the_tokens_since_the_last():
    assert Chunk((4, 5)).token_ids == (4, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Chunk((4,)).token_ids = ()


def test_scheduler_discards_a_waiting_or_ready_sequence_but_not_one_in_a_step():
    sched = Scheduler(max_running=1)
    a, b, c = (_sequence(tenant=t) for t in "abc")
    for s in (a, b, c):
        sched.add(s)
    (running,) = sched.schedule()
    assert running is a and not sched.discard(a)  # inside the step: it leaves after it
    assert sched.discard(c) and not sched.discard(c)
    sched.step_done([a])
    sched.keep_running(a)
    assert sched.discard(a) and list(sched.waiting) == [b] and not sched.ready and len(sched) == 1
