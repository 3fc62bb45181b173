"""Chat with a base model and an MSPLoRA adapter.

The command lives in msplora_dist/cli/chat.py (its docstring and `--help` describe it); the installed
`msplora-chat` is the same command.
"""

from msplora_dist.cli.chat import main, run

__all__ = ["main", "run"]  # main: for the tests that load this file

if __name__ == "__main__":
    run()
