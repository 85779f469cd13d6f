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
from rlhf_trainer.errors import ConfigError
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

    def latest(self, processes: int) -> CheckpointPointer | None:
        """The pointer to the latest checkpoint made with this stage config, if any, for a run of ``processes``.

        A checkpoint made with another config is ignored, with a line that says so: the stage starts over. One
        written by another number of processes is refused (ConfigError): each process's part holds what that
        process trained on (its ZeRO shard, its RNG state, its share of every batch), so no other number of
        processes continues it exactly, and silently starting over would throw the work away.
        """
        pointer = read_pointer(self.output_uri, self.store)
        if pointer is None:
            return None
        stage = self.ws.config.stage.value
        if pointer.config_digest != self.digest:
            print(f"{stage}: the stored checkpoint {self.describe(pointer)} was made with another config "
                  f"(digest {pointer.config_digest[:12]}, this run's {self.digest[:12]}): ignored, the stage starts "
                  "over", flush=True)
            return None
        if pointer.processes != processes:
            raise ConfigError(
                f"the stored checkpoint {self.describe(pointer)} was written by {pointer.processes} process(es) and "
                f"this run has {processes}: restore spec.{stage}.distributed (nodes x procsPerNode = "
                f"{pointer.processes}) to resume from it, or delete {self.ws.checkpoints_uri} to start over")
        return pointer

    def fetch(self, pointer: CheckpointPointer, local: Path, *part: str) -> bool:
        """Download the checkpoint (or its folder ``part``) into ``local``; False when it has no manifest."""
        uri = checkpoint_uri(self.output_uri, pointer.checkpoint, *part)
        if read_manifest(uri, self.store) is None:
            return False
        fetch(uri, local, self.store)
        return True

    def describe(self, pointer: CheckpointPointer) -> str:
        return f"{checkpoint_uri(self.output_uri, pointer.checkpoint)} (step {pointer.global_step})"
