"""Where the results files are, and how the tables of README.md and docs/ write figures
(readme_tables.py)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def _s(s: float) -> str:
    return f"{s:.2f} s"


def _x(r: float) -> str:
    return f"{r:.2f}x"
