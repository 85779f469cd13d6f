"""The four models of PPO and how they share weights.

==========  =====================================  =========  ==============================================
role        loaded from                            trained    with LoRA
==========  =====================================  =========  ==============================================
policy      pi_SFT (causal LM)                     yes        an adapter on pi_SFT
reference   pi_SFT (causal LM)                     no         the policy with its adapter disabled: no copy
value       R_phi (sequence classifier, 1 label)   yes        an adapter on R_phi (``valueLora``)
reward      R_phi (sequence classifier, 1 label)   no         the value model with its adapter disabled
==========  =====================================  =========  ==============================================

Frozen models are in eval mode with gradients off; under bf16 (``spec.ppo.bf16``) their weights are stored in
bfloat16 (half the memory, no cast at every forward pass), LoRA's frozen base included, while trained weights
stay in the spec's dtype (float32 for ``auto``: master weights under autocast). Dropout is disabled everywhere
(detail: with dropout the log-probabilities of the rollout and of the first update would differ for the same
weights).
Under ZeRO-3 (``distributed.zeroStage: 3``) each model is partitioned across the processes as it is loaded, and
the frozen ones run as DeepSpeed inference engines (:mod:`rlhf_trainer.ppo.zero`): no process holds a whole model
outside a rollout.
The value model is the reward model's scalar head read at every position (:class:`TokenValues`), so its first
estimates are the reward model's own opinion of each prefix. ``gradientCheckpointing`` checkpoints the decoder
layers of the two trained models.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from rlhf_api.spec import ModelSpec, PPOSpec, QuantizationSpec
from rlhf_trainer import models as hf_models
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.modeling import Sequences, transformers_model
from rlhf_trainer.ppo import zero


class TokenValues(nn.Module):
    """The critic: a sequence classifier's scalar head applied to every position, not only the last one."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier  # a transformers sequence classifier, or a peft model around one

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                response_width: int) -> torch.Tensor:
        """V of the state before each response token.

        Args:
            input_ids, attention_mask, position_ids: (B, P + R) prompt + response, left-padded.
            response_width: R.

        Returns:
            (B, R) float32 values (read at positions P-1 .. P+R-2: the state before each response token).
        """
        inner = transformers_model(self.classifier)
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return inner.score(hidden[:, -response_width - 1:-1].contiguous()).squeeze(-1).float()


def response_values(value_model: Any, batch: Sequences) -> torch.Tensor:
    """V of the state before each response token (0 on padding).

    Returns:
        (B, R) float32.
    """
    ids, attention, positions = batch.input_ids()
    return value_model(ids, attention, positions, batch.responses.shape[1]) * batch.mask


@dataclass
class PPOModels:
    """Tokenizers and models by role; ``reference`` / ``reward`` are None when LoRA shares their weights."""

    tokenizer: Any  # the policy's (prompts and responses are in its vocabulary)
    reward_tokenizer: Any  # the reward model's (scoring re-tokenizes the text exactly as the reward stage did)
    policy: nn.Module
    reference: nn.Module | None
    value: TokenValues
    reward: nn.Module | None
    engines: list[Any] = field(default_factory=list)  # under ZeRO-3, the frozen models' DeepSpeed engines

    @contextmanager
    def reference_of(self, policy: Any) -> Iterator[Any]:
        """The frozen pi_SFT to call: its own copy, or ``policy`` with the LoRA adapter disabled.

        Args:
            policy: what to call for the policy (the module, or the DeepSpeed engine around it).
        """
        if self.reference is not None:
            yield self.reference
            return
        with self.policy.disable_adapter():
            yield policy

    @contextmanager
    def reward_model(self) -> Iterator[nn.Module]:
        """The frozen R_phi: its own copy, or the value model's classifier with the LoRA adapter disabled."""
        if self.reward is not None:
            yield self.reward
            return
        classifier = self.value.classifier
        with classifier.disable_adapter():
            yield classifier


def disable_dropout(net: nn.Module) -> nn.Module:
    """Dropout probability 0 in every layer (LoRA dropout included) and in attention."""
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return net


def _unquantized(spec: ModelSpec) -> ModelSpec:
    return spec.model_copy(update={"quantization": QuantizationSpec()})


def uses_bf16(settings: PPOSpec) -> bool:
    """bfloat16 autocast for PPO's forward passes: as ``bf16`` says, or by default where the hardware computes
    in bfloat16 (:func:`rlhf_trainer.models.bf16_enabled`)."""
    return hf_models.bf16_enabled(settings.bf16, "spec.ppo.bf16")


def _to(net: nn.Module, spec: ModelSpec, device: torch.device) -> nn.Module:
    # bitsandbytes places quantized weights on the GPU itself and refuses .to()
    return net if spec.quantization.bits else net.to(device)


def _trained_in_float32(net: nn.Module) -> nn.Module:
    """Trained weights in float32 over a bfloat16 frozen base (peft copies the score head in the base's dtype)."""
    for param in net.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return net


def _activation_checkpointed(net: nn.Module) -> nn.Module:
    """Each decoder layer keeps only its input for the backward pass and runs again there (torch's
    non-reentrant checkpointing, which needs no input that requires grad: LoRA's frozen embeddings work)."""
    transformers_model(net).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return net


def merged_policy(policy: Any, policy_dir: Path, spec: ModelSpec, tokenizer: Any) -> Any:
    """The LoRA policy as a plain model, its adapter merged into pi_SFT's weights as stored (float32 or the
    spec's dtype, never quantized), not into the bfloat16 or quantized copy that training ran on."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    live_base = policy.get_base_model()
    target = _unquantized(spec)
    if not getattr(live_base, "is_quantized", False) and live_base.dtype == hf_models.resolve_dtype(target):
        return policy.merge_and_unload()
    adapter = get_peft_model_state_dict(policy)
    merged = get_peft_model(hf_models.load_causal_lm(policy_dir, target, tokenizer), policy.peft_config["default"])
    set_peft_model_state_dict(merged, adapter)
    return merged.merge_and_unload()


@dataclass(frozen=True)
class Loading:
    """How each model is created: whole on every process, or (ZeRO-3) partitioned as it is created."""

    trained: dict[str, Any] | None  # the trained models' DeepSpeed config under ZeRO-3, else None
    frozen: dict[str, Any] | None  # the frozen models' (no optimizer; their own precision)

    @classmethod
    def of(cls, settings: PPOSpec, policy_dir: Path, frozen: ModelSpec, bf16: bool) -> Loading:
        if settings.distributed.zero_stage != 3:
            return cls(None, None)
        hidden = zero.hidden_size(policy_dir)
        trained = zero.engine_config(zero_stage=3, hidden=hidden, bf16=bf16)
        if frozen.quantization.bits:  # bitsandbytes weights are not partitioned: the frozen models load whole
            return cls(trained, None)
        return cls(trained, zero.engine_config(zero_stage=3, hidden=hidden, bf16=frozen.dtype == "bfloat16"))

    def place(self, net: nn.Module, spec: ModelSpec, device: torch.device, *, trained: bool) -> nn.Module:
        """A model loaded whole goes to ``device``; a partitioned one stays where DeepSpeed put its shard."""
        return net if (self.trained if trained else self.frozen) is not None else _to(net, spec, device)

    def frozen_model(self, net: nn.Module, engines: list[Any]) -> nn.Module:
        """A frozen model to call: itself, or under ZeRO-3 the module of an inference engine kept in ``engines``."""
        net = hf_models.freeze(net)
        if self.frozen is None:
            return net
        engines.append(zero.inference_engine(net, self.frozen))
        return engines[-1].module


def load_models(policy_dir: Path, reward_dir: Path, spec: ModelSpec, settings: PPOSpec,
                device: torch.device) -> PPOModels:
    """Load policy, reference, value and reward models for PPO.

    ``spec.quantization`` (4/8-bit, CUDA only) applies to frozen weights: the reference and reward models,
    and the frozen bases under LoRA adapters. Fully trained models are always loaded unquantized.

    Raises:
        ConfigError: when the two checkpoints' vocabularies differ (the value model reads the policy's tokens).
    """
    tokenizer = hf_models.load_tokenizer(policy_dir, spec)
    reward_tokenizer = hf_models.load_tokenizer(reward_dir, spec)
    if tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise ConfigError(
            "ppo: the policy (pi_SFT) and the reward model have different vocabularies, but the value model, "
            "initialised from the reward model, reads the policy's tokens: train the reward model from pi_SFT "
            "or from the same base model (spec.reward.initFrom)"
        )
    lora, bf16 = settings.lora.enabled, uses_bf16(settings)
    frozen = hf_models.frozen_spec(spec, bf16)
    loading = Loading.of(settings, policy_dir, frozen, bf16)
    engines: list[Any] = []

    policy_spec = frozen if lora else _unquantized(spec)
    with zero.sharded_loading(loading.trained):
        policy = loading.place(hf_models.load_causal_lm(policy_dir, policy_spec, tokenizer, trained_in_bf16=bf16),
                               policy_spec, device, trained=True)
    reference = None
    if lora:
        from peft import get_peft_model

        policy = _trained_in_float32(get_peft_model(policy, hf_models.lora_config(settings.lora, "CAUSAL_LM")))
    else:
        with zero.sharded_loading(loading.frozen):
            reference = loading.frozen_model(loading.place(hf_models.load_causal_lm(policy_dir, frozen, tokenizer),
                                                           frozen, device, trained=False), engines)
    disable_dropout(policy).train()
    if settings.gradient_checkpointing:
        _activation_checkpointed(policy)

    value_lora = lora and settings.value_lora
    value_spec = frozen if value_lora else _unquantized(spec)
    with zero.sharded_loading(loading.trained):
        classifier = loading.place(hf_models.load_sequence_classifier(reward_dir, value_spec, reward_tokenizer,
                                                                      trained_in_bf16=bf16),
                                   value_spec, device, trained=True)
    reward = None
    if value_lora:
        from peft import get_peft_model

        classifier = _trained_in_float32(get_peft_model(classifier, hf_models.lora_config(settings.lora, "SEQ_CLS")))
    else:
        with zero.sharded_loading(loading.frozen):
            reward = loading.frozen_model(loading.place(
                hf_models.load_sequence_classifier(reward_dir, frozen, reward_tokenizer), frozen, device,
                trained=False), engines)
    if settings.gradient_checkpointing:
        _activation_checkpointed(classifier)
    value = TokenValues(disable_dropout(classifier)).train()
    return PPOModels(tokenizer, reward_tokenizer, policy, reference, value, reward, engines)
