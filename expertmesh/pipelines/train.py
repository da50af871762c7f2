"""Training on Ray Train: `python -m expertmesh.pipelines.train --config CONFIG.yaml`.

A `TorchTrainer` runs `train_loop_per_worker` on `num_workers` workers (DDP over NCCL on
GPUs, gloo on CPUs). Input comes through Ray Data from Parquet (`expertmesh data` writes
it); each worker reads its own split. Every `checkpoint_every` steps rank 0 writes a Hugging
Face-layout checkpoint (plus optimizer state) and reports it; a run whose worker dies is
restarted by Ray Train (`FailureConfig(max_failures)`) from the last checkpoint. At the end
the last checkpoint's model is copied to `output`, which `Mesh.start(checkpoint=...)` and
`transformers` load directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from expertmesh.pipelines.train_config import TrainConfig

MODEL_FILES = ("config.json", "model.safetensors")
STATE_FILES = ("optimizer.safetensors", "trainer_state.json")  # with the model: what resume_from needs


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build the model, resume if a checkpoint exists, step through data."""
    import ray.train
    import ray.train.torch

    from expertmesh.pipelines import train_step as ts

    cfg = TrainConfig.from_dict(config)
    _quiet_ray_train_console()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker)))
    core = ts.build_model(cfg).to(device)
    optimizer = ts.make_optimizer(core, cfg)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # this run's own (a restarted worker): it wins over resume_from
        with checkpoint.as_directory() as d:
            start = ts.load_state(core, optimizer, d, device)
        if rank == 0:
            _log_line(f"[expertmesh.train] resumed from step {start} ({checkpoint.path})")
    elif cfg.resume_from:
        start = ts.load_state(core, optimizer, cfg.resume_from, device)
        if rank == 0:
            _log_line(f"[expertmesh.train] continued from step {start} ({cfg.resume_from})")
    model = ts.BatchedModel(core)
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy_kwargs={"find_unused_parameters": True})
    shard = ray.train.get_dataset_shard("train")
    bar = _progress(rank, cfg.max_steps, start)
    window = _Window(core.cfg.num_experts)
    step_index = start
    began, out_of_time = time.monotonic(), False
    while step_index < cfg.max_steps:
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
                                        prefetch_batches=2):
            t0 = time.perf_counter()
            res = ts.step(model, core, optimizer, ts.collate(batch), cfg, step_index, device)
            window.add(res, time.perf_counter() - t0)
            step_index += 1
            bar.update(1)
            out_of_time = _out_of_time(cfg, began, world, device)
            last = step_index >= cfg.max_steps or out_of_time
            if step_index % cfg.log_every == 0 or step_index % cfg.checkpoint_every == 0 or last:
                metrics = {**window.metrics(step_index, world), "resumed_from": start}
                if rank == 0:
                    bar.set_description(f"loss {metrics['loss']:.3f} acc {metrics['answer_accuracy']:.2f} "
                                        f"{metrics['tokens_per_s']:.0f} tok/s")
                    _log_line("[expertmesh.train] " + json.dumps(metrics))
                if step_index % cfg.checkpoint_every == 0 or last:
                    _report_with_checkpoint(core, optimizer, step_index, metrics, rank)
                else:
                    ray.train.report(metrics)
                window.reset()
            if last:
                break
        if out_of_time:
            break
    bar.close()


def _log_line(line: str) -> None:
    """One line on the worker's stdout (the driver prints it once, above the progress bar)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _BelowWarningFromRayTrain(logging.Filter):
    """Console filter: drops Ray Train's own INFO records (e.g. "Reporting training result N: ..."
    at every report, logged by a module logger that `LoggingConfig.log_level` does not cover);
    Ray Train's log files keep them."""

    _PATH = f"{os.sep}ray{os.sep}train{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self._PATH not in record.pathname


def _quiet_ray_train_console() -> None:
    for handler in logging.getLogger().handlers:  # the worker's root logger, as Ray Train set it up
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and not any(isinstance(f, _BelowWarningFromRayTrain) for f in handler.filters):
            handler.addFilter(_BelowWarningFromRayTrain())


def _out_of_time(cfg: TrainConfig, began: float, world: int, device: torch.device) -> bool:
    """Whether the time limit has passed, agreed by all workers (they must stop at the same step)."""
    if cfg.time_limit_s is None:
        return False
    flag = torch.tensor([float(time.monotonic() - began > cfg.time_limit_s)], device=device)
    if world > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _report_with_checkpoint(core, optimizer, step_index: int, metrics: dict, rank: int) -> None:
    import ray.train

    from expertmesh.pipelines import train_step as ts

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:  # one copy of the (replicated) weights
            ts.save_state(core, optimizer, step_index, tmp, extra={"metrics": metrics})
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


class _Window:
    """Metrics over the steps since the last report. Windows tile the wall time: a window runs
    from one `metrics()` call to the next, so the report and checkpoint written after a window
    count in the next one (the last report's own time is in none)."""

    def __init__(self, experts: int) -> None:
        self.experts = experts
        self.since = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.results, self.seconds = [], 0.0
        self.load = np.zeros(self.experts, dtype=np.int64)

    def add(self, res, seconds: float) -> None:
        self.results.append(res)
        self.seconds += seconds
        if len(res.expert_tokens):
            self.load += res.expert_tokens

    def metrics(self, step_index: int, world: int) -> dict:
        rs = self.results or []
        mean = (lambda k: float(np.mean([getattr(r, k) for r in rs]))) if rs else (lambda k: float("nan"))
        tokens = sum(r.tokens for r in rs) * world
        now = time.perf_counter()
        wall, self.since = now - self.since, now
        load = self.load
        return {"step": step_index, "loss": mean("loss"), "answer_loss": mean("answer_loss"),
                "lm_loss": mean("lm_loss"), "aux_loss": mean("aux_loss"), "z_loss": mean("z_loss"),
                "answer_accuracy": mean("answer_accuracy"),
                # wall time since the last window ended: data loading, reports, checkpoints included
                "tokens": tokens, "window_s": wall, "tokens_per_s": tokens / max(1e-9, wall),
                "expert_load_mean": float(load.mean()) if load.sum() else 0.0,
                "expert_load_max": float(load.max()) if load.sum() else 0.0,
                "expert_load_max_over_mean": float(load.max() / load.mean()) if load.sum() else 0.0}


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_description(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(rank: int, total: int, start: int):
    """A progress bar in the driver's terminal (Ray's tqdm), from rank 0 only."""
    if rank != 0:
        return _NoBar()
    from ray.experimental import tqdm_ray

    bar = tqdm_ray.tqdm(total=total, desc="training")
    bar.update(start)
    return bar


def run(cfg: TrainConfig, address: str | None = None):
    """Fit with Ray Train; copy the final model to `cfg.output`. Returns the Ray Train Result."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():  # a Ray Job's driver joins its cluster (RAY_ADDRESS); else a local one
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or "auto")  # a job's runtime_env is the job's
        else:
            ray.init(address="local", runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    _check_cpus_left_for_data(cfg, ray.cluster_resources().get("CPU", 0.0))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the terminal shows one bar: training steps
    ctx.print_on_execution_start = False
    data = ray.data.read_parquet(_data_path(cfg.data)).select_columns(["input_ids", "answer_start", "answer_len"])
    for key in ("init_from", "resume_from"):  # workers run elsewhere: absolute paths
        value = getattr(cfg, key)
        if value and "://" not in value:
            setattr(cfg, key, str(Path(value).expanduser().resolve()))
    if cfg.resume_from and "://" not in cfg.resume_from:
        missing = [n for n in STATE_FILES if not (Path(cfg.resume_from) / n).is_file()]
        if missing:
            raise FileNotFoundError(f"resume_from {cfg.resume_from} lacks {missing}: it must be a "
                                    "state_output of an earlier run")
    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).expanduser().resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=None if cfg.use_gpu else {"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             # the terminal shows the bar and one metrics line per log interval:
                             # Ray Train's INFO lines go to its log files only, and workers' prints
                             # are not also routed through Ray Train's logger (which printed them twice)
                             logging_config=LoggingConfig(log_level="WARNING"),
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
        datasets={"train": data},
    )
    result = trainer.fit()
    if cfg.output and result.checkpoint is not None:
        export(result.checkpoint, cfg.output)
    if cfg.state_output and result.checkpoint is not None:
        export(result.checkpoint, cfg.state_output, names=MODEL_FILES + STATE_FILES)
    return result


def _check_cpus_left_for_data(cfg: TrainConfig, cluster_cpus: float) -> None:
    """CPU workers that reserve every CPU leave none for Ray Data's read tasks: the run would
    wait for its first batch forever. Refuse it at once, saying what to set."""
    if cfg.use_gpu:
        return
    reserved = cfg.num_workers * cfg.cpus_per_worker
    if reserved >= cluster_cpus:
        raise ValueError(
            f"the training workers would reserve {reserved:g} of the cluster's {cluster_cpus:g} CPUs "
            f"(num_workers {cfg.num_workers} x cpus_per_worker {cfg.cpus_per_worker:g}), leaving none for "
            "Ray Data's reads: the run would never get its first batch. Reserve fewer "
            "(num_workers x cpus_per_worker < the cluster's CPUs) and set threads_per_worker to give "
            "each worker more torch threads than the CPUs it reserves")


def _data_path(path: str) -> str:
    if "://" in path:
        return path
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"training data {p} does not exist (write it with `expertmesh data --out {path}`)")
    return str(p)


def export(checkpoint, output: str, names: tuple[str, ...] = MODEL_FILES) -> str:
    """Copy the model files of a Ray Train checkpoint to `output`: a directory, or a URI
    (`s3://`, `gs://`, ... through pyarrow.fs) that `Mesh.start(checkpoint=...)` reads back.
    With `names=MODEL_FILES + STATE_FILES`, the optimizer state and step too (a `resume_from`)."""
    with checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "trainer_state.json").read_text())
        summary = json.dumps({"step": state["step"], "metrics": state.get("metrics")}, indent=1).encode()
        files = {name: (Path(d) / name).read_bytes() for name in names}
    files["training.json"] = summary
    if "://" in output and not output.startswith("file://"):
        from expertmesh.model import checkpoint as ckpt

        fs, root = ckpt.open_filesystem(output)
        fs.create_dir(root, recursive=True)
        for name, data in files.items():
            with fs.open_output_stream(f"{root.rstrip('/')}/{name}") as f:
                f.write(data)
        return output
    out = Path(output.removeprefix("file://")).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return str(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training YAML (see configs/)")
    p.add_argument("--data", help="override the config's data path")
    p.add_argument("--name", help="override the config's run name (Ray Train resumes a run of the same name "
                                  "and storage path from its last checkpoint)")
    p.add_argument("--output", help="override where the final checkpoint goes")
    p.add_argument("--init-from", dest="init_from", help="fine-tune from this checkpoint")
    p.add_argument("--resume-from", dest="resume_from",
                   help="continue a run (weights, optimizer state, step) from an earlier --state-output")
    p.add_argument("--state-output", dest="state_output",
                   help="also copy the final training state (model, optimizer, step) here, to continue later")
    p.add_argument("--num-workers", dest="num_workers", type=int, help="override the config's num_workers")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="override the config's max_steps")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="override the config's batch_size")
    p.add_argument("--storage-path", dest="storage_path", help="override Ray Train's storage path")
    p.add_argument("--time-limit-s", dest="time_limit_s", type=float, help="stop after this many seconds of training")
    p.add_argument("--lr", type=float, help="override the config's peak learning rate")
    p.add_argument("--train-only", dest="train_only", action="append",
                   help="train only parameters whose name starts with this prefix (repeatable); the rest stays frozen")
    p.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None, help="train on GPUs")
    p.add_argument("--address", default=None, help="Ray address to join ('auto' or URL); default: as Ray Jobs sets it, else local")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m expertmesh.pipelines.train", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_from_args(args)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The YAML config with the command line's overrides."""
    overrides = {k: getattr(args, k) for k in ("data", "name", "output", "init_from", "resume_from", "state_output",
                                               "num_workers", "max_steps", "batch_size", "storage_path",
                                               "use_gpu", "time_limit_s", "train_only", "lr")}
    return TrainConfig.from_yaml(args.config, **overrides)


def run_from_args(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    address = args.address or os.environ.get("RAY_ADDRESS")
    t0 = time.time()
    result = run(cfg, address)
    print(json.dumps({"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None,
                      "output": cfg.output, "seconds": round(time.time() - t0, 1)}, default=str))
    return 0 if result.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
