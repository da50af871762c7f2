"""A long registration reports its progress while it runs (tokens done, tokens/s, time left),
from whichever router runs it; a failed one says why."""

import pytest

import expertmesh as em

pytestmark = pytest.mark.ray


def test_registration_reports_progress_while_it_runs(ray_cluster, tiny_checkpoint):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=1, page_size=16,
                         max_batch_tokens=64, routers=2)
    try:
        views = []
        ids = [(7 * i) % 250 + 4 for i in range(1500)]  # 24 pieces of 64 tokens
        info = mesh.register_context(ids, progress=views.append, every_s=0.05)
        assert views[-1]["state"] == "ready" and views[-1]["tokens_done"] == info.num_tokens == len(ids)
        done = [v["tokens_done"] for v in views]
        assert done == sorted(done) and len(set(done)) > 2, done  # seen part way, more than once
        assert all(v["num_tokens"] == len(ids) and v["context_id"] == info.id for v in views)
        middle = [v for v in views if 0 < v["tokens_done"] < len(ids)]
        assert middle and all(v["tokens_per_s"] > 0 and v["eta_s"] > 0 for v in middle)
        assert mesh.registration_progress(info.id)["state"] == "ready"
        assert mesh.registration_progress("ctx-unknown") is None
        with pytest.raises(ValueError, match="outside the vocabulary"):  # refused before it starts: no progress
            mesh.register_context([1, 2, 10**6], progress=views.append)
    finally:
        mesh.shutdown()
