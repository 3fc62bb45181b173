"""The speed paths' CPU-checkable logic: when Liger is used, and that the loss the model computes from `labels`
(where Liger's fused linear cross-entropy runs on CUDA) is the same token-loss sum as the trainer's own; that
compiled decoder layers (--compile_layers) train exactly as eager ones, through one shared graph that the
checkpoint's recomputation runs too. The compiles use the aot_eager backend: dynamo's graph and AOT autograd's
forward/backward split, as with inductor, without inductor's C++ code generation (tens of seconds on this CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

from msplora_dist import MSPLoRAConfig, apply_msplora
from msplora_dist.adapters import layers as adapter_layers
from msplora_dist.adapters.inject import find_decoder_layers
from msplora_dist.errors import ConfigError
from msplora_dist.train.config import TrainConfig
from msplora_dist.train.data import IGNORE_INDEX
from msplora_dist.train.kernels import compile_decoder_layers, resolve_compile, resolve_liger
from msplora_dist.train.trainer import Trainer, token_loss_sum
from tests.conftest import _build_tiny, _randomize_adapters  # module-scoped: built once for two tests


def test_liger_auto_is_off_without_a_gpu_and_true_says_what_is_missing():
    assert resolve_liger("auto", "llama", on_gpu=False) is False
    assert resolve_liger("false", "llama", on_gpu=True) is False
    with pytest.raises(ConfigError, match="--liger true needs a CUDA GPU"):
        resolve_liger("true", "llama", on_gpu=False)
    with pytest.raises(ConfigError, match=r"a model family it patches .* this model is 'gpt2'"):
        resolve_liger("true", "gpt2", on_gpu=True)
    assert resolve_liger("auto", "gpt2", on_gpu=True) is False
    with pytest.raises(ConfigError, match=r"--liger 'yes': expected one of auto, true, false"):
        resolve_liger("yes", "llama", on_gpu=False)


@pytest.mark.parametrize("train_mode", [True, False])
def test_the_loss_from_labels_is_the_trainers_token_loss_sum(make_model, randomize_adapters, train_mode):
    """A packed micro-batch: two examples per row (position_ids restart), prompts and padding masked. transformers'
    loss with num_items_in_batch=1 must give the sum, with the same shift and ignore_index, in both modes."""
    model = apply_msplora(make_model("llama", num_layers=3), MSPLoRAConfig(ranks=(4, 2, 2), num_mid_groups=2, dropout=0.0))
    randomize_adapters(model)
    model.train(train_mode)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[0, 6] = IGNORE_INDEX  # the first token of the second packed example
    labels[1, 10:] = IGNORE_INDEX  # padding
    position_ids = torch.cat([torch.arange(6), torch.arange(6)]).repeat(2, 1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids, "attention_mask": torch.ones_like(ids)}
    ours = token_loss_sum(model, batch, from_labels=False)
    theirs = token_loss_sum(model, batch, from_labels=True)
    assert theirs.dtype == torch.float32
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-6)
    # A mean instead of a sum would be smaller by the number of loss tokens (16 here): the comparison has teeth.
    assert ours.item() > 5 * (ours.item() / int((labels[:, 1:] != IGNORE_INDEX).sum()))


def test_compile_auto_is_on_with_a_gpu_below_stage_3_and_zero3_needs_leaf_layers():
    assert resolve_compile("auto", on_gpu=True, zero_stage=2, zero3_leaf_layers=False) is True
    assert resolve_compile("auto", on_gpu=False, zero_stage=2, zero3_leaf_layers=True) is False
    assert resolve_compile("auto", on_gpu=True, zero_stage=3, zero3_leaf_layers=False) is False
    assert resolve_compile("auto", on_gpu=True, zero_stage=3, zero3_leaf_layers=True) is False  # not measured on GPUs
    assert resolve_compile("true", on_gpu=False, zero_stage=3, zero3_leaf_layers=True) is True
    assert resolve_compile("false", on_gpu=True, zero_stage=2, zero3_leaf_layers=True) is False
    with pytest.raises(ConfigError, match="--compile_layers true under ZeRO-3 needs --zero3_leaf_layers true"):
        resolve_compile("true", on_gpu=True, zero_stage=3, zero3_leaf_layers=False)
    with pytest.raises(ConfigError, match=r"compile_layers='on': expected one of auto, true, false"):
        TrainConfig(compile_layers="on")


class CountingBackend:
    """aot_eager, counting the graphs dynamo hands it and the calls of the compiled code, and noting any activation
    checkpoint traced into a graph."""

    def __init__(self):
        self.graphs = self.calls = 0
        self.checkpoints_inside = False

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.checkpoints_inside |= any("checkpoint" in str(node.target) for node in gm.graph.nodes)
        compiled = lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)
        return run


def _checkpointed_model():
    """4 layers, 2 mid groups (the global pair shared by 4 layers, each mid pair by 2), dropout on: fp32, training
    mode, non-reentrant checkpointing as the trainer sets it."""
    model = apply_msplora(_build_tiny("llama", num_layers=4), MSPLoRAConfig(ranks=(4, 2, 2), num_mid_groups=2, dropout=0.1))
    _randomize_adapters(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _step(model, width: int):
    ids = torch.randint(0, 64, (2, width), generator=torch.Generator().manual_seed(width))
    torch.manual_seed(7)  # the same dropout masks for both models
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.fixture(scope="module")
def compiled_run():
    """An eager and a compiled copy of one model and one training step of each, with rank padding on (the CUDA path,
    with its cached zero blocks and scale rows, under compile)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter_layers, "PAD_DEVICE_TYPES", {"cpu", "cuda"})
        eager, compiled = (_checkpointed_model() for _ in range(2))
        backend = CountingBackend()
        compile_decoder_layers(compiled, backend)
        return {"eager": _step(eager, 9), "compiled": _step(compiled, 9), "graphs": backend.graphs, "calls": backend.calls,
                "checkpoints_inside": backend.checkpoints_inside, "classes": {type(m).__name__ for m in find_decoder_layers(compiled)[1]}}


def test_compiled_layers_give_the_eager_loss_and_every_adapter_gradient(compiled_run):
    (loss_e, grads_e), (loss_c, grads_c) = compiled_run["eager"], compiled_run["compiled"]
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == 7 * (1 + 2 + 4) * 2  # global, 2 mid, 4 layer pairs
    for name, grad in grads_e.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_every_layer_runs_one_compiled_graph_in_forward_and_recomputation(compiled_run):
    assert compiled_run["classes"] == {"CompiledLlamaDecoderLayer"}
    # One graph for the 4 layers; each ran it twice: the forward and the checkpoint's recomputation in backward.
    assert compiled_run["graphs"] == 1 and compiled_run["calls"] == 4 * 2
    # The checkpoint is around the graph, not traced into it (which would checkpoint twice, and recompute three times).
    assert not compiled_run["checkpoints_inside"]


def test_the_trainer_trains_with_compiled_layers_under_zero2_and_a_new_length_recompiles_once(tmp_path, monkeypatch):
    # The eager backend (dynamo's graph, run by eager autograd): the cheapest compile, enough for the plumbing and the
    # recompiles; the test above and tests/train/test_distributed.py check the training itself.
    monkeypatch.setenv("MSPLORA_COMPILE_BACKEND", "eager")
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), ds_config="ds_configs/zero2.json", max_steps=3, micro_batch_size=2,
                      eval_steps=0, eval_fraction=0.0, analyze=False, max_seq_len=48, gradient_checkpointing=True,
                      compile_layers="true")
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        assert "compiled decoder layers (eager)" in trainer.speed_features
        model = trainer.engine.module
        assert {type(m).__name__ for m in find_decoder_layers(model)[1]} == {"CompiledLlamaDecoderLayer"}
        lengths = []
        model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: lengths.append(args[0].shape[1]))
        graphs_before = counters["stats"]["unique_graphs"]
        trainer.train()
        losses = [h["loss"] for h in trainer.history if "loss" in h]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
        # Three batch lengths, two graphs: the first length's, then one with the length symbolic for all others.
        assert len(set(lengths)) == 3 and counters["stats"]["unique_graphs"] - graphs_before == 2, lengths
    finally:
        trainer.close()
