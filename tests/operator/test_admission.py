"""The API server itself rejects invalid RLHFPipelines at apply time (OpenAPI schema and CEL rules of the
generated CRD), with messages that name the field; valid ones are stored with the CRD's defaults filled in."""

from __future__ import annotations

import copy

import pytest
from kubernetes import client
from operator_harness import GROUP, PLURAL, VERSION, kubectl_apply, pipeline_doc

pytestmark = pytest.mark.timeout(300)

VALID = {
    "model": {"uri": "s3://models/base"},
    "storage": {"uri": "s3://artifacts/runs"},
    "sft": {"dataset": {"uri": "builtin://movie-reviews/sft"}},
    "preferences": {"prompts": {"uri": "builtin://movie-reviews/prompts-train"}},
    "reward": {},
    "ppo": {"prompts": {"uri": "builtin://movie-reviews/prompts-train"}},
    "evaluate": {"prompts": {"uri": "builtin://movie-reviews/prompts-eval"}},
}


def edit(path: str, value: object, spec: dict | None = None) -> dict:
    """VALID with ``path`` (dotted, under spec) set to ``value``; the value ``DELETE`` removes the key."""
    out = copy.deepcopy(spec or VALID)
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    if value == "DELETE":
        node.pop(leaf)
    else:
        node[leaf] = value
    return out


# (case id, spec, the field the message must name, a phrase it must contain)
INVALID = [
    ("learning rate zero", edit("sft.learningRate", 0), "spec.sft.learningRate", "should be greater than 0"),
    ("unknown scheduler", edit("sft.lrSchedulerType", "exponential"), "spec.sft.lrSchedulerType",
     "Unsupported value"),
    ("model uri scheme", edit("model.uri", "http://example.com/model"), "spec.model.uri", "should match"),
    ("model missing", edit("model", "DELETE"), "spec.model", "Required value"),
    ("unknown dtype", edit("model.dtype", "int8"), "spec.model.dtype", "Unsupported value"),
    ("quantization bits", edit("model.quantization", {"bits": 6}), "spec.model.quantization.bits",
     "Unsupported value"),
    ("unknown field", edit("sft.learningrate", 0.1), "spec.sft.learningrate", "unknown field"),
    ("storage uri missing", edit("storage", {"endpoint": "http://minio:9000"}), "spec.storage",
     "storage.uri is required"),
    ("endpoint without scheme", edit("storage.endpoint", "minio:9000"), "spec.storage.endpoint", "should match"),
    ("mini-batch does not divide batch", edit("ppo.miniBatchSize", 3), "spec.ppo.miniBatchSize",
     "miniBatchSize must divide batchSize"),
    ("accumulation does not divide mini-batch", edit("ppo.gradientAccumulationSteps", 3),
     "spec.ppo.gradientAccumulationSteps", "gradientAccumulationSteps must divide miniBatchSize"),
    ("too few episodes", edit("ppo.totalEpisodes", 8), "spec.ppo.totalEpisodes",
     "totalEpisodes must be at least batchSize"),
    ("sft without dataset", edit("sft.dataset", "DELETE"), "spec.sft.dataset", "dataset is required"),
    ("preferences without prompts", edit("preferences.prompts", "DELETE"), "spec.preferences.prompts",
     "prompts is required"),
    ("evaluate without prompts", edit("evaluate.prompts", "DELETE"), "spec.evaluate.prompts", "prompts is required"),
    ("reward without pairs", edit("preferences", {"enabled": False}), "spec.reward", "reward needs preference pairs"),
    ("ppo without reward model", edit("reward", {"enabled": False}), "spec.ppo", "ppo needs a reward model"),
    ("evaluate with nothing to evaluate",
     {"model": VALID["model"], "storage": VALID["storage"], "evaluate": VALID["evaluate"]}, "spec.evaluate",
     "evaluate needs a policy or a reward model"),
    ("lora rank without lora", edit("sft.lora", {"r": 8}), "spec.sft.lora.enabled", "LoRA options"),
    ("lora dropout of one", edit("ppo.lora", {"enabled": True, "dropout": 1.0}), "spec.ppo.lora.dropout",
     "should be less than 1"),
    ("zero nodes", edit("ppo.distributed", {"nodes": 0}), "spec.ppo.distributed.nodes",
     "should be greater than or equal to 1"),
    ("too many nodes", edit("ppo.distributed", {"nodes": 65}), "spec.ppo.distributed.nodes",
     "should be less than or equal to 64"),
    ("too many processes per pod", edit("sft.distributed", {"procsPerNode": 17}), "spec.sft.distributed.procsPerNode",
     "should be less than or equal to 16"),
    ("a huge string", edit("sft.dataset", {"uri": "s3://b/" + "x" * 5000}), "spec.sft.dataset.uri",
     "may not be more than 4096 bytes"),
    ("a huge list", edit("imagePullSecrets", [f"s{i}" for i in range(300)]), "spec.imagePullSecrets",
     "must have at most 256 items"),
    ("privileged rendezvous port", edit("ppo.distributed", {"masterPort": 80}),
     "spec.ppo.distributed.masterPort", "should be greater than or equal to 1024"),
    ("unknown ZeRO stage", edit("ppo.distributed", {"zeroStage": 4}), "spec.ppo.distributed.zeroStage",
     "Unsupported value"),
    ("one sample per prompt", edit("preferences.numSamplesPerPrompt", 1), "spec.preferences.numSamplesPerPrompt",
     "should be greater than or equal to 2"),
    ("too many retries", edit("reward.maxRetries", 21), "spec.reward.maxRetries", "should be less than or equal to 20"),
    ("top-p of zero", edit("evaluate.generation", {"topP": 0}), "spec.evaluate.generation.topP",
     "should be greater than 0"),
    ("nucleus sampling in ppo", edit("ppo.generation", {"topP": 0.9}), "spec.ppo.generation",
     "generation.topP must be 1 and generation.topK 0 in PPO"),
    ("top-k sampling in ppo", edit("ppo.generation", {"topK": 50}), "spec.ppo.generation",
     "generation.topP must be 1 and generation.topK 0 in PPO"),
    ("preferences in two pods", edit("preferences.distributed", {"nodes": 2}), "spec.preferences.distributed",
     "the preferences stage samples in one process"),
    ("evaluate in two processes", edit("evaluate.distributed", {"procsPerNode": 2}), "spec.evaluate.distributed",
     "the evaluate stage samples in one process"),
    ("preferences under ZeRO", edit("preferences.distributed", {"zeroStage": 2}), "spec.preferences.distributed",
     "the preferences stage samples in one process"),
    ("two stop-token fields in ppo", edit("ppo.stopTokens", ["<|eot_id|>"], edit("ppo.stopToken", "<|im_end|>")),
     "spec.ppo.stopTokens", "set stopToken or stopTokens, not both"),
    ("toleration Exists with a value", edit("ppo.tolerations", [{"key": "gpu", "operator": "Exists", "value": "x"}]),
     "spec.ppo.tolerations[0].value", "value must be empty when operator is Exists"),
    ("unknown toleration effect", edit("ppo.tolerations", [{"key": "gpu", "effect": "Sometimes"}]),
     "spec.ppo.tolerations[0].effect", "Unsupported value"),
    ("unknown judge", edit("preferences.judge", {"type": "gpt"}), "spec.preferences.judge.type", "Unsupported value"),
    ("dataset limit zero", edit("sft.dataset.limit", 0), "spec.sft.dataset.limit",
     "should be greater than or equal to 1"),
    ("quantized weights under ZeRO-3", edit("ppo.distributed", {"zeroStage": 3},
                                            edit("model.quantization", {"bits": 4})),
     "spec.ppo.distributed.zeroStage", "model.quantization does not combine with ppo.distributed.zeroStage 3"),
    ("quantized weights under ZeRO-3 in sft", edit("sft.distributed", {"zeroStage": 3},
                                                   edit("model.quantization", {"bits": 4})),
     "spec.sft.distributed.zeroStage", "model.quantization does not combine with sft.distributed.zeroStage 3"),
]


@pytest.mark.parametrize("spec,field,phrase", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(k8s_cluster, crd, k8s_namespace, spec, field, phrase):
    result = kubectl_apply(k8s_cluster, pipeline_doc("bad", spec), k8s_namespace, check=False)
    assert result.returncode != 0, "the API server accepted an invalid spec"
    assert field in result.stderr and phrase in result.stderr, result.stderr


def test_at_least_twenty_invalid_cases():
    assert len(INVALID) >= 20


def test_name_too_long_or_not_a_label_is_rejected(k8s_cluster, crd, k8s_namespace):
    for name in ("p" * 41, "1st-run"):
        result = kubectl_apply(k8s_cluster, pipeline_doc(name, VALID), k8s_namespace, check=False)
        assert result.returncode != 0 and "metadata.name" in result.stderr, (name, result.stderr)


def test_sft_and_reward_under_zero_are_accepted(k8s_cluster, crd, k8s_namespace):
    spec = edit("sft.distributed", {"nodes": 2, "zeroStage": 3}, edit("reward.distributed", {"procsPerNode": 2,
                                                                                             "zeroStage": 2}))
    kubectl_apply(k8s_cluster, pipeline_doc("zero", spec), k8s_namespace)  # raises when the API server refuses


def test_valid_spec_is_stored_with_defaults(k8s_cluster, k8s_api, crd, k8s_namespace):
    kubectl_apply(k8s_cluster, pipeline_doc("good", VALID), k8s_namespace)
    stored = client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL,
                                                                            "good")
    spec = stored["spec"]
    assert spec["sft"]["learningRate"] == 2e-5 and spec["sft"]["enabled"] is True
    assert spec["ppo"]["batchSize"] == 16 and spec["ppo"]["miniBatchSize"] == 8
    assert spec["suspend"] is False and spec["storage"]["keepArtifactsOnDelete"] is True
    explain = k8s_cluster.kubectl("explain", "rlhfpipelines.spec.ppo.miniBatchSize").stdout
    assert "miniBatchSize, optional: rollouts per optimizer step; divides batchSize." in explain


def test_running_stage_settings_are_immutable(k8s_cluster, k8s_api, crd, k8s_namespace):
    """A transition rule: while status says a stage runs, its section of the spec cannot change; other sections
    and spec.suspend can."""
    objects = client.CustomObjectsApi(k8s_api)
    kubectl_apply(k8s_cluster, pipeline_doc("frozen", VALID), k8s_namespace)
    objects.patch_namespaced_custom_object_status(GROUP, VERSION, k8s_namespace, PLURAL, "frozen", {
        "status": {"phase": "Running", "currentStage": "sft",
                   "stages": [{"name": "sft", "phase": "Running"}, {"name": "ppo", "phase": "Pending"}]}})

    result = kubectl_apply(k8s_cluster, pipeline_doc("frozen", edit("sft.learningRate", 1e-4)), k8s_namespace,
                           check=False)
    assert result.returncode != 0
    assert "spec.sft" in result.stderr and "cannot change while the sft stage is running" in result.stderr

    allowed = edit("suspend", True, edit("ppo.learningRate", 1e-5))
    kubectl_apply(k8s_cluster, pipeline_doc("frozen", allowed), k8s_namespace)
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "frozen")
    assert stored["spec"]["suspend"] is True and stored["spec"]["ppo"]["learningRate"] == 1e-5
