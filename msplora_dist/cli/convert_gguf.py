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
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description="Convert a GGUF model into a plain Hugging Face model directory.")
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
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, **record}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
