"""What Ray says about the mesh's actors (dataplane/liveness.py) when its control store cannot
be asked: the last answer stands (members stay, the left-out stay out), and an actor Ray never
answered for is UNKNOWN, never alive."""

import time

import pytest
import ray

from expertmesh.dataplane import liveness
from expertmesh.dataplane.liveness import ALIVE, UNKNOWN, LeftOut, actor_info, back, down

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
class Probe:
    def ping(self) -> int:
        return 1


def test_without_an_answer_the_last_one_stands_and_unknown_is_never_alive(ray_cluster, monkeypatch):
    seen, unseen = Probe.remote(), Probe.remote()
    ray.get([seen.ping.remote(), unseen.ping.remote()])
    assert actor_info(seen) == (ALIVE, 0) and down(seen) is None

    def no_store(handle):
        raise ConnectionError("the GCS is restarting")

    monkeypatch.setattr(liveness, "actor_row", no_store)
    assert actor_info(seen) == (ALIVE, 0) and down(seen) is None  # a member stays a member
    assert actor_info(unseen) == (UNKNOWN, 0) and down(unseen) == UNKNOWN  # never counted alive
    out = LeftOut()
    assert out.refresh([seen, unseen]) == {1: UNKNOWN}  # left out until Ray answers for it
    assert not back(unseen, (UNKNOWN, 0, time.monotonic() - 60))
    monkeypatch.undo()
    assert out.refresh([seen, unseen]) == {}  # Ray answers again: it is alive, and back
    for h in (seen, unseen):
        ray.kill(h)
