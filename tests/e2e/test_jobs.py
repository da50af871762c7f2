"""Ray Jobs: a real head with the dashboard; `expertmesh submit ingest` adds contexts to a running mesh."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `ray start` clusters use Ray's token authentication (token in ~/.ray/auth_token); clients opt in
# and job entrypoints run `python` from PATH: the virtual environment's, as on an activated shell
ENV = dict(os.environ, PYTHONWARNINGS="ignore", RAY_AUTH_MODE="token",
           PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "expertmesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def token_of_ray_start() -> str:
    """The token `ray start` uses under RAY_AUTH_MODE=token (Ray's default path; RAY_AUTH_TOKEN wins)."""
    from pathlib import Path

    return os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text()


def ray_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def head(tiny_checkpoint):
    """A second, real Ray cluster (`ray start --head --block` with the dashboard) and a named mesh on it."""
    import httpx
    from ray._private.services import get_node_ip_address

    gcs, dash, client, agent, agent_grpc, metrics, renv = (free_port() for _ in range(7))
    temp = tempfile.mkdtemp(prefix="emh", dir="/tmp")  # short: Ray's socket paths live under it
    head = subprocess.Popen([ray_bin(), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                             f"--runtime-env-agent-port={renv}",  # no clash with the session's cluster
                             "--num-cpus=2", "--include-dashboard=true",
                             f"--temp-dir={temp}", "--resources", '{"context_shard": 4, "expert_group": 4}'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    mesh = None
    try:
        # the job API answers once the dashboard's agent is up; token authentication is on, so the
        # poll presents the token `ray start` generated (without it every answer is a 401)
        deadline, status = time.time() + 180, None
        while time.time() < deadline:
            try:  # (the token file may appear only once `ray start` has begun)
                auth = {"Authorization": f"Bearer {token_of_ray_start().strip()}"}
                status = httpx.get(f"http://127.0.0.1:{dash}/api/jobs/", headers=auth, timeout=2).status_code
                if status == 200:
                    break
            except (httpx.HTTPError, FileNotFoundError):
                pass
            time.sleep(1)
        assert status == 200, f"the head's job API did not answer within 180 s (last status {status})"
        mesh = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time, ray, expertmesh as em; ray.init(address=sys.argv[1]); "
             "m = em.Mesh.start(sys.argv[2], context_shards=2, expert_groups=2, address=sys.argv[1], name='jobs'); "
             "print('ready', flush=True); time.sleep(900)", f"{get_node_ip_address()}:{gcs}",
             tiny_checkpoint("qwen3moe")], stdout=subprocess.PIPE, text=True, env=ENV)
        assert mesh.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{dash}"
    finally:
        if mesh is not None:
            mesh.kill()
        os.killpg(head.pid, signal.SIGKILL)  # the head and every process it started, only this cluster
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_ingest_jobs_from_a_file_and_from_parquet(head, tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("The grass is green. The sky is blue. " * 40)
    out = cli("submit", "ingest", "--address", head, "--wait", "--", "--file", str(text), "--mesh", "jobs",
              "--owner", "acme", "--name", "book")
    assert len(out.stdout.split()) == 2, out.stderr[-3000:]
    job_id, status = out.stdout.split()[:2]
    assert out.returncode == 0, cli("submit", "logs", job_id, "--address", head).stdout[-3000:]
    assert status == "SUCCEEDED"
    logs = cli("submit", "logs", job_id, "--address", head)
    assert '"num_tokens": 1480' in logs.stdout and "registered 1,480 tokens" in logs.stdout
    assert cli("submit", "status", job_id, "--address", head).stdout.strip() == "SUCCEEDED"

    pq.write_table(pa.table({"text": [f"Document {i}: the number is {i * 7}." for i in range(50)]}),
                   tmp_path / "docs.parquet")
    out = cli("submit", "ingest", "--address", head, "--wait", "--", "--parquet", str(tmp_path / "docs.parquet"),
              "--column", "text", "--mesh", "jobs", "--visibility", "shared")
    assert out.returncode == 0, cli("submit", "logs", out.stdout.split()[0], "--address", head).stdout[-3000:]
    assert out.stdout.split()[1] == "SUCCEEDED"


def test_a_failing_job_is_reported(head):
    out = cli("submit", "ingest", "--address", head, "--wait", "--", "--file", "/no/such/file", "--mesh", "jobs")
    assert out.returncode == 1 and out.stdout.split()[1] == "FAILED"


def test_training_job_runs_ray_train_on_the_cluster(head, tmp_path):
    from expertmesh.pipelines.train_data import DataSpec, write_dataset

    data = tmp_path / "data"
    write_dataset(data, DataSpec(rows=24, lengths=(640,), group_rows=4), files=2)
    config = tmp_path / "train.yaml"
    config.write_text(
        f"data: {data}\nname: job-train\nstorage_path: {tmp_path / 'runs'}\noutput: {tmp_path / 'model'}\n"
        "model: {num_hidden_layers: 2, no_rope_layers: [1, 0], layer_types: [chunked_attention, full_attention],\n"
        "        moe_layers: [0, 1], attention_chunk_size: 256, hidden_size: 64, head_dim: 16,\n"
        "        intermediate_size: 64, intermediate_size_mlp: 64, num_local_experts: 4}\n"
        "num_workers: 1\ncpus_per_worker: 0.5\nbatch_size: 2\nmax_steps: 6\ncheckpoint_every: 3\nlog_every: 3\n")
    out = cli("submit", "train", "--address", head, "--wait", "--", "--config", str(config), timeout=400)
    assert len(out.stdout.split()) == 2, out.stderr[-3000:]
    job_id, status = out.stdout.split()
    logs = cli("submit", "logs", job_id, "--address", head).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert '"step": 6' in logs
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors",
                                                                      "training.json"]
