"""Sample a response from a base model, optionally with an MSPLoRA adapter.

    python launch/generate.py [--model MODEL_DIR] [--adapter ADAPTER_DIR] --prompt "..." \
        [--input "..."] [--max_new_tokens 128] [--temperature 0.7] [--top_p 0.9] [--seed 0] [--chat] [--system "..."]

The prompt is formatted as in training: msplora_dist.train.prompts.alpaca_prompt(prompt, input) by default; with
--chat a one-turn conversation through the tokenizer's chat template (msplora_dist.train.prompts.DEFAULT_CHAT_TEMPLATE
when it has none) with the generation prompt appended; its token ids start with one bos as a training row's do
(msplora_dist.train.prompts.prompt_token_ids). --temperature 0 is greedy decoding (deterministic).
Without --model, the base model the trainer recorded in the adapter. Only the response is printed. A 4-bit
base directory is loaded 4-bit (bitsandbytes). Bad input prints one line `error: ...` to stderr and exits
with status 2.
"""

from __future__ import annotations

import argparse
import sys

from msplora_dist.cli.common import OneLineParser, add_model_args, add_sampling_args, offline_quiet_env, print_user_error

offline_quiet_env()



def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description="Sample from a base model with an optional MSPLoRA adapter.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the instruction (or, with --chat, the user message)")
    p.add_argument("--input", default="", help="alpaca input field (not with --chat)")
    p.add_argument("--chat", action="store_true", help="format as a chat turn with the tokenizer's chat template")
    p.add_argument("--system", default=None, help="--chat: a system message before the user turn")
    add_sampling_args(p, temperature=0.7, temperature_help="0: greedy decoding")
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


def check_sampling_args(args: argparse.Namespace) -> None:
    """The sampling flags generate and chat share, checked before anything loads."""
    from msplora_dist.errors import ConfigError

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens {args.max_new_tokens}: expected >= 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: expected >= 0 (0 is greedy)")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top_p {args.top_p}: expected 0 < top_p <= 1")


def load_for_sampling(model_dir: str | None, adapter: str | None, dtype_name: str = "auto", device: str = "auto"):
    """(model, tokenizer) of base `model_dir` with `adapter` loaded, in eval mode. Without `model_dir`, the base
    the trainer recorded in the adapter."""
    import torch
    from transformers import AutoTokenizer

    from msplora_dist.adapters.export import first_line, resolve_base
    from msplora_dist.adapters.io import load_adapter
    from msplora_dist.adapters.merged import load_base_model
    from msplora_dist.errors import CheckpointError, ConfigError

    if model_dir is None:
        model_dir, why_none = resolve_base(adapter, None) if adapter is not None else (None, None)
        if model_dir is None:
            raise ConfigError(f"--model MODEL_DIR is needed ({why_none or 'no --adapter that records its base model'})")
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes.get(dtype_name) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model, _ = load_base_model(model_dir, dtype, dequantize=False, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot load the tokenizer of {model_dir!r}: {first_line(err)}") from None
    if adapter is not None:
        model = load_adapter(model, adapter)
    return model.eval(), tokenizer


def main(argv=None) -> int:
    args = parse_args(argv)
    from msplora_dist.errors import ConfigError, UserError

    try:
        check_sampling_args(args)
        if args.chat and args.input:
            raise ConfigError("--input is the alpaca input field; with --chat put everything in --prompt")
        model, tokenizer = load_for_sampling(args.model, args.adapter, args.dtype, args.device)
        prompt_ids = format_prompt(tokenizer, args.prompt, input=args.input, chat=args.chat, system=args.system)
        response = generate(model, tokenizer, prompt_ids, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except UserError as err:
        return print_user_error(err)
    print(response)
    return 0


def run() -> None:
    """The console entry point (msplora-generate)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
