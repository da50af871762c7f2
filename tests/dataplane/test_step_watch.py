"""The step watch (dataplane/step_watch.py): members on hosts Ray declared dead are cut, only
while a step has stalled, and never on a missing verdict. The cut on real hosts (a link pulled
mid-stream) is tests/hosts/test_multi_host.py's."""

import time

import pytest

from expertmesh.dataplane import step_watch
from expertmesh.dataplane.step_watch import STALL_S, StepWatch


def make(running, members, monkeypatch, dead):
    monkeypatch.setattr(step_watch, "dead_nodes", lambda: dead)
    cuts = []
    watch = StepWatch(lambda: running, lambda: members, lambda ranks, why: cuts.append((ranks, why)))
    watch.close()  # its thread stops; check() is called here
    return watch, cuts


def test_a_stalled_step_cuts_the_members_on_dead_hosts(monkeypatch):
    watch, cuts = make(time.monotonic() - STALL_S - 1, {1: "a", 2: "b", 3: "b"}, monkeypatch, {"b", "z"})
    assert watch.check() == [2, 3] and watch.cuts == 2
    assert cuts[0][0] == [2, 3] and "declared the host(s) of rank(s) [2, 3] dead" in cuts[0][1]


@pytest.mark.parametrize("running, dead", [
    (None, {"a"}),  # between steps: nothing waits on anyone
    ("fresh", {"a"}),  # a step shorter than STALL_S: not asked
    ("stalled", set()),  # every host alive: a slow member is never cut
    ("stalled", None),  # Ray could not be asked: no verdict, the step waits on
])
def test_no_cut_without_a_stall_and_a_verdict(monkeypatch, running, dead):
    since = {"fresh": time.monotonic(), "stalled": time.monotonic() - STALL_S - 1}.get(running)
    watch, cuts = make(since, {1: "a"}, monkeypatch, dead)
    assert watch.check() == [] and cuts == [] and watch.cuts == 0


@pytest.mark.ray
def test_dead_nodes_reads_the_real_node_table(ray_cluster):
    assert step_watch.dead_nodes() == set()  # the session's one node is alive
