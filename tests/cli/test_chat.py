"""launch/chat.py: turns read from stdin, replies streamed piece by piece, the conversation as the next turn's
context in the training template, /reset forgets it, and the same greedy replies as decoding by hand.

Reuses test_generate's tiny seeded Llama (character-level tokenizer) and its random adapter.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from msplora_dist import load_adapter
from msplora_dist.cli import chat
from msplora_dist.train.prompts import DEFAULT_CHAT_TEMPLATE, alpaca_prompt
from tests.cli.test_generate import REPO, greedy, load

N = 10  # new tokens per reply


class Recorder(io.StringIO):
    """stdout that remembers each write, to see the reply arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def _ids_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    import torch

    x = torch.tensor([ids])
    start = x.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(x).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
            if nxt.item() == eos:
                break
    return x[0, start:].tolist()


def test_alpaca_history_is_rendered_as_training_rows(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny[0])
    first = chat.render(tokenizer, [], "Name a color.")
    assert first == tokenizer(alpaca_prompt("Name a color."))["input_ids"]  # <s> + prompt, as generate.py prompts
    second = chat.render(tokenizer, [("Name a color.", "red")], "And another?")
    row = [tokenizer.bos_token_id, *tokenizer(alpaca_prompt("Name a color.") + "red", add_special_tokens=False)["input_ids"],
           tokenizer.eos_token_id]
    assert second == row + tokenizer(alpaca_prompt("And another?"))["input_ids"]

    ids = chat.render(tokenizer, [("hi", "hello")], "bye", template="chat", system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    text = tokenizer.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    # One bos first, as training starts a chat row whose template writes none (prompts.prompt_token_ids).
    assert tokenizer.decode(ids) == tokenizer.bos_token + text and text.endswith("<|assistant|>\n")


def test_chat_streams_greedy_replies_keeps_history_and_resets(tiny, quiet_transformers):
    from transformers import AutoTokenizer

    base, adapter = tiny
    stdin = io.StringIO("Name a color.\nName a color.\n\n/reset\nName a color.\n/exit\nnever read\n")
    stdout = Recorder()
    rc = chat.main(["--model", str(base), "--adapter", str(adapter), "--max_new_tokens", str(N)], stdin=stdin, stdout=stdout)
    assert rc == 0
    replies = stdout.getvalue().splitlines()

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_adapter(load(base), adapter)
    eos = tokenizer.eos_token_id
    first_ids = _ids_greedy(model, chat.render(tokenizer, [], "Name a color."), N, eos)
    first = tokenizer.decode(first_ids, skip_special_tokens=True)
    assert first.strip(), "the reference reply is empty; pick another seed"
    second = tokenizer.decode(_ids_greedy(model, chat.render(tokenizer, [("Name a color.", first.strip())], "Name a color."), N, eos),
                              skip_special_tokens=True)
    assert first == greedy(model, tokenizer, alpaca_prompt("Name a color."), N)  # the first turn is generate.py's prompt
    assert replies == [first, second, "(conversation reset)", first], stdout.getvalue()
    assert second != first, "the second turn should see the first (the history changes this model's reply)"
    streamed = [w for w in stdout.writes if w and w != "\n"]
    assert len(streamed) > 3, f"the replies should arrive in pieces, got {stdout.writes}"
    assert stdin.readline() == "never read\n", "/exit stops reading"


def test_chat_script_from_stdin_and_bad_input(tiny, tmp_path):
    base, adapter = tiny
    script = REPO / "launch" / "chat.py"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([sys.executable, str(script), "--model", str(base), "--adapter", str(adapter), "--max_new_tokens", "4"],
                        input="hi\n", capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 1 and ok.stderr == "", (ok.stdout, ok.stderr)
    bad = subprocess.run([sys.executable, str(script), "--adapter", str(tmp_path / "nowhere")], input="hi\n",
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert "does not exist" in bad.stderr


@pytest.mark.parametrize("args, expected", [(["--system", "x"], "--template chat"), (["--top_p", "0"], "--top_p")])
def test_bad_flags_are_one_line_and_exit_2(tiny, capsys, args, expected):
    base, adapter = tiny
    assert chat.main(["--model", str(base), "--adapter", str(adapter), *args], stdin=io.StringIO(""), stdout=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
