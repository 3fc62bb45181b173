"""launch/generate.py: base + MSPLoRA adapter, prompt formatted as in training, response only, greedy at
temperature 0 (deterministic), seeded sampling otherwise, one-line errors.

A tiny seeded Llama with a character-level tokenizer is saved into a tmp dir; its adapter has random A and B.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msplora_dist import load_adapter
from msplora_dist.train.prompts import DEFAULT_CHAT_TEMPLATE, alpaca_prompt
from tests.char_tokenizer import char_tokenizer

REPO = Path(__file__).resolve().parents[2]
GENERATE_SCRIPT = REPO / "launch" / "generate.py"

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=3)


def save_base(path: Path, *, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def greedy(model, tokenizer, text: str, n: int, add_special_tokens: bool = True) -> str:
    """Reference greedy decoding without generate(): argmax of the full forward, token by token."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"]
    start = ids.shape[1]
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.item() == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def _main():
    from msplora_dist.cli import generate

    return generate


def _run(module, capfd, *args) -> tuple[int, str, str]:
    capfd.readouterr()
    try:
        rc = module.main([str(a) for a in args])
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capfd.readouterr()
    return rc, out, err


def test_script_prints_the_greedy_response_and_the_same_one_twice(tiny, capfd, quiet_transformers):
    from transformers import AutoTokenizer

    base, adapter = tiny
    args = ["--model", base, "--adapter", adapter, "--prompt", "Name a color.", "--temperature", "0", "--max_new_tokens", "12"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # tiny models: threads only contend
    proc = subprocess.Popen([sys.executable, str(GENERATE_SCRIPT), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    module = _main()  # meanwhile, the same main() twice in this process
    in_process = [_run(module, capfd, *args) for _ in range(2)]
    rc, stdout, stderr = proc.wait(timeout=120), *proc.communicate()
    assert rc == 0, stderr
    assert all(r == (0, stdout, "") for r in in_process), "greedy decoding must be deterministic"

    tokenizer = AutoTokenizer.from_pretrained(base)
    expected = greedy(load_adapter(load(base), adapter), tokenizer, alpaca_prompt("Name a color."), 12)
    assert expected.strip(), "the reference response is empty; pick another seed"
    assert stdout == expected + "\n", "the script prints the response only, as greedy decoding gives it"
    without = greedy(load(base), tokenizer, alpaca_prompt("Name a color."), 12)
    assert without != expected, "the adapter should change the greedy response of this model"


def test_chat_prompt_and_seeded_sampling(tiny, capfd, quiet_transformers):
    from transformers import AutoTokenizer

    base, adapter = tiny
    module = _main()
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.chat_template is None  # so DEFAULT_CHAT_TEMPLATE is used
    chat_ids = module.format_prompt(tokenizer, "hi there", chat=True)
    messages = [{"role": "user", "content": "hi there"}]
    chat_text = tokenizer.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True,
                                              tokenize=False)
    assert chat_text.startswith("<|user|>\nhi there") and chat_text.endswith("<|assistant|>\n")
    # One bos first, as training writes it before a chat row of a template that writes none.
    assert chat_ids == [tokenizer.bos_token_id, *tokenizer(chat_text, add_special_tokens=False)["input_ids"]]
    ids = module.format_prompt(tokenizer, "Sort these.", input="b a", chat=False)
    assert ids == tokenizer(alpaca_prompt("Sort these.", "b a"))["input_ids"]

    rc, out, err = _run(module, capfd, "--model", base, "--adapter", adapter, "--prompt", "hi there", "--chat",
                        "--temperature", "0", "--max_new_tokens", "10")
    assert rc == 0, err
    model = load_adapter(load(base), adapter)
    assert out == greedy(model, tokenizer, chat_text, 10) + "\n"

    sampled = [_run(module, capfd, "--model", base, "--adapter", adapter, "--prompt", "hi", "--temperature", "1.0",
                    "--top_p", "0.95", "--seed", str(seed), "--max_new_tokens", "16")[1] for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1], "the same seed must give the same sample"
    assert sampled[0] != sampled[2], "another seed should give another sample"


def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capfd, quiet_transformers):
    base, adapter = tiny
    other = save_base(tmp_path / "other", hidden_size=48)
    module = _main()
    cases = {
        "no_model": (["--model", tmp_path / "nowhere", "--prompt", "x"], "config.json"),
        "other_base": (["--model", other, "--adapter", adapter, "--prompt", "x"], "hidden_size"),
        "no_adapter": (["--model", base, "--adapter", tmp_path / "nothing", "--prompt", "x"], "does not exist"),
        "temperature": (["--model", base, "--prompt", "x", "--temperature", "-1"], "--temperature"),
        "no_prompt": (["--model", base], "--prompt"),
    }
    for name, (args, expected) in cases.items():
        rc, _, err = _run(module, capfd, *args)
        lines = err.strip().splitlines()
        assert rc == 2, f"{name}: exit {rc}: {err}"
        assert "Traceback" not in err and len(lines) == 1, f"{name}: {err!r}"
        assert lines[0].startswith("error: ") and expected in lines[0], f"{name}: {err!r}"


def _training_prompt_ids(tokenizer, row: dict, fmt: str) -> list[int]:
    """The ids a training row has before its first loss token: what the model saw before the response."""
    from msplora_dist.train.data import IGNORE_INDEX, tokenize_row
    from msplora_dist.train.prompts import ensure_chat_template

    ensure_chat_template(tokenizer)  # as the preflight does before any row is tokenized
    ex = tokenize_row(row, fmt, tokenizer, 512, train_on_prompt=False)
    first = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
    return ex["input_ids"][:first]


@pytest.mark.parametrize("which", ["char, no template", "tiny llama, its template (writes bos)", "tiny llama, no template"])
def test_sampling_prompts_are_the_token_ids_training_rows_start_with(which):
    from transformers import AutoTokenizer

    from msplora_dist.cli.generate import format_prompt
    from msplora_dist.train.config import ASSETS

    tokenizer = char_tokenizer() if which.startswith("char") else AutoTokenizer.from_pretrained(ASSETS / "tiny_llama")
    if "no template" in which:
        tokenizer.chat_template = None
    if "writes bos" in which:
        assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith(tokenizer.bos_token)
    system, user = "Answer briefly.", "What is two and two?"
    chat = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": "Four."}]}
    trained = _training_prompt_ids(tokenizer, chat, "chat")
    assert trained.count(tokenizer.bos_token_id) == 1 and trained[0] == tokenizer.bos_token_id
    assert format_prompt(tokenizer, user, chat=True, system=system) == trained
    alpaca = {"instruction": "Sort these.", "input": "b a", "output": "a b"}
    assert format_prompt(tokenizer, "Sort these.", input="b a") == _training_prompt_ids(tokenizer, alpaca, "alpaca")
