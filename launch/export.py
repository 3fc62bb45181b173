"""Export an MSPLoRA adapter for serving.

The command lives in msplora_dist/cli/export.py (its docstring and `--help` describe it); the installed
`msplora-export` is the same command.
"""

from msplora_dist.cli.export import main, run

__all__ = ["main", "run"]  # main: for the tests that load this file

if __name__ == "__main__":
    run()
