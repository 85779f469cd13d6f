"""Float32 linear layers through oneDNN compute what PyTorch's own products compute, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ATEN_PRODUCTS, ONEDNN_PRODUCT, ops_run, tiny_llama

from rlhf_trainer.accelerations import onednn_linear as onednn
from rlhf_trainer.accelerations.onednn_linear import onednn_linear, onednn_preferred
from rlhf_trainer.errors import ConfigError


def loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_linear_layer_runs_forward_and_backward_in_onednn_with_pytorchs_results_and_repeats_exactly():
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 24)
    leaf = torch.randn(3, 10, 48, requires_grad=True)

    def run() -> list[torch.Tensor]:
        leaf.grad, layer.weight.grad, layer.bias.grad = None, None, None
        out = layer(leaf[:, ::2])  # a strided input, as slices of hidden states are
        (out.square().sum()).backward()
        return [out.detach(), leaf.grad, layer.weight.grad, layer.bias.grad]

    expected = run()
    with onednn_linear(), ops_run() as ops:
        got, again = run(), run()
    assert ONEDNN_PRODUCT in ops.names and not ATEN_PRODUCTS & set(ops.names), ops.names
    assert ops.names.count(ONEDNN_PRODUCT) == 2 * 3  # forward, dL/dx and dL/dW, twice
    for mine, theirs, repeat in zip(got, expected, again):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        assert torch.equal(mine, repeat)
    assert F.linear is torch._C._nn.linear  # restored


def test_a_lora_model_trains_through_onednn_to_pytorchs_loss_and_gradients_and_frozen_weights_get_none():
    model = tiny_llama(lora=True).train()
    tokens = torch.randint(0, 97, (2, 9))
    expected_loss, expected = loss_and_grads(model, tokens)
    with onednn_linear(), ops_run() as ops:
        loss, grads = loss_and_grads(model, tokens)
    assert not ATEN_PRODUCTS & set(ops.names)  # attention runs in SDPA's kernel: every product was oneDNN's
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected.keys() and all("lora_" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_bfloat16_autocast_and_frozen_passes_take_the_path_they_took_before():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(16, 8), torch.randn(4, 16)
    with onednn_linear():
        with torch.autocast("cpu", dtype=torch.bfloat16), ops_run() as ops:
            assert layer(x).dtype is torch.bfloat16  # autocast still casts: oneDNN's float32 op is not used
        assert ONEDNN_PRODUCT not in ops.names
        with ops_run() as ops:
            assert layer.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype is torch.bfloat16
        assert ONEDNN_PRODUCT not in ops.names
        layer = layer.float()
        with torch.inference_mode(), ops_run() as ops:  # sampling: no autograd, oneDNN's product directly
            out = layer(x)
        assert ops.names == [ONEDNN_PRODUCT]
    torch.testing.assert_close(out, layer(x))


def test_linear_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError, match="stage failed"), onednn_linear():
        assert F.linear is not torch._C._nn.linear
        raise RuntimeError("stage failed")
    assert F.linear is torch._C._nn.linear


@pytest.mark.parametrize(("vendor", "flags", "expected"), [
    ("AuthenticAMD", {"avx2", "avx512f"}, True),  # MKL runs its AVX2 kernels on these
    ("AuthenticAMD", {"avx2"}, False),  # no AVX-512: the same instructions either way
    ("GenuineIntel", {"avx2", "avx512f"}, False),  # MKL takes AVX-512 here itself
    ("", set(), False),  # /proc/cpuinfo unreadable
], ids=["amd-avx512-simulated", "amd-avx2-simulated", "intel-avx512-simulated", "unknown-cpu-simulated"])
def test_onednn_is_preferred_on_cpus_with_avx512_that_mkl_does_not_use_it_on(vendor, flags, expected, monkeypatch):
    # The CPU is the boundary simulated here: this machine has one vendor and one instruction set.
    monkeypatch.delenv(onednn.ONEDNN_ENV, raising=False)
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(onednn, "cpu_flags", lambda: frozenset(flags))
    onednn_preferred.cache_clear()
    try:
        assert onednn_preferred() is expected
    finally:
        onednn_preferred.cache_clear()


def test_the_override_variable_decides_and_other_values_are_refused_naming_it(monkeypatch):
    try:
        for value, expected in (("1", True), ("0", False)):
            monkeypatch.setenv(onednn.ONEDNN_ENV, value)
            onednn_preferred.cache_clear()
            assert onednn_preferred() is expected
        monkeypatch.setenv(onednn.ONEDNN_ENV, "on")
        onednn_preferred.cache_clear()
        with pytest.raises(ConfigError, match="RLHF_ONEDNN_LINEAR='on'.* 0 .* or 1"):
            onednn_preferred()
    finally:
        monkeypatch.undo()
        onednn_preferred.cache_clear()
