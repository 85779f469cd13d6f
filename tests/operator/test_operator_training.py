"""Pipelines trained for real by the chart-deployed operator on the real control plane, with MinIO as the store:
the whole pipeline on a tiny model across an operator restart (with a 2-node PPO stage whose pods rendezvous
over the headless Service), a ZeRO-3 PPO stage on two pods with the real SmolLM2-135M, and a stage's lifecycle
on a tiny model (pod deleted, suspend/resume, a configuration error fixed by the user, deletion)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from kubernetes import client
from operator_harness import (
    GROUP,
    PLURAL,
    VERSION,
    eventually,
    example_spec,
    get_pipeline,
    kubectl_apply,
    operator_metrics,
    operator_pods,
    pipeline_doc,
    pipeline_jobs,
    stage_status,
    succeeded_pipeline_reasons,
    tiny_spec,
    wait_operator_running,
    wait_phase,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "movie-reviews"
STAGES = ["sft", "preferences", "reward", "ppo", "evaluate"]


def s3_client(s3):
    return boto3.client("s3", endpoint_url=s3.endpoint, region_name=s3.region, aws_access_key_id=s3.access_key,
                        aws_secret_access_key=s3.secret_key, config=Config(s3={"addressing_style": "path"}))


def read_object(s3, uri: str) -> bytes | None:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        return s3_client(s3).get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3_client(s3).exceptions.NoSuchKey:
        return None


def pod_log(cluster, namespace: str, pod: str) -> str:
    return "".join(path.read_text(errors="replace") for path in cluster.pod_log_files(namespace)
                   if path.name.startswith(f"{namespace}_{pod}_"))


def test_example_pipeline_succeeds_across_an_operator_restart_with_a_two_node_ppo_stage(
        k8s_cluster, k8s_api, operator, k8s_namespace, pod_s3, tiny_model_dir):
    spec = example_spec(tiny_model_dir, pod_s3)  # examples/kind-pipeline.yaml: PPO on 2 pods
    assert spec["ppo"]["distributed"] == {"nodes": 2}
    kubectl_apply(k8s_cluster, pipeline_doc("tiny", spec), k8s_namespace)

    # Kill the operator (no grace) while the pipeline is in its second stage; the Deployment starts another.
    eventually(lambda: stage_status(get_pipeline(k8s_api, k8s_namespace, "tiny"), "preferences")["phase"] == "Running"
               if (get_pipeline(k8s_api, k8s_namespace, "tiny").get("status") or {}).get("stages") else False,
               300, "the preferences stage to run")
    [old] = operator_pods(k8s_api)
    client.CoreV1Api(k8s_api).delete_namespaced_pod(old.metadata.name, old.metadata.namespace, grace_period_seconds=0)
    eventually(lambda: old.metadata.name not in {p.metadata.name for p in operator_pods(k8s_api)}, 60,
               "the old operator pod to go")
    new = wait_operator_running(k8s_api)
    assert new != old.metadata.name

    body = wait_phase(k8s_api, k8s_namespace, "tiny", ("Succeeded", "Failed"), 900)
    status = body["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)

    # Zero duplicate Jobs: one per stage, each Complete, each owned by the pipeline.
    jobs = pipeline_jobs(k8s_api, k8s_namespace, "tiny")
    assert sorted(j.metadata.labels["rlhf-operator.io/stage"] for j in jobs) == sorted(STAGES)
    for job in jobs:
        assert any(c.type == "Complete" and c.status == "True" for c in job.status.conditions)
        assert job.metadata.owner_references[0].uid == body["metadata"]["uid"]

    # The 2-node PPO stage: an Indexed Job of two pods under a headless Service of the Job's name.
    [ppo_job] = [j for j in jobs if j.metadata.labels["rlhf-operator.io/stage"] == "ppo"]
    assert ppo_job.spec.completion_mode == "Indexed" and ppo_job.spec.completions == 2
    service = client.CoreV1Api(k8s_api).read_namespaced_service(ppo_job.metadata.name, k8s_namespace)
    assert service.spec.cluster_ip == "None"
    ppo_pods = client.CoreV1Api(k8s_api).list_namespaced_pod(
        k8s_namespace, label_selector=f"batch.kubernetes.io/job-name={ppo_job.metadata.name}").items
    assert sorted(p.spec.hostname for p in ppo_pods) == [f"{ppo_job.metadata.name}-0", f"{ppo_job.metadata.name}-1"]
    assert all(p.status.phase == "Succeeded" and p.spec.subdomain == ppo_job.metadata.name for p in ppo_pods)
    if k8s_cluster.local:  # both ranks trained; rank 0 alone published
        logs = {p.spec.hostname: pod_log(k8s_cluster, k8s_namespace, p.metadata.name) for p in ppo_pods}
        assert "published" in logs[f"{ppo_job.metadata.name}-0"]
        assert "published" not in logs[f"{ppo_job.metadata.name}-1"]

    # Every stage's manifest is in MinIO, and the status says what it holds.
    for name in STAGES:
        entry = stage_status(body, name)
        assert entry["phase"] == "Succeeded" and entry["attempts"] == 1, entry
        assert re.fullmatch(r"[0-9a-f]{64}", entry["manifestDigest"])
        manifest = json.loads(read_object(pod_s3, entry["artifactUri"] + "/manifest.json"))
        assert manifest["stage"] == name and manifest["config_digest"] == entry["configDigest"]
        for listed in manifest["files"][:3]:
            assert read_object(pod_s3, f"{entry['artifactUri']}/{listed['path']}") is not None
        assert entry["startTime"] <= entry["completionTime"]
    assert stage_status(body, "ppo")["metrics"]["steps"] == 2.0
    assert "kl" in stage_status(body, "ppo")["metrics"]

    # Printer columns and conditions.
    assert status["currentStage"] == "evaluate" and isinstance(status["reward"], float)
    assert isinstance(status["kl"], float)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Degraded"]["status"] == "False"
    assert conditions["RewardHackingSuspected"]["status"] in ("True", "False")
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    assert body["metadata"]["generation"] == 1  # the controller never wrote spec
    table = k8s_cluster.kubectl("get", "rlhf", "tiny", "-n", k8s_namespace).stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "STAGE", "PHASE", "REWARD", "KL"]
    assert table[1].split()[:3] == ["tiny", "evaluate", "Succeeded"]

    # Events: each transition exactly once, even across the restart.
    reasons = succeeded_pipeline_reasons(k8s_api, k8s_namespace, "tiny")
    assert reasons.count("StageStarting") == 5 and reasons.count("StageSucceeded") == 5, reasons
    assert reasons.count("Succeeded") == 1
    assert 'rlhf_operator_pipelines{phase="Succeeded"}' in operator_metrics(k8s_api)


SMOLLM2 = "builtin://smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_dir():
    """SmolLM2-135M-Instruct as safetensors in this machine's cache (converted from its PyPI wheel once), where
    the pods find it too (the node agent gives them the machine's cache folder)."""
    from rlhf_trainer.builtin_models import builtin_model_dir

    return builtin_model_dir(SMOLLM2)


def safetensors_shapes(data_header: bytes) -> dict[str, list[int]]:
    """Each tensor's shape, from a safetensors file's first bytes (its 8-byte length and JSON header)."""
    size = int.from_bytes(data_header[:8], "little")
    header = json.loads(data_header[8:8 + size])
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def stored_safetensors_shapes(s3, uri: str) -> dict[str, list[int]]:
    """The tensor shapes of a safetensors file in the store, read from its header alone (two ranged GETs)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    head = s3_client(s3).get_object(Bucket=bucket, Key=key, Range="bytes=0-7")["Body"].read()
    size = int.from_bytes(head, "little")
    rest = s3_client(s3).get_object(Bucket=bucket, Key=key, Range=f"bytes=8-{7 + size}")["Body"].read()
    return safetensors_shapes(head + rest)


def smollm2_zero3_spec(s3, pairs_uri: str) -> dict:
    """SmolLM2-135M with PPO under ZeRO-3 on two pods, as cheap as the real model allows: pi_SFT is the base model
    (SFT off), the reward model trains one step on the user's own pairs (preferences off) from the base's first
    layer only, PPO makes one step of two rollouts, and nothing is evaluated."""
    return {
        "model": {"uri": SMOLLM2},
        "storage": {"uri": f"{s3.uri}/runs", "endpoint": s3.endpoint, "region": s3.region,
                    "addressingStyle": "path", "credentialsSecret": {"name": s3.secret_name}},
        "sft": {"enabled": False},
        "preferences": {"enabled": False},
        "reward": {"dataset": {"uri": pairs_uri}, "numLayers": 1, "evalFraction": 0.0, "maxSteps": 1,
                   "perDeviceTrainBatchSize": 4, "maxLength": 96, "learningRate": 1e-4},
        "ppo": {"prompts": {"uri": "builtin://movie-reviews/prompts-train", "limit": 4}, "batchSize": 2,
                "miniBatchSize": 2, "totalEpisodes": 2, "numPpoEpochs": 1, "learningRate": 1e-6,
                "generation": {"maxNewTokens": 8, "temperature": 1.0},
                "distributed": {"nodes": 2, "zeroStage": 3}},
        "evaluate": {"enabled": False},
    }


def upload_pairs(s3, key: str) -> str:
    """Four preference pairs (prompt, chosen, rejected) on the demo's prompts, as a user's own JSON Lines file."""
    prompts = [json.loads(line)["prompt"] for line in
               (EXAMPLE_DATA / "prompts-train.jsonl").read_text().splitlines()[:4]]
    rows = [{"prompt": p, "chosen": "A warm, funny and moving film.", "rejected": "A dull, tedious mess."}
            for p in prompts]
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    s3_client(s3).put_object(Bucket=s3.bucket, Key=key, Body=body)
    return f"{s3.uri}/{key}"


def test_a_two_pod_zero3_ppo_stage_on_smollm2_succeeds(k8s_cluster, k8s_api, operator, k8s_namespace, pod_s3,
                                                        smollm2_dir):
    spec = smollm2_zero3_spec(pod_s3, upload_pairs(pod_s3, "data/pairs.jsonl"))
    kubectl_apply(k8s_cluster, pipeline_doc("zero3", spec), k8s_namespace)
    body = wait_phase(k8s_api, k8s_namespace, "zero3", ("Succeeded", "Failed"), 780)
    assert body["status"]["phase"] == "Succeeded", json.dumps(body["status"], indent=1)

    # The PPO stage: an Indexed Job of two pods, both Succeeded, each on its first attempt.
    jobs = pipeline_jobs(k8s_api, k8s_namespace, "zero3")
    assert sorted(j.metadata.labels["rlhf-operator.io/stage"] for j in jobs) == ["ppo", "reward"]
    [ppo_job] = [j for j in jobs if j.metadata.labels["rlhf-operator.io/stage"] == "ppo"]
    assert ppo_job.spec.completion_mode == "Indexed" and ppo_job.spec.completions == 2
    assert ppo_job.status.succeeded == 2 and not ppo_job.status.failed
    ppo_pods = client.CoreV1Api(k8s_api).list_namespaced_pod(
        k8s_namespace, label_selector=f"batch.kubernetes.io/job-name={ppo_job.metadata.name}").items
    assert sorted(p.spec.hostname for p in ppo_pods) == [f"{ppo_job.metadata.name}-0", f"{ppo_job.metadata.name}-1"]
    assert all(p.status.phase == "Succeeded" for p in ppo_pods)

    # Its status shows its metrics; its output is the whole model, every tensor gathered from the two shards
    # (an ungathered ZeRO-3 save writes each as an empty [0] tensor).
    ppo = stage_status(body, "ppo")
    assert ppo["phase"] == "Succeeded" and ppo["attempts"] == 1, ppo
    assert ppo["metrics"]["steps"] == 1.0 and {"kl", "rm_score"} <= set(ppo["metrics"]), ppo["metrics"]
    manifest = json.loads(read_object(pod_s3, ppo["artifactUri"] + "/manifest.json"))
    assert "model.safetensors" in {f["path"] for f in manifest["files"]}
    published = stored_safetensors_shapes(pod_s3, ppo["artifactUri"] + "/model.safetensors")
    with (smollm2_dir / "model.safetensors").open("rb") as checkpoint:
        base = safetensors_shapes(checkpoint.read(1 << 20))
    assert sorted(published) == sorted(base)
    embeddings = "model.embed_tokens.weight"  # one row more when the stage added a pad token
    assert published[embeddings][1:] == base[embeddings][1:] and published[embeddings][0] >= base[embeddings][0]
    assert {n: s for n, s in published.items() if n != embeddings} == {n: s for n, s in base.items()
                                                                       if n != embeddings}

    if k8s_cluster.local:  # rank 1 ran as the second of two processes under ZeRO-3, holding half of each model
        logs = {p.spec.hostname: pod_log(k8s_cluster, k8s_namespace, p.metadata.name) for p in ppo_pods}
        rank1 = logs[f"{ppo_job.metadata.name}-1"]
        found = re.search(r"ppo: ZeRO-3, process 1 of 2 holds (.*)", rank1)
        assert found, rank1[-3000:]
        held = {role: (float(h), float(t)) for role, h, t in re.findall(r"(\w+) ([\d.]+)M of ([\d.]+)M", found[1])}
        assert {"policy", "value"} <= set(held) and held["policy"][1] > 100, found[0]  # SmolLM2: 134.5M
        assert all(abs(h / t - 0.5) < 0.01 for h, t in held.values()), found[0]
        assert "published" in logs[f"{ppo_job.metadata.name}-0"] and "published" not in rank1


def patch_spec(api, namespace: str, name: str, spec: dict) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                                {"spec": spec},
                                                                _content_type="application/merge-patch+json")


class StepWatch(list):
    """Steps seen in a stage's ``status.stages[].progress`` by a background poller (``stop`` ends it)."""

    stop: threading.Event


def watch_live_steps(entry, interval_s: float = 1.0) -> StepWatch:
    seen = StepWatch()
    seen.stop = threading.Event()

    def poll() -> None:
        while not seen.stop.wait(interval_s):
            try:
                step = ((entry() or {}).get("progress") or {}).get("step")
            except Exception:  # noqa: BLE001 - a failed read is retried on the next tick
                continue
            if step is not None and (not seen or seen[-1] != step):
                seen.append(step)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def checkpoint_step(s3, output_uri: str) -> int:
    raw = read_object(s3, output_uri + "/checkpoints/latest.json")
    return json.loads(raw)["global_step"] if raw else 0


def test_stage_lifecycle_suspend_resume_pod_deletion_config_error_and_deletion(
        k8s_cluster, k8s_api, operator, k8s_namespace, pod_s3, tiny_model_dir):
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    spec = tiny_spec(tiny_model_dir, pod_s3, reward=None, ppo=None, evaluate=None)
    spec["sft"].update(maxSteps=120, saveSteps=10, loggingSteps=10)
    good_prompts = spec["preferences"]["prompts"]
    spec["preferences"]["prompts"] = {"uri": "builtin://movie-reviews/no-such-prompts"}
    kubectl_apply(k8s_cluster, pipeline_doc("life", spec), k8s_namespace)

    def sft() -> dict:
        return stage_status(get_pipeline(k8s_api, k8s_namespace, "life"), "sft")

    def sft_pods() -> list:
        return core.list_namespaced_pod(k8s_namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}").items

    eventually(lambda: (get_pipeline(k8s_api, k8s_namespace, "life").get("status") or {}).get("stages"), 120,
               "a status")
    job_name, output = sft()["jobName"], sft()["artifactUri"]

    def running_sft() -> dict:
        entry = sft()
        return entry if entry["phase"] == "Running" else {}

    live_steps = watch_live_steps(running_sft)
    eventually(lambda: checkpoint_step(pod_s3, output) >= 10, 300, "a first SFT checkpoint")

    # Suspend: the Job is suspended, its pod stops (checkpointing on SIGTERM), the pipeline is Suspended.
    patch_spec(k8s_api, k8s_namespace, "life", {"suspend": True})
    body = wait_phase(k8s_api, k8s_namespace, "life", "Suspended", 60)
    eventually(lambda: batch.read_namespaced_job(job_name, k8s_namespace).spec.suspend, 60, "the Job to be suspended")
    eventually(lambda: not [p for p in sft_pods() if p.status.phase in ("Pending", "Running")], 120,
               "the SFT pod to stop")
    assert stage_status(get_pipeline(k8s_api, k8s_namespace, "life"), "sft")["phase"] == "Pending"
    paused_at = checkpoint_step(pod_s3, output)

    # Resume: the same Job runs again and the stage resumes from its checkpoint.
    patch_spec(k8s_api, k8s_namespace, "life", {"suspend": False})
    wait_phase(k8s_api, k8s_namespace, "life", "Running", 60)
    eventually(lambda: [p for p in sft_pods() if p.status.phase == "Running"], 120, "a resumed SFT pod")
    eventually(lambda: checkpoint_step(pod_s3, output) >= paused_at + 10, 300, "a checkpoint after resuming")

    # Delete the running trainer pod: the Job replaces it (not counted as a failure), which resumes again.
    [running] = [p for p in sft_pods() if p.status.phase == "Running"]
    core.delete_namespaced_pod(running.metadata.name, k8s_namespace, grace_period_seconds=30)
    eventually(lambda: [p for p in sft_pods() if p.metadata.name != running.metadata.name and
                        p.metadata.creation_timestamp > running.metadata.creation_timestamp], 120,
               "a replacement SFT pod")

    # SFT finishes; preferences fails fast on its configuration error (exit 78: FailJob, no retries).
    body = wait_phase(k8s_api, k8s_namespace, "life", "Failed", 600)
    assert stage_status(body, "sft")["phase"] == "Succeeded"
    live_steps.stop.set()
    # While it ran, the status showed the step the trainer had published (progress.json in the store).
    assert [step for step in live_steps if step > 0], live_steps
    assert max(live_steps) <= 120, live_steps  # maxSteps
    failed = stage_status(body, "preferences")
    assert failed["phase"] == "Failed" and "no-such-prompts" in failed["message"], failed
    [prefs_job] = [j for j in pipeline_jobs(k8s_api, k8s_namespace, "life")
                   if j.metadata.labels["rlhf-operator.io/stage"] == "preferences"]
    assert prefs_job.status.failed == 1  # not retried
    degraded = next(c for c in body["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "StageFailed"
    job = batch.read_namespaced_job(job_name, k8s_namespace)
    assert job.status.succeeded == 1 and not job.status.failed  # the deleted pod did not count
    assert stage_status(body, "sft")["attempts"] >= 3  # the first pod, the resumed one, the replacement
    if k8s_cluster.local:  # the pods are gone from the API; their output is in the node agent's logs
        logs = [path.read_text(errors="replace") for path in k8s_cluster.pod_log_files(k8s_namespace)
                if path.name.startswith(f"{k8s_namespace}_{job_name}-")]
        assert len(logs) >= 3 and sum("resuming sft from" in log for log in logs) >= 2

    # The user fixes the field: preferences runs again (a new Job), SFT is not redone.
    patch_spec(k8s_api, k8s_namespace, "life", {"preferences": {"prompts": good_prompts}})
    body = wait_phase(k8s_api, k8s_namespace, "life", "Succeeded", 300)
    jobs = pipeline_jobs(k8s_api, k8s_namespace, "life")
    by_stage = sorted(j.metadata.labels["rlhf-operator.io/stage"] for j in jobs)
    assert by_stage == ["preferences", "preferences", "sft"]
    assert stage_status(body, "sft")["jobName"] == job_name
    reasons = succeeded_pipeline_reasons(k8s_api, k8s_namespace, "life")
    assert {"Suspended", "Resumed", "StageFailed", "StageRetrying", "Succeeded"} <= set(reasons), reasons

    # Deleting the pipeline removes its Jobs, pods, Services and ConfigMaps; the artifacts stay.
    client.CustomObjectsApi(k8s_api).delete_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "life")
    selector = "rlhf-operator.io/pipeline=life"

    def leftovers() -> list[str]:
        found = [j.metadata.name for j in batch.list_namespaced_job(k8s_namespace, label_selector=selector).items]
        found += [p.metadata.name for p in core.list_namespaced_pod(k8s_namespace, label_selector=selector).items]
        found += [s.metadata.name for s in core.list_namespaced_service(k8s_namespace, label_selector=selector).items]
        found += [c.metadata.name for c in
                  core.list_namespaced_config_map(k8s_namespace, label_selector=selector).items]
        return found

    eventually(lambda: not leftovers(), 120, "the pipeline's children to be deleted")
    assert read_object(pod_s3, output + "/manifest.json") is not None
