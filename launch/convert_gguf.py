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

from msplora_dist.cli.convert_gguf import main

if __name__ == "__main__":
    raise SystemExit(main())
