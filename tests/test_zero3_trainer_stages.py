"""SFT and reward under DeepSpeed ZeRO-3 in two processes, on SmolLM2-135M (``builtin://smollm2-135m-instruct``):
the published output is a whole Hugging Face checkpoint, and a run stopped by SIGTERM to one process and resumed
by two new ones ends with the losses and weights of a run that was never stopped.

SFT's processes run as two pods would (a workspace each: rank 1's ZeRO shards reach the store only from rank 1,
and each new process fetches what it needs); reward's share one workspace, as the local runner's do. SFT trains a
LoRA adapter (ZeRO-3 still shards the frozen weights, which the output gathers and merges the adapter into) and
reward trains every weight of a two-layer model: their checkpoints stay small, and the test fast.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_api import entrypoint
from rlhf_api.entrypoint import EXIT_PREEMPTED
from rlhf_api.phases import PipelinePhase
from rlhf_api.spec import Stage
from rlhf_api.stage_config import build_stage_config
from rlhf_operator.loading import parse_pipeline
from rlhf_operator.runner import LocalRunner

pytestmark = pytest.mark.slow

MODEL = "builtin://smollm2-135m-instruct"
TRAIN = {"maxSteps": 3, "perDeviceTrainBatchSize": 1, "learningRate": 1e-4, "maxLength": 64, "loggingSteps": 1,
         "distributed": {"nodes": 2, "zeroStage": 3}}
#: one thread per process (two processes on two cores), the same in every run: float32 sums in one order
ENV = {**entrypoint.TRAINER_ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def write_data(root: Path) -> dict[str, str]:
    films = [f"Review the film {name}." for name in ("Red Tide", "Paper Moon", "Glass Hour", "Salt Road",
                                                     "Iron Bloom", "Quiet Orbit", "Lost Harbour", "Bright Dust")]
    sft = [{"prompt": p, "completion": "A warm, funny and moving story."} for p in films]
    pairs = [{"prompt": p, "chosen": "A warm and moving story.", "rejected": "Dull from start to end."} for p in films]
    paths = {}
    for name, rows in (("sft", sft), ("pairs", pairs)):
        paths[name] = (root / f"{name}.jsonl").as_uri()
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def stage_config(root: Path, stage: Stage, name: str, save_steps: int) -> Path:
    """The stage config of a pipeline named ``name`` whose ``stage`` checkpoints every ``save_steps``."""
    data = write_data(root)
    train = {**TRAIN, "saveSteps": save_steps}
    spec = {"model": {"uri": MODEL},
            "sft": {"dataset": {"uri": data["sft"]}, **train, "learningRate": 1e-3, "lora": {"enabled": True}},
            "preferences": {"enabled": False},
            "reward": {"initFrom": "base", "numLayers": 2, "dataset": {"uri": data["pairs"]}, "evalFraction": 0.25,
                       **train},
            "evaluate": {"enabled": False}}
    if stage is Stage.REWARD:
        spec["sft"] = {"enabled": False}
    doc = parse_pipeline({"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
                          "metadata": {"name": name}, "spec": spec})
    path = root / f"{name}.json"
    path.write_text(build_stage_config(doc, stage, (root / "store").as_uri()).to_json())
    return path


def output_dir(config: Path) -> Path:
    return Path(json.loads(config.read_text())["outputUri"].removeprefix("file://"))


def start(stage: Stage, config: Path, workspaces: list[Path]) -> list[subprocess.Popen]:
    """Two ``rlhf-train`` processes of one stage, with the variables a launcher sets."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return [subprocess.Popen([sys.executable, "-m", "rlhf_trainer", stage.value, "--config", str(config),
                              "--workspace", str(workspace)],
                             env={**os.environ, **ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                  "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank, workspace in enumerate(workspaces)]


def finish(procs: list[subprocess.Popen]) -> tuple[list[int], str]:
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    return [proc.returncode for proc in procs], "\n".join(o[-6000:] for o in outputs)


def logged_losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def load_output(stage: Stage, out: Path) -> dict[str, torch.Tensor]:
    """The published output as plain transformers loads it (no DeepSpeed), as float32 tensors by name."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if stage is Stage.SFT else AutoModelForSequenceClassification
    return {name: tensor.float() for name, tensor in auto.from_pretrained(out).state_dict().items()}


def assert_whole_and_trained(stage: Stage, weights: dict[str, torch.Tensor]) -> None:
    """Every weight has its shape in the base model (ZeRO-3 leaves empty placeholders of shape [0] in each process)
    and the trained ones moved away from the base model's."""
    from transformers import AutoModelForCausalLM

    from rlhf_trainer.builtin_models import builtin_model_dir

    base = AutoModelForCausalLM.from_pretrained(builtin_model_dir(MODEL)).state_dict()
    layer = "model.layers.1.self_attn.q_proj.weight"
    assert weights[layer].shape == base[layer].shape == (576, 576)
    assert weights["model.embed_tokens.weight"].shape == (base["model.embed_tokens.weight"].shape[0] + 1, 576)  # pad
    assert not torch.equal(weights[layer], base[layer])
    if stage is Stage.SFT:
        assert len(weights) == len(base)
        vocabulary = ("model.embed_tokens.weight", "lm_head.weight")  # a row more: the pad token
        assert all(weights[name].shape == tensor.shape for name, tensor in base.items() if name not in vocabulary)
    else:
        assert weights["score.weight"].shape == (1, 576) and weights["score.weight"].abs().sum() > 0


@pytest.mark.parametrize("stage", [Stage.SFT, Stage.REWARD])
def test_zero3_in_two_processes_resumes_exactly_and_publishes_a_whole_model(stage, tmp_path):
    pods = stage is Stage.SFT  # a workspace per process; reward's processes share one, as the local runner's

    def workspaces(run: str) -> list[Path]:
        return [tmp_path / run / (f"ws{rank}" if pods else "ws") for rank in (0, 1)]

    straight = stage_config(tmp_path, stage, "straight", save_steps=100)
    codes, output = finish(start(stage, straight, workspaces("straight")))
    assert codes == [0, 0], output
    expected_losses = logged_losses(output_dir(straight))
    expected = load_output(stage, output_dir(straight))
    assert sorted(expected_losses) == [1, 2, 3]
    assert_whole_and_trained(stage, expected)

    config = stage_config(tmp_path, stage, "interrupted", save_steps=1)
    checkpoints = output_dir(config) / "checkpoints"
    procs = start(stage, config, workspaces("interrupted"))
    deadline = time.monotonic() + 600
    while not (checkpoints / "latest.json").exists():  # the first checkpoint is stored: every part, then pointer
        assert all(proc.poll() is None for proc in procs), finish(procs)[1]
        assert time.monotonic() < deadline, "no checkpoint stored"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # one process only: both must stop at the same step
    codes, output = finish(procs)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], output
    pointer = json.loads((checkpoints / "latest.json").read_text())
    assert pointer["processes"] == 2 and pointer["global_step"] in (2, 3), pointer  # at the step SIGTERM ended
    stored = checkpoints / pointer["checkpoint"]
    assert {p.name for p in stored.iterdir()} == {"rank-0", "rank-1"}
    assert list(stored.glob("rank-1/global_step*/zero_pp_rank_1_*model_states.pt"))  # rank 1's shard, from rank 1
    assert not list(stored.glob("rank-0/**/*rank_1*")) and not (output_dir(config) / "manifest.json").exists()

    codes, output = finish(start(stage, config, workspaces("resumed")))
    assert codes == [0, 0], output
    assert output.count(f"resuming {stage.value} from") == 2 and f"(step {pointer['global_step']})" in output
    resumed_losses = logged_losses(output_dir(config))
    assert sorted(resumed_losses) == list(range(pointer["global_step"] + 1, 4))
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(expected_losses[step], rel=1e-5), step
    resumed = load_output(stage, output_dir(config))
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)


def test_one_process_under_zero3_needs_no_launcher(tiny_model_dir, tmp_path, monkeypatch):
    """``zeroStage`` with ``nodes x procsPerNode`` = 1: the local runner starts ``rlhf-train`` alone, with no
    rendezvous variables, and DeepSpeed (which needs a process group) trains it all the same."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    doc = parse_pipeline({"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
                          "metadata": {"name": "alone"},
                          "spec": {"model": {"uri": tiny_model_dir.as_uri()}, "storage": {"keepCheckpoints": True},
                                   "sft": {"dataset": {"uri": "builtin://movie-reviews/sft", "limit": 8}, "maxSteps": 2,
                                           "saveSteps": 1, "perDeviceTrainBatchSize": 2, "maxLength": 96,
                                           "distributed": {"zeroStage": 3}},
                                   "preferences": {"enabled": False}, "reward": {"enabled": False}}})
    result = LocalRunner(doc, tmp_path / "work").run()
    assert result.phase is PipelinePhase.SUCCEEDED, result.message
    out = Path(build_stage_config(doc, Stage.SFT, (tmp_path / "work" / "artifacts").as_uri()).output_uri
               .removeprefix("file://"))
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["processes"] == 1
    assert list((out / "checkpoints" / "checkpoint-1").glob("global_step1/zero_pp_rank_0_*optim_states.pt"))
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert trained[name].shape == base[name].shape and not torch.equal(trained[name], base[name])
