"""The words a pipeline's status is written in: phases, condition reasons, and timestamps.

Below both the state machine (``rlhf_operator.plan``), which decides them, and the status schema
(:mod:`rlhf_api.status`), which carries them, so neither spells them as bare strings.
"""

from __future__ import annotations

import datetime as dt
import enum

RFC3339 = "%Y-%m-%dT%H:%M:%SZ"  # Kubernetes' timestamps: UTC, whole seconds


class StagePhase(str, enum.Enum):
    """A stage's phase as the status shows it."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"  # disabled in the spec
    PROVIDED = "Provided"  # replaced by spec.<stage>.artifact


class PipelinePhase(str, enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Reason:
    """Condition and Event reasons (CamelCase, for machines), each with what it means."""

    SUCCEEDED = "Succeeded"  # means that every stage is done
    STAGE_STARTING = "StageStarting"  # means that the operator created (or resumed) the stage's Job
    STAGE_RUNNING = "StageRunning"  # means that the stage's Job is running
    STAGE_SUCCEEDED = "StageSucceeded"  # means that the stage's manifest is in the store
    STAGE_RETRYING = "StageRetrying"  # means that a pod of the stage failed and the Job started another
    STAGE_FAILED = "StageFailed"  # means that the stage failed and will not be retried
    SUSPENDED = "Suspended"  # means that spec.suspend is set
    RESUMED = "Resumed"  # means that spec.suspend was cleared
    INVALID_SPEC = "InvalidSpec"  # means that the spec did not validate (only possible without the CRD's checks)
    ADOPTION_REFUSED = "AdoptionRefused"  # means that an object of a stage's name exists and is not the pipeline's
    STORAGE_REFUSED = "StorageRefused"  # means that the storage settings are not allowed (rlhf_api.tenancy)
    NO_PROGRESS = "NoProgress"  # means that the stage published no new step for longer than allowed
    GUARDRAIL_FIRED = "GuardrailFired"  # means that a PPO guardrail flag is set in the stage's metrics
    NO_GUARDRAIL = "NoGuardrailFired"  # means that no PPO guardrail flag is set
    AS_EXPECTED = "AsExpected"  # means that nothing is wrong


def rfc3339(moment: dt.datetime) -> str:
    """``moment`` as the status writes times (``2026-11-22T02:30:00Z``)."""
    return moment.astimezone(dt.timezone.utc).strftime(RFC3339)


def now_rfc3339() -> str:
    return rfc3339(dt.datetime.now(dt.timezone.utc))


def parse_time(value: str | None) -> dt.datetime | None:
    """A time the status wrote (:func:`rfc3339`), or None for none."""
    if not value:
        return None
    return dt.datetime.strptime(value, RFC3339).replace(tzinfo=dt.timezone.utc)
