"""Prompt templates shared by training (msplora_dist.train.data) and sampling (launch/generate.py), so a
trained adapter is prompted exactly as it was trained.

Alpaca rows (instruction, input, output):

    ### Instruction:
    {instruction}

    ### Input:            <- only when input is non-empty
    {input}

    ### Response:
    {output}</s>

Chat rows (messages with role/content) use the tokenizer's chat template when it has one; otherwise
DEFAULT_CHAT_TEMPLATE below: each turn is "<|{role}|>\n{content}\n", and the assistant turn's
content is followed by the tokenizer's eos token. The loss covers the assistant turns only.
"""

from __future__ import annotations

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    # transformers renders templates with trim_blocks, which eats a literal newline after a block tag
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The text the model sees before its response."""
    if input and input.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def chat_turn_prefix(role: str) -> str:
    """What precedes a turn's content in DEFAULT_CHAT_TEMPLATE."""
    return f"<|{role}|>\n"
