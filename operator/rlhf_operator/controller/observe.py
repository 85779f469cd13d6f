"""What a stage's Job and its pods say, turned into the plan's :class:`StageObservation`. Pure functions of the
objects as the API server returns them (dicts).

A Job is in one of five states:

* ``Complete`` / ``Failed``: its terminal condition is True (the Job already made every retry it may);
* ``Suspended``: the operator suspended it for ``spec.suspend`` (annotation ``rlhf-operator.io/suspended-by-
  pipeline``): nothing runs, so the plan sees the stage as Absent and its StartStage resumes the Job;
* ``Queued``: suspended by someone else, i.e. waiting for Kueue to admit it: the stage counts as Running;
* ``Running``: everything else (pods pending, running, or being replaced after a retryable failure).

A ``Complete`` Job only makes the stage Succeeded together with a verified manifest in the store (the
reconciler checks it): the manifest is the source of truth.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from rlhf_api import entrypoint
from rlhf_operator.controller import names
from rlhf_operator.plan import Observed, StageObservation


class JobPhase(str, enum.Enum):
    RUNNING = "Running"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    COMPLETE = "Complete"
    FAILED = "Failed"


@dataclass(frozen=True)
class JobState:
    """One stage Job as observed."""

    name: str
    phase: JobPhase
    attempts: int  # failures the Job counted, plus the pod running or succeeded (the status counts all pods)
    pod_name: str | None = None  # the newest pod (of index 0 for multi-node stages), when pods were listed
    start_time: str | None = None
    completion_time: str | None = None
    reason: str = ""  # of the terminal condition, e.g. BackoffLimitExceeded, PodFailurePolicy, DeadlineExceeded
    message: str = ""
    config_digest: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in (JobPhase.COMPLETE, JobPhase.FAILED)


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def _first_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods of completion index 0 (every pod of a non-indexed Job): one per attempt."""
    index = "batch.kubernetes.io/job-completion-index"
    indexed = [p for p in pods if index in (p["metadata"].get("annotations") or {})]
    if not indexed:
        return pods
    return [p for p in indexed if p["metadata"]["annotations"][index] == "0"]


def termination_error(pods: list[dict[str, Any]]) -> str:
    """The last failed trainer container's own account of the failure (its termination message,
    :func:`rlhf_api.entrypoint.reported_error`; else the last line of its log), or ''."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
    for pod in reversed(failed):
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            message = (terminated.get("message") or "").strip()
            if not message:
                continue
            reported = entrypoint.reported_error(message)
            if reported is not None:
                return reported[:300]
            if not message.startswith("{"):  # FallbackToLogsOnError: the tail of the log
                return message.splitlines()[-1][:300]
    return ""


def job_state(job: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> JobState:
    """The state of one stage Job; ``pods`` (its pods, when listed) give the attempt count and error text."""
    meta, status = job["metadata"], job.get("status") or {}
    annotations = meta.get("annotations") or {}
    attempts = int(status.get("failed") or 0) + (1 if status.get("active") or status.get("succeeded") else 0)
    first = sorted(_first_pods(pods or []), key=lambda p: p["metadata"].get("creationTimestamp") or "")
    common = dict(name=meta["name"], attempts=attempts, start_time=status.get("startTime"),
                  config_digest=annotations.get(names.ANNOTATION_CONFIG_DIGEST),
                  pod_name=first[-1]["metadata"]["name"] if first else None)
    if done := _condition(job, "Complete"):
        return JobState(phase=JobPhase.COMPLETE, completion_time=status.get("completionTime") or
                        done.get("lastTransitionTime"), reason=done.get("reason") or "Completed", **common)
    if failed := _condition(job, "Failed"):
        detail = termination_error(pods or [])
        message = failed.get("message") or failed.get("reason") or "the Job failed"
        return JobState(phase=JobPhase.FAILED, completion_time=failed.get("lastTransitionTime"),
                        reason=failed.get("reason") or "Failed",
                        message=f"{message}: {detail}" if detail else message, **common)
    if (job.get("spec") or {}).get("suspend"):
        phase = JobPhase.SUSPENDED if annotations.get(names.ANNOTATION_SUSPENDED) == "true" else JobPhase.QUEUED
        return JobState(phase=phase, **common)
    return JobState(phase=JobPhase.RUNNING, **common)


def observation(state: JobState | None, *, manifest_ok: bool) -> StageObservation:
    """The plan's view of a stage from its current Job (``None``: there is none) and whether the stage's manifest
    verifies in the store with this config's digest.

    Every retry happens inside the Job (``backoffLimit``), so a Failed Job is never retried by the plan: the
    stage is Failed until the spec changes (which names a new Job)."""
    if manifest_ok:
        return StageObservation(Observed.SUCCEEDED, state.attempts if state else 0)
    if state is None:
        return StageObservation(Observed.ABSENT)
    if state.phase is JobPhase.COMPLETE:
        return StageObservation(Observed.FAILED, state.attempts, retryable=False,
                                message=f"Job {state.name} completed but no manifest with this config's digest "
                                        "is in the store")
    if state.phase is JobPhase.FAILED:
        return StageObservation(Observed.FAILED, state.attempts, retryable=False,
                                message=f"Job {state.name} failed ({state.reason}): {state.message}")
    if state.phase is JobPhase.SUSPENDED:
        return StageObservation(Observed.ABSENT, state.attempts)
    return StageObservation(Observed.RUNNING, max(state.attempts, 1))
