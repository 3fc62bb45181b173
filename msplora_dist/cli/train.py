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
file (`--config run.yaml`); flags override it. `python launch/train.py ...` runs one process.
"""

from __future__ import annotations

import os
import sys

from msplora_dist.cli.output import quiet_libraries, train_device_line
from msplora_dist.errors import RunStopped, UserError
from msplora_dist.utils.log import log

ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
"""The names PyTorch reads its allocator settings from (PYTORCH_ALLOC_CONF is the newer one, and wins)."""


def default_allocator_conf(environ) -> None:
    """PyTorch's expandable segments, unless the user set any allocator variable. Near the memory a budget plans for
    (--activation_memory_gb), the default CUDA allocator fragments, and its frees and retries cost a tenth of the step
    at the 7B shape (docs/benchmarks.md); Unsloth sets the same. PyTorch reads it at the first CUDA allocation, which
    comes later; it means nothing on a CPU."""
    if not any(name in environ for name in ALLOC_CONF_VARIABLES):
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, train, and map the outcome to an exit status: 0 done, 2 bad input, 3 stopped itself (non-finite
    steps), 4 a checkpoint could not be written, 128 + n stopped by signal n (143 SIGTERM, 130 SIGINT) after a checkpoint."""
    quiet_libraries()  # before deepspeed is imported: its import already logs
    default_allocator_conf(os.environ)
    import torch.distributed

    from msplora_dist.dist.process import shutdown_distributed
    from msplora_dist.train.flags import parse_config
    from msplora_dist.train.trainer import Trainer

    # Every rank reports: an error on one rank alone (a node-local path) must not go unsaid.
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"error (rank {rank}): " if rank else "error: "
    # A process group that was up before (an in-process caller's, the test session's) is its owner's to end.
    owns_group = not torch.distributed.is_initialized()
    try:
        cfg = parse_config(argv)
        line = train_device_line()
        if line:
            log(line)
        Trainer(cfg).fit()
    except UserError as err:
        print(f"{prefix}{err}", file=sys.stderr, flush=True)
        return 2
    except RunStopped as err:  # 3: repeated non-finite steps; 4: a write failed; 128 + n: stopped by signal n
        print(f"{prefix}{err}", file=sys.stderr, flush=True)
        return err.exit_code
    finally:
        if owns_group:
            shutdown_distributed()
    return 0


def run() -> None:
    """The console entry point (msplora-train) and launch/train.py: main(), then exit without the interpreter's
    teardown. Everything is written and closed by then. In the teardown, C++ objects left by gloo/ZeRO-3 (pending
    work handles holding tensors) are destroyed in no set order, and on rare runs that aborted a rank with SIGABRT
    ("terminate called without an active exception") after a run that had finished and saved everything, so the
    launcher reported a failure that was not one."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
