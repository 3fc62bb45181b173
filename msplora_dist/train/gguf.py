"""GGUF bases: one .gguf file (llama.cpp's format, e.g. a Q4_1 SmolLM2) as the frozen backbone.

transformers reads a GGUF through `from_pretrained(directory, gguf_file=name)`, for the config, the
tokenizer (rebuilt from the file's tokenizer metadata) and the model. For the LLaMA family it unpacks every
tensor with the `gguf` package (and needs `accelerate`): `pip install 'msplora_dist[gguf]'`. The model it
returns is a plain dense one in the dtype asked for; only its config still carries a GgufConfig, which is
why save_pretrained refuses it, and why `plain_model` rebuilds it from a config without one.

A `--model` names a GGUF base either as the file itself or as a directory that holds exactly one .gguf and
no config.json (a directory with a config.json is a Hugging Face directory, whatever else it holds).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import struct
from pathlib import Path

import torch

from msplora_dist.adapters.export import first_line
from msplora_dist.errors import ConfigError
from msplora_dist.utils.fileio import sha256_file, write_dir_atomically

SUFFIX = ".gguf"
SOURCE_RECORD = "gguf_source.json"  # written by convert_gguf beside the converted model
NEEDED_PACKAGES = ("gguf", "accelerate")


def find_gguf(path: str | os.PathLike, flag: str = "--model") -> Path | None:
    """The GGUF file `path` names (the file, or the one .gguf of a directory without config.json), else None."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX:
        if not path.is_file():
            raise ConfigError(f"{flag} {str(path)!r} does not exist or is not a file; expected a .gguf file")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        raise ConfigError(f"{flag} {str(path)!r} holds {len(found)} .gguf files {[p.name for p in found[:4]]}; "
                          "expected one: pass the file itself")
    return found[0] if found else None


def source(file: Path) -> tuple[str, dict]:
    """(directory, kwargs) for transformers' from_pretrained of a GGUF file."""
    return str(file.parent), {"gguf_file": file.name}


def _require_packages(file: Path, flag: str) -> None:
    missing = [p for p in NEEDED_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"{flag} {str(file)!r} is a GGUF file, and reading it needs the {' and '.join(missing)} "
                          "package(s); expected `pip install 'msplora_dist[gguf]'`")


# What transformers raises on a file that is not a GGUF, is cut short, or holds an architecture it cannot
# read (a ValueError for a bad magic or an unknown architecture, struct.error or IndexError for a short file).
_READ_ERRORS = (OSError, ValueError, KeyError, IndexError, EOFError, TypeError, NotImplementedError, struct.error)


@functools.lru_cache(maxsize=4)
def _config_dict(file: str, mtime_ns: int, size: int) -> dict:
    # Cached per file version: the preflight and the loader both ask, and parsing the header of a 100 MB
    # file takes seconds on a small CPU.
    from transformers import AutoConfig

    directory, kwargs = source(Path(file))
    config = AutoConfig.from_pretrained(directory, **kwargs).to_dict()
    config.pop("quantization_config", None)
    return config


def read_config(file: Path, flag: str = "--model") -> dict:
    """The model config of a GGUF file as config.json would hold it, with a one-line error for a bad file."""
    _require_packages(file, flag)
    stat = file.stat()
    try:
        return dict(_config_dict(str(file.resolve()), stat.st_mtime_ns, stat.st_size))
    except _READ_ERRORS as err:
        raise ConfigError(f"{flag} {str(file)!r} is not a readable GGUF model ({first_line(err)}); "
                          "expected a complete .gguf file of a model transformers supports") from None


def load_tokenizer(file: Path, flag: str = "--model"):
    """The tokenizer transformers rebuilds from the file's metadata."""
    from transformers import AutoTokenizer

    _require_packages(file, flag)
    directory, kwargs = source(file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except _READ_ERRORS as err:
        raise ConfigError(f"{flag} {str(file)!r}: no usable tokenizer in the GGUF metadata ({first_line(err)})") from None
    # transformers names the tokenizer after the directory; the file itself is what the tokenized cache must key on
    # (two GGUFs of one folder can have tokenizers of the same class, size and special tokens: cache.py).
    tokenizer.name_or_path = str(file)
    return tokenizer


def load_kwargs(file: Path) -> dict:
    """Extra from_pretrained kwargs: the file, and every weight unpacked to a dense tensor. Recent
    transformers can keep GGUF blocks packed (GgufLinear) when a matmul kernel is installed; the adapters
    wrap plain Linear layers and ZeRO partitions floating-point tensors, so the dense model is asked for."""
    import transformers

    kwargs = source(file)[1]
    gguf_config = getattr(transformers, "GgufConfig", None)  # transformers releases before 2026 always unpack
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    return kwargs


def load_model(file: Path, dtype: torch.dtype, flag: str = "--model", **kwargs):
    """The causal LM of a GGUF file, unpacked to `dtype` (kwargs go to from_pretrained)."""
    from transformers import AutoModelForCausalLM

    _require_packages(file, flag)
    try:
        return AutoModelForCausalLM.from_pretrained(source(file)[0], dtype=dtype, **load_kwargs(file), **kwargs)
    except _READ_ERRORS as err:
        raise ConfigError(f"{flag} {str(file)!r}: cannot load the GGUF model ({first_line(err)})") from None


def plain_model(model):
    """The same model without its GgufConfig, so save_pretrained accepts it: built from the config,
    then given the GGUF model's state dict (every key must match)."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(model.parameters()).dtype
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def check_convert_out(out: Path, file: Path, overwrite: bool) -> None:
    """--out must not be the input's directory and, if it exists, is empty, an earlier conversion, or --overwrite."""
    if out.resolve() == file.parent.resolve() or out.resolve() in file.resolve().parents:
        raise ConfigError(f"--out {str(out)!r} would replace the directory of --gguf {str(file)!r}; expected a separate directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not (out / SOURCE_RECORD).is_file() and not overwrite:
            raise ConfigError(f"--out {str(out)!r} is a non-empty directory that holds no earlier conversion ({SOURCE_RECORD}); "
                              "choose a new path or pass --overwrite to replace it")


CONVERT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def convert(gguf: str | os.PathLike, out: str | os.PathLike, dtype: str = "bf16", *, overwrite: bool = False) -> dict:
    """Write the GGUF model as a plain Hugging Face directory (config, safetensors, tokenizer, generation
    config, and SOURCE_RECORD naming the file and its sha256), atomically. Returns that record."""
    if dtype not in CONVERT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(CONVERT_DTYPES)}")
    file = find_gguf(gguf, "--gguf")
    if file is None:
        raise ConfigError(f"--gguf {str(gguf)!r} is neither a .gguf file nor a directory holding one; expected a .gguf file")
    out = Path(out)
    check_convert_out(out, file, overwrite)
    read_config(file, "--gguf")
    tokenizer = load_tokenizer(file, "--gguf")
    model = plain_model(load_model(file, CONVERT_DTYPES[dtype], "--gguf"))
    record = {"gguf_file": file.name, "sha256": sha256_file(file), "bytes": file.stat().st_size, "dtype": dtype,
              "parameters": sum(p.numel() for p in model.parameters())}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    write_dir_atomically(out, write)
    return record

