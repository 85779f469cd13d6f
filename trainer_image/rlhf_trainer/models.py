"""Loading tokenizers and models the way every stage needs them.

* Tokenizer: an explicit pad token distinct from EOS (a new ``<|pad|>`` when the model has none, as the
  seeds add ``[PAD]``), left padding for generation, and the spec's chat template when given.
* Causal LMs (SFT, policy, reference) and sequence classifiers with ``num_labels=1`` (reward, value).
* dtype ``auto``: bfloat16 on a CUDA GPU that supports it, float32 otherwise.
* 4/8-bit loading needs CUDA: on CPU it is a configuration error that names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf_operator.spec import LoraSpec, ModelSpec
from rlhf_trainer.errors import ConfigError

PAD_TOKEN = "<|pad|>"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(model: ModelSpec) -> torch.dtype:
    if model.dtype == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, model.dtype)


def bf16_enabled(flag: bool | None) -> bool:
    """A stage's ``bf16`` setting: as given, or by default on a CUDA GPU that supports bfloat16."""
    if flag is not None:
        return flag
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def frozen_spec(model: ModelSpec, bf16: bool) -> ModelSpec:
    """How to load weights that are only read (sampling, reference, reward): in bfloat16 under ``bf16``,
    unless the spec asks for another dtype or quantizes them."""
    if bf16 and not model.quantization.bits and model.dtype in ("auto", "float32"):
        return model.model_copy(update={"dtype": "bfloat16"})
    return model


def quantization_config(model: ModelSpec) -> Any | None:
    bits = model.quantization.bits
    if bits is None:
        return None
    if not torch.cuda.is_available():
        raise ConfigError(
            f"spec.model.quantization.bits={bits} needs a CUDA GPU and this node has none: "
            "remove quantization.bits, or request nvidia.com/gpu in the stage's resources"
        )
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=resolve_dtype(model))
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(path: Path, model: ModelSpec) -> Any:
    """The tokenizer with an explicit pad token that is not EOS, padded on the spec's side."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    spec = model.tokenizer
    if spec.pad_token is not None:
        if spec.pad_token not in tok.get_vocab():
            tok.add_special_tokens({"pad_token": spec.pad_token})
        tok.pad_token = spec.pad_token
    elif tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = spec.padding_side
    if spec.chat_template is not None:
        tok.chat_template = spec.chat_template
    return tok


def _model_kwargs(model: ModelSpec, trained_in_bf16: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(model), "trust_remote_code": model.trust_remote_code}
    if trained_in_bf16 and not torch.cuda.is_available():
        # PyTorch's CPU flash-attention backward under bfloat16 autocast takes 3x the time of eager attention at
        # these sequence lengths. In float32 the two take the same time, and SDPA keeps less for the backward pass
        # (eager also keeps the attention weights and the key/value heads repeated for each query head: in PPO on
        # the demo model, LoRA, 777 MB per policy forward pass against SDPA's 691), so everything else uses SDPA.
        kwargs["attn_implementation"] = "eager"
    quant = quantization_config(model)
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


def _fit_vocab(net: Any, tokenizer: Any) -> Any:
    """Grow the embeddings when the tokenizer gained a pad token, and record the pad id in the config."""
    if net.get_input_embeddings().weight.shape[0] < len(tokenizer):
        net.resize_token_embeddings(len(tokenizer))
    net.config.pad_token_id = tokenizer.pad_token_id
    if getattr(net, "generation_config", None) is not None:
        net.generation_config.pad_token_id = tokenizer.pad_token_id
    return net


def load_causal_lm(path: Path, model: ModelSpec, tokenizer: Any, *, trained_in_bf16: bool = False) -> Any:
    """A causal LM (``trained_in_bf16``: it will be trained under bfloat16 autocast, which picks the attention
    kernel that is fast backwards there)."""
    from transformers import AutoModelForCausalLM

    return _fit_vocab(AutoModelForCausalLM.from_pretrained(path, **_model_kwargs(model, trained_in_bf16)), tokenizer)


def load_sequence_classifier(path: Path, model: ModelSpec, tokenizer: Any, *, trained_in_bf16: bool = False,
                             zero_new_head: bool = False) -> Any:
    """A scalar-output sequence classifier (``num_labels=1``): a reward or value model (see load_causal_lm).

    ``zero_new_head``: when the checkpoint has no score head (a causal LM becoming a reward model), the new head
    starts at zero instead of random: every response scores 0 before training, so the model has no random
    preference between responses to unlearn first. (On the demo's pairs the random seed-42 head gave a held-out
    pair accuracy of 0.76, the zero head 0.84; unseeded random heads anywhere from 0.76 to 0.86.)
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal-LM checkpoint has no score head yet: that warning is expected
    try:
        net, loading = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, output_loading_info=True, **_model_kwargs(model, trained_in_bf16))
    finally:
        hf_logging.set_verbosity(verbosity)
    head = getattr(net, "score", None)
    if zero_new_head and head is not None and any(k.startswith("score.") for k in loading["missing_keys"]):
        with torch.no_grad():
            for param in head.parameters():
                param.zero_()
    return _fit_vocab(net, tokenizer)


def freeze(net: Any) -> Any:
    """Evaluation mode with gradients off: for the reference and reward models."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def lora_config(lora: LoraSpec, task_type: str) -> Any:
    from peft import LoraConfig

    targets: Any = lora.target_modules[0] if lora.target_modules == ["all-linear"] else lora.target_modules
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def save_plain(net: Any, tokenizer: Any, out: Path) -> None:
    """Save a plain Hugging Face checkpoint; a LoRA model is merged into its base first."""
    if hasattr(net, "merge_and_unload"):
        net = net.merge_and_unload()
    net.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
