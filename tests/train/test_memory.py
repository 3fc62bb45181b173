"""--activation_memory_gb: the saved-bytes counter, the probe's estimate against what a forward really saves, the
planner, and the per-layer checkpointing it sets (train/memory.py). All on the CPU, on the shipped tiny model."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from msplora_dist.adapters.inject import apply_msplora, find_decoder_layers
from msplora_dist.errors import ConfigError
from msplora_dist.train import memory
from msplora_dist.train.backbone import load_backbone
from msplora_dist.train.config import ASSETS, TrainConfig
from msplora_dist.train.memory import ActivationProfile, GiB, MemoryPlan, SavedTensorBytes, plan_checkpointing
from msplora_dist.train.trainer import token_loss_sum

# ------------------------------------------------------------------------------------------ the planner

# Measured at the Llama-2-7B shape, 4 x 2048 tokens, per the issue: 0.93 GB a layer full, 0.07 GB checkpointed.
SEVEN_B = ActivationProfile(n_layers=32, full=int(0.93 * GiB), checkpointed=int(0.07 * GiB), shared=4 * 2**20,
                            fixed=int(1.5 * GiB))


def plan(profile, budget):
    return plan_checkpointing(profile, budget, setting="X", shape=(4, 2048))


def test_a_budget_that_fits_everything_checkpoints_no_layer():
    assert plan(SEVEN_B, SEVEN_B.peak(0)) == 0
    assert plan(SEVEN_B, 10**15) == 0


def test_a_budget_below_every_layer_checkpointed_is_a_one_line_error_naming_it_and_the_minimum():
    minimum = SEVEN_B.peak(32)
    with pytest.raises(ConfigError) as err:
        plan_checkpointing(SEVEN_B, minimum - 1, setting="2", shape=(4, 2048))
    assert str(err.value) == (f"activation_memory_gb=2: the activations need at least {minimum / GiB:.2f} GB with every "
                              "layer checkpointed at micro_batch_size 4 x max_seq_len 2048; raise it or lower those")


def test_the_planner_checkpoints_the_fewest_layers_that_fit_exactly():
    for k in (1, 12, 31, 32):
        assert plan(SEVEN_B, SEVEN_B.peak(k)) == k  # exactly the estimate fits
        assert plan(SEVEN_B, SEVEN_B.peak(k) + 1) == k
    for k in (0, 12, 31):
        assert plan(SEVEN_B, SEVEN_B.peak(k) - 1) == k + 1  # a byte less needs one layer more


def test_the_peak_is_the_forward_end_until_every_layer_is_checkpointed_then_the_recomputation_counts():
    p = ActivationProfile(n_layers=4, full=100, checkpointed=10, shared=1, fixed=30)
    assert [p.saved(k) for k in range(5)] == [431, 341, 251, 161, 70]
    # With the first k checkpointed, the backward recomputes them after the loss and the other layers freed theirs.
    assert [p.peak(k) for k in range(5)] == [431, 341, 251, 161, 141]  # 4 inputs + 1 layer again + shared


def test_the_log_line_says_budget_layers_and_estimate():
    k = plan(SEVEN_B, 24 * GiB)
    line = MemoryPlan("24", 24 * GiB, SEVEN_B, k).describe()
    assert re.fullmatch(r"memory budget: 24\.00 GB of activations -> \d+ of 32 layers checkpointed \(est\. \d+\.\d\d GB; "
                        r"per layer 0\.93 GB full / 71\.7 MB checkpointed\)", line), line
    assert 0 < k < 32 and SEVEN_B.peak(k) <= 24 * GiB < SEVEN_B.peak(k - 1)


def test_auto_keeps_a_margin_of_ten_percent_and_four_gigabytes():
    assert memory.auto_budget(100 * GiB) == 86 * GiB
    assert memory.auto_budget(GiB) == 0


# ------------------------------------------------------------------------------------------ the counter

def test_the_counter_counts_a_linear_input_and_leaves_its_weight_out():
    x = torch.randn(8, 64)
    trained = nn.Linear(64, 32, bias=False)  # the weight's gradient needs the input: 8 x 64 fp32 saved
    with SavedTensorBytes(trained.parameters()) as counter:
        trained(x)
    assert counter.total == 8 * 64 * 4
    # The input's gradient needs only the weight, saved as a view (weight.t()). A matmul rather than the module: a
    # ZeRO-3 engine built earlier in this process may have left F.linear replaced by DeepSpeed's, which saves both.
    frozen = nn.Linear(64, 32, bias=False).requires_grad_(False)
    with SavedTensorBytes(frozen.parameters()) as counter:
        x.requires_grad_() @ frozen.weight.t()
    assert counter.total == 0
    with SavedTensorBytes() as counter:  # not told it is a weight: counted
        x @ frozen.weight.t()
    assert counter.total == 32 * 64 * 4


def test_the_counter_counts_a_storage_once_however_many_ops_save_it():
    w1, w2 = torch.randn(100, requires_grad=True), torch.randn(100, requires_grad=True)
    x = torch.randn(100)
    with SavedTensorBytes([w1, w2]) as counter:
        (x * w1).sum(), (x[:50] * w2[:50]).sum()  # x and a view of it: one storage
    assert counter.total == 100 * 4


# ------------------------------------------------------------------------------------------ the tiny model

@pytest.fixture(scope="module")
def tiny():
    model = load_backbone(ASSETS / "tiny_llama", dtype="fp32", load_in_4bit=False, ds_config=None, gradient_checkpointing=True)
    model = apply_msplora(model, TrainConfig().adapter_config().with_groups(4))  # dropout 0.05: its masks are saved too
    return model.train()


def loss_fn(model):
    return lambda batch: token_loss_sum(model, batch)


@pytest.mark.parametrize("packing", [False, True])
def test_the_probe_predicts_what_a_forward_saves_for_every_number_of_checkpointed_layers(tiny, packing):
    batch = memory.synthetic_batch(2, 64, tiny.config.vocab_size, packing=packing)
    profile = memory.probe(tiny, loss_fn(tiny), batch)
    assert profile.n_layers == 4 and profile.full > 10 * profile.checkpointed > 0 and profile.fixed > 0
    # The checkpoint keeps a layer's input: 2 x 64 tokens x 64 hidden, fp32.
    assert profile.checkpointed == 2 * 64 * 64 * 4
    for k in range(5):
        memory.set_checkpointed_layers(tiny, k)
        with SavedTensorBytes(memory.model_tensors(tiny)) as counter:
            loss_fn(tiny)(batch)
        assert counter.total == profile.saved(k), k


def test_only_the_first_k_layers_are_recomputed_in_the_backward(tiny):
    _, layers = find_decoder_layers(tiny)
    calls = [0] * len(layers)
    # The MLP is called through its module in the forward and again in a recomputation (the layer's own forward
    # hooks do not see a recomputation in transformers 5.24, which checkpoints the layer's forward).
    handles = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    try:
        memory.set_checkpointed_layers(tiny, 2)
        assert memory.checkpointed_layers(tiny) == 2
        token_loss_sum(tiny, memory.synthetic_batch(1, 16, tiny.config.vocab_size, packing=False)).backward()
    finally:
        for handle in handles:
            handle.remove()
        tiny.zero_grad(set_to_none=True)
    assert calls == [2, 2, 1, 1]


def test_the_probe_restores_the_layers_flags_and_leaves_the_random_state_alone(tiny):
    memory.set_checkpointed_layers(tiny, 1)
    state = torch.get_rng_state()
    memory.probe(tiny, loss_fn(tiny), memory.synthetic_batch(1, 16, tiny.config.vocab_size, packing=False))
    assert memory.checkpointed_layers(tiny) == 1 and torch.equal(torch.get_rng_state(), state)


def test_a_layer_without_checkpointing_enabled_is_refused():
    model = load_backbone(ASSETS / "tiny_llama", dtype="fp32", load_in_4bit=False, ds_config=None, gradient_checkpointing=False)
    with pytest.raises(RuntimeError, match=r"decoder layer 0 .* no checkpointing function"):
        memory.set_checkpointed_layers(model, 1)
