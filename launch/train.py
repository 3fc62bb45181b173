"""Fine-tune a LLaMA-family model with MSPLoRA on DeepSpeed. The embedded default, on a CPU in about a minute:

    deepspeed launch/train.py --ds_config ds_configs/zero3.json

A real run: `deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/zero3.json --model DIR --data FILE ...`;
several nodes: `deepspeed --hostfile hostfile launch/train.py ...` (README). The command lives in
msplora_dist/cli/train.py (its docstring and `--help` describe it); the installed `msplora-train` is the same
command in one process.
"""

from msplora_dist.cli.train import main, run

__all__ = ["main", "run"]  # main: for the tests that load this file

if __name__ == "__main__":
    run()
