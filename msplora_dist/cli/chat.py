"""Chat with a base model and an MSPLoRA adapter in the terminal, in the template the adapter was trained with.

    python launch/chat.py --adapter runs/default/adapter                  # the base the adapter records
    python launch/chat.py --model MODEL_DIR --adapter DIR --template chat --system "Be brief."

Each line you type is a user turn; the reply streams as it is generated. The conversation so far is the
context of the next reply (the oldest exchanges are dropped when it would not fit the model's context).
Commands: /reset forgets the conversation, /exit (or end of input, Ctrl-D) quits.

--template alpaca (the default, as the default run trains): each exchange is rendered as one Alpaca example,
<s> + alpaca_prompt(user) + reply + </s>, the way msplora_dist.train.data tokenizes an alpaca row, and the new
turn as <s> + alpaca_prompt(user). --template chat: the whole conversation through the tokenizer's chat template
(msplora_dist.train.prompts.DEFAULT_CHAT_TEMPLATE when it has none) with the generation prompt, as chat rows
are trained. --temperature 0 (the default) is greedy decoding. Bad input prints one line `error: ...` to stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TextIO

from msplora_dist.cli.common import OneLineParser, add_model_args, add_sampling_args, offline_quiet_env, print_user_error

offline_quiet_env()

TEMPLATES = ("alpaca", "chat")



def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description="Chat with a base model and an MSPLoRA adapter (/reset forgets the conversation, /exit quits).")
    add_model_args(p)
    p.add_argument("--template", default="alpaca", choices=TEMPLATES, help="the training prompt format (default: alpaca)")
    p.add_argument("--system", default=None, help="--template chat: a system message opening the conversation")
    add_sampling_args(p, temperature=0.0, temperature_help="0 (the default): greedy decoding")
    return p.parse_args(argv)


def render(tokenizer, history: list[tuple[str, str]], user: str, template: str = "alpaca",
           system: str | None = None) -> list[int]:
    """Token ids of the conversation `history` ([(user, reply), ...]) followed by the new `user` turn, ready for
    the reply: formatted exactly as training formats rows of that template."""
    from msplora_dist.train.prompts import DEFAULT_CHAT_TEMPLATE, alpaca_prompt, prompt_token_ids

    if template == "alpaca":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids: list[int] = []
        for past_user, reply in history:
            ids += bos + tokenizer(alpaca_prompt(past_user) + reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids + bos + tokenizer(alpaca_prompt(user), add_special_tokens=False)["input_ids"]
    messages = [{"role": "system", "content": system}] if system else []
    for past_user, reply in history:
        messages += [{"role": "user", "content": past_user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": user})
    template_text = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, chat_template=template_text, add_generation_prompt=True, tokenize=False)
    return prompt_token_ids(tokenizer, text, chat=True)  # one bos, as training starts a chat row


def context_limit(model, tokenizer) -> int:
    """The longest prompt + reply the model takes (transformers' "no limit" sentinels ignored)."""
    limits = [n for n in (getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
              if isinstance(n, int) and 0 < n < 10**9]
    return min(limits) if limits else 2048


def reply(model, tokenizer, ids: list[int], out: TextIO, *, max_new_tokens: int, temperature: float, top_p: float) -> str:
    """Generate the reply to prompt `ids`, writing its text to `out` as it arrives; returns the whole reply."""
    import torch
    from transformers import GenerationConfig, TextIteratorStreamer

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                               streamer=streamer)
        except BaseException as err:  # re-raised in the caller's thread below
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    parts = []
    for piece in streamer:
        parts.append(piece)
        out.write(piece)
        out.flush()
    worker.join()
    if failure:
        raise failure[0]
    out.write("\n")
    out.flush()
    return "".join(parts).strip()


def chat_loop(model, tokenizer, inp: TextIO, out: TextIO, *, template: str = "alpaca", system: str | None = None,
              max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 0.9) -> list[tuple[str, str]]:
    """Read user turns from `inp` until /exit or its end, streaming each reply to `out`; returns the history."""
    interactive = inp.isatty()
    limit = context_limit(model, tokenizer)
    history: list[tuple[str, str]] = []
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        user = line.strip()
        if not user:
            continue
        if user in ("/exit", "/quit"):
            break
        if user == "/reset":
            history.clear()
            out.write("(conversation reset)\n")
            continue
        ids = render(tokenizer, history, user, template, system)
        while history and len(ids) + max_new_tokens > limit:  # the oldest exchange goes first
            history.pop(0)
            ids = render(tokenizer, history, user, template, system)
        if len(ids) + max_new_tokens > limit:
            out.write(f"(that message is {len(ids)} tokens; with --max_new_tokens {max_new_tokens} it does not fit the "
                      f"model's context of {limit})\n")
            continue
        if interactive:
            out.write("model> ")
        history.append((user, reply(model, tokenizer, ids, out, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p)))
    return history


def main(argv=None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    args = parse_args(argv)
    from msplora_dist.cli.generate import check_sampling_args, load_for_sampling
    from msplora_dist.errors import ConfigError, UserError

    try:
        check_sampling_args(args)
        if args.system and args.template != "chat":
            raise ConfigError("--system needs --template chat (the Alpaca template has no system turn)")
        model, tokenizer = load_for_sampling(args.model, args.adapter, args.dtype, args.device)
    except UserError as err:
        return print_user_error(err)
    import torch

    torch.manual_seed(args.seed)
    inp, out = stdin or sys.stdin, stdout or sys.stdout
    if inp.isatty():
        out.write(f"chatting in the {args.template} template; /reset forgets the conversation, /exit quits\n")
    try:
        chat_loop(model, tokenizer, inp, out, template=args.template, system=args.system, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p)
    except KeyboardInterrupt:
        out.write("\n")
    return 0


def run() -> None:
    """The console entry point (msplora-chat)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
