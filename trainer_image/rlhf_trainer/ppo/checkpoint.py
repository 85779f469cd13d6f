"""PPO checkpoints in the artifact store, so that a new attempt (another pod, a rerun) resumes exactly.

Layout under the stage's output URI (the same pointer scheme as the SFT and reward stages)::

    checkpoints/checkpoint-<step>/rank-<r>/   what process r wrote, with its own manifest
    checkpoints/latest.json                   {"checkpoint", "global_step", "config_digest", "processes"}

Every process writes and uploads its own folder (without ZeRO, only the main process has weights and optimizer
state to write; the others write their RNG state), then the main process writes ``latest.json`` and deletes the
previous checkpoint. A checkpoint made with another config digest is ignored: the run starts over.
"""

from __future__ import annotations

import json
import shutil

from rlhf_operator.artifacts import fetch, join_uri, publish, read_manifest
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.hf_training import LATEST
from rlhf_trainer.ppo.distributed import World
from rlhf_trainer.ppo.trainer import PPOTrainer
from rlhf_trainer.workspace import Workspace


class StoreCheckpoints:
    def __init__(self, ws: Workspace, world: World) -> None:
        self.ws = ws
        self.world = world
        self.store = ws.output_store
        self.pointer_uri = join_uri(ws.checkpoints_uri, LATEST)

    def save(self, trainer: PPOTrainer) -> None:
        """Checkpoint the trainer's current state (every process calls this at the same step)."""
        name = f"checkpoint-{trainer.step}"
        rank_folder = f"rank-{self.world.rank}"
        local = self.ws.checkpoints_dir / name / rank_folder
        shutil.rmtree(local, ignore_errors=True)
        trainer.save_state(local)
        publish(local, join_uri(self.ws.checkpoints_uri, name, rank_folder), self.store,
                stage=self.ws.config.stage.value, config_digest=self.ws.config.digest,
                metrics={"global_step": trainer.step})
        self.world.barrier()  # every process's folder is in the store before the pointer names it
        if self.world.is_main:
            previous = self._pointer()
            pointer = {"checkpoint": name, "global_step": trainer.step, "config_digest": self.ws.config.digest,
                       "processes": self.world.size}
            self.store.write_bytes(self.pointer_uri, json.dumps(pointer).encode())
            keep = self.ws.config.storage.keep_checkpoints
            if previous is not None and previous["checkpoint"] != name and not keep:
                self.store.delete_prefix(join_uri(self.ws.checkpoints_uri, previous["checkpoint"]))
        for old in self.ws.checkpoints_dir.glob("checkpoint-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        self.world.barrier()
        print(f"ppo: checkpoint {name} stored", flush=True)

    def restore(self, trainer: PPOTrainer) -> bool:
        """Load the latest checkpoint made with this config, if any. Returns whether one was loaded."""
        pointer = self._pointer()
        if pointer is None or pointer.get("config_digest") != self.ws.config.digest:
            return False
        if pointer["processes"] != self.world.size and self.ws.config.stage_settings().distributed.zero_stage:
            raise ConfigError(
                f"the last PPO checkpoint was written by {pointer['processes']} processes with DeepSpeed ZeRO "
                f"shards, and this run has {self.world.size}: restore the previous distributed settings, or "
                f"delete {self.ws.checkpoints_uri} to start over"
            )
        uri = join_uri(self.ws.checkpoints_uri, pointer["checkpoint"])
        local = self.ws.checkpoints_dir / pointer["checkpoint"] / "restored"
        # the main process's folder holds the trainer state (and, without ZeRO, all weights); ours, our shard
        for rank in sorted({0, self.world.rank}):
            folder = join_uri(uri, f"rank-{rank}")
            if rank < pointer["processes"] and read_manifest(folder, self.store) is not None:
                fetch(folder, local, self.store)
        trainer.load_state(local)
        print(f"resuming ppo from {uri} (step {pointer['global_step']})", flush=True)
        return True

    def _pointer(self) -> dict | None:
        if not self.store.exists(self.pointer_uri):
            return None
        return json.loads(self.store.read_bytes(self.pointer_uri))
