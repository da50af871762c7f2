"""Bad requests get clear errors; the shared actors keep serving."""

import threading

import pytest

import expertmesh as em
from tests.conftest import VOCAB

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def mesh(ray_cluster, tiny_checkpoint):
    m = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2,
                      shard_capacity_tokens=256, page_size=16)
    yield m
    m.shutdown()


def test_unknown_context_raises_context_not_found(mesh):
    with pytest.raises(em.ContextNotFound, match="ctx-nope"):
        mesh.generate([1, 2, 3], context_id="ctx-nope")
    with pytest.raises(em.ContextNotFound):
        mesh.drop_context("ctx-nope")


def test_token_outside_vocabulary_names_id_and_vocab(mesh):
    with pytest.raises(ValueError, match=rf"token id {VOCAB + 5} at index 1 .*\[0, {VOCAB}\)"):
        mesh.generate([1, VOCAB + 5, 2])
    with pytest.raises(ValueError, match="token id -1"):
        mesh.register_context([3, -1])
    with pytest.raises(ValueError, match="empty"):
        mesh.forward_logits([])
    # the router itself validates too (clients other than Mesh reach it directly)
    import ray

    from expertmesh.engine.request import Request
    with pytest.raises(ValueError, match=f"token id {VOCAB}"):
        ray.get(mesh.router.generate.remote(Request([VOCAB])))


def test_context_beyond_capacity_reports_the_numbers(mesh):
    with pytest.raises(em.CapacityError, match=r"context of 600 tokens needs 3 shards of 256 tokens; the mesh has 2"):
        mesh.register_context([i % 250 + 1 for i in range(600)])
    a = mesh.register_context([i % 250 + 1 for i in range(400)])
    try:  # 400 of 512 tokens used: a second context of 200 no longer fits
        with pytest.raises(em.CapacityError, match="does not fit"):
            mesh.register_context(list(range(1, 201)))
    finally:
        mesh.drop_context(a.id)
    b = mesh.register_context(list(range(1, 201)))  # space is freed by drop
    mesh.drop_context(b.id)


def test_bad_parameters_are_refused(mesh):
    with pytest.raises(ValueError, match="mode must be one of"):
        mesh.register_context([1, 2], mode="fast")
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        mesh.generate([1, 2], temperature=-1)
    with pytest.raises(ValueError, match="top_shards must be >= 1"):
        mesh.generate([1, 2], top_shards=0)
    with pytest.raises(ValueError, match=r"shards must be in 1\.\.2"):
        mesh.register_context([1, 2, 3], shards=3)


def test_actors_survive_bad_requests_and_keep_serving(mesh):
    before = mesh.generate([5, 6, 7], max_new_tokens=5).token_ids
    errors = []

    def bad():
        try:
            mesh.generate([1], context_id="missing")
        except em.ContextNotFound as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bad) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 8
    assert mesh.generate([5, 6, 7], max_new_tokens=5).token_ids == before
    assert mesh.stats()["router"]["running"] == 0


def test_a_request_past_its_deadline_fails_with_the_numbers_and_leaves_the_batch(mesh):
    import time

    import ray

    from expertmesh.engine.request import Request
    from expertmesh.errors import DeadlineExceeded
    from expertmesh.model.sampling import SamplingParams

    before = mesh.generate([5, 6, 7], max_new_tokens=5).token_ids
    # far more than two seconds of steps here, whatever the tokens (ignore_eos); the 2 s leave the call
    # time to reach the router on a loaded machine (else it fails on arrival, with the other message)
    long = SamplingParams(max_new_tokens=4000, ignore_eos=True)
    missed = r"missed its deadline by [\d.]+ s: [\d.]+ s after it reached the router, \d+ of 4000 tokens generated"
    with pytest.raises(DeadlineExceeded, match=missed):
        ray.get(mesh.router.generate.remote(Request([5, 6, 7], params=long, deadline=time.time() + 2.0)))
    gen = mesh.router.stream.options(num_returns="streaming").remote(
        Request([5, 6, 7], params=long, request_id="late-stream", deadline=time.time() + 2.0))
    with pytest.raises(DeadlineExceeded, match=f"request 'late-stream' {missed}"):
        for ref in gen:
            ray.get(ref)
    with pytest.raises(DeadlineExceeded, match=r"reached the router [\d.]+ s after its deadline; nothing was run"):
        ray.get(mesh.router.generate.remote(Request([5, 6, 7], deadline=time.time() - 1)))
    t0 = time.monotonic()
    while (st := mesh.stats()["router"])["running"] or st["waiting"]:  # they leave after their last step
        assert time.monotonic() - t0 < 10, st
        time.sleep(0.05)
    assert mesh.generate([5, 6, 7], max_new_tokens=5).token_ids == before
