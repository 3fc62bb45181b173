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


def print_user_error(err: BaseException) -> int:
    """Print a UserError as its one line (newlines folded) and return the exit status 2."""
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2
