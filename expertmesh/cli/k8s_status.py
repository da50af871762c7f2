"""`expertmesh k8s status`: a read-only report of an expertmesh deployment on Kubernetes.

The Helm chart (helm/expertmesh) renders a KubeRay `RayService`. This module reads that object
(`ray.io/v1`, resource `rayservices`) and the `v1` Endpoints of the Serve Service KubeRay keeps in
front of it, and summarises them: readiness, the active and pending RayClusters, each Serve
application and deployment, and the addresses that receive traffic. It only ever sends GETs, so
the caller needs no more than `get` on `rayservices.ray.io` and on `endpoints`.

How KubeRay reports a RayService (ray-operator/apis/ray/v1/rayservice_types.go,
controllers/ray/rayservice_controller.go):

* `status.conditions`: `Ready` (True when the Serve Service has a ready endpoint; reasons
  Initializing, NonZeroServeEndpoints, ZeroServeEndpoints, InitializingTimeout, ValidationFailed)
  and `UpgradeInProgress` (True while an active and a pending RayCluster both exist).
* `status.serviceStatus`: deprecated since KubeRay 1.3 and equal to the Ready condition: "Running"
  or empty, and an empty value is left out of the object. Older operators (no conditions) used
  it for their state machine ("Running", "WaitForServeDeploymentReady", ...).
* `status.activeServiceStatus` / `status.pendingServiceStatus`: the RayCluster serving traffic and
  the one being prepared (first start or a zero-downtime upgrade), each with
  `applicationStatuses` (app -> status, message, `serveDeploymentStatuses`). Both are always
  present; a slot without a cluster has no `rayClusterName`.
* `status.numServeEndpoints`: ready Pods behind the Serve Service (left out when 0).

No Ray import here: this runs on a laptop with only the `kubernetes` client.
"""

from __future__ import annotations

import argparse
import json
import sys

RAY_GROUP, RAY_VERSION, RAYSERVICE_PLURAL = "ray.io", "v1", "rayservices"
NEEDED_PERMISSIONS = "get on rayservices.ray.io and get on endpoints (core API group)"
MESSAGE_TAIL_LINES = 12  # long messages (tracebacks) are cut to their last lines in the text report


def serve_service_name(rayservice: dict) -> str:
    """The Serve Service KubeRay maintains for a RayService: spec.serveService.metadata.name when set,
    else `<rayservice-name>-serve-svc` (KubeRay's common.RayServiceServeServiceNamespacedName)."""
    custom = ((rayservice.get("spec") or {}).get("serveService") or {}).get("metadata", {}).get("name")
    return custom or f"{rayservice['metadata']['name']}-serve-svc"


# -- reading ---------------------------------------------------------------------------------------
def _api_message(exc) -> str:
    """The `message` of the Kubernetes Status object in an ApiException's body, else its reason."""
    try:
        body = json.loads(exc.body or "")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (TypeError, ValueError):
        pass
    return f"{exc.status} {exc.reason}".strip()


def _status_details(exc) -> dict:
    try:
        body = json.loads(exc.body or "")
        return (body.get("details") or {}) if isinstance(body, dict) else {}
    except (TypeError, ValueError):
        return {}


def _forbidden(exc, what: str, namespace: str) -> PermissionError:
    return PermissionError(
        f"not allowed to read {what}: {_api_message(exc)}. `expertmesh k8s status` needs "
        f"{NEEDED_PERMISSIONS} in namespace {namespace!r} (e.g. a Role with verbs [get] on "
        f"resources rayservices in apiGroup ray.io and endpoints in apiGroup \"\")")


def _read_rayservice(custom_api, name: str, namespace: str) -> dict:
    from kubernetes.client.exceptions import ApiException

    try:
        return custom_api.get_namespaced_custom_object(group=RAY_GROUP, version=RAY_VERSION, namespace=namespace,
                                                       plural=RAYSERVICE_PLURAL, name=name)
    except ApiException as exc:
        if exc.status == 404:
            if _status_details(exc).get("name") == name:
                raise LookupError(f"RayService {namespace}/{name} not found") from exc
            # The API server answers the same 404 when the resource type itself is unknown.
            raise LookupError(f"RayService {namespace}/{name} not found: this cluster does not serve "
                              f"{RAY_GROUP}/{RAY_VERSION} {RAYSERVICE_PLURAL} ({_api_message(exc)}); "
                              "is the KubeRay operator (and its CRDs) installed?") from exc
        if exc.status == 403:
            raise _forbidden(exc, f"RayService {namespace}/{name}", namespace) from exc
        raise


def _read_endpoints(core_api, service: str, namespace: str) -> dict:
    """Ready `ip:port` addresses and the count of not-ready addresses of a Service's v1 Endpoints.
    A missing Endpoints object (KubeRay creates the Service once a cluster is ready) is zero endpoints."""
    from kubernetes.client.exceptions import ApiException

    try:
        endpoints = core_api.read_namespaced_endpoints(name=service, namespace=namespace)
    except ApiException as exc:
        if exc.status == 404:
            return {"serveServiceFound": False, "endpoints": [], "notReadyEndpoints": 0}
        if exc.status == 403:
            raise _forbidden(exc, f"endpoints {namespace}/{service}", namespace) from exc
        raise
    ready: list[str] = []
    not_ready = 0
    for subset in endpoints.subsets or []:
        ports = [p.port for p in subset.ports or [] if p.port is not None]
        for address in subset.addresses or []:
            host = f"[{address.ip}]" if ":" in address.ip else address.ip  # IPv6
            ready.extend([f"{host}:{port}" for port in ports] if ports else [address.ip])
        not_ready += len(subset.not_ready_addresses or [])
    return {"serveServiceFound": True, "endpoints": ready, "notReadyEndpoints": not_ready}


# -- summarising -----------------------------------------------------------------------------------
def _applications(service_status: dict) -> dict[str, dict]:
    apps = {}
    for app, info in sorted(((service_status or {}).get("applicationStatuses") or {}).items()):
        deployments = (info or {}).get("serveDeploymentStatuses") or {}
        apps[app] = {
            "status": info.get("status", ""),
            "message": info.get("message", ""),
            "deployments": {d: (s or {}).get("status", "") for d, s in sorted(deployments.items())},
            "deploymentMessages": {d: s["message"] for d, s in sorted(deployments.items())
                                   if (s or {}).get("message")},
        }
    return apps


def _is_ready(status: dict) -> bool:
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return status.get("serviceStatus") == "Running"  # KubeRay before 1.3: no conditions


def summarize(rayservice: dict, endpoints: dict) -> dict:
    """The plain-dict summary of a RayService object (as the API returns it) and its Serve endpoints."""
    meta = rayservice.get("metadata") or {}
    status = rayservice.get("status") or {}
    active = status.get("activeServiceStatus") or {}
    pending = status.get("pendingServiceStatus") or {}
    ready = _is_ready(status)
    applications = _applications(active)
    conditions = [{k: c.get(k, "") for k in ("type", "status", "reason", "message")}
                  for c in status.get("conditions") or []]
    upgrading = any(c["type"] == "UpgradeInProgress" and c["status"] == "True" for c in conditions)
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "ready": ready,
        # Ready, and every application on the active cluster RUNNING (during a zero-downtime upgrade
        # KubeRay reports the pending cluster's applications only; the active one keeps serving).
        "healthy": ready and all(a["status"] == "RUNNING" for a in applications.values()),
        "serviceStatus": status.get("serviceStatus") or ("Running" if ready else "NotRunning"),
        "upgradeInProgress": upgrading or bool(active.get("rayClusterName") and pending.get("rayClusterName")),
        "statusReported": bool(status),
        "generation": meta.get("generation"),
        "observedGeneration": status.get("observedGeneration"),
        "conditions": conditions,
        "numServeEndpoints": int(status.get("numServeEndpoints") or 0),
        "activeCluster": active.get("rayClusterName") or None,
        "applications": applications,
        "pendingCluster": pending.get("rayClusterName") or None,
        "pendingApplications": _applications(pending),
        "serveService": serve_service_name(rayservice),
        **endpoints,
    }


def rayservice_status(custom_api, core_api, name: str, namespace: str) -> dict:
    """Read RayService `namespace/name` and its Serve endpoints; return the summary (see summarize).

    custom_api: kubernetes.client.CustomObjectsApi; core_api: kubernetes.client.CoreV1Api.
    Raises LookupError when the RayService (or the RayService API) does not exist, PermissionError
    on 403; other kubernetes ApiExceptions propagate."""
    rayservice = _read_rayservice(custom_api, name, namespace)
    rayservice.setdefault("metadata", {}).setdefault("namespace", namespace)
    endpoints = _read_endpoints(core_api, serve_service_name(rayservice), namespace)
    return summarize(rayservice, endpoints)


# -- reporting -------------------------------------------------------------------------------------
def _message_lines(message: str, indent: str) -> list[str]:
    """A message indented; a long one (a traceback) as its first line and its last lines."""
    lines = message.strip().splitlines()
    if len(lines) > MESSAGE_TAIL_LINES + 1:
        cut = len(lines) - 1 - MESSAGE_TAIL_LINES
        lines = [lines[0], f"  ... ({cut} lines left out; --json shows all)"] + lines[-MESSAGE_TAIL_LINES:]
    return [indent + ln for ln in lines]


def _app_lines(apps: dict, indent: str) -> list[str]:
    if not apps:
        return [f"{indent}(no application status reported)"]
    out = []
    for app, info in apps.items():
        out.append(f"{indent}application {app}: {info['status'] or 'UNKNOWN'}")
        if info["message"]:
            out += _message_lines(info["message"], indent + "    ")
        for dep, dep_status in info["deployments"].items():
            out.append(f"{indent}  deployment {dep}: {dep_status or 'UNKNOWN'}")
            if dep in info.get("deploymentMessages", {}):
                out += _message_lines(info["deploymentMessages"][dep], indent + "      ")
    return out


def format_status(summary: dict) -> str:
    """A human-readable, multi-line report of a rayservice_status summary."""
    s = summary
    verdict = "READY" if s["healthy"] else ("DEGRADED" if s["ready"] else "NOT READY")
    out = [f"RayService {s['namespace']}/{s['name']}: {verdict} (service status {s['serviceStatus']})"]
    if not s.get("statusReported", True):
        out.append("  KubeRay has not reported any status yet: is the KubeRay operator running?")
    gen, observed = s.get("generation"), s.get("observedGeneration")
    if gen is not None and observed is not None and observed < gen:
        out.append(f"  status describes generation {observed}; the spec is at generation {gen} "
                   "(the operator has not caught up yet)")
    for c in s["conditions"]:
        reason = f" ({c['reason']})" if c["reason"] else ""
        message = f": {c['message']}" if c["message"] else ""
        out.append(f"  {c['type']}: {c['status']}{reason}{message}")
    out.append(f"Active cluster: {s['activeCluster'] or 'none'}")
    if s["activeCluster"] or s["applications"]:
        out += _app_lines(s["applications"], "  ")
    if s["pendingCluster"]:
        what = "upgrade in progress" if s["activeCluster"] else "starting"
        out.append(f"Pending cluster: {s['pendingCluster']} ({what})")
        out += _app_lines(s["pendingApplications"], "  ")
    else:
        out.append("Pending cluster: none")
    if not s["serveServiceFound"]:
        out.append(f"Serve endpoints: service {s['serveService']} does not exist yet "
                   "(KubeRay creates it once a cluster's applications are ready)")
    else:
        out.append(f"Serve endpoints (service {s['serveService']}): {len(s['endpoints'])} ready, "
                   f"{s['notReadyEndpoints']} not ready")
        out += [f"  {address}" for address in s["endpoints"]]
    return "\n".join(out)


# -- clients and CLI -------------------------------------------------------------------------------
def load_clients(kubeconfig: str | None, context: str | None):
    """(CustomObjectsApi, CoreV1Api) from a kubeconfig (`kubeconfig`, else $KUBECONFIG or
    ~/.kube/config; `context`, else its current context), falling back to the in-cluster service
    account when no kubeconfig is found. An explicit kubeconfig or context never falls back.
    Raises kubernetes.config.ConfigException when neither works."""
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=kubeconfig, context=context)
    except config.ConfigException as exc:
        if kubeconfig or context:
            raise config.ConfigException(
                f"kubeconfig {kubeconfig or '(default)'}"
                f"{f' context {context!r}' if context else ''}: {exc}") from exc
        try:
            config.load_incluster_config()
        except config.ConfigException as in_cluster:
            raise config.ConfigException(
                f"no usable kubeconfig ({exc}) and not running in a cluster ({in_cluster}); "
                "pass --kubeconfig/--context or set KUBECONFIG") from in_cluster
    return client.CustomObjectsApi(), client.CoreV1Api()


def run_cli(args: argparse.Namespace) -> int:
    """`expertmesh k8s status`: print the report (or --json); 0 when the service is ready and its
    applications RUNNING, 1 when it is not, 2 when the status cannot be read."""
    import urllib3
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException

    def fail(message: str) -> int:
        print(f"expertmesh: error: {message}", file=sys.stderr)
        return 2

    try:
        custom_api, core_api = load_clients(args.kubeconfig, args.context)
        summary = rayservice_status(custom_api, core_api, args.name, args.namespace)
    except LookupError as exc:
        return fail(f"{exc} (check --name/--namespace/--context)")
    except PermissionError as exc:
        return fail(str(exc))
    except ConfigException as exc:
        return fail(f"no Kubernetes configuration: {exc}")
    except ApiException as exc:
        return fail(f"Kubernetes API error {exc.status}: {_api_message(exc)}")
    except urllib3.exceptions.HTTPError as exc:
        return fail(f"cannot reach the Kubernetes API server: {exc}")
    print(json.dumps(summary, indent=2) if args.json else format_status(summary))
    return 0 if summary["healthy"] else 1


def add_parser(sub) -> None:
    """Add `k8s status` to the `expertmesh` command's subparsers."""
    k8s = sub.add_parser("k8s", help="inspect an expertmesh deployment on Kubernetes (read-only)")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    st = k8s_sub.add_parser("status", help="status of the chart's RayService: readiness, clusters, "
                                           "Serve applications, endpoints (exit 0 ready, 1 not, 2 error)")
    st.add_argument("--name", default="expertmesh", help="RayService name (the Helm release's fullname; "
                                                         "default expertmesh)")
    st.add_argument("--namespace", "-n", default="default", help="namespace (default: default)")
    st.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or "
                                                       "~/.kube/config, else in-cluster)")
    st.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    st.add_argument("--json", action="store_true", help="print the summary as JSON")
    st.set_defaults(func=run_cli)
