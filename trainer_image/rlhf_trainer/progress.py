"""Publish a running stage's progress (``progress.json`` in its output folder) for the operator's status.

Best effort: a store that cannot be written to costs a warning, never the training run.
"""

from __future__ import annotations

import sys

from rlhf_api.artifacts import Progress, StoreError, publish_progress
from rlhf_trainer.workspace import Workspace


def publish(ws: Workspace, step: int, total_steps: int | None, metrics: dict[str, float]) -> None:
    try:
        publish_progress(ws.config.output_uri, ws.output_store, ws.config.digest,
                         Progress(step=step, total_steps=total_steps, metrics=metrics))
    except (StoreError, OSError) as exc:
        print(f"warning: could not publish progress: {exc}", file=sys.stderr, flush=True)
