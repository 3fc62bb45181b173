"""Convert a GGUF model once into a plain Hugging Face model directory.

    python launch/convert_gguf.py --gguf FILE.gguf --out DIR [--dtype bf16|fp32] [--overwrite]

Every tensor is unpacked (dequantized) to --dtype (default bf16) and saved as safetensors with the config,
the tokenizer transformers rebuilds from the file's metadata, the generation config, and gguf_source.json
(the file's name, size and sha256). The directory's logits equal those of the GGUF loaded in the same dtype,
so `--model DIR` trains the same model as `--model FILE.gguf`, and it also works where a GGUF base does not
(--load_in_4bit, export --base, generate --model). --gguf may also be a directory holding one .gguf file.

--out is written atomically: on any error nothing is left there and an existing directory is untouched.
An existing non-empty --out that holds no earlier conversion is replaced only with --overwrite.
Bad input prints one line `error: ...` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from msplora_dist.cli.common import OneLineParser, offline_quiet_env, print_user_error

offline_quiet_env()



def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description="Convert a GGUF model into a plain Hugging Face model directory.")
    p.add_argument("--gguf", required=True, help="the .gguf file (or a directory holding exactly one)")
    p.add_argument("--out", required=True, help="output model directory (written atomically)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="dtype of the saved weights (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that holds no earlier conversion")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from msplora_dist.errors import UserError
    from msplora_dist.train.gguf import convert

    try:
        record = convert(args.gguf, args.out, args.dtype, overwrite=args.overwrite)
    except UserError as err:
        return print_user_error(err)
    print(json.dumps({"out": args.out, **record}))
    return 0


def run() -> None:
    """The console entry point (msplora-convert-gguf)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
