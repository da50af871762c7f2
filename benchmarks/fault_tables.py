"""The fault tables: hosts lost and added (multi_host.json: docs/faults.md), a shard lost under a
1M-token context (elastic.json), several routers (routers.json), micro-batch ping-pong
(micro_batches.json) and two meshes on one store (shared_store.json: docs/benchmarks.md); the chaos
soak (soak.json: docs/faults.md)."""

from __future__ import annotations

from table_format import _load, _s


def multi_host() -> str:
    r = _load("multi_host.json")
    p = r["placement"]
    lines = [f"Placement (Ray resources): router on {p['router']}, context shards on {', '.join(p['shards'])}, "
             f"expert groups on {', '.join(p['groups'])}; data plane `{r['transport']}` over TCP between hosts; "
             f"max |logits - single process| {r['exact_over_tcp']:.1e}.", "",
             "| host killed mid-stream (SIGKILL of every process, no replacement) | stream | served again after "
             "| of which: forming the data plane without it | Ray reported the actor not alive after "
             "| max abs logit diff after (vs single process) |", "|---|---|---|---|---|---|"]
    loaded = r["expert_host_killed"]["experts_loaded_s"]
    for key, what in (("shard_host_killed", "context shard host (its segment served from the store by the other shard)"),
                      ("expert_host_killed", f"expert group host (its experts loaded from the checkpoint by the other "
                                             f"group, in {loaded * 1000:.0f} ms)")):
        k = r[key]
        lines.append(f"| {what} | {k['stream']} | {_s(k['served_again_s'])} | {_s(k['group_formation_s'])} "
                     f"| {_s(k['ray_reported_s'])} | {k['max_abs_diff']:.1e} |")
    rep = r["replacement"]
    lines += ["", f"A new context registered while the shard host was down went to shard(s) "
              f"{r['new_context_while_down']}. A replacement host joined {_s(rep['host_joined_s'])} after `ray start`; "
              f"the shard restarted on it ({rep['shard_on']}) and served its segment again "
              f"{_s(rep['handed_back_s'])} after the host was started (max abs logit diff {rep['max_abs_diff']:.1e})."]
    n = r["added_shard_host"]
    lines += ["", f"A shard host added to the running mesh: it joined the cluster in {_s(n['host_joined_s'])}, "
              f"`add_shards(1)` started shard {n['indices'][0]} on it ({n['shard_on']}) in {_s(n['shard_started_s'])}, "
              f"and `rebalance()` moved {len(n['moved'])} segment(s) ({sum(m[0] for m in n['moved'])} tokens) in "
              f"{_s(n['rebalance_s'])}: tokens per shard {n['tokens_before']} -> {n['tokens_after']} (max abs logit "
              f"diff after {n['max_abs_diff']:.1e})."]
    v = r["serve_through_shard_host_kill"]
    lines += ["", f"Serve (its replica on the head) through the loss of a shard host, no replacement: the HTTP "
              f"stream in flight ended with status {v['status']} {_s(v['stream_done_s'])} after the kill, "
              f"{'the same text' if v['same_text'] else 'OTHER text'}; the next request: status {v['after_status']} "
              f"in {_s(v['after_s'])}, {'the same text' if v['after_same_text'] else 'OTHER text'}."]
    k = r["router_host_killed"]
    lines += ["", f"The router's host killed with a request in flight through `Mesh.generate` and a replacement "
              f"host declaring `router` joining ({_s(k['replacement_joined_s'])}): Ray reported the router not "
              f"alive after {_s(k['ray_reported_s'])}; it restarted on the new host ({k['router_on']}) and the "
              f"request, run again, finished {_s(k['served_again_s'])} after the kill: {k['result']} (max abs "
              f"logit diff after {k['max_abs_diff']:.1e})."]
    c = r.get("shard_host_link_cut")
    if c:
        lines += ["", f"A shard host's link cut mid-stream (its bridge port down: its processes alive, no connection "
                  f"reset; no host to replace it): Ray declared the host dead after {_s(c['ray_reported_s'])} (the "
                  f"chart's detection); the router's step watch cut the stalled member then, the other shards took "
                  f"its segments from the store, and the stream went on: {c['stream']}, served again "
                  f"{_s(c['served_again_s'])} after the cut (max abs logit diff after {c['max_abs_diff']:.1e}; "
                  f"before the watch, the step waited out its 120 s timeout and failed)."]
    return "\n".join(lines)


def elastic() -> str:
    r = _load("elastic.json")
    b, t, rb = r["baseline"], r["takeover"], r["rebalance"]
    seg = r["segments"][1]["tokens"]
    return "\n".join([
        f"{r['tokens']:,}-token context (blockwise, {r['kv_dtype']} KV, the built-in model), "
        f"{r['context_shards']} context shards + {r['expert_groups']} expert groups, store on local disk; "
        f"shard 1 ({seg:,} tokens) killed for good; {r['machine']}:", "",
        "| | seconds | answer |", "|---|---|---|",
        f"| baseline: register the context again + first answer | {b['register_plus_answer_s']:.1f} "
        f"| {b['answer']['answer'].strip()!r} |",
        f"| exact answer, all pages hot (before the kill) | {r['hot_answer']['wall_s']:.2f} "
        f"| {r['hot_answer']['answer'].strip()!r} |",
        f"| kill -> Ray reports the shard not alive | {t['ray_reported_s']:.2f} | |",
        f"| kill -> answered again (a running shard opens the segment, reads its pages from the store) "
        f"| {t['served_again_s']:.2f} | {t['answer']['answer'].strip()!r} (same: {t['same_answer']}) |",
        f"| next answer (pages hot on the stand-in) | {t['next_answer_s']:.2f} | {t['next_answer']['answer'].strip()!r} |",
        f"| `add_shards(1)` | {rb['add_shards_s']:.2f} | |",
        f"| `rebalance()`: {len(rb['moved'])} segment(s) moved, tokens per shard {rb['tokens_before']} -> "
        f"{rb['tokens_after']} | {rb['rebalance_s']:.2f} | |",
        f"| first answer after the rebalance | {rb['first_answer_s']:.2f} | {rb['answer']['answer'].strip()!r} "
        f"(same: {rb['same_answer']}) |", "",
        f"Serving the lost shard's segment again took {r['ratios']['register_plus_answer_vs_takeover']:.0f}x less "
        f"time than registering the context again."])


def routers() -> str:
    r = _load("routers.json")
    lines = ["| routers | decode: 32 requests x 32 tokens, tokens/s | steps per router (mean step) | one request of 384 "
             "tokens: undisturbed | its router killed under it | extra | same tokens |", "|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        t, f = run["throughput"], run["failover"]
        steps = ", ".join(f"{p['steps']} ({p['mean_step_s'] * 1000:.0f} ms)" for p in t["per_router"])
        lines.append(f"| {run['routers']} | {t['tokens_per_s']:.0f} | {steps} | {_s(f['undisturbed_s'])} "
                     f"| {_s(f['with_kill_s'])} | {_s(f['extra_s'])} | {f['same_tokens']} |")
    x = r["ratios"]
    lines += ["", f"Throughput with 2 routers is {x['tokens_per_s_r2_vs_r1']:.2f}x that with 1 on this machine "
              f"({r['machine']}, shared by every actor: no scaling can show here); the extra latency of a request "
              f"whose router dies is {x['failover_extra_r2_vs_r1']:.2f}x as long with 2 routers (it runs again on the "
              f"other at once, while the killed one restarts on the same cores) as with 1 (it waits for the restart)."]
    return "\n".join(lines)


def shared_store() -> str:
    r = _load("shared_store.json")
    s, names = r["summary"], {
        "register_s": "A registers a context",
        "own_answer_s": "A's first answer over it (baseline)",
        "other_first_answer_s": "B's first answer over it, right after A's registration returned (logits equal "
                                "A's: the benchmark checks it)",
        "other_lists_it_after_s": "until B's `contexts()` lists a context B was never asked about",
        "other_refuses_drop_after_s": "after A drops a context: until B refuses it (`ContextNotFound`)"}
    lines = ["| two meshes, one store | median | max |", "|---|---|---|"]
    lines += [f"| {what} | {_s(s[k]['median'])} | {_s(s[k]['max'])} |" for k, what in names.items()]
    lines += ["", f"{len(r['trials'])} trials, {r['context_tokens']:,}-token contexts, {r['model']} model, "
              f"{r['layout']}, one Ray cluster; run of {r['date']}. B's first answer takes "
              f"{r['ratios']['other_first_answer_over_own']:.2f}x A's own (it reads the manifest on the miss). "
              f"Listing and drops travel through the store: while another mesh is live, each mesh re-reads the directory every "
              f"{r['sync_s']:g} s, so the bound is two periods ({2 * r['sync_s']:g} s: a re-read in flight when the "
              f"change lands, then the next); a dropped context's files outlive the drop by {r['grace_s']:g} s while "
              f"another mesh is live, so none answers over deleted files meanwhile."]
    return "\n".join(lines)


def micro_batches() -> str:
    r = _load("micro_batches.json")
    lines = ["| layout | batch | micro_batches | decode tokens/s | mean step | waiting for shards / groups per step "
             "| on/off | same tokens |", "|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        for b, m in run["batches"].items():
            w = m["wait_per_step_s"]
            ratio = r["ratios"][f"{run['layout']} batch {b}: tokens/s on/off"] if run["micro_batches"] == 2 else None
            same = r["same_tokens_on_and_off"][f"{run['layout']} batch {b}"] if run["micro_batches"] == 2 else ""
            lines.append(f"| {run['layout']} ({run['shards']}+{run['groups']}) | {b} | {run['micro_batches']} "
                         f"| {m['tokens_per_s']:.0f} | {m['mean_step_s'] * 1000:.1f} ms "
                         f"| {w['shards'] * 1000:.1f} / {w['expert_groups'] * 1000:.1f} ms "
                         f"| {'' if ratio is None else f'{ratio:.2f}x'} | {same} |")
    lines += ["", f"{r['context_tokens']:,}-token shared context, {r['new_tokens']} new tokens per request, "
              f"{r['statistic']} of {r['repeats']}; {r['machine']}, 1-minute load average {r['loadavg'][0]:.1f} "
              f"after the run. With 2 micro-batches the waits are both halves' and include a half waiting for "
              f"its turn while the other's exchange is out."]
    return "\n".join(lines)


def soak() -> str:
    r = _load("soak.json")
    gib = 2 ** 30
    lines = [f"{r['minutes']:g} minutes, {r['clients']} clients streaming back to back over a shared context "
             f"(greedy, seeded, unseeded in turn), a fault every {r['every_s']:g} s; {r['machine']}, {r['date']}:", "",
             "| requests | answered right | refused before their first token | cut mid-stream | wrong | longest gap "
             "between tokens | memory of the mesh's processes, start -> end | actor processes left after shutdown |",
             "|---|---|---|---|---|---|---|---|",
             f"| {r['requests']} | {r['right']} | {r['refused']} | {r['cut']} | {r['wrong']} | "
             f"{_s(r['longest_gap_s'])} | {r['memory_start_bytes'] / gib:.2f} -> {r['memory_end_bytes'] / gib:.2f} "
             f"GiB | {len(r['left_after_shutdown']) or 'none'} |", "",
             "| fault | at | back after | requests in flight then (their outcomes) | their longest gap between tokens "
             "| begun while it ran and not answered right | requests begun in the minute after | what |",
             "|---|---|---|---|---|---|---|---|"]
    for f in r["faults"]:
        what = f.get("error") or "; ".join(filter(None, [
            f"host {f['host']}" if "host" in f else "",
            f"Ray declared it dead after {_s(f['ray_declared_dead_s'])}" if "ray_declared_dead_s" in f else "",
            f"restarted on new host {f['replaced_by']}" if "replaced_by" in f else "",
            f"shard {f['added'][0]} started there, rebalance moved {f['moved']} segment(s)" if "added" in f else "",
            f"shard {f['removed']} taken out, {f['moved']} segment(s) moved off" if "removed" in f else "",
            f"started again after {_s(f['head_started_s'])}, Ray's state API back after {_s(f['state_api_back_s'])}"
            if "head_started_s" in f else "",
            f"Ray reports it {f['state']}" if "state" in f and "head_started_s" not in f else
            (f"{f['state']}" if "state" in f else "")]))
        seen = ", ".join(f"{n} {k}" for k, n in sorted(f.get("in_flight_outcomes", {}).items()))
        bad = ", ".join(f"{n} {k}" for k, n in sorted(f.get("not_right_begun_while_it_ran", {}).items())) or "none"
        lines.append(f"| {f['fault']} | {f['at_s']:.0f} s | {_s(f['took_s'])} | {f['requests_in_flight']}"
                     f"{f' ({seen})' if seen else ''} | {_s(f['longest_gap_in_flight_s'])} | {bad} "
                     f"| {f['requests_in_the_minute_after']} | {what} |")
    return "\n".join(lines)
