"""Append one point to a CPU training run's learning curve (scripts/train_demo_model_cpu.sh round).

A point: the round, the step reached, training tokens and seconds (cumulative over rounds, from the
round's `[expertmesh.train]` metric lines), the round's wall time and its data recipe. The held-out
evaluations of each round are in `eval/roundN_*.json` next to it (the table in docs/training.md:
benchmarks/training_tables.py).

    python scripts/training_curve.py RESULTS_DIR ROUND WALL_S [RECIPE]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(results: str, round_: str, wall_s: str, recipe: str = "") -> None:
    root = Path(results)
    curve = root / "curve.jsonl"
    points = [json.loads(x) for x in curve.read_text().splitlines() if x.strip()] if curve.is_file() else []
    tokens = seconds = 0
    step = None
    for line in (root / "logs" / f"round{round_}.log").read_text().splitlines():
        text = line.split("] ", 1)[1]
        if not text.startswith("{"):  # "continued from step ..."
            continue
        m = json.loads(text)
        tokens += m["tokens"]
        seconds += m["window_s"]
        step = m["step"]
    if step is None:
        raise SystemExit(f"round {round_}: no training metrics in {root / 'logs'} (did the run fail?)")
    before = points[-1] if points else {"tokens": 0, "train_s": 0.0}
    point = {"round": int(round_), "step": step, "tokens": before["tokens"] + tokens,
             "train_s": round(before["train_s"] + seconds, 1), "round_wall_s": int(wall_s) if wall_s else None, "recipe": recipe}
    with curve.open("a") as f:
        f.write(json.dumps(point) + "\n")
    print(json.dumps(point))


if __name__ == "__main__":
    main(*sys.argv[1:])
