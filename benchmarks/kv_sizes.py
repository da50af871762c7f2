"""KV bytes per token (stored vs expanded) and a 1M-token context's store size, for the public
configs of the supported architectures (benchmarks/public_configs/: the fields of each model's
config.json that decide it). Computed with the project's own config parser and the store's own
segment layout (`expertmesh.store.pages.segment_bytes`: K/V pages, Quest summaries, positions,
checksums), so the figure is what `register_context` writes; tests/store/test_latent_pages.py
checks a written latent file against the same function.

    python benchmarks/kv_sizes.py   # -> benchmarks/results/kv_sizes.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from expertmesh.model.config import ModelConfig  # noqa: E402
from expertmesh.store.pages import PageShape, segment_bytes  # noqa: E402

TOKENS = 1 << 20
PAGE = 64
BF16 = 2


def sizes(path: Path) -> dict:
    cfg = ModelConfig.from_hf(json.loads(path.read_text()))
    shape = PageShape(cfg.num_layers, TOKENS // PAGE, PAGE, cfg.num_kv_heads, cfg.head_dim, "bfloat16", cfg.kv_latent)
    stored = cfg.kv_bytes_per_token(BF16)
    expanded = cfg.expanded_kv_bytes_per_token(BF16)
    window_layers = sum(cfg.window_layers) if cfg.window_layers else (cfg.num_layers if cfg.sliding_window else 0)
    return {
        "model": path.stem.replace("--", "/"), "architecture": cfg.architecture, "layers": cfg.num_layers,
        "kv_layout": "latent (MLA)" if cfg.kv_latent else f"{cfg.num_kv_heads} KV heads x {cfg.head_dim}",
        "stored_bytes_per_token_per_layer": stored // cfg.num_layers,
        "expanded_bytes_per_token_per_layer": expanded // cfg.num_layers,
        "stored_bytes_per_token": stored, "expanded_bytes_per_token": expanded,
        "store_bytes_1m": segment_bytes(shape), "expanded_kv_bytes_1m": expanded * TOKENS,
        "sliding_window_layers": window_layers, "sliding_window": cfg.sliding_window,
    }


def main() -> None:
    rows = [sizes(p) for p in sorted((ROOT / "benchmarks" / "public_configs").glob("*.json"))]
    out = {"tokens": TOKENS, "page_size": PAGE, "kv_dtype": "bfloat16", "models": rows}
    dest = ROOT / "benchmarks" / "results" / "kv_sizes.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        print(f"{r['model']:36s} {r['stored_bytes_per_token']:>10,d} B/token stored "
              f"{r['expanded_bytes_per_token']:>10,d} expanded  1M store {r['store_bytes_1m'] / 1e9:8.1f} GB")


if __name__ == "__main__":
    main()
