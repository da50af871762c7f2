"""`expertmesh generate` from the command line, joining the session's Ray cluster."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def test_generate_over_a_context_file_matches_hf(tmp_path, ray_cluster, tiny_checkpoint, hf_model):
    ckpt = tiny_checkpoint("qwen3moe")
    text = "The grass is green. The sky is blue. " * 6  # bytes: the tiny model's vocab covers 0..299
    (tmp_path / "ctx.txt").write_text(text)
    prompt = " What colour is the sky?"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, "-m", "expertmesh.cli", "generate", "--checkpoint", ckpt, "--context-file",
         str(tmp_path / "ctx.txt"), "--prompt", prompt, "--max-new-tokens", "12", "--context-shards", "2",
         "--expert-groups", "2", "--address", ray_cluster.get_runtime_context().gcs_address, "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    ids = [b + 4 for b in (text + prompt).encode()]  # the byte tokenizer (no tokenizer.json in the checkpoint)
    with torch.no_grad():
        ref = hf_model("qwen3moe").generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert res["token_ids"] == ref[0, len(ids):].tolist()
    assert res["context"]["num_tokens"] == len(text)
    assert res["pathway"]["shards"] == [0, 1]
    assert f"{len(text)}/{len(text)}" in out.stderr and "tok/s" in out.stderr  # the registration's progress bar


def test_cli_reports_a_missing_checkpoint_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "expertmesh.cli", "generate", "--checkpoint", str(tmp_path / "x"),
                          "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no config.json" in out.stderr


def test_serve_without_tenants_refuses_a_public_address():
    out = subprocess.run([sys.executable, "-m", "expertmesh.cli", "serve", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "refusing to bind 0.0.0.0 without --tenants" in out.stderr


def test_serve_app_is_importable_for_ray_tooling():
    from ray.serve import Application

    from expertmesh.pipelines import serve

    assert isinstance(serve.app, Application)
    assert isinstance(serve.build_app({"context_shards": 2, "tenants_file": "/etc/x.yaml"}), Application)
    with pytest.raises(Exception, match="context_shards"):
        serve.build_app({"context_shards": 0})


def test_data_command_writes_the_training_parquet(tmp_path):
    import pyarrow.parquet as pq

    out = subprocess.run([sys.executable, "-m", "expertmesh.cli", "data", "--out", str(tmp_path / "d"),
                          "--rows", "12", "--lengths", "1024,2048", "--group-rows", "4", "--files", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["files"] == 2
    table = pq.read_table(tmp_path / "d")
    assert table.num_rows == 12
    assert {len(x) for x in table.column("input_ids").to_pylist()} <= {1024, 2048}
    assert set(table.column("task").to_pylist()) <= {"passkey", "multikey"}


def test_eval_command_scores_the_default_model(tmp_path, ray_cluster):
    """`expertmesh eval` on the session's cluster: the shipped model finds 2 of 2 passkeys in 2K tokens."""
    out = subprocess.run(
        [sys.executable, "-m", "expertmesh.cli", "eval", "passkey", "--lengths", "2048", "--modes",
         "exact,blockwise", "--samples", "2", "--context-shards", "2", "--expert-groups", "1",
         "--address", ray_cluster.get_runtime_context().gcs_address, "--json", str(tmp_path / "e.json")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [(r["length"], r["mode"], r["samples"]) for r in rows] == [(2048, "exact", 2), (2048, "blockwise", 2)]
    assert all(r["correct"] == 2 for r in rows), rows
