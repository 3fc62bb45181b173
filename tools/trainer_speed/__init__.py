"""Speed and memory of the real trainer (`launch/train.py`, one GPU) across its speed settings, side by side in one
run with other training loops as anchors, on the same batches. Not a test: it prints a table and writes JSON (after
every row, so a call cut short keeps what ran). Every row and every anchor is a process of its own. From the
repository root:

    python -m tools.trainer_speed --model runs/m7b --data runs/bench7b.jsonl --out speed.json \\
        --rows zero3-liger-compile,zero3-liger --anchors unsloth,unsloth-offload,peft-tuned,peft-liger
    python -m tools.trainer_speed --model models/smollm2 --data runs/bench7b.jsonl --out smol.json --batch 16 \\
        --seq 256 --load_in_4bit false --gradient_checkpointing false --ranks msp_all_eq_lora16 \\
        --rows zero3-liger-compile,zero2-compile --anchors torch-peft
    python -m tools.trainer_speed --smoke              # CPU, the tiny shipped model: what runs without CUDA, seconds
    python -m tools.trainer_speed --report a.json b.json   # the table of earlier calls' results, together

Rows (rows.py): `launch/train.py --ds_config ds_configs/zero{2,3}.json` with MSPLoRA --ranks (default (48,16,13):
LoRA r=16's 39,976,960 parameters at the 7B shape; or a quality-study arm resolved on the model, e.g.
msp_all_eq_lora16) on all 7 projections, dropout 0, --batch x --seq packed tokens a step, --steps steps; --liger,
--compile_layers (false unless the row names it), --single_rank_zero3 and the activation-memory budget per row. On
one GPU a zero3 row runs the same stage-2 engine as its zero2 twin unless it is a -keep row. Anchors (anchors.py):
Unsloth, PEFT and a plain PyTorch + PEFT loop, LoRA r=16 on the same 7 projections.

Same inputs: every row and anchor loads the same model directory with the same backbone settings (--load_in_4bit:
NF4, double quantization, compute and storage in the trainer's dtype; --gradient_checkpointing), and trains on the
same batches: the parent draws the batches of steps 1..--steps with the trainer's own preflight, sampler and collate
(the --data rows tokenized and packed as the rows' Trainer does) and the anchors read them (inputs.json). The loss of
step 1, where every adapter is still zero, is then the base model's loss on the same tokens for all: the table shows
it as the check.

Measured alike: tokens/s is the median over the steps after --warmup of tokens / step time, where a step is what
Trainer.step times (its record's tokens_per_s in summary.json): from reading the step's rows out of an in-memory
Arrow table (the trainer's packed train split; the anchors' holds the same rows) through collate, the copy to the
device, forward, backward and the optimizer step to the loss on the host (the .item() that waits for
the GPU). The trainer's work between steps (progress bar, peak-memory read, the stop agreement) is outside it, in
the trainer and in the anchors alike. Peak memory: torch.cuda.max_memory_allocated over the whole process, loading
included, as the trainer's summary.json records it (on a CPU the peak resident memory).
"""
