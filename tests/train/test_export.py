"""Exporting a training checkpoint to a directory or an object-store URI, and reading it back."""

from __future__ import annotations

import pyarrow.fs as pafs
import torch
from ray.train import Checkpoint

from expertmesh.model import checkpoint as ckpt
from expertmesh.model.checkpoint import load_model
from expertmesh.pipelines.train import export
from expertmesh.pipelines.train_config import TrainConfig
from expertmesh.pipelines.train_step import build_model, make_optimizer, save_state


def _checkpoint(tmp_path) -> tuple[Checkpoint, torch.nn.Module]:
    cfg = TrainConfig.from_dict({"data": "unused", "model": {"num_hidden_layers": 1, "no_rope_layers": [0],
                                                             "layer_types": ["full_attention"], "moe_layers": [0]}})
    model = build_model(cfg)
    save_state(model, make_optimizer(model, cfg), 7, tmp_path / "ckpt", extra={"metrics": {"loss": 1.5}})
    return Checkpoint.from_directory(str(tmp_path / "ckpt")), model


def test_export_to_a_uri_round_trips_through_pyarrow_fs(tmp_path, monkeypatch):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    real = ckpt.open_filesystem

    def fake_open(uri: str):  # s3://bucket/... -> a local directory standing in for the bucket
        if uri.startswith("s3://bucket/"):
            return pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()), uri[len("s3://bucket/"):]
        return real(uri)

    monkeypatch.setattr(ckpt, "open_filesystem", fake_open)
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path / "cache"))
    checkpoint, model = _checkpoint(tmp_path)
    assert export(checkpoint, "s3://bucket/models/run1") == "s3://bucket/models/run1"
    assert sorted(p.name for p in (bucket / "models" / "run1").iterdir()) == [
        "config.json", "model.safetensors", "training.json"]
    loaded = load_model("s3://bucket/models/run1")  # resolve_checkpoint copies it to the cache
    ids = torch.randint(4, 260, (50,))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))


def test_export_to_a_directory(tmp_path):
    checkpoint, _ = _checkpoint(tmp_path)
    out = export(checkpoint, str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").is_file() and out == str(tmp_path / "out")
    assert '"step": 7' in (tmp_path / "out" / "training.json").read_text()


def test_a_saved_state_continues_training_exactly(tmp_path):
    """Two steps straight == one step, save_state, load_state into a fresh model and optimizer,
    one step: bit-equal weights (the optimizer moments and step travel, not only the weights).
    (One torch thread: the embedding's backward sums rows in a thread-dependent order.)"""
    import pyarrow.parquet as pq

    from expertmesh.pipelines.train_data import DataSpec, write_dataset
    from expertmesh.pipelines.train_step import collate

    write_dataset(tmp_path / "data", DataSpec(rows=4, lengths=(640,), group_rows=2, seed=3), files=1)
    rows = pq.read_table(tmp_path / "data").to_pydict()
    batches = [collate({k: v[i:i + 2] for k, v in rows.items()}) for i in (0, 2)]
    cfg = TrainConfig.from_dict({"data": "unused", "warmup_steps": 1, "max_steps": 4,
                                 "model": {"num_hidden_layers": 1, "no_rope_layers": [0],
                                           "layer_types": ["full_attention"], "moe_layers": [0]}})

    def fresh():
        model = build_model(cfg)
        return model, make_optimizer(model, cfg)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_straight_and_resumed(fresh, batches, cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare_straight_and_resumed(fresh, batches, cfg, tmp_path) -> None:
    from expertmesh.pipelines.train_step import BatchedModel, load_state, step

    cpu = torch.device("cpu")
    straight, opt = fresh()
    for i, b in enumerate(batches):
        step(BatchedModel(straight), straight, opt, b, cfg, i, cpu)
    first, opt1 = fresh()
    step(BatchedModel(first), first, opt1, batches[0], cfg, 0, cpu)
    save_state(first, opt1, 1, tmp_path / "state")
    resumed, opt2 = fresh()
    assert load_state(resumed, opt2, tmp_path / "state", cpu) == 1
    step(BatchedModel(resumed), resumed, opt2, batches[1], cfg, 1, cpu)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
