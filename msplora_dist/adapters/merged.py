"""Merge an MSPLoRA adapter into its base model: the base is loaded (a bitsandbytes 4-bit base dequantized),
the adapter is loaded with load_adapter, every update is folded into its weight in fp32, and the plain model
is saved in the chosen dtype with the base's tokenizer, atomically (utils.fileio.write_dir_atomically).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from msplora_dist.adapters.export import (
    DTYPES,
    REPORT_NAME,
    ExportReport,
    _base_config,
    _check_out,
    _readable_modes,
    first_line,
    refuse_gguf,
    resolve_base,
)
from msplora_dist.adapters.inject import merge_and_unload
from msplora_dist.adapters.io import load_adapter, read_adapter_config
from msplora_dist.errors import CheckpointError, ConfigError
from msplora_dist.utils.fileio import write_dir_atomically


def _is_prequantized(base: Path) -> bool:
    """Whether the checkpoint files of `base` hold bitsandbytes-packed weights (rather than the original
    floating-point ones, which a quantization_config in config.json would quantize at load time)."""
    from safetensors import safe_open

    index = base / "model.safetensors.index.json"
    if index.is_file():
        keys = list(json.loads(index.read_text()).get("weight_map", {}))
    else:
        files = sorted(base.glob("*.safetensors"))
        if not files:
            return True  # .bin checkpoints: let transformers load them as the config says, then dequantize
        keys = []
        for f in files:
            with safe_open(f, "pt") as fh:
                keys.extend(fh.keys())
    return any(".quant_state." in k or k.endswith(".absmax") or k.endswith(".SCB") for k in keys)


def load_base_model(base_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32, *, dequantize: bool = True,
                    dequantize_dtype: torch.dtype = torch.float32, device: str | None = None):
    """(model, was_dequantized) of a local Hugging Face causal-LM directory, in eval mode, with clear errors.
    dtype: a torch dtype, or "auto" for the checkpoint's own.

    A bitsandbytes-quantized base (quantization_config in config.json) with dequantize=True: when its files
    hold the original floating-point weights, those are loaded without quantizing; when they hold packed
    4-bit (or 8-bit) weights, the model is loaded quantized and dequantized to `dequantize_dtype`."""
    from transformers import AutoModelForCausalLM

    base = Path(base_dir)
    config = _base_config(base)
    quantized = getattr(config, "quantization_config", None) is not None
    kwargs = {"dtype": dtype}
    if device is not None:
        kwargs["device_map"] = device
    was_dequantized = False
    try:
        if quantized and dequantize:
            if _is_prequantized(base):
                model = AutoModelForCausalLM.from_pretrained(base, device_map=device or "cpu", dtype=dequantize_dtype)
                model = model.dequantize(dtype=dequantize_dtype)
                was_dequantized = True
            else:
                del config.quantization_config
                model = AutoModelForCausalLM.from_pretrained(base, config=config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise CheckpointError(f"cannot load base model {str(base)!r}: {first_line(err)}") from None
    return model.eval(), was_dequantized


def _checkpoint_dtype(base: Path) -> torch.dtype | None:
    """The floating-point dtype config.json declares for the weights (transformers writes `dtype`, older
    versions `torch_dtype`), or None."""
    config = _base_config(base)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else None


def _precheck_base(meta: dict, base: Path) -> None:
    """The adapter's signature against the base's config.json, before loading any weight."""
    config = _base_config(base)
    saved = meta.get("signature", {})
    if saved.get("hidden_size") is not None and getattr(config, "hidden_size", None) is not None \
            and saved["hidden_size"] != config.hidden_size:
        raise CheckpointError(
            f"the adapter was trained on a model with hidden_size={saved['hidden_size']}; base {str(base)!r} has "
            f"hidden_size={config.hidden_size}"
        )
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and saved.get("num_layers") is not None and saved["num_layers"] != layers:
        raise CheckpointError(
            f"the adapter was trained on a model with num_layers={saved['num_layers']}; base {str(base)!r} has num_layers={layers}"
        )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _save_tokenizer(base: Path, out: Path) -> bool:
    present = [f for f in _TOKENIZER_FILES if (base / f).is_file()]
    if not present:
        return False
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    except (OSError, ValueError, KeyError, ImportError, TypeError):
        for f in present:  # a tokenizer this transformers cannot load: copy its files verbatim
            shutil.copy2(base / f, out / f)
    return True


def export_merged(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: str = "bf16", *, overwrite: bool = False) -> ExportReport:
    """Load the base, load the adapter, fold every update into its weight (in fp32), and save the plain
    model in `dtype` (bf16, fp16 or fp32) with the base's tokenizer to `out_dir`."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    base_dir, why_none = resolve_base(adapter_dir, base_dir)
    if base_dir is None:
        raise ConfigError(f"--format merged needs --base MODEL_DIR, the base model the adapter was trained on "
                          f"({why_none or 'this adapter does not record it'})")
    base = Path(base_dir)
    out = _check_out(out_dir, [adapter_dir, base_dir], overwrite)
    _, meta = read_adapter_config(adapter_dir)
    refuse_gguf(base)
    if not base.is_dir():
        raise CheckpointError(f"base model directory {str(base)!r} does not exist; expected a local Hugging Face model directory")
    _precheck_base(meta, base)

    torch_dtype = DTYPES[dtype]
    # Each weight must be rounded once, after the fp32 merge. merge() writes W0 + delta back in the weight's own
    # dtype, so the base is loaded in the output dtype when its checkpoint already has it (a bf16 export of a
    # bf16 checkpoint stays bf16 in memory) and in fp32 otherwise (an fp32 export of a bf16 checkpoint must not
    # pass through bf16). A packed 4-bit base is dequantized to the output dtype.
    load_dtype = torch_dtype if _checkpoint_dtype(base) == torch_dtype else torch.float32
    model, dequantized = load_base_model(base, load_dtype, dequantize_dtype=torch_dtype)
    model = load_adapter(model, adapter_dir)
    with torch.no_grad():
        model = merge_and_unload(model)
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    report = ExportReport(format="merged", out_dir=str(out), adapter_dir=str(adapter_dir), base=str(base), dtype=dtype,
                          dequantized=dequantized)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        report.tokenizer = _save_tokenizer(base, tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        _readable_modes(tmp)

    write_dir_atomically(out, write)
    return report
