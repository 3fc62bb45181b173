"""python -m tools.bench --cpu-smoke: every benchmark variant (PEFT QLoRA, MSPLoRA now and before, the paper setting)
builds, steps and reports on tiny shapes, and the trainer row runs the real Trainer (ZeRO-2, one process of its own),
so a GPU run does not fail on a trivial bug; plus the helpers of the scaling runs (report, comparison)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.launch_utils import REPO, subprocess_env

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("deepspeed")

BENCH = [sys.executable, "-m", "tools.bench"]
IN_PROCESS = {"base", "peft-tuned", "msplora", "msplora-prev", "msplora-bf16", "peft-standard", "paper-msplora",
              "paper-peft", "msplora-nockpt"}


def test_cpu_smoke_runs_every_variant_and_the_trainer_row(tmp_path):
    """ds-zero3 is left out for time: it differs from ds-zero2 by its config file only, and the Trainer's ZeRO-3
    path is tested in tests/train."""
    out, workdir = tmp_path / "bench.json", tmp_path / "work"
    variants = ",".join(sorted(IN_PROCESS)) + ",ds-zero2"
    proc = subprocess.run([*BENCH, "--cpu-smoke", "--variants", variants, "--workdir", str(workdir), "--out", str(out)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == IN_PROCESS | {"ds-zero2"}
    assert all("error" not in r for r in rows.values()), [r for r in rows.values() if "error" in r]
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["flops_per_token"] == (8 if r["checkpointing"] else 6) * r["base_params"]
    # Same trainable parameters for the matched MSPLoRA ranks as PEFT r=16 on all seven targets, up to a few %.
    assert rows["msplora"]["trainable"] == pytest.approx(rows["peft-tuned"]["trainable"], rel=0.05)
    assert rows["peft-tuned"]["speed_vs_peft_tuned"] == 1.0 and rows["base"]["time_over_base"] == 0.0

    # The trainer row is the Trainer's run: the configs it resolved, its step records, the adapter it built.
    ds = rows["ds-zero2"]
    assert ds["trainable"] == rows["msplora"]["trainable"] and ds["zero_stage"] == 2 and ds["dtype"] == "fp32"
    assert ds["tokens_per_step"] == 2 * 32 and len(ds["trainer_tokens_per_s"]) == len(ds["step_s_all"]) == 1
    assert all(t > 0 for t in ds["trainer_tokens_per_s"]) and all(0 < loss < 20 for loss in ds["loss"])
    run = workdir / "runs" / "smoke-ds-zero2"
    cfg = yaml.safe_load((run / "train_config.yaml").read_text())
    assert cfg["model"] == str(workdir / "models" / "smoke") and cfg["load_in_4bit"] and cfg["packing"]
    assert cfg["gradient_checkpointing"] and cfg["ranks"] == [16, 8, 6] and cfg["max_steps"] == 2
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert (workdir / "models" / "smoke" / "bench_shape.json").is_file()  # the cached model of the shape


def test_scaling_report_and_compare(tmp_path):
    """The two helpers read what launch/train.py writes (summary.json, adapter/adapter_model.safetensors)."""
    import torch
    from safetensors.torch import save_file

    runs = []
    for world, tps in ((1, [10.0, 100.0, 110.0, 90.0]), (2, [5.0, 190.0, 180.0, 200.0])):
        run = tmp_path / f"w{world}"
        (run / "adapter").mkdir(parents=True)
        history = [{"step": i + 1, "loss": 2.0 - 0.1 * i, "tokens_per_s": t, "peak_mem_gb": 3.0 / world}
                   for i, t in enumerate(tps)]
        (run / "summary.json").write_text(json.dumps({
            "world_size": world, "global_batch": 8, "steps": 4, "history": history, "replicas_identical": True,
            "final_loss": history[-1]["loss"], "backbone_partition": None, "zero_stage": 3}))
        save_file({"global.q_proj.lora_A": torch.ones(2, 3), "global.q_proj.lora_B": torch.full((3, 2), float(world))},
                  run / "adapter" / "adapter_model.safetensors")
        runs.append(str(run))
    env = subprocess_env()
    report = tmp_path / "report.json"
    subprocess.run([*BENCH, "--mode", "scaling-report", "--skip", "1", "--runs", *runs,
                    "--out", str(report)], cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    rows = json.loads(report.read_text())["rows"]
    assert rows[0]["tokens_per_s_median"] == 100.0 and rows[1]["tokens_per_s_median"] == 190.0
    assert rows[1]["scaling_efficiency"] == pytest.approx(0.95)
    cmp_out = tmp_path / "cmp.json"
    subprocess.run([*BENCH, "--mode", "compare", "--runs", *runs, "--out", str(cmp_out)],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    cmp = json.loads(cmp_out.read_text())
    assert cmp["tensors"] == 2 and cmp["max_rel_diff"] == pytest.approx(0.5) and cmp["max_loss_rel_diff"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_rank_padding_changes_no_output_or_gradient(monkeypatch, dtype, dropout):
    """MSPLoRALinear pads the concatenated rank with zeros on CUDA (msplora_dist/adapters/layers.py RANK_ALIGN,
    measured in docs/benchmarks.md); forced on here on CPU, outputs and every gradient equal those without padding up
    to the order of float summation (the zeros add exact zeros, but a GEMM of another rank may sum in another order)."""
    from msplora_dist import LoRAPair, MSPLoRAConfig, MSPLoRALinear
    from msplora_dist.adapters import layers

    cfg = MSPLoRAConfig(ranks=(5, 3, 2), alphas=(16, 8, 4), dropout=dropout)
    torch.manual_seed(0)
    pairs = tuple(LoRAPair(24, 40, r, init_lora_weights=False) for r in cfg.ranks)
    base = torch.nn.Linear(24, 40, bias=False).to(dtype)
    base.weight.requires_grad_(False)
    layer = MSPLoRALinear(base, pairs, tuple(cfg.scale(i) for i in range(3)), cfg.dropout).train()
    x0 = torch.randn(3, 7, 24).to(dtype)
    g = torch.randn(3, 7, 40).to(dtype)

    def run(padded: bool):
        monkeypatch.setattr(layers, "PAD_DEVICE_TYPES", {"cpu", "cuda"} if padded else {"cuda"})
        for p in pairs:
            p.lora_A.grad = p.lora_B.grad = None
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same dropout masks
        y = layer(x)
        y.backward(g)
        return y.detach(), x.grad, [t.grad.clone() for p in pairs for t in (p.lora_A, p.lora_B)]

    y0, gx0, grads0 = run(False)
    assert layer._pads(x0, per_level=False) == (0, 0, 0)
    y1, gx1, grads1 = run(True)
    assert layer._pads(x0, per_level=False) == (0, 0, 6) and layer._pads(x0, per_level=True) == (3, 5, 6)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(gx1, gx0, **tol)
    for a, b in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_check_mode_compares_now_and_before_against_float64(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([*BENCH, "--mode", "check", "--cpu-smoke", "--out", str(out)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["finite"] and max(row["now"].values()) < 2e-2 and max(row["before"].values()) < 2e-2
