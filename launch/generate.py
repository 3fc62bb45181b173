"""Sample a response from a base model, optionally with an MSPLoRA adapter.

The command lives in msplora_dist/cli/generate.py (its docstring and `--help` describe it); the installed
`msplora-generate` is the same command.
"""

from msplora_dist.cli.generate import main, run

__all__ = ["main", "run"]  # main: for the tests that load this file

if __name__ == "__main__":
    run()
