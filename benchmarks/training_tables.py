"""The built-in model's tables in docs/training.md (readme_tables.py): the learning curve of its CPU
training, and its retrieval on held-out text.

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
    recipes: dict[str, list[int]] = {}  # in the order of the rounds that first ran each
    for p in points:
        if p.get("recipe"):
            recipes.setdefault(p["recipe"], []).append(p["round"])
    listed = [f"round{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: `{recipe}`" for recipe, r in recipes.items()]
    lines += ["", "Rounds' data: " + ("; ".join(listed) if listed else "-") + "."]
    return "\n".join(lines)


# -- the built-in model on held-out text (docs/training.md "The built-in model": `make eval`) ------
NAME = "builtin"  # scripts/eval_realtext.sh record builtin
TARGET = {"passkey": 0.95, "multikey": 0.90, "offset": 0.90, "stops": 0.95}


def _report(suffix: str) -> dict | None:
    path = RESULTS / f"eval_realtext_{NAME}_{suffix}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(r: dict) -> str:
    return f"{r['correct']}/{r['samples']} ({r['accuracy']:.0%})"


def _target(ok: bool, what: str) -> str:
    return f"{what} ({'met' if ok else '**not met**'})"


def builtin_heldout() -> str:
    lines = ["| task | text (held out) | length | mode | correct | target | stops after the answer |",
             "|---|---|---|---|---|---|---|"]
    stops = answered = stops_right = right = 0
    for task, suffix in (("passkey", "passkey_kjv"), ("passkey", "passkey_debian-reference"),
                         ("multi-key (4 lines)", "multikey_kjv"), ("passkey", "passkey_1m_kjv")):
        rep = _report(suffix)
        for r in (rep or {}).get("results", []):
            if r["length"] > 131072:
                target = _target(r["correct"] == r["samples"], "still answers")
            elif task == "passkey" or r["length"] == 32768:
                goal = TARGET["passkey" if task == "passkey" else "multikey"]
                target = _target(r["accuracy"] >= goal, f">= {goal:.0%}")
            else:
                target = "-"
            lines.append(f"| {task} | {r['source']} | ~{r['length']:,} (mean {r['length_mean']:,}) | {r['mode']} | "
                         f"{_cell(r)} | {target} | {r['stops']}/{r['samples']} |")
            stops, answered = stops + r["stops"], answered + r["samples"]
            stops_right, right = stops_right + r["stops_when_correct"], right + r["correct"]
    offsets = {src: _report(f"offsets_{src}") for src in ("kjv", "synthetic")}
    rows = {}
    for src, rep in offsets.items():
        for r in (rep or {}).get("results", []):
            rows.setdefault((r["offset"], r["answer_offset"]), {})[src] = r
            stops, answered = stops + r["stops"], answered + r["samples"]
            stops_right, right = stops_right + r["stops_when_correct"], right + r["correct"]
    if rows:
        worst = min(r["accuracy"] for cells in rows.values() for r in cells.values())
        lines += ["", "Offset of the question's first token within a 2048-token chunk (passkey, ~4K tokens; "
                  + _target(worst >= TARGET["offset"], f"every offset >= {TARGET['offset']:.0%}") + "):", "",
                  "| question offset (answer offset) | kjv (held out) | synthetic filler |", "|---|---|---|"]
        for (off, ans), cells in sorted(rows.items()):
            lines.append(f"| {off} ({ans}) | " + " | ".join(_cell(cells[s]) if s in cells else "-"
                                                            for s in ("kjv", "synthetic")) + " |")
    if right:
        lines += ["", f"Correct answers followed by eos within 2 tokens, every cell above: {stops_right}/{right} "
                  f"({stops_right / right:.1%}; " + _target(stops_right / right >= TARGET["stops"],
                                                            f"target >= {TARGET['stops']:.0%}")
                  + f"); over every sample, right or wrong: {stops}/{answered} ({stops / answered:.1%})."]
    files = sorted(p.name for p in RESULTS.glob(f"eval_realtext_{NAME}_*.json"))
    lines += ["", "Files: " + (", ".join(f"`results/{f}`" for f in files) if files else "-") + "."]
    return "\n".join(lines)
