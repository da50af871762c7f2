"""Train from a training YAML in one process, without Ray: the same model, data, step code
(expertmesh.pipelines.train_step) and output layout as `expertmesh train`.

For a GPU machine where Ray cannot be installed (the device machines lent to this project have
PyTorch and pyarrow but no Ray, and Ray's wheel is larger than what a call can carry; see
scripts/no_ray.py).
Row groups (one sequence length each) are visited in a shuffled order every epoch.

    python scripts/train_plain.py --config configs/demo-model-v2.yaml --data data/demo-train-v2 \
        --output runs/demo-model-v2/round1 --time-limit-s 500
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import no_ray  # noqa: E402,F401  (a stand-in `ray` where Ray is missing: the package init imports it)

from expertmesh.pipelines import train_step as ts  # noqa: E402
from expertmesh.pipelines.train import MODEL_FILES  # noqa: E402
from expertmesh.pipelines.train_config import TrainConfig  # noqa: E402


def batches(data: str, batch_size: int, seed: int):
    """Batches of `batch_size` rows from one row group at a time, row groups shuffled per epoch."""
    groups = [(f, g) for f in sorted(Path(data).glob("*.parquet")) for g in range(pq.ParquetFile(f).num_row_groups)]
    if not groups:
        raise FileNotFoundError(f"no Parquet files under {data} (write them with `expertmesh data --out {data}`)")
    rng = random.Random(seed)
    files: dict[Path, pq.ParquetFile] = {}
    while True:
        rng.shuffle(groups)
        for f, g in groups:
            pf = files.setdefault(f, pq.ParquetFile(f))
            table = pf.read_row_group(g, columns=["input_ids", "answer_start", "answer_len"])
            ids = table.column("input_ids").combine_chunks()
            values, offsets = ids.values.to_numpy(), ids.offsets.to_numpy()  # no Python ints per token
            rows = [values[offsets[i]:offsets[i + 1]] for i in range(len(ids))]
            starts = table.column("answer_start").to_numpy()
            lens = table.column("answer_len").to_numpy()
            for s in range(0, table.num_rows - batch_size + 1, batch_size):
                yield {"input_ids": rows[s:s + batch_size], "answer_start": starts[s:s + batch_size],
                       "answer_len": lens[s:s + batch_size]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data")
    p.add_argument("--output")
    p.add_argument("--init-from", dest="init_from")
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--time-limit-s", dest="time_limit_s", type=float)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("data", "output", "init_from", "max_steps", "time_limit_s")}
    cfg = TrainConfig.from_yaml(args.config, **overrides)
    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker)))
    core = ts.build_model(cfg).to(device)
    optimizer = ts.make_optimizer(core, cfg)
    model = ts.BatchedModel(core)
    began = time.monotonic()
    window, since, load = [], time.perf_counter(), np.zeros(core.cfg.num_experts, dtype=np.int64)
    step, metrics = 0, {}
    for batch in batches(cfg.data, cfg.batch_size, cfg.seed):
        res = ts.step(model, core, optimizer, ts.collate(batch), cfg, step, device)
        window.append(res)
        if len(res.expert_tokens):
            load += res.expert_tokens
        step += 1
        out_of_time = cfg.time_limit_s is not None and time.monotonic() - began > cfg.time_limit_s
        last = step >= cfg.max_steps or out_of_time
        if step % cfg.log_every == 0 or last:
            mean = lambda k: float(np.mean([getattr(r, k) for r in window]))  # noqa: E731
            metrics = {"step": step, **{k: mean(k) for k in ("loss", "answer_loss", "lm_loss", "aux_loss", "z_loss",
                                                             "answer_accuracy")},
                       "tokens_per_s": sum(r.tokens for r in window) / max(1e-9, time.perf_counter() - since),
                       "expert_load_max_over_mean": float(load.max() / load.mean()) if load.sum() else 0.0}
            print("[expertmesh.train] " + json.dumps(metrics), flush=True)
            window, since = [], time.perf_counter()
        if last:
            break
    if cfg.output:
        out = Path(cfg.output)
        ts.save_state(core.float(), optimizer, step, out, extra={"metrics": metrics})
        for extra in ("optimizer.safetensors", "trainer_state.json"):
            (out / extra).unlink(missing_ok=True)
        (out / "training.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=1))
        assert all((out / name).is_file() for name in MODEL_FILES)
    print(json.dumps({"steps": step, "seconds": round(time.monotonic() - began, 1), "output": cfg.output,
                      "metrics": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
