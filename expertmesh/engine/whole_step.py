"""A step computed whole by the one actor that holds every shard and group of it.

In the default layout (a router and one colocated worker holding the only context shard and the
only expert group) a per-layer step crosses the router's socket twice a layer (attention, then
experts): 2 x layers round trips. Here the router sends the worker the step instead: every
sequence's own tokens and how far its KV is computed (`WholeRequest`); the worker runs the same
engine over its own shard and group in process (`StepHost`, one per router) and answers the
logits rows the router samples from plus what the router reports of each request (`WholeReply`):
one round trip a step. This module holds the messages and the router's side (`WholeSteps`, a part
of the engine); the worker's is step_host.py.

The worker keeps each sequence's own KV (a mirror, by request id) between steps. It needs no
promise that it still has it: a mirror shorter than the router's count (the worker restarted, or
the sequence ran per-layer steps since) is computed again from the sequence's tokens within the
step, and a longer one (a failed step) is truncated. The router drops mirrors of finished
sequences with its next request; a new router incarnation replaces all of its mirrors.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref

import numpy as np
import torch

from expertmesh.engine.sequence import Sequence

KINDS = ("generate", "logits", "segment")


@dataclasses.dataclass(frozen=True)
class WholeSeq:
    """One sequence of a whole step, as the router counts it."""

    key: str  # its mirror's name: unique among the router's sequences (WholeSteps._whole_key)
    kind: str  # KINDS
    token_ids: np.ndarray  # int64: all of its own tokens (prompt, then generated)
    start_pos: int  # position of its first own token
    num_computed: int  # own tokens whose KV the router counts as computed
    context_id: str | None
    segments: tuple[tuple[int, int, int], ...]  # (shard, start, end) of its context
    top_pages: int | None
    all_rows: bool  # the logits of every new row (logits requests, prompt log-probabilities); else the last
    segment_files: tuple[tuple[int, str, int, int], ...] = ()  # (shard, file, start, end): a registration piece's

    @property
    def logits_rows(self) -> int:
        if self.kind == "segment":
            return 0
        return len(self.token_ids) - self.num_computed if self.all_rows else 1


@dataclasses.dataclass(frozen=True)
class WholeRequest:
    incarnation: str  # the router's exchange: a new one replaces every mirror of the last
    drops: tuple[str, ...]  # sequences finished since: their mirrors go
    seqs: tuple[WholeSeq, ...]

    @property
    def rows(self) -> int:
        return sum(len(s.token_ids) - s.num_computed for s in self.seqs)


@dataclasses.dataclass
class SeqReport:
    """What the router adds to a request after the step."""

    visits: list[int]  # shards visited
    reads: dict[int, dict[str, int]]  # shard -> pages read (pages, memory, store)
    group_tokens: dict[int, int]  # expert group -> (token, expert) pairs sent
    layer_shards: list[tuple[int, ...] | None]  # its pathway's shards per layer
    recomputed: bool  # its KV was not here (or not all of it): computed again from its tokens


@dataclasses.dataclass
class WholeReply:
    logits: torch.Tensor  # fp32 [sum of logits_rows, V], in the request's order
    seqs: list[SeqReport]
    expert_load: dict[int, list[int]]  # layer -> tokens routed to each expert this step
    group_rows: dict[int, list[int]]  # layer -> rows each group computed this step
    waits: dict[str, float]  # seconds waiting for the shard / the experts


class WholeSteps:
    """The router's side: Engine methods (set up in Engine.__init__: `whole_steps`, `_remote`)."""

    def _whole_ok(self, batch: list[Sequence]) -> bool:
        """Can this step go whole: one colocated worker holds every shard and group, nothing is
        lost, taken over, placed elsewhere or chosen by page summaries, no ping-pong, no
        registration piece (its KV comes back to the router, which writes it to the segments)."""
        return (self.whole_steps and self.micro_batches == 1 and len(self.partition) == 1 and not self.removed
                and self.placement is None and not self.serving and not self.group_serving
                and self.model.embed.weight.device.type == "cpu"
                and all(seq.top_shards is None and seq.kind != "segment" for seq in batch)
                and not self.contexts.foreign_shards()
                and self.exchange.whole_target())

    def _localize(self, batch: list[Sequence]) -> None:
        """Sequences whose own KV is at the worker, in a step run per layer: computed again here
        from their first token (their mirrors there go with the next whole step)."""
        for seq in batch:
            if seq.kv_remote:
                seq.kv, seq.num_computed, seq.kv_remote = self.kv_pool.handle(), 0, False

    @staticmethod
    def _whole_key(seq: Sequence) -> str:
        """Its mirror's name at the worker: unique among this router's sequences (request ids
        are the callers' and may repeat)."""
        return f"{seq.uid}:{seq.request_id[:200]}"

    def _run_whole(self, batch: list[Sequence]) -> list[torch.Tensor | None]:
        keys = {self._whole_key(seq) for seq in batch}
        drops = [k for k, ref in self._remote.items()
                 if k not in keys and ((s := ref()) is None or s.finished or not s.kv_remote)]
        req = WholeRequest("", tuple(drops), tuple(
            WholeSeq(self._whole_key(seq), seq.kind, np.asarray(seq.token_ids, dtype=np.int64), seq.start_pos,
                     seq.num_computed, seq.context_id, tuple((g.shard, g.start, g.end) for g in seq.segments),
                     seq.top_pages, seq.kind == "logits" or seq.wants_prompt_rows,
                     tuple((s, *f) for s, f in seq.segment_files.items()) if seq.kind == "segment" else ())
            for seq in batch))
        with self._placing:  # (a placement set meanwhile waits for this step, as for any)
            self._in_flight[0] += 1
        try:
            reply = self.exchange.whole(req, self.cfg.vocab_size, self.expert_load.shape[1], self.group_rows.shape[1])
        finally:
            with self._placing:
                self._in_flight[0] -= 1
                self._placing.notify_all()
        for k in drops:
            self._remote.pop(k, None)
        out, at = [], 0
        for seq, ws, rep in zip(batch, req.seqs, reply.seqs):
            n = ws.logits_rows
            out.append(None if not n else reply.logits[at] if not ws.all_rows else reply.logits[at:at + n])
            at += n
            seq.num_computed = len(seq.token_ids)
            if seq.kind != "segment":
                if not seq.kv_remote:  # its KV here (if any) is of no use now
                    seq.kv, seq.kv_remote = self.kv_pool.handle(), True
                self._remote[ws.key] = weakref.ref(seq)
            seq.pathway_visits.update(rep.visits)
            for shard, reads in rep.reads.items():
                seq.page_reads.setdefault(shard, collections.Counter()).update(reads)
            seq.group_tokens.update(rep.group_tokens)
            seq.layer_shards = list(rep.layer_shards)
        for layer, counts in reply.expert_load.items():
            self.expert_load[layer] += torch.tensor(counts)
        for layer, counts in reply.group_rows.items():
            self.group_rows[layer, :len(counts)] += torch.tensor(counts)
        self.waits.update(reply.waits)
        self.whole_steps_run += 1
        return out
