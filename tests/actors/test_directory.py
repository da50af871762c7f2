"""The router's contexts and how routers follow each other's, without Ray: snapshots with ids
(long_poll.py), the one owner of the contexts and its one drop (contexts.py), and a router
applying what another published (directory.py)."""

import asyncio

import pytest
import torch

from expertmesh.actors.router.contexts import Contexts, Entry
from expertmesh.actors.router.directory import Directory
from expertmesh.actors.router.long_poll import NOTHING, Snapshots
from expertmesh.actors.router.shards import Shards
from expertmesh.engine.config import EngineConfig
from expertmesh.store.registry import ContextInfo, ContextRecord, Segment


def run(coro):
    return asyncio.run(coro)


def test_a_listener_is_answered_at_once_when_behind_else_at_the_next_change():
    async def main():
        host = Snapshots()
        host.publish("a", 1)
        first = await host.listen("r1", NOTHING, timeout_s=5)  # holds nothing: everything, at once
        assert first.full and first.values == (1,) and first.held == (host.epoch, 1)
        waiting = asyncio.ensure_future(host.listen("r1", first.held, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # up to date: no answer until something changes
        host.publish("b", 2)
        host.publish("a", 3)  # a key changed twice is sent once, with its latest value
        got = await asyncio.wait_for(waiting, 1)
        assert not got.full and got.values == (2, 3) and got.held == (host.epoch, 3)  # in id order
        quiet = await host.listen("r1", got.held, timeout_s=0.05)  # nothing new: empty, ask again
        assert quiet.values == () and quiet.held == got.held
    run(main())


def test_a_restarted_host_answers_its_old_listeners_in_full_and_settles_on_their_next_ask():
    async def main():
        old = Snapshots()
        old.publish("a", 1)
        held = (await old.listen("r1", NOTHING, timeout_s=1)).held
        new = Snapshots()  # the host restarted: another epoch
        new.publish("b", 2)
        again = await new.listen("r1", held, timeout_s=1)
        assert again.full and again.values == (2,)
        assert await new.settled(["r1"], timeout_s=0.05) == ["r1"]  # it has not applied id 1 yet
        listening = asyncio.ensure_future(new.listen("r1", again.held, timeout_s=5))
        assert await new.settled(["r1"], timeout_s=1) == []  # its next ask says it holds the latest
        new.publish("c", 3)
        settling = asyncio.ensure_future(new.settled(["r1", "r2"], timeout_s=0.3))
        answer = await listening
        asyncio.ensure_future(new.listen("r1", answer.held, timeout_s=5))
        assert await settling == ["r2"]  # r1 took id 3 up; r2 never asked
    run(main())


def _record(cid, shards=(0, 1), created=1.0):
    segs = [Segment(s, 64 * i, 64 * (i + 1)) for i, s in enumerate(shards)]
    info = ContextInfo(cid, 64 * len(shards), tuple(shards), created=created, stored=True)
    return ContextRecord(info, segs, files=[f"{cid}.{i}.kv" for i in range(len(shards))])


class _Retiring:
    def __init__(self):
        self.drops, self.moves = [], []

    def dropped_later(self, record):
        self.drops.append(record.info.id)

    def moved(self, record, shard):
        self.moves.append((record.info.id, shard))


def test_one_drop_forgets_summaries_refuses_with_why_and_publishes_once():
    contexts = Contexts(Shards([object(), object()]))
    record = _record("c")
    contexts.serve(record)
    pair = (torch.zeros(2, 1, 4).numpy(), torch.ones(2, 1, 4).numpy())
    contexts.keep_summaries(record, [0, 1], [[pair], [pair]])
    assert set(contexts.summaries["c"]) == {0, 1} and contexts.shard_tokens() == [64, 64]
    with pytest.raises(TypeError):
        contexts.summaries["x"] = {}  # the engine's view is read-only
    dropped = contexts.drop("c", "context 'c' was dropped", told="dropped (through another router)")
    assert dropped is record and record.dropped and "c" not in contexts.summaries and "c" not in contexts
    assert contexts.why_lost("c") == "context 'c' was dropped" and contexts.known("c")
    last = contexts.published.id
    assert contexts.drop("c", "again") is None and contexts.published.id == last  # refused already: no change
    tomb = contexts.published.since(NOTHING).values[-1]
    assert tomb.dropped == "dropped (through another router)" and tomb.info == record.info


def test_a_router_follows_what_another_registered_moved_and_dropped():
    """Router B applies router A's snapshots: A's context is served, its move followed (the old
    shard retired), its drop refused with A's words; an echo of B's own view changes nothing."""
    async def main():
        a, b = Contexts(Shards([0, 1, 2])), Contexts(Shards([0, 1, 2]))
        retiring = _Retiring()
        directory = Directory(b, Shards([0, 1, 2]), None, retiring, None, 1)
        a.serve(_record("x"))
        snap = await a.published.listen("b", NOTHING, timeout_s=1)
        directory.apply(snap.values)
        assert b.get("x").ready and b.get("x").info.shards == (0, 1)
        b_id = b.published.id
        directory.apply((await b.published.listen("a", NOTHING, timeout_s=1)).values)  # an echo of its own
        assert b.published.id == b_id
        a.move(a.get("x"), {1: 2})
        snap = await a.published.listen("b", snap.held, timeout_s=1)
        directory.apply(snap.values)
        assert b.get("x").info.shards == (0, 2) and retiring.moves == [("x", 1)]
        a.drop("x", "context 'x' was dropped", told="context 'x' was dropped (through another router)")
        directory.apply((await a.published.listen("b", snap.held, timeout_s=1)).values)
        assert "x" not in b and b.why_lost("x").endswith("(through another router)") and retiring.drops == ["x"]
        directory.apply(snap.values)  # a late copy of the registration: the drop stands
        assert "x" not in b
    run(main())


def test_the_engine_config_is_checked_at_construction():
    assert EngineConfig(durable=True, micro_batches=2).micro_batches == 2
    with pytest.raises(ValueError, match="micro_batches must be 1 or 2, got 3"):
        EngineConfig(micro_batches=3)
