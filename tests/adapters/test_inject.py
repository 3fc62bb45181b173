"""apply_msplora on tiny Llama / Mistral / Qwen2 models: sharing, gradients, ownership, merge, validation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from msplora_dist import (
    ConfigError,
    LoRAPair,
    MSPLoRAConfig,
    MSPLoRAHierarchy,
    MSPLoRALinear,
    adapter_params,
    apply_msplora,
    count_params,
    get_hierarchy,
    merge_adapter,
    merge_and_unload,
    param_report,
    unmerge_adapter,
)
from msplora_dist.adapters.config import ALL_LINEAR_TARGETS


def _config(**kw) -> MSPLoRAConfig:
    values = dict(ranks=(4, 3, 2), alphas=(8, 6, 4), num_mid_groups=2, target_modules=("q_proj", "v_proj"), dropout=0.0,
                  init_lora_weights=False)
    values.update(kw)
    return MSPLoRAConfig(**values)


def _linears(model) -> dict[tuple[int, str], MSPLoRALinear]:
    return {(m.layer_index, m.target): m for m in model.modules() if isinstance(m, MSPLoRALinear)}


def _loss(model, input_ids):
    logits = model(input_ids=input_ids).logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    return (logits * g).sum()


# ---------------------------------------------------------------- injection


def test_apply_wraps_every_target_of_every_layer_on_each_architecture(arch, make_model, input_ids):
    model = make_model(arch, num_layers=3)
    base_logits = model(input_ids=input_ids).logits
    apply_msplora(model, _config(init_lora_weights=True, target_modules=ALL_LINEAR_TARGETS))
    linears = _linears(model)
    assert sorted(linears) == sorted((layer, t) for layer in range(3) for t in ALL_LINEAR_TARGETS)
    h = get_hierarchy(model)
    assert isinstance(h, MSPLoRAHierarchy) and h.num_layers == 3 and h.config.groups == ((0, 2), (2, 3))
    # grouped-query attention: k/v are narrower than q, and every type gets its own shapes
    assert h.features["q_proj"] == (32, 32) and h.features["k_proj"] == (32, 16) and h.features["v_proj"] == (32, 16)
    assert h.features["down_proj"] == (48, 32)
    assert h.model_signature["model_type"] == arch and h.model_signature["hidden_size"] == 32
    # B starts at zero: the adapted model starts exactly at the base model
    assert torch.equal(model(input_ids=input_ids).logits, base_logits)


def test_only_adapter_tensors_are_trainable(tiny_llama):
    model = apply_msplora(tiny_llama, _config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"msplora.{k}" for k in adapter_params(model)}
    assert all(k.startswith(("global.", "mid.", "layer.")) for k in adapter_params(model))


def test_each_shared_tensor_has_one_owner_in_parameters_and_state_dict(make_model):
    model = apply_msplora(make_model(num_layers=5), _config(ranks=(4, 3, 2), num_mid_groups=2))
    h = get_hierarchy(model)
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params), "parameters() yields a tensor twice"
    adapter_ids = {id(p) for p in h.parameters()}
    assert sum(id(p) in adapter_ids for p in params) == len(adapter_ids) == (1 + 2 + 5) * 2 * 2
    state_keys = [k for k in model.state_dict() if "lora_" in k]
    assert sorted(state_keys) == sorted(f"msplora.{k}" for k, _ in h.named_parameters())
    assert "msplora.global.q_proj.lora_A" in state_keys and "msplora.mid.1.v_proj.lora_B" in state_keys
    assert "msplora.layer.4.q_proj.lora_A" in state_keys
    # every wrapped projection references the hierarchy's own tensors, not copies
    for (layer, t), m in _linears(model).items():
        g = 0 if layer < 3 else 1
        owners = (getattr(h, "global")[t], h.mid[g][t], h.layer[layer][t])
        assert all(a is b for a, b in zip(m.pairs, owners, strict=True))
        for mine, owner in zip(m.pairs, owners, strict=True):
            assert mine.lora_A.data_ptr() == owner.lora_A.data_ptr() and mine.lora_B.data_ptr() == owner.lora_B.data_ptr()


def test_deepcopy_keeps_the_sharing_inside_the_copy(tiny_llama):
    model = apply_msplora(tiny_llama, _config())
    clone = copy.deepcopy(model)
    h = get_hierarchy(clone)
    for (layer, t), m in _linears(clone).items():
        assert m.pairs[0] is getattr(h, "global")[t] and m.pairs[2] is h.layer[layer][t]
    assert getattr(h, "global")["q_proj"].lora_A.data_ptr() != getattr(get_hierarchy(model), "global")["q_proj"].lora_A.data_ptr()


def _outputs(model, x, target):
    return {layer: m(x).detach() for (layer, t), m in _linears(model).items() if t == target}


@pytest.mark.parametrize("num_layers, num_groups", [(5, 2), (7, 3)])
def test_perturbing_global_B_changes_every_layers_projection_and_no_other_type(make_model, num_layers, num_groups):
    model = apply_msplora(make_model(num_layers=num_layers), _config(num_mid_groups=num_groups))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    before_q, before_v = _outputs(model, x, "q_proj"), _outputs(model, x, "v_proj")
    with torch.no_grad():
        getattr(get_hierarchy(model), "global")["q_proj"].lora_B.add_(0.5)
    after_q, after_v = _outputs(model, x, "q_proj"), _outputs(model, x, "v_proj")
    assert sorted(before_q) == list(range(num_layers))
    assert all(not torch.allclose(before_q[layer], after_q[layer]) for layer in range(num_layers))
    assert all(torch.equal(before_v[layer], after_v[layer]) for layer in range(num_layers))


@pytest.mark.parametrize("num_layers, num_groups, expected", [(5, 2, ((0, 3), (3, 5))), (7, 3, ((0, 3), (3, 5), (5, 7)))])
def test_perturbing_a_mid_group_B_changes_exactly_the_layers_of_that_group(make_model, num_layers, num_groups, expected):
    model = apply_msplora(make_model(num_layers=num_layers), _config(num_mid_groups=num_groups))
    h = get_hierarchy(model)
    assert h.config.groups == expected
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for g, (start, end) in enumerate(expected):
        before = _outputs(model, x, "v_proj")
        with torch.no_grad():
            h.mid[g]["v_proj"].lora_B.add_(0.5)
        after = _outputs(model, x, "v_proj")
        changed = [layer for layer in range(num_layers) if not torch.equal(before[layer], after[layer])]
        assert changed == list(range(start, end)), f"group {g}"


def test_perturbing_a_layer_B_changes_only_that_layer(make_model):
    model = apply_msplora(make_model(num_layers=5), _config())
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    before = _outputs(model, x, "q_proj")
    with torch.no_grad():
        get_hierarchy(model).layer[3]["q_proj"].lora_B.add_(0.5)
    after = _outputs(model, x, "q_proj")
    assert [layer for layer in range(5) if not torch.equal(before[layer], after[layer])] == [3]


def test_every_level_acts_in_the_full_model_forward(make_model, input_ids):
    """In a real forward pass, a group's adapter first shows up at its first layer's projection."""
    model = apply_msplora(make_model(num_layers=7), _config(num_mid_groups=3))
    h = get_hierarchy(model)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, key=key: seen.__setitem__(key, out.detach().clone()))
             for key, m in _linears(model).items()]
    model(input_ids=input_ids)
    before = dict(seen)
    with torch.no_grad():
        h.mid[2]["q_proj"].lora_B.add_(0.5)  # group 2 is layers 5 and 6
    model(input_ids=input_ids)
    for hook in hooks:
        hook.remove()
    changed = sorted(k for k in before if not torch.equal(before[k], seen[k]))
    assert changed[0] == (5, "q_proj") and all(layer >= 5 for layer, _ in changed)


def test_shared_gradient_equals_sum_of_gradients_of_untied_per_layer_copies(make_model, input_ids, randomize_adapters):
    model = apply_msplora(make_model(num_layers=5), _config(num_mid_groups=2, target_modules=("q_proj", "k_proj", "down_proj")))
    randomize_adapters(model)
    untied = copy.deepcopy(model)

    _loss(model, input_ids).backward()
    shared_grads = {k: p.grad.clone() for k, p in adapter_params(model).items()}
    assert all(torch.count_nonzero(g) > 0 for g in shared_grads.values())

    # Reference: each projection gets its own leaf copies of the pairs it uses.
    h = get_hierarchy(untied)
    owner_name = {id(pair): name for name, pair in h.named_pairs()}
    copies: dict[str, list[LoRAPair]] = {}
    for m in _linears(untied).values():
        own = tuple(copy.deepcopy(p) for p in m.pairs)
        for original, leaf in zip(m.pairs, own, strict=True):
            copies.setdefault(owner_name[id(original)], []).append(leaf)
        object.__setattr__(m, "_pairs", own)
    _loss(untied, input_ids).backward()
    assert all(p.grad is None for p in h.parameters()), "the untied model must not reach the shared tensors"

    groups = h.config.groups
    for name, leaves in copies.items():
        level, index = name.split(".")[:2]
        if level == "global":
            users = 5
        elif level == "mid":
            users = groups[int(index)][1] - groups[int(index)][0]
        else:
            users = 1
        assert len(leaves) == users, name
        for part in ("lora_A", "lora_B"):
            summed = torch.stack([getattr(leaf, part).grad for leaf in leaves]).sum(0)
            torch.testing.assert_close(shared_grads[f"{name}.{part}"], summed, rtol=1e-5, atol=1e-5)


def test_base_model_gets_no_gradient(tiny_llama, input_ids, randomize_adapters):
    model = apply_msplora(tiny_llama, _config())
    randomize_adapters(model)
    _loss(model, input_ids).backward()
    adapter_ids = {id(p) for p in adapter_params(model).values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in adapter_ids)


# ---------------------------------------------------------------- merge


def test_merged_model_equals_adapter_model_and_unmerge_restores_bits(tiny_llama, input_ids, randomize_adapters):
    model = apply_msplora(tiny_llama, _config(target_modules=ALL_LINEAR_TARGETS))
    randomize_adapters(model, std=0.05)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y_adapter = model(input_ids=input_ids).logits
        merge_adapter(model, keep_original=True)
        y_merged = model(input_ids=input_ids).logits
    torch.testing.assert_close(y_merged, y_adapter, rtol=1e-4, atol=1e-4)
    assert all(m.merged for m in _linears(model).values())
    unmerge_adapter(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    assert torch.equal(model(input_ids=input_ids).logits, y_adapter)


def test_unmerge_without_kept_original_restores_approximately(tiny_llama, randomize_adapters):
    model = apply_msplora(tiny_llama, _config())
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapter(model, keep_original=False)
    assert not torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"],
                           before["model.layers.0.self_attn.q_proj.base_layer.weight"])
    unmerge_adapter(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-5)


def test_merged_bf16_model_equals_adapter_model_within_bf16_tolerance(make_model, input_ids, randomize_adapters):
    model = apply_msplora(make_model(dtype=torch.bfloat16), _config())
    randomize_adapters(model, std=0.05)
    original = model.model.layers[1].self_attn.v_proj.base_layer.weight.clone()
    with torch.no_grad():
        y_adapter = model(input_ids=input_ids).logits.float()
        merge_adapter(model)
        y_merged = model(input_ids=input_ids).logits.float()
    assert y_adapter.abs().max() > 1
    torch.testing.assert_close(y_merged, y_adapter, rtol=0.05, atol=0.15)
    unmerge_adapter(model)
    assert torch.equal(model.model.layers[1].self_attn.v_proj.base_layer.weight, original)


def test_merge_and_unload_returns_a_plain_model_with_the_same_outputs(make_model, tiny_llama, input_ids, randomize_adapters):
    plain_keys = set(tiny_llama.state_dict())
    model = apply_msplora(tiny_llama, _config(target_modules=ALL_LINEAR_TARGETS))
    randomize_adapters(model, std=0.05)
    with torch.no_grad():
        y_adapter = model(input_ids=input_ids).logits
    merged = merge_and_unload(model)
    assert not any(isinstance(m, (MSPLoRALinear, MSPLoRAHierarchy, LoRAPair)) for m in merged.modules())
    assert get_hierarchy(merged, required=False) is None
    assert set(merged.state_dict()) == plain_keys
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, y_adapter, rtol=1e-4, atol=1e-4)
    # the merged weights really differ from the base
    base = make_model()
    assert not torch.equal(merged.model.layers[2].mlp.down_proj.weight, base.model.layers[2].mlp.down_proj.weight)


# ---------------------------------------------------------------- validation


def test_unknown_target_raises_config_error_listing_the_available_linears(tiny_llama):
    available = r"\['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"
    with pytest.raises(ConfigError, match=r"'qq_proj' matches nothing.*" + available):
        apply_msplora(tiny_llama, _config(target_modules=("q_proj", "qq_proj")))
    assert get_hierarchy(tiny_llama, required=False) is None
    assert not any(isinstance(m, MSPLoRALinear) for m in tiny_llama.modules()), "a failed apply must not half-wrap the model"


def test_model_without_decoder_layers_raises_config_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="no decoder layers found in Sequential"):
        apply_msplora(model, _config())


def test_more_groups_than_layers_raises_config_error_naming_both(make_model):
    with pytest.raises(ConfigError, match="num_mid_groups=4: the model has 3 decoder layers"):
        apply_msplora(make_model(num_layers=3), _config(num_mid_groups=4))


def test_applying_twice_raises_config_error(tiny_llama):
    apply_msplora(tiny_llama, _config())
    with pytest.raises(ConfigError, match="already has an MSPLoRA hierarchy"):
        apply_msplora(tiny_llama, _config())


def test_target_that_is_not_a_linear_raises_config_error(tiny_llama):
    with pytest.raises(ConfigError, match="'act_fn' is a SiLU"):
        apply_msplora(tiny_llama, _config(target_modules=("q_proj", "act_fn")))


def test_hierarchy_cannot_be_called_and_model_without_adapters_is_reported(tiny_llama):
    with pytest.raises(ConfigError, match="has no MSPLoRA adapters"):
        get_hierarchy(tiny_llama)
    with pytest.raises(ConfigError, match="has no MSPLoRA adapters"):
        adapter_params(tiny_llama)
    apply_msplora(tiny_llama, _config())
    with pytest.raises(RuntimeError, match="call the model"):
        get_hierarchy(tiny_llama)()


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize("ranks, num_groups", [((4, 3, 2), 2), ((0, 0, 4), 3), ((8, 0, 0), 1), ((0, 2, 0), 5)])
def test_param_report_equals_formula_and_the_real_tensor_count(make_model, ranks, num_groups):
    model = apply_msplora(make_model(num_layers=5), _config(ranks=ranks, num_mid_groups=num_groups, target_modules=ALL_LINEAR_TARGETS))
    report = param_report(model)
    features = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
                "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    r_g, r_m, r_l = ranks
    expected = sum((i + o) * (r_g + num_groups * r_m + 5 * r_l) for i, o in features.values())
    assert report.total == expected == sum(p.numel() for p in adapter_params(model).values())
    assert report == count_params(_config(ranks=ranks, num_mid_groups=num_groups, target_modules=ALL_LINEAR_TARGETS), 5, features)
    level_keys = {k.split(".")[0] for k in adapter_params(model)}
    assert level_keys == {lv for lv, r in zip(("global", "mid", "layer"), ranks, strict=True) if r}


def test_model_adapter_math_follows_activation_dtype_bf16(make_model, input_ids, randomize_adapters):
    model = apply_msplora(make_model(dtype=torch.bfloat16), _config())
    randomize_adapters(model)
    assert all(p.dtype == torch.float32 for p in adapter_params(model).values())
    seen = []
    m = model.model.layers[0].self_attn.q_proj
    handle = m.register_forward_hook(lambda mod, args, out: seen.append(mod.adapter_output(args[0]).dtype))
    logits = model(input_ids=input_ids).logits
    handle.remove()
    assert seen == [torch.bfloat16] and logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_params(model).values())


def test_dropout_train_mode_differs_from_eval_and_eval_is_deterministic(tiny_llama, input_ids, randomize_adapters):
    model = apply_msplora(tiny_llama, _config(dropout=(0.2, 0.0, 0.4)))
    randomize_adapters(model)
    with torch.no_grad():
        y1 = model(input_ids=input_ids).logits
        torch.manual_seed(0)
        y2 = model(input_ids=input_ids).logits
        model.train()
        torch.manual_seed(0)
        t1 = model(input_ids=input_ids).logits
        torch.manual_seed(1)
        t2 = model(input_ids=input_ids).logits
    assert torch.equal(y1, y2)
    assert not torch.allclose(t1, y1) and not torch.allclose(t1, t2)
    m = model.model.layers[0].self_attn.q_proj
    assert m.dropout == (0.2, 0.0, 0.4)


@pytest.mark.parametrize("training", [False, True])
def test_apply_keeps_the_models_train_or_eval_mode(tiny_llama, training):
    tiny_llama.train(training)
    model = apply_msplora(tiny_llama, _config(dropout=0.3))
    assert all(m.training == training for m in model.modules())
