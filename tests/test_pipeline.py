"""The pipeline end to end on tiny random models: every stage is a real `rlhf-train` subprocess that
trains, publishes a manifest last, and is skipped on a rerun.

Runs against a real S3-compatible server process (see s3_server.py) and against file:// storage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_api import metric_keys
from rlhf_api.artifacts import StorageOptions, open_store, read_manifest, read_progress
from rlhf_api.phases import PipelinePhase, StagePhase
from rlhf_api.spec import Stage
from rlhf_api.stage_config import build_stage_config
from rlhf_operator.loading import parse_pipeline
from rlhf_operator.runner import LocalRunner
from rlhf_trainer.stages.evaluate import rm_pair_accuracy

pytestmark = pytest.mark.slow


def tiny_pipeline(model_dir: Path, name: str, storage: dict | None = None) -> dict:
    train = {"maxSteps": 3, "perDeviceTrainBatchSize": 4, "learningRate": 1e-3, "maxLength": 96,
             "saveSteps": 1, "loggingSteps": 1}
    gen = {"maxNewTokens": 24, "temperature": 1.0}
    spec = {
        "model": {"uri": model_dir.as_uri()},
        "sft": {"dataset": {"uri": "builtin://movie-reviews/sft", "limit": 16}, **train},
        "preferences": {"prompts": {"uri": "builtin://movie-reviews/prompts-train", "limit": 16},
                        "numSamplesPerPrompt": 4, "minScoreMargin": 0.0, "generation": gen},
        "reward": {"evalFraction": 0.25, **train, "maxLength": 160},
        "evaluate": {"prompts": {"uri": "builtin://movie-reviews/prompts-eval", "limit": 6}, "generation": gen,
                     "samplesPerPrompt": 2},
    }
    if storage:
        spec["storage"] = storage
    return {"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
            "metadata": {"name": name}, "spec": spec}


def test_pipeline_on_s3_runs_then_rerun_skips(tiny_model_dir, s3_env, s3_server, tmp_path):
    storage = {"uri": s3_env, "endpoint": s3_server.endpoint, "region": s3_server.region,
               "addressingStyle": "path"}
    doc = parse_pipeline(tiny_pipeline(tiny_model_dir, "tiny-s3", storage))

    first = LocalRunner(doc, tmp_path / "work").run()
    assert first.phase is PipelinePhase.SUCCEEDED, first.message
    store = open_store(s3_env, StorageOptions(s3_server.endpoint, s3_server.region, "path"))
    expected_files = {
        Stage.SFT: {"model.safetensors", "tokenizer.json", "trainer_log.jsonl", "metrics.json"},
        Stage.PREFERENCES: {"pairs.jsonl", "samples.jsonl", "metrics.json"},
        Stage.REWARD: {"model.safetensors", "config.json", "metrics.json"},
        Stage.EVALUATE: {"metrics.json", "samples.jsonl", "evaluation.png"},
    }
    for stage, names in expected_files.items():
        config = build_stage_config(doc, stage, s3_env)
        manifest = read_manifest(config.output_uri, store)
        assert manifest is not None, stage
        assert manifest.stage == stage.value and manifest.config_digest == config.digest
        assert names <= {f.path for f in manifest.files}, (stage, [f.path for f in manifest.files])
        assert all(len(f.sha256) == 64 and f.size >= 0 for f in manifest.files)
        assert "torch" in manifest.library_versions
    assert first.reports[Stage.PPO].phase is StagePhase.SKIPPED

    for stage in (Stage.SFT, Stage.PREFERENCES, Stage.REWARD):  # what the runner's summary and the status read
        assert {key for key, _ in metric_keys.HEADLINES[stage]} <= set(first.reports[stage].metrics), stage
    assert metric_keys.SFT + metric_keys.JUDGE_MEAN in first.reports[Stage.EVALUATE].metrics
    reward = first.reports[Stage.REWARD].metrics
    assert reward["train_pairs"] + reward["eval_pairs"] >= 4 and 0.0 <= reward["eval_accuracy"] <= 1.0
    sft = first.reports[Stage.SFT].metrics
    assert sft["steps"] == 3 and sft["train_loss"] > 0
    # the live progress the trainer published for the operator: the last logged step's loss
    sft_config = build_stage_config(doc, Stage.SFT, s3_env)
    live = read_progress(sft_config.output_uri, store, sft_config.digest)
    assert live is not None and live.step == 3 and live.total_steps == 3 and live.metrics["loss"] > 0
    assert not store.list(sft_config.output_uri + "/checkpoints/")  # deleted once the output was published
    evaluation = first.reports[Stage.EVALUATE].metrics
    assert -1.0 <= evaluation["sft/judge_mean"] <= 1.0 and "sft/rm_mean" in evaluation
    assert evaluation["prompts"] == 6 and evaluation["samples_per_prompt"] == 2
    eval_config = build_stage_config(doc, Stage.EVALUATE, s3_env)
    answers = [json.loads(line) for line in
               store.read_bytes(eval_config.output_uri + "/samples.jsonl").decode().splitlines()]
    assert len(answers) == 12 and [a["prompt"] for a in answers[::2]] == [a["prompt"] for a in answers[1::2]]
    # the reward model's pair accuracy against the judge is that of the answers the stage wrote (absent when the
    # judge scored every prompt's two answers alike)
    accuracy = rm_pair_accuracy(*zip(*[(a["prompt"], a["judge"], a["rm"]) for a in answers if a["model"] == "sft"]))
    assert evaluation.get("sft/rm_pair_accuracy") == (None if accuracy is None else round(accuracy, 4))

    rerun = LocalRunner(doc, tmp_path / "work").run()
    assert rerun.phase is PipelinePhase.SUCCEEDED
    assert all(r.note.startswith("skipped") for s, r in rerun.reports.items() if s is not Stage.PPO)
    assert all(r.seconds is None for r in rerun.reports.values())  # no stage process was started
    assert rerun.seconds < 0.1 * first.seconds, (rerun.seconds, first.seconds)


def test_sft_changes_the_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    doc = tiny_pipeline(tiny_model_dir, "tiny-weights")
    for stage in ("preferences", "reward", "evaluate"):
        doc["spec"][stage] = {"enabled": False}
    doc["spec"]["sft"]["bf16"] = True  # CPU autocast, as the demo runs on CPUs with bfloat16 instructions
    result = LocalRunner(parse_pipeline(doc), tmp_path / "work").run()
    assert result.phase is PipelinePhase.SUCCEEDED, result.message
    out = Path(build_stage_config(parse_pipeline(doc), Stage.SFT, (tmp_path / "work" / "artifacts").as_uri())
               .output_uri.removeprefix("file://"))
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not (before[name] == after[name]).all()
    assert after["model.embed_tokens.weight"].shape[0] == before["model.embed_tokens.weight"].shape[0] + 1  # <|pad|>


def test_sft_checkpoints_every_save_steps_but_not_after_its_last_step(tiny_model_dir, tmp_path):
    doc = tiny_pipeline(tiny_model_dir, "tiny-save", storage={"keepCheckpoints": True})
    for stage in ("preferences", "reward", "evaluate"):
        doc["spec"][stage] = {"enabled": False}
    doc["spec"]["sft"].update(maxSteps=5, saveSteps=2)
    result = LocalRunner(parse_pipeline(doc), tmp_path / "work").run()
    assert result.phase is PipelinePhase.SUCCEEDED, result.message
    out = Path(build_stage_config(parse_pipeline(doc), Stage.SFT, (tmp_path / "work" / "artifacts").as_uri())
               .output_uri.removeprefix("file://"))
    # steps 2 and 4; the run's end is the published output itself, not another checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4", "latest.json"]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["global_step"] == 4


def test_the_same_spec_twice_gives_the_same_checkpoints(tiny_model_dir, tmp_path):
    """Weights a stage creates at random (the pad token's embedding row) are seeded."""
    doc = tiny_pipeline(tiny_model_dir, "tiny-twice")
    doc["spec"]["evaluate"] = {"enabled": False}
    doc["spec"]["sft"]["maxSteps"] = doc["spec"]["reward"]["maxSteps"] = 1
    parsed = parse_pipeline(doc)
    digests = []
    for run in ("first", "second"):
        result = LocalRunner(parsed, tmp_path / run).run()
        assert result.phase is PipelinePhase.SUCCEEDED, result.message
        root = (tmp_path / run / "artifacts").as_uri()
        manifests = {stage: read_manifest(build_stage_config(parsed, stage, root).output_uri, open_store(root))
                     for stage in (Stage.SFT, Stage.REWARD)}
        digests.append({stage: {f.path: f.sha256 for f in manifest.files if f.path.endswith(".safetensors")}
                        for stage, manifest in manifests.items()})
    assert digests[0][Stage.REWARD] and digests[0][Stage.SFT]
    assert digests[0] == digests[1]


def run_cli(pipeline: Path, workdir: Path, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "rlhf_operator.cli", "run", str(pipeline), "--workdir", str(workdir)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


def test_kill_during_reward_then_rerun_resumes_without_redoing_sft(tiny_model_dir, tmp_path):
    doc = tiny_pipeline(tiny_model_dir, "tiny-kill")
    doc["spec"]["reward"]["maxSteps"] = 40  # long enough to be killed in the middle
    doc["spec"]["evaluate"] = {"enabled": False}
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(doc))
    workdir = tmp_path / "work"
    root = (workdir / "artifacts").as_uri()
    parsed = parse_pipeline(doc)
    reward_uri = build_stage_config(parsed, Stage.REWARD, root).output_uri
    reward_checkpoint = Path(reward_uri.removeprefix("file://")) / "checkpoints" / "latest.json"
    sft_uri = build_stage_config(parsed, Stage.SFT, root).output_uri
    sft_manifest = Path(sft_uri.removeprefix("file://")) / "manifest.json"

    proc = run_cli(pipeline, workdir)
    deadline = time.monotonic() + 300
    while not reward_checkpoint.exists():  # reward is training and has checkpointed at least once
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "reward never checkpointed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the stage process, as a power cut would
    proc.communicate()  # reaps it and closes its output pipe
    sft_written = sft_manifest.stat().st_mtime_ns
    assert not (Path(reward_uri.removeprefix("file://")) / "manifest.json").exists()

    again = run_cli(pipeline, workdir)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    assert "sft: already done" in output and "preferences: already done" in output
    assert "resuming reward from" in output
    assert sft_manifest.stat().st_mtime_ns == sft_written


def test_corrupted_artifact_is_refused_by_the_consuming_stage(tiny_model_dir, tmp_path):
    doc = tiny_pipeline(tiny_model_dir, "tiny-corrupt")
    for stage in ("reward", "evaluate"):
        doc["spec"][stage] = {"enabled": False}
    doc["spec"]["reward"] = {"enabled": False}
    doc["spec"]["preferences"]["enabled"] = True
    doc["spec"]["preferences"]["maxRetries"] = 3
    parsed = parse_pipeline(doc)
    workdir = tmp_path / "work"
    root = (workdir / "artifacts").as_uri()
    # run SFT alone first
    sft_only = json.loads(json.dumps(doc))
    sft_only["spec"]["preferences"] = {"enabled": False}
    assert LocalRunner(parse_pipeline(sft_only), workdir).run().phase is PipelinePhase.SUCCEEDED

    weights = Path(build_stage_config(parsed, Stage.SFT, root).output_uri.removeprefix("file://")) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed in the store
    weights.write_bytes(bytes(data))

    result = LocalRunner(parsed, workdir).run()
    assert result.phase is PipelinePhase.FAILED
    assert result.reports[Stage.SFT].phase is StagePhase.SUCCEEDED  # the earlier stage's output is kept
    prefs = result.reports[Stage.PREFERENCES]
    assert prefs.phase is StagePhase.FAILED and prefs.attempts == 1  # a checksum error is never retried
    assert "exit code 79" in prefs.note


def test_lora_stages_and_external_preference_pairs(tiny_model_dir, tmp_path):
    """SFT and reward as LoRA adapters, merged into plain checkpoints; the reward stage reads the user's own
    (prompt, chosen, rejected) file instead of the preferences stage, and normalizes the merged reward model's
    scores of the held-out responses to standard deviation 1."""
    import statistics

    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_trainer.reward_scoring import score
    from rlhf_trainer.stages.common import uses_chat_template
    from rlhf_trainer.stages.reward import distinct_responses, split

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": f"Review film {i}", "chosen": "A wonderful, moving film.",
                    "rejected": "A dull and awful mess."}) + "\n" for i in range(12)))
    doc = tiny_pipeline(tiny_model_dir, "tiny-lora")
    lora = {"enabled": True, "r": 4, "alpha": 8}
    doc["spec"]["sft"]["lora"] = lora
    doc["spec"]["preferences"] = {"enabled": False}
    doc["spec"]["reward"].update(lora=lora, dataset={"uri": pairs.as_uri()}, normalizeScores=True)
    parsed = parse_pipeline(doc)
    result = LocalRunner(parsed, tmp_path / "work").run()
    assert result.phase is PipelinePhase.SUCCEEDED, result.message
    assert result.reports[Stage.PREFERENCES].phase is StagePhase.SKIPPED
    root = (tmp_path / "work" / "artifacts").as_uri()
    for stage in (Stage.SFT, Stage.REWARD):
        folder = Path(build_stage_config(parsed, stage, root).output_uri.removeprefix("file://"))
        weights = load_file(folder / "model.safetensors")
        assert not any("lora_" in name for name in weights), stage  # merged: a plain checkpoint
        assert not (folder / "adapter_config.json").exists()
    metrics = result.reports[Stage.REWARD].metrics
    assert metrics["train_pairs"] == 9 and metrics["raw_score_std"] > 0
    # the saved reward model's scores of the held-out responses: standard deviation 1, the mean reported
    reward_spec = parsed.spec.reward
    _, held_out = split([json.loads(line) for line in pairs.read_text().splitlines()], reward_spec.eval_fraction,
                        reward_spec.seed)
    texts = distinct_responses(held_out)
    assert len(texts) == 6
    reward_dir = Path(build_stage_config(parsed, Stage.REWARD, root).output_uri.removeprefix("file://"))
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    tokenizer.padding_side = "right"
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, torch_dtype="float32").eval()
    chat = uses_chat_template(tokenizer, parsed.spec.model.tokenizer.use_chat_template)
    scores = score(reward_model, tokenizer, [p for p, _ in texts], [t for _, t in texts], chat=chat)
    assert statistics.pstdev(scores) == pytest.approx(1.0, abs=1e-3)
    assert statistics.fmean(scores) == pytest.approx(metrics["normalized_score_mean"], abs=1e-3)
