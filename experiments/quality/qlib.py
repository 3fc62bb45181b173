"""Helpers shared by the quality-study scripts in experiments/quality/ (not an entry point). The file-safety
helpers (atomic writes, sha256 of a file) are msplora_dist.utils.fileio's; these only add JSON on top.

The layout of one experiment root (default runs/quality, git-ignored):

    corpus/manifest.json            which Python built the corpus, every file with its sha256, unit and role
    corpus/{pretrain,pretrain_val,task}.jsonl   {"path", "unit", "text"} per source file, one file per role
    tokenizer/                      SentencePiece BPE trained on corpus/pretrain.jsonl, as a HF tokenizer dir
    task/{train,dev,test}.jsonl     alpaca rows made from corpus/task.jsonl only; task/manifest.json
    base/                           the pretrained LLaMA-architecture model (save_pretrained) + tokenizer
    base/pretrain_log.json          what pretrain.py did (tokens, losses, throughput, environment)
    grid/cells/<cell>/result.json   one result per grid cell (the trainer's output dir is the cell dir)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

from msplora_dist.utils.fileio import write_file_atomically

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO / "runs" / "quality"
SMOKE_ROOT = REPO / "runs" / "quality-smoke"

# The instruction of every task row (the code goes in "input", the docstring is the "output").
TASK_INSTRUCTION = "Write the docstring of this Python function."

# LLaMA-architecture shapes. "base" is the model of the real test; "smoke" the CPU smoke test's.
# Head dim 64 in "base"; 2 key/value heads of 8 (grouped-query attention, like LLaMA-2-70B/LLaMA-3) make
# k_proj/v_proj 4x narrower than q_proj, so adapters on v_proj have the shapes a real GQA model gives them.
# "base" is 22.0 M parameters with an 8192 vocabulary and tied embeddings: 44 MB in bf16, which with the
# wheels (9 MB) stays under the 64 MiB that one device call carries and returns (docs/quality.md).
MODEL_PRESETS = {
    "base": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1024),
    "smoke": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
}

H200_BF16_FLOPS = 790e12  # dense bf16 matrix rate measured on this workplace's H200


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_fraction(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by (salt, key) alone: the same on every machine, Python and run."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically, as UTF-8 (the corpus is source text), creating the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | os.PathLike, rows) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_count(text: str | int | float) -> int:
    """'150M' -> 150_000_000; also K, G/B suffixes and plain numbers (1e8)."""
    if isinstance(text, int | float):
        return int(text)
    s = str(text).strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(s[-1:], 1)
    if scale != 1:
        s = s[:-1]
    return int(float(s) * scale)


def env_info() -> dict:
    """The software and hardware a result came from."""
    info = {"python": platform.python_version(), "python_executable": sys.executable, "platform": platform.platform(),
            "cpu_count": os.cpu_count()}
    for name in ("torch", "transformers", "deepspeed", "sentencepiece", "tokenizers", "datasets"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # not installed, or fails to import on this machine
            info[name] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except Exception:
        pass
    return info


def offline_env() -> None:
    """Nothing here may reach a model hub (none is reachable; a lookup would only cost a timeout)."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def fmt_duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
