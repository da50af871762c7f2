"""The user's-path tables of docs/benchmarks.md (results/user_path.json, user_path_smollm2.json):
`Mesh.generate` against Hugging Face with a prefix cache, on the built-in model and on a real
30-layer one."""

from __future__ import annotations

from table_format import _load, _load_note, _load_warning, _met, _ms, _s, _x


def user_path() -> str:
    r = _load("user_path.json")
    t = r["targets"]
    rows = ["| layout (`Mesh.start` arguments) | actors | HF + prefix cache, batch 1 / 16 | mesh, batch 1 | "
            "mesh, batch 16 |", "|---|---|---|---|---|"]
    for name, x in r["layouts"].items():
        lay, hf, mesh, ratio = x["mesh"]["layout"], x["hf_prefix_cache"], x["mesh"], x["ratios"]
        args = ", ".join(f"{k}={v}" for k, v in x["args"].items()) or "none: picked for this machine"
        rows.append(f"| {name} ({args}) | {_actors(lay)} | {_ms(hf['decode_b1_s'])} / "
                    f"{_ms(hf['decode_b16_s'])} | {_ms(mesh['decode_b1_s'])} "
                    f"({_x(ratio['decode_b1_mesh_over_hf'])}) | {_ms(mesh['decode_b16_s'])} "
                    f"({_x(ratio['decode_b16_mesh_over_hf'])}) |")
    d = r["layouts"].get("default")
    lines = rows + ["", f"In brackets: mesh / Hugging Face. Decode step = {r['step']}; {r['decode_steps']} tokens, "
                    f"{r['context_tokens'] // 1024}K-token context, {r['model']} model; {r['statistic']}."]
    if d:
        got, b1, b16 = d["ratios"], "decode_b1_mesh_over_hf", "decode_b16_mesh_over_hf"
        lines.append(f"Targets, default layout: batch 1 <= {t[b1]}x: {_x(got[b1])} ({_met(got[b1] <= t[b1])}); "
                     f"batch 16 <= {t[b16]}x: {_x(got[b16])} ({_met(got[b16] <= t[b16])}). Every "
                     "repeat of the default layout over the fastest Hugging Face figure: " + "; ".join(
                         f"batch {b}: " + ", ".join(_x(m / d['hf_prefix_cache'][f'decode_b{b}_s'])
                                                    for m in d["mesh"]["runs"][f"decode_b{b}_s"]) for b in (1, 16))
                     + ".")
    lines += ["", f"Run of {r.get('date', '?')} ({_load_note(r)}); `results/user_path.json`." + _load_warning(r)]
    return "\n".join(lines)


def _actors(lay: dict) -> str:
    workers = lay["context_shards"] if lay["colocate"] else lay["context_shards"] + lay["expert_groups"]
    return f"router + {workers} worker{'s' * (workers > 1)}{' (colocated)' if lay['colocate'] else ''}"


def _t(s: float) -> str:
    return _ms(s) if s < 1 else _s(s)


def user_path_smollm2() -> str:
    r = _load("user_path_smollm2.json")
    static = any("hf_static_cache" in x for x in r["layouts"].values())
    rows = ["| layout | batch | HF, prefix in a DynamicCache: decode step | "
            + ("HF, prefix in a StaticCache: decode step | " if static else "") + "mesh: decode step | mesh / HF (Dynamic"
            + (" / Static" if static else "") + "Cache) | time to first token: HF"
            + (" (Dynamic / Static)" if static else "") + " | mesh (router / caller) |",
            "|---|---|---|---|---|---|---|" + ("---|" if static else "")]
    where = ["| layout | batch | mesh step (caller) | router decode step (median) | router step (mean) | "
             "waiting for the shard's attention | waiting for the experts | the rest |",
             "|---|---|---|---|---|---|---|---|"]
    for name, x in r["layouts"].items():
        lay, hf, mesh, ratio = x["mesh"]["layout"], x["hf_prefix_cache"], x["mesh"], x["ratios"]
        st = x.get("hf_static_cache")
        label = f"{name}: {_actors(lay)}"
        for b in r["batches"]:
            rows.append(f"| {label} | {b} | {_t(hf[f'decode_b{b}_s'])} | "
                        + (f"{_t(st[f'decode_b{b}_s'])} | " if st else "")
                        + f"{_t(mesh[f'decode_b{b}_s'])} | **{_x(ratio[f'decode_b{b}_mesh_over_hf'])}**"
                        + (f" / **{_x(ratio[f'decode_b{b}_mesh_over_hf_static'])}**" if st else "")
                        + f" | {_t(hf[f'ttft_b{b}_s'])}" + (f" / {_t(st[f'ttft_b{b}_s'])}" if st else "")
                        + f" | {_t(mesh[f'ttft_b{b}_s'])} / {_t(mesh[f'ttft_caller_b{b}_s'])} |")
            p = mesh.get("profile_last_repeat", {}).get(f"b{b}")
            if p:
                s = p["per_step_s"]
                where.append(f"| {label} | {b} | {_ms(p['caller_step_s'])} | {_ms(p['decode_step_median_s'])} | "
                             f"{_ms(s['router_step'])} | "
                             f"{_ms(s['waiting_for_shards'])} | {_ms(s['waiting_for_expert_groups'])} | "
                             f"{_ms(s['router_own'])} |")
    d = next(iter(r["layouts"].values()))
    g, threads = d["greedy"], d["mesh"]["torch_threads"]
    same = ", ".join(f"batch {k[1:]}: {v}" for k, v in g["requests_with_hf_greedy_tokens"].items())
    sides = ["hf_prefix_cache", *(["hf_static_cache"] if "hf_static_cache" in d else []), "mesh"]
    every = "; ".join(f"batch {b}: " + " / ".join(", ".join(_t(v) for v in d[side]["runs"][f"decode_b{b}_s"])
                                                  for side in sides) for b in r["batches"])
    lines = rows + [
        "", f"Decode step = {r['step']}; {r['decode_steps']} tokens a request, {r['statistic']}, "
        f"{r['repeats']} repeats. Time to first token: {r['ttft']}.",
        f"Every repeat's decode step, Hugging Face{' (Dynamic / Static)' if 'hf_static_cache' in d else ''} / mesh "
        f"({next(iter(r['layouts']))} layout): {every}.",
        f"Greedy tokens: the batch-1 request's are Hugging Face's, token for token: "
        f"{'**yes**' if r['exact_greedy_b1'] else '**NO**'}"
        + (f" ({g['b1_text']!r})" if g.get("b1_text") else "") + f"; requests with Hugging Face's tokens: {same}"
        + ("" if "hf_static_cache_same_tokens" not in g else "; Hugging Face's own with either cache: "
           + ("the same" if g["hf_static_cache_same_tokens"] else "**different**")) + ".",
        f"The context: {r['context_tokens']:,} tokens, {r['context_text']}; prompts: {r['prompts_text']}.",
        f"Torch threads: Hugging Face {r['torch_threads']['hf_driver']} (the driver); mesh: router "
        f"{threads['router']}, worker {threads['each shard / group / worker']}. Each side prefilled the context "
        f"once: Hugging Face {_s(r['hf_prefill_s'])}, the mesh's registration {_s(d['mesh']['register_s'])}. "
        f"Hugging Face's attention `{r['hf_implementation']['attention']}`, experts "
        f"`{r['hf_implementation']['experts']}`.",
        "", "Where the mesh's step goes: the router's counters over the last repeat, per router step (the "
        "prompts' steps included, hence the mean above the decode steps' median); the caller's step also holds "
        "sampling, scheduling and the results' way back through Ray. Per layer, the waits are the router's for "
        "the worker's answers and the rest is the router's own compute; with whole steps the worker runs the "
        "step, its waits are calls to its own shard and group in process (the attention over the context, the "
        "experts) and the rest is its dense layers plus the round trip:", "",
        *where, "",
        f"Run of {r.get('date', '?')} on {r['machine']['platform']} ({_load_note(r)}); "
        "`results/user_path_smollm2.json`." + _load_warning(r)]
    return "\n".join(lines)
