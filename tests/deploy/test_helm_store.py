"""The chart's context store: a PersistentVolumeClaim mounted on every Ray pod, or an object-store
URI, reaches the serving app as `store`, with the hot-page budget and the KV dtype."""

from __future__ import annotations

from expertmesh.pipelines.serve import ServeSettings
from tests.deploy.chart import chart, pod_templates, render, serve_config  # noqa: F401 - fixture


def _args(docs):
    (app,) = serve_config(docs)["applications"]
    return app["args"]


def test_claim_is_mounted_everywhere_and_is_the_store(chart):  # noqa: F811
    _, docs = render(chart, "store-pvc")
    args = _args(docs)
    assert (args["store"], args["shard_memory_bytes"], args["kv_dtype"]) == ("/var/lib/kv", 8589934592, "bfloat16")
    assert "shard_capacity_tokens" not in args  # 0: no cap, bounded by the store
    ServeSettings(**args)  # the app accepts exactly these settings
    for name, pod in pod_templates(docs):
        if "/" not in name or name.endswith("/submitter"):  # helm test pod, job submitters
            continue
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert vols["kv-store"]["persistentVolumeClaim"] == {"claimName": "expertmesh-kv"}, name
        mounts = {m["name"]: m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert mounts["kv-store"] == "/var/lib/kv", name


def test_uri_store_needs_no_volume_and_defaults_have_no_store(chart):  # noqa: F811
    _, docs = render(chart, "store-uri")
    args = _args(docs)
    assert args["store"] == "s3://bucket/expertmesh-kv" and "shard_memory_bytes" not in args
    assert all("kv-store" not in {v["name"] for v in p["spec"].get("volumes", [])} for _, p in pod_templates(docs))
    _, docs = render(chart, "defaults")
    assert "store" not in _args(docs) and _args(docs)["kv_dtype"] == "float32"
