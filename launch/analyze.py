"""What each scale of an MSPLoRA adapter learned, as a report a person can look at (CPU is enough):

    python launch/analyze.py --adapter runs/default/adapter --out runs/default/analysis
    python launch/analyze.py --adapter runs/default/adapter --out runs/default/analysis --compare OTHER_ADAPTER_DIR

The command lives in msplora_dist/cli/analyze.py (its docstring and `--help` describe it); the installed
`msplora-analyze` is the same command.
"""

from msplora_dist.cli.analyze import main, run

__all__ = ["main", "run"]  # main: for the tests that load this file

if __name__ == "__main__":
    run()
