"""Whole steps (engine/whole_step.py) against per-layer steps, in one process: the real router,
engine, worker and wire encodings; only the socket between router and worker is left out (the
request and the answer go through their encoders and decoders). Steps alternate between the two
ways, so a sequence's own KV moves to the worker and back mid-generation."""

import asyncio
import dataclasses
import pathlib

import numpy as np
import pytest
import torch

from expertmesh.actors.router.router import Router
from expertmesh.actors.worker import colocated_worker
from expertmesh.dataplane.local import LocalExchange
from expertmesh.dataplane.task import TaskExchange
from expertmesh.dataplane.wire import WireError, WireLimits
from expertmesh.dataplane.wire_whole import (
    decode_meta,
    decode_request,
    encode_meta,
    encode_request,
)
from expertmesh.engine.request import Request
from expertmesh.engine.step_host import StepHost
from expertmesh.engine.whole_step import WholeRequest, WholeSeq
from expertmesh.mesh_spec import MeshSpec
from expertmesh.model.config import ModelConfig
from expertmesh.model.sampling import SamplingParams
from tests.conftest import VOCAB

GENERATION = 7
# (the in-process router asks Ray for its actor name: the session's cluster, not one of its own)


class Toggling(TaskExchange):
    """The in-process exchange, sending whole the steps `pattern` marks (1) through the wire
    encodings to a StepHost over the same worker."""

    def __init__(self, worker, pattern: list[int], limits: WireLimits) -> None:
        super().__init__([worker], [worker])
        self.pattern, self.limits, self.calls = pattern, limits, 0
        self.host = StepHost(worker._model(), LocalExchange(worker, worker.group), [worker.group.experts], "t")

    def whole_target(self) -> bool:
        self.calls += 1
        return bool(self.pattern[(self.calls - 1) % len(self.pattern)])

    def whole(self, request, vocab, experts, groups):
        req = decode_request(encode_request(dataclasses.replace(request, incarnation="t"), GENERATION),
                             self.limits, GENERATION)
        reply = self.host.run(req)
        return decode_meta(encode_meta(reply), reply.logits, self.limits, len(req.seqs), experts, groups)


def make_router(path: str, pattern: list[int] | None):
    cfg = ModelConfig.from_file(pathlib.Path(path) / "config.json")
    specs = [cfg.attention_spec(i) for i in range(cfg.num_layers)]
    worker = colocated_worker()((0, specs, 1 << 16, 16), (path, 0, range(cfg.num_experts)))
    router = Router(MeshSpec(checkpoint=path, lanes=1, device="cpu", page_size=16), [worker], [worker])
    limits = WireLimits(cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.num_layers, 1)
    if pattern is not None:
        router.engine.exchange = Toggling(worker, pattern, limits)
        router.engine.whole_steps = True
    return router, limits


def run(router, context, prompts, new=20):
    async def go():
        ctx = await router.register_context(context, "exact")
        params = SamplingParams(max_new_tokens=new, logprobs=2)
        return await asyncio.gather(*(router.generate(Request(p, ctx.id, params)) for p in prompts))
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(go())
    finally:
        for t in asyncio.all_tasks(loop):
            t.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


@pytest.mark.ray
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_steps_moving_between_whole_and_per_layer_give_the_same_tokens(ray_cluster, tiny_checkpoint, arch):
    rng = np.random.default_rng(3)
    context = rng.integers(0, VOCAB, 90).tolist()
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 9, 3)]
    base, _ = make_router(tiny_checkpoint(arch), None)
    want = run(base, context, prompts)
    for pattern in ([1], [1, 1, 0, 1, 0, 0]):
        router, _ = make_router(tiny_checkpoint(arch), pattern)
        got = run(router, context, prompts)
        for w, g in zip(want, got):
            assert g.token_ids == w.token_ids
            same = ("shards", "shards_per_layer", "pages") + (("expert_group_tokens",) if pattern == [1] else ())
            assert {k: g.pathway[k] for k in same} == {k: w.pathway[k] for k in same}  # (recomputed rows count)
            for a, b in zip(w.logprobs, g.logprobs):
                assert abs(a.logprob - b.logprob) <= 1e-4
        host = router.engine.exchange.host
        assert router.engine.whole_steps_run > 0
        if pattern == [1]:
            assert host.recomputed == 0  # every step whole: the KV never moved
        else:  # a sequence back at the worker after per-layer steps: computed again there
            assert host.recomputed > 0
        host.run(WholeRequest("t", tuple(host.seqs), ()))  # the router's drops: nothing is left behind
        assert not host.seqs


@pytest.mark.ray
def test_a_mirror_longer_than_the_routers_count_is_truncated_and_a_missing_one_recomputed(ray_cluster, tiny_checkpoint):
    router, _ = make_router(tiny_checkpoint("mixtral"), [1])
    host = router.engine.exchange.host
    ids = np.arange(3, 15, dtype=np.int64)
    seq = lambda done, n: WholeSeq("r", "generate", ids[:n], 0, done, None, (), None, False)  # noqa: E731
    one = host.run(WholeRequest("t", (), (seq(0, 10),))).logits
    host.run(WholeRequest("t", (), (seq(10, 12),)))  # 12 computed there
    again = host.run(WholeRequest("t", (), (seq(10, 12),))).logits  # a failed step's retry: truncated to 10
    assert host.recomputed == 0
    host.seqs.clear()  # a restarted worker
    rep = host.run(WholeRequest("t", (), (seq(10, 12),)))
    assert rep.seqs[0].recomputed and host.recomputed == 1
    assert torch.allclose(rep.logits, again, atol=1e-5)
    assert one.shape == (1, VOCAB)


def test_malformed_whole_steps_are_refused_before_anything_is_allocated():
    limits = WireLimits(4, 8, 32, 2, 1)
    good = WholeRequest("t", ("gone",), (WholeSeq("r", "generate", np.arange(5), 0, 2, "c", ((0, 0, 9),), None, False),))
    data = encode_request(good, 1)
    assert decode_request(data, limits, 1).seqs[0].num_computed == 2
    with pytest.raises(WireError, match="generation"):
        decode_request(data, limits, 2)
    bad = [dataclasses.replace(good.seqs[0], num_computed=5),  # no new token
           dataclasses.replace(good.seqs[0], kind="other"),
           dataclasses.replace(good.seqs[0], segments=((3, 0, 9),)),  # a shard the mesh lacks
           dataclasses.replace(good.seqs[0], token_ids=np.zeros(0, dtype=np.int64))]
    for s in bad:
        with pytest.raises(WireError):
            decode_request(encode_request(WholeRequest("t", (), (s,)), 1), limits, 1)
    with pytest.raises(WireError):
        decode_request(data[:-3], limits, 1)  # truncated



@pytest.mark.ray
def test_requests_of_one_name_keep_their_own_kv_at_the_worker(ray_cluster, tiny_checkpoint):
    """Callers name requests (request_id) and may repeat a name; the worker's mirrors must not mix them."""
    rng = np.random.default_rng(5)
    context = rng.integers(0, VOCAB, 40).tolist()
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (4, 7)]

    def named(router):
        async def go():
            ctx = await router.register_context(context, "exact")
            params = SamplingParams(max_new_tokens=12)
            return await asyncio.gather(*(router.generate(Request(p, ctx.id, params, request_id="same"))
                                          for p in prompts))
        loop = asyncio.new_event_loop()
        try:
            return [r.token_ids for r in loop.run_until_complete(go())]
        finally:
            for t in asyncio.all_tasks(loop):
                t.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
    want = named(make_router(tiny_checkpoint("mixtral"), None)[0])
    router, _ = make_router(tiny_checkpoint("mixtral"), [1])
    assert named(router) == want and want[0] != want[1]
    assert router.engine.exchange.host.recomputed == 0
