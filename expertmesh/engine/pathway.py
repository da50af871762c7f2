"""Pathways: which context shards (and pages) a request attends over, layer by layer.

A `Pathway` is frozen once the request's prefill has chosen it and travels with the request.
Shard choice per layer:
- chunked-local layers: exactly the shards holding keys in the chunks of the request's
  tokens (exact, no scoring needed);
- global layers: every shard (`top_shards=None`, exact) or the `top_shards` whose page key
  summaries give the highest Quest upper bound on q.k for the request's last query.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from expertmesh.model.attention import AttentionSpec
from expertmesh.store.registry import Segment


@dataclasses.dataclass(frozen=True)
class Pathway:
    context_id: str | None
    shards: tuple[tuple[int, ...], ...]  # [layer] -> shard indices visited
    pages: tuple[tuple[int, ...] | None, ...] | None = None  # per shard visited: None = all pages

    @property
    def visited(self) -> tuple[int, ...]:
        return tuple(sorted({s for layer in self.shards for s in layer}))

    def summary(self, expert_group_tokens: dict[int, int] | None = None) -> dict:
        return {
            "context_id": self.context_id,
            "shards": list(self.visited),
            "shards_per_layer": [list(s) for s in self.shards],
            "expert_group_tokens": dict(sorted((expert_group_tokens or {}).items())),
        }


def segment_visible(seg: Segment, q_lo: int, q_hi: int, q_chunks: set[int] | None, spec: AttentionSpec) -> bool:
    """Can any query with positions in [q_lo, q_hi] (chunk ids q_chunks) see a key of seg?"""
    if seg.start > q_hi or seg.end <= seg.start:
        return False
    if spec.window and q_lo - (seg.end - 1) >= spec.window:
        return False
    if spec.chunk_size and q_chunks is not None:
        lo, hi = seg.start // spec.chunk_size, (seg.end - 1) // spec.chunk_size
        if not any(lo <= c <= hi for c in q_chunks):
            return False
    return True


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k per page: q [Hq, D], kmin/kmax [P, Hkv, D] -> [P] (max over heads)."""
    groups = q.shape[0] // kmin.shape[1]
    lo = kmin.repeat_interleave(groups, dim=1)  # [P, Hq, D]
    hi = kmax.repeat_interleave(groups, dim=1)
    bound = torch.maximum(q[None] * lo, q[None] * hi).sum(-1)  # [P, Hq]
    return bound.max(dim=-1).values


def quest_bound_rows(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k per page for any of several queries: q [T, Hq, D], kmin/kmax [P, Hkv, D]
    -> [P] (max over queries and heads). max(q*lo, q*hi) summed over D = q+ . hi + q- . lo."""
    groups = q.shape[1] // kmin.shape[1]
    lo = kmin.repeat_interleave(groups, dim=1)  # [P, Hq, D]
    hi = kmax.repeat_interleave(groups, dim=1)
    qf = q.float()
    bound = torch.einsum("thd,phd->tph", qf.clamp(min=0), hi) + torch.einsum("thd,phd->tph", qf.clamp(max=0), lo)
    return bound.amax(dim=(0, 2))


def choose_shards(
    segments: list[Segment], q: torch.Tensor | None, q_pos: torch.Tensor | np.ndarray, spec: AttentionSpec,
    top_shards: int | None, summaries: dict[int, tuple[torch.Tensor, torch.Tensor]] | None,
    q_needed: bool = True,
) -> tuple[int, ...] | None:
    """Shards of one layer's pathway for a request whose new queries are q [T, Hq, D] at q_pos [T].

    q_needed=False (q may be None): the choice if it does not depend on the queries, else None."""
    q_lo, q_hi = int(q_pos.min()), int(q_pos.max())
    chunks = set((q_pos // spec.chunk_size).tolist()) if spec.chunk_size else None
    live = [s for s in segments if segment_visible(s, q_lo, q_hi, chunks, spec)]
    if spec.chunk_size or top_shards is None or top_shards >= len(live) or not summaries:
        return tuple(s.shard for s in live)
    if not q_needed:
        return None
    last = q[-1].float().cpu()  # [Hq, D]: the query that decides what the answer attends to
    scored = sorted(
        live, key=lambda s: -float(quest_scores(last, *summaries[s.shard]).max())
        if s.shard in summaries else 0.0,
    )
    return tuple(sorted(s.shard for s in scored[:top_shards]))
