"""Prompt templates shared by training (msplora_dist.train.data) and sampling (launch/generate.py), so a
trained adapter is prompted exactly as it was trained.

Alpaca rows (instruction, input, output):

    ### Instruction:
    {instruction}

    ### Input:            <- only when input is non-empty
    {input}

    ### Response:
    {output}</s>

Chat rows (messages with role/content, or ShareGPT conversations with from/value, converted by
sharegpt_messages) use --chat_template when given (a Jinja file or a name in BUILTIN_CHAT_TEMPLATES), else
the tokenizer's chat template when it has one; otherwise DEFAULT_CHAT_TEMPLATE below: each turn is
"<|{role}|>\n{content}\n", and the assistant turn's content is followed by the tokenizer's eos token.
The loss covers the assistant turns only.
"""

from __future__ import annotations

import json
from pathlib import Path

from msplora_dist.errors import ConfigError, RowError

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


# --- chat templates: named built-ins and the --chat_template override ---------------------------------

# ChatML (Qwen2.5's layout, without its default system prompt) and Llama-3's header layout. Both render a
# conversation's prefix as a prefix of the whole, which the loss masks of msplora_dist.train.data rely on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BUILTIN_CHAT_TEMPLATES = {"default": DEFAULT_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE}


def read_chat_template(value: str) -> str:
    """The Jinja text of --chat_template: a built-in name (BUILTIN_CHAT_TEMPLATES) or a file holding a template
    (a .jinja file, or a tokenizer_config.json-style .json with a "chat_template" string)."""
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"chat_template={value!r} is neither a file nor a built-in template; expected a Jinja file "
                          f"or one of {', '.join(BUILTIN_CHAT_TEMPLATES)}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"chat_template={value!r}: expected a JSON object with a \"chat_template\" string") from None
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"chat_template={value!r} is empty; expected a Jinja chat template")
    return text


# --- ShareGPT rows ------------------------------------------------------------------------------------

# ShareGPT's speakers and the chat roles they become; "user"/"assistant" appear in many ShareGPT exports too.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def sharegpt_messages(conversations) -> list[dict]:
    """A ShareGPT row's `conversations` ([{from, value}]) as chat messages ([{role, content}])."""
    if not isinstance(conversations, list) or not conversations:
        raise RowError("'conversations' must be a non-empty list of {from, value} turns, "
                       f"got {type(conversations).__name__ if conversations is not None else 'null'}")
    messages = []
    for i, turn in enumerate(conversations):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"conversations[{i}].from is {speaker!r}; expected one of human, gpt, system")
        if not isinstance(value, str):
            raise RowError(f"conversations[{i}].value must be a string, got {type(value).__name__}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def check_turns(messages: list[dict], field: str = "messages") -> None:
    """A conversation is an optional system turn, then user and assistant turns taking turns (either may open).
    Two user turns in a row would train the reply to the second as if it answered both, and a tool or other role
    is a layout the loss masks were not written for: both are refused, naming the turn (`field`[i])."""
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i == 0:
            continue
        if role == "system":
            raise RowError(f"{field}[{i}] is a system turn after the first; expected the system turn to open the conversation")
        if role not in ("user", "assistant"):
            raise RowError(f"{field}[{i}] has role {role!r}; expected system (first), user or assistant")
        if i and messages[i - 1]["role"] == role:
            raise RowError(f"{field}[{i}] is a second {role} turn in a row; expected user and assistant turns to alternate")


# --- the prompt's first token: the same for training and sampling -------------------------------------

def ensure_chat_template(tokenizer) -> None:
    """The tokenizer's own chat template, or DEFAULT_CHAT_TEMPLATE when it has none (a base model)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def leading_bos(tokenizer, text: str, chat: bool) -> list[int]:
    """[bos] before the tokens of `text`, or [] when the tokenizer has no bos or the chat template wrote it itself
    (Llama-2's, the shipped tiny model's): a conversation starts with exactly one bos whatever the template."""
    template_has_bos = chat and bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not template_has_bos else []


def prompt_token_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """The ids a sampler feeds for a prompt `text`, as training starts a row: leading_bos, then the text tokenized
    without the tokenizer's own special tokens (data.tokenize_row builds its rows the same way)."""
    return leading_bos(tokenizer, text, chat) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
