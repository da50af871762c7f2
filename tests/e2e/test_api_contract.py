"""The API contract: schemathesis with every check finds no 5xx and no schema mismatch.

/openapi.json declares what the server enforces (empty prompts, exactly one of text /
token_ids), and 405 answers carry `Allow`, so generated clients and fuzzers agree with it.
"""

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def test_schemathesis_all_checks_pass(server):
    out = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server}/openapi.json",
         "--checks", "all", "-H", f"Authorization: Bearer {KEYS['acme']}", "--max-examples", "12", "--seed", "11",
         "--request-timeout", "120", "--continue-on-failure"],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:]


def test_declared_constraints_and_allow_header(server):
    spec = httpx.get(f"{server}/openapi.json").json()["components"]["schemas"]
    assert spec["ContextRequest"]["oneOf"] == [{"required": [n]} for n in ("text", "token_ids", "messages")]
    prompt = spec["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert all(p.get("minLength", p.get("minItems")) == 1 for p in prompt)
    r = httpx.put(f"{server}/v1/contexts", headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    r = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEYS['acme']}"},
                   json={"model": "expertmesh", "prompt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
