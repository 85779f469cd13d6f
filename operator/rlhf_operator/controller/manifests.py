"""Pure builders of the objects a stage runs as: a ConfigMap with the stage config, a batch/v1 Job, and for
multi-process stages a headless Service. No I/O: the same pipeline always gives the same dicts.

The pod runs ``rlhf-train STAGE --config /etc/rlhf/stage.json`` (``torchrun -m rlhf_trainer ...`` when a pod runs
several processes). A multi-process stage is an Indexed Job (``completionMode: Indexed``, parallelism =
completions = nodes) under a headless Service of the Job's name, with ``subdomain`` set, so pod ``<job>-0`` is
reachable as ``<job>-0.<job>``: the rendezvous address. Ranks come from the completion index.

Retries (``podFailurePolicy``, first matching rule wins):

* the exit codes a retry cannot help (configuration error, corrupted input; :mod:`rlhf_api.entrypoint`): ``FailJob``;
* a pod with the ``DisruptionTarget`` condition (preemption, eviction, node drain): ``Ignore``, it does not count;
* the exit code of a trainer that checkpointed on SIGTERM (e.g. its pod was deleted): ``Ignore`` too;
* anything else counts against ``backoffLimit`` (= ``maxRetries``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from rlhf_api import entrypoint
from rlhf_api.spec import API_VERSION, DEFAULT_TRAINER_IMAGE, KIND, RLHFPipeline, Stage, StageCommon
from rlhf_api.stage_config import StageConfig, build_stage_config
from rlhf_operator.controller import names

CONTAINER = "trainer"
CONFIG_DIR = "/etc/rlhf"
WORKSPACE_DIR = "/workspace"
TERMINATION_GRACE_SECONDS = 120  # time to write a checkpoint after SIGTERM
#: Pod Security "restricted": the image's non-root user (rlhf_api.entrypoint.TRAINER_UID), RuntimeDefault seccomp.
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": entrypoint.TRAINER_UID,
                        "runAsGroup": entrypoint.TRAINER_UID, "fsGroup": entrypoint.TRAINER_UID,
                        "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "privileged": False, "runAsNonRoot": True,
                              "capabilities": {"drop": ["ALL"]}}
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
GPU = "nvidia.com/gpu"


@dataclass(frozen=True)
class PodLimits:
    """The platform's limits on every trainer pod (the chart's ``trainerPods`` values, operator flags): how much
    node disk the scratch workspace and (GPU stages) memory ``/dev/shm`` may take before the kubelet evicts it."""

    workspace_size_limit: str = "100Gi"
    shm_size_limit: str = "8Gi"


@dataclass(frozen=True)
class StageObjects:
    """Everything one stage runs as; ``name`` is shared by the Job, the ConfigMap and the Service."""

    stage: Stage
    name: str
    config: StageConfig
    config_map: dict[str, Any]
    job: dict[str, Any]
    service: dict[str, Any] | None


def owner_reference(doc: RLHFPipeline) -> dict[str, Any]:
    """The pipeline as the controlling owner: deleting it deletes the children (garbage collector)."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": doc.metadata.name, "uid": doc.metadata.uid,
            "controller": True, "blockOwnerDeletion": True}


def distributed_world(settings: StageCommon) -> tuple[int, int]:
    """(pods, processes per pod) of a stage."""
    return settings.distributed.nodes, settings.distributed.procs_per_node


def is_distributed(settings: StageCommon) -> bool:
    nodes, procs = distributed_world(settings)
    return nodes * procs > 1


def trainer_image(doc: RLHFPipeline, stage: Stage, default_image: str | None = None) -> str:
    """The stage's image, else the pipeline's; ``default_image`` (the operator's ``--trainer-image``) stands in
    for the built-in default, which the CRD writes into every pipeline that names none."""
    spec = doc.spec
    image = spec.stage(stage).image or spec.image
    return default_image if default_image and image == DEFAULT_TRAINER_IMAGE else image


def build_stage(doc: RLHFPipeline, stage: Stage, *, dry_run: bool = False, restarted_at: str | None = None,
                default_image: str | None = None, limits: PodLimits | None = None) -> StageObjects:
    """The ConfigMap, Job and (multi-process stages) Service of ``stage``, named by their content's hash.

    Args:
        doc: the validated pipeline, with ``metadata.uid`` (the owner) and ``spec.storage.uri`` set.
        stage: a stage that runs.
        dry_run: run ``rlhf-train --dry-run`` (validate the config in the pod, train nothing).
        restarted_at: the pipeline's restart annotation; a new value gives new names, hence a new Job.
        default_image: the operator's trainer image, used where the pipeline names the built-in default.
        limits: the emptyDirs' size limits (not part of the names: changing them restarts no running stage).
    """
    spec = doc.spec
    settings = spec.stage(stage)
    config = build_stage_config(doc, stage)
    pod_settings = settings.model_dump(mode="json", include={"image", "resources", "distributed", "node_selector",
                                                              "tolerations", "priority_class_name", "max_retries",
                                                              "active_deadline_seconds"})
    pipeline_settings = spec.model_dump(mode="json", include={"image", "image_pull_secrets", "service_account_name",
                                                              "queue_name"})
    image = trainer_image(doc, stage, default_image)
    pipeline_settings["image"] = image
    pipeline_settings["credentials"] = (spec.storage.credentials_secret.model_dump(mode="json")
                                        if spec.storage.credentials_secret else None)
    build_hash = names.content_hash({"config": config.model_dump(mode="json"), "pod": pod_settings,
                                     "pipeline": pipeline_settings, "dryRun": dry_run, "restartedAt": restarted_at})
    name = names.job_name(doc.metadata.name, stage, build_hash)
    labels = names.stage_labels(doc.metadata.name, stage)
    owner = owner_reference(doc)
    service = build_service(name, doc.metadata.namespace, labels, owner, settings.distributed.master_port) \
        if is_distributed(settings) else None
    return StageObjects(
        stage=stage,
        name=name,
        config=config,
        config_map=build_config_map(name, doc.metadata.namespace, labels, owner, config),
        job=build_job(doc, stage, name, labels, owner, config, dry_run=dry_run, with_service=service is not None,
                      image=image, limits=limits),
        service=service,
    )


def _metadata(name: str, namespace: str, labels: dict[str, str], owner: dict[str, Any],
              annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels),
                            "ownerReferences": [dict(owner)]}
    if annotations:
        meta["annotations"] = annotations
    return meta


def build_config_map(name: str, namespace: str, labels: dict[str, str], owner: dict[str, Any],
                     config: StageConfig) -> dict[str, Any]:
    """The stage config as a ConfigMap. Immutable: a changed config has another digest, hence another name."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, namespace, labels, owner, {names.ANNOTATION_CONFIG_DIGEST: config.digest}),
        "immutable": True,
        "data": {names.CONFIG_KEY: config.to_json()},
    }


def build_service(name: str, namespace: str, labels: dict[str, str], owner: dict[str, Any],
                  port: int) -> dict[str, Any]:
    """The headless Service that gives the Indexed Job's pods DNS names ``<job>-<index>.<name>``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, labels, owner),
        "spec": {
            "clusterIP": "None",
            "selector": {names.LABEL_JOB_NAME: name},
            "publishNotReadyAddresses": True,  # rendezvous happens before any readiness
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def trainer_env(doc: RLHFPipeline, stage: Stage, job: str) -> list[dict[str, Any]]:
    """The trainer container's variables: credentials as Secret references (never values), the offline
    switches, and for multi-process stages the rendezvous and rank variables (plain and torchrun's PET_*)."""
    spec = doc.spec
    settings = spec.stage(stage)
    env = [_env(k, v) for k, v in {**entrypoint.TRAINER_ENV, entrypoint.WORKSPACE_ENV: WORKSPACE_DIR}.items()]
    env += [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    secret = spec.storage.credentials_secret
    if secret is not None:
        env += [
            {"name": "AWS_ACCESS_KEY_ID",
             "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.access_key_id_key}}},
            {"name": "AWS_SECRET_ACCESS_KEY",
             "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.secret_access_key_key}}},
        ]
    if spec.storage.region:
        env.append(_env("AWS_DEFAULT_REGION", spec.storage.region))
    if is_distributed(settings):
        nodes, procs = distributed_world(settings)
        master, port = f"{job}-0.{job}", str(settings.distributed.master_port)
        env += [
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
            _env("MASTER_ADDR", master), _env("MASTER_PORT", port),
            _env("PET_NNODES", str(nodes)), _env("PET_NPROC_PER_NODE", str(procs)),
            _env("PET_NODE_RANK", "$(NODE_RANK)"), _env("PET_MASTER_ADDR", master), _env("PET_MASTER_PORT", port),
        ]
        if procs == 1:  # one process per pod: rlhf-train joins the group itself; torchrun sets these otherwise
            env += [_env("WORLD_SIZE", str(nodes)), _env("RANK", "$(NODE_RANK)"), _env("LOCAL_RANK", "0")]
    return env


def trainer_command(stage: Stage, settings: StageCommon, dry_run: bool) -> list[str]:
    args = entrypoint.trainer_args(stage, f"{CONFIG_DIR}/{names.CONFIG_KEY}", dry_run=dry_run)
    if settings.distributed.procs_per_node > 1:
        return ["torchrun", "--module", entrypoint.MODULE, *args]
    return [entrypoint.COMMAND, *args]


def _quantities(values: dict[str, int | str]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items()}


def build_job(doc: RLHFPipeline, stage: Stage, name: str, labels: dict[str, str], owner: dict[str, Any],
              config: StageConfig, *, dry_run: bool = False, with_service: bool = False,
              image: str | None = None, limits: PodLimits | None = None) -> dict[str, Any]:
    """The stage's batch/v1 Job."""
    spec = doc.spec
    settings = spec.stage(stage)
    nodes, _ = distributed_world(settings)
    container = trainer_container(doc, stage, name, image or trainer_image(doc, stage), dry_run)
    pod = pod_spec(doc, stage, name, container, with_service, limits or PodLimits())

    pod_labels = dict(labels)
    job_labels = dict(labels)
    if spec.queue_name:
        job_labels[names.LABEL_KUEUE_QUEUE] = spec.queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": settings.max_retries,
        "completions": nodes,
        "parallelism": nodes,
        # Kueue admits a queued Job by unsuspending it; without a queue the Job starts at once.
        "suspend": bool(spec.queue_name),
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": {"labels": pod_labels}, "spec": pod},
    }
    if with_service:
        job_spec["completionMode"] = "Indexed"
    if settings.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(name, doc.metadata.namespace, job_labels, owner,
                              {names.ANNOTATION_CONFIG_DIGEST: config.digest}),
        "spec": job_spec,
    }


def trainer_container(doc: RLHFPipeline, stage: Stage, name: str, image: str, dry_run: bool) -> dict[str, Any]:
    """The Job's one container: ``rlhf-train`` with the stage config mounted and a scratch workspace."""
    settings = doc.spec.stage(stage)
    resources = {k: v for k, v in (("requests", _quantities(settings.resources.requests)),
                                   ("limits", _quantities(settings.resources.limits))) if v}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": trainer_command(stage, settings, dry_run),
        "env": trainer_env(doc, stage, name),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "workspace", "mountPath": WORKSPACE_DIR}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    if resources:
        container["resources"] = resources
    return container


def pod_spec(doc: RLHFPipeline, stage: Stage, name: str, container: dict[str, Any],
             with_service: bool, limits: PodLimits) -> dict[str, Any]:
    """The Job's pod template spec: ``container``, its volumes, and the pipeline's scheduling and identity. Admitted
    under Pod Security ``restricted``: non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp;
    no ServiceAccount token (the trainer never calls the API); size-limited emptyDirs."""
    spec = doc.spec
    settings = spec.stage(stage)
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": name}},
                                     {"name": "workspace", "emptyDir": {"sizeLimit": limits.workspace_size_limit}}]
    if GPU in settings.resources.limits or GPU in settings.resources.requests:  # NCCL wants a large /dev/shm
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": limits.shm_size_limit}})
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are new pods, counted by the Job (podFailurePolicy needs Never)
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [container],
        "volumes": volumes,
    }
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": secret} for secret in spec.image_pull_secrets]
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                              for t in settings.tolerations]
    if settings.priority_class_name:
        pod["priorityClassName"] = settings.priority_class_name
    if with_service:
        pod["subdomain"] = name
    return pod


def pod_failure_policy() -> dict[str, Any]:
    """The retry rules of the module docstring, first match wins."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": sorted(entrypoint.NON_RETRYABLE_EXIT_CODES)}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                             "values": [entrypoint.EXIT_PREEMPTED]}},
    ]}
