"""Export an MSPLoRA adapter for serving: as a plain PEFT LoRA (what vLLM, PEFT, TGI, llama.cpp's
converter load) or merged into the base model's weights.

Plain LoRA (see docs/method.md, "Export to a plain LoRA"): per layer l and target t the three levels
concatenate exactly into one LoRA of rank r = r_G + r_M + r_L (levels of rank 0 are absent):

    A = [A_G; A_M; A_L]                (r, in)
    B = [s_G B_G, s_M B_M, s_L B_L]     (out, r)      lora_alpha = r, so PEFT's scale alpha / r is 1

computed in fp32 from the saved tensors alone (no model needed). With max_rank K < r each layer's update
B A is replaced by its best rank-K approximation (truncated SVD, Eckart-Young), and the relative Frobenius
error ||B A - B' A'||_F / ||B A||_F of every layer and target is reported and written to export_report.json.

Merged (into the base weights): merged.py.

Every output directory is written atomically (utils.fileio.write_dir_atomically): a failure part-way leaves
nothing at the output path, and an existing output directory is replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from msplora_dist.adapters.config import LEVELS, MSPLoRAConfig, group_of_layer
from msplora_dist.adapters.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_adapter_config,
    read_adapter_weights,
)
from msplora_dist.adapters.serving import serving_commands
from msplora_dist.errors import CheckpointError, ConfigError
from msplora_dist.utils.fileio import write_dir_atomically

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for max_lora_rank; an adapter of rank r needs one >= r."""

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "export_report.json"
FORMATS = ("peft", "merged")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

LLAMA_LAYERS_PATH = "model.layers"
"""Where LlamaForCausalLM (and Mistral, Qwen2, ...) keep their decoder layers."""
LLAMA_MODULE_PATHS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}
"""Target name -> its path inside one decoder layer, for the Llama layout (used without a base model)."""

PEFT_KEY = "base_model.model.{layers}.{layer}.{module}.{ab}.weight"

# ------------------------------------------------------------------------------------------- vLLM


def vllm_max_lora_rank(r: int) -> int:
    """The smallest value vLLM accepts for max_lora_rank that fits a LoRA of rank r."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"LoRA rank {r!r}: expected an integer >= 1")
    for k in VLLM_MAX_LORA_RANKS:
        if k >= r:
            return k
    raise ConfigError(
        f"the exported LoRA would have rank {r}; vLLM accepts at most max_lora_rank={VLLM_MAX_LORA_RANKS[-1]}: "
        f"pass --max_rank {VLLM_MAX_LORA_RANKS[-1]} (or lower) to truncate it by SVD and see the error per layer"
    )


def resolve_base(adapter_dir: str | os.PathLike, base: str | os.PathLike | None) -> tuple[str | None, str | None]:
    """(base to use, why none): `base` when given; otherwise the base_model the trainer recorded in the adapter's
    msplora_config.json when it is a directory here (else None, with the reason when one was recorded)."""
    if base is not None:
        return str(base), None
    _, meta = read_adapter_config(adapter_dir)
    recorded = meta.get("base_model")
    if recorded is None:
        return None, None
    refuse_gguf(Path(recorded))  # trained on a GGUF: serving and merging want its converted directory
    if Path(recorded).is_dir():
        return str(recorded), None
    return None, f"the adapter records its base model as {recorded!r}, which is not a directory here"


# ---------------------------------------------------------------------------- reading an adapter


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[MSPLoRAConfig, dict, dict[str, torch.Tensor]]:
    """(config with explicit groups, metadata, tensors) of a saved adapter, every tensor checked against the
    config: expected keys, shapes, floating point and finite. Raises CheckpointError otherwise."""
    path = Path(adapter_dir)
    config, meta = read_adapter_config(path)
    num_layers = meta["num_layers"]
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise CheckpointError(f"{str(path / CONFIG_NAME)!r}: num_layers={num_layers!r}; expected an integer >= 1")
    try:
        config = config.with_groups(num_layers)
    except ConfigError as err:
        raise CheckpointError(f"{str(path / CONFIG_NAME)!r}: {err}") from None
    features = _saved_features(meta, config, path)

    weights_file = path / WEIGHTS_NAME
    state = read_adapter_weights(path, meta)

    expected = _expected_shapes(config, num_layers, features)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{str(weights_file)!r}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{str(weights_file)!r}: {key} has shape {tuple(tensor.shape)}; expected {shape}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{str(weights_file)!r}: {key} has dtype {tensor.dtype}; expected floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{str(weights_file)!r}: {key} holds NaN or infinite values")
    return config, meta, state


def _saved_features(meta: dict, config: MSPLoRAConfig, path: Path) -> dict[str, tuple[int, int]]:
    signature = meta.get("signature")
    saved = signature.get("features") if isinstance(signature, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{str(path / CONFIG_NAME)!r}: signature.features is missing; expected (in, out) per target")
    features = {}
    for t in config.target_modules:
        feats = saved.get(t)
        if not (isinstance(feats, list | tuple) and len(feats) == 2 and all(isinstance(v, int) and v > 0 for v in feats)):
            raise CheckpointError(f"{str(path / CONFIG_NAME)!r}: signature.features[{t!r}]={feats!r}; expected [in_features, out_features]")
        features[t] = (int(feats[0]), int(feats[1]))
    return features


def _level_keys(config: MSPLoRAConfig, num_layers: int, layer: int, target: str) -> list[tuple[int, str]]:
    """(level index, checkpoint key prefix) of each active level that layer `layer`'s `target` uses."""
    keys = []
    for level, rank in enumerate(config.ranks):
        if rank == 0:
            continue
        if LEVELS[level] == "global":
            keys.append((level, f"global.{target}"))
        elif LEVELS[level] == "mid":
            keys.append((level, f"mid.{group_of_layer(config.groups, layer)}.{target}"))
        else:
            keys.append((level, f"layer.{layer}.{target}"))
    return keys


def _expected_shapes(config: MSPLoRAConfig, num_layers: int, features: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    expected = {}
    for layer in range(num_layers):
        for t in config.target_modules:
            in_f, out_f = features[t]
            for level, prefix in _level_keys(config, num_layers, layer, t):
                expected[f"{prefix}.lora_A"] = (config.ranks[level], in_f)
                expected[f"{prefix}.lora_B"] = (out_f, config.ranks[level])
    return expected


# ------------------------------------------------------------------------------ the plain LoRA math


def plain_lora_tensors(config: MSPLoRAConfig, state: dict[str, torch.Tensor], num_layers: int
                       ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, target): (A, B)} of the equivalent plain LoRA with scale 1, in fp32:
    A = [A_G; A_M; A_L] (r, in), B = [s_G B_G, s_M B_M, s_L B_L] (out, r), r = sum of the non-zero ranks.
    `state` holds the checkpoint keys (global.{t}.lora_A, mid.{g}.{t}.lora_B, layer.{l}.{t}.lora_A, ...)."""
    config = config.with_groups(num_layers)
    out = {}
    for layer in range(num_layers):
        for t in config.target_modules:
            levels = _level_keys(config, num_layers, layer, t)
            A = torch.cat([state[f"{prefix}.lora_A"].float() for _, prefix in levels], dim=0)
            B = torch.cat([state[f"{prefix}.lora_B"].float() * config.scale(level) for level, prefix in levels], dim=1)
            out[(layer, t)] = (A.contiguous(), B.contiguous())
    return out


def plain_lora_from_model(model) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """plain_lora_tensors of a live model's adapters."""
    from msplora_dist.adapters.inject import get_hierarchy
    from msplora_dist.adapters.io import adapter_state_dict

    h = get_hierarchy(model)
    return plain_lora_tensors(h.config, adapter_state_dict(model), h.num_layers)


def truncate_lora(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A', B', relative error) with B' A' the best rank-`rank` approximation of B A (in Frobenius norm)
    and error ||B A - B' A'||_F / ||B A||_F (0 for a zero update). A' = sqrt(S) Vh, B' = U sqrt(S).

    Computed in float64 without forming the (out, in) matrix: B = Qb Rb, A^T = Qa Ra, so
    B A = Qb (Rb Ra^T) Qa^T and the SVD of the small core gives that of B A. A rank of r or more returns
    A, B unchanged (exact). Fewer non-zero singular values than `rank` are padded with zero rows/columns,
    so every layer of an export has the same rank."""
    r = A.shape[0]
    if rank >= r:
        return A, B, 0.0
    Qb, Rb = torch.linalg.qr(B.double())          # (out, p), (p, r)
    Qa, Ra = torch.linalg.qr(A.double().T)        # (in, q), (q, r)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (p, q)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B_new = torch.zeros(B.shape[0], rank, dtype=torch.float64)
    A_new = torch.zeros(rank, A.shape[1], dtype=torch.float64)
    B_new[:, :k] = (Qb @ U[:, :k]) * root
    A_new[:k] = root[:, None] * (Vh[:k] @ Qa.T)
    total = float(S.square().sum())
    error = math.sqrt(float(S[k:].square().sum()) / total) if total > 0 else 0.0
    return A_new.float().contiguous(), B_new.float().contiguous(), error


# ------------------------------------------------------------------------- module paths of the base


def module_paths(targets, base: str | os.PathLike | None = None, signature: dict | None = None
                 ) -> tuple[str, dict[str, str]]:
    """(path of the decoder-layer list, {target: path inside a layer}) for PEFT's key names.

    Without a base: the Llama layout (model.layers, self_attn.q_proj, mlp.gate_proj, ...). With a base
    model directory: read from that model's structure (built on the meta device, no weights loaded), and
    `signature` (the adapter's) is checked against it."""
    if base is None:
        unknown = [t for t in targets if t not in LLAMA_MODULE_PATHS]
        if unknown:
            raise ConfigError(
                f"target modules {unknown} have no known path in the Llama layout; pass --base MODEL_DIR so the "
                "paths are read from the base model"
            )
        return LLAMA_LAYERS_PATH, {t: LLAMA_MODULE_PATHS[t] for t in targets}

    from msplora_dist.adapters.inject import find_decoder_layers

    model = _meta_model(base)
    layers_path, layers = find_decoder_layers(model, tuple(targets))
    paths, features = {}, {}
    for t in targets:
        found = [(name, m) for name, m in layers[0].named_modules() if name.split(".")[-1] == t]
        if len(found) != 1:
            raise CheckpointError(
                f"target module {t!r} matches {[n for n, _ in found] or 'nothing'} in a decoder layer of base {str(base)!r}; "
                "expected exactly one (is this the model the adapter was trained on?)"
            )
        paths[t] = found[0][0]
        features[t] = [int(getattr(found[0][1], "in_features", -1)), int(getattr(found[0][1], "out_features", -1))]
    if signature is not None:
        ours = {"model_type": getattr(model.config, "model_type", None), "hidden_size": getattr(model.config, "hidden_size", None),
                "num_layers": len(layers)}
        _check_signature(signature, ours, features, base)
    return layers_path, paths


def _check_signature(saved: dict, ours: dict, features: dict[str, list[int]], base) -> None:
    for key in ("model_type", "hidden_size", "num_layers"):
        if saved.get(key) != ours.get(key):
            raise CheckpointError(
                f"the adapter was trained on a model with {key}={saved.get(key)!r}; base {str(base)!r} has {key}={ours.get(key)!r}"
            )
    for t, feats in features.items():
        theirs = saved.get("features", {}).get(t)
        if theirs is not None and list(theirs) != list(feats):
            raise CheckpointError(
                f"the adapter's target {t!r} has (in, out) features {list(theirs)}; base {str(base)!r} has {list(feats)}"
            )


def refuse_gguf(path: Path) -> None:
    """Training reads a GGUF base (msplora_dist.train.gguf); merging and serving want a plain directory."""
    if path.suffix.lower() == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        raise CheckpointError(f"base model {str(path)!r} is a GGUF model; convert it once (python launch/convert_gguf.py "
                              f"--gguf {str(path)!r} --out DIR), which gives the same logits, and pass DIR")


def _base_config(base: str | os.PathLike):
    from transformers import AutoConfig

    path = Path(base)
    if not (path / "config.json").is_file():
        refuse_gguf(path)
        raise CheckpointError(f"base model {str(path)!r} has no config.json; expected a local Hugging Face model directory")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read the config of base model {str(path)!r}: {first_line(err)}") from None


def _meta_model(base: str | os.PathLike):
    from transformers import AutoModelForCausalLM

    config = _base_config(base)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot build base model {str(base)!r} as a causal LM: {first_line(err)}") from None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------ output paths


def _check_out(out_dir: str | os.PathLike, inputs: list, overwrite: bool) -> Path:
    """Refuse an output path that would replace an input, or a non-empty directory that holds no
    previous export (unless overwrite): write_dir_atomically replaces the whole directory."""
    out = Path(out_dir)
    resolved = out.resolve()
    for p in inputs:
        if p is None:
            continue
        src = Path(p).resolve()
        if resolved == src or resolved in src.parents:
            raise ConfigError(f"--out {str(out)!r} would replace the input {str(p)!r}; expected a separate directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not (out / REPORT_NAME).is_file() and not overwrite:
            raise ConfigError(
                f"--out {str(out)!r} is a non-empty directory that holds no previous export ({REPORT_NAME}); "
                "choose a new path or pass --overwrite to replace it"
            )
    return out


def _readable_modes(tmp: Path) -> None:
    """The modes a plain mkdir/open would give (umask applied): mkdtemp makes the directory 0700 and some
    writers make 0600 files, which a server running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for f in tmp.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


# ------------------------------------------------------------------------------------- PEFT export


@dataclass
class ExportReport:
    """What an export wrote; to_dict() is export_report.json."""

    format: str
    out_dir: str
    adapter_dir: str
    base: str | None = None
    rank: int | None = None
    """The exported LoRA's rank (peft)."""
    source_rank: int | None = None
    """r_G + r_M + r_L of the MSPLoRA adapter."""
    max_rank: int | None = None
    exact: bool = True
    vllm_max_lora_rank: int | None = None
    relative_errors: dict[str, list[float]] = field(default_factory=dict)
    """{target: [relative Frobenius error of layer 0, layer 1, ...]} (0 where exact)."""
    max_error: float = 0.0
    max_error_at: tuple[int, str] | None = None
    """(layer, target) of max_error."""
    dtype: str | None = None
    """(merged) the saved dtype."""
    dequantized: bool = False
    """(merged) the base was a bitsandbytes 4-bit checkpoint and was dequantized."""
    tokenizer: bool = False
    """(merged) the base's tokenizer was saved beside the model."""
    note: str | None = None
    """Printed before the serving commands (a recorded base that is not here)."""

    _PEFT_ONLY = ("rank", "source_rank", "max_rank", "exact", "vllm_max_lora_rank", "relative_errors", "max_error", "max_error_at")
    _MERGED_ONLY = ("dtype", "dequantized", "tokenizer")

    def to_dict(self) -> dict:
        skip = self._MERGED_ONLY if self.format == "peft" else self._PEFT_ONLY
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        if "max_error_at" in d:
            d["max_error_at"] = None if self.max_error_at is None else {"layer": self.max_error_at[0], "target": self.max_error_at[1]}
        return d

    def serving_commands(self) -> str:
        if self.format == "peft":
            return serving_commands(self.out_dir, self.vllm_max_lora_rank, self.base)
        path = str(Path(self.out_dir).resolve())
        return "\n".join(["vLLM, offline:", f"    llm = LLM(model={path!r})", "vLLM, OpenAI-compatible server:",
                          f"    python -m vllm.entrypoints.openai.api_server --model {shlex.quote(path)}"])

    def __str__(self) -> str:
        lines = []
        if self.format == "peft":
            how = "exact concatenation" if self.exact else f"truncated SVD to rank {self.rank}"
            lines.append(f"exported a PEFT LoRA of rank {self.rank} (MSPLoRA ranks sum to {self.source_rank}; {how}) to {self.out_dir}")
            if not self.exact:
                targets = list(self.relative_errors)
                width = max(9, *(len(t) + 1 for t in targets))
                lines.append("relative Frobenius error ||BA - B'A'||_F / ||BA||_F per layer and target:")
                lines.append("  layer" + "".join(f"{t:>{width}}" for t in targets))
                for layer in range(len(self.relative_errors[targets[0]])):
                    lines.append(f"  {layer:>5}" + "".join(f"{self.relative_errors[t][layer]:>{width}.2e}" for t in targets))
                at = self.max_error_at
                lines.append(f"largest relative error: {self.max_error:.3e} (layer {at[0]}, {at[1]})")
            lines.append(f"vLLM max_lora_rank: {self.vllm_max_lora_rank}")
        else:
            extra = " (4-bit base dequantized)" if self.dequantized else ""
            lines.append(f"exported the merged model in {self.dtype}{extra} to {self.out_dir}")
            if not self.tokenizer:
                lines.append("note: the base has no tokenizer files; none was saved")
        if self.note:
            lines.append(self.note)
        lines.append(self.serving_commands())
        return "\n".join(lines)


def peft_adapter_config(rank: int, target_modules, base: str | None = None) -> dict:
    """adapter_config.json in PEFT's LoRA schema: scale lora_alpha / r = 1, nothing vLLM rejects
    (no modules_to_save, no DoRA, no bias)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "exclude_modules": None,
        "lora_bias": False,
        "revision": None,
    }


def export_peft(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | os.PathLike | None = None,
                max_rank: int | None = None, *, overwrite: bool = False) -> ExportReport:
    """Write the adapter as a plain PEFT LoRA to `out_dir` (adapter_config.json, adapter_model.safetensors,
    export_report.json). max_rank: truncate each layer's update by SVD to at most that rank. base: the base
    model directory; None takes the one the trainer recorded in the adapter (resolve_base)."""
    if max_rank is not None and (not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1):
        raise ConfigError(f"--max_rank {max_rank!r}: expected an integer >= 1")
    if max_rank is not None and max_rank > VLLM_MAX_LORA_RANKS[-1]:
        raise ConfigError(f"--max_rank {max_rank}: vLLM accepts at most max_lora_rank={VLLM_MAX_LORA_RANKS[-1]}; expected <= 512")
    base, why_none = resolve_base(adapter_dir, base)
    note = None if why_none is None else f"note: {why_none}; pass --base MODEL_DIR to check the adapter against it and to print it below"
    out = _check_out(out_dir, [adapter_dir, base], overwrite)
    config, meta, state = read_adapter(adapter_dir)
    num_layers = meta["num_layers"]
    source_rank = config.total_rank
    rank = source_rank if max_rank is None else min(max_rank, source_rank)
    vllm_rank = vllm_max_lora_rank(rank)
    layers_path, paths = module_paths(config.target_modules, base, meta["signature"] if base is not None else None)

    weights, errors = {}, {t: [0.0] * num_layers for t in config.target_modules}
    for (layer, t), (A, B) in plain_lora_tensors(config, state, num_layers).items():
        if rank < source_rank:
            A, B, errors[t][layer] = truncate_lora(A, B, rank)
        for ab, tensor in (("lora_A", A), ("lora_B", B)):
            weights[PEFT_KEY.format(layers=layers_path, layer=layer, module=paths[t], ab=ab)] = tensor.contiguous()
    max_error, at = max(((e, (layer, t)) for t, errs in errors.items() for layer, e in enumerate(errs)), key=lambda x: x[0])
    report = ExportReport(
        format="peft", out_dir=str(out), adapter_dir=str(adapter_dir), base=None if base is None else str(base),
        rank=rank, source_rank=source_rank, max_rank=max_rank, exact=rank >= source_rank, vllm_max_lora_rank=vllm_rank,
        relative_errors=errors, max_error=max_error, max_error_at=at if rank < source_rank else None, note=note,
    )

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(weights, tmp / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
        config_json = peft_adapter_config(rank, config.target_modules, report.base)
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(config_json, indent=2) + "\n")
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        _readable_modes(tmp)

    write_dir_atomically(out, write)
    return report
