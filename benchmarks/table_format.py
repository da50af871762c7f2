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


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _load_note(report: dict) -> str:
    la = report.get("loadavg_1_5_15min")
    if not la:
        return "load average not recorded"
    before = la.get("before")
    after = la.get("after")
    text = f"1-minute load average {before[0]:.1f} before" if before else ""
    if after:
        text += f", {after[0]:.1f} after"
    cpus = report["machine"].get("cpus", 2) if isinstance(report.get("machine"), dict) else report.get("cpus", 2)
    text += f" ({cpus} cores)"
    return text


def _load_warning(*reports: dict) -> str:
    """A sentence when the load average before a run (other work: the "after" figure includes the
    benchmark's own processes) exceeded twice the cores, else ''."""
    for report in reports:
        la = report.get("loadavg_1_5_15min") or {}
        cpus = report["machine"].get("cpus", 2) if isinstance(report.get("machine"), dict) else report.get("cpus", 2)
        if (la.get("before") or [0])[0] > 2 * cpus:
            return (" **Measured under heavy load from other work on the machine (load average over twice the "
                    "cores): not representative.** Under such load the processes of the two sides get unequal, "
                    "changing shares of the cores, so neither the figures nor the ratios (nor the targets' "
                    "verdicts) stand; re-run `make bench` on a quiet machine.")
    return ""
