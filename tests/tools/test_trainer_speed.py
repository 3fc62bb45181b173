"""python -m tools.trainer_speed: the trainer rows and the anchors train on the same batches of the same backbone and
are timed alike (CPU smoke on the shipped tiny model), and the table takes each ratio against the nearest anchor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from msplora_dist.errors import ConfigError
from tests.launch_utils import REPO, subprocess_env
from tools.bench.models import ALL_TARGETS
from tools.trainer_speed.anchors import build
from tools.trainer_speed.report import table_lines
from tools.trainer_speed.rows import resolve_ranks

TINY = str(REPO / "msplora_dist" / "assets" / "tiny_llama")


def test_smoke_rows_and_anchors_train_the_same_tokens_of_the_same_backbone(tmp_path):
    """One trainer row of 3 steps (ZeRO-2, 4-bit, checkpointing, the ranks of the arm matching LoRA r=16) and the PEFT
    anchor; the CUDA-only row and anchor are listed as skipped. Step 1's loss, before any adapter moved, is the base
    model's loss on the step's tokens: equal for both only if both loaded the same backbone and trained on the same
    token ids."""
    out, workdir = tmp_path / "speed.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "tools.trainer_speed", "--smoke", "--rows", "zero2,zero2-liger-mem24",
                           "--anchors", "unsloth,peft-tuned", "--out", str(out), "--workdir", str(workdir)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())}
    assert rows["zero2-liger-mem24"]["skipped"] == rows["unsloth"]["skipped"] == "needs CUDA"
    trainer, peft = rows["zero2"], rows["peft-tuned"]
    assert trainer["tokens_per_step"] == peft["tokens_per_step"] == [64, 64, 64] and len(peft["step_tokens_per_s"]) == 3
    assert trainer["trainable"] == peft["trainable"] == 73_984  # MSPLoRA's matched ranks: LoRA r=16's count
    assert trainer["losses"][0] == pytest.approx(peft["losses"][0], rel=1e-4), (trainer["losses"], peft["losses"])
    cfg = yaml.safe_load((workdir / "zero2" / "train_config.yaml").read_text())
    assert cfg["load_in_4bit"] and cfg["gradient_checkpointing"] and cfg["micro_batch_size"] == 2
    assert cfg["ranks"] == list(resolve_ranks("msp_all_eq_lora16", TINY)) and cfg["max_seq_len"] == 32
    table = proc.stdout[proc.stdout.index("row "):]
    assert "x peft-tuned" in table and "unsloth                skipped: needs CUDA" in table


def test_torch_peft_checkpoints_as_the_rows_do_and_peft_tuned_always():
    """The small-model anchor follows the run's --gradient_checkpointing; peft-tuned is the tuned QLoRA recipe."""
    spec = {"model": TINY, "model_type": "llama", "dtype": "fp32", "load_in_4bit": False, "gradient_checkpointing": False,
            "attn_implementation": None, "targets": list(ALL_TARGETS)}
    for name, expected in (("torch-peft", False), ("peft-tuned", True)):
        model, params, autocast = build(name, spec, torch.device("cpu"))
        assert model.training and not autocast and model.is_gradient_checkpointing == expected, name
        assert {p.dtype for p in params} == {torch.float32} and sum(p.numel() for p in params) == 73_984


def _row(name, tps, session="a", round_=0, **extra):
    return {"row": name, "tokens_per_s": tps, "peak_gb": 10.0, "trainable": 40, "losses": [1.0], "tokens_per_step": [8],
            "session": session, "round": round_} | extra


def test_table_takes_each_ratio_against_the_anchor_nearest_in_time_and_checks_the_budget():
    results = [_row("zero3-liger-mem24", 1200.0, budget_gb=24.0), _row("zero2-liger-mem40", 1300.0, peak_gb=41.0,
                                                                       budget_gb=40.0),
               _row("zero2-liger-mem24", 1000.0), _row("unsloth", 1000.0), _row("peft-tuned", 500.0),
               _row("zero2", 900.0, round_=1), _row("unsloth", 600.0, round_=1),
               _row("zero2", 800.0, session="b"), {"row": "peft-liger", "error": "ImportError: liger", "session": "a"}]
    lines = table_lines(results)
    assert lines[0].split()[-5:] == ["x", "unsloth", "x", "peft-tuned", "budget"]
    cells = {line.split()[0]: line.split() for line in lines[1:1 + len(results)]}
    assert cells["zero3-liger-mem24"][5:] == ["1.200", "2.400", "24", "GB:", "within"]
    assert cells["zero2-liger-mem40"][-1] == "OVER"
    round1 = [line.split() for line in lines if line.startswith("zero2 ")]
    assert round1[0][5] == "1.500"  # round 1's own Unsloth (600), not round 0's
    assert round1[1][5] == "0.800"  # session b has none: the first one measured
    assert "zero3-liger-mem24 / zero2-liger-mem24: 1.200" in lines
    # A -keep row (ZeRO-3 kept at stage 3 on one GPU) is compared with the ZeRO-2 row of the same kernels.
    kept = table_lines([*results, _row("zero3-liger-keep", 950.0), _row("zero2-liger", 1000.0)])
    assert "zero3-liger-keep / zero2-liger: 0.950" in kept
    assert cells["peft-liger"][1:] == ["failed:", "ImportError:", "liger"]
    assert not any(line.startswith("warning") for line in lines)
    assert any(line.startswith("warning: run a's rows trained different token counts")
               for line in table_lines([*results, _row("zero2", 1.0, tokens_per_step=[9])]))
    assert any(line.startswith("warning: run a's step-1 losses differ")  # loss@1 is the same-tokens, same-model check
               for line in table_lines([*results, _row("zero2", 1.0, losses=[1.01])]))


def test_ranks_are_three_integers_or_an_arm_on_all_seven_projections():
    assert resolve_ranks("48,16,13", TINY) == (48, 16, 13)
    ranks = resolve_ranks("msp_all_eq_lora16", TINY)
    assert ranks[0] + 3 * ranks[1] + 4 * ranks[2] == 16 * 4  # tiny_llama's 4 layers, 3 groups: LoRA r=16's count
    with pytest.raises(ConfigError, match=r"'msp_qv_paper'.*msp_all_eq_lora16"):
        resolve_ranks("msp_qv_paper", TINY)  # an arm on q, v only: the anchors train all seven
