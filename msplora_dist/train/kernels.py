"""Fused kernels from Liger Kernel (an optional dependency, `pip install liger-kernel`), used automatically on
CUDA: RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy, which never materialises the (tokens x vocab)
logits. Measured on one H200 (7B shape, 4-bit, 4 x 2048 tokens, checkpointing), our layers alone ran 8,975
tokens/s at 9.17 GB and with Liger 11,406 at 7.60 GB (docs/benchmarks.md).

Liger patches the model classes of transformers through its public apply_liger_kernel_to_* functions, so it
must run before the model is built. Its fused loss runs only when the model computes the loss from `labels`
(in training mode), and it reads lm_head.weight directly: under ZeRO-3 the trainer registers that weight with
the root module so that it is gathered for the forward (dist.zero.register_lm_head_with_zero3).
"""

from __future__ import annotations

import importlib
import importlib.util

from msplora_dist.errors import ConfigError

LIGER_SETTINGS = ("auto", "true", "false")
# model_type -> Liger's public patch function for that family.
LIGER_PATCHES = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
                 "qwen2": "apply_liger_kernel_to_qwen2", "qwen3": "apply_liger_kernel_to_qwen3"}


def resolve_liger(setting: str, model_type: str, on_gpu: bool) -> bool:
    """Whether this run uses Liger. auto: on CUDA, when liger-kernel is installed and supports the model family;
    true: the same conditions are required (a one-line error says which one is missing); false: never."""
    if setting not in LIGER_SETTINGS:
        raise ConfigError(f"--liger {setting!r}: expected one of {', '.join(LIGER_SETTINGS)}")
    if setting == "false":
        return False
    missing = None
    if not on_gpu:
        missing = "a CUDA GPU (its kernels are Triton)"
    elif model_type not in LIGER_PATCHES:
        missing = f"a model family it patches ({', '.join(LIGER_PATCHES)}; this model is {model_type!r})"
    elif importlib.util.find_spec("liger_kernel") is None:
        missing = "the liger-kernel package (pip install liger-kernel)"
    if missing and setting == "true":
        raise ConfigError(f"--liger true needs {missing}; expected --liger auto or false here")
    return missing is None


def apply_liger(model_type: str) -> None:
    """Patch transformers' classes of `model_type` with Liger's kernels. Call before the model is built."""
    module = importlib.import_module("liger_kernel.transformers")
    patch = getattr(module, LIGER_PATCHES[model_type])
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
