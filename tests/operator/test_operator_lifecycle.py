"""The operator deployed by its chart drives pipelines on the real control plane: dry-run pipelines (every stage
a Job running `rlhf-train --dry-run`) for the lifecycle, without training anything."""

from __future__ import annotations

import pytest
from kubernetes import client
from operator_harness import (
    GROUP,
    PLURAL,
    VERSION,
    eventually,
    get_pipeline,
    kubectl_apply,
    pipeline_doc,
    pipeline_jobs,
    stage_status,
    succeeded_pipeline_reasons,
    wait_phase,
)

pytestmark = pytest.mark.timeout(600)

DRY_RUN = {"rlhf-operator.io/dry-run": "true"}
SPEC = {
    "model": {"uri": "s3://models/base"},
    "storage": {"uri": "s3://artifacts/runs"},
    "sft": {"dataset": {"uri": "builtin://movie-reviews/sft"}},
    "reward": {"dataset": {"uri": "s3://artifacts/pairs.jsonl"}},
    "ppo": {"prompts": {"uri": "builtin://movie-reviews/prompts-train"}},
}


def test_dry_run_pipeline_runs_each_stage_as_a_job(k8s_cluster, k8s_api, operator, k8s_namespace):
    kubectl_apply(k8s_cluster, pipeline_doc("dry", SPEC, annotations=DRY_RUN), k8s_namespace)
    body = wait_phase(k8s_api, k8s_namespace, "dry", "Succeeded", 180)
    jobs = pipeline_jobs(k8s_api, k8s_namespace, "dry")
    assert sorted(j.metadata.labels["rlhf-operator.io/stage"] for j in jobs) == ["ppo", "reward", "sft"]
    for job in jobs:
        assert job.metadata.owner_references[0].uid == body["metadata"]["uid"]
        assert job.spec.template.spec.containers[0].command[-1] == "--dry-run"
    assert [s["phase"] for s in body["status"]["stages"]] == ["Succeeded", "Skipped", "Succeeded", "Succeeded",
                                                             "Skipped"]
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == body["metadata"]["generation"] == 1
    reasons = succeeded_pipeline_reasons(k8s_api, k8s_namespace, "dry")
    assert reasons.count("StageStarting") == 3 and reasons.count("StageSucceeded") == 3 and "Succeeded" in reasons


def test_suspended_pipeline_starts_nothing_until_resumed(k8s_cluster, k8s_api, operator, k8s_namespace):
    kubectl_apply(k8s_cluster, pipeline_doc("later", {**SPEC, "suspend": True}, annotations=DRY_RUN), k8s_namespace)
    body = wait_phase(k8s_api, k8s_namespace, "later", "Suspended", 60)
    assert pipeline_jobs(k8s_api, k8s_namespace, "later") == []
    assert stage_status(body, "sft")["phase"] == "Pending" and body["status"]["currentStage"] == "sft"
    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, PLURAL, "later", {"spec": {"suspend": False}},
        _content_type="application/merge-patch+json")
    wait_phase(k8s_api, k8s_namespace, "later", "Succeeded", 180)


def test_deleting_a_pipeline_that_asks_for_it_deletes_its_artifacts(k8s_cluster, k8s_api, operator, k8s_namespace,
                                                                    pod_s3):
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=pod_s3.endpoint, region_name=pod_s3.region,
                      aws_access_key_id=pod_s3.access_key, aws_secret_access_key=pod_s3.secret_key,
                      config=Config(s3={"addressing_style": "path"}))
    storage = {"uri": f"{pod_s3.uri}/runs", "endpoint": pod_s3.endpoint, "addressingStyle": "path",
               "region": pod_s3.region, "credentialsSecret": {"name": pod_s3.secret_name},
               "keepArtifactsOnDelete": False}
    kubectl_apply(k8s_cluster, pipeline_doc("scratch", {**SPEC, "storage": storage}, annotations=DRY_RUN),
                  k8s_namespace)
    body = wait_phase(k8s_api, k8s_namespace, "scratch", "Succeeded", 180)
    assert "rlhf-operator.io/artifacts" in body["metadata"]["finalizers"]
    mine = stage_status(body, "sft")["artifactUri"].removeprefix(f"{pod_s3.uri}/") + "/model.safetensors"
    other = f"runs/{k8s_namespace}/another-pipeline/12345678/sft/model.safetensors"
    for key in (mine, other):
        s3.put_object(Bucket=pod_s3.bucket, Key=key, Body=b"weights")

    client.CustomObjectsApi(k8s_api).delete_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "scratch")

    def gone() -> bool:
        try:
            get_pipeline(k8s_api, k8s_namespace, "scratch")
        except client.ApiException as error:
            return error.status == 404
        return False

    eventually(gone, 60, "the pipeline (and its finalizer) to go")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=pod_s3.bucket).get("Contents", [])}
    assert mine not in keys and other in keys


def test_the_operator_runs_with_the_charts_least_privilege_service_account(k8s_cluster, k8s_api, operator):
    """The operator pod authenticates with the chart's ServiceAccount (its token, mounted in the pod), whose
    RBAC allows what the operator does and nothing it does not need."""
    from operator_harness import OPERATOR_NAMESPACE, RELEASE, operator_pods

    [pod] = [p for p in operator_pods(k8s_api) if p.status.phase == "Running"]
    assert pod.spec.service_account_name == RELEASE
    account = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}"

    def can(*args: str) -> bool:
        result = k8s_cluster.kubectl("auth", "can-i", f"--as={account}", *args, check=False)
        return result.stdout.strip() == "yes"

    for allowed in (("create", "jobs.batch", "-n", "default"), ("watch", "rlhfpipelines.rlhf-operator.io", "-A"),
                    ("patch", "rlhfpipelines.rlhf-operator.io", "--subresource=status", "-n", "default"),
                    ("get", "secrets", "-n", "default"), ("create", "events", "-n", "default")):
        assert can(*allowed), allowed
    for denied in (("create", "rlhfpipelines.rlhf-operator.io", "-n", "default"),
                   ("delete", "rlhfpipelines.rlhf-operator.io", "-n", "default"),
                   ("list", "secrets", "-n", "default"), ("create", "pods", "-n", "default"),
                   ("delete", "pods", "-n", "default"), ("create", "deployments.apps", "-n", "default"),
                   ("update", "clusterroles.rbac.authorization.k8s.io"), ("delete", "namespaces")):
        assert not can(*denied), denied
    kinds = sorted({d["kind"] for d in operator})
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Service",
                     "ServiceAccount"]
    container = next(d for d in operator if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_leader_election_hands_the_lease_over(k8s_api, k8s_namespace):
    from rlhf_operator.controller.leader import LeaderElector

    first = LeaderElector(k8s_api, k8s_namespace, "leader", "first", lease_s=15, renew_s=1, retry_s=0.2)
    second = LeaderElector(k8s_api, k8s_namespace, "leader", "second", lease_s=15, renew_s=1, retry_s=0.2)
    assert first.try_acquire() and not second.try_acquire()
    assert first.wait_for_leadership()
    import threading

    stop = threading.Event()
    waiter = threading.Thread(target=second.wait_for_leadership, args=(stop,), daemon=True)
    waiter.start()
    waiter.join(2)
    assert waiter.is_alive() and not second.leading.is_set()  # the standby waits while the leader renews
    first.release()
    waiter.join(10)
    assert second.leading.is_set()
    second.release()
    stop.set()
