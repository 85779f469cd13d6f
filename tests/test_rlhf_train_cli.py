"""``rlhf-train`` at start: its exit codes for a dry run and for bad configs, and the checks that refuse a run before
any model is loaded."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_trainer.cli import main as train_main
from rlhf_trainer.errors import ConfigError


def test_rlhf_train_exit_codes(tmp_path, capsys):
    from rlhf_api.entrypoint import EXIT_CONFIG_ERROR
    from rlhf_api.spec import Stage
    from rlhf_api.stage_config import build_stage_config
    from rlhf_operator.loading import parse_pipeline

    doc = parse_pipeline({"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
                          "metadata": {"name": "x"},
                          "spec": {"model": {"uri": "builtin://smollm2-135m-instruct"},
                                   "sft": {"dataset": {"uri": "builtin://movie-reviews/sft"}}}})
    config = tmp_path / "sft.json"
    config.write_text(build_stage_config(doc, Stage.SFT, (tmp_path / "store").as_uri()).to_json())
    assert train_main(["sft", "--config", str(config), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["dryRun"] is True
    assert train_main(["reward", "--config", str(config)]) == EXIT_CONFIG_ERROR  # config for another stage
    assert "the config is for stage sft" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{}")
    assert train_main(["sft", "--config", str(tmp_path / "broken.json")]) == EXIT_CONFIG_ERROR
    ppo = build_stage_config(doc, Stage.PPO, (tmp_path / "store").as_uri())
    (tmp_path / "ppo.json").write_text(ppo.to_json())
    assert train_main(["ppo", "--config", str(tmp_path / "ppo.json"), "--workspace", str(tmp_path / "ws")]) \
        == EXIT_CONFIG_ERROR
    assert "spec.ppo.prompts is required" in capsys.readouterr().err  # checked before any model is loaded
    assert not (tmp_path / "store").exists()  # nothing was published


def test_a_second_process_on_a_one_gpu_node_is_refused_naming_the_fix_gpu_simulated(monkeypatch):
    """NCCL needs a GPU per process; two on one GPU would fail later with "Duplicate GPU detected". The GPU is the
    boundary simulated here (torch.cuda says one is present); the check runs before any CUDA call."""
    from rlhf_trainer.ppo import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1, but this node has 1 GPU.*spec\.ppo\.resources\.limits"):
        distributed.init()
