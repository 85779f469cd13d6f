"""Live progress of a running stage: ``progress.json`` under the stage's output URI.

The trainer publishes it as it goes (PPO after every step, the Hugging Face stages at every log line); the
operator reads it to fill a running stage's ``status.stages[].progress`` and the pipeline's Reward and KL
columns. It is advisory: never part of the manifest, overwritten in place, and ignored when its config
digest is not the running stage's (a leftover of an earlier configuration).

    {"step": 12, "totalSteps": 25, "metrics": {"rm_score": 1.31, "kl": 0.04}, "configDigest": "...",
     "updated": "2026-11-22T02:30:00Z"}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from rlhf_api.artifacts.store import NotFoundError, Store, join_uri
from rlhf_api.phases import now_rfc3339

PROGRESS_NAME = "progress.json"


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def publish_progress(output_uri: str, store: Store, config_digest: str, progress: Progress) -> None:
    """Write (overwrite) the stage's progress.json; non-finite metrics are left out (JSON has no NaN)."""
    doc = {
        "step": progress.step,
        "totalSteps": progress.total_steps,
        "metrics": {k: round(float(v), 6) for k, v in progress.metrics.items()
                    if isinstance(v, (int, float)) and math.isfinite(v)},
        "configDigest": config_digest,
        "updated": now_rfc3339(),
    }
    store.write_bytes(join_uri(output_uri, PROGRESS_NAME), (json.dumps(doc) + "\n").encode())


def read_progress(output_uri: str, store: Store, config_digest: str) -> Progress | None:
    """The published progress of the stage with this config digest, or None (none published, or stale).

    Raises:
        StoreError: the store could not be read.
        ValueError: the file is not valid progress JSON.
    """
    try:
        doc: dict[str, Any] = json.loads(store.read_bytes(join_uri(output_uri, PROGRESS_NAME)))
    except NotFoundError:
        return None
    if doc.get("configDigest", config_digest) != config_digest:
        return None
    try:
        return Progress(step=int(doc["step"]), total_steps=doc.get("totalSteps"),
                        metrics={k: float(v) for k, v in (doc.get("metrics") or {}).items()})
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed {PROGRESS_NAME}: {exc}") from exc
