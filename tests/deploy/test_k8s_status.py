"""`expertmesh k8s status` on constructed Kubernetes API responses, through the real `kubernetes` client.

No API server runs here. Each test builds a real `kubernetes.client.ApiClient` and replaces only the
urllib3 pool manager under its REST layer with `Canned`, which answers GETs with the response
bodies in tests/deploy/fixtures/. Those bodies were constructed by hand from KubeRay's source and
the Kubernetes API's types (below), not recorded from a live API server. The client's own URL
building, JSON deserialisation (into its V1Endpoints models) and ApiException handling all run.

Where the fixture shapes come from:

* RayService objects (rayservice-*.json): the `ray.io/v1` type as KubeRay writes it,
  ray-operator/apis/ray/v1/rayservice_types.go (json tags, `serviceStatus` deprecated and "" when
  not ready, so left out; `numServeEndpoints` left out when 0; condition types Ready and
  UpgradeInProgress with their reasons) and controllers/ray/rayservice_controller.go
  (`calculateConditions` messages: "Number of serve endpoints is greater than 0", "Number of serve
  endpoints dropped to 0", "RayService is initializing", "Both active and pending Ray clusters
  exist", "Active Ray cluster exists and no pending Ray cluster"; during a NewCluster upgrade only
  the pending cluster's applications are reported; a cluster-less slot is an empty
  RayClusterStatus, which serialises as desiredCPU/GPU/Memory/TPU "0" and `head: {}`), checked
  against the `kubectl describe rayservice` outputs in the Ray docs: RayService quickstart (KubeRay
  v1.3.0: Ready / NonZeroServeEndpoints), KubeRay observability (Ready + UpgradeInProgress /
  NoPendingCluster), "RayService worker Pods aren't ready" (worker Pods without a Serve replica are
  unready, so they sit in the Serve Service's notReadyAddresses), RayService troubleshooting
  (pendingServiceStatus application with status DEPLOY_FAILED and "Deploying app '...' failed"
  traceback message), and user posts of `kubectl describe` (Ray Cluster Status: endpoints
  client/dashboard/gcs-server/metrics/serve, head podIP/podName/serviceIP/serviceName).
  The spec is the chart's own rendering (release "expertmesh"), trimmed to what the CRD requires.
* Endpoints (endpoints-*.json): core v1 Endpoints as the API server returns them (subsets with
  addresses / notReadyAddresses carrying nodeName and a Pod targetRef, named ports); validated
  below against the Kubernetes 1.33 OpenAPI schema with kubernetes-validate in strict mode.
* Errors (status-*.json): the API server's `Status` bodies for 404 (named object missing, and the
  "the server could not find the requested resource" answer for an unknown resource type) and 403
  (RBAC "is forbidden: User ... cannot get resource ...").

Every RayService fixture is validated against the CRD's v1 schema
(tests/deploy/kuberay-crds/ray.io_rayservices.yaml, KubeRay's published CRD, vendored), closed the way the
API server prunes unknown fields, so a fixture cannot drift from the real type.
"""

from __future__ import annotations

import http
import io
import json
import urllib.parse
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import urllib3
import yaml
from kubernetes import client

from expertmesh.cli.k8s_status import format_status, rayservice_status

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CRD = Path(__file__).resolve().parent / "kuberay-crds" / "ray.io_rayservices.yaml"  # vendored, see its README
HOST = "https://k8s.test:6443"
NS, NAME = "ml", "expertmesh"
RS_PATH = f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{NAME}"
EP_PATH = f"/api/v1/namespaces/{NS}/endpoints/{NAME}-serve-svc"
RAYSERVICES = sorted(p.name for p in FIXTURES.glob("rayservice-*.json"))
ENDPOINTS = sorted(p.name for p in FIXTURES.glob("endpoints-*.json"))

# scenario -> (RayService fixture, Endpoints fixture or a 404 Status, exit code of `k8s status`)
SCENARIOS = {
    "running": ("rayservice-running.json", "endpoints-ready.json", 0),
    "starting": ("rayservice-starting.json", "status-404-endpoints.json", 1),
    "upgrading": ("rayservice-upgrading.json", "endpoints-ready.json", 0),
    "deploy-failed": ("rayservice-deploy-failed.json", "status-404-endpoints.json", 1),
    "unhealthy": ("rayservice-unhealthy.json", "endpoints-not-ready.json", 1),
}


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


# -- the canned API --------------------------------------------------------------------------------
class Canned:
    """Stands in for the urllib3.PoolManager of the client's REST layer: answers each request with a
    constructed body (a real urllib3.HTTPResponse) by URL path, and records what was asked."""

    def __init__(self, routes: dict[str, dict | tuple[int, dict]]):
        self.routes = routes
        self.requests: list[tuple[str, str, dict]] = []

    def request(self, method, url, **kwargs):
        self.requests.append((method, url, dict(kwargs.get("headers") or {})))
        parts = urllib.parse.urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == HOST, url
        if parts.path not in self.routes:
            raise AssertionError(f"unexpected request {method} {url}")
        answer = self.routes[parts.path]
        if isinstance(answer, BaseException):
            raise answer
        status, body = answer if isinstance(answer, tuple) else (answer.get("code", 200), answer)
        if body.get("kind") != "Status":
            status = 200
        headers = {"Content-Type": "application/json", "Audit-Id": "5a1f0e7c-0b7e-4d0e-9e0f-3d1c2b4a5e6f"}
        if "/endpoints/" in parts.path and status == 200:  # what a 1.33+ API server adds to v1 Endpoints
            headers["Warning"] = '299 - "v1 Endpoints is deprecated in v1.33+; use discovery.k8s.io/v1 EndpointSlice"'
        return urllib3.HTTPResponse(body=io.BytesIO(json.dumps(body).encode()), headers=headers, status=status,
                                    reason=http.HTTPStatus(status).phrase, preload_content=False)

    def clear(self):
        pass

    @property
    def paths(self) -> list[str]:
        return [urllib.parse.urlsplit(url).path for _, url, _ in self.requests]


def wired(routes: dict) -> tuple[client.CustomObjectsApi, client.CoreV1Api, Canned]:
    """Real CustomObjectsApi / CoreV1Api on one real ApiClient whose pool manager is `Canned`."""
    api = client.ApiClient(client.Configuration(host=HOST))
    canned = Canned(routes)
    api.rest_client.pool_manager = canned
    return client.CustomObjectsApi(api), client.CoreV1Api(api), canned


def scenario(name: str) -> dict:
    rs, ep, _ = SCENARIOS[name]
    return {RS_PATH: load(rs), EP_PATH: load(ep)}


def status_of(routes: dict) -> tuple[dict, Canned]:
    custom, core, canned = wired(routes)
    return rayservice_status(custom, core, NAME, NS), canned


# -- the fixtures are the real types ---------------------------------------------------------------
def _closed(schema):
    """The schema with additionalProperties: false wherever it lists properties: the API server prunes
    unknown fields of a structural CRD schema, so a real response never carries one."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def closed_crd_schema(crd_schema) -> dict:
    return _closed(crd_schema)


@pytest.mark.parametrize("fixture", RAYSERVICES)
def test_rayservice_fixture_status_matches_the_crd_v1_status_schema(fixture, closed_crd_schema):
    obj = load(fixture)
    status_schema = closed_crd_schema["properties"]["status"]
    assert set(status_schema["properties"]) >= {"activeServiceStatus", "conditions", "lastUpdateTime",
                                                "numServeEndpoints", "observedGeneration",
                                                "pendingServiceStatus", "serviceStatus"}
    jsonschema.Draft202012Validator(status_schema, format_checker=jsonschema.FormatChecker()).validate(obj["status"])
    # and the whole object (trimmed spec included) against the CRD's v1 schema
    jsonschema.Draft202012Validator(closed_crd_schema).validate(obj)
    assert (obj["apiVersion"], obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]) == \
        ("ray.io/v1", "RayService", NAME, NS)
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]


def test_closed_schema_rejects_a_misspelt_status_field(closed_crd_schema):
    status_schema = closed_crd_schema["properties"]["status"]
    bad = load("rayservice-running.json")["status"]
    bad["activeServiceStatus"]["applicationStatuses"]["expertmesh"]["deploymentStatuses"] = {}
    with pytest.raises(jsonschema.ValidationError, match="deploymentStatuses"):
        jsonschema.validate(bad, status_schema)


@pytest.mark.parametrize("fixture", ENDPOINTS)
def test_endpoints_fixture_is_a_valid_v1_endpoints(fixture):
    kubernetes_validate.validate(load(fixture), "1.33", strict=True)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fixture_pairs_agree_on_the_ready_endpoint_count(name):
    rs, ep, _ = SCENARIOS[name]
    endpoints = load(ep)
    ready = sum(len(s.get("addresses", [])) for s in endpoints.get("subsets", [])) if endpoints["kind"] == "Endpoints" else 0
    assert load(rs)["status"].get("numServeEndpoints", 0) == ready


def test_status_fixtures_are_kubernetes_status_objects():
    keys = set(client.V1Status.attribute_map.values())
    for path in FIXTURES.glob("status-*.json"):
        body = load(path.name)
        assert set(body) <= keys and body["kind"] == "Status" and body["status"] == "Failure", path.name
        assert int(path.name.split("-")[1]) == body["code"]


# -- rayservice_status through the client ----------------------------------------------------------
def test_running_service_summary_and_request_paths():
    summary, canned = status_of(scenario("running"))
    assert canned.paths == [RS_PATH, EP_PATH]
    assert all(method == "GET" for method, _, _ in canned.requests)
    assert canned.requests[0][2].get("Accept") == "application/json"
    assert summary["name"] == NAME and summary["namespace"] == NS
    assert summary["ready"] and summary["healthy"] and summary["serviceStatus"] == "Running"
    assert not summary["upgradeInProgress"]
    assert summary["conditions"] == [
        {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints",
         "message": "Number of serve endpoints is greater than 0"},
        {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster",
         "message": "Active Ray cluster exists and no pending Ray cluster"}]
    assert summary["numServeEndpoints"] == 1
    assert summary["activeCluster"] == "expertmesh-7kq2x"
    assert summary["pendingCluster"] is None  # the empty pending slot (desired* "0", head {}) is no cluster
    assert summary["applications"] == {"expertmesh": {"status": "RUNNING", "message": "",
                                                      "deployments": {"ExpertMeshServer": "HEALTHY"},
                                                      "deploymentMessages": {}}}
    assert summary["serveService"] == "expertmesh-serve-svc" and summary["serveServiceFound"]
    assert summary["endpoints"] == ["10.244.3.17:8000"]
    assert summary["notReadyEndpoints"] == 2  # the two worker Pods without a Serve replica
    json.dumps(summary)  # plain data


def test_starting_service_reports_the_pending_cluster_and_no_serve_service():
    summary, canned = status_of(scenario("starting"))
    assert canned.paths == [RS_PATH, EP_PATH]
    assert not summary["ready"] and not summary["healthy"]
    assert summary["serviceStatus"] == "NotRunning"  # absent in the object: derived from Ready=False
    assert summary["conditions"][0]["reason"] == "Initializing"
    assert summary["activeCluster"] is None and summary["applications"] == {}
    assert summary["pendingCluster"] == "expertmesh-7kq2x"
    app = summary["pendingApplications"]["expertmesh"]
    assert app["status"] == "DEPLOYING" and app["deployments"] == {"ExpertMeshServer": "UPDATING"}
    assert "taken more than 30s to initialize" in app["deploymentMessages"]["ExpertMeshServer"]
    assert summary["numServeEndpoints"] == 0 and summary["endpoints"] == [] and summary["notReadyEndpoints"] == 0
    assert summary["serveServiceFound"] is False


def test_upgrade_keeps_serving_from_the_active_cluster():
    summary, _ = status_of(scenario("upgrading"))
    assert summary["ready"] and summary["healthy"] and summary["upgradeInProgress"]
    assert (summary["activeCluster"], summary["pendingCluster"]) == ("expertmesh-7kq2x", "expertmesh-v5n8d")
    assert summary["applications"] == {}  # KubeRay reports only the pending cluster's apps while upgrading
    assert summary["pendingApplications"]["expertmesh"]["status"] == "DEPLOYING"
    assert (summary["generation"], summary["observedGeneration"]) == (2, 2)
    assert summary["endpoints"] == ["10.244.3.17:8000"]


def test_deploy_failed_application_message():
    summary, _ = status_of(scenario("deploy-failed"))
    assert not summary["ready"] and not summary["healthy"]
    app = summary["pendingApplications"]["expertmesh"]
    assert app["status"] == "DEPLOY_FAILED" and app["deployments"] == {}
    assert app["message"].startswith("Deploying app 'expertmesh' failed")
    assert "ModuleNotFoundError: No module named 'expertmesh'" in app["message"]
    text = format_status(summary)
    assert "application expertmesh: DEPLOY_FAILED" in text
    assert "ModuleNotFoundError: No module named 'expertmesh'" in text
    assert "      Deploying app 'expertmesh' failed with exception:" in text.splitlines()
    assert "lines left out; --json shows all" in text  # the long traceback: its first line and its tail


def test_unhealthy_service_with_zero_ready_endpoints():
    summary, _ = status_of(scenario("unhealthy"))
    assert not summary["ready"] and summary["serviceStatus"] == "NotRunning"
    assert summary["conditions"][0] == {"type": "Ready", "status": "False", "reason": "ZeroServeEndpoints",
                                        "message": "Number of serve endpoints dropped to 0"}
    app = summary["applications"]["expertmesh"]
    assert app["status"] == "UNHEALTHY" and app["deployments"] == {"ExpertMeshServer": "UNHEALTHY"}
    assert summary["endpoints"] == [] and summary["notReadyEndpoints"] == 2 and summary["serveServiceFound"]


def test_ready_service_with_an_unhealthy_application_is_not_healthy():
    routes = scenario("running")
    apps = routes[RS_PATH]["status"]["activeServiceStatus"]["applicationStatuses"]
    apps["expertmesh"]["status"] = "UNHEALTHY"
    summary, _ = status_of(routes)
    assert summary["ready"] and not summary["healthy"]
    assert format_status(summary).splitlines()[0] == "RayService ml/expertmesh: DEGRADED (service status Running)"


def test_readiness_without_conditions_or_without_service_status():
    routes = scenario("running")
    del routes[RS_PATH]["status"]["conditions"]  # KubeRay before 1.3
    assert status_of(routes)[0]["ready"]
    routes[RS_PATH]["status"]["serviceStatus"] = "WaitForServeDeploymentReady"
    assert not status_of(routes)[0]["ready"]
    routes = scenario("running")
    del routes[RS_PATH]["status"]["serviceStatus"]
    summary = status_of(routes)[0]
    assert summary["ready"] and summary["serviceStatus"] == "Running"


def test_a_custom_serve_service_name_is_followed():
    routes = scenario("running")
    routes[RS_PATH]["spec"]["serveService"]["metadata"]["name"] = "expertmesh-api"
    endpoints = routes.pop(EP_PATH)
    routes[f"/api/v1/namespaces/{NS}/endpoints/expertmesh-api"] = endpoints
    summary, canned = status_of(routes)
    assert canned.paths[1] == f"/api/v1/namespaces/{NS}/endpoints/expertmesh-api"
    assert summary["serveService"] == "expertmesh-api" and summary["endpoints"] == ["10.244.3.17:8000"]


def test_endpoints_without_subsets_and_ipv6_addresses():
    routes = scenario("running")
    del routes[EP_PATH]["subsets"]
    summary = status_of(routes)[0]
    assert summary["serveServiceFound"] and summary["endpoints"] == [] and summary["notReadyEndpoints"] == 0
    routes = scenario("running")
    routes[EP_PATH]["subsets"][0]["addresses"][0]["ip"] = "fd00:10:244::11"
    assert status_of(routes)[0]["endpoints"] == ["[fd00:10:244::11]:8000"]


def test_missing_rayservice_is_a_lookup_error():
    custom, core, canned = wired({RS_PATH: load("status-404-rayservice.json")})
    with pytest.raises(LookupError) as info:
        rayservice_status(custom, core, NAME, NS)
    assert str(info.value) == f"RayService {NS}/{NAME} not found"
    assert canned.paths == [RS_PATH]
    assert isinstance(info.value.__cause__, client.exceptions.ApiException)
    assert info.value.__cause__.status == 404


def test_missing_rayservice_api_names_kuberay():
    custom, core, _ = wired({RS_PATH: load("status-404-no-crd.json")})
    with pytest.raises(LookupError, match=rf"RayService {NS}/{NAME} not found: .*KubeRay operator"):
        rayservice_status(custom, core, NAME, NS)


@pytest.mark.parametrize("forbidden", ["rayservice", "endpoints"])
def test_forbidden_is_a_permission_error_naming_the_rbac_needed(forbidden):
    routes = scenario("running")
    routes[RS_PATH if forbidden == "rayservice" else EP_PATH] = load(f"status-403-{forbidden}.json")
    custom, core, _ = wired(routes)
    with pytest.raises(PermissionError) as info:
        rayservice_status(custom, core, NAME, NS)
    message = str(info.value)
    assert "rayservices.ray.io" in message and "endpoints" in message and "get" in message
    assert "system:serviceaccount:ml:ci-viewer" in message  # the API server's own explanation


def test_other_api_errors_propagate():
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    custom, core, _ = wired({RS_PATH: body})
    with pytest.raises(client.exceptions.ApiException) as info:
        rayservice_status(custom, core, NAME, NS)
    assert info.value.status == 401


# -- the report ------------------------------------------------------------------------------------
def test_format_status_running():
    text = format_status(status_of(scenario("running"))[0])
    lines = text.splitlines()
    assert lines[0] == "RayService ml/expertmesh: READY (service status Running)"
    assert "  Ready: True (NonZeroServeEndpoints): Number of serve endpoints is greater than 0" in lines
    assert "Active cluster: expertmesh-7kq2x" in lines
    assert "  application expertmesh: RUNNING" in lines
    assert "    deployment ExpertMeshServer: HEALTHY" in lines
    assert "Pending cluster: none" in lines
    assert "Serve endpoints (service expertmesh-serve-svc): 1 ready, 2 not ready" in lines
    assert lines[-1] == "  10.244.3.17:8000"


def test_format_status_starting_and_upgrading():
    text = format_status(status_of(scenario("starting"))[0])
    assert text.splitlines()[0] == "RayService ml/expertmesh: NOT READY (service status NotRunning)"
    assert "Active cluster: none" in text
    assert "Pending cluster: expertmesh-7kq2x (starting)" in text
    assert "  application expertmesh: DEPLOYING" in text
    assert "service expertmesh-serve-svc does not exist yet" in text
    text = format_status(status_of(scenario("upgrading"))[0])
    assert "Pending cluster: expertmesh-v5n8d (upgrade in progress)" in text
    assert "  UpgradeInProgress: True (BothActivePendingClustersExist)" in text
    assert "(no application status reported)" in text


def test_format_status_flags_a_status_behind_the_spec_and_a_missing_status():
    routes = scenario("running")
    routes[RS_PATH]["metadata"]["generation"] = 2
    assert "status describes generation 1; the spec is at generation 2" in format_status(status_of(routes)[0])
    routes = scenario("running")
    del routes[RS_PATH]["status"]
    summary = status_of(routes)[0]
    assert not summary["ready"] and "KubeRay has not reported any status yet" in format_status(summary)
