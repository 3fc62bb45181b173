"""Fine-tune a LLaMA-family model with MSPLoRA on DeepSpeed.

The embedded default (a tiny model and data shipped in msplora_dist/assets), on a CPU in about a minute:

    deepspeed launch/train.py --ds_config ds_configs/zero3.json

A real run (one node, 8 GPUs, 4-bit backbone, the paper's adapter setting):

    deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/zero3.json \\
        --model /models/Llama-2-7b-hf --data alpaca.jsonl --output_dir runs/llama2-msplora \\
        --load_in_4bit true --gradient_checkpointing true --ranks 64,32,16 --alphas 16 \\
        --num_mid_groups 3 --target_modules q_proj,v_proj --micro_batch_size 4 --grad_accum 4 --lr 2e-4

Several nodes: DeepSpeed's own launcher with a hostfile (see README):

    deepspeed --hostfile hostfile launch/train.py --ds_config ds_configs/zero3.json ...

Resume the newest complete checkpoint: add `--resume latest`. Any flag can also come from a YAML
file (`--config run.yaml`); flags override it. `python launch/train.py ...` runs one process;
the installed `msplora-train` is the same command.
"""

from msplora_dist.cli.train import main, run

__all__ = ["main", "run"]  # main: for the tests that load this file

if __name__ == "__main__":
    run()
