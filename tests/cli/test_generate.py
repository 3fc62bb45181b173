"""launch/generate.py: base + MSPLoRA adapter, prompt formatted as in training, response only, greedy at
temperature 0 (deterministic), seeded sampling otherwise, one-line errors.

A tiny seeded Llama with a character-level tokenizer is saved into a tmp dir; its adapter has random A and B.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    from msplora_dist.cli.generate import format_prompt

    chat_text, special = format_prompt(tokenizer, "hi there", chat=True)
    messages = [{"role": "user", "content": "hi there"}]
    assert special is False and chat_text == tokenizer.apply_chat_template(
        messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert chat_text.startswith("<|user|>\nhi there") and chat_text.endswith("<|assistant|>\n")
    text, special = format_prompt(tokenizer, "Sort these.", input="b a", chat=False)
    assert (text, special) == (alpaca_prompt("Sort these.", "b a"), True)

    rc, out, err = _run(module, capfd, "--model", base, "--adapter", adapter, "--prompt", "hi there", "--chat",
                        "--temperature", "0", "--max_new_tokens", "10")
    assert rc == 0, err
    model = load_adapter(load(base), adapter)
    assert out == greedy(model, tokenizer, chat_text, 10, add_special_tokens=False) + "\n"

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
