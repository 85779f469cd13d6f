"""Loading models and tokenizers as the stages do: the added pad token, score heads, a reward model of fewer layers,
and the bf16 and quantization settings against the hardware (simulated where this machine lacks it)."""

from __future__ import annotations

import pytest
import torch

from rlhf_api.spec import ModelSpec
from rlhf_trainer import models as trainer_models
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.models import load_tokenizer, quantization_config


def test_tokenizer_gets_a_pad_token_distinct_from_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, ModelSpec(uri=tiny_model_dir.as_uri()))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_a_new_score_head_starts_at_zero_and_a_trained_one_is_kept(tiny_model_dir, tmp_path):
    from rlhf_trainer.models import load_sequence_classifier, save_plain

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tokenizer = load_tokenizer(tiny_model_dir, spec)
    random_head = load_sequence_classifier(tiny_model_dir, spec, tokenizer)
    assert random_head.score.weight.abs().sum() > 0  # what transformers initialises a missing head to
    zero_head = load_sequence_classifier(tiny_model_dir, spec, tokenizer, zero_new_head=True)
    assert torch.count_nonzero(zero_head.score.weight) == 0
    ids = tokenizer(["a b c", "d e"], return_tensors="pt", padding=True)
    assert torch.equal(zero_head(**ids).logits, torch.zeros(2, 1))

    save_plain(random_head, tokenizer, tmp_path / "rm")  # a reward model: its head is trained, not new
    reloaded = load_sequence_classifier(tmp_path / "rm", spec, tokenizer, zero_new_head=True)
    assert torch.equal(reloaded.score.weight, random_head.score.weight)


def test_a_reward_model_of_the_first_layers_keeps_their_weights_and_too_many_layers_name_the_field(tiny_model_dir,
                                                                                                    tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf_trainer.models import load_causal_lm, load_sequence_classifier, save_plain
    from rlhf_trainer.stages.reward import backbone_layers

    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    tok = load_tokenizer(tiny_model_dir, spec)
    lm = load_causal_lm(tiny_model_dir, spec, tok)
    rm = load_sequence_classifier(tiny_model_dir, spec, tok, num_layers=1, zero_new_head=True)
    assert len(rm.model.layers) == 1 and rm.config.num_hidden_layers == 1
    for name, weight in rm.model.named_parameters():
        expected = lm.model.get_parameter(name)
        if name == "embed_tokens.weight":  # but the row of the pad token load_tokenizer added: drawn afresh
            weight, expected = weight[:tok.pad_token_id], expected[:tok.pad_token_id]
        torch.testing.assert_close(weight, expected, atol=0, rtol=0)
    save_plain(rm, tok, tmp_path / "rm")
    assert len(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").model.layers) == 1

    assert backbone_layers(tiny_model_dir, 2, spec) == 2 and backbone_layers(tiny_model_dir, None, spec) is None
    with pytest.raises(ConfigError, match=r"spec.reward.numLayers is 3 but the backbone has 2 .* at most 2"):
        backbone_layers(tiny_model_dir, 3, spec)


@pytest.mark.parametrize("native", [False, True], ids=["cpu-without-bf16-simulated", "cpu-with-bf16-simulated"])
def test_bf16_set_where_the_cpu_emulates_bfloat16_is_obeyed_with_one_warning_naming_the_field(native, monkeypatch,
                                                                                              capsys):
    # The CPU's instruction set is the boundary simulated here: this machine has one kind or the other (and no GPU).
    monkeypatch.setattr(trainer_models, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(trainer_models, "cpu_prefers_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer_models._warn_once.cache_clear()
    assert [trainer_models.bf16_enabled(True, "spec.sft.bf16") for _ in range(2)] == [True, True]
    assert trainer_models.bf16_enabled(False, "spec.reward.bf16") is False
    assert trainer_models.bf16_enabled(None, "spec.reward.bf16") is native  # unset: where bfloat16 is faster
    warnings_printed = capsys.readouterr().err.splitlines()
    if native:
        assert warnings_printed == []
    else:
        assert len(warnings_printed) == 1
        assert "spec.sft.bf16 is true" in warnings_printed[0] and "set it false" in warnings_printed[0]


def test_cpu_bf16_detection_follows_the_override_variable_and_rejects_other_values(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, as in CI
    detections = (trainer_models.cpu_has_native_bf16, trainer_models.cpu_prefers_bf16)
    try:
        for value, expected in (("1", True), ("0", False)):
            monkeypatch.setenv("RLHF_CPU_BF16", value)
            for detect in detections:
                detect.cache_clear()
                assert detect() is expected
            assert trainer_models.bf16_enabled(None, "spec.ppo.bf16") is expected
        monkeypatch.setenv("RLHF_CPU_BF16", "yes")
        for detect in detections:
            detect.cache_clear()
            with pytest.raises(ConfigError, match="RLHF_CPU_BF16='yes'.* 0 .* or 1"):
                detect()
    finally:
        monkeypatch.undo()
        for detect in detections:
            detect.cache_clear()


# (/proc/cpuinfo's flags, vendor) -> bfloat16 by default: AMX anywhere, AVX512-BF16 on AMD, float32 otherwise
CPUS = [({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "GenuineIntel", True),
        ({"avx512f", "avx512_bf16"}, "GenuineIntel", False),
        ({"avx512f", "avx512_bf16"}, "AuthenticAMD", True),
        ({"avx2"}, "AuthenticAMD", False), ({"avx512f"}, "GenuineIntel", False)]


@pytest.mark.parametrize(("flags", "vendor", "prefers"), CPUS, ids=["intel-amx", "intel-avx512bf16-no-amx", "amd-zen4",
                                                                     "amd-avx2", "intel-avx512-no-bf16"])
def test_unset_bf16_means_bfloat16_where_the_cpu_computes_it_faster(flags, vendor, prefers, monkeypatch):
    # The CPU is the boundary simulated here: /proc/cpuinfo's answers, as the kernel gives them on each machine.
    monkeypatch.delenv("RLHF_CPU_BF16")
    monkeypatch.setattr(trainer_models, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(trainer_models, "cpu_vendor", lambda: vendor)
    trainer_models.cpu_prefers_bf16.cache_clear()
    try:
        assert trainer_models.cpu_prefers_bf16() is prefers
    finally:
        trainer_models.cpu_prefers_bf16.cache_clear()


def test_quantization_on_cpu_is_a_configuration_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only node, also on a GPU machine
    spec = ModelSpec.model_validate({"uri": "builtin://smollm2-135m-instruct", "quantization": {"bits": 4}})
    with pytest.raises(ConfigError, match="quantization.bits=4 needs a CUDA GPU"):
        quantization_config(spec)


def test_quantization_without_bitsandbytes_names_the_image_that_has_it_gpu_simulated(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU is the boundary simulated here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    spec = ModelSpec.model_validate({"uri": "builtin://smollm2-135m-instruct", "quantization": {"bits": 8}})
    with pytest.raises(ConfigError, match="bits=8 loads weights with bitsandbytes.*CUDA trainer image"):
        quantization_config(spec)
