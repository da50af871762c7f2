"""What a stored context is: its manifest, written last and atomically.

A context exists in a store exactly when its manifest exists; segment files without a
manifest are orphans of an interrupted registration and are removed at the next start.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MANIFEST_FORMAT = "expertmesh-context/1"


@dataclasses.dataclass(frozen=True)
class SegmentEntry:
    """Tokens [start, end) of a context, stored in `file` (relative to the store's segments/)."""

    shard: int
    start: int
    end: int
    file: str
    nbytes: int = 0
    tokens_sha256: str = ""  # of this segment's tokens
    prefix_sha256: str = ""  # of the context's tokens [0, end)


@dataclasses.dataclass(frozen=True)
class Manifest:
    id: str
    num_tokens: int
    mode: str
    segments: tuple[SegmentEntry, ...]
    owner: str
    visibility: str
    name: str | None
    created: float
    kv_dtype: str
    page_size: int
    model_fingerprint: str
    tokens_sha256: str
    format: str = MANIFEST_FORMAT
    chat: str | None = None  # ContextInfo.chat (manifests written before it have none)

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["segments"] = [dataclasses.asdict(s) for s in self.segments]
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> "Manifest":
        try:
            d: dict[str, Any] = json.loads(raw)
            if d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            d["segments"] = tuple(SegmentEntry(**s) for s in d["segments"])
            return cls(**d)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"stored context manifest {where} is unreadable: {exc}") from None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)
