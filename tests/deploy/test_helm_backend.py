"""The chart's compute backends: `backend` per worker group reaches the serving app as
shard_backend / expert_backend (TPU groups run JAX actors)."""

from __future__ import annotations

import helm_python as helm
import pytest
import yaml

from expertmesh.pipelines.serve import ServeSettings
from tests.deploy.chart import NAMESPACE, RELEASE, chart, render, serve_config  # noqa: F401 - fixture


def _args(docs):
    (app,) = serve_config(docs)["applications"]
    return app["args"]


def test_tpu_group_runs_jax_shards_and_defaults_run_torch(chart):  # noqa: F811
    _, docs = render(chart, "tpu")
    args = _args(docs)
    assert args["shard_backend"] == "jax" and "expert_backend" not in args  # unset: torch
    settings = ServeSettings(**args)
    assert (settings.shard_backend, settings.expert_backend) == ("jax", "torch")
    _, docs = render(chart, "defaults")
    assert "shard_backend" not in _args(docs) and "expert_backend" not in _args(docs)


def test_jax_expert_group(chart):  # noqa: F811
    out = chart.render({"workerGroups": {"experts": {"backend": "jax", "tpus": 4}}}, name=RELEASE,
                       namespace=NAMESPACE)
    (rs,) = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d and d["kind"] == "RayService"]
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["expert_backend"] == "jax" and "shard_backend" not in args
    assert ServeSettings(**args).expert_backend == "jax"


def test_backend_conflicts_and_bad_values_are_refused(chart):  # noqa: F811
    with pytest.raises(helm.HelmRenderError, match=r"groups declaring context_shard disagree on backend "
                                                   r"\(experts: torch, context-shards: jax\)"):
        chart.render({"workerGroups": {"context-shards": {"backend": "jax"},
                                       "experts": {"rayResources": {"expert_group": 2, "context_shard": 1}}}},
                     name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(Exception, match="backend"):
        chart.render({"workerGroups": {"experts": {"backend": "tpu"}}}, name=RELEASE, namespace=NAMESPACE)
