"""The README's learning-curve table of the built-in model's CPU training (readme_tables.py).

From benchmarks/results/demo_model_cpu/: `curve.jsonl` (tokens and training seconds per round) and
`eval/roundN_*.json` (held-out evaluations after round N); the shipped model's row comes from
`eval_realtext_before_*.json`.
"""

from __future__ import annotations

import json

from table_format import RESULTS

CURVE_DIR = RESULTS / "demo_model_cpu"
# (column, file suffix, length): every cell on held-out text, questions at random offsets in a chunk
CELLS = [("passkey kjv ~4K", "passkey_kjv", 4096), ("passkey debian-reference ~4K", "passkey_debref", 4096),
         ("passkey kjv ~32K", "long_passkey_kjv", 32768), ("passkey kjv ~128K", "long_passkey_kjv", 131072),
         ("multi-key kjv ~4K", "multikey_kjv", 4096), ("multi-key kjv ~32K", "multikey_kjv", 32768)]
BEFORE = {"passkey_kjv": "eval_realtext_before_passkey_kjv.json",
          "long_passkey_kjv": "eval_realtext_before_passkey_kjv.json",
          "passkey_debref": "eval_realtext_before_passkey_debian-reference.json",
          "multikey_kjv": "eval_realtext_before_multikey_kjv.json"}


def _results(path) -> dict[int, dict]:
    if not path.is_file():
        return {}
    return {r["length"]: r for r in json.loads(path.read_text())["results"] if r["mode"] == "exact"}


def _row(label: str, files: dict[str, dict[int, dict]]) -> str:
    cells, stops, answered = [], 0, 0
    for _, suffix, length in CELLS:
        r = files.get(suffix, {}).get(length)
        if r is None:
            cells.append("-")
            continue
        cells.append(f"{r['correct']}/{r['samples']}")
        stops, answered = stops + r["stops"], answered + r["samples"]
    stop = f"{stops}/{answered} ({stops / answered:.0%})" if answered else "-"
    return f"| {label} | " + " | ".join(cells) + f" | {stop} |"


def cpu_curve() -> str:
    head = ("| model | training tokens | training time | " + " | ".join(c for c, _, _ in CELLS)
            + " | stops after the answer |")
    lines = [head, "|" + "---|" * (len(CELLS) + 4)]
    before = {suffix: _results(RESULTS / name) for suffix, name in BEFORE.items()}
    lines.append(_row("shipped model | 0 | 0", before))
    curve = CURVE_DIR / "curve.jsonl"
    points = [json.loads(x) for x in curve.read_text().splitlines() if x.strip()] if curve.is_file() else []
    for p in points:
        n = p["round"]
        files = {suffix: _results(CURVE_DIR / "eval" / f"round{n}_{suffix}.json") for _, suffix, _ in CELLS}
        lines.append(_row(f"round {n} (step {p['step']}) | {p['tokens'] / 1e6:.1f} M | {p['train_s'] / 60:.0f} min",
                          files))
    recipes = sorted({p["recipe"] for p in points if p.get("recipe")})
    lines += ["", "Rounds' data: " + ("; ".join(f"`{r}`" for r in recipes) if recipes else "-") + "."]
    return "\n".join(lines)
