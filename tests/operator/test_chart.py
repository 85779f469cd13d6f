"""The Helm chart: `helm lint --strict`, `helm template` in both RBAC modes, and values.schema.json rejecting bad
values (no cluster needed; the chart is applied and run in test_operator_*.py)."""

from __future__ import annotations

import subprocess

import pytest
from operator_harness import CHART, CRD_FILE, helm, render_chart


def test_chart_lints():
    result = subprocess.run([helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_wide_install_renders_a_cluster_role():
    docs = render_chart()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
                     "CustomResourceDefinition", "Deployment", "Service", "ServiceAccount"]
    crd = next(d for d in docs if d["kind"] == "CustomResourceDefinition")
    import yaml

    assert crd == yaml.safe_load(CRD_FILE.read_text())  # the chart carries the generated CRD
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["rlhf", "operator"] and "--all-namespaces" in container["args"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "privileged": False, "capabilities": {"drop": ["ALL"]}}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two operators without leader election
    rules = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "rlhf-operator")["rules"]
    verbs = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in rules}
    assert verbs[(("",), ("secrets",))] == {"get"}  # never list or watch Secrets
    assert "update" not in verbs[(("rlhf-operator.io",), ("rlhfpipelines",))]
    assert "delete" not in verbs[(("rlhf-operator.io",), ("rlhfpipelines",))]


def test_namespaced_install_renders_roles_per_namespace_and_leader_election():
    docs = render_chart("watchNamespaces={team-a,team-b}", "replicaCount=2", "trainerImage=registry/trainer:1",
                        "storage.allowedEndpoints={http://minio.storage:9000,https://ceph.example.com}")
    roles = sorted((d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs
                   if d["kind"] in ("Role", "RoleBinding"))
    assert roles == [("Role", "rlhf-operator", "team-a"), ("Role", "rlhf-operator", "team-b"),
                     ("Role", "rlhf-operator-leader-election", "rlhf-system"),
                     ("RoleBinding", "rlhf-operator", "team-a"), ("RoleBinding", "rlhf-operator", "team-b"),
                     ("RoleBinding", "rlhf-operator-leader-election", "rlhf-system")]
    assert not [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "rlhf-operator"]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--namespace=team-a", "--namespace=team-b", "--leader-elect", "--trainer-image=registry/trainer:1",
            "--allowed-endpoint=http://minio.storage:9000", "--allowed-endpoint=https://ceph.example.com"} <= set(args)
    default_args = next(d for d in render_chart() if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert not [a for a in default_args if a.startswith("--allowed-endpoint")]  # by default: AWS S3 only
    assert {"--workspace-size-limit=100Gi", "--shm-size-limit=8Gi"} <= set(default_args)


@pytest.mark.parametrize("value", ["replicaCount=-1", "logFormat=xml", "watchNamespaces={Not_A_Namespace}",
                                   "securityContext.allowPrivilegeEscalation=true", "unknownKey=1",
                                   "storage.allowedEndpoints={minio:9000}",
                                   "storage.allowedEndpoints={http://user:pw@minio:9000}",
                                   "trainerPods.workspaceSizeLimit=lots"])
def test_values_schema_rejects_bad_values(value):
    result = subprocess.run([helm(), "template", "rlhf-operator", str(CHART), "--set", value],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "values don't meet the specifications of the schema" in result.stderr, \
        result.stderr
