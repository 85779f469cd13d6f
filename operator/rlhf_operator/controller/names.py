"""Labels, annotations and names of everything the operator creates for a pipeline.

A stage's Job, its ConfigMap (the stage config) and, for multi-node stages, its headless Service share one
name: ``<pipeline>-<stage>-<hash>``. The hash covers everything the Job is built from (the stage config with
its digest, the stage's pod settings, the pipeline's image/pull secrets/ServiceAccount/queue, and the
``rlhf-operator.io/restartedAt`` annotation), so:

* the same spec always gives the same name: a restarted operator finds and adopts its Job instead of creating
  another (a second create is answered 409 AlreadyExists);
* a changed spec gives a new name: a failed stage runs again after the user changes a field (or sets the
  restart annotation), and a finished stage whose inputs changed runs again, while stages that did not change
  keep their Jobs and outputs.

Pipeline names are at most 40 characters (the CRD says so), so names stay within 63 and ``<job>-<index>`` is
a valid pod hostname.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rlhf_api.spec import GROUP, Stage

MANAGED_BY = "rlhf-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_PIPELINE = f"{GROUP}/pipeline"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods

ANNOTATION_CONFIG_DIGEST = f"{GROUP}/config-digest"
#: set by the operator on a Job it suspended because of spec.suspend (a Job suspended by Kueue has none)
ANNOTATION_SUSPENDED = f"{GROUP}/suspended-by-pipeline"
#: on a pipeline: any new value restarts the current stage and retries a failed one (like `kubectl rollout restart`)
ANNOTATION_RESTARTED_AT = f"{GROUP}/restartedAt"
#: on a pipeline: "true" runs every stage as `rlhf-train --dry-run` (validates configs in pods; trains nothing)
ANNOTATION_DRY_RUN = f"{GROUP}/dry-run"

CONFIG_KEY = "stage.json"
HASH_LENGTH = 6


def selector(pipeline: str) -> dict[str, str]:
    """Labels that select every child of a pipeline."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_PIPELINE: pipeline}


def stage_labels(pipeline: str, stage: Stage) -> dict[str, str]:
    return {
        LABEL_NAME: "rlhf-trainer",
        LABEL_INSTANCE: pipeline,
        **selector(pipeline),
        LABEL_STAGE: stage.value,
    }


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def content_hash(payload: Any, length: int = HASH_LENGTH) -> str:
    """A short, stable hash of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


def job_name(pipeline: str, stage: Stage, build_hash: str) -> str:
    return f"{pipeline}-{stage.value}-{build_hash}"
