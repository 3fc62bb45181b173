"""Convert a GGUF model once into a plain Hugging Face model directory:

    python launch/convert_gguf.py --gguf FILE.gguf --out DIR --dtype bf16

The command lives in msplora_dist/cli/convert_gguf.py (its docstring and `--help` describe it).
"""

from msplora_dist.cli.convert_gguf import main, run

__all__ = ["main", "run"]  # main: for the tests that load this file

if __name__ == "__main__":
    run()
