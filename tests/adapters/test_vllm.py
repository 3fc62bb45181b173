"""vLLM serves the default run's export with PEFT's greedy tokens (vLLM's CPU build, `pip install -e ".[serve]"`).

Skipped where vllm is not importable. The default run (the shipped tiny model and data, its own defaults but
fewer steps) is trained through DeepSpeed, exported with no --base (the adapter records it), then vLLM and
PEFT decode the same held-out prompts greedily in fp32 and must produce the same tokens. vLLM runs in its own
interpreter: it starts its engine in a spawned process, which needs a main module of its own.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from msplora_dist.train.config import ASSETS
from msplora_dist.train.prompts import alpaca_prompt
from tests.launch_utils import REPO, run_train, subprocess_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed (the [serve] extra)")]

MAX_TOKENS = 16

VLLM_SCRIPT = '''
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

if __name__ == "__main__":
    base, lora_dir, rank, prompts_file = sys.argv[1:5]
    prompts = json.load(open(prompts_file))
    # fp32 and eager: the comparison with PEFT is exact; a fixed small KV cache, not 92% of the machine's memory.
    llm = LLM(model=base, enable_lora=True, max_lora_rank=int(rank), dtype="float32", enforce_eager=True,
              max_model_len=256, kv_cache_memory_bytes=2**28, seed=0)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    # Two calls, never one batch mixing LoRA and no-LoRA requests: vLLM's CPU LoRA op gives the no-LoRA ones the
    # last-loaded adapter (upstream bug, vLLM PR 48421; docs/export.md).
    lora = llm.generate(prompts, params, lora_request=LoRARequest("adapter", 1, lora_dir))
    plain = llm.generate(prompts, params)
    print("RESULT " + json.dumps({"lora": [list(o.outputs[0].token_ids) for o in lora],
                                  "base": [list(o.outputs[0].token_ids) for o in plain]}))
'''.replace("MAX_TOKENS", str(MAX_TOKENS))


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def _hf_greedy(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    out = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


def test_vllm_serves_the_default_runs_export_with_pefts_greedy_tokens(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msplora_dist.adapters.export import export_peft

    run = tmp_path / "run"
    run_train(run, "--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--max_steps", "60", "--eval_steps", "0",
              "--analyze", "false")
    report = export_peft(run / "adapter", tmp_path / "peft")  # no base given: the adapter records the shipped model
    base = ASSETS / "tiny_llama"
    assert report.base == str(base.resolve())

    rows = [json.loads(line) for line in (ASSETS / "data" / "instructions.jsonl").read_text().splitlines()[:8]]
    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in rows]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (tmp_path / "serve.py").write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "serve.py"), str(base), str(tmp_path / "peft"),
                           str(report.vllm_max_lora_rank), str(tmp_path / "prompts.json")],
                          env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"vLLM failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    served = json.loads(lines[0][len("RESULT "):])

    tokenizer = AutoTokenizer.from_pretrained(base)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_tokens = _hf_greedy(plain, tokenizer, prompts)
    peft_tokens = _hf_greedy(PeftModel.from_pretrained(plain, tmp_path / "peft").eval(), tokenizer, prompts)

    eos = tokenizer.eos_token_id
    for name, ours, theirs in (("adapter", peft_tokens, served["lora"]), ("base", base_tokens, served["base"])):
        for prompt, a, b in zip(prompts, ours, theirs, strict=True):
            assert _strip_eos(a, eos) == _strip_eos(b, eos), (f"{name}: vLLM and transformers differ on {prompt!r}: "
                                                              f"{tokenizer.decode(b)!r} vs {tokenizer.decode(a)!r}")
    # The adapter is really applied: trained for 60 steps, it changes what the base says.
    assert sum(a != b for a, b in zip(peft_tokens, base_tokens, strict=True)) >= len(prompts) // 2
