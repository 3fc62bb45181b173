"""Shared fixtures: seeded tiny LLaMA-family models built from configs (no hub, no files), seeded inputs,
and helpers that give adapters non-zero values (B starts at zero, which would hide most bugs).

Every model is fp32, eager attention, eval mode, with grouped-query attention
(num_key_value_heads < num_attention_heads) so k_proj/v_proj are narrower than q_proj.
"""

from __future__ import annotations

import os

import pytest
import torch

from msplora_dist.dist.process import shutdown_distributed

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHS = ("llama", "mistral", "qwen2")

TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=64,
            max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _build_tiny(arch: str = "llama", *, num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised (seeded) tiny causal LM of family `arch`, in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    values = dict(TINY, num_hidden_layers=num_layers)
    values.update(overrides)
    config = config_cls(**values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # The default init (std 0.02) makes every projection tiny; a wider one gives the comparisons teeth.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:  # norms and biases
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


@pytest.fixture
def make_model():
    """Factory: make_model(arch="llama", num_layers=4, seed=0, dtype=torch.float32, **config_overrides)."""
    return _build_tiny


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_llama():
    return _build_tiny("llama", num_layers=4)


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, TINY["vocab_size"], (2, 7), generator=g)


def _randomize_adapters(model, seed: int = 1, std: float = 0.1) -> None:
    """Give every adapter tensor (A and B, every level) seeded random values."""
    from msplora_dist import get_hierarchy

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(get_hierarchy(model).named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


@pytest.fixture
def randomize_adapters():
    """Factory: randomize_adapters(model, seed=1, std=0.1) fills every A and B with seeded noise."""
    return _randomize_adapters


# The in-process trainer tests (tests/train, tests/cli, ...) share one process group: DeepSpeed keeps its
# communication backend for the life of the process, so a group destroyed after one test module could not be
# started again for the next. It is shut down (with the CPU all-reduce segments it leaves in /dev/shm) once, at
# the end of the session.
@pytest.fixture(scope="session", autouse=True)
def _process_group_for_the_session():
    yield
    shutdown_distributed()
