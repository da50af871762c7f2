"""Shared pieces of the chart tests: value sets, rendering with Helm's engine, object helpers."""


from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import re
import shlex
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "expertmesh"
CRDS = Path(__file__).resolve().parent / "kuberay-crds"  # KubeRay's CRDs, vendored (see the README there)
MONITORING_CRDS = Path(__file__).resolve().parent / "prometheus-operator-crds"  # PodMonitor, ServiceMonitor
K8S_VERSION = "1.33"
CUSTOM_GROUPS = {"ray.io", "monitoring.coreos.com"}  # CRDs: checked against KubeRay's / the Prometheus operator's schemas
RELEASE, NAMESPACE = "prod", "ml"

KEY = "s3cret-key-for-acme"
TENANTS = [{"name": "acme", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
            "max_concurrent_requests": 8, "tokens_per_minute": 200000, "max_context_tokens": 2000000},
           {"name": "globex", "api_key_sha256": "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"}]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SMALL = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}

CASES: dict[str, dict] = {
    "defaults": {},
    "ray-node-failure-detection": {"head": {"nodeFailureDetection": None}},
    "gcs-fault-tolerance": {"head": {"gcsFaultTolerance": {
        "enabled": True, "redisAddress": "redis.ray.svc:6379", "redisPasswordSecret": {"name": "redis", "key": "pw"},
        "externalStorageNamespace": "expertmesh"}}},
    "routers": {"serve": {"routers": 2, "microBatches": 2}},
    "gpu": {
        "serve": {"checkpoint": "s3://models/mixtral-8x7b", "contextShards": 8, "expertGroups": 4,
                  "modelName": "mixtral", "maxPromptTokens": 1000000, "shardCapacityTokens": 262144,
                  "runtimeEnv": {"pip": ["expertmesh==0.1.0"], "env_vars": {"HF_HOME": "/tmp/hf"}}},
        "tenants": {"list": TENANTS},
        "autoscaling": {"enabled": True, "upscalingMode": "Conservative"},
        "workerGroups": {
            "context-shards": {"replicas": 2, "minReplicas": 1, "maxReplicas": 4, "gpus": 1,
                               "rayResources": {"context_shard": 4},
                               "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                               "tolerations": [GPU_TOLERATION],
                               "resources": {"requests": {"cpu": "8", "memory": "64Gi"},
                                             "limits": {"cpu": "8", "memory": "64Gi"}}},
            "experts": {"replicas": 2, "minReplicas": 2, "maxReplicas": 2, "gpus": 2,
                        "rayResources": {"expert_group": 2}, "tolerations": [GPU_TOLERATION],
                        "rayStartParams": {"object-store-memory": "10000000000"},
                        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                                "labelSelector": {"matchLabels": {
                                                                    "app.kubernetes.io/instance": RELEASE}}}}]}}},
        },
    },
    "store-pvc": {
        "serve": {"store": {"uri": "", "persistentVolumeClaim": "expertmesh-kv", "mountPath": "/var/lib/kv"},
                  "shardMemoryBytes": 8589934592, "kvDtype": "bfloat16"},
    },
    "store-uri": {"serve": {"store": {"uri": "s3://bucket/expertmesh-kv", "persistentVolumeClaim": "",
                                      "mountPath": "/var/lib/expertmesh/store"}}},
    "cpu-only": {
        "tenants": {"existingSecret": "expertmesh-tenants", "secretKey": "tenants.yaml"},
        "rayAuth": {"secretName": "ray-token"},
        "sharedMemory": {"enabled": False},
        "helmTest": {"enabled": False},
        "head": {"resources": SMALL, "rayStartParams": {"num-cpus": "0"}},
        "workerGroups": {"context-shards": {"resources": SMALL, "gpus": 0},
                         "experts": {"resources": SMALL, "gpus": 0}},
        "env": [{"name": "EXPERTMESH_CACHE", "value": "/tmp/expertmesh"}],
    },
    "tpu": {
        "workerGroups": {
            "context-shards": {"tpus": 4, "numOfHosts": 2, "rayResources": {"context_shard": 2}, "backend": "jax",
                               "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                                "cloud.google.com/gke-tpu-topology": "2x4"}},
        },
    },
    "jobs": {
        "tenants": {"list": TENANTS[:1]},
        "jobs": {
            "train": {"enabled": True, "config": {"data": "s3://data/long-context/", "output": "s3://models/run-7",
                                                  "storage_path": "s3://runs/", "num_workers": 32,
                                                  "use_gpu": True, "max_steps": 2000, "lr": 0.0003},
                      "runtimeEnv": {"working_dir": "s3://code/expertmesh.zip"},
                      "activeDeadlineSeconds": 86400,
                      "workerGroups": {"trainers": {"replicas": 4, "minReplicas": 4, "maxReplicas": 4, "gpus": 8,
                                                    "tolerations": [GPU_TOLERATION],
                                                    "resources": {"requests": {"cpu": "32", "memory": "256Gi"},
                                                                  "limits": {"cpu": "32", "memory": "256Gi"}}}}},
            "ingest": {"enabled": True, "rayClusterName": "prod-expertmesh-x7k2p",
                       "args": ["--parquet", "s3://bucket/docs/", "--owner", "acme", "--name", "Q3 reports's"]},
        },
    },
    "jobs-off": {"jobs": {"train": {"enabled": False}, "ingest": {"enabled": False}}},
    "group-disabled": {
        "workerGroups": {"experts": {"disabled": True},
                         "context-shards": {"rayResources": {"context_shard": 4, "expert_group": 2}}},
    },
    "podmonitor": {"monitoring": {"enabled": True, "labels": {"release": "prometheus"}}},
    "servicemonitor": {"monitoring": {"enabled": True, "kind": "ServiceMonitor", "interval": "15s"}},
    "dashboard": {"monitoring": {"dashboard": {"enabled": True, "namespace": "monitoring",
                                               "annotations": {"grafana_folder": "expertmesh"}}}},
    "networkpolicy": {"networkPolicy": {
        "enabled": True,
        "dashboardFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "serveFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}},
    "networkpolicy-bare": {"networkPolicy": {"enabled": True}},
}


# -- rendering ------------------------------------------------------------------------------
@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


@pytest.fixture(scope="session")
def chart() -> helm.Chart:
    return _chart()


@functools.cache
def _render(case: str, release: str) -> tuple[dict, tuple]:
    out = _chart().render(copy.deepcopy(CASES[case]), name=release, namespace=NAMESPACE, is_install=True)
    docs = tuple(d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
                 for d in yaml.safe_load_all(text) if d)
    return out, docs


def render(chart: helm.Chart, case: str, release: str = RELEASE) -> tuple[dict, list[dict]]:
    """Helm's rendering of a value set: (template path -> text, parsed objects); copies, safe to edit."""
    assert chart is _chart()
    out, docs = _render(case, release)
    return dict(out), copy.deepcopy(list(docs))


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def cluster_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    specs = [(d["metadata"]["name"], d["spec"]["rayClusterConfig"]) for d in of_kind(docs, "RayService")]
    specs += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in of_kind(docs, "RayJob")
              if "rayClusterSpec" in d["spec"]]
    return specs


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """Every pod template inside the Ray objects: head, worker groups, job submitters."""
    pods = []
    for name, spec in cluster_specs(docs):
        pods.append((f"{name}/head", spec["headGroupSpec"]["template"]))
        pods += [(f"{name}/{g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    pods += [(f"{d['metadata']['name']}/submitter", d["spec"]["submitterPodTemplate"])
             for d in of_kind(docs, "RayJob")]
    pods += [(d["metadata"]["name"], d) for d in of_kind(docs, "Pod")]
    return pods


def serve_config(docs: list[dict]) -> dict:
    (rs,) = of_kind(docs, "RayService")
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def workers(docs: list[dict]) -> dict[str, dict]:
    (rs,) = of_kind(docs, "RayService")
    return {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])}


def ray_resources(group: dict) -> dict:
    """rayStartParams.resources is a JSON object inside a quoted JSON string ('"{\\"x\\": 1}"')."""
    return json.loads(json.loads(group["rayStartParams"]["resources"]))


# -- lint and schemas -----------------------------------------------------------------------
