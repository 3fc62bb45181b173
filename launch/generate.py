"""Sample a response from a base model, optionally with an MSPLoRA adapter.

    python launch/generate.py --model MODEL_DIR [--adapter ADAPTER_DIR] --prompt "..." \
        [--input "..."] [--max_new_tokens 128] [--temperature 0.7] [--top_p 0.9] [--seed 0] [--chat] [--system "..."]

The prompt is formatted as in training: msplora_dist.train.prompts.alpaca_prompt(prompt, input) by default; with
--chat a one-turn conversation through the tokenizer's chat template (msplora_dist.train.prompts.DEFAULT_CHAT_TEMPLATE
when it has none) with the generation prompt appended. --temperature 0 is greedy decoding (deterministic).
Only the response is printed. A 4-bit base directory is loaded 4-bit (bitsandbytes). Bad input prints one
line `error: ...` to stderr and exits with status 2.
"""

from msplora_dist.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
