"""Monitoring in the chart: the PodMonitor / ServiceMonitor against the Prometheus operator's CRD
schemas (vendored in prometheus-operator-crds/, see the README there), and the Grafana dashboard
ConfigMap for Grafana's sidecar. Rendered offline with Helm's engine, as tests/deploy/test_helm.py."""

from __future__ import annotations

import functools
import json

import jsonschema
import pytest
import yaml

from expertmesh.platform import dashboard
from tests.deploy.chart import *  # noqa: F401,F403 - the chart fixture
from tests.deploy.chart import CHART, MONITORING_CRDS, NAMESPACE, RELEASE, of_kind, render
from tests.deploy.test_helm import _strict

MONITOR_CASES = [("podmonitor", "PodMonitor"), ("servicemonitor", "ServiceMonitor")]


@functools.cache
def monitor_validators(kind: str) -> tuple:
    crd = yaml.safe_load((MONITORING_CRDS / f"monitoring.coreos.com_{kind.lower()}s.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "monitoring.coreos.com"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema), jsonschema.Draft7Validator(_strict(schema))


def _errors(validator, doc) -> list[str]:
    return [f"{doc['kind']} {'.'.join(map(str, e.path))}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path))]


@pytest.mark.parametrize("case,kind", MONITOR_CASES)
def test_monitors_validate_against_the_prometheus_operator_crds(chart, case, kind):
    _, docs = render(chart, case)
    (mon,) = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert mon["apiVersion"] == "monitoring.coreos.com/v1" and mon["kind"] == kind
    for validator in monitor_validators(kind):
        assert not _errors(validator, mon)


def test_monitor_crd_validation_catches_misplaced_fields(chart):
    """Not vacuous: a misspelt field, a wrong type and a relabel action the operator does not know are refused."""
    _, docs = render(chart, "podmonitor")
    (mon,) = of_kind(docs, "PodMonitor")
    ep = mon["spec"]["podMetricsEndpoints"][0]
    ep["intervall"] = "30s"
    ep["relabelings"][0]["action"] = "rename"
    mon["spec"]["selector"]["matchLabels"]["x"] = 1
    messages = " ".join(_errors(monitor_validators("PodMonitor")[1], mon))
    assert "intervall" in messages and "'rename' is not one of" in messages and "1 is not of type 'string'" in messages


@pytest.mark.parametrize("case,kind", MONITOR_CASES)
def test_monitor_labels_each_series_with_its_ray_cluster(chart, case, kind):
    """As KubeRay documents: KubeRay's `ray.io/cluster` pod label becomes `ray_io_cluster`, the
    dashboard's `cluster` variable."""
    _, docs = render(chart, case)
    (mon,) = of_kind(docs, kind)
    (ep,) = mon["spec"]["podMetricsEndpoints" if kind == "PodMonitor" else "endpoints"]
    assert {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
            "targetLabel": "ray_io_cluster"} in ep["relabelings"]
    assert all('ray_io_cluster=~"$cluster"' in expr for _, _, expr in dashboard.queries(dashboard.dashboard()))


def test_dashboard_configmap_off_by_default(chart):
    for case in ("defaults", "podmonitor"):
        _, docs = render(chart, case)
        assert not [d for d in of_kind(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"].get("labels", {})]


def test_dashboard_configmap_for_grafanas_sidecar(chart):
    _, docs = render(chart, "dashboard")
    (cm,) = [d for d in of_kind(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label and value
    assert cm["metadata"]["name"] == f"{RELEASE}-expertmesh-dashboard"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "expertmesh"}
    (key,) = cm["data"]
    assert key.endswith(".json") and json.loads(cm["data"][key]) == dashboard.dashboard()
    assert len(json.dumps(cm).encode()) < 1 << 20  # a ConfigMap holds at most 1 MiB
    # without a namespace it goes with the release (Helm's --namespace)
    out = chart.render({"monitoring": {"dashboard": {"enabled": True}}}, name=RELEASE, namespace=NAMESPACE,
                       is_install=True)
    (cm,) = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text)
             if d and d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"].get("labels", {})]
    assert "namespace" not in cm["metadata"]


def test_charts_copy_of_the_dashboard_is_the_generated_one():
    """helm/expertmesh/dashboards/expertmesh.json: `expertmesh dashboard --out` that path to update it."""
    assert (CHART / "dashboards" / "expertmesh.json").read_text() == dashboard.render()
