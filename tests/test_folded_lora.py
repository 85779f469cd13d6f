"""Sampling with LoRA adapters folded into a copy of the weights computes what the peft model computes."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from rlhf_trainer.ppo.folded_lora import folded_adapters


def tiny_lora_llama(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config).eval(),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero: give the adapters something to add
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return model


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, use_cache=False).logits


def adapter_calls(model: nn.Module, run) -> int:
    """How many times the adapters' A matrices ran during ``run()``."""
    count = [0]
    handles = [m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
               for n, m in model.named_modules() if n.endswith("lora_A.default")]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return count[0]


@pytest.mark.parametrize("bf16", [False, True], ids=["float32-one-folded-weight", "bf16-base-A-stacked-under-W"])
def test_folded_layers_compute_what_peft_computes_without_its_adapter_calls_and_leave_the_weights_alone(bf16):
    model = tiny_lora_llama()
    if bf16:  # as spec.ppo.bf16 loads it: frozen base in bf16, adapters float32, forward passes under autocast
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.data = param.data.to(torch.bfloat16)
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 97, (3, 5))
    with torch.no_grad(), precision:
        expected = logits(model, tokens)
        with model.disable_adapter():
            assert not torch.allclose(logits(model, tokens), expected, atol=1e-2)  # the adapters matter
        with folded_adapters(model):
            got = logits(model, tokens)
            assert adapter_calls(model, lambda: logits(model, tokens)) == 0
        assert adapter_calls(model, lambda: logits(model, tokens)) > 0  # peft's own forward is back
    # in bf16 exactly: each output sums over the same inputs in the same order (a weight folded in bf16 is
    # 1e-2 off); in float32 one folded weight sums in another order
    tolerance = 0 if bf16 else 1e-5
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_nothing_is_folded_with_adapters_off_under_autocast_or_where_gradients_flow():
    model = tiny_lora_llama()
    tokens = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        with model.disable_adapter(), folded_adapters(model):
            assert adapter_calls(model, lambda: logits(model, tokens)) == 0  # off: the base layers alone
            base = logits(model, tokens)
        with model.disable_adapter():
            assert torch.equal(base, logits(model, tokens))
        with torch.autocast("cpu", dtype=torch.bfloat16), folded_adapters(model):
            assert adapter_calls(model, lambda: logits(model, tokens)) > 0
    with folded_adapters(model):
        logits(model, tokens).sum().backward()  # training inside the context still reaches the adapters
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
