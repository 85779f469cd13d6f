"""Stage configs: which inputs a stage reads, and when a stage's earlier output is stale."""

from __future__ import annotations

from rlhf_api.spec import Stage
from rlhf_api.stage_config import build_stage_config
from rlhf_operator.loading import parse_pipeline

ROOT = "s3://bucket/runs"


def doc(**spec_overrides):
    spec = {
        "model": {"uri": "s3://bucket/base"},
        "sft": {"dataset": {"uri": "s3://bucket/sft.jsonl"}},
        "preferences": {"prompts": {"uri": "s3://bucket/prompts.jsonl"}},
        "reward": {},
        "ppo": {"prompts": {"uri": "s3://bucket/prompts.jsonl"}},
        "evaluate": {"prompts": {"uri": "s3://bucket/eval.jsonl"}},
    }
    for key, value in spec_overrides.items():
        spec[key] = {**spec[key], **value}
    return parse_pipeline({"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
                           "metadata": {"name": "p", "namespace": "team-a", "uid": "1234abcd-5678-90ef"},
                           "spec": spec})


def test_layout_and_inputs():
    d = doc()
    ppo = build_stage_config(d, Stage.PPO, ROOT)
    assert ppo.output_uri == "s3://bucket/runs/team-a/p/1234abcd/ppo"
    assert {k: (v.uri, v.produced_by) for k, v in ppo.inputs.items()} == {
        "policy": ("s3://bucket/runs/team-a/p/1234abcd/sft", Stage.SFT),
        "reward_model": ("s3://bucket/runs/team-a/p/1234abcd/reward", Stage.REWARD),
    }
    assert build_stage_config(d, Stage.SFT, ROOT).inputs["model"].uri == "s3://bucket/base"
    assert set(build_stage_config(d, Stage.EVALUATE, ROOT).inputs) == {"reference", "policy", "reward_model"}


def test_artifacts_and_disabled_stages_replace_inputs():
    d = doc(sft={"artifact": "s3://elsewhere/my-sft"}, reward={"initFrom": "base"})
    prefs = build_stage_config(d, Stage.PREFERENCES, ROOT)
    assert prefs.inputs["policy"].uri == "s3://elsewhere/my-sft" and prefs.inputs["policy"].produced_by is None
    assert build_stage_config(d, Stage.REWARD, ROOT).inputs["model"].uri == "s3://bucket/base"
    no_sft = doc(sft={"enabled": False})
    assert build_stage_config(no_sft, Stage.PPO, ROOT).inputs["policy"].uri == "s3://bucket/base"
    own_pairs = doc(reward={"dataset": {"uri": "s3://bucket/pairs.parquet"}})
    assert build_stage_config(own_pairs, Stage.REWARD, ROOT).inputs["preferences"].uri == "s3://bucket/pairs.parquet"


def test_digest_changes_with_results_not_with_placement():
    base = {s: build_stage_config(doc(), s, ROOT).digest for s in Stage}
    faster = doc(sft={"image": "other:tag", "maxRetries": 5, "resources": {"limits": {"nvidia.com/gpu": 1}}})
    assert {s: build_stage_config(faster, s, ROOT).digest for s in Stage} == base
    changed = {s: build_stage_config(doc(sft={"learningRate": 1e-3}), s, ROOT).digest for s in Stage}
    # SFT changed, and so did everything downstream of it
    assert all(changed[s] != base[s] for s in Stage)
    reward_only = {s: build_stage_config(doc(reward={"learningRate": 1e-3}), s, ROOT).digest for s in Stage}
    assert reward_only[Stage.SFT] == base[Stage.SFT] and reward_only[Stage.PREFERENCES] == base[Stage.PREFERENCES]
    assert reward_only[Stage.REWARD] != base[Stage.REWARD] and reward_only[Stage.PPO] != base[Stage.PPO]


def test_config_roundtrips_and_carries_no_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "marker-secret-value")
    d = doc()
    config = build_stage_config(d, Stage.SFT, ROOT)
    again = type(config).model_validate_json(config.to_json())
    assert again == config
    assert again.stage_settings().learning_rate == d.spec.sft.learning_rate
    assert "marker-secret-value" not in config.to_json()
