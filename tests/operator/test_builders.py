"""The operator's pure parts: Job / Service / ConfigMap builders, Job observation, and status building,
against hand-written expectations (no cluster)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from rlhf_api.phases import PipelinePhase
from rlhf_api.spec import Stage
from rlhf_api.status import PipelineStatus
from rlhf_operator.controller import names
from rlhf_operator.controller.conditions import StageFacts, build_status, transitions
from rlhf_operator.controller.manifests import build_stage
from rlhf_operator.controller.observe import JobPhase, job_state, observation
from rlhf_operator.loading import parse_pipeline
from rlhf_operator.plan import Observed, StageObservation, plan

UID = "0b6f1f7e-2f4c-4d59-9a43-5d1d7c2a0001"


def pipeline(**spec_overrides) -> object:
    spec = {
        "model": {"uri": "s3://models/base"},
        "storage": {"uri": "s3://bucket/runs", "endpoint": "http://minio:9000",
                    "credentialsSecret": {"name": "s3-creds"}},
        "sft": {"dataset": {"uri": "builtin://movie-reviews/sft"}},
        "reward": {"dataset": {"uri": "s3://bucket/pairs.jsonl"}},
        "ppo": {"prompts": {"uri": "builtin://movie-reviews/prompts-train"},
                "distributed": {"nodes": 2, "masterPort": 29511},
                "resources": {"limits": {"nvidia.com/gpu": 1}},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "training", "nodeSelector": {"gpu": "a100"}, "activeDeadlineSeconds": 3600},
        "imagePullSecrets": ["registry"],
        "queueName": "team-a",
        **spec_overrides,
    }
    return parse_pipeline({"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
                           "metadata": {"name": "demo", "namespace": "ml", "uid": UID, "generation": 3},
                           "spec": spec})


def env_of(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_single_process_stage_is_a_plain_job_with_owner_config_and_secret_refs():
    doc = pipeline()
    sft = build_stage(doc, Stage.SFT)
    assert sft.name.startswith("demo-sft-") and len(sft.name) == len("demo-sft-") + names.HASH_LENGTH
    assert sft.service is None
    job = sft.job
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
                                                   "name": "demo", "uid": UID, "controller": True,
                                                   "blockOwnerDeletion": True}]
    assert job["metadata"]["labels"][names.LABEL_KUEUE_QUEUE] == "team-a" and job["spec"]["suspend"] is True
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    assert job["spec"]["backoffLimit"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["imagePullSecrets"] == [{"name": "registry"}]
    container = pod["containers"][0]
    assert container["command"] == ["rlhf-train", "sft", "--config", "/etc/rlhf/stage.json"]
    assert pod["volumes"][0] == {"name": "config", "configMap": {"name": sft.name}}
    env = env_of(job)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]  # a reference, never the credential
    assert "RANK" not in env and "MASTER_ADDR" not in env
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                             "values": [78, 79]}}
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert rules[2]["onExitCodes"]["values"] == [143]
    config = json.loads(sft.config_map["data"][names.CONFIG_KEY])
    assert config["stage"] == "sft" and config["digest"] == job["metadata"]["annotations"][
        names.ANNOTATION_CONFIG_DIGEST]
    assert config["outputUri"] == "s3://bucket/runs/ml/demo/0b6f1f7e/sft"
    assert sft.config_map["immutable"] is True


def test_two_node_stage_is_an_indexed_job_under_a_headless_service():
    ppo = build_stage(pipeline(), Stage.PPO)
    job, service = ppo.job, ppo.service
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == ppo.name == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": ppo.name}
    assert service["spec"]["ports"][0]["port"] == 29511
    env = env_of(job)
    assert env["MASTER_ADDR"]["value"] == f"{ppo.name}-0.{ppo.name}" == env["PET_MASTER_ADDR"]["value"]
    assert env["MASTER_PORT"]["value"] == "29511" and env["WORLD_SIZE"]["value"] == "2"
    rank_field = env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank_field.endswith("['batch.kubernetes.io/job-completion-index']")
    assert env["RANK"]["value"] == "$(NODE_RANK)" and env["PET_NODE_RANK"]["value"] == "$(NODE_RANK)"
    assert env["PET_NNODES"]["value"] == "2" and env["PET_NPROC_PER_NODE"]["value"] == "1"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training" and pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_several_processes_per_pod_run_under_torchrun():
    doc = pipeline(ppo={"prompts": {"uri": "builtin://movie-reviews/prompts-train"},
                        "distributed": {"nodes": 2, "procsPerNode": 4}})
    job = build_stage(doc, Stage.PPO).job
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["torchrun", "--module", "rlhf_trainer"]
    env = env_of(job)
    assert env["PET_NPROC_PER_NODE"]["value"] == "4" and "RANK" not in env  # torchrun sets ranks


def test_names_are_deterministic_and_follow_the_spec():
    first, again = build_stage(pipeline(), Stage.SFT), build_stage(pipeline(), Stage.SFT)
    assert first.name == again.name and first.job == again.job
    retried = build_stage(pipeline(sft={"dataset": {"uri": "builtin://movie-reviews/sft"}, "maxRetries": 3}),
                          Stage.SFT)
    assert retried.name != first.name  # a changed field names a new Job: a failed stage runs again
    assert retried.config.digest == first.config.digest  # ... without invalidating its output
    assert build_stage(pipeline(), Stage.SFT, restarted_at="2026-01-01T00:00:00Z").name != first.name
    assert build_stage(pipeline(), Stage.SFT, dry_run=True).job["spec"]["template"]["spec"]["containers"][0][
        "command"][-1] == "--dry-run"
    default = build_stage(pipeline(), Stage.SFT, default_image="registry.local/trainer:dev")
    assert default.job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/trainer:dev"
    own = build_stage(pipeline(image="mine:1"), Stage.SFT, default_image="registry.local/trainer:dev")
    assert own.job["spec"]["template"]["spec"]["containers"][0]["image"] == "mine:1"


def job(conditions=(), suspend=False, annotations=None, **status) -> dict:
    return {"metadata": {"name": "demo-sft-abc123", "annotations": annotations or {}},
            "spec": {"suspend": suspend},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                       "lastTransitionTime": "2026-01-01T00:10:00Z"} for t, r, m in conditions],
                       **status}}


def failed_pod(message: str) -> dict:
    return {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 78,
                                                                                           "message": message}}}]}}


def test_job_states_map_onto_plan_observations():
    running = job_state(job(active=1, startTime="2026-01-01T00:00:00Z"))
    assert running.phase is JobPhase.RUNNING and observation(running, manifest_ok=False).state is Observed.RUNNING
    suspended = job_state(job(suspend=True, annotations={names.ANNOTATION_SUSPENDED: "true"}))
    assert suspended.phase is JobPhase.SUSPENDED
    assert observation(suspended, manifest_ok=False).state is Observed.ABSENT  # StartStage resumes it
    queued = job_state(job(suspend=True))  # suspended by Kueue, waiting for admission
    assert queued.phase is JobPhase.QUEUED and observation(queued, manifest_ok=False).state is Observed.RUNNING
    done = job_state(job([("Complete", "CompletionsReached", "")], succeeded=1))
    assert observation(done, manifest_ok=True).state is Observed.SUCCEEDED
    no_manifest = observation(done, manifest_ok=False)
    assert no_manifest.state is Observed.FAILED and not no_manifest.retryable and "no manifest" in no_manifest.message
    config_error = job_state(job([("Failed", "PodFailurePolicy", "Container trainer failed with exit code 78")],
                                 failed=1), pods=[failed_pod('{"stage": "sft", "error": "no such dataset"}')])
    seen = observation(config_error, manifest_ok=False)
    assert seen.state is Observed.FAILED and not seen.retryable
    assert "PodFailurePolicy" in seen.message and "no such dataset" in seen.message
    assert observation(None, manifest_ok=False).state is Observed.ABSENT
    assert observation(None, manifest_ok=True).state is Observed.SUCCEEDED  # the store outranks the Jobs


def test_status_conditions_keep_transition_times_and_events_fire_once():
    doc = pipeline(ppo={"enabled": False}, queueName=None)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    sft = build_stage(doc, Stage.SFT)
    start = plan(doc.spec, {})
    facts = {Stage.SFT: StageFacts(Stage.SFT, job_name=sft.name, started=True, artifact_uri="s3://x/sft")}
    first = build_status(start, facts, PipelineStatus(), generation=3, now=t0)
    assert first.phase == PipelinePhase.RUNNING and first.current_stage == "sft"
    assert first.stages[0].phase == "Running" and first.stages[0].start_time == "2026-01-01T00:00:00Z"
    conditions = {c.type: c for c in first.conditions}
    assert conditions["Progressing"].status == "True" and conditions["Ready"].status == "False"
    assert all(c.observed_generation == 3 for c in first.conditions)
    assert [e.reason for e in transitions(PipelineStatus(), first)] == ["StageStarting"]

    t1 = t0 + dt.timedelta(minutes=5)
    again = build_status(start, facts, first, generation=3, now=t1)
    assert again.model_dump() == first.model_dump()  # nothing changed: no status write, no Event
    assert transitions(first, again) == []

    observed = {Stage.SFT: StageObservation(Observed.SUCCEEDED), Stage.REWARD: StageObservation(Observed.SUCCEEDED)}
    facts_done = {Stage.SFT: StageFacts(Stage.SFT, job_name=sft.name, metrics={"final_loss": 1.5, "note": "x"}),
                  Stage.REWARD: StageFacts(Stage.REWARD, metrics={"eval_accuracy": 0.75})}
    done = build_status(plan(doc.spec, observed), facts_done, again, generation=3, now=t1)
    conditions = {c.type: c for c in done.conditions}
    assert done.phase == PipelinePhase.SUCCEEDED and conditions["Ready"].status == "True"
    assert conditions["Ready"].last_transition_time == "2026-01-01T00:05:00Z"
    assert conditions["Degraded"].last_transition_time == "2026-01-01T00:00:00Z"  # unchanged: kept
    assert done.stages[0].metrics == {"final_loss": 1.5}
    reasons = [e.reason for e in transitions(again, done)]
    assert reasons == ["StageSucceeded", "StageSucceeded", "Succeeded"]


def test_ppo_metrics_fill_reward_kl_and_the_guardrail_condition():
    doc = pipeline(queueName=None)
    observed = {s: StageObservation(Observed.SUCCEEDED) for s in (Stage.SFT, Stage.REWARD, Stage.PPO)}
    facts = {Stage.PPO: StageFacts(Stage.PPO, metrics={"rm_score": 0.4567891, "kl": 0.0312,
                                                       "guardrail/reward_hacking_suspected": 1,
                                                       "guardrail/length_collapse": 0})}
    status = build_status(plan(doc.spec, observed), facts, PipelineStatus(), generation=1,
                          now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    assert status.reward == pytest.approx(0.4568) and status.kl == pytest.approx(0.0312)
    hacking = next(c for c in status.conditions if c.type == "RewardHackingSuspected")
    assert hacking.status == "True" and hacking.message == "PPO guardrails fired: reward_hacking_suspected"


def test_a_running_stage_without_new_steps_is_stalled():
    doc = pipeline(ppo={"enabled": False}, queueName=None)
    sft = build_stage(doc, Stage.SFT)
    running = plan(doc.spec, {Stage.SFT: StageObservation(Observed.RUNNING, 1)})
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    facts = {Stage.SFT: StageFacts(Stage.SFT, job_name=sft.name, step=40)}
    first = build_status(running, facts, PipelineStatus(), generation=1, now=t0, stall_after_s=600)
    assert first.stages[0].progress.step == 40
    later = build_status(running, facts, first, generation=1, now=t0 + dt.timedelta(minutes=11), stall_after_s=600)
    stalled = next(c for c in later.conditions if c.type == "Stalled")
    assert stalled.status == "True" and stalled.reason == "NoProgress"
    assert "since 2026-01-01T00:00:00Z" in stalled.message
    moved = {Stage.SFT: StageFacts(Stage.SFT, job_name=sft.name, step=50)}
    again = build_status(running, moved, later, generation=1, now=t0 + dt.timedelta(minutes=12), stall_after_s=600)
    assert next(c for c in again.conditions if c.type == "Stalled").status == "False"


def test_only_the_pipelines_own_objects_are_adopted():
    """Adopt-on-409: an existing object of a stage's name is used only with an ownerReference to the pipeline's uid,
    and a ConfigMap only with the very stage config it would have created (an ownerReference can be forged)."""
    from rlhf_operator.controller.reconcile import AdoptionRefused, check_adoptable

    doc = pipeline()
    ppo = build_stage(doc, Stage.PPO)
    for wanted in (ppo.config_map, ppo.service, ppo.job):
        check_adoptable(doc, wanted, json.loads(json.dumps(wanted)))  # what it created itself
        foreign = {**wanted, "metadata": {**wanted["metadata"], "ownerReferences": []}}
        with pytest.raises(AdoptionRefused, match=f"{wanted['kind']} ml/{ppo.name} already exists and is not owned"):
            check_adoptable(doc, wanted, foreign)
    forged = {**ppo.config_map, "data": {names.CONFIG_KEY: "{}"}}
    with pytest.raises(AdoptionRefused, match="holds another stage config"):
        check_adoptable(doc, ppo.config_map, forged)
    with pytest.raises(AdoptionRefused, match="holds another stage config"):
        check_adoptable(doc, ppo.config_map, {**ppo.config_map, "immutable": False})


def test_trainer_pods_meet_pod_security_restricted():
    """Non-root as the image's user, no privilege escalation, every capability dropped, RuntimeDefault seccomp, no
    ServiceAccount token, size-limited emptyDirs (the operator's limits)."""
    from pathlib import Path

    from rlhf_api import entrypoint
    from rlhf_operator.controller.manifests import PodLimits

    doc = pipeline()
    for stage, limits in ((Stage.SFT, None), (Stage.PPO, PodLimits("20Gi", "2Gi"))):
        pod = build_stage(doc, stage, limits=limits).job["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                          "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
        [container] = pod["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
        sizes = {v["name"]: v["emptyDir"].get("sizeLimit") for v in pod["volumes"] if "emptyDir" in v}
        assert sizes == ({"workspace": "100Gi"} if limits is None else {"workspace": "20Gi", "dshm": "2Gi"})
    dockerfile = (Path(__file__).resolve().parents[2] / "trainer_image" / "Dockerfile").read_text()
    assert f"USER {entrypoint.TRAINER_UID}:{entrypoint.TRAINER_UID}" in dockerfile.splitlines()
