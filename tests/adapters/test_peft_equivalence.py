"""MSPLoRA against PEFT's LoRA (an independent implementation), with the same weights copied in, fp32.

- ranks (0, 0, r) is exactly a per-layer LoRA of rank r: outputs and every gradient match;
- ranks (0, r, 0) with G = L likewise (each mid group is one layer);
- the full three-level hierarchy equals a PEFT LoRA of rank r_G + r_M + r_L built with the export formula of
  MSPLORA.md, and each shared gradient equals the sum of PEFT's per-layer (untied) gradients.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from msplora_dist import MSPLoRAConfig, MSPLoRALinear, adapter_params, apply_msplora, get_hierarchy
from msplora_dist.adapters.config import ALL_LINEAR_TARGETS

TOL = dict(rtol=1e-5, atol=1e-5)


def _peft_layers(peft_model) -> dict[tuple[int, str], LoraLayer]:
    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
            found[(layer, name.split(".")[-1])] = module
    return found


def _ours(model) -> dict[tuple[int, str], MSPLoRALinear]:
    return {(m.layer_index, m.target): m for m in model.modules() if isinstance(m, MSPLoRALinear)}


def _loss(model, input_ids):
    logits = model(input_ids=input_ids).logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
    return (logits * g).sum(), logits.detach()


def _pair_models(base, config: MSPLoRAConfig, lora: LoraConfig, randomize):
    ours = apply_msplora(copy.deepcopy(base), config)
    randomize(ours, std=0.1)
    theirs = get_peft_model(copy.deepcopy(base), lora)
    theirs.eval()
    assert sorted(_ours(ours)) == sorted(_peft_layers(theirs))
    return ours, theirs


def _check_per_layer_equivalence(ours, theirs, level: int, input_ids):
    """Copy our level-`level` pairs into PEFT, then compare logits and every adapter gradient."""
    peft_layers = _peft_layers(theirs)
    with torch.no_grad():
        for key, m in _ours(ours).items():
            (pair,) = [p for lv, p in zip(m.levels, m.pairs, strict=True) if lv == level]
            peft_layers[key].lora_A["default"].weight.copy_(pair.lora_A)
            peft_layers[key].lora_B["default"].weight.copy_(pair.lora_B)
    loss_ours, logits_ours = _loss(ours, input_ids)
    loss_theirs, logits_theirs = _loss(theirs, input_ids)
    torch.testing.assert_close(logits_ours, logits_theirs, **TOL)
    loss_ours.backward()
    loss_theirs.backward()
    for key, m in _ours(ours).items():
        pair = m.pairs[m.levels.index(level)]
        torch.testing.assert_close(pair.lora_A.grad, peft_layers[key].lora_A["default"].weight.grad, **TOL)
        torch.testing.assert_close(pair.lora_B.grad, peft_layers[key].lora_B["default"].weight.grad, **TOL)
        assert torch.count_nonzero(pair.lora_A.grad) > 0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_level_only_equals_peft_lora_outputs_and_gradients(arch, make_model, input_ids, randomize_adapters, use_rslora):
    base = make_model(arch, num_layers=3)
    targets = ("q_proj", "v_proj")
    config = MSPLoRAConfig(ranks=(0, 0, 4), alphas=(1, 1, 8), num_mid_groups=2, target_modules=targets, dropout=0.0,
                           use_rslora=use_rslora)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0, use_rslora=use_rslora)
    ours, theirs = _pair_models(base, config, lora, randomize_adapters)
    _check_per_layer_equivalence(ours, theirs, level=2, input_ids=input_ids)


def test_layer_level_only_equals_peft_lora_on_all_seven_targets_with_gqa(make_model, input_ids, randomize_adapters):
    base = make_model("llama", num_layers=3)
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    config = MSPLoRAConfig(ranks=(0, 0, 6), alphas=(1, 1, 12), num_mid_groups=1, target_modules=ALL_LINEAR_TARGETS, dropout=0.0)
    lora = LoraConfig(r=6, lora_alpha=12, target_modules=list(ALL_LINEAR_TARGETS), lora_dropout=0.0)
    ours, theirs = _pair_models(base, config, lora, randomize_adapters)
    assert len(_ours(ours)) == 3 * 7
    _check_per_layer_equivalence(ours, theirs, level=2, input_ids=input_ids)


def test_mid_level_with_one_layer_per_group_equals_peft_lora(make_model, input_ids, randomize_adapters):
    base = make_model("llama", num_layers=3)
    config = MSPLoRAConfig(ranks=(0, 4, 0), alphas=(1, 4, 1), num_mid_groups=3, target_modules=("k_proj", "down_proj"), dropout=0.0)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["k_proj", "down_proj"], lora_dropout=0.0)
    ours, theirs = _pair_models(base, config, lora, randomize_adapters)
    _check_per_layer_equivalence(ours, theirs, level=1, input_ids=input_ids)


def test_three_levels_equal_the_exported_concatenated_peft_lora_and_shared_grads_are_sums(make_model, input_ids, randomize_adapters):
    """A = [A_G; A_M; A_L], B = [s_G B_G, s_M B_M, s_L B_L], lora_alpha = r: PEFT's scale is 1."""
    num_layers, ranks, targets = 5, (4, 3, 2), ("q_proj", "v_proj", "up_proj")
    base = make_model("llama", num_layers=num_layers)
    config = MSPLoRAConfig(ranks=ranks, alphas=(8, 3, 4), num_mid_groups=2, target_modules=targets, dropout=0.0)
    r = sum(ranks)
    lora = LoraConfig(r=r, lora_alpha=r, target_modules=list(targets), lora_dropout=0.0)
    ours, theirs = _pair_models(base, config, lora, randomize_adapters)
    scales = [config.scale(i) for i in range(3)]
    peft_layers = _peft_layers(theirs)
    with torch.no_grad():
        for key, m in _ours(ours).items():
            peft_layers[key].lora_A["default"].weight.copy_(torch.cat([p.lora_A for p in m.pairs], dim=0))
            peft_layers[key].lora_B["default"].weight.copy_(torch.cat([s * p.lora_B for s, p in zip(scales, m.pairs, strict=True)], dim=1))
    loss_ours, logits_ours = _loss(ours, input_ids)
    loss_theirs, logits_theirs = _loss(theirs, input_ids)
    torch.testing.assert_close(logits_ours, logits_theirs, **TOL)
    loss_ours.backward()
    loss_theirs.backward()

    # Shared gradient = sum over the layers that use the pair of PEFT's independent per-layer gradients.
    h = get_hierarchy(ours)
    bounds = [0, *ranks[:1], sum(ranks[:2]), r]
    expected: dict[str, torch.Tensor] = {}
    for layer, t in _ours(ours):
        g_a = peft_layers[(layer, t)].lora_A["default"].weight.grad
        g_b = peft_layers[(layer, t)].lora_B["default"].weight.grad
        group = next(i for i, (s, e) in enumerate(h.config.groups) if s <= layer < e)
        for level, name in enumerate((f"global.{t}", f"mid.{group}.{t}", f"layer.{layer}.{t}")):
            lo, hi = bounds[level], bounds[level + 1]
            expected[f"{name}.lora_A"] = expected.get(f"{name}.lora_A", 0) + g_a[lo:hi]
            expected[f"{name}.lora_B"] = expected.get(f"{name}.lora_B", 0) + scales[level] * g_b[:, lo:hi]
    params = adapter_params(ours)
    assert sorted(expected) == sorted(params)
    for key, p in params.items():
        torch.testing.assert_close(p.grad, expected[key], **TOL)
