"""The speed paths: fused kernels from Liger Kernel, and regional torch.compile of the decoder layers.

Liger Kernel (an optional dependency, `pip install liger-kernel`), used automatically on CUDA: RMSNorm, RoPE,
SwiGLU and the fused linear cross-entropy, which never materialises the (tokens x vocab) logits. Measured on one
H200 (7B shape, 4-bit, 4 x 2048 tokens, checkpointing), our layers alone ran 8,975 tokens/s at 9.17 GB and with
Liger 11,406 at 7.60 GB (docs/benchmarks.md). Liger patches the model classes of transformers through its public
apply_liger_kernel_to_* functions, so it must run before the model is built. Its fused loss runs only when the
model computes the loss from `labels` (in training mode), and it reads lm_head.weight directly: under ZeRO-3 the
trainer registers that weight with the root module so that it is gathered for the forward
(dist.zero.register_lm_head_with_zero3).

Regional compilation (`--compile_layers`): each decoder layer's forward runs through torch.compile, one compiled
graph reused by every layer (they share one code object and, with dynamo's default inline_inbuilt_nn_modules, their
parameters are graph inputs rather than constants), so the compile time is one layer's whatever the depth. `layer.
compile()` on every layer measured 9,449 tokens/s against 8,975 on the shape above (+5%). What is compiled, and why:
- The layer's own forward, not nn.Module's _call_impl (which `module.compile()`, accelerate's compile_regions and
  DeepSpeed's engine.compile() compile): the module hooks stay eager, outside the graph. ZeRO-3 hooks every module
  (its pre-forward hook is @torch.compiler.disable, a graph break; its post-forward hook mutates module globals),
  and under --zero3_leaf_layers they fetch the whole layer before its forward, so inside the forward every weight
  is materialised. DeepSpeed 0.19.8's engine.compile() compiles the whole module (compile time grows with depth) and
  its DeepCompile passes (z1/z3 in the graph) are CUDA-only and replace ZeRO's hooks for a whole-model graph: not
  the regional compile that measured well here.
- Inside the gradient checkpoint: checkpoint(compiled_forward) (non-reentrant, as the trainer requires, since the
  shared adapters are used by many layers), so the recomputation in backward runs the same compiled graph, and
  checkpoint's own RNG stash and restore gives the recomputation the dropout masks of the forward. Compiling outside
  it would hand the checkpoint to dynamo's activation-checkpoint operator, which refuses forward side effects and
  would recompute (or keep) dropout by its own rules.
- How it is installed: each layer's class becomes a subclass whose forward is the compiled one (the way FSDP2's
  fully_shard swaps a module's class; instances keep their state and hooks). transformers 5.17's
  GradientCheckpointingLayer checkpoints in __call__, which then reaches the compiled forward; later versions wrap
  `forward` itself at class level (__init_subclass__), and wrap the subclass's forward too, so the checkpoint calls
  the compiled function in both. What is compiled is the layer's forward without transformers' checkpointing
  wrapper: dynamo sees through functools.wraps to the parent's wrapper and would take it for the outermost one,
  checkpointing a second time inside the graph.
- Shapes: dynamo's automatic dynamic shapes. The first graph is specialised to its shapes; the first batch of
  another length (unpacked batches vary, packed rows too, up to max_seq_len) recompiles once with that dimension
  symbolic, and no later length recompiles. Evaluation (no grad, eval mode) adds its own one or two, and without
  checkpointing the first layer (whose input does not require grad) its own: a handful of graphs, under dynamo's
  default recompile_limit of 8 (past it dynamo runs the layer eagerly, with a warning: slower, never wrong).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import nn

from msplora_dist.adapters.inject import find_decoder_layers
from msplora_dist.errors import ConfigError
from msplora_dist.train.config import AUTO_TRUE_FALSE

LIGER_SETTINGS = AUTO_TRUE_FALSE
# model_type -> Liger's public patch function for that family.
LIGER_PATCHES = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
                 "qwen2": "apply_liger_kernel_to_qwen2", "qwen3": "apply_liger_kernel_to_qwen3"}
COMPILE_BACKEND_ENV = "MSPLORA_COMPILE_BACKEND"
"""Internal, for the tests: the torch.compile backend of --compile_layers (default inductor). The CPU tests use
aot_eager: the same dynamo graph and autograd split as inductor, without inductor's code generation."""


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


def apply_liger(model_type: str, *, layers_compiled: bool = False) -> None:
    """Patch transformers' classes of `model_type` with Liger's kernels. Call before the model is built.

    layers_compiled: the decoder layers run compiled (--compile_layers), so only the fused linear cross-entropy is
    patched; it runs in the model's head, outside the compiled layers. Inside them inductor fuses RMSNorm, RoPE and
    SiLU-times-up itself, and Liger's Triton autograd functions do not trace: its SwiGLU stopped dynamo with an
    assertion in LigerSiLUMulFunction (on the H200, torch 2.11), transformers' kernels integration found its RMSNorm
    wrong under compile and keeps its fused loss behind a graph break (transformers PR 46039), and compiled, its
    SwiGLU ran 3x slower than inductor's SiLU-times-up (Liger issue 1330)."""
    module = importlib.import_module("liger_kernel.transformers")
    patch = getattr(module, LIGER_PATCHES[model_type])
    fused = not layers_compiled
    patch(rope=fused, rms_norm=fused, swiglu=fused, cross_entropy=False, fused_linear_cross_entropy=True)


def liger_feature(layers_compiled: bool) -> str:
    """How the run's speed features name the Liger kernels that apply_liger patched."""
    return "Liger fused linear cross-entropy" if layers_compiled else "Liger kernels"


def resolve_compile(setting: str, on_gpu: bool, zero_stage: int, zero3_leaf_layers: bool) -> bool:
    """Whether this run compiles its decoder layers. auto: on CUDA, at ZeRO stage 1 or 2 (a ZeRO-3 config on one GPU
    runs stage 2: dist/ds_config.py), where it was measured on the GPU; true: always, and ZeRO-3 needs
    --zero3_leaf_layers true (without it ZeRO-3 hooks every projection and norm inside the layer: a graph break at
    each); false: never. Under ZeRO-3 (several ranks) compiled layers are tested on CPU only, so auto leaves them off
    there until a several-GPU measurement says they pay. The setting was validated by TrainConfig."""
    if setting == "false":
        return False
    if setting == "auto":
        return on_gpu and zero_stage != 3
    if zero_stage == 3 and not zero3_leaf_layers:
        raise ConfigError("--compile_layers true under ZeRO-3 needs --zero3_leaf_layers true (ZeRO-3 would otherwise hook "
                          "every projection inside the compiled layer); expected --zero3_leaf_layers true or "
                          "--compile_layers false")
    return True


def compile_decoder_layers(model: nn.Module, backend=None) -> str:
    """Make every decoder layer of `model` run its forward compiled (module docstring), in place; returns the
    backend's name. backend: a torch.compile backend (a name or a callable); default: $MSPLORA_COMPILE_BACKEND, else
    inductor. Layers that already run compiled are left as they are."""
    backend = backend or os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    _, layers = find_decoder_layers(model)
    for layer in layers:
        if not getattr(type(layer), "_msplora_compiled", False):
            layer.__class__ = _compiled_class(type(layer), backend)
    return backend if isinstance(backend, str) else type(backend).__name__


_COMPILED_CLASSES: dict[tuple, type] = {}
"""(layer class, backend) -> its compiled subclass: one compiled function, so one dynamo cache, for every model of
the process (a test that builds several models compiles once)."""


def _compiled_class(cls: type, backend) -> type:
    key = (cls, backend)
    if key not in _COMPILED_CLASSES:
        forward = torch.compile(_unwrapped_forward(cls), backend=backend)
        _COMPILED_CLASSES[key] = type(f"Compiled{cls.__name__}", (cls,), {
            "forward": forward, "_msplora_compiled": True, "__module__": cls.__module__, "__qualname__": f"Compiled{cls.__qualname__}"})
    return _COMPILED_CLASSES[key]


def _unwrapped_forward(cls: type):
    """cls.forward without the checkpointing wrapper that transformers (after 5.17) puts on the forward of every
    GradientCheckpointingLayer subclass. The wrapper is recognised by its code object, read off a probe subclass,
    and unwrapped once (its functools.wraps __wrapped__): decorators of the layer's own forward stay."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    def forward(self):
        return None

    probe = type("_Probe", (GradientCheckpointingLayer,), {"forward": forward})
    wrapper_code = probe.forward.__code__
    if wrapper_code is not forward.__code__ and cls.forward.__code__ is wrapper_code:
        return cls.forward.__wrapped__
    return cls.forward
