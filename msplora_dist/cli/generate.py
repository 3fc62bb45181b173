"""Sample a response from a base model, optionally with an MSPLoRA adapter.

    python launch/generate.py --model MODEL_DIR [--adapter ADAPTER_DIR] --prompt "..." \
        [--input "..."] [--max_new_tokens 128] [--temperature 0.7] [--top_p 0.9] [--seed 0] [--chat] [--system "..."]

The prompt is formatted as in training: msplora_dist.train.prompts.alpaca_prompt(prompt, input) by default; with
--chat a one-turn conversation through the tokenizer's chat template (msplora_dist.train.prompts.DEFAULT_CHAT_TEMPLATE
when it has none) with the generation prompt appended; its token ids start with one bos as a training row's do
(msplora_dist.train.prompts.prompt_token_ids). --temperature 0 is greedy decoding (deterministic).
Only the response is printed. A 4-bit base directory is loaded 4-bit (bitsandbytes). Bad input prints one
line `error: ...` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Only the response goes to stdout and only an error line to stderr: no progress bars, no library chatter.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description="Sample from a base model with an optional MSPLoRA adapter.")
    p.add_argument("--model", required=True, help="base model directory (Hugging Face format)")
    p.add_argument("--adapter", default=None, help="MSPLoRA adapter directory (written by save_adapter)")
    p.add_argument("--prompt", required=True, help="the instruction (or, with --chat, the user message)")
    p.add_argument("--input", default="", help="alpaca input field (not with --chat)")
    p.add_argument("--chat", action="store_true", help="format as a chat turn with the tokenizer's chat template")
    p.add_argument("--system", default=None, help="--chat: a system message before the user turn")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy decoding")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


def format_prompt(tokenizer, prompt: str, *, input: str = "", chat: bool = False, system: str | None = None) -> list[int]:
    """The token ids the model sees before its response, built as training builds a row's (prompts.prompt_token_ids:
    the same text, and the same single bos, with or without a chat template)."""
    from msplora_dist.train.prompts import alpaca_prompt, ensure_chat_template, prompt_token_ids

    if not chat:
        return prompt_token_ids(tokenizer, alpaca_prompt(prompt, input), chat=False)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ensure_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt_token_ids(tokenizer, text, chat=True)


def generate(model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int = 128, temperature: float = 0.7,
             top_p: float = 0.9, seed: int = 0) -> str:
    """The decoded continuation of the prompt (special tokens skipped)."""
    import random

    import torch
    from transformers import GenerationConfig

    # Not transformers.set_seed: it lives in trainer_utils, whose import pulls in peft and bitsandbytes (seconds).
    random.seed(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from msplora_dist.errors import CheckpointError, ConfigError, UserError

    try:
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens {args.max_new_tokens}: expected >= 1")
        if args.temperature < 0:
            raise ConfigError(f"--temperature {args.temperature}: expected >= 0 (0 is greedy)")
        if not 0 < args.top_p <= 1:
            raise ConfigError(f"--top_p {args.top_p}: expected 0 < top_p <= 1")
        if args.chat and args.input:
            raise ConfigError("--input is the alpaca input field; with --chat put everything in --prompt")
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        dtype = dtypes.get(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)

        from transformers import AutoTokenizer

        from msplora_dist.adapters.export import first_line
        from msplora_dist.adapters.io import load_adapter
        from msplora_dist.adapters.merged import load_base_model

        model, _ = load_base_model(args.model, dtype, dequantize=False, device=device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"cannot load the tokenizer of {args.model!r}: {first_line(err)}") from None
        if args.adapter is not None:
            model = load_adapter(model, args.adapter).eval()
        prompt_ids = format_prompt(tokenizer, args.prompt, input=args.input, chat=args.chat, system=args.system)
        response = generate(model, tokenizer, prompt_ids, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(response)
    return 0


if __name__ == "__main__":
    sys.exit(main())
