"""Ray Train end to end on the session's local Ray cluster (CPU, gloo)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from expertmesh.model.checkpoint import load_model
from expertmesh.pipelines.train import run
from expertmesh.pipelines.train_config import TrainConfig
from expertmesh.pipelines.train_data import DataSpec, write_dataset

TINY = {"num_hidden_layers": 2, "no_rope_layers": [1, 0], "layer_types": ["chunked_attention", "full_attention"],
        "moe_layers": [0, 1], "attention_chunk_size": 256, "hidden_size": 64, "head_dim": 16,
        "intermediate_size": 64, "intermediate_size_mlp": 64, "num_local_experts": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-data")
    write_dataset(out, DataSpec(rows=96, lengths=(640,), group_rows=4, seed=1), files=2)
    return str(out)


def _config(data: str, tmp: Path, **kw) -> TrainConfig:
    base = dict(data=data, name=f"run-{time.time_ns()}", model=TINY, storage_path=str(tmp / "runs"),
                output=str(tmp / "out"), num_workers=1, cpus_per_worker=0.5, batch_size=2, max_steps=24,
                lr=3e-3, warmup_steps=2, checkpoint_every=8, log_every=4, max_failures=2)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _log(result) -> list[dict]:
    """Metrics of every report of the run, in order (Ray Train's result files)."""
    path = Path(result.path)
    rows = []
    for f in sorted(path.rglob("*.json")):
        if f.name == "trainer_state.json":
            rows.append(json.loads(f.read_text())["metrics"])
    return sorted(rows, key=lambda m: m["step"])


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Rows the runs never train on: another seed, so other keys, needle depths and fillers."""
    out = tmp_path_factory.mktemp("held-out")
    write_dataset(out, DataSpec(rows=8, lengths=(640,), group_rows=4, seed=2), files=1)
    return str(out)


def _held_out_loss(model, data: str) -> float:
    """The training objective (answer CE + 0.1 x context CE) on the first rows of `data`."""
    import pyarrow.parquet as pq

    from expertmesh.model.batched import forward_batch
    from expertmesh.model.losses import token_loss
    from expertmesh.pipelines.train_step import collate

    rows = pq.read_table(data).slice(0, 8).to_pydict()
    b = collate(rows)
    with torch.no_grad():
        logits, _ = forward_batch(model, b["ids"])
    return float(token_loss(logits, b["targets"], b["answer"])
                 + 0.1 * token_loss(logits, b["targets"], b["valid"] * (1 - b["answer"])))


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, data, tmp_path_factory):
    """One 2-worker run shared by the tests below (each Ray Train start costs ~15 s here)."""
    cfg = _config(data, tmp_path_factory.mktemp("two-workers"), num_workers=2, max_steps=24)
    return cfg, run(cfg)


def test_two_worker_run_lowers_the_loss_and_exports_a_checkpoint(two_worker_run, data, held_out):
    from expertmesh.pipelines.train_step import build_model

    cfg, result = two_worker_run
    assert result.error is None
    states = _log(result)
    assert states[-1]["step"] == 24
    assert states[-1]["tokens_per_s"] > 0
    assert states[-1]["expert_load_max"] >= states[-1]["expert_load_mean"] > 0
    out = Path(cfg.output)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    import pyarrow.parquet as pq

    trained = {tuple(r) for r in pq.read_table(data).column("input_ids").to_pylist()}
    assert not trained & {tuple(r) for r in pq.read_table(held_out).column("input_ids").to_pylist()}
    before = _held_out_loss(build_model(cfg), held_out)  # the same seeded init the workers started from
    after = _held_out_loss(load_model(out), held_out)
    assert after < before - 1.0, (before, after)


def _train_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"RayTrainWorker" in cmd:
                pids.append(int(proc.name))
    return pids


def test_killed_worker_resumes_from_its_checkpoint(ray_cluster, data, tmp_path):
    cfg = _config(data, tmp_path, max_steps=24, checkpoint_every=6, log_every=3)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run(cfg)))
    thread.start()
    runs = tmp_path / "runs" / cfg.name
    deadline = time.time() + 240
    # two checkpoints on disk: the first is surely registered with the controller by now
    while time.time() < deadline and len(list(runs.glob("checkpoint_*/trainer_state.json"))) < 2:
        time.sleep(0.2)
    assert len(list(runs.glob("checkpoint_*/trainer_state.json"))) >= 2, "no checkpoints were written"
    pids = _train_worker_pids()
    assert pids, "no Ray Train worker process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive()
    result = box["result"]
    assert result.error is None
    assert result.metrics["step"] == 24
    assert result.metrics["resumed_from"] >= 6  # the restarted worker began at a checkpoint, not at 0


def test_trained_checkpoint_serves_in_the_mesh_and_loads_in_transformers(two_worker_run):
    import expertmesh as em
    from transformers import AutoModelForCausalLM

    cfg, _ = two_worker_run
    ours = load_model(cfg.output)
    hf = AutoModelForCausalLM.from_pretrained(cfg.output, dtype=torch.float32).eval()
    ids = torch.randint(4, 260, (300,))
    with torch.no_grad():
        want = ours(ids)
        theirs = hf(ids[None]).logits[0]
    assert torch.allclose(want, theirs, atol=1e-4), (want - theirs).abs().max()
    mesh = em.Mesh.start(checkpoint=cfg.output, context_shards=2, expert_groups=2, address="auto")
    try:
        ctx = mesh.register_context(ids[:200].tolist())
        got = mesh.forward_logits(ids[200:].tolist(), context_id=ctx.id)
    finally:
        mesh.shutdown()
    assert np.abs(got - want[200:].numpy()).max() <= 1e-4


def test_a_run_continues_from_the_state_an_earlier_run_left(ray_cluster, data, tmp_path):
    """Training across sessions: run 1 leaves its state (model, optimizer, step), run 2 goes on."""
    state = tmp_path / "state"
    first = run(_config(data, tmp_path, max_steps=8, state_output=str(state)))
    assert first.error is None
    assert sorted(p.name for p in state.iterdir()) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                                      "trainer_state.json", "training.json"]
    second = run(_config(data, tmp_path, model={}, max_steps=16, resume_from=str(state), state_output=str(state),
                         output=str(tmp_path / "out2")))
    assert second.error is None
    assert second.metrics["resumed_from"] == 8 and second.metrics["step"] == 16
    assert json.loads((state / "trainer_state.json").read_text())["step"] == 16
    with pytest.raises(FileNotFoundError, match="state_output of an earlier run"):
        run(_config(data, tmp_path, model={}, resume_from=str(tmp_path / "out2")))  # a model without its state


def test_bad_config_is_refused_with_the_key_named(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        TrainConfig.from_dict({"data": "x", "batch_size": 0})
    with pytest.raises(ValueError, match="'data'"):
        TrainConfig.from_dict({})
    with pytest.raises(FileNotFoundError, match="expertmesh data"):
        run(TrainConfig.from_dict({"data": str(tmp_path / "missing")}))
    with pytest.raises(ValueError, match="threads_per_worker must be an integer >= 1"):
        TrainConfig.from_dict({"data": "x", "threads_per_worker": 0})
    with pytest.raises(ValueError, match="resume_from continues a run"):
        TrainConfig.from_dict({"data": "x", "resume_from": "s", "init_from": "m"})


def test_cpu_workers_that_reserve_every_cpu_are_refused_before_they_wait_forever():
    from expertmesh.pipelines.train import _check_cpus_left_for_data

    with pytest.raises(ValueError, match=r"reserve 2 of the cluster's 2 CPUs .* threads_per_worker"):
        _check_cpus_left_for_data(TrainConfig.from_dict({"data": "x", "cpus_per_worker": 2}), 2.0)
    _check_cpus_left_for_data(TrainConfig.from_dict({"data": "x", "cpus_per_worker": 1, "threads_per_worker": 2}), 2.0)
    _check_cpus_left_for_data(TrainConfig.from_dict({"data": "x", "num_workers": 4, "use_gpu": True}), 2.0)


def test_time_limit_stops_all_workers_at_the_same_step(ray_cluster, data, tmp_path):
    cfg = _config(data, tmp_path, num_workers=2, max_steps=10_000, time_limit_s=3.0, checkpoint_every=1000)
    # a worker stopping alone would leave the other waiting in DDP forever: bound the wait, fail on it
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run(cfg)), daemon=True)
    thread.start()
    thread.join(timeout=240)  # ~20 s when it works (a Ray Train start + 3 s of steps)
    assert not thread.is_alive(), "the time-limited run did not end within 240 s (workers out of step?)"
    result = box["result"]
    assert result.error is None
    assert 1 <= result.metrics["step"] < 10_000
    assert Path(cfg.output, "model.safetensors").is_file()
