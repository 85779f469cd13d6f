"""A stage's checkpoints, kept in the store so that a new attempt (another pod, a rerun) resumes from them.

The layout and the pointer are :mod:`rlhf_api.artifacts.checkpoints`; this is the trainer's side of it, used
by the Trainer-based stages (:mod:`rlhf_trainer.hf_training`) and by PPO (one folder per process).
"""

from __future__ import annotations

from pathlib import Path

from rlhf_api.artifacts import fetch, publish, read_manifest
from rlhf_api.artifacts.checkpoints import (
    CheckpointPointer,
    advance,
    checkpoint_name,
    checkpoint_uri,
    read_pointer,
)
from rlhf_trainer.workspace import Workspace


class StageCheckpoints:
    """Publish checkpoints of the workspace's stage, move the pointer, and find the one to resume from."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.store = ws.output_store
        self.output_uri = ws.config.output_uri
        self.digest = ws.config.digest

    def publish(self, local: Path, step: int, *part: str) -> None:
        """Upload ``local`` as checkpoint ``step`` (or as its folder ``part``, one per process), manifest last."""
        publish(local, checkpoint_uri(self.output_uri, checkpoint_name(step), *part), self.store,
                stage=self.ws.config.stage.value, config_digest=self.digest, metrics={"global_step": step})

    def point_to(self, step: int, processes: int = 1) -> None:
        """Make checkpoint ``step`` (every part published) the one to resume from."""
        advance(self.output_uri, self.store,
                CheckpointPointer(checkpoint_name(step), step, self.digest, processes),
                keep_previous=self.ws.config.storage.keep_checkpoints)

    def latest(self) -> CheckpointPointer | None:
        """The pointer to the latest checkpoint made with this stage config, if any."""
        return read_pointer(self.output_uri, self.store, self.digest)

    def fetch(self, pointer: CheckpointPointer, local: Path, *part: str) -> bool:
        """Download the checkpoint (or its folder ``part``) into ``local``; False when it has no manifest."""
        uri = checkpoint_uri(self.output_uri, pointer.checkpoint, *part)
        if read_manifest(uri, self.store) is None:
            return False
        fetch(uri, local, self.store)
        return True

    def describe(self, pointer: CheckpointPointer) -> str:
        return f"{checkpoint_uri(self.output_uri, pointer.checkpoint)} (step {pointer.global_step})"
