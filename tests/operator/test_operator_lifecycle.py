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
    pipeline_events,
    pipeline_jobs,
    stage_status,
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
    reasons = [e.reason for e in pipeline_events(k8s_api, k8s_namespace, "dry")]
    assert reasons.count("StageStarting") == 3 and reasons.count("StageSucceeded") == 3 and "Succeeded" in reasons
