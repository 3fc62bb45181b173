"""Speed and memory of MSPLoRA against PEFT (Q)LoRA on a 4-bit Llama, on identical shapes and tokens; plus the
helpers of the multi-GPU scaling runs (docs/scaling.md). Not a test; results in docs/benchmarks.md. From the
repository root:

    python -m tools.bench --out bench.json                      # GPU: 7B and 1.1B shapes, every variant
    python -m tools.bench --shapes 7b --variants base,peft-tuned,msplora,ds-zero2 --out bench.json
    python -m tools.bench --cpu-smoke --out /tmp/smoke.json     # tiny shapes on CPU (tests/tools/test_bench.py)
    python -m tools.bench --mode layer --out layer.json         # one projection: base / PEFT / MSPLoRA (now and before)
    python -m tools.bench --mode check                          # MSPLoRALinear now and before against float64
    python -m tools.bench --mode make-model|make-data|compare|scaling-report ...   # docs/scaling.md

Modules: models.py (shapes, random-weight models, 4-bit quantization), speed.py (the variant table), trainer_rows.py
(the ds-* rows: the real Trainer, one child process each), layer.py (--mode layer and check, and the frozen
previous forward), scaling.py (make-model, make-data, compare, scaling-report), __main__.py (the command line).

Variants (r = LoRA rank; "all" = q,k,v,o,gate,up,down). All but ds-* run in this process, each on a fresh model:
  base            the frozen 4-bit model alone (inputs require grad so backward runs through every layer), with
                  non-reentrant checkpointing: the floor every adapter pays on top of
  peft-standard   PEFT LoRA r=16 all, the common QLoRA recipe as the Hugging Face Trainer runs it with bf16=True:
                  prepare_model_for_kbit_training (norms, embeddings and lm_head cast to fp32, its own checkpointing:
                  torch's default, reentrant), fp32 adapters, dropout 0.05, forward under torch.autocast(bf16)
  peft-tuned      PEFT LoRA r=16 all, everything bf16 (adapters too), non-reentrant checkpointing, dropout 0
  msplora         apply_msplora, all targets, ranks with the same trainable parameter count as peft-tuned
                  (within a few %), dropout 0, fp32 adapters (bf16 math), non-reentrant checkpointing
  msplora-prev    the same with MSPLoRALinear's forward as it was before issue 7 (before/after numbers)
  msplora-bf16    msplora with bf16 adapter tensors (what DeepSpeed's bf16 mode holds in the module; no casts)
  msplora-nockpt  msplora without gradient checkpointing (speed ceiling, at the memory of all activations)
  paper-msplora   the paper's setting: MSPLoRA (64,32,16) on q,v, 3 groups, dropout 0.05
  paper-peft      PEFT LoRA r=64 on q,v, dropout 0.05 (bf16, non-reentrant, like peft-tuned)
  ds-zero2        msplora as a training run: msplora_dist.train.trainer.Trainer with ds_configs/zero2.json, the shape's
                  random model saved to a directory under --workdir and loaded 4-bit by the Trainer, packed text rows
                  of seq tokens; one GPU, in a child process of its own
  ds-zero3        the same with ds_configs/zero3.json, kept at stage 3 (--single_rank_zero3 keep: the backbone
                  "partitioned" over one rank, every module's weights gathered before its forward, its recomputation
                  and its backward); the ds-* rows run eager layers (compile_layers false), as they were measured
  ds-zero1        ds_configs/zero2.json with stage 1 (not in the default list)
  ds-zero2-nooverlap  ds_configs/zero2.json with overlap_comm false (not in the default list)

MFU = tokens/s x k x N / peak, with N the parameter count of the base model (bf16 count, embeddings and lm_head
included), k = 8 with activation recomputation (forward, recomputed forward, backward = 2 forwards) and 6 without,
peak = 790 TFLOP/s (bf16 dense matrix rate measured on this workplace's H200). This is the usual "model flops" count:
it ignores attention's s^2 term, and a frozen base computes no weight gradients (its real work is 4N or 6N), so it
states throughput on a common scale rather than the matrix units' real load.
"""
