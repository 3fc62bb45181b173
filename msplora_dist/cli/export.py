"""Export an MSPLoRA adapter for serving.

    python launch/export.py --adapter DIR --format peft --out DIR [--base MODEL_DIR] [--max_rank K]
    python launch/export.py --adapter DIR --format merged --out DIR [--base MODEL_DIR] [--dtype bf16|fp16|fp32]

peft:   a plain LoRA in PEFT's format (adapter_config.json + adapter_model.safetensors), what vLLM and
        PeftModel.from_pretrained load. Exact (rank r_G + r_M + r_L) unless --max_rank K is smaller, then each
        layer's update is truncated by SVD and its relative error is printed and written to export_report.json.
        Prints the vLLM max_lora_rank to use and the serving commands. The base model (--base, or by default
        the one the trainer recorded in the adapter's msplora_config.json) gives the module paths and the adapter
        is checked against it; with neither the Llama layout is assumed.
merged: the base model (--base, or the recorded one) with every update folded into its weights (a 4-bit base is dequantized), saved as a
        Hugging Face model directory with the base's tokenizer.

--out is written atomically: on any error nothing is left there and an existing directory is untouched.
An existing non-empty --out that holds no previous export is replaced only with --overwrite.
Bad input prints one line `error: ...` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from msplora_dist.cli.common import OneLineParser, offline_quiet_env, print_user_error

offline_quiet_env()



def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description="Export an MSPLoRA adapter as a plain PEFT LoRA or a merged model.")
    p.add_argument("--adapter", required=True, help="MSPLoRA adapter directory (written by save_adapter)")
    p.add_argument("--format", required=True, choices=("peft", "merged"))
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--base", default=None, help="base model directory (default: the one the trainer recorded in the adapter)")
    p.add_argument("--max_rank", type=int, default=None, help="peft: truncate each layer's update to this rank by SVD")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="merged: saved dtype (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that holds no previous export")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from msplora_dist.adapters.export import export_peft
    from msplora_dist.adapters.merged import export_merged
    from msplora_dist.errors import ConfigError, UserError

    try:
        if args.format == "peft":
            if args.dtype is not None:
                raise ConfigError("--dtype applies to --format merged; the peft export is written in fp32")
            report = export_peft(args.adapter, args.out, base=args.base, max_rank=args.max_rank, overwrite=args.overwrite)
        else:
            if args.max_rank is not None:
                raise ConfigError("--max_rank applies to --format peft; the merged export is exact")
            report = export_merged(args.adapter, args.base, args.out, dtype=args.dtype or "bf16", overwrite=args.overwrite)
    except UserError as err:
        return print_user_error(err)
    print(report)
    return 0


def run() -> None:
    """The console entry point (msplora-export)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
