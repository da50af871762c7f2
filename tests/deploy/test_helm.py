"""The Helm chart (helm/expertmesh), rendered offline with Helm's own engine (helm-python-sdk
binds Helm's Go SDK): lint, built-in objects against Kubernetes' schemas, RayService / RayJob
against KubeRay's CRD schemas, the serve config against the real app builder, and the values
schema refusing bad values with the key named. No cluster, no Ray runtime.
"""

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

from tests.deploy.chart import *  # noqa: F401,F403 - value sets and render helpers
from tests.deploy.chart import _chart, _render  # noqa: F401


@pytest.mark.parametrize("case", CASES)
def test_lint_reports_no_errors_or_warnings(case):
    report = helm.lint(CHART, copy.deepcopy(CASES[case]), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{K8S_VERSION}.0")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("case", CASES)
def test_builtin_objects_validate_against_kubernetes(chart, case):
    _, docs = render(chart, case)
    builtin = [d for d in docs if d["apiVersion"].split("/")[0] not in CUSTOM_GROUPS]
    assert {d["kind"] for d in builtin} <= {"Secret", "ConfigMap", "Service", "Pod", "NetworkPolicy"}
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_ray_pod_templates_validate_as_pods(chart, case):
    """The pod templates embedded in RayService / RayJob pass Kubernetes' strict Pod schema."""
    _, docs = render(chart, case)
    for name, tpl in pod_templates(docs):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **tpl.get("metadata", {})},
               "spec": tpl["spec"]}
        pod["metadata"].pop("namespace", None)
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name}: {exc.message} at {list(exc.path)}") from None


def _crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def _strict(schema):
    """The API server prunes or (strict field validation) refuses unknown fields: refuse them here."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def crd_validators(kind: str) -> tuple:
    schema = _crd_schema(kind)
    return (jsonschema.Draft7Validator(schema), jsonschema.Draft7Validator(_strict(schema)))


@pytest.mark.parametrize("case", CASES)
def test_ray_objects_validate_against_kuberay_crds(chart, case):
    _, docs = render(chart, case)
    ray_docs = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert of_kind(ray_docs, "RayService")
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        for validator in crd_validators(doc["kind"]):
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, [f"{doc['kind']} {'.'.join(map(str, e.path))}: {e.message}" for e in errors]
        # the cluster inside a RayService / RayJob is a RayCluster spec: check it against that CRD too
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec")
        if spec is not None:
            rc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}, "spec": spec}
            for validator in crd_validators("RayCluster"):
                assert not list(validator.iter_errors(rc))


def test_crd_validation_catches_misplaced_fields(chart):
    """The strict CRD check is not vacuous: a typo'd field in the rendered RayService is refused."""
    _, docs = render(chart, "defaults")
    (rs,) = of_kind(docs, "RayService")
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceType"] = 5
    _, strict = crd_validators("RayService")
    messages = [e.message for e in strict.iter_errors(rs)]
    assert any("maxReplica" in m for m in messages) and any("5 is not of type 'string'" in m for m in messages)


# -- the serving app --------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["defaults", "gpu", "cpu-only", "group-disabled"])
def test_serve_config_builds_the_app(chart, case):
    from ray.serve import Application

    from expertmesh.pipelines.serve import ServeSettings, build_app

    _, docs = render(chart, case)
    cfg = serve_config(docs)
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = cfg["applications"]
    assert app["import_path"] == "expertmesh.pipelines.serve:build_app"
    module, attr = app["import_path"].split(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is build_app
    assert isinstance(build_app(app["args"]), Application)  # construct only, deploy nothing
    settings = ServeSettings(**app["args"])
    serve = {**{"contextShards": 4, "expertGroups": 2, "modelName": "expertmesh", "maxQueue": 256,
                "checkpoint": None}, **CASES[case].get("serve", {})}
    assert (settings.context_shards, settings.expert_groups, settings.model_name, settings.max_queue,
            settings.checkpoint) == (serve["contextShards"], serve["expertGroups"], serve["modelName"],
                                     serve["maxQueue"], serve["checkpoint"])
    assert all(type(v) is int for k, v in app["args"].items() if k.startswith(("max_", "context_", "expert_")))
    if "runtimeEnv" in serve:
        assert app["runtime_env"] == serve["runtimeEnv"]
    else:
        assert "runtime_env" not in app


@pytest.mark.parametrize("case", ["defaults", "gpu", "cpu-only"])
def test_tenants_file_is_mounted_from_the_secret_on_every_serving_pod(chart, case):
    _, docs = render(chart, case)
    tenants_file = serve_config(docs)["applications"][0]["args"]["tenants_file"]
    existing = CASES[case].get("tenants", {}).get("existingSecret")
    if existing:
        assert not of_kind(docs, "Secret")
        secret_name = existing
    else:
        (secret,) = of_kind(docs, "Secret")
        secret_name = secret["metadata"]["name"]
        from expertmesh.platform.tenancy import TenantsFile

        key = Path(tenants_file).name
        parsed = TenantsFile.model_validate(yaml.safe_load(base64.b64decode(secret["data"][key])))
        assert [t.model_dump(include={"name", "api_key_sha256"}) for t in parsed.tenants] == [
            {"name": t["name"], "api_key_sha256": t["api_key_sha256"]} for t in CASES[case].get("tenants", {}).get("list", [])]
    (rs,) = of_kind(docs, "RayService")
    for name, tpl in pod_templates([rs]):
        vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
        (mount,) = [m for m in tpl["spec"]["containers"][0]["volumeMounts"] if m["name"] == "tenants"]
        assert vols["tenants"]["secret"]["secretName"] == secret_name, name
        assert Path(mount["mountPath"]) / vols["tenants"]["secret"]["items"][0]["path"] == Path(tenants_file)
        assert mount["readOnly"] is True


def test_api_key_hash_in_secret_matches_the_key(chart):
    from expertmesh.platform.tenancy import Tenants, TenantsFile

    _, docs = render(chart, "gpu")
    (secret,) = of_kind(docs, "Secret")
    tenants = Tenants(TenantsFile.model_validate(yaml.safe_load(base64.b64decode(secret["data"]["tenants.yaml"]))))
    assert tenants.authenticate(f"Bearer {KEY}") == "acme"
    assert tenants.authenticate("Bearer wrong") is None


# -- worker groups ----------------------------------------------------------------------------
def test_default_groups_declare_the_custom_resources(chart):
    _, docs = render(chart, "defaults")
    groups = workers(docs)
    assert set(groups) == {"context-shards", "experts"}
    assert groups["context-shards"]["rayStartParams"]["resources"] == '"{\\"context_shard\\":4}"'
    assert ray_resources(groups["experts"]) == {"expert_group": 2}
    for g in groups.values():
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in res["limits"] and "google.com/tpu" not in res["limits"]


def test_gpu_groups_request_gpus_and_bounds(chart):
    _, docs = render(chart, "gpu")
    (rs,) = of_kind(docs, "RayService")
    spec = rs["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] == "Conservative"
    groups = workers(docs)
    cs, ex = groups["context-shards"], groups["experts"]
    assert (cs["replicas"], cs["minReplicas"], cs["maxReplicas"]) == (2, 1, 4)
    for g, n in ((cs, 1), (ex, 2)):
        pod = g["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == n
        assert GPU_TOLERATION in pod["tolerations"]
    assert cs["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert ex["rayStartParams"]["object-store-memory"] == "10000000000"
    assert "podAntiAffinity" in ex["template"]["spec"]["affinity"]
    # 2 context-shard hosts x 4 units (autoscaling to 4 hosts) cover the 8 shards
    assert ray_resources(cs) == {"context_shard": 4} and serve_config(docs)["applications"][0]["args"]["context_shards"] == 8


def test_tpu_group(chart):
    _, docs = render(chart, "tpu")
    cs = workers(docs)["context-shards"]
    res = cs["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["google.com/tpu"] == res["limits"]["google.com/tpu"] == 4
    assert cs["numOfHosts"] == 2
    assert cs["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"


def test_disabled_group_renders_no_worker_group(chart):
    _, docs = render(chart, "group-disabled")
    groups = workers(docs)
    assert set(groups) == {"context-shards"}
    assert ray_resources(groups["context-shards"]) == {"context_shard": 4, "expert_group": 2}
    assert "experts" not in json.dumps(docs)


def test_capacity_shortfall_is_refused_with_the_numbers(chart):
    with pytest.raises(helm.HelmRenderError, match=r"serve.contextShards is 6, but the enabled workerGroups "
                                                   r"declare 4 context_shard"):
        chart.render({"serve": {"contextShards": 6}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match=r"serve.expertGroups is 2, .* declare 0 expert_group"):
        chart.render({"workerGroups": {"experts": {"disabled": True}}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match=r"workerGroups.experts: minReplicas \(3\) must not exceed "
                                                   r"maxReplicas \(2\)"):
        chart.render({"workerGroups": {"experts": {"minReplicas": 3, "maxReplicas": 2}}}, name=RELEASE)


# -- security defaults ------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_every_container_is_non_root_with_requests_and_limits(chart, case):
    _, docs = render(chart, case)
    containers = [(name, c, tpl["spec"]) for name, tpl in pod_templates(docs)
                  for c in tpl["spec"]["containers"] + tpl["spec"].get("initContainers", [])]
    for name, spec in cluster_specs(docs):
        if spec.get("enableInTreeAutoscaling"):
            containers.append((f"{name}/autoscaler", spec["autoscalerOptions"], {}))
    assert containers
    for name, c, pod in containers:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
        assert sc.get("runAsNonRoot") or pod.get("securityContext", {}).get("runAsNonRoot"), name
        assert sc.get("privileged") is not True, name
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), (name, part)


@pytest.mark.parametrize("case", CASES)
def test_ray_auth_on_and_dashboard_cluster_internal(chart, case):
    _, docs = render(chart, case)
    for name, spec in cluster_specs(docs):
        assert spec["authOptions"]["mode"] == "token", name
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", name
        assert spec["headGroupSpec"].get("enableIngress") is False, name
    assert not [d for d in docs if d["kind"] in {"Ingress", "Route", "HTTPRoute", "Gateway"}]
    assert all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for d in of_kind(docs, "Service"))
    (rs,) = of_kind(docs, "RayService")
    assert rs["spec"]["serveService"]["spec"]["type"] == "ClusterIP"
    if CASES[case].get("rayAuth", {}).get("secretName"):
        assert rs["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "ray-token"


def test_optional_blocks_leave_nothing_when_unset(chart):
    _, docs = render(chart, "defaults")
    for name, tpl in pod_templates(docs):
        spec = tpl["spec"]
        for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
            assert key not in spec, (name, key)
        env = spec["containers"][0].get("env")
        if name.endswith("/head"):  # the chart's node failure detection, nothing else
            assert env == [{"name": "RAY_health_check_period_ms", "value": "1000"},
                           {"name": "RAY_health_check_timeout_ms", "value": "2000"},
                           {"name": "RAY_health_check_failure_threshold", "value": "5"}], name
        else:
            assert env is None, name
        assert "annotations" not in tpl["metadata"] or tpl.get("kind") == "Pod", name  # the test pod's hook


def test_node_failure_detection_can_be_left_to_ray(chart):
    _, docs = render(chart, "ray-node-failure-detection")
    for name, tpl in pod_templates(docs):
        assert "env" not in tpl["spec"]["containers"][0], name


def test_gcs_fault_tolerance_keeps_the_serving_clusters_gcs_in_redis(chart):
    _, docs = render(chart, "defaults")
    assert "gcsFaultToleranceOptions" not in of_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    _, docs = render(chart, "gcs-fault-tolerance")
    ft = of_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft == {"redisAddress": "redis.ray.svc:6379", "externalStorageNamespace": "expertmesh",
                  "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis", "key": "pw"}}}}
    values = {"head": {"gcsFaultTolerance": {"enabled": True}}, "jobs": CASES["jobs"]["jobs"]}
    with pytest.raises(helm.HelmRenderError, match=r"head.gcsFaultTolerance.redisAddress: the Redis"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    values["head"]["gcsFaultTolerance"]["redisAddress"] = "redis:6379"  # a job's short-lived cluster: none
    docs = [d for d in yaml.safe_load_all(chart.render(values, name=RELEASE, namespace=NAMESPACE)
                                          .get("expertmesh/templates/rayjob-train.yaml", "")) if d]
    (job,) = of_kind(docs, "RayJob")
    assert "gcsFaultToleranceOptions" not in job["spec"]["rayClusterSpec"]


# -- jobs -------------------------------------------------------------------------------------
def test_jobs_disabled_by_default(chart):
    for case in ("defaults", "jobs-off"):
        _, docs = render(chart, case)
        assert not of_kind(docs, "RayJob") and not of_kind(docs, "ConfigMap")


def test_train_and_ingest_jobs(chart):
    _, docs = render(chart, "jobs")
    jobs = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in of_kind(docs, "RayJob")}
    train, ingest = jobs["train"], jobs["ingest"]

    argv = shlex.split(train["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "expertmesh.pipelines.train"] and argv[3] == "--config"
    (cm,) = of_kind(docs, "ConfigMap")
    assert yaml.safe_load(cm["data"]["train.yaml"]) == CASES["jobs"]["jobs"]["train"]["config"]
    from expertmesh.pipelines.train_config import TrainConfig

    assert TrainConfig.from_dict(yaml.safe_load(cm["data"]["train.yaml"])).num_workers == 32  # what the job reads
    head = train["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == "job-config"]
    assert [v for v in head["volumes"] if v["name"] == "job-config"][0]["configMap"]["name"] == cm["metadata"]["name"]
    assert Path(mount["mountPath"]) / "train.yaml" == Path(argv[4])
    assert yaml.safe_load(train["spec"]["runtimeEnvYAML"]) == {"working_dir": "s3://code/expertmesh.zip"}
    assert train["spec"]["activeDeadlineSeconds"] == 86400 and train["spec"]["shutdownAfterJobFinishes"] is True
    (trainers,) = train["spec"]["rayClusterSpec"]["workerGroupSpecs"]  # the job's own groups, not the serving ones
    assert trainers["groupName"] == "trainers"
    assert trainers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8

    assert shlex.split(ingest["spec"]["entrypoint"]) == ["python", "-m", "expertmesh.pipelines.ingest",
                                                         *CASES["jobs"]["jobs"]["ingest"]["args"]]
    assert ingest["spec"]["clusterSelector"] == {"ray.io/cluster": "prod-expertmesh-x7k2p"}
    assert "rayClusterSpec" not in ingest["spec"]
    assert ingest["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_ingest_job_needs_the_serving_cluster(chart):
    with pytest.raises(helm.HelmRenderError, match="jobs.ingest.rayClusterName is required"):
        chart.render({"jobs": {"ingest": {"enabled": True}}}, name=RELEASE, namespace=NAMESPACE)


# -- monitoring -------------------------------------------------------------------------------
def test_monitoring_off_by_default(chart):
    _, docs = render(chart, "defaults")
    assert not [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]


@pytest.mark.parametrize("case,kind", [("podmonitor", "PodMonitor"), ("servicemonitor", "ServiceMonitor")])
def test_monitor_selects_the_ray_pods_metrics_port(chart, case, kind):
    _, docs = render(chart, case)
    (mon,) = [d for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
    assert mon["kind"] == kind
    pods = [tpl for _, tpl in pod_templates(of_kind(docs, "RayService"))]
    if kind == "PodMonitor":
        selector, (ep,) = mon["spec"]["selector"]["matchLabels"], mon["spec"]["podMetricsEndpoints"]
        assert mon["metadata"]["labels"]["release"] == "prometheus"
    else:
        (svc,) = [s for s in of_kind(docs, "Service")
                  if s["metadata"]["labels"].items() >= mon["spec"]["selector"]["matchLabels"].items()]
        (ep,) = mon["spec"]["endpoints"]
        assert ep["interval"] == "15s" and svc["spec"]["ports"][0]["targetPort"] == "metrics"
        selector = svc["spec"]["selector"]
    for tpl in pods:
        assert tpl["metadata"]["labels"].items() >= selector.items()
        assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in tpl["spec"]["containers"][0]["ports"]
    assert ep["port"] == "metrics"


# -- network policy -----------------------------------------------------------------------------
def test_network_policy_off_by_default(chart):
    _, docs = render(chart, "defaults")
    assert not of_kind(docs, "NetworkPolicy")


def test_network_policy_admits_only_the_release_to_ray_and_the_data_plane(chart):
    _, docs = render(chart, "networkpolicy")
    (pol,) = of_kind(docs, "NetworkPolicy")
    spec = pol["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    for _, tpl in pod_templates(of_kind(docs, "RayService")):  # every Ray pod is under the policy
        assert tpl["metadata"]["labels"].items() >= spec["podSelector"]["matchLabels"].items()
    own, serve, dashboard, metrics = spec["ingress"]
    # all ports (Ray's and the data plane's ephemeral ones) only from the release's own pods
    assert "ports" not in own and own["from"] == [{"podSelector": {"matchLabels": spec["podSelector"]["matchLabels"]}}]
    assert serve["ports"] == [{"port": 8000, "protocol": "TCP"}] and serve["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert {p["port"] for p in dashboard["ports"]} == {8265, 52365}
    assert dashboard["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kuberay-system"}
    assert metrics["ports"] == [{"port": 8080, "protocol": "TCP"}]
    # no rule opens any port to everyone except the Serve port
    assert all("from" in rule or rule["ports"] == [{"port": 8000, "protocol": "TCP"}] for rule in spec["ingress"])


def test_network_policy_without_peers_opens_only_the_serve_port(chart):
    _, docs = render(chart, "networkpolicy-bare")
    (pol,) = of_kind(docs, "NetworkPolicy")
    own, serve = pol["spec"]["ingress"]
    assert "ports" not in own and serve == {"ports": [{"port": 8000, "protocol": "TCP"}]}


# -- names, notes, values documentation -----------------------------------------------------------
def test_long_release_names_are_truncated(chart):
    long = "a" * 53  # the longest release name Helm accepts
    docs = render(chart, "jobs", release=long)[1] + render(chart, "servicemonitor", release=long)[1]
    for d in docs:
        name = d["metadata"]["name"]
        limit = 47 if d["apiVersion"].startswith("ray.io/") else 63  # KubeRay appends to Ray object names
        assert len(name) <= limit and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), (d["kind"], name)
    for d in of_kind(docs, "RayService"):
        assert len(d["spec"]["serveService"]["metadata"]["name"]) <= 63


def test_notes_say_how_to_reach_the_api(chart):
    out, _ = render(chart, "defaults")
    notes = out["expertmesh/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} get rayservice {RELEASE}-expertmesh" in notes
    assert f"port-forward svc/{RELEASE}-expertmesh-serve-svc 8000:8000" in notes
    assert "OpenAI base URL: http://127.0.0.1:8000/v1" in notes and "/healthz" in notes
    assert "no tenants are configured" in notes
    assert "no tenants are configured" not in render(chart, "gpu")[0]["expertmesh/templates/NOTES.txt"]


def test_helm_test_pod_checks_healthz_on_the_serve_service(chart):
    _, docs = render(chart, "defaults")
    (pod,) = of_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert f"http://{RELEASE}-expertmesh-serve-svc:8000/healthz" in pod["spec"]["containers"][0]["command"][-1]


