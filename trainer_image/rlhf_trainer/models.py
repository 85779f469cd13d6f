"""Loading tokenizers and models the way every stage needs them.

* Tokenizer: an explicit pad token distinct from EOS (a new ``<|pad|>`` when the model has none), left
  padding for generation, and the spec's chat template when given.
* Causal LMs (SFT, policy, reference) and sequence classifiers with ``num_labels=1`` (reward, value).
* dtype ``auto``: float32. Weights that are trained stay float32 (under ``bf16`` they are the master weights and
  the products run in bfloat16 under autocast: mixed precision, as TRL's and DeepSpeed's bf16 train); weights that
  are only read are stored in bfloat16 under ``bf16`` (:func:`frozen_spec`).
* A stage's ``bf16``: as given, or by default where the hardware computes in bfloat16 (a CUDA GPU that supports
  it, a CPU with AMX or AVX512-BF16); set true on a CPU without those instructions, it is obeyed with a warning
  (PyTorch emulates bfloat16 there, many times slower than float32).
* 4/8-bit loading needs CUDA: on CPU it is a configuration error that names the field.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch

from rlhf_api.spec import LoraSpec, ModelSpec
from rlhf_trainer.accelerations.cpu import cpu_flags, cpu_vendor
from rlhf_trainer.errors import ConfigError

PAD_TOKEN = "<|pad|>"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_deepspeed_accelerator() -> None:
    """Tell DeepSpeed which accelerator this is before anything imports it (transformers and accelerate do): the
    CPU where there is no GPU, instead of letting it guess and warn that it guessed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_dtype(model: ModelSpec) -> torch.dtype:
    """The dtype weights are loaded in: the spec's, float32 for ``auto``."""
    return torch.float32 if model.dtype == "auto" else getattr(torch, model.dtype)


def cuda_bf16() -> bool:
    """Whether a CUDA GPU is here and computes in bfloat16 (Ampere and later)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def bf16_enabled(flag: bool | None, field: str) -> bool:
    """A stage's ``bf16`` setting (``field``, e.g. "spec.sft.bf16"): as given, or when unset, whether bfloat16 is
    the faster choice here (a CUDA GPU that supports it; without CUDA, :func:`cpu_prefers_bf16`). Set true where
    bfloat16 runs emulated (a CPU without those instructions) it still holds, with a warning that names the
    field."""
    if torch.cuda.is_available():
        return cuda_bf16() if flag is None else flag
    if flag is None:
        return cpu_prefers_bf16()
    if flag and not cpu_has_native_bf16():
        _warn_once(f"warning: {field} is true, but this CPU has no bfloat16 instructions (AMX or AVX512-BF16): "
                   "PyTorch emulates bfloat16 here, up to tens of times slower than float32: "
                   f"unset {field} or set it false on this machine")
    return flag


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # as /proc/cpuinfo names the instructions
CPU_BF16_ENV = "RLHF_CPU_BF16"  # "0" or "1": overrides what /proc/cpuinfo says (the tests set "0")


def _cpu_bf16_override() -> bool | None:
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if not override:
        return None
    if override not in ("0", "1"):
        raise ConfigError(f"{CPU_BF16_ENV}={override!r}: set it to 0 (float32 on this CPU) or 1 (bfloat16), "
                          "or unset it")
    return override == "1"


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: AMX or AVX512-BF16 (Intel since Cooper Lake,
    AMD since Zen 4). Without them (AVX2 only, AVX-512 without BF16) bfloat16 is converted in software, many times
    slower than float32 (figures: docs/measurements.md, "bfloat16 on CPUs without it"). ``RLHF_CPU_BF16=0`` (or
    ``1``) overrides the answer.
    """
    override = _cpu_bf16_override()
    return override if override is not None else not cpu_flags().isdisjoint(CPU_BF16_FLAGS)


@cache
def cpu_prefers_bf16() -> bool:
    """Whether unset ``bf16`` fields mean bfloat16 on this CPU: where its bfloat16 products beat its float32 ones.

    AMX does (Intel since Sapphire Rapids), and so does AVX512-BF16 on AMD (Zen 4). An Intel CPU with AVX512-BF16
    but no AMX (Cooper Lake, or a virtual machine that hides AMX) multiplies float32 faster, with MKL's AVX-512
    kernels, than bfloat16 under autocast (figures: docs/measurements.md, "bfloat16 without AMX on Intel").
    ``RLHF_CPU_BF16=0`` (or ``1``) overrides the answer.
    """
    override = _cpu_bf16_override()
    if override is not None:
        return override
    flags = cpu_flags()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and cpu_vendor() not in ("", "GenuineIntel"))


@cache
def _warn_once(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"spec.model.quantization.bits={bits} loads weights with bitsandbytes, which this trainer image lacks: "
            "run the stage on the CUDA trainer image (trainer_image/Dockerfile, VARIANT=cuda), "
            "pip install bitsandbytes into yours, or remove quantization.bits"
        )
    from transformers import BitsAndBytesConfig

    if bits == 4:
        compute = torch.bfloat16 if model.dtype == "auto" and cuda_bf16() else resolve_dtype(model)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
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
        # PyTorch's CPU flash-attention backward under bfloat16 autocast is much slower than eager attention at
        # these sequence lengths. In float32 the two take the same time, and SDPA keeps less for the backward pass
        # (eager also keeps the attention weights and the key/value heads repeated for each query head), so
        # everything else uses SDPA (figures: docs/measurements.md, "Attention kernels under bf16").
        kwargs["attn_implementation"] = "eager"
    quant = quantization_config(model)
    if quant is not None:
        kwargs["quantization_config"] = quant
    return kwargs


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers' own warnings silenced for the duration: for calls whose warnings we expect."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _fit_vocab(net: Any, tokenizer: Any) -> Any:
    """Grow the embeddings when the tokenizer gained a pad token, and record the pad id in the config."""
    weight = net.get_input_embeddings().weight
    if getattr(weight, "ds_shape", weight.shape)[0] < len(tokenizer):  # ds_shape: a ZeRO-3 shard's full shape
        with transformers_errors_only():  # the new row's initialisation (the old rows' mean) is not news
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
                             zero_new_head: bool = False, num_layers: int | None = None) -> Any:
    """A scalar-output sequence classifier (``num_labels=1``): a reward or value model (see load_causal_lm).

    ``zero_new_head``: when the checkpoint has no score head (a causal LM becoming a reward model), the new head
    starts at zero instead of random: every response scores 0 before training, so the model has no random
    preference between responses to unlearn first (figures: docs/measurements.md, "Reward model's zero score
    head").

    ``num_layers``: keep the checkpoint's embeddings, its first ``num_layers`` transformer layers and its final
    norm (the later layers are not loaded); the saved model's config says how many it has, so whatever loads it
    later gets the same shape.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs = _model_kwargs(model, trained_in_bf16)
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    with transformers_errors_only():  # no score head yet, or layers left out: those warnings are expected
        net, loading = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, output_loading_info=True, **kwargs)
    head = getattr(net, "score", None)
    if zero_new_head and head is not None and any(k.startswith("score.") for k in loading["missing_keys"]):
        with torch.no_grad():
            for param in head.parameters():
                param.zero_()
    return _fit_vocab(net, tokenizer)


def scale_score_head(net: Any, factor: float) -> None:
    """Multiply a sequence classifier's scores by ``factor``: its ``score`` head's weight (and bias, if any)."""
    head = getattr(net, "score", None)
    if head is None:
        raise ConfigError(f"{type(net).__name__} has no score head named `score` to rescale: unset "
                          "spec.reward.normalizeScores for this model family")
    with torch.no_grad():
        for param in head.parameters():
            param.mul_(factor)


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
