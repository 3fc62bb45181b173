"""Loading the frozen backbone and its tokenizer from a local Hugging Face directory.

bf16/fp32 under ZeRO-3 load straight into partitions (HfDeepSpeedConfig makes from_pretrained run
under deepspeed.zero.Init), so no rank ever holds the whole model. A 4-bit backbone is quantized by
transformers while loading (NF4, double quantization) with its packed storage in the compute dtype, a
floating-point tensor that ZeRO-3 can partition; each rank holds the 4-bit model briefly before
deepspeed.initialize partitions it (transformers does not quantize under zero.Init).

A GGUF file (or a directory holding one .gguf) is a base too: msplora_dist.train.gguf reads its config,
tokenizer and weights, unpacked to the run's dtype. transformers loads a GGUF outside zero.Init (as a
4-bit model), so under ZeRO-3 each rank holds it whole until deepspeed.initialize partitions it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from msplora_dist.errors import ConfigError
from msplora_dist.train import gguf

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def check_model_dir(path: str | Path) -> dict:
    """The model's config.json (a GGUF base: its config read from the file), after checking the directory is a
    complete LLaMA-family checkpoint: its config holds the fields the preflight reads, and every weight file it
    needs is there and whole (a safetensors file's size against its own header, without reading the weights)."""
    path = Path(path)
    gguf_file = gguf.find_gguf(path)
    if gguf_file is not None:
        return check_llama_family(gguf_file, gguf.read_config(gguf_file))
    if not path.is_dir():
        raise ConfigError(f"--model {str(path)!r} is not a directory; expected a local Hugging Face model directory "
                          f"or a {gguf.SUFFIX} file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--model {str(path)!r} has no config.json; expected a Hugging Face model directory (save_pretrained)")
    hf_config = check_llama_family(config_file, _read_json_object(config_file))
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise ConfigError(f"--model {str(path)!r} has no weights (*.safetensors or pytorch_model*.bin)")
    for index in path.glob("*.index.json"):
        weight_map = _read_json_object(index).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{str(index)!r}: 'weight_map' is a {type(weight_map).__name__}; expected a mapping of "
                              "tensor names to shard files")
        missing = sorted(s for s in set(map(str, weight_map.values())) if not (path / s).is_file())
        if missing:
            raise ConfigError(f"--model {str(path)!r} is missing weight shards {missing[:3]} listed in {index.name}")
    for shard in sorted(path.glob("*.safetensors")):
        check_safetensors_file(shard)
    return hf_config


def _read_json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(file)!r} is not valid JSON ({err}); expected a JSON object") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{str(file)!r} holds a JSON {type(value).__name__}; expected a JSON object")
    return value


# The fields of config.json the preflight reads before the model is loaded (projection_features, the adapter
# groups, the resume signature): name -> required. A missing optional one has a standard default.
CONFIG_INTS = {"hidden_size": True, "num_hidden_layers": True, "num_attention_heads": True, "intermediate_size": True,
               "num_key_value_heads": False, "head_dim": False}


def check_llama_family(file: Path, hf_config: dict) -> dict:
    """hf_config (read from `file`), after checking it is a LLaMA-family config with the fields the preflight reads."""
    model_type = hf_config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise ConfigError(f"--model {str(file.parent if file.name == 'config.json' else file)!r} is a {model_type!r} "
                          f"model; expected a LLaMA-family model_type, one of {list(LLAMA_FAMILY)}")
    for name, required in CONFIG_INTS.items():
        value = hf_config.get(name)
        if value is None and not required:
            continue
        if value is None:
            raise ConfigError(f"{str(file)!r} has no {name!r}; expected a positive integer there (a {model_type} config)")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{str(file)!r} has {name}={value!r}; expected a positive integer")
    return hf_config


def check_safetensors_file(file: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range, then the bytes:
    a file cut short (an interrupted download or copy) is shorter than its header says. Reads the header only."""
    size = file.stat().st_size
    problem = None
    with open(file, "rb") as fh:
        head = fh.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else None
        if header_len is None or 8 + header_len > size:
            problem = f"its header is cut short ({size} bytes)"
        else:
            try:
                header = json.loads(fh.read(header_len))
                ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, IndexError, TypeError, ValueError):
                problem = "its header is not a safetensors header"
            else:
                expected = 8 + header_len + max(ends, default=0)
                if size != expected:
                    problem = f"it has {size} bytes, its header describes {expected}"
    if problem:
        raise ConfigError(f"weights {str(file)!r} are incomplete or corrupt: {problem}; expected a whole safetensors "
                          "file (download or copy it again)")


# A tokenizer's vocabulary is in one of these (tokenizers' JSON, SentencePiece, BPE, WordPiece, tiktoken).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")


def load_tokenizer(path: str | Path):
    """The tokenizer of a model directory or GGUF file (pad set, no length warning), or a one-line ConfigError."""
    from transformers import AutoTokenizer

    gguf_file = gguf.find_gguf(path)
    if gguf_file is not None:
        tokenizer = gguf.load_tokenizer(gguf_file)
    else:
        path = Path(path)
        if path.is_dir() and not any(any(path.glob(pattern)) for pattern in TOKENIZER_VOCAB_FILES):
            # transformers would guess a tokenizer class from config.json and fail in five lines about sentencepiece
            raise ConfigError(f"--model {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_VOCAB_FILES)}); "
                              "expected the tokenizer saved beside the model (tokenizer.save_pretrained(DIR))")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"--model {str(path)!r}: no usable tokenizer ({err})") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {str(path)!r} has no eos token; expected one, so the model learns to stop")
    # The trainer truncates to its own max_seq_len after tokenizing; the tokenizer's limit would only
    # print a warning per long row.
    tokenizer.model_max_length = 10**9
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except (ImportError, RuntimeError) as err:
        raise ConfigError(f"--load_in_4bit needs a working bitsandbytes ({err}); expected `pip install bitsandbytes`") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def load_backbone(path: str | Path, *, dtype: str, load_in_4bit: bool, ds_config: dict | None,
                  gradient_checkpointing: bool, attn_implementation: str | None = None):
    """The frozen model. ds_config with ZeRO stage 3 (and not 4-bit) loads it partitioned."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    gguf_file = gguf.find_gguf(path)
    if gguf_file is not None and load_in_4bit:
        raise gguf_4bit_refused(gguf_file)
    torch_dtype = DTYPES[dtype]
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    zero3 = ds_config is not None and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
    hf_ds_config = None  # transformers holds it by weak reference: this name keeps it alive while loading
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(torch_dtype)
    elif zero3 and gguf_file is None:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = gguf.load_model(gguf_file, **kwargs) if gguf_file else AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    del hf_ds_config
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant: reentrant checkpointing fires a shared parameter's gradient hook once per
        # segment, and ZeRO asserts (DeepSpeed issue 988).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def gguf_4bit_refused(file: Path) -> ConfigError:
    # transformers refuses a quantization_config beside a gguf_file, and quantizing the unpacked model
    # afterwards would hold it whole in the compute dtype first: a converted directory loads 4-bit directly.
    return ConfigError(f"--load_in_4bit with the GGUF base {str(file)!r}: transformers cannot quantize a GGUF while loading it; "
                       f"convert it once (python launch/convert_gguf.py --gguf {str(file)!r} --out DIR) and pass --model DIR")


def projection_features(hf_config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LLaMA-family projection, from config.json alone, so the
    DeepSpeed config can be completed before the model is loaded."""
    hidden = hf_config["hidden_size"]
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or hidden // heads
    inter = hf_config["intermediate_size"]
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def set_eval_mode(model: torch.nn.Module) -> None:
    """model.eval(), except that 4-bit base layers stay in training mode. On a CPU with AVX512-BF16,
    bitsandbytes' Linear4bit repacks its weight in place on its first eval-mode forward: that rewrites
    a ZeRO-3 partitioned tensor behind DeepSpeed's back, and asserts for out_features not divisible
    by 32. Linear4bit has no other train/eval difference, so its outputs are the same either way."""
    model.eval()
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.train()
