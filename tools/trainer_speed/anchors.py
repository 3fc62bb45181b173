"""The anchors: other training loops on the trainer rows' batches, each in a process of its own
(`python -m tools.trainer_speed.anchors NAME INPUTS_JSON` prints one JSON line), LoRA r=16 alpha 16 dropout 0 on the
rows' target projections, loss from labels, AdamW (fused where torch has it) at the rows' learning rate.

    unsloth          Unsloth's FastLanguageModel, use_gradient_checkpointing=True, bf16 autocast (its own recipe)
    unsloth-offload  the same with use_gradient_checkpointing="unsloth" (its checkpoints offloaded to host memory)
    peft-tuned       PEFT on the trainer's own backbone (load_backbone: 4-bit NF4 double quantization, compute and
                     storage in the rows' dtype, unless --load_in_4bit false), adapters in that dtype too,
                     non-reentrant checkpointing whatever the run's --gradient_checkpointing
    peft-liger       peft-tuned with Liger Kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy applied
                     before loading (the trainer's own apply_liger), so the loss from labels never forms the logits
    torch-peft       a plain PyTorch + PEFT loop: peft-tuned with the rows' --gradient_checkpointing (for a small model
                     run without checkpointing; with checkpointing on it is peft-tuned)

This module imports only the standard library and torch at the top: Unsloth must be imported before transformers.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tools.bench.trainer_rows import DIST_ENV

LORA_R = 16
OFFLINE = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@dataclass(frozen=True)
class Anchor:
    needs_cuda: bool
    note: str


ANCHORS = {
    "unsloth": Anchor(True, "Unsloth, use_gradient_checkpointing=True"),
    "unsloth-offload": Anchor(True, 'Unsloth, use_gradient_checkpointing="unsloth"'),
    "peft-tuned": Anchor(False, "PEFT, adapters in the rows' dtype, non-reentrant checkpointing"),
    "peft-liger": Anchor(True, "peft-tuned + Liger (rope, rms_norm, swiglu, fused linear CE)"),
    "torch-peft": Anchor(False, "plain PyTorch + PEFT loop, the rows' checkpointing"),
}


def step_summary(speeds: list[float], warmup: int) -> dict:
    """The speed figures of a row or an anchor from its per-step tokens/s."""
    return {"tokens_per_s": statistics.median(speeds[warmup:]), "step_tokens_per_s": [round(v) for v in speeds]}


def failed(name: str, proc: subprocess.CompletedProcess) -> dict:
    """The row of a child that failed: its last line of stderr (the error) and the tail."""
    return {"row": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "stderr_tail": proc.stderr[-3000:]}


def peak_gb(device: torch.device) -> float:
    """What the trainer's peak_memory_gb reads (msplora_dist/train/trainer.py), without importing the trainer here."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def adamw(params, lr: float):
    """torch's fused AdamW where this device and dtype have it, else the default (foreach) one; (optimizer, fused)."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True), True
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr), False


# --- the models ---------------------------------------------------------------------------------------------------


def unsloth_model(spec: dict, checkpointing):
    # Unsloth's import patches transformers, so it comes first; no statistics call, its Hugging Face home and compiled
    # cache in this process's own directory (the anchor runs in one of its own).
    os.environ.update(UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_ENABLE_HF_TRANSFER="0", HF_HOME=str(Path.cwd() / "hf_home"),
                      UNSLOTH_COMPILE_LOCATION=str(Path.cwd() / "unsloth_compiled_cache"))
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(spec["model"], max_seq_length=spec["seq"], dtype=torch.bfloat16,
                                                 load_in_4bit=spec["load_in_4bit"], local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=LORA_R, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=spec["targets"], use_gradient_checkpointing=checkpointing)
    model = FastLanguageModel.for_training(model)  # training mode: its checkpointing acts only then
    return model, [p for p in model.parameters() if p.requires_grad]


def peft_model(spec: dict, device: torch.device, *, checkpointing: bool, liger: bool):
    from msplora_dist.train.backbone import DTYPES, load_backbone
    from tools.bench.models import peft_lora

    if liger:
        from msplora_dist.train.kernels import apply_liger

        apply_liger(spec["model_type"])  # before the model is built, as the trainer does
    model = load_backbone(spec["model"], dtype=spec["dtype"], load_in_4bit=spec["load_in_4bit"], ds_config=None,
                          gradient_checkpointing=checkpointing, attn_implementation=spec["attn_implementation"])
    model.to(device)  # what DeepSpeed does with the trainer's module
    return peft_lora(model, LORA_R, spec["targets"], 0.0, adapter_dtype=DTYPES[spec["dtype"]])


def build(name: str, spec: dict, device: torch.device):
    """(model in training mode, its trainable parameters, whether its forward runs under bf16 autocast)."""
    if name in ("unsloth", "unsloth-offload"):
        model, params = unsloth_model(spec, True if name == "unsloth" else "unsloth")
        return model.train(), params, True  # under bf16 autocast, as Unsloth's own recipe trains
    checkpointing = spec["gradient_checkpointing"] if name == "torch-peft" else True
    model, params = peft_model(spec, device, checkpointing=checkpointing, liger=name == "peft-liger")
    return model.train(), params, False


# --- the loop -----------------------------------------------------------------------------------------------------


def train(model, params, spec: dict, device: torch.device, autocast: bool) -> dict:
    """spec's batches, one optimizer step each, timed as Trainer.step times its own (see the package docstring)."""
    import datasets

    from msplora_dist.train.data import collate

    # The trainer reads a step's rows out of its packed train split, an in-memory Arrow table (pack_examples): so
    # does the anchor, out of one holding the same rows, inside the timed step. At a small model's step this
    # reading and collate are a few percent of the step.
    table = datasets.Dataset.from_list([row for step in spec["steps"] for row in step])
    starts = [sum(len(step) for step in spec["steps"][:k]) for k in range(len(spec["steps"]))]
    opt, fused = adamw(params, spec["lr"])
    speeds, losses = [], []
    for start, step, tokens in zip(starts, spec["steps"], spec["tokens"], strict=True):
        t0 = time.perf_counter()
        examples = [table[j] for j in range(start, start + len(step))]
        batch = {k: v.to(device) for k, v in collate(examples, spec["pad_id"]).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the host waits for the step here, as at Trainer.step's .item()
        speeds.append(tokens / (time.perf_counter() - t0))
    return {**step_summary(speeds, spec["warmup"]), "losses": [round(v, 4) for v in losses[:4]],
            "tokens_per_step": spec["tokens"], "peak_gb": peak_gb(device),
            "trainable": sum(p.numel() for p in params), "fused_adamw": fused}


def run_anchor(name: str, inputs: Path, workdir: Path, on_gpu: bool) -> dict:
    """One anchor in a child process (in a directory of its own, where Unsloth writes its compiled cache); its
    result row, an error row with the child's last line of stderr, or a skipped row on a machine without CUDA."""
    if ANCHORS[name].needs_cuda and not on_gpu:
        return {"row": name, "skipped": "needs CUDA"}
    cwd = workdir / name
    cwd.mkdir(parents=True, exist_ok=True)
    repo = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # a world of its own
    env.update(OFFLINE, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tools.trainer_speed.anchors", name, str(inputs.resolve())], cwd=cwd,
                          env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return failed(name, proc)
    return {**json.loads(lines[-1]), "wall_s": time.time() - t0}


def main(argv: list[str]) -> int:
    name, inputs = argv
    spec = json.loads(Path(inputs).read_text())
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    model, params, autocast = build(name, spec, device)
    row = {"row": name, "note": ANCHORS[name].note, **train(model, params, spec, device, autocast)}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.update(OFFLINE)
    sys.exit(main(sys.argv[1:]))
