"""`expertmesh k8s status` as a command: exit codes, JSON, errors, kubeconfig loading, and that
the module stays free of Ray. The canned Kubernetes API (real `kubernetes` client, answers from
tests/deploy/fixtures/) is test_k8s_status.py's."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest
import urllib3
import yaml
from kubernetes import client, config

from expertmesh.cli.k8s_status import (
    add_parser,
    load_clients,
    rayservice_status,
    run_cli,
)
from expertmesh.cli import k8s_status
from tests.deploy.test_k8s_status import (
    HOST,
    NAME,
    NS,
    RS_PATH,
    SCENARIOS,
    Canned,
    load,
    scenario,
    status_of,
    wired,
)


# -- the CLI ---------------------------------------------------------------------------------------
def cli_args(**kw) -> argparse.Namespace:
    base = {"name": NAME, "namespace": NS, "kubeconfig": None, "context": None, "json": False}
    return argparse.Namespace(**{**base, **kw})


def use_canned(monkeypatch, routes) -> Canned:
    custom, core, canned = wired(routes)
    calls = []

    def fake_load_clients(kubeconfig, context):
        calls.append((kubeconfig, context))
        return custom, core

    monkeypatch.setattr(k8s_status, "load_clients", fake_load_clients)
    canned.load_calls = calls
    return canned


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_cli_exit_code(name, monkeypatch, capsys):
    canned = use_canned(monkeypatch, scenario(name))
    assert run_cli(cli_args(kubeconfig="/tmp/kc", context="prod")) == SCENARIOS[name][2]
    assert canned.load_calls == [("/tmp/kc", "prod")]
    out = capsys.readouterr().out
    assert out.startswith("RayService ml/expertmesh: ")


def test_cli_json(monkeypatch, capsys):
    use_canned(monkeypatch, scenario("upgrading"))
    assert run_cli(cli_args(json=True)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == status_of(scenario("upgrading"))[0]


@pytest.mark.parametrize("fixture, expected", [
    ("status-404-rayservice.json", f"expertmesh: error: RayService {NS}/{NAME} not found"),
    ("status-404-no-crd.json", "is the KubeRay operator"),
    ("status-403-rayservice.json", "needs get on rayservices.ray.io and get on endpoints"),
])
def test_cli_errors_exit_2(fixture, expected, monkeypatch, capsys):
    use_canned(monkeypatch, {RS_PATH: load(fixture)})
    assert run_cli(cli_args()) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and expected in captured.err


def test_cli_unreachable_api_server_and_other_api_errors_exit_2(monkeypatch, capsys):
    down = urllib3.exceptions.MaxRetryError(None, RS_PATH, reason="Connection refused")
    use_canned(monkeypatch, {RS_PATH: down})
    assert run_cli(cli_args()) == 2
    assert "cannot reach the Kubernetes API server" in capsys.readouterr().err
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    use_canned(monkeypatch, {RS_PATH: body})
    assert run_cli(cli_args()) == 2
    assert "Kubernetes API error 401: Unauthorized" in capsys.readouterr().err


def test_cli_config_problem_exits_2(monkeypatch, capsys):
    def no_config(kubeconfig, context):
        raise config.ConfigException("Invalid kube-config file. No configuration found.")

    monkeypatch.setattr(k8s_status, "load_clients", no_config)
    assert run_cli(cli_args()) == 2
    assert "no Kubernetes configuration" in capsys.readouterr().err


def test_add_parser_wires_k8s_status():
    parser = argparse.ArgumentParser(prog="expertmesh")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["k8s", "status"])
    assert (args.name, args.namespace, args.kubeconfig, args.context, args.json) == \
        ("expertmesh", "default", None, None, False)
    assert args.func is run_cli
    args = parser.parse_args(["k8s", "status", "--name", "prod-expertmesh", "--namespace", "ml",
                              "--kubeconfig", "/tmp/kc", "--context", "gke", "--json"])
    assert (args.name, args.namespace, args.kubeconfig, args.context, args.json) == \
        ("prod-expertmesh", "ml", "/tmp/kc", "gke", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["k8s"])


# -- load_clients ----------------------------------------------------------------------------------
@pytest.fixture
def restore_default_configuration(monkeypatch):
    """load_kube_config sets the client's process-wide default Configuration; put it back after."""
    monkeypatch.setattr(client.Configuration, "_default", getattr(client.Configuration, "_default", None))


def test_load_clients_from_a_kubeconfig(tmp_path, restore_default_configuration):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "dev", "cluster": {"server": "https://dev.k8s.test:6443"}},
                     {"name": "prod", "cluster": {"server": HOST}}],
        "users": [{"name": "ci", "user": {"token": "canned-token"}}],
        "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": "ci"}},
                     {"name": "prod", "context": {"cluster": "prod", "user": "ci", "namespace": NS}}]}))
    custom, core = load_clients(str(kubeconfig), "prod")
    assert isinstance(custom, client.CustomObjectsApi) and isinstance(core, client.CoreV1Api)
    assert custom.api_client.configuration.host == HOST == core.api_client.configuration.host
    # and those clients, on the canned API, give the same report
    canned = Canned(scenario("running"))
    custom.api_client.rest_client.pool_manager = canned
    core.api_client.rest_client.pool_manager = canned
    assert rayservice_status(custom, core, NAME, NS)["healthy"]
    headers = {k.lower(): v for k, v in canned.requests[0][2].items()}
    assert headers["authorization"] == "Bearer canned-token"
    custom, _ = load_clients(str(kubeconfig), None)
    assert custom.api_client.configuration.host == "https://dev.k8s.test:6443"


def test_load_clients_falls_back_to_in_cluster_only_without_an_explicit_kubeconfig(
        tmp_path, monkeypatch, restore_default_configuration):
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "absent"))
    in_cluster = []

    def fake_in_cluster():
        in_cluster.append(True)
        client.Configuration.set_default(client.Configuration(host="https://10.96.0.1:443"))

    monkeypatch.setattr(config, "load_incluster_config", fake_in_cluster)
    custom, _ = load_clients(None, None)
    assert in_cluster == [True] and custom.api_client.configuration.host == "https://10.96.0.1:443"
    with pytest.raises(config.ConfigException, match="absent-too"):
        load_clients(str(tmp_path / "absent-too"), None)
    assert in_cluster == [True]

    def not_in_cluster():
        raise config.ConfigException("Service host/port is not set.")

    monkeypatch.setattr(config, "load_incluster_config", not_in_cluster)
    with pytest.raises(config.ConfigException, match="not running in a cluster"):
        load_clients(None, None)


def test_module_does_not_import_ray():
    tree = ast.parse(Path(k8s_status.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "argparse", "json", "sys", "typing", "kubernetes", "urllib3"}, imported
