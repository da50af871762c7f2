"""A server started the way users start it: `expertmesh serve` in its own process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from tests.e2e.serving import free_port, wait_healthy  # noqa: F401 - free_port for the tests

KEYS = {"acme": "key-acme-123", "globex": "key-globex-456", "tiny": "key-tiny-789", "ops": "key-ops-000"}


@pytest.fixture(scope="session")
def server(ray_cluster, tmp_path_factory):
    tenants = {"tenants": [
        {"name": "acme", "api_key_sha256": hashlib.sha256(KEYS["acme"].encode()).hexdigest(),
         "max_concurrent_requests": 40, "tokens_per_minute": 10_000_000, "max_context_tokens": 100_000},
        {"name": "globex", "api_key_sha256": hashlib.sha256(KEYS["globex"].encode()).hexdigest(),
         "max_concurrent_requests": 40, "tokens_per_minute": 10_000_000, "max_context_tokens": 100_000},
        {"name": "tiny", "api_key_sha256": hashlib.sha256(KEYS["tiny"].encode()).hexdigest(),
         "max_concurrent_requests": 1, "tokens_per_minute": 600, "max_context_tokens": 50},
        # may change the pool (test_serve_pool.py); not the fuzzers' tenant (they would add and take out actors)
        {"name": "ops", "api_key_sha256": hashlib.sha256(KEYS["ops"].encode()).hexdigest(),
         "max_concurrent_requests": 8, "tokens_per_minute": 10_000_000, "max_context_tokens": 10_000, "admin": True},
    ]}
    path = tmp_path_factory.mktemp("serve") / "tenants.yaml"
    path.write_text(yaml.safe_dump(tenants))
    port = free_port()
    log = open(path.parent / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "expertmesh.cli", "serve", "--tenants", str(path), "--port", str(port),
         "--context-shards", "3", "--expert-groups", "2", "--max-queue", "48", "--max-completion-tokens", "64",
         "--address", ray_cluster.get_runtime_context().gcs_address],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, path.parent / "serve.log")
    except RuntimeError:
        proc.kill()
        raise
    yield url
    proc.send_signal(2)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
