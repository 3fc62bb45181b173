"""The benchmark's shapes and models: random-weight Llamas built from a LlamaConfig (nothing from the hub), directly
in bf16 on the device, with every decoder-layer projection a bitsandbytes NF4 Linear4bit (double quantization, bf16
compute and storage): what transformers builds for `--load_in_4bit true` (msplora_dist/train/backbone.py)."""

from __future__ import annotations

import contextlib
import gc
import platform

import torch
import torch.nn.functional as F
from torch import nn

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEAK_TFLOPS = 790.0  # bf16 dense matrix rate measured on this workplace's H200

SHAPES = {
    # Llama-2-7B: 6.74 B parameters.
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, batch=4, seq=2048),
    # TinyLlama-1.1B: 1.10 B parameters, grouped-query attention.
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, batch=8, seq=2048),
    # CPU smoke test: the same code paths in a second or so.
    "smoke": dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, batch=2, seq=32),
}
# MSPLoRA ranks with the trainable parameter count of LoRA r=16 on all 7 targets: r_G + G r_M + L r_L = 16 L.
MATCHED_RANKS = {"7b": (48, 16, 13), "1b": (40, 16, 12), "smoke": (16, 8, 6)}


def log(msg: str) -> None:
    print(msg, flush=True)


def llama_config(shape: dict):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
                      num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
                      max_position_embeddings=max(shape["seq"], 2048), rms_norm_eps=1e-5, tie_word_embeddings=False,
                      use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg._attn_implementation = "sdpa"
    return cfg


def param_count(shape: dict) -> int:
    """Parameters of the bf16 Llama (embeddings, lm_head and norms included)."""
    h, i, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return L * per_layer + 2 * v * h + h


def build_model(shape: dict, device: torch.device, *, quantize: bool = True, dtype=torch.bfloat16):
    """A random-weight Llama of this shape in `dtype` on `device`; its decoder projections NF4 Linear4bit."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    if quantize:
        quantize_4bit_(model, dtype, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def quantize_4bit_(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every nn.Linear of the decoder layers by bnb's Linear4bit (NF4, double quantization, compute and
    storage dtype `dtype`), quantizing the existing weights; the model then looks like from_pretrained's."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4", quant_storage=dtype, device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", quant_storage=dtype, module=q)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            q = q.to(device)  # quantizes
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, q)
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its bnb 4-bit LoRA layer


def enable_checkpointing(model, reentrant: bool = False) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def peft_lora(model, r: int, targets, dropout: float, *, adapter_dtype: torch.dtype | None, alpha: int = 16):
    """PEFT LoRA r on `targets` of a frozen model; returns (model, trainable parameters). adapter_dtype None: PEFT's
    default (fp32 adapters on a bf16 base); else the adapter tensors are cast to it (bf16: the tuned recipe)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype is None)
    params = [p for p in model.parameters() if p.requires_grad]
    if adapter_dtype is not None:
        for p in params:
            p.data = p.data.to(adapter_dtype)
    return model, params


def loss_fn(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean shifted token cross-entropy in fp32 (the trainer's loss_sum, averaged)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    for mod in ("transformers", "peft", "bitsandbytes", "deepspeed"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
