"""Training throughput: Ray Train (TorchTrainer, 1 worker) vs a plain single-process PyTorch loop.

Same model (the default architecture), same Parquet data, same step code (train_step.step),
same checkpoints (train_step.save_state every `checkpoint_every` steps), same machine, same run,
same torch thread count (1, the worker's CPU share). Throughput is total tokens over total wall
time from the end of step `warmup` to the end of the last step: data loading, reports and the
checkpoints written in between included on both sides (the final checkpoint, after the last
step, on neither). On the Ray Train side that is the sum of the run's report windows, which tile
the wall time (expertmesh.pipelines.train._Window). Also reports the expert load balance
(tokens per expert, mean and max) at the end of the run. Writes benchmarks/results/train.json.

    python benchmarks/bench_train.py [--steps 30] [--batch 2] [--length 1024] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from expertmesh.pipelines import train_step as ts
from expertmesh.pipelines.train_config import TrainConfig
from expertmesh.pipelines.train_data import DataSpec, write_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def plain_loop(cfg: TrainConfig, warmup: int) -> dict:
    """The baseline: read the Parquet row groups in order, collate, step; no Ray."""
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    core = ts.build_model(cfg)
    opt = ts.make_optimizer(core, cfg)
    model = ts.BatchedModel(core)
    files = sorted(Path(cfg.data).glob("*.parquet"))
    step, tokens, t0, load, checkpoints = 0, 0, None, None, 0
    ckpt_dir = Path(tempfile.mkdtemp(prefix="bench-train-plain-"))
    while step < cfg.max_steps:
        for f in files:
            table = pq.read_table(f, columns=["input_ids", "answer_start", "answer_len"])
            for start in range(0, table.num_rows - cfg.batch_size + 1, cfg.batch_size):
                batch = table.slice(start, cfg.batch_size).to_pydict()
                res = ts.step(model, core, opt, ts.collate(batch), cfg, step, torch.device("cpu"))
                tokens += res.tokens
                load = res.expert_tokens if load is None else load + res.expert_tokens
                step += 1
                if step == warmup:
                    t0, tokens = time.perf_counter(), 0
                if step >= cfg.max_steps:
                    break
                if step % cfg.checkpoint_every == 0:  # as the Ray Train loop does (rank 0)
                    ts.save_state(core, opt, step, ckpt_dir / f"step-{step}", extra={"metrics": {}})
                    checkpoints += int(t0 is not None)
            if step >= cfg.max_steps:
                break
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "steps_timed": cfg.max_steps - warmup, "checkpoints_timed": checkpoints,
            "expert_load_mean": float(load.mean()), "expert_load_max": float(load.max())}


def ray_train(cfg: TrainConfig, warmup: int) -> dict:
    from expertmesh.pipelines.train import run

    result = run(cfg)
    states = []
    for f in Path(result.path).rglob("trainer_state.json"):
        states.append(json.loads(f.read_text())["metrics"])
    states.sort(key=lambda m: m["step"])
    timed = [m for m in states if m["step"] > warmup]
    assert timed and timed[0]["step"] - cfg.log_every == warmup, "the timed windows start at step `warmup`"
    tokens = sum(m["tokens"] for m in timed)
    seconds = sum(m["window_s"] for m in timed)  # windows tile the wall time (reports, checkpoints included)
    last = states[-1]
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "steps_timed": cfg.max_steps - warmup, "windows": len(timed),
            "checkpoints_timed": len(timed), "final_loss": last["loss"],
            "expert_load_mean": last["expert_load_mean"], "expert_load_max": last["expert_load_max"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the faster counts")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = tmp / "data"
    write_dataset(data, DataSpec(rows=args.steps * args.batch + 64, lengths=(args.length,),
                                 group_rows=args.batch, seed=0), files=2)
    def config(i: int) -> TrainConfig:
        return TrainConfig.from_dict({
            "data": str(data), "name": f"bench-{i}", "storage_path": str(tmp / "runs"), "num_workers": 1,
            "cpus_per_worker": 1, "batch_size": args.batch, "max_steps": args.steps, "lr": 1e-3,
            "warmup_steps": 5, "checkpoint_every": args.warmup, "log_every": args.warmup, "num_to_keep": 1000})

    load_before = os.getloadavg()
    plains, rays = [], []
    for i in range(args.repeats):  # alternate, so both sides see the machine's load alike
        plains.append(plain_loop(config(i), args.warmup))
        print(f"plain loop : {plains[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
        rays.append(ray_train(config(i), args.warmup))
        print(f"Ray Train  : {rays[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    plain = dict(max(plains, key=lambda r: r["tokens_per_s"]), runs_tokens_per_s=[r["tokens_per_s"] for r in plains])
    ray_res = dict(max(rays, key=lambda r: r["tokens_per_s"]), runs_tokens_per_s=[r["tokens_per_s"] for r in rays])
    ratio = ray_res["tokens_per_s"] / plain["tokens_per_s"]
    print(f"ratio      : {ratio:.2f}x (target >= 0.9x); expert load at the end: "
          f"mean {ray_res['expert_load_mean']:.0f} / max {ray_res['expert_load_max']:.0f} tokens per expert")
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch_threads": 1,
           "repeats": args.repeats, "statistic": "the faster of the alternating repeats, on each side",
           "model": "default architecture (4 layers, hidden 128, 8 experts top-1)", "batch": args.batch,
           "length": args.length, "steps": args.steps, "warmup": args.warmup,
           "checkpoint_every": args.warmup, "measure": "total tokens / total wall time, steps warmup+1..last",
           "loadavg_1_5_15min": {"before": load_before, "after": os.getloadavg()},
           "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "plain_loop": plain, "ray_train": ray_res, "ray_over_plain": round(ratio, 3), "target": 0.9}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
