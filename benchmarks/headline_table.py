"""The README's "What works" table (readme_tables.py): one row per capability, its headline figure
read from the results file that holds it, what it was measured on, and the docs page with the
full table. Only the exactness row is not from a results file: it names the tests that check it.
"""

from __future__ import annotations

import statistics

from table_format import _load, _ms, _s, _x
from training_tables import TARGET, _report

CPU = "2-core CPU VM"


def _cores(report: dict) -> str:
    """'2-core CPU VM' from whichever way a results file records its machine."""
    m = report.get("machine")
    cpus = m.get("cpus") if isinstance(m, dict) else report.get("cpus")
    if cpus is None and isinstance(m, str) and m.split()[0].isdigit():
        cpus = int(m.split()[0])
    return f"{cpus}-core CPU VM" if cpus else CPU


def _model(report: dict) -> str:
    name = str(report.get("model", "default"))
    return "built-in model" if name.startswith("default") else name


def _same(ok: bool, what: str) -> str:
    return f"the same {what}" if ok else f"**another {what}**"


def _when(report: dict) -> str:
    return f", {report['date']}" if report.get("date") else ""


def _range(per_layer: dict) -> str:
    v = list(per_layer.values())
    return f"{min(v):.2f}-{max(v):.2f}"


def _row(what: str, figure: str, on: str, link: str) -> str:
    return f"| {what} | {figure} | {on} | {link} |"


def _per_layer(r: dict, batches: tuple) -> str:
    """The same actors stepping per layer (whole_steps=False), where the run measured them."""
    p = r["layouts"].get("per-layer")
    if p is None:
        return ""
    return "; per layer (the same actors, a round trip per layer and role): " + ", ".join(
        f"{_ms(p['mesh'][f'decode_b{b}_s'])} at batch {b}" for b in batches)


def headline() -> str:
    serve, user, store, m10 = _load("serve.json"), _load("user_path.json"), _load("store.json"), _load("store_10m.json")
    hosts, elastic, routers = _load("multi_host.json"), _load("elastic.json"), _load("routers.json")
    shared, train, plane = _load("shared_store.json"), _load("train.json"), _load("dataplane.json")
    rows = ["| what works | measured | on | detail |", "|---|---|---|---|"]

    rows.append(_row(
        "Exact distributed path", "logits within 1e-4 of Hugging Face's (fp32) with every shard visited; "
        f"{hosts['exact_over_tcp']:.1e} from the single process across hosts over TCP",
        "seven architectures' tiny configs (`tests/model/test_parity_hf.py`, `tests/actors/test_mesh_parity.py`); "
        "five hosts as network namespaces (`results/multi_host.json`)",
        "[architecture](docs/architecture.md#models)"))

    k = serve["context_tokens"] // 1024
    hf = serve["hf_generate_ttft_s"].get("fastest", serve["hf_generate_ttft_s"]["median"])
    rows.append(_row(
        "Questions over a registered context (HTTP, streaming)",
        f"time to first token {serve['mesh_http_ttft_s']['median'] * 1e3:.0f} ms over a {k}K-token context, "
        f"against {_s(hf)} for Hugging Face `generate` re-reading it (**{serve['ttft_speedup_vs_hf']:.0f}x**)",
        f"{_model(serve)}, 4 shards + 2 expert groups; {_cores(serve)}{_when(serve)}",
        "[benchmarks](docs/benchmarks.md#serving)"))

    d = user["layouts"]["default"]
    lay = d["mesh"]["layout"]
    rows.append(_row(
        "Decoding as a user calls it (`Mesh.generate`)",
        f"{_ms(d['mesh']['decode_b1_s'])} a step at batch 1 ({_x(d['ratios']['decode_b1_mesh_over_hf'])} Hugging "
        f"Face's with a prefix cache), {_ms(d['mesh']['decode_b16_s'])} at batch 16 "
        f"({_x(d['ratios']['decode_b16_mesh_over_hf'])})" + _per_layer(user, (1, 16)),
        f"{_model(user)}, {user['context_tokens'] // 1024}K-token context, the default layout (router + "
        f"{lay['context_shards']} colocated worker, whole steps); {_cores(user)}{_when(user)}",
        "[benchmarks](docs/benchmarks.md#the-users-path)"))

    real = _load("user_path_smollm2.json")
    d = real["layouts"]["default"]
    lay, first, last = d["mesh"]["layout"], real["batches"][0], real["batches"][-1]
    static = "hf_static_cache" in d

    def vs(b: int) -> str:
        got = _x(d["ratios"][f"decode_b{b}_mesh_over_hf"])
        return f"{got} / {_x(d['ratios'][f'decode_b{b}_mesh_over_hf_static'])}" if static else got
    rows.append(_row(
        "Decoding a real 30-layer model as a user calls it",
        f"{_ms(d['mesh'][f'decode_b{first}_s'])} a step at batch {first} ({vs(first)} Hugging Face's with a prefix "
        f"cache{' in a DynamicCache / a StaticCache' if static else ''}), {_ms(d['mesh'][f'decode_b{last}_s'])} at "
        f"batch {last} ({vs(last)}); "
        + ("the same greedy tokens" if real["exact_greedy_b1"] else "**other greedy tokens**")
        + _per_layer(real, (first,)),
        f"SmolLM2-135M-Instruct upcycled to 4 experts top-2, fp32, context of {real['context_tokens']:,} tokens, the "
        f"default layout (router + {lay['context_shards']} colocated worker, whole steps); {_cores(real)}{_when(real)}",
        "[benchmarks](docs/benchmarks.md#the-users-path-on-a-real-model)"))

    rs = store["restart"]
    base = store["register_s"] + store["first_answer_after_register_s"]
    rows.append(_row(
        "Contexts that survive restarts (the store)",
        f"first answer {_s(rs['first_answer_after_start_s'])} after a restart, against {_s(base)} to register a "
        f"{store['tokens']:,}-token context again and answer (**{store['ratios']['restart_vs_register_plus_answer']:.0f}x**)",
        f"built-in model, 4 shards + 2 expert groups, store on local disk, `top_pages={store['top_pages']}`; "
        f"{_cores(store)}", "[benchmarks](docs/benchmarks.md#context-store)"))

    d10 = m10["depths"][0]
    rows.append(_row(
        "Contexts larger than memory",
        f"{m10['tokens']:,} tokens: time to first token {_s(d10['top_pages']['ttft_s'])} (`top_pages`), "
        f"{_s(d10['exact']['ttft_s'])} exact; peak memory of every process {d10['peak_rss_bytes'] / 2 ** 30:.2f} GiB; "
        f"registration {d10['register_s'] / 60:.0f} min",
        f"built-in model, {m10['kv_dtype']} KV, {m10['budget_bytes'] >> 20} MiB hot per shard; one {_cores(m10)} "
        "with 24 GiB", "[benchmarks](docs/benchmarks.md#context-store)"))

    h = hosts["shard_host_killed"]
    rows.append(_row(
        "A host lost mid-stream",
        f"context shard's host SIGKILLed: the stream served again after {_s(h['served_again_s'])}, {h['stream']} "
        f"(Ray declared it dead after {_s(h['ray_reported_s'])}); expert group's host: "
        f"{_s(hosts['expert_host_killed']['served_again_s'])}; a shard host's link cut (nothing reset): "
        f"{_s(hosts['shard_host_link_cut']['served_again_s'])}, {hosts['shard_host_link_cut']['stream']} (Ray's "
        f"verdict {_s(hosts['shard_host_link_cut']['ray_reported_s'])}, the chart's detection)",
        "tiny Mixtral with a store; five hosts as Linux network namespaces on one 2-core CPU VM",
        "[faults](docs/faults.md#on-real-hosts)"))

    head = _load("head_loss.json")
    r, sv = head["requests"], head["serve"]
    rows.append(_row(
        "The head lost (GCS fault tolerance)",
        f"head host SIGKILLed and started again {_s(head['head']['down_s'])} later: {r['answered_right']} of "
        f"{r['total']} requests through `Mesh.generate` and {sv['answered_right']} of {sv['total']} streams through "
        f"Serve answered right ({r['while_head_down']} and {sv['while_head_down']} while the head was away), none "
        f"failed; the longest {_s(max(r['longest_s'], sv['longest_s']))}; every actor alive after",
        "Ray's GCS on an external Redis (`redis-server`, as the chart's `serve.gcsFaultTolerance`); Serve's "
        "replica and proxy off the head; tiny Mixtral; four hosts as network namespaces on one 2-core CPU VM",
        "[faults](docs/faults.md#the-head-lost-gcs-fault-tolerance)"))

    soak = _load("soak.json")
    rows.append(_row(
        "Streams through faults (a chaos soak)",
        f"{soak['requests']:,} streamed requests through {len(soak['faults'])} faults in {soak['minutes']:g} min: "
        f"{soak['right']:,} answered right, {soak['cut']} cut mid-stream, {soak['wrong']} wrong, {soak['refused']} "
        f"refused; longest gap between tokens {_s(soak['longest_gap_s'])}",
        f"{soak['clients']} clients through Serve (greedy, seeded, unseeded); process kills of a shard, an expert "
        "group, a router; links cut of a shard, an expert and a router host, an expert host killed, a shard host "
        "added and its shard taken out, the head lost (GCS fault tolerance); tiny Mixtral with a store on "
        "network-namespace hosts, one 2-core CPU VM", "[faults](docs/faults.md#the-chaos-soak)"))

    t = elastic["takeover"]
    rows.append(_row(
        "A shard lost for good",
        f"answered again {_s(t['served_again_s'])} after the kill, {_same(t['same_answer'], 'answer')}, against "
        f"{elastic['baseline']['register_plus_answer_s']:.1f} s to register the {elastic['tokens']:,}-token "
        "context again; `add_shards` + `rebalance` move its segment onto a new shard",
        f"built-in model, {elastic['context_shards']} shards + {elastic['expert_groups']} groups, store on local "
        f"disk; {_cores(elastic)}", "[benchmarks](docs/benchmarks.md#a-context-shard-lost-for-good)"))

    eplb = _load("eplb.json")
    best = min((r for r in eplb["runs"] if r["model"] == "built-in"), key=lambda r: r["max_balancedness_after"])
    rows.append(_row(
        "Experts balanced while serving (EPLB)",
        f"balancedness (max/mean rows per group) per MoE layer from {_range(best['balancedness_before'])} to "
        f"{_range(best['balancedness_after'])} with {best['redundant_per_layer']} expert copies a layer, "
        f"{_same(best['same_tokens'], 'tokens')}; the batch-32 step {best['step_ratio_after_over_before']:.2f}x "
        "as long (four groups on two shared cores)",
        f"built-in model (8 experts top-1), {eplb['expert_groups']} expert groups; planned on KJV text, measured on "
        "the Debian Reference; 2-core CPU VM",
        "[faults](docs/faults.md#expert-groups-that-change-balance_experts-add_groups-remove_groups)"))

    runs = {r["routers"]: r["failover"] for r in routers["runs"]}
    rows.append(_row(
        "Several routers",
        f"a request whose router is killed under it finishes {_s(runs[2]['extra_s'])} late with 2 routers, "
        f"{_s(runs[1]['extra_s'])} with 1; {_same(runs[2]['same_tokens'] and runs[1]['same_tokens'], 'tokens')}",
        f"built-in model, {routers['context_tokens'] // 1024}K-token context; {_cores(routers)}",
        "[benchmarks](docs/benchmarks.md#several-routers)"))

    s = shared["summary"]
    rows.append(_row(
        "Two meshes on one store (a RayService upgrade)",
        f"a context registered by one is answered by the other at once ({_s(s['other_first_answer_s']['median'])}) "
        f"and listed after {_s(s['other_lists_it_after_s']['median'])} (median of {len(shared['trials'])})",
        f"{_model(shared)}, {shared['context_tokens']:,}-token contexts; {_cores(shared)}{_when(shared)}",
        "[benchmarks](docs/benchmarks.md#two-meshes-on-one-store)"))

    found = {}
    for suffix in ("passkey_kjv", "multikey_kjv", "passkey_1m_kjv"):
        for r in (_report(suffix) or {}).get("results", []):
            found[(suffix, r["length"])] = r
    cell = lambda suffix, n: (f"{found[(suffix, n)]['correct']}/{found[(suffix, n)]['samples']}"
                              if (suffix, n) in found else "-")
    rows.append(_row(
        "Retrieval by the built-in model (held-out text)",
        f"passkey {cell('passkey_kjv', 4096)} at ~4K, {cell('passkey_kjv', 32768)} at ~32K, "
        f"{cell('passkey_kjv', 131072)} at ~128K, {cell('passkey_1m_kjv', 1048576)} at ~1M (blockwise); "
        f"multi-key {cell('multikey_kjv', 32768)} at ~32K (target {TARGET['multikey']:.0%}: "
        + ("met)" if (mk := found.get(("multikey_kjv", 32768))) and mk["accuracy"] >= TARGET["multikey"]
           else "**not met**)"),
        "the 15 MB built-in model on the King James Bible (never trained on), exact registration, greedy; "
        f"{CPU}", "[training](docs/training.md#the-built-in-model)"))

    rows.append(_row(
        "Training on Ray Train",
        f"{train['ray_train']['tokens_per_s']:,.0f} tokens/s, {train['ray_over_plain']:.2f}x a plain PyTorch loop "
        f"(target {train['target']}x: {'met' if train['ray_over_plain'] >= train['target'] else '**not met**'})",
        f"built-in architecture, 1 worker, 1 torch thread a side; {_cores(train)}{_when(train)}",
        "[benchmarks](docs/benchmarks.md#training)"))

    f = next(x for x in plane["formation"] if x["socket"] == "tcp")
    med = {side: statistics.median(run["decode_b1_ms"] for run in plane["decode"]["runs"][side])
           for side in ("before", "after")}
    rows.append(_row(
        "An authenticated, pickle-free data plane",
        f"+{f['extra_ms']:.2f} ms to form a group of {f['actors']} actors (HMAC handshake); decode step "
        f"{_x(med['after'] / med['before'])} the unauthenticated, pickled one (median of "
        f"{len(plane['decode']['runs']['after'])} runs)",
        f"built-in model, 2 shards + 2 groups; {_cores(plane)}{_when(plane)}",
        "[benchmarks](docs/benchmarks.md#the-secure-data-planes-cost)"))

    feat = _load("serving_features.json")
    over = feat["overhead_vs_plain"]
    rows.append(_row(
        "A real model through the mesh, log-probabilities, structured output",
        "logits within 2e-4 of Hugging Face's, the same greedy chat answers and echo log-probabilities over HTTP "
        f"(`tests/pipelines/test_upcycle.py`); a batch-16 step costs +{over['logprobs'] * 100:.1f}% with "
        f"logprobs, +{over['grammar'] * 100:.1f}% with a JSON schema (target 10%: "
        f"{'met' if max(over.values()) <= 0.10 else '**not met**'})",
        f"SmolLM2-135M-Instruct (PyPI GGUF) upcycled to 4 experts top-2, fp32, a {feat['context_tokens']:,}-token "
        f"context, 16 requests; {CPU}, {feat['date']}",
        "[api](docs/api.md#http-api)"))
    return "\n".join(rows)
