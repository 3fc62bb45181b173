"""LoRAPair and MSPLoRALinear on their own: the update formula, scales, per-level dropout, dtypes, merge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msplora_dist import LoRAPair, MSPLoRAConfig, MSPLoRALinear
from msplora_dist.adapters.layers import base_features

IN, OUT = 24, 20


def _pairs(ranks=(4, 3, 2), seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return tuple(LoRAPair(IN, OUT, r, init_lora_weights=False, dtype=dtype) if r else None for r in ranks)


def _layer(ranks=(4, 3, 2), alphas=(8.0, 6.0, 2.0), dropout=(0.0, 0.0, 0.0), use_rslora=False, dtype=torch.float32, seed=0, bias=True):
    config = MSPLoRAConfig(ranks=ranks, alphas=alphas, dropout=dropout, use_rslora=use_rslora)
    torch.manual_seed(seed + 100)
    base = nn.Linear(IN, OUT, bias=bias).to(dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    pairs = _pairs(ranks, seed)
    return MSPLoRALinear(base, pairs, tuple(config.scale(i) for i in range(3)), config.dropout), pairs, config


def _x(dtype=torch.float32, seed=7, shape=(2, 5)):
    return torch.randn(*shape, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_lora_pair_has_peft_shapes_and_zero_B_kaiming_A_init():
    torch.manual_seed(0)
    pair = LoRAPair(IN, OUT, 6)
    assert pair.lora_A.shape == (6, IN) and pair.lora_B.shape == (OUT, 6)
    assert torch.count_nonzero(pair.lora_B) == 0
    bound = 1 / math.sqrt(IN)  # kaiming_uniform with a = sqrt(5): gain sqrt(2 / 6), bound gain * sqrt(3 / fan_in)
    assert pair.lora_A.abs().max() <= bound and pair.lora_A.abs().max() > bound / 2
    assert torch.count_nonzero(LoRAPair(IN, OUT, 6, init_lora_weights=False).lora_B) > 0


def test_output_is_base_plus_sum_of_scaled_level_updates():
    layer, pairs, config = _layer()
    x = _x()
    expected = layer.base_layer(x)
    for i, p in enumerate(pairs):
        expected = expected + config.scale(i) * (x @ p.lora_A.T @ p.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), sum(config.scale(i) * p.lora_B @ p.lora_A for i, p in enumerate(pairs)),
                               rtol=1e-5, atol=1e-6)


def test_switched_off_levels_are_skipped():
    layer, pairs, _ = _layer(ranks=(0, 3, 0), alphas=(1, 6, 1))
    assert layer.levels == (1,) and layer.pairs == (pairs[1],) and layer.scales == (6 / 3,)
    x = _x()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * (x @ pairs[1].lora_A.T @ pairs[1].lora_B.T), rtol=1e-5, atol=1e-6)


def test_scales_are_alpha_over_r_and_alpha_over_sqrt_r_with_rslora():
    layer, _, _ = _layer(ranks=(16, 4, 1), alphas=(8, 8, 8))
    assert layer.scales == (8 / 16, 8 / 4, 8 / 1)
    layer_rs, pairs, _ = _layer(ranks=(16, 4, 1), alphas=(8, 8, 8), use_rslora=True)
    assert layer_rs.scales == (8 / 4, 8 / 2, 8 / 1)
    x = _x()
    expected = layer_rs.base_layer(x) + sum(s * (x @ p.lora_A.T @ p.lora_B.T) for s, p in zip((2.0, 4.0, 8.0), pairs, strict=True))
    torch.testing.assert_close(layer_rs(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_train_differs_from_eval_and_eval_is_deterministic():
    layer, _, _ = _layer(dropout=(0.3, 0.3, 0.3))
    x = _x()
    layer.eval()
    y_eval = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), y_eval)
    layer.train()
    torch.manual_seed(2)
    y_train_a = layer(x)
    torch.manual_seed(3)
    y_train_b = layer(x)
    assert not torch.allclose(y_train_a, y_eval) and not torch.allclose(y_train_a, y_train_b)
    layer.eval()
    assert torch.equal(layer(x), y_eval)


def test_each_level_draws_its_own_dropout_mask_with_its_own_rate():
    dropout = (0.5, 0.0, 0.25)
    layer, pairs, config = _layer(dropout=dropout)
    layer.train()
    x = _x()
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)  # same RNG stream: one F.dropout per level with p > 0, in level order
    expected = layer.base_layer(x)
    for i, (p, d) in enumerate(zip(pairs, dropout, strict=True)):
        xi = F.dropout(x, p=d, training=True) if d else x
        expected = expected + config.scale(i) * (xi @ p.lora_A.T @ p.lora_B.T)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # A level without dropout is deterministic in train mode: switching the others off leaves it exact.
    with torch.no_grad():
        pairs[0].lora_B.zero_()
        pairs[2].lora_B.zero_()
    torch.manual_seed(12)
    y_mid_only = layer(x)
    torch.testing.assert_close(y_mid_only, layer.base_layer(x) + config.scale(1) * (x @ pairs[1].lora_A.T @ pairs[1].lora_B.T),
                               rtol=1e-5, atol=1e-6)


def test_adapter_math_runs_in_the_activation_dtype():
    layer, pairs, _ = _layer(dtype=torch.bfloat16)  # bf16 base, fp32 adapter tensors
    assert all(p.lora_A.dtype == torch.float32 for p in pairs)
    x = _x(torch.bfloat16).requires_grad_(True)
    delta = layer.adapter_output(x)
    assert delta.dtype == torch.bfloat16
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for p in pairs:  # gradients reach the fp32 master tensors in fp32
        assert p.lora_A.grad.dtype == torch.float32 and p.lora_B.grad.dtype == torch.float32
        assert torch.count_nonzero(p.lora_A.grad) > 0
    reference = layer.base_layer(x.detach()).float() + x.detach().float() @ layer.delta_weight().T
    torch.testing.assert_close(y.detach().float(), reference, rtol=3e-2, atol=3e-2)


def test_gradients_of_each_level_match_the_explicit_formula():
    layer, pairs, config = _layer()
    x = _x()
    g = torch.randn(2, 5, OUT, generator=torch.Generator().manual_seed(3))
    (layer(x) * g).sum().backward()
    xf, gf = x.reshape(-1, IN), g.reshape(-1, OUT)
    for i, p in enumerate(pairs):
        s = config.scale(i)
        torch.testing.assert_close(p.lora_B.grad, s * gf.T @ (xf @ p.lora_A.T).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.lora_A.grad, s * (gf @ p.lora_B).T.detach() @ xf, rtol=1e-5, atol=1e-5)


def test_merged_forward_equals_adapter_forward_fp32_and_unmerge_restores_bit_for_bit():
    layer, _, _ = _layer()
    x = _x()
    original = layer.base_layer.weight.detach().clone()
    y_adapter = layer(x)
    layer.merge(keep_original=True)
    assert layer.merged
    y_merged = layer(x)
    torch.testing.assert_close(y_merged, y_adapter, rtol=1e-5, atol=1e-5)
    layer.merge()  # a second merge is a no-op, not a double update
    torch.testing.assert_close(layer(x), y_adapter, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, original)
    assert torch.equal(layer(x), y_adapter)


def test_unmerge_without_original_restores_approximately():
    layer, _, _ = _layer()
    original = layer.base_layer.weight.detach().clone()
    layer.merge(keep_original=False)
    assert not torch.equal(layer.base_layer.weight, original)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-5)


def test_merged_forward_equals_adapter_forward_bf16_within_bf16_tolerance():
    layer, _, _ = _layer(dtype=torch.bfloat16)
    x = _x(torch.bfloat16)
    original = layer.base_layer.weight.detach().clone()
    y_adapter = layer(x).float()
    layer.merge(keep_original=True)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x).float(), y_adapter, rtol=5e-2, atol=5e-2)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_merge_refuses_a_base_without_a_floating_point_weight():
    class Packed(nn.Module):
        in_features, out_features = IN, OUT

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(OUT * IN // 2, 1, dtype=torch.uint8), requires_grad=False)

    layer = MSPLoRALinear(Packed(), _pairs(), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(TypeError, match="cannot merge into a Packed base layer"):
        layer.merge()
    assert not layer.merged


def test_base_features_needs_in_and_out_features():
    assert base_features(nn.Linear(3, 5)) == (3, 5)
    with pytest.raises(TypeError, match="Conv1d has no in_features"):
        base_features(nn.Conv1d(3, 5, 1))


def test_disabled_adapter_returns_the_base_output():
    layer, _, _ = _layer()
    x = _x()
    layer.adapter_enabled = False
    assert torch.equal(layer(x), layer.base_layer(x))


def test_pairs_are_not_registered_submodules_of_the_linear():
    layer, pairs, _ = _layer()
    assert [n for n, _ in layer.named_parameters()] == ["base_layer.weight", "base_layer.bias"]
    assert all(a is b for a, b in zip(layer.pairs, pairs, strict=True))
    assert "global: r=4" in repr(layer) and "layer: r=2" in repr(layer)
