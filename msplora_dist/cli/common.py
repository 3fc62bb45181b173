"""What every command shares: an offline, quiet environment for transformers, and one error style (a single line
`error: ...` on stderr and exit status 2 for bad flags and bad input alike)."""

from __future__ import annotations

import argparse
import os
import sys


def offline_quiet_env() -> None:
    """Nothing reaches for the Hub unless asked, and only our lines reach the terminal (set before transformers loads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2, like every other bad input (not the whole usage block)."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model and --adapter, as the sampling commands (generate, chat) take them."""
    p.add_argument("--model", default=None, help="base model directory (Hugging Face format; default: the one the adapter records)")
    p.add_argument("--adapter", default=None, help="MSPLoRA adapter directory (written by save_adapter)")


def add_sampling_args(p: argparse.ArgumentParser, *, temperature: float, temperature_help: str) -> None:
    """The decoding and placement flags the sampling commands share; each keeps its own default temperature."""
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=temperature, help=temperature_help)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def print_user_error(err: BaseException) -> int:
    """Print a UserError as its one line (newlines folded) and return the exit status 2."""
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2
