"""Sampling with LoRA adapters folded into a copy of the weights computes what the peft model computes."""

from __future__ import annotations

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


def test_folded_layers_compute_the_adapted_model_with_one_product_and_leave_the_weights_alone():
    model = tiny_lora_llama()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        expected = logits(model, tokens)
        with model.disable_adapter():
            assert not torch.allclose(logits(model, tokens), expected, atol=1e-3)  # the adapters matter
        with folded_adapters(model):
            got = logits(model, tokens)
            assert adapter_calls(model, lambda: logits(model, tokens)) == 0
        assert adapter_calls(model, lambda: logits(model, tokens)) > 0  # peft's own forward is back
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_under_bf16_autocast_a_bf16_base_samples_with_a_stacked_under_w_computing_what_peft_computes():
    model = tiny_lora_llama()
    for name, param in model.named_parameters():  # as spec.ppo.bf16 loads it: frozen base bf16, adapters float32
        if "lora_" not in name:
            param.data = param.data.to(torch.bfloat16)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 97, (3, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = logits(model, tokens)
        with model.disable_adapter():
            assert not torch.allclose(logits(model, tokens), expected, atol=1e-2)  # the adapters matter
        with folded_adapters(model):
            got = logits(model, tokens)
            assert adapter_calls(model, lambda: logits(model, tokens)) == 0
        assert adapter_calls(model, lambda: logits(model, tokens)) > 0
    # exactly: each output sums over the same inputs in the same order (a weight folded in bf16 is 1e-2 off)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
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
