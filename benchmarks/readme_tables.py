"""Write the benchmark and retrieval tables of README.md and docs/ from the results files, so they
cannot drift.

Every table (and every figure stated next to it) lives in one page (PAGES below: the docs page
that holds its detail, or README.md for the headline "What works" table) between marker
comments, `<!-- table:NAME -->` ... `<!-- /table:NAME -->`; this script replaces what is between
them with text generated from benchmarks/results/*.json. `make bench` runs it after the benchmarks.

    python benchmarks/readme_tables.py            # rewrite README.md and docs/*.md
    python benchmarks/readme_tables.py --check    # exit 1 if a page differs (the tests run this)
"""

from __future__ import annotations

import argparse
import statistics
import sys

from fault_tables import elastic, micro_batches, multi_host, routers, shared_store, soak
from headline_table import headline
from table_format import ROOT, _load, _load_note, _load_warning, _met, _ms, _s, _x
from training_tables import builtin_heldout, cpu_curve
from user_path_tables import user_path, user_path_smollm2

# targets the project set itself (docs/benchmarks.md); the figures come from the files
TARGETS = {"mesh_decode": 1.5, "mesh_register": 1.3, "ttft_speedup": 50.0, "streams_32_over_1": 8.0,
           "train_ratio": 0.9}


# -- core ---------------------------------------------------------------------------------------
LAYOUT_LABELS = {"ray": "Ray task per layer", "collective": "collective", "colocated": "collective, colocated",
                 "colocated-2": "collective, colocated, 2 shards"}


def core() -> str:
    r = _load("core.json")
    names = {"default": "default (Llama-4 style)", "tiny-mixtral": "tiny Mixtral"}
    layouts = [k for k in LAYOUT_LABELS if k in r.get("layouts", {})]
    head = "| model | measure | single process | " + " | ".join(f"mesh: {LAYOUT_LABELS[k]}" for k in layouts) + " |"
    rows = [head, "|" + "---|" * (3 + len(layouts))]
    verdicts = {}
    for key, label in names.items():
        if key not in r["models"]:
            continue
        m = r["models"][key]
        sp = m["single_process"]

        def cell(layout: str, measure: str, ratio: str, fmt) -> str:
            return f"{fmt(m['mesh'][layout][measure])} ({_x(m['ratios'][layout][ratio])})"
        k = r["context_tokens"] // 1024
        rows.append(f"| {label} | register {k}K (exact) | {_s(sp['register_s'])} (router code), "
                    f"{_s(sp['forward_s'])} (forward) | "
                    + " | ".join(cell(x, "register_s", "register_mesh_over_single", _s) for x in layouts) + " |")
        rows.append(f"| {label} | register {k}K (blockwise) | - | "
                    + " | ".join(_s(m["mesh"][x]["register_blockwise_s"]) for x in layouts) + " |")
        for b in ("b1", "b16"):
            rows.append(f"| {label} | decode step, batch {b[1:]} | {_ms(sp[f'decode_{b}_s'])} | "
                        + " | ".join(cell(x, f"decode_{b}_s", f"decode_{b}_mesh_over_single", _ms) for x in layouts)
                        + " |")
        for x in layouts:
            verdicts.setdefault(x, []).append((label, m["ratios"][x]))
    before = "single_process_before" in next(iter(r["models"].values()))
    lines = rows + ["", "In brackets: mesh / single process (the same router code in one process, same run"
                    + ("; measured again just before each layout, and each layout's ratios use those figures: "
                       "the single-process column shows the fastest of all of them)." if before else ").")]
    for x in layouts:
        checks = []
        for name, target in (("decode_b16_mesh_over_single", TARGETS["mesh_decode"]),
                             ("decode_b1_mesh_over_single", TARGETS["mesh_decode"]),
                             ("register_mesh_over_single", TARGETS["mesh_register"])):
            got = [(label, ratios[name]) for label, ratios in verdicts[x]]
            what = {"decode_b16_mesh_over_single": "decode at batch 16", "decode_b1_mesh_over_single":
                    "decode at batch 1", "register_mesh_over_single": "registration"}[name]
            checks.append(f"{what} <= {target}x: " + ", ".join(f"{_x(v)} ({lab})" for lab, v in got)
                          + f" ({_met(all(v <= target for _, v in got))})")
        lines.append(f"Targets, {LAYOUT_LABELS[x]}: " + "; ".join(checks) + ".")
    lines += ["", f"Each figure is the fastest of {r.get('repeats', 1)} repeats on its side. Run of "
              f"{r.get('date', '?')} ({_load_note(r)}); `results/core.json`." + _load_warning(r)]
    return "\n".join(lines)


# -- serve --------------------------------------------------------------------------------------
def serve() -> str:
    r = _load("serve.json")
    mesh = r["mesh_http_ttft_s"]["median"]
    hf = r["hf_generate_ttft_s"].get("fastest", r["hf_generate_ttft_s"]["median"])
    k = r["context_tokens"] // 1024
    t = TARGETS["ttft_speedup"]
    lines = ["| measure | figure |", "|---|---|",
             f"| time to first token, question over a registered {k}K-token context (HTTP, streaming) | "
             f"{mesh * 1e3:.0f} ms (median of {len(r['mesh_http_ttft_s']['runs'])}) |",
             f"| registering that context once (HTTP, exact) | {_s(r['register_s'])} |",
             f"| baseline (a): Hugging Face `generate` with the {k}K context in the prompt | "
             f"{_s(hf)} (fastest of {len(r['hf_generate_ttft_s']['runs'])}) |",
             f"| speed-up over (a) | **{r['ttft_speedup_vs_hf']:.0f}x** (target >= {t:.0f}x: "
             f"{_met(r['ttft_speedup_vs_hf'] >= t)}) |"]
    if "single_process_prefill_s" in r:
        own = r["single_process_prefill_s"]
        lines += [f"| baseline (b): expertmesh's own single-process prefill of the same tokens "
                  f"(`model(ids)`, no Ray) | {_s(own['fastest'])} (fastest of {len(own['runs'])}) |",
                  f"| speed-up over (b) | **{r['ttft_speedup_vs_single_process_prefill']:.0f}x** (target >= "
                  f"{t:.0f}x: {_met(r['ttft_speedup_vs_single_process_prefill'] >= t)}) |"]
    levels = r["throughput"]
    ratio = r["throughput_ratio_vs_1_stream"]
    streams = " / ".join(str(lv["streams"]) for lv in levels)
    lines += [f"| aggregate output tokens/s, {streams} concurrent streams | "
              + " / ".join(f"{lv['tokens_per_s']:.1f}" for lv in levels) + " |"]
    top = str(levels[-1]["streams"])
    lines += [f"| {top} streams vs 1 | **{ratio[top]:.1f}x** (target >= {TARGETS['streams_32_over_1']:.0f}x: "
              f"{_met(ratio[top] >= TARGETS['streams_32_over_1'])}) |",
              "", "Speed-ups: a baseline's fastest run over the mesh's median. "
              f"Run of {r.get('date', '?')} ({_load_note(r)}); `results/serve.json`." + _load_warning(r)]
    return "\n".join(lines)


# -- train --------------------------------------------------------------------------------------
def train() -> str:
    r = _load("train.json")
    plain, ray_ = r["plain_loop"], r["ray_train"]
    ok = r["ray_over_plain"] >= r["target"]
    lines = ["| measure | plain PyTorch loop | Ray Train (TorchTrainer, 1 worker, Ray Data input) | ratio |",
             "|---|---|---|---|",
             f"| training tokens/s (total tokens / total wall time, steps {r['warmup'] + 1}-{r['steps']}) | "
             f"{plain['tokens_per_s']:,.0f} | {ray_['tokens_per_s']:,.0f} | **{r['ray_over_plain']:.2f}x** "
             f"(target >= {r['target']}x: {_met(ok)}) |",
             f"| wall time of those steps (checkpoints included) | {_s(plain['seconds'])} "
             f"({plain.get('checkpoints_timed', '?')} checkpoints) | {_s(ray_['seconds'])} "
             f"({ray_.get('checkpoints_timed', '?')} checkpoints) | |",
             "",
             f"Batches of {r['batch']} x {r['length']} tokens, a checkpoint every {r.get('checkpoint_every', '?')} "
             f"steps on both sides. Expert load at the end of the run: mean {ray_['expert_load_mean']:,.0f} / "
             f"max {ray_['expert_load_max']:,.0f} tokens per expert over its last {r['warmup']} steps. "
             f"Run of {r.get('date', '?')} ({_load_note(r)}); `results/train.json`." + _load_warning(r)]
    return "\n".join(lines)


def _gib(b: float) -> str:
    return f"{b / 2 ** 30:.2f} GiB"


def _la(report: dict) -> str:
    la = report.get("loadavg")
    return f"1-minute load average {la[0]:.1f} at the end" if la else "load average not recorded"


def store() -> str:
    r = _load("store.json")
    m1, m10 = _load("store_1m_memory.json"), _load("store_10m.json")
    three = _load("store_10m_three_depths.json")
    rs, ra = r["restart"], r["ratios"]
    base = r["register_s"] + r["first_answer_after_register_s"]
    lines = [
        f"Context store (`benchmarks/bench_store.py`; built-in model, 4 shards + 2 expert groups, store on local "
        f"disk, passkey needle in the standard filler, blockwise registration, greedy; `top_pages={r['top_pages']}`).",
        "",
        f"**Restart vs recompute, {r['tokens']:,}-token context** (`results/store.json`, {r['kv_dtype']} KV, "
        f"{_la(r)}):",
        "",
        "| measure | figure |",
        "|---|---|",
        f"| `register_context` + first answer (fresh store) | {_s(r['register_s'])} + {_s(r['first_answer_after_register_s'])}"
        f" = {_s(base)} |",
        f"| after `Mesh.start(store=same)` returned (new Ray cluster): first answer, `top_pages` | "
        f"{_s(rs['first_answer_after_start_s'])}: **{_x(ra['restart_vs_register_plus_answer'])} faster** (target >= 20x: "
        f"{_met(ra['restart_vs_register_plus_answer'] >= 20)}); answer `{rs['answer']['answer'].strip()}` |",
        f"| the same, exact attention (every page) | {_s(rs['first_exact_answer_s'])} ({_x(base / rs['first_exact_answer_s'])}) |",
        f"| whole restart: Ray cluster + actors + first answer | {_s(rs['whole_restart_s'])} (of which `Mesh.start` "
        f"{_s(rs['mesh_start_s'])}) |",
        f"| decode step, KV in the store (hot budget {r['cold_budget_bytes'] >> 20} MiB per shard) with `top_pages`, "
        f"batch 1 / 16 | {_ms(r['decode_store_top_pages_b1_s'])} / {_ms(r['decode_store_top_pages_b16_s'])} |",
        f"| decode step, all KV hot ({r['hot_budget_bytes'] >> 20} MiB per shard), exact, batch 1 / 16 | "
        f"{_ms(r['decode_hot_exact_b1_s'])} / {_ms(r['decode_hot_exact_b16_s'])}: store + `top_pages` is "
        f"{_x(ra['decode_store_top_pages_vs_hot_exact_b1'])} / {_x(ra['decode_store_top_pages_vs_hot_exact_b16'])} "
        f"(target <= 1.5x: {_met(max(ra['decode_store_top_pages_vs_hot_exact_b1'], ra['decode_store_top_pages_vs_hot_exact_b16']) <= 1.5)}) |",
        f"| decode step, all KV hot with the same `top_pages`, batch 1 / 16 | {_ms(r['decode_hot_top_pages_b1_s'])} / "
        f"{_ms(r['decode_hot_top_pages_b16_s'])}: store is {_x(ra['decode_store_top_pages_vs_hot_top_pages_b1'])} / "
        f"{_x(ra['decode_store_top_pages_vs_hot_top_pages_b16'])} |",
        f"| store size | {_gib(r['store_bytes'])} |",
        "",
    ]
    d1, d10 = m1["depths"][0], m10["depths"][0]
    lines += [
        f"**Ten million tokens on one 2-core, 24 GiB machine** (`results/store_10m.json`; {m10['kv_dtype']} KV, "
        f"hot budget {m10['budget_bytes'] >> 20} MiB per shard; needle at depth {d10['depth']}; {_la(m10)}: "
        f"registration time is inflated by other work on the machine):",
        "",
        "| measure | 1,000,000 tokens | 10,000,000 tokens |",
        "|---|---|---|",
        f"| registration (blockwise) | {_s(d1['register_s'])} | {_s(d10['register_s'])} |",
        f"| store size | {_gib(m1['store_bytes'])} | {_gib(m10['store_bytes'])} |",
        f"| time to first token, `top_pages={m10['top_pages']}` | {_s(d1['top_pages']['ttft_s'])} | "
        f"{_s(d10['top_pages']['ttft_s'])} |",
        f"| time to first token, exact (every page of 10M tokens streamed) | {_s(d1['exact']['ttft_s'])} | "
        f"{_s(d10['exact']['ttft_s'])} |",
        f"| answer (`top_pages` / exact) | `{d1['top_pages']['answer'].strip()}` / `{d1['exact']['answer'].strip()}` | "
        f"`{d10['top_pages']['answer'].strip()}` / `{d10['exact']['answer'].strip()}` |",
        f"| peak memory of all mesh processes (sum of Pss: driver, router, shards, groups, raylet, GCS) | "
        f"{_gib(d1['peak_rss_bytes'])} | {_gib(d10['peak_rss_bytes'])} ({_x(d10['peak_rss_bytes'] / d1['peak_rss_bytes'])}"
        f" for 10x the tokens) |",
        "| of which the largest shard / the router / the driver | "
        + " / ".join(_gib(d1["peak_by_process"][k]) for k in ("ray::ContextShard", "ray::Router", "driver")) + " | "
        + " / ".join(_gib(d10["peak_by_process"][k]) for k in ("ray::ContextShard", "ray::Router", "driver")) + " |",
        "",
        f"Needles at depths 0, 0.5 and 1 of a 10M-token context (`results/store_10m_three_depths.json`: an earlier "
        f"run, {_la(three)}, before segment writes moved from a writable memory map to `pwrite`, which changed "
        f"memory, not answers; its memory figure summed RSS and is not cited). The three contexts differ only in "
        f"the needle's segment, so the second and third reuse the others' stored segments:",
        "",
        "| depth | registration | answer, `top_pages` (TTFT) | answer, exact (TTFT) |",
        "|---|---|---|---|",
    ]
    for row in three["depths"]:
        lines.append(f"| {row['depth']} | {_s(row['register_s'])} | `{row['top_pages']['answer'].strip()}` "
                     f"({_s(row['top_pages']['ttft_s'])}) | `{row['exact']['answer'].strip()}` "
                     f"({_s(row['exact']['ttft_s'])}) |")
    return "\n".join(lines)


def dataplane() -> str:
    r = _load("dataplane.json")
    d = r["decode"]
    before, after = d["best"]["before"], d["best"]["after"]
    lines = ["| measure | authenticated / data-only (now) | before (plain hello / pickle) | ratio |",
             "|---|---|---|---|"]
    for f in r["formation"]:
        over = "TCP loopback" if f["socket"] == "tcp" else "a Unix socket"
        lines.append(f"| group formation, {f['actors']} actors over {over} (median of 30) | "
                     f"{f['authenticated_ms']:.2f} ms | {f['plain_hello_ms']:.2f} ms | "
                     f"+{f['extra_ms']:.2f} ms |")
    for c in r["plan_codec"]:
        lines.append(f"| an actor's step plan, encode + decode: {c['plan']} | {c['wire_us']:.0f} us, "
                     f"{c['wire_bytes']:,} B | {c['pickle_us']:.0f} us, {c['pickle_bytes']:,} B | {_x(c['ratio'])} |")
    med = {side: {m: statistics.median(run[m] for run in d["runs"][side]) for m in ("decode_b1_ms", "decode_b8_ms")}
           for side in ("before", "after")}
    for b, m in (("1", "decode_b1_ms"), ("8", "decode_b8_ms")):
        lines.append(f"| mesh decode step, batch {b}: median of {len(d['runs']['after'])} runs (fastest) | "
                     f"{_ms(med['after'][m] / 1e3)} ({_ms(after[m] / 1e3)}) | {_ms(med['before'][m] / 1e3)} "
                     f"({_ms(before[m] / 1e3)}) | {_x(med['after'][m] / med['before'][m])} "
                     f"({_x(after[m] / before[m])}) |")
    lines += [
              "",
              f"Decode steps: the built-in model, 2 context shards + 2 expert groups + router, socket "
              f"transport, a 4,096-token context, 24 new tokens per request; 'before' is commit "
              f"`{d['base_commit']}` run from a git worktree in the same run, alternating with this tree "
              f"({_load_note(r)}); `results/dataplane.json`." + _load_warning(r)]
    return "\n".join(lines)


def kv_sizes() -> str:
    r = _load("kv_sizes.json")
    lines = ["| model (public config) | architecture | KV layout | stored B / token / layer | expanded B / token / layer "
             "| stored B / token (all layers) | 1M-token context in the store |", "|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        ratio = m["expanded_bytes_per_token"] / m["stored_bytes_per_token"]
        lines.append(f"| {m['model']} | `{m['architecture']}` | {m['kv_layout']} | "
                     f"{m['stored_bytes_per_token_per_layer']:,} | {m['expanded_bytes_per_token_per_layer']:,}"
                     f"{f' ({ratio:.0f}x)' if ratio > 1 else ''} | {m['stored_bytes_per_token']:,} | "
                     f"{m['store_bytes_1m'] / 1e9:.1f} GB |")
    lines += ["", f"bf16 KV, {r['tokens']:,} tokens in {r['page_size']}-token pages; the store size counts every "
                  "file byte (pages, fp32 Quest summaries, positions, checksums). Computed by "
                  "`benchmarks/kv_sizes.py` from the KV fields of each model's config.json "
                  "(`benchmarks/public_configs/`) with the store's own layout; `results/kv_sizes.json`."]
    return "\n".join(lines)


# page (relative to the repository root) -> the tables it holds, each a function of the results files
PAGES = {
    "README.md": {"headline": headline},
    "docs/benchmarks.md": {"core": core, "user_path": user_path, "user_path_smollm2": user_path_smollm2,
                           "serve": serve, "train": train, "store": store,
                           "dataplane": dataplane, "elastic": elastic, "routers": routers,
                           "micro_batches": micro_batches, "shared_store": shared_store},
    "docs/faults.md": {"multi_host": multi_host, "soak": soak},
    "docs/store.md": {"kv_sizes": kv_sizes},
    "docs/training.md": {"cpu_curve": cpu_curve, "builtin_heldout": builtin_heldout},
}


def render(page: str, text: str) -> str:
    for name, make in PAGES[page].items():
        start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
        if text.count(start) != 1 or text.count(end) != 1:
            raise SystemExit(f"{page} needs exactly one {start} ... {end} pair")
        head, rest = text.split(start)
        _, tail = rest.split(end)
        text = f"{head}{start}\n{make()}\n{end}{tail}"
    return text


def stray_markers() -> list[str]:
    """Markers of a table in a page that does not hold it (a table moved without PAGES)."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        page = str(path.relative_to(ROOT))
        for name in {n for names in PAGES.values() for n in names} - set(PAGES.get(page, {})):
            if f"<!-- table:{name} -->" in path.read_text():
                out.append(f"{page}: table {name} belongs in "
                           + next(p for p, names in PAGES.items() if name in names))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a page is stale")
    args = ap.parse_args()
    stale = stray_markers()
    for page in PAGES:
        path = ROOT / page
        old = path.read_text()
        new = render(page, old)
        if new == old:
            continue
        if args.check:
            stale.append(f"{page}: tables differ from benchmarks/results")
        else:
            path.write_text(new)
            print(f"{page}: tables written from benchmarks/results")
    if stale:
        print("\n".join(stale) + "\nrun: python benchmarks/readme_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
