"""Decoding from copies of the weights (LoRA adapters folded in, packed for oneDNN) computes what the model computes."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from tiny_models import ATEN_PRODUCTS, ONEDNN_PRODUCT, ops_run, tiny_llama
from torch import nn

from rlhf_api.spec import GenerationSpec
from rlhf_trainer.accelerations.decoding_weights import decoding_weights, onednn_packs_here
from rlhf_trainer.generation import sample_responses
from rlhf_trainer.seeding import generator

x86_only = pytest.mark.skipif(not onednn_packs_here(), reason="oneDNN packs weights in PyTorch's x86 builds only")


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


def linear_layers(model: nn.Module) -> int:
    """The model's linear layers as decoding sees them: a LoRA layer counts once (its A, B and base are inside)."""
    return sum(isinstance(m, nn.Linear) and not any(part in n for part in ("lora_A", "lora_B", "base_layer"))
               for n, m in model.named_modules()) + sum(n.endswith("base_layer") for n, _ in model.named_modules())


@pytest.mark.parametrize("bf16", [False, True], ids=["float32-one-folded-weight", "bf16-base-A-stacked-under-W"])
def test_folded_layers_compute_what_peft_computes_without_its_adapter_calls_and_leave_the_weights_alone(bf16):
    model = tiny_llama(lora=True)
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
        with decoding_weights(model, rows=3):
            got = logits(model, tokens)
            assert adapter_calls(model, lambda: logits(model, tokens)) == 0
        assert adapter_calls(model, lambda: logits(model, tokens)) > 0  # peft's own forward is back
    # in bf16 each output sums the same bfloat16 products (a weight folded in bf16 is 1e-2 off), perhaps in another
    # order (packed); in float32 one folded weight sums in another order
    tolerance = 2e-3 if bf16 else 1e-5
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_nothing_is_folded_with_adapters_off_under_autocast_or_where_gradients_flow():
    model = tiny_llama(lora=True)
    tokens = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        with model.disable_adapter(), decoding_weights(model, rows=3):
            assert adapter_calls(model, lambda: logits(model, tokens)) == 0  # off: the base layers alone
            base = logits(model, tokens)
        with model.disable_adapter():
            torch.testing.assert_close(base, logits(model, tokens), atol=1e-5, rtol=1e-5)  # the LM head is packed
        with torch.autocast("cpu", dtype=torch.bfloat16), decoding_weights(model, rows=3):
            assert adapter_calls(model, lambda: logits(model, tokens)) > 0
    with decoding_weights(model, rows=3):
        logits(model, tokens).sum().backward()  # training inside the context still reaches the adapters
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@x86_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_every_linear_layer_decodes_from_one_packed_product_and_gradients_take_the_models_own(dtype, lora):
    model = tiny_llama(lora=lora)
    if dtype is torch.bfloat16 and lora:  # spec.ppo.bf16's LoRA: a bfloat16 base under autocast
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.data = param.data.to(dtype)
    elif dtype is torch.bfloat16:  # a frozen model loaded in bfloat16 (the evaluate stage's), no autocast
        model = model.to(dtype)
    precision = torch.autocast("cpu", dtype=dtype) if lora and dtype is torch.bfloat16 else nullcontext()
    tokens = torch.randint(0, 97, (3, 5))
    with torch.no_grad(), precision:
        expected = logits(model, tokens)
        with decoding_weights(model, rows=3), ops_run() as ops:
            got = logits(model, tokens)
    assert ops.names.count(ONEDNN_PRODUCT) == linear_layers(model) == 2 * 7 + 1  # one product each, LM head too
    if not lora or dtype is torch.float32:  # (bf16 LoRA: B's small product after the stacked one stays aten's)
        assert not ATEN_PRODUCTS & set(ops.names), ops.names
    tolerance = 1e-5 if dtype is torch.float32 else 2e-2  # another summation order: float32's or bfloat16's rounding
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    with decoding_weights(model, rows=3), precision, ops_run() as ops:
        logits(model, tokens).float().sum().backward()  # autograd on: every layer's own product
    assert ONEDNN_PRODUCT not in ops.names and ATEN_PRODUCTS & set(ops.names)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the layers' own methods are back


def test_sampling_with_decoding_weights_writes_the_same_tokens_with_the_same_log_probabilities():
    model = tiny_llama(lora=True)
    queries = torch.randint(3, 97, (4, 6))
    mask = torch.ones_like(queries)
    mask[1, :2] = 0  # left padding
    gen = GenerationSpec(maxNewTokens=12, temperature=1.0)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return sample_responses(model, queries, mask, gen, stop_token_ids=[0], pad_token_id=1,
                                generators=[generator(5, "episode", i) for i in range(4)])

    expected_tokens, expected_logprobs = run()
    with decoding_weights(model, rows=4):
        tokens, logprobs = run()
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)
