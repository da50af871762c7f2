"""A worker's side of whole steps (whole_step.py): one router's steps computed in process by the
same engine over the worker's own shard and group, with that router's sequences' own KV kept
between steps (a mirror per sequence, named by the router: WholeSteps._whole_key)."""

from __future__ import annotations

import collections
import time

import torch

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.engine import Engine
from expertmesh.engine.exchange import Exchange
from expertmesh.engine.sequence import Sequence
from expertmesh.engine.whole_step import SeqReport, WholeReply, WholeRequest, WholeSeq
from expertmesh.model.sampling import SamplingParams
from expertmesh.model.transformer import MoETransformer
from expertmesh.store.registry import Segment


class _NoContexts:
    """The context view of a whole step: no page summaries (the router sends no step that needs
    them), no lost or foreign shards (nor one that would)."""

    summaries: dict = {}

    @staticmethod
    def shard_tokens() -> list[int]:
        return []

    @staticmethod
    def foreign_shards() -> set[int]:
        return set()


class StepHost:
    """One router's whole steps in the worker: an engine over the worker's own shard and group
    (`exchange`, in process) and that router's sequences' own KV."""

    def __init__(self, dense: MoETransformer, exchange: Exchange, partition: list[range], incarnation: str) -> None:
        self.engine = Engine(dense, exchange, partition, _NoContexts(), EngineConfig())
        self.incarnation = incarnation
        self.seqs: dict[str, Sequence] = {}
        self.recomputed = 0  # sequences whose KV was computed again here
        self.steps, self.seconds = 0, 0.0  # whole steps run here, and their compute time

    def run(self, req: WholeRequest) -> WholeReply:
        for key in req.drops:
            self.seqs.pop(key, None)
        if not req.seqs:
            return WholeReply(torch.zeros(0, self.engine.cfg.vocab_size), [], {}, {}, {})
        batch = [self._mirror(ws) for ws in req.seqs]
        recomputed = [seq.num_computed < ws.num_computed for seq, ws in zip(batch, req.seqs)]
        self.recomputed += sum(recomputed)
        eng, t0 = self.engine, time.perf_counter()
        load, rows, waits = eng.expert_load.clone(), eng.group_rows.clone(), collections.Counter(eng.waits)
        outs = eng.forward(batch)
        self.steps, self.seconds = self.steps + 1, self.seconds + time.perf_counter() - t0
        pieces = []
        for ws, out in zip(req.seqs, outs):
            if ws.logits_rows:
                out = out[None] if out.dim() == 1 else out[-ws.logits_rows:]  # (a recomputed one: its new rows)
                pieces.append(out.float())
        vocab = eng.model.cfg.vocab_size
        logits = torch.cat(pieces) if pieces else torch.zeros(0, vocab)
        for seq, ws in zip(batch, req.seqs):
            if ws.kind == "segment":  # a registration piece runs once
                self.seqs.pop(ws.key, None)
        d_load, d_rows = eng.expert_load - load, eng.group_rows - rows
        return WholeReply(
            logits=logits,
            seqs=[SeqReport(sorted(seq.pathway_visits), {s: dict(c) for s, c in seq.page_reads.items()},
                            dict(seq.group_tokens), list(seq.layer_shards), again)
                  for seq, again in zip(batch, recomputed)],
            expert_load={i: d_load[i].tolist() for i in range(d_load.shape[0]) if d_load[i].any()},
            group_rows={i: d_rows[i].tolist() for i in range(d_rows.shape[0]) if d_rows[i].any()},
            waits={k: eng.waits[k] - waits[k] for k in eng.waits})

    def _mirror(self, ws: WholeSeq) -> Sequence:
        """The sequence as the engine steps it: its KV kept from the last steps where it is all
        there (truncated to the router's count), else computed again from its first token."""
        kind = "segment" if ws.kind == "segment" else "logits" if ws.all_rows else "generate"
        segments = [Segment(*s) for s in ws.segments]
        seq = self.seqs.get(ws.key)
        if seq is None or seq.start_pos != ws.start_pos or seq.context_id != ws.context_id \
                or min(seq.kv.lens) < ws.num_computed:
            seq = Sequence(ws.key, kind, [], ws.start_pos, segments, ws.context_id, SamplingParams(),
                           self.engine.cfg.num_layers, top_pages=ws.top_pages, pool=self.engine.kv_pool)
            self.seqs[ws.key] = seq
        else:
            seq.num_computed = ws.num_computed
            seq.kv.truncate(ws.num_computed)
            if seq.segments != segments:
                seq.layer_shards = [None] * len(seq.layer_shards)
        seq.kind, seq.segments, seq.top_pages = kind, segments, ws.top_pages
        seq.token_ids = ws.token_ids.tolist()
        seq.segment_files = {s: (f, a, b) for s, f, a, b in ws.segment_files}
        seq.group_tokens, seq.page_reads, seq.pathway_visits = collections.Counter(), {}, set()
        return seq
