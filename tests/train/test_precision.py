"""With --dtype bf16 the backbone runs in bf16 but the adapters train, accumulate their gradients and are saved in
fp32 on every path (ZeRO-2, ZeRO-3 with a 4-bit backbone); under ZeRO-3 exactly the adapter tensors are
persistent. In process, one rank (DeepSpeed runs bf16 on a CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from msplora_dist.adapters.inject import adapter_params
from msplora_dist.dist import zero
from msplora_dist.train.config import TrainConfig
from msplora_dist.train.trainer import Trainer


def bf16_trainer(tmp_path, ds_config: str, **overrides) -> Trainer:
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), ds_config=f"ds_configs/{ds_config}.json", dtype="bf16", max_steps=2,
                      micro_batch_size=2, eval_steps=0, eval_fraction=0.0, analyze=False, max_seq_len=48, dropout=(0.0,) * 3,
                      **overrides)
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer


@pytest.mark.parametrize("ds_config,four_bit", [("zero2", False), ("zero3", True)], ids=["zero2", "zero3-4bit"])
def test_adapters_train_and_are_saved_in_fp32_under_bf16(tmp_path, ds_config, four_bit):
    # keep: a ZeRO-3 config at stage 3 on this one rank (by default it would run stage 2).
    trainer = bf16_trainer(tmp_path, ds_config, load_in_4bit=four_bit, single_rank_zero3="keep")
    try:
        model = trainer.engine.module
        backbone = [p for p in model.parameters() if not p.requires_grad]
        assert {p.dtype for p in backbone} == {torch.bfloat16}  # the backbone really is bf16 ...
        params = adapter_params(model)
        assert {p.dtype for p in params.values()} == {torch.float32}  # ... and the adapters are not
        trainer.train()
        trainer.finish()
        saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
        assert {t.dtype for t in saved.values()} == {torch.float32}
        with zero.gathered(list(params.values())):  # the file holds the fp32 tensors the optimizer updated, bit for bit
            assert saved.keys() == params.keys() and all(torch.equal(saved[k], params[k].detach()) for k in saved)
        assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # it trained
        if ds_config == "zero3":
            # Exactly the adapters are persistent; no backbone tensor is (the threshold is 0 unless set).
            assert all(p.ds_persist for p in params.values())
            assert not any(getattr(p, "ds_persist", False) for p in backbone)
            # The check after deepspeed.initialize is a real one: it fails for a partitioned adapter ...
            first = next(iter(params.values()))
            first.ds_persist = False
            with pytest.raises(RuntimeError, match="partitioned 1 adapter tensor"):
                zero.check_adapters_replicated(model, trainer.plan.ds_config)
            first.ds_persist = True
            # ... and for a backbone tensor forced persistent above the config's threshold.
            backbone[0].ds_persist = True
            with pytest.raises(RuntimeError, match="replicates 1 backbone tensor"):
                zero.check_adapters_replicated(model, trainer.plan.ds_config)
            backbone[0].ds_persist = False
            zero.check_adapters_replicated(model, trainer.plan.ds_config)
    finally:
        trainer.close()
