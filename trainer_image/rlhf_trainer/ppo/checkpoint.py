"""PPO checkpoints in the artifact store, so that a new attempt (another pod, a rerun) resumes exactly.

The pointer scheme of every stage (:mod:`rlhf_api.artifacts.checkpoints`), with a folder per process::

    checkpoints/checkpoint-<step>/rank-<r>/   what process r wrote, with its own manifest
    checkpoints/latest.json                   names the checkpoint once every process's folder is stored

Without ZeRO only the main process has weights and optimizer state to write; the others write their RNG state.
A checkpoint made with another config digest is ignored: the run starts over. One written by another number of
processes is refused, with or without ZeRO: each process's share of a batch and its RNG state depend on how many
there are, so it would not continue the run it checkpointed (:meth:`StageCheckpoints.latest`).
"""

from __future__ import annotations

import shutil

from rlhf_api.artifacts.checkpoints import checkpoint_name
from rlhf_trainer.checkpoints import StageCheckpoints
from rlhf_trainer.ppo.distributed import World
from rlhf_trainer.ppo.trainer import PPOTrainer
from rlhf_trainer.workspace import Workspace


class PPOCheckpoints:
    def __init__(self, ws: Workspace, world: World) -> None:
        self.ws = ws
        self.world = world
        self.checkpoints = StageCheckpoints(ws)

    def save(self, trainer: PPOTrainer) -> None:
        """Checkpoint the trainer's current state (every process calls this at the same step)."""
        name, rank_folder = checkpoint_name(trainer.step), f"rank-{self.world.rank}"
        local = self.ws.checkpoints_dir / name / rank_folder
        shutil.rmtree(local, ignore_errors=True)
        trainer.save_state(local)
        self.checkpoints.publish(local, trainer.step, rank_folder)
        self.world.barrier()  # every process's folder is in the store before the pointer names it
        if self.world.is_main:
            self.checkpoints.point_to(trainer.step, processes=self.world.size)
        for old in self.ws.checkpoints_dir.glob("checkpoint-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        self.world.barrier()
        print(f"ppo: checkpoint {name} stored", flush=True)

    def restore(self, trainer: PPOTrainer) -> bool:
        """Load the latest checkpoint made with this config, if any. Returns whether one was loaded."""
        pointer = self.checkpoints.latest(self.world.size)  # refused when written by another number of processes
        if pointer is None:
            return False
        local = self.ws.checkpoints_dir / pointer.checkpoint / "restored"
        # the main process's folder holds the trainer state (and, without ZeRO, all weights); ours, our shard
        for rank in sorted({0, self.world.rank}):
            self.checkpoints.fetch(pointer, local, f"rank-{rank}")
        trainer.load_state(local)
        print(f"resuming ppo from {self.checkpoints.describe(pointer)}", flush=True)
        return True
