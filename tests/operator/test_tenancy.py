"""Issue 36: a pipeline author gains nothing beyond their own namespace. Attacks on the operator deployed by its
chart, on the real control plane, by a tenant identity (a ServiceAccount that may create pipelines and ConfigMaps in
its namespace and cannot read its Secrets); each refusal is visible to the tenant (admission message, or the pipeline's
status and an Event naming the field and the fix), and the attacker's endpoint (a listener on loopback inside the
test) receives no credential."""

from __future__ import annotations

import secrets

import pytest
from kubernetes import client
from operator_harness import (
    GROUP,
    PLURAL,
    VERSION,
    RecordingListener,
    eventually,
    kubectl_apply,
    pipeline_doc,
    pipeline_events,
    pipeline_jobs,
    wait_phase,
)

from rlhf_api.spec import Stage
from rlhf_api.tenancy import STORE_CREDENTIALS_LABEL

pytestmark = pytest.mark.timeout(300)

SPEC = {
    "model": {"uri": "s3://models/base"},
    "storage": {"uri": "s3://artifacts/runs", "addressingStyle": "path", "region": "us-east-1"},
    "sft": {"dataset": {"uri": "builtin://movie-reviews/sft"}},
}
LABEL = f"{STORE_CREDENTIALS_LABEL}=true"


@pytest.fixture
def tenant(k8s_api, k8s_namespace, as_service_account):
    """The attacker's identity: a ServiceAccount that may create and change RLHFPipelines and create ConfigMaps in
    its namespace, and nothing else (it cannot read the namespace's Secrets itself)."""
    from kubernetes.client import RbacAuthorizationV1Api

    rbac = RbacAuthorizationV1Api(k8s_api)
    rbac.create_namespaced_role(k8s_namespace, {"metadata": {"name": "pipeline-author"}, "rules": [
        {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "create", "patch", "update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create"]}]})
    rbac.create_namespaced_role_binding(k8s_namespace, {
        "metadata": {"name": "pipeline-author"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pipeline-author"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": k8s_namespace}]})
    return as_service_account("tenant", k8s_namespace)


def apply_as(k8s_cluster, tenant, doc, *, check: bool = True):
    return kubectl_apply(k8s_cluster, doc, tenant.namespace, kubeconfig=tenant.kubeconfig, check=check)


@pytest.fixture
def attacker():
    listener = RecordingListener()
    yield listener
    listener.close()


@pytest.fixture
def victim_secret(k8s_api, k8s_namespace):
    """A Secret of the namespace holding credentials (keys, values); unlabelled unless the test labels it."""
    keys = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    client.CoreV1Api(k8s_api).create_namespaced_secret(k8s_namespace, {"metadata": {"name": "team-creds"},
                                                                       "stringData": keys})
    return "team-creds", keys


def label_secret(k8s_api, namespace: str, name: str) -> None:
    client.CoreV1Api(k8s_api).patch_namespaced_secret(name, namespace,
                                                      {"metadata": {"labels": {STORE_CREDENTIALS_LABEL: "true"}}})


def refused(k8s_api, namespace: str, name: str, *words: str) -> str:
    """The pipeline ends Failed with a StorageRefused condition and Event whose message has ``words``; no Job.
    Returns the message."""
    body = wait_phase(k8s_api, namespace, name, "Failed", 90)
    degraded = next(c for c in body["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "StorageRefused", degraded
    message = body["status"]["message"]
    for word in words:
        assert word in message, (word, message)
    eventually(lambda: [e for e in pipeline_events(k8s_api, namespace, name) if e.reason == "StorageRefused"],
               30, "the StorageRefused event")
    assert pipeline_jobs(k8s_api, namespace, name) == []
    return message


def test_an_unlabelled_secret_is_never_read_or_sent_even_to_an_allowed_endpoint(
        k8s_cluster, k8s_api, operator, k8s_namespace, allowed_listener, victim_secret, tenant):
    if not k8s_cluster.local:
        pytest.skip("the listener is on this machine's loopback")
    name, keys = victim_secret
    spec = {**SPEC, "storage": {**SPEC["storage"], "endpoint": allowed_listener.endpoint,
                                "credentialsSecret": {"name": name}}}
    apply_as(k8s_cluster, tenant, pipeline_doc("steal", spec))
    message = refused(k8s_api, k8s_namespace, "steal", "spec.storage.credentialsSecret.name", name,
                      f"kubectl label secret {name} {LABEL}")
    assert keys["AWS_SECRET_ACCESS_KEY"] not in message
    assert allowed_listener.leaked(*keys.values()) == []


def test_credentials_go_to_no_endpoint_outside_the_allow_list(k8s_cluster, k8s_api, operator, k8s_namespace,
                                                              attacker, victim_secret, tenant):
    if not k8s_cluster.local:
        pytest.skip("the listener is on this machine's loopback")
    name, keys = victim_secret
    label_secret(k8s_api, k8s_namespace, name)  # opted in: still only for allowed endpoints
    spec = {**SPEC, "storage": {**SPEC["storage"], "endpoint": attacker.endpoint, "credentialsSecret": {"name": name}}}
    apply_as(k8s_cluster, tenant, pipeline_doc("exfil", spec))
    refused(k8s_api, k8s_namespace, "exfil", "spec.storage.endpoint", attacker.endpoint, "storage.allowedEndpoints")
    assert attacker.requests == [] and attacker.leaked(*keys.values()) == []


def test_without_a_secret_the_operator_uses_no_identity_of_its_own(k8s_cluster, k8s_api, operator, k8s_namespace,
                                                                   allowed_listener, tenant):
    if not k8s_cluster.local:
        pytest.skip("the listener is on this machine's loopback")
    before = len(allowed_listener.requests)
    spec = {**SPEC, "storage": {**SPEC["storage"], "endpoint": allowed_listener.endpoint}}
    apply_as(k8s_cluster, tenant, pipeline_doc("ambient", spec))
    refused(k8s_api, k8s_namespace, "ambient", "spec.storage.credentialsSecret", "required", LABEL)
    assert allowed_listener.requests[before:] == []


def test_a_missing_secret_is_refused_by_name(k8s_cluster, k8s_api, operator, k8s_namespace, tenant):
    spec = {**SPEC, "storage": {**SPEC["storage"], "credentialsSecret": {"name": "nope"}}}
    apply_as(k8s_cluster, tenant, pipeline_doc("missing", spec))
    refused(k8s_api, k8s_namespace, "missing", "spec.storage.credentialsSecret.name", "nope", "does not exist")


def test_a_file_storage_root_is_refused_at_admission(k8s_cluster, crd, tenant):
    spec = {**SPEC, "storage": {"uri": "file:///var/run/secrets"}}
    result = apply_as(k8s_cluster, tenant, pipeline_doc("local-files", spec), check=False)
    assert result.returncode != 0
    assert "spec.storage.uri" in result.stderr and "file:// storage roots are refused" in result.stderr, \
        result.stderr


def test_a_neighbours_config_map_of_the_stage_name_is_not_adopted(k8s_cluster, k8s_api, operator, k8s_namespace,
                                                                   tenant):
    """A neighbour who can create ConfigMaps in the namespace pre-creates the stage's (predictable) ConfigMap with
    their own stage.json, even with an ownerReference to the pipeline: the operator refuses to mount it."""
    from rlhf_operator.controller import names
    from rlhf_operator.controller.manifests import build_stage
    from rlhf_operator.loading import parse_pipeline

    dry_run = {"rlhf-operator.io/dry-run": "true"}
    apply_as(k8s_cluster, tenant, pipeline_doc("squatted", {**SPEC, "suspend": True}, annotations=dry_run))
    body = wait_phase(k8s_api, k8s_namespace, "squatted", "Suspended", 60)
    body["spec"]["suspend"] = False
    objects = build_stage(parse_pipeline(body), Stage.SFT, dry_run=True)
    config = objects.config.model_copy(update={"output_uri": "s3://neighbour/loot/sft"})
    owner = {**objects.config_map["metadata"]["ownerReferences"][0], "blockOwnerDeletion": False}
    forged = {"metadata": {"name": objects.name, "ownerReferences": [owner]},
              "immutable": True, "data": {names.CONFIG_KEY: config.to_json()}}
    client.CoreV1Api(tenant.api_client).create_namespaced_config_map(k8s_namespace, forged)  # the neighbour
    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, "squatted", {"spec": {"suspend": False}},
        _content_type="application/merge-patch+json")
    body = wait_phase(k8s_api, k8s_namespace, "squatted", ("Failed", "Succeeded"), 90)
    assert pipeline_jobs(k8s_api, k8s_namespace, "squatted") == []
    degraded = next(c for c in body["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "AdoptionRefused" and f"ConfigMap {k8s_namespace}/{objects.name}" in \
        degraded["message"] and "restartedAt" in degraded["message"], degraded


def test_stage_pods_are_admitted_under_pod_security_restricted(k8s_cluster, k8s_api, operator, k8s_namespace,
                                                              tenant):
    """The API server's Pod Security admission refuses a non-compliant pod when the Job controller creates it
    (a FailedCreate event on the Job); in a namespace enforcing ``restricted`` every stage's pods run."""
    core = client.CoreV1Api(k8s_api)
    core.patch_namespace(k8s_namespace, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
    dry_run = {"rlhf-operator.io/dry-run": "true"}
    spec = {**SPEC, "reward": {"dataset": {"uri": "s3://artifacts/pairs.jsonl"}},
            "ppo": {"prompts": {"uri": "builtin://movie-reviews/prompts-train"}, "distributed": {"nodes": 2}}}
    apply_as(k8s_cluster, tenant, pipeline_doc("restricted", spec, annotations=dry_run))
    try:
        wait_phase(k8s_api, k8s_namespace, "restricted", "Succeeded", 180)
    finally:
        refusals = [e.message for e in core.list_namespaced_event(k8s_namespace).items if e.reason == "FailedCreate"]
        assert refusals == []
    assert len(pipeline_jobs(k8s_api, k8s_namespace, "restricted")) == 3
