"""The fingerprint of a model: which weights computed a store's KV.

sha256 over the canonical config.json and every weight file's name and bytes. A store is
bound to the fingerprint that wrote it; KV computed by other weights is never served.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def model_fingerprint(checkpoint: str | Path) -> str:
    root = Path(checkpoint)
    h = hashlib.sha256()
    config = json.loads((root / "config.json").read_text())
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for f in sorted(root.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as src:
            while block := src.read(1 << 24):
                h.update(block)
    return h.hexdigest()
