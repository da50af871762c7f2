"""The training run's configuration (a YAML file), validated with clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml


@dataclasses.dataclass
class TrainConfig:
    data: str  # Parquet directory or URI (rows from `expertmesh data`)
    name: str = "expertmesh-train"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # HF config keys over the default model's
    init_from: str | None = None  # start from this checkpoint (fine-tuning) instead of a random init
    output: str | None = None  # where the final Hugging Face checkpoint is written
    resume_from: str | None = None  # continue a run: weights, optimizer moments and step of a `state_output`
    state_output: str | None = None  # where the final training state (model + optimizer + step) is copied
    storage_path: str = "~/expertmesh-runs"  # Ray Train run storage (path or URI): checkpoints, results
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # CPUs each worker reserves (CPU training); Ray Data's reads need some left
    threads_per_worker: int | None = None  # torch threads of a CPU worker; None: max(1, cpus_per_worker)
    batch_size: int = 8  # sequences per worker per step
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lm_weight: float = 0.1  # weight of the context tokens' LM loss; answer tokens weigh 1
    router_aux_loss_coef: float | None = None  # None: the model config's
    router_z_loss_coef: float = 0.0
    amp_bf16: bool = False  # bf16 autocast (GPU); the CPU path stays fp32
    time_limit_s: float | None = None  # stop (with a checkpoint) after this many seconds of training
    checkpoint_every: int = 100
    log_every: int = 10
    num_to_keep: int = 2
    max_failures: int = 2
    seed: int = 0
    # parameter-name prefixes to train (e.g. ["layers.2."] for a layer just inserted); the rest stays frozen
    train_only: list[str] | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of training settings, got {type(raw).__name__}")
        return cls.from_dict({**raw, **{k: v for k, v in overrides.items() if v is not None}}, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "TrainConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
        if "data" not in raw:
            raise ValueError(f"{where}: 'data' (the Parquet dataset path) is required")
        cfg = cls(**raw)
        for key in ("num_workers", "batch_size", "max_steps", "checkpoint_every", "log_every", "num_to_keep"):
            value = getattr(cfg, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
        threads = cfg.threads_per_worker
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"{where}: threads_per_worker must be an integer >= 1 or null, got {threads!r}")
        for key in ("lr", "weight_decay", "grad_clip", "lm_weight", "router_z_loss_coef"):
            value = getattr(cfg, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{where}: {key} must be a number >= 0, got {value!r}")
        if cfg.resume_from and (cfg.init_from or cfg.model):
            raise ValueError(f"{where}: resume_from continues a run with its own weights; "
                             "give it without init_from and model")
        if cfg.train_only is not None and (not isinstance(cfg.train_only, list) or not cfg.train_only
                                           or not all(isinstance(x, str) and x for x in cfg.train_only)):
            raise ValueError(f"{where}: train_only must be a non-empty list of parameter-name prefixes "
                             f"(e.g. ['layers.2.']), got {cfg.train_only!r}")
        if not isinstance(cfg.model, dict):
            raise ValueError(f"{where}: model must be a mapping of Hugging Face config keys")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
