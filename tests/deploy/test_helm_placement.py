"""Device, dtype, colocation and data plane: Helm values, CLI flags and ServeSettings agree."""

from __future__ import annotations

import argparse

import helm_python as helm
import pytest
import yaml

from expertmesh.pipelines.serve import ServeSettings
from tests.deploy.chart import CASES, chart, render, serve_config  # noqa: F401 - fixture


def _args(docs):
    (app,) = serve_config(docs)["applications"]
    return app["args"]


def test_defaults_render_auto_and_the_collective_plane(chart):  # noqa: F811
    args = _args(render(chart, "defaults")[1])
    assert (args["device"], args["dtype"], args["data_plane"]) == ("auto", "auto", "collective")
    assert "colocate" not in args
    settings = ServeSettings(**args)
    assert settings.placement_kwargs() == {"device": "auto", "dtype": "auto", "colocate": None,
                                           "data_plane": "collective", "routers": 1}
    # the chart names the counts (its worker groups declare the units): separate shard and group actors
    assert (settings.context_shards, settings.expert_groups) == (4, 2)


def test_routers_reach_the_serving_app(chart):  # noqa: F811
    args = _args(render(chart, "routers")[1])
    assert args["routers"] == 2 and ServeSettings(**args).placement_kwargs()["routers"] == 2
    assert args["micro_batches"] == 2 and ServeSettings(**args).mesh_spec().micro_batches == 2


def test_gpu_values_reach_the_serving_app(chart):  # noqa: F811
    values = {**CASES["gpu"], "serve": {**CASES["gpu"]["serve"], "device": "cuda", "dtype": "bfloat16",
                                        "colocate": True, "dataPlane": "ray"}}
    out = chart.render(values, name="prod", namespace="ml", is_install=True)
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    args = _args(docs)
    assert (args["device"], args["dtype"], args["colocate"], args["data_plane"]) == ("cuda", "bfloat16", True, "ray")
    assert ServeSettings(**args).placement_kwargs() == {"device": "cuda", "dtype": "bfloat16", "colocate": True,
                                                        "data_plane": "ray", "routers": 1}


@pytest.mark.parametrize("key, value, what", [("device", "gpu", "pattern"), ("dtype", "fp8", "must be one of"),
                                              ("dataPlane", "nccl", "must be one of"),
                                              ("colocate", "yes", "want boolean")])
def test_bad_placement_values_are_refused(chart, key, value, what):  # noqa: F811
    with pytest.raises(helm.HelmValuesError) as exc:
        chart.render({"serve": {key: value}}, name="prod", namespace="ml", is_install=True)
    assert f"/serve/{key}" in str(exc.value) and what in str(exc.value), str(exc.value)


def test_cli_placement_flags_parse_and_go_to_the_mesh():
    from expertmesh.cli import mesh_args

    p = argparse.ArgumentParser()
    mesh_args.mesh_args(p)
    kw = mesh_args.mesh_kwargs(p.parse_args(["--device", "cuda:1", "--dtype", "float16", "--colocate",
                                         "--data-plane", "ray", "--routers", "3", "--micro-batches", "2",
                                         "--no-whole-steps"]))
    assert {k: kw[k] for k in mesh_args.PLACEMENT} == {"device": "cuda:1", "dtype": "float16", "colocate": True,
                                                 "data_plane": "ray", "routers": 3, "micro_batches": 2,
                                                 "whole_steps": False}
    assert {k: mesh_args.mesh_kwargs(p.parse_args([]))[k] for k in mesh_args.PLACEMENT} == {  # None: picked (layout.py)
        "device": "auto", "dtype": "auto", "colocate": None, "data_plane": "collective", "routers": 1,
        "micro_batches": 1, "whole_steps": True}
    assert mesh_args.mesh_kwargs(p.parse_args(["--no-colocate"]))["colocate"] is False
    assert p.parse_args([]).context_shards is None and p.parse_args([]).expert_groups is None
    with pytest.raises(SystemExit):
        p.parse_args(["--device", "tpu"])
    assert ServeSettings(**kw).mesh_spec().micro_batches == 2  # the serving app takes the same keywords
    assert ServeSettings(**kw).mesh_spec().whole_steps is False
