"""Fixtures of the multi-host suite: a fresh set of network-namespace hosts per test (netns.py),
and a driver's RESULT line read back."""

import json
import os

import pytest

from tests.hosts.netns import Hosts


@pytest.fixture
def hosts():
    h = Hosts.create()
    try:
        yield h
    finally:
        h.close()


def driver_result(proc, label: str) -> dict:
    """The JSON a driver printed after "RESULT " (the driver must have exited 0); printed for
    `pytest -s` and, with EXPERTMESH_RESULTS=<file>, written there."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    print(f"\n{label} " + json.dumps(out, indent=1))
    if os.environ.get("EXPERTMESH_RESULTS"):
        with open(os.environ["EXPERTMESH_RESULTS"], "w") as f:
            json.dump(out, f, indent=1)
    return out
