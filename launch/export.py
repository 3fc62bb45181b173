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

from msplora_dist.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
