"""MSPLoRA on a bitsandbytes NF4 (Linear4bit) backbone, on CPU: forward and backward run, and the adapters'
outputs and gradients match a dense backbone that holds the dequantized weights. Kept tiny: bnb is slow on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from msplora_dist import (  # noqa: E402
    MSPLoRAConfig,
    adapter_params,
    apply_msplora,
    get_hierarchy,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    param_report,
    save_adapter,
)

CONFIG = dict(ranks=(4, 2, 2), alphas=(8, 4, 4), num_mid_groups=2, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))


def _quantize(model, compute_dtype: torch.dtype):
    """(4-bit model, dense twin): every nn.Linear of the decoder layers becomes an NF4 Linear4bit, quantized on CPU;
    the twin holds bnb.functional.dequantize_4bit of the same packed weights in plain nn.Linear layers."""
    dense = copy.deepcopy(model)
    for layer, dense_layer in zip(model.model.layers, dense.model.layers, strict=True):
        for name, lin in list(layer.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            q = q.to("cpu")  # quantizes
            assert q.weight.dtype == torch.uint8 and q.weight.quant_state is not None
            parent_name, _, child = name.rpartition(".")
            layer.get_submodule(parent_name).__setattr__(child, q)
            deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
            dense_layer.get_submodule(name).weight.data.copy_(deq.to(torch.float32))
    return model.eval(), dense.eval()


# bnb's CPU inference path (eval mode, no grad) repacks the weights in blocks of 64 input features.
WIDE = dict(num_layers=3, hidden_size=64, intermediate_size=128)


def _pair(make_model, randomize_adapters, compute_dtype):
    q_model, dense = _quantize(make_model(**WIDE), compute_dtype)
    apply_msplora(q_model, MSPLoRAConfig(**CONFIG))
    apply_msplora(dense, MSPLoRAConfig(**CONFIG))
    randomize_adapters(q_model, seed=4, std=0.1)
    randomize_adapters(dense, seed=4, std=0.1)
    return q_model, dense


def _forward_backward(model, input_ids):
    logits = model(input_ids=input_ids).logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * g).sum().backward()
    return logits.detach(), {k: p.grad.clone() for k, p in adapter_params(model).items()}


@pytest.mark.parametrize("compute_dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_4bit_base_forward_backward_match_the_dequantized_dense_base(make_model, input_ids, randomize_adapters, compute_dtype, tol):
    q_model, dense = _pair(make_model, randomize_adapters, compute_dtype)
    assert type(q_model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    q_model.train()  # dropout is 0: train mode only selects bnb's training kernels
    dense.train()
    logits_q, grads_q = _forward_backward(q_model, input_ids)
    logits_d, grads_d = _forward_backward(dense, input_ids)
    assert logits_q.dtype == torch.float32
    torch.testing.assert_close(logits_q, logits_d, rtol=tol, atol=tol * 10)
    assert sorted(grads_q) == sorted(grads_d)
    for k in grads_q:
        assert torch.count_nonzero(grads_q[k]) > 0, k
        scale = grads_d[k].abs().max()
        torch.testing.assert_close(grads_q[k] / scale, grads_d[k] / scale, rtol=tol, atol=tol * 5, msg=k)
    assert all(p.grad is None for n, p in q_model.named_parameters() if "msplora" not in n)


def test_4bit_base_inference_in_eval_mode_matches_the_dequantized_dense_base(make_model, input_ids, randomize_adapters):
    q_model, dense = _pair(make_model, randomize_adapters, torch.float32)
    with torch.no_grad():
        logits_q, logits_d = q_model(input_ids=input_ids).logits, dense(input_ids=input_ids).logits
        again = q_model(input_ids=input_ids).logits
    assert torch.equal(logits_q, again)
    torch.testing.assert_close(logits_q, logits_d, rtol=5e-2, atol=0.2)  # bnb's CPU inference kernel uses bf16 scales


def test_4bit_param_count_uses_in_out_features_not_the_packed_weight(make_model, randomize_adapters):
    q_model, _ = _pair(make_model, randomize_adapters, torch.float32)
    h = get_hierarchy(q_model)
    assert h.features == {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (128, 64)}
    assert param_report(q_model).total == sum((i + o) * (4 + 2 * 2 + 3 * 2) for i, o in h.features.values())


def test_merge_on_a_4bit_base_raises_a_clear_error_and_changes_nothing(make_model, randomize_adapters, input_ids):
    q_model, _ = _pair(make_model, randomize_adapters, torch.float32)
    with torch.no_grad():
        before = q_model(input_ids=input_ids).logits
    with pytest.raises(TypeError, match="cannot merge into a Linear4bit base layer"):
        merge_adapter(q_model)
    with pytest.raises(TypeError, match="cannot merge into a Linear4bit base layer"):
        merge_and_unload(q_model)
    assert get_hierarchy(q_model, required=False) is not None
    with torch.no_grad():
        assert torch.equal(q_model(input_ids=input_ids).logits, before)


def test_4bit_adapter_round_trip_is_bit_exact(tmp_path, make_model, randomize_adapters):
    q_model, dense = _pair(make_model, randomize_adapters, torch.float32)
    path = save_adapter(q_model, tmp_path / "a")
    fresh, _ = _quantize(make_model(**WIDE), torch.float32)
    load_adapter(fresh, path)
    loaded, original = adapter_params(fresh), adapter_params(q_model)
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    load_adapter(dense, path)  # the adapter of a 4-bit model loads onto the dense model of the same shapes
