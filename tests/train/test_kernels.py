"""The speed paths' CPU-checkable logic: when Liger is used, and that the loss the model computes from `labels`
(where Liger's fused linear cross-entropy runs on CUDA) is the same token-loss sum as the trainer's own."""

from __future__ import annotations

import pytest
import torch

from msplora_dist import MSPLoRAConfig, apply_msplora
from msplora_dist.errors import ConfigError
from msplora_dist.train.data import IGNORE_INDEX
from msplora_dist.train.kernels import resolve_liger
from msplora_dist.train.trainer import token_loss_sum


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
