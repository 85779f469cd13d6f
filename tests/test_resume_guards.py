"""What a stage does with the stored checkpoint of another run: one made with another config is ignored, with a line
that says so (the stage starts over); one written by another number of processes is refused with a configuration
error that names the stage's ``distributed`` field and the two ways out. The same for SFT, reward and PPO, through
the functions each stage resumes with."""

from __future__ import annotations

import pytest
import torch

from rlhf_api.artifacts import open_store
from rlhf_api.artifacts.checkpoints import CheckpointPointer, advance
from rlhf_api.spec import Stage
from rlhf_api.stage_config import StageConfig, build_stage_config
from rlhf_operator.loading import parse_pipeline
from rlhf_trainer import hf_training
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.ppo.checkpoint import PPOCheckpoints
from rlhf_trainer.ppo.distributed import World
from rlhf_trainer.workspace import Workspace

STAGES = [Stage.SFT, Stage.REWARD, Stage.PPO]


def config(tmp_path, stage: Stage, learning_rate: float, processes: int) -> StageConfig:
    data = (tmp_path / "rows.jsonl").as_uri()
    train = {"learningRate": learning_rate, "distributed": {"nodes": processes}}
    spec = {"model": {"uri": (tmp_path / "base").as_uri()}, "sft": {"dataset": {"uri": data}, **train},
            "preferences": {"enabled": False}, "reward": {"dataset": {"uri": data}, **train},
            "ppo": {"prompts": {"uri": data}, **train}, "evaluate": {"enabled": False}}
    doc = parse_pipeline({"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
                          "metadata": {"name": "guards"}, "spec": spec})
    return build_stage_config(doc, stage, (tmp_path / "store").as_uri())


def store_checkpoint(config: StageConfig, processes: int) -> None:
    """A pointer as the stage leaves it, to a checkpoint that was never stored: the guards decide before fetching."""
    advance(config.output_uri, open_store(config.output_uri),
            CheckpointPointer("checkpoint-2", 2, config.digest, processes))


class PPOTrainerStub:
    """Records what PPO's restore hands the trainer to load."""

    loaded = None

    def load_state(self, directory) -> None:
        self.loaded = directory


def restore(config: StageConfig, tmp_path, processes: int) -> object:
    """What the stage resumes from, asked as the stage asks: the Trainer stages' local path, or the folder PPO's
    restore handed its trainer to load."""
    ws = Workspace(config, tmp_path / "ws")
    if config.stage is Stage.PPO:
        world = World(rank=0, size=processes, local_rank=0, device=torch.device("cpu"))
        trainer = PPOTrainerStub()
        PPOCheckpoints(ws, world).restore(trainer)  # type: ignore[arg-type]
        return trainer.loaded
    return hf_training.restore_checkpoint(ws, processes=processes, rank=0)


@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_made_with_another_config_is_ignored_with_a_line_that_says_so(stage, tmp_path, capsys):
    earlier, now = config(tmp_path, stage, 1e-4, 1), config(tmp_path, stage, 2e-4, 1)  # learningRate changed
    assert earlier.output_uri == now.output_uri and earlier.digest != now.digest
    store_checkpoint(earlier, processes=1)
    assert restore(now, tmp_path, processes=1) is None
    printed = capsys.readouterr().out
    assert f"{stage.value}: the stored checkpoint" in printed and "made with another config" in printed
    assert "ignored, the stage starts over" in printed


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("written_by", "now_run_by"), [(2, 1), (1, 2)])
def test_a_checkpoint_written_by_another_number_of_processes_is_refused(stage, written_by, now_run_by, tmp_path):
    """PPO without ZeRO included: each process's share of a batch and its RNG state depend on their number."""
    store_checkpoint(config(tmp_path, stage, 1e-4, written_by), processes=written_by)
    with pytest.raises(ConfigError) as refused:
        restore(config(tmp_path, stage, 1e-4, now_run_by), tmp_path, processes=now_run_by)
    message = str(refused.value)
    assert f"written by {written_by} process(es) and this run has {now_run_by}" in message
    assert f"restore spec.{stage.value}.distributed" in message and "/checkpoints to start over" in message


@pytest.mark.parametrize("stage", [Stage.SFT, Stage.PPO])
def test_a_checkpoint_of_this_config_and_process_count_is_not_refused(stage, tmp_path, capsys):
    """The guards' other side: the same settings get past them to the download (of a checkpoint that was never
    stored: the Trainer stages start over; PPO goes on to load what it fetched)."""
    now = config(tmp_path, stage, 1e-4, 2)
    store_checkpoint(now, processes=2)
    resumed = restore(now, tmp_path, processes=2)
    assert resumed is not None if stage is Stage.PPO else resumed is None
    assert "another config" not in capsys.readouterr().out
