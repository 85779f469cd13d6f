"""The spec as users meet it: `rlhf validate` and `rlhf run` on good and bad files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_api.spec import Stage
from rlhf_operator.cli import main
from rlhf_operator.loading import SpecError, load_pipeline, parse_pipeline

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo.yaml"


def demo_doc() -> dict:
    return yaml.safe_load(DEMO.read_text())


def test_demo_is_valid():
    doc = load_pipeline(DEMO)
    assert doc.metadata.name == "movie-reviews"
    assert doc.spec.sft.learning_rate == 5e-5  # camelCase in YAML, snake_case in Python
    assert doc.spec.ppo.runs is True and doc.spec.evaluate.runs is True  # the whole recipe, PPO included


def mutate(path: str, value):
    """The demo document with one field changed (value None deletes it); path like 'spec.sft.learningRate'."""
    doc = demo_doc()
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


BAD = [
    ("missing model", "spec.model", None, "spec.model", "required"),
    ("unknown stage", "spec.rlhf", {"enabled": True}, "spec.rlhf", "unknown field"),
    ("negative learning rate", "spec.sft.learningRate", -1e-5, "spec.sft.learningRate", "greater than 0"),
    ("lora rank 0", "spec.reward.lora", {"enabled": True, "r": 0}, "spec.reward.lora.r", "greater than or equal to 1"),
    ("bad URI scheme", "spec.model.uri", "gs://bucket/model", "spec.model.uri", "s3://"),
    ("relative file URI", "spec.sft.dataset.uri", "file://data/sft.jsonl", "spec.sft.dataset.uri", "absolute path"),
    ("unknown field", "spec.sft.learning_rte", 0.1, "spec.sft.learning_rte", "valid fields here"),
    ("mini-batch does not divide batch", "spec.ppo", {"enabled": True, "batchSize": 10, "miniBatchSize": 4,
     "prompts": {"uri": "builtin://movie-reviews/prompts-train"}}, "spec.ppo", "must divide"),
    ("enabled stage without data", "spec.sft.dataset", None, "spec.sft", "dataset is required"),
    ("nucleus sampling in ppo", "spec.ppo.generation", {"topP": 0.9}, "spec.ppo",
     "topP must be 1 and generation.topK 0 in PPO"),
    ("top-k sampling in ppo", "spec.ppo.generation", {"topK": 40}, "spec.ppo", "(got topP 1.0, topK 40)"),
    ("preferences in two processes", "spec.preferences.distributed", {"nodes": 2}, "spec.preferences",
     "the preferences stage samples in one process"),
    ("evaluate under ZeRO", "spec.evaluate.distributed", {"zeroStage": 3}, "spec.evaluate",
     "the evaluate stage samples in one process"),
    ("preferences under ZeRO", "spec.preferences.distributed", {"zeroStage": 2}, "spec.preferences",
     "the preferences stage samples in one process"),
    ("bad pipeline name", "metadata.name", "Movie_Reviews", "metadata.name", "pattern"),
    ("wrong kind", "kind", "Pipeline", "kind", "RLHFPipeline"),
]


@pytest.mark.parametrize("path, value, field, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_specs_name_the_field(path, value, field, words):
    with pytest.raises(SpecError) as err:
        parse_pipeline(mutate(path, value), "bad.yaml")
    lines = [p for p in err.value.problems if p.startswith(field)]
    assert lines, err.value.problems
    assert any(words in line for line in lines), lines


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_quantized_weights_under_zero3_are_rejected_and_zero2_is_not(stage):
    doc = mutate("spec.model.quantization", {"bits": 4})
    doc["spec"][stage]["distributed"] = {"zeroStage": 3}
    with pytest.raises(SpecError, match=f"model.quantization does not combine with {stage}.distributed.zeroStage 3"):
        parse_pipeline(doc)
    doc["spec"][stage]["distributed"] = {"zeroStage": 2}
    assert parse_pipeline(doc).spec.stage(Stage(stage)).distributed.zero_stage == 2


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_every_trained_stage_takes_a_zero_stage(stage):
    doc = parse_pipeline(mutate(f"spec.{stage}.distributed", {"nodes": 2, "procsPerNode": 2, "zeroStage": 3}))
    assert doc.spec.stage(Stage(stage)).distributed.zero_stage == 3


def test_reward_without_preferences_is_rejected():
    doc = mutate("spec.preferences.enabled", False)
    with pytest.raises(SpecError, match="reward needs preference pairs"):
        parse_pipeline(doc)


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("path, value, field", [(b[1], b[2], b[3]) for b in BAD[:6]], ids=[b[0] for b in BAD[:6]])
def test_cli_rejects_and_writes_nothing(tmp_path, capsys, command, path, value, field):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(mutate(path, value)))
    workdir = tmp_path / "work"
    args = [command, str(bad)] + (["--workdir", str(workdir)] if command == "run" else [])
    assert main(args) == 2
    assert field in capsys.readouterr().err
    assert not workdir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_validate_entrypoint_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "rlhf_operator.cli", "validate", str(DEMO)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "valid RLHFPipeline 'movie-reviews'" in ok.stderr
    missing = subprocess.run([sys.executable, "-m", "rlhf_operator.cli", "validate", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_two_documents_are_refused(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(DEMO.read_text() + "\n---\n" + DEMO.read_text())
    with pytest.raises(SpecError, match="expected one YAML document, found 2"):
        load_pipeline(path)


def test_ppo_takes_one_stop_token_field():
    doc = mutate("spec.ppo.stopTokens", ["<|im_end|>", "<|endoftext|>"])
    assert parse_pipeline(doc).spec.ppo.stop_tokens == ["<|im_end|>", "<|endoftext|>"]
    doc["spec"]["ppo"]["stopToken"] = "<|im_end|>"
    with pytest.raises(SpecError, match="spec.ppo: set stopToken or stopTokens, not both"):
        parse_pipeline(doc, "bad.yaml")
