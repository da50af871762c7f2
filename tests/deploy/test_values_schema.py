"""The chart's values: every key documented, the schema closed and refusing bad values with the key named."""


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


def test_every_values_key_is_documented():
    """helm-docs style: each leaf value, or a map above it, has a `# --` comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: set[tuple] = set()
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in lines:
        if not line.strip():
            comment = []
            continue
        if line.lstrip().startswith("#"):
            comment.append(line.strip())
            continue
        m = re.match(r"^( *)([A-Za-z0-9_.-]+):", line)
        if not m:  # list items and block scalars belong to the key above
            comment = []
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        if any(c.startswith("# --") for c in comment):
            documented.add(tuple(k for _, k in stack))
        comment = []

    def leaves(node, path=()):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from leaves(v, path + (k,))
        else:
            yield path

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [".".join(p) for p in leaves(values)
               if not any(p[:i] in documented for i in range(1, len(p) + 1))]
    assert not missing, f"values without a `# --` comment: {missing}"


# -- the values schema ------------------------------------------------------------------------------
def test_values_schema_is_draft7_and_accepts_every_case(chart):
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    validator.validate(yaml.safe_load((CHART / "values.yaml").read_text()))
    for case, values in CASES.items():
        merged = chart.merge_values(copy.deepcopy(values))
        errors = [e.message for e in validator.iter_errors(merged)]
        assert not errors, (case, errors)
        chart.validate_schema(copy.deepcopy(values))


def test_values_schema_closes_every_object():
    """Every object users set has additionalProperties: false (maps of names declare a value type)."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                ap = node.get("additionalProperties")
                free = node.get("description", "").startswith("Kubernetes ") or path[-1] in {"global", "config"}
                assert ap is False or isinstance(ap, dict) or free, "/".join(path)
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [str(i)])

    walk(schema, ["#"])
    for key, value in schema["properties"].items():
        assert "type" in value or "$ref" in value, key


BAD_VALUES = [
    ({"serve": {"contextShards": "four"}}, "/serve/contextShards", "want integer"),
    ({"serve": {"contextShard": 4}}, "/serve", "'contextShard' not allowed"),
    ({"serve": {"runtimeEnv": {"pipx": ["x"]}}}, "/serve/runtimeEnv", "'pipx' not allowed"),
    ({"imagee": {"tag": "x"}}, "at ''", "'imagee' not allowed"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "must be one of"),
    ({"rayAuth": {"enabled": "yes"}}, "/rayAuth/enabled", "want boolean"),
    ({"workerGroups": {"experts": {"gpus": "1"}}}, "/workerGroups/experts/gpus", "want integer"),
    ({"workerGroups": {"experts": {"replica": 2}}}, "/workerGroups/experts", "'replica' not allowed"),
    ({"workerGroups": {"experts": {"rayStartParams": {"num-cpus": 4}}}},
     "/workerGroups/experts/rayStartParams/num-cpus", "want string"),
    # null deletes a default in Helm: a container without limits is refused
    ({"workerGroups": {"experts": {"resources": {"limits": None}}}}, "/workerGroups/experts/resources", "'limits'"),
    ({"head": {"resources": {"requests": {"memory": None}}}}, "/head/resources/requests", "'memory'"),
    ({"workerGroups": {"experts": {"tolerations": [{"key": "a", "efect": "NoSchedule"}]}}},
     "/workerGroups/experts/tolerations/0", "'efect' not allowed"),
    ({"workerGroups": {"Big_Group": {"replicas": 1, "minReplicas": 1, "maxReplicas": 1, "resources": SMALL}}},
     "Big_Group", "pattern"),
    ({"tenants": {"list": [{"name": "a", "api_key_sha256": "not-a-hash"}]}},
     "/tenants/list/0/api_key_sha256", "pattern"),
    ({"tenants": {"list": [{"name": "a", "api_key": "x" * 64}]}}, "/tenants/list/0", "api_key"),
    ({"jobs": {"train": {"enabled": True, "args": [{"x": 1}]}}}, "/jobs/train/args/0", "want"),
    ({"monitoring": {"kind": "Probe"}}, "/monitoring/kind", "must be one of"),
    ({"monitoring": {"dashboard": {"enable": True}}}, "/monitoring/dashboard", "'enable' not allowed"),
    ({"monitoring": {"dashboard": {"namespace": "Monitoring"}}}, "/monitoring/dashboard/namespace", "pattern"),
    ({"serve": {"service": {"type": "External"}}}, "/serve/service/type", "must be one of"),
]


@pytest.mark.parametrize("values,where,what", BAD_VALUES, ids=[w for _, w, _ in BAD_VALUES])
def test_bad_values_are_refused_with_the_key_named(chart, values, where, what):
    for call in (lambda: chart.validate_schema(copy.deepcopy(values)),
                 lambda: chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)):
        with pytest.raises(helm.HelmValuesError) as exc:
            call()
        assert where in str(exc.value) and what in str(exc.value), str(exc.value)
    report = helm.lint(CHART, copy.deepcopy(values))
    assert any(where in e for e in report["errors"]), report
