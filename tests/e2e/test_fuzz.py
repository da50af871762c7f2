"""Schemathesis against /openapi.json: generated requests find no 5xx; the server serves on."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def test_schemathesis_finds_no_server_error(server, tmp_path):
    har = tmp_path / "run.har"
    out = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server}/openapi.json",
         "--checks", "not_a_server_error", "-H", f"Authorization: Bearer {KEYS['acme']}",
         "--max-examples", "35", "--seed", "7", "--request-timeout", "120", "--continue-on-failure",
         "--report", "har", "--report-har-path", str(har)],
        capture_output=True, text=True, timeout=900,
    )
    requests = len(json.loads(har.read_text())["log"]["entries"])
    assert out.returncode == 0, out.stdout[-4000:]
    assert requests >= 500, f"only {requests} requests were generated"
    statuses = [e["response"]["status"] for e in json.loads(har.read_text())["log"]["entries"]]
    assert not [s for s in statuses if s >= 500]
    r = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEYS['acme']}"},
                   json={"model": "expertmesh", "prompt": "still here?", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
