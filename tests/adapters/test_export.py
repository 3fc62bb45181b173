"""Export for serving (msplora_dist.adapters.export, launch/export.py): the PEFT export loaded by the real peft library
gives our model's logits (fp32 and 4-bit bases), the merged export loaded by AutoModelForCausalLM too, the
SVD truncation reports the error it really makes, and bad input gives one clean line, exit status 2 and
nothing at --out.

Tiny seeded Llama models (GQA, 3 layers) are saved into tmp dirs; adapters get random A and B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msplora_dist import CheckpointError, ConfigError, MSPLoRAConfig, apply_msplora, get_hierarchy, save_adapter
from msplora_dist.adapters.export import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    REPORT_NAME,
    VLLM_MAX_LORA_RANKS,
    export_peft,
    module_paths,
    plain_lora_from_model,
    truncate_lora,
    vllm_max_lora_rank,
)
from msplora_dist.adapters.io import CONFIG_NAME, WEIGHTS_NAME
from msplora_dist.adapters.layers import MSPLoRALinear
from msplora_dist.adapters.merged import export_merged
from tests.char_tokenizer import char_tokenizer

REPO = Path(__file__).resolve().parents[2]
EXPORT_SCRIPT = REPO / "launch" / "export.py"

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
# bitsandbytes' CPU kernels want in_features a multiple of the 64-element quantization block.
TINY_4BIT = dict(TINY, hidden_size=64, intermediate_size=128)
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_base(path: Path, *, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # wider than the default init, so the comparisons have teeth
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    if tokenizer:
        char_tokenizer().save_pretrained(path)
    return path


def _exact_4bit_path(model):
    """bitsandbytes' CPU inference kernel computes in bf16; its generic path (dequantize, fp32 matmul) is
    what dequantize() reproduces, so the 4-bit comparisons use it."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def load(path: Path, *, four_bit: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if four_bit:
        kwargs = dict(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32, **kwargs).eval()
    return _exact_4bit_path(model) if four_bit else model


def make_adapter(base: Path, adapter_dir: Path, config: MSPLoRAConfig, *, seed: int = 1, four_bit: bool = False):
    """Our model: base + MSPLoRA with seeded random A and B at every level, saved to adapter_dir."""
    model = apply_msplora(load(base, four_bit=four_bit), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(get_hierarchy(model).named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, adapter_dir)
    return model


@torch.no_grad()
def logits(model, x):
    return model(x).logits.float()


def max_rel_diff(a: torch.Tensor, reference: torch.Tensor) -> float:
    """max |a - reference| relative to the largest |reference| logit (fp32 rounding grows with the logits)."""
    return ((a - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="module")
def fp_base(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("fp_base") / "base")


@pytest.fixture(scope="module")
def all7(fp_base, tmp_path_factory):
    """(our model, adapter dir): all 7 targets, ranks (4, 2, 1), 2 mid groups."""
    adapter = tmp_path_factory.mktemp("all7") / "adapter"
    cfg = MSPLoRAConfig(ranks=(4, 2, 1), alphas=(8, 4, 2), num_mid_groups=2, target_modules=ALL7, dropout=0.0)
    return make_adapter(fp_base, adapter, cfg), adapter


# -------------------------------------------------------------------------------------- PEFT export

CONFIGS = {
    "all7": dict(ranks=(4, 2, 1), alphas=(8, 4, 2), num_mid_groups=2, target_modules=ALL7),
    "q_v": dict(ranks=(4, 2, 2), alphas=(16, 16, 16), num_mid_groups=3, target_modules=("q_proj", "v_proj")),
    "mid_off_rslora": dict(ranks=(4, 0, 2), alphas=(8, 16, 3), num_mid_groups=2, target_modules=ALL7, use_rslora=True),
    "global_off": dict(ranks=(0, 3, 1), alphas=(16, 5, 2), num_mid_groups=3, target_modules=("q_proj", "k_proj", "o_proj", "down_proj")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_library_loads_the_export_with_our_logits(name, fp_base, tmp_path, x):
    from peft import LoraConfig, PeftModel

    config = MSPLoRAConfig(**CONFIGS[name], dropout=0.0)
    ours = make_adapter(fp_base, tmp_path / "adapter", config)
    report = export_peft(tmp_path / "adapter", tmp_path / "peft")
    r = config.total_rank
    assert report.rank == r and report.exact and report.max_error == 0.0
    assert sorted(os.listdir(tmp_path / "peft")) == sorted([PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, REPORT_NAME])
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "peft").stat().st_mode & 0o777 == 0o777 & ~umask, "not mkdtemp's 0700: a server user must read it"

    lora_config = LoraConfig.from_pretrained(tmp_path / "peft")
    assert (lora_config.r, lora_config.lora_alpha, lora_config.use_rslora) == (r, r, False)
    assert set(lora_config.target_modules) == set(config.target_modules)
    assert lora_config.modules_to_save is None and not lora_config.use_dora

    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "peft" / PEFT_WEIGHTS_NAME))
    paths = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
    assert keys == {f"base_model.model.model.layers.{layer}.{paths[t]}.lora_{ab}.weight"
                    for layer in range(3) for t in config.target_modules for ab in "AB"}

    base_logits = logits(load(fp_base), x)
    peft_model = PeftModel.from_pretrained(load(fp_base), tmp_path / "peft").eval()
    ours_logits, peft_logits = logits(ours, x), logits(peft_model, x)
    assert (ours_logits - base_logits).abs().max() > 0.5, "the adapter must change the logits for the test to mean anything"
    diff = (peft_logits - ours_logits).abs().max().item()
    assert diff < 1e-5, f"{name}: PEFT's logits differ from ours by {diff}"


def test_plain_lora_is_the_msplora_update(all7):
    ours, _ = all7
    plain = plain_lora_from_model(ours)
    for module in ours.modules():
        if isinstance(module, MSPLoRALinear):
            A, B = plain[(module.layer_index, module.target)]
            torch.testing.assert_close(B @ A, module.delta_weight(torch.float32), atol=1e-6, rtol=1e-5)


def test_peft_export_on_a_4bit_base_matches_peft_on_that_base(tmp_path, x):
    from peft import PeftModel

    base = save_base(tmp_path / "base", tokenizer=False, **TINY_4BIT)
    config = MSPLoRAConfig(ranks=(4, 2, 1), num_mid_groups=2, target_modules=ALL7, dropout=0.0)
    ours = make_adapter(base, tmp_path / "adapter", config, four_bit=True)
    assert type(ours.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    peft_model = _exact_4bit_path(PeftModel.from_pretrained(load(base, four_bit=True), tmp_path / "peft").eval())
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    ours_logits = logits(ours, x)
    assert (ours_logits - logits(load(base, four_bit=True), x)).abs().max() > 0.5
    diff = (logits(peft_model, x) - ours_logits).abs().max().item()
    assert diff < 1e-4, f"PEFT on the 4-bit base differs from ours by {diff}"


def test_peft_export_with_base_reads_module_paths_and_checks_the_model(all7, fp_base, tmp_path):
    _, adapter = all7
    report = export_peft(adapter, tmp_path / "peft", base=fp_base)
    assert json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())["base_model_name_or_path"] == str(fp_base)
    assert module_paths(ALL7, fp_base) == module_paths(ALL7)  # read from the model == the Llama default
    assert str(fp_base) in report.serving_commands()

    other = save_base(tmp_path / "other", tokenizer=False, hidden_size=48)
    with pytest.raises(CheckpointError, match="hidden_size"):
        export_peft(adapter, tmp_path / "peft2", base=other)
    assert not (tmp_path / "peft2").exists()


# ------------------------------------------------------------------------------------- SVD truncation


def _read_pairs(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / PEFT_WEIGHTS_NAME)


def test_export_without_base_uses_the_base_the_adapter_records(all7, fp_base, tmp_path):
    ours, _ = all7
    save_adapter(ours, tmp_path / "adapter", base_model=fp_base)  # what the Trainer does with cfg.model
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["base_model"] == str(fp_base)
    report = export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert report.base == str(fp_base) and report.note is None
    assert json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())["base_model_name_or_path"] == str(fp_base)
    commands = report.serving_commands()
    assert "BASE_MODEL" not in commands and f"LLM(model={str(fp_base)!r}" in commands and f"--model {fp_base} " in commands
    merged = export_merged(tmp_path / "adapter", None, tmp_path / "merged", dtype="fp32")
    assert merged.base == str(fp_base)
    torch.testing.assert_close(logits(load(tmp_path / "merged"), torch.tensor([[5, 6, 7]])), logits(ours, torch.tensor([[5, 6, 7]])))

    # Recorded, but not here (the adapter was copied to another machine): the Llama layout, a note, a placeholder.
    save_adapter(ours, tmp_path / "moved", base_model=tmp_path / "gone")
    report = export_peft(tmp_path / "moved", tmp_path / "peft_moved")
    assert report.base is None and "BASE_MODEL" in report.serving_commands()
    assert str(tmp_path / "gone") in report.note and "--base" in report.note and report.note in str(report)
    with pytest.raises(ConfigError, match="not a directory here"):
        export_merged(tmp_path / "moved", None, tmp_path / "merged_moved")
    assert not (tmp_path / "merged_moved").exists()


def test_max_rank_at_or_above_the_total_rank_is_exact(all7, tmp_path):
    _, adapter = all7
    plain = _read_pairs(Path(export_peft(adapter, tmp_path / "plain").out_dir))
    for k in (7, 8, 100):
        report = export_peft(adapter, tmp_path / f"k{k}", max_rank=k)
        assert report.exact and report.rank == 7 and report.max_error == 0.0 and report.vllm_max_lora_rank == 8
        assert json.loads((tmp_path / f"k{k}" / PEFT_CONFIG_NAME).read_text())["r"] == 7
        got = _read_pairs(tmp_path / f"k{k}")
        assert got.keys() == plain.keys() and all(torch.equal(got[key], plain[key]) for key in plain)


def test_max_rank_below_reports_the_error_it_makes(all7, tmp_path):
    ours, adapter = all7
    k = 2
    report = export_peft(adapter, tmp_path / "k2", max_rank=k)
    assert not report.exact and report.rank == k and report.source_rank == 7 and report.vllm_max_lora_rank == 8
    written = json.loads((tmp_path / "k2" / REPORT_NAME).read_text())
    assert json.loads((tmp_path / "k2" / PEFT_CONFIG_NAME).read_text())["r"] == k
    tensors = _read_pairs(tmp_path / "k2")
    paths = module_paths(ALL7)[1]
    largest = 0.0
    for module in ours.modules():
        if not isinstance(module, MSPLoRALinear):
            continue
        layer, t = module.layer_index, module.target
        prefix = f"base_model.model.model.layers.{layer}.{paths[t]}"
        A, B = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        assert A.shape == (k, module.in_features) and B.shape == (module.out_features, k)
        delta = module.delta_weight(torch.float64)
        measured = (torch.linalg.norm(delta - B.double() @ A.double()) / torch.linalg.norm(delta)).item()
        s = torch.linalg.svdvals(delta)
        optimal = (s[k:].square().sum().sqrt() / s.square().sum().sqrt()).item()  # Eckart-Young
        assert report.relative_errors[t][layer] == pytest.approx(measured, abs=1e-6)
        assert measured == pytest.approx(optimal, abs=1e-6)
        assert written["relative_errors"][t][layer] == report.relative_errors[t][layer]
        largest = max(largest, measured)
    assert report.max_error == pytest.approx(largest, abs=1e-6) and report.max_error > 0.01
    at = written["max_error_at"]
    assert written["max_error"] == report.relative_errors[at["target"]][at["layer"]]
    assert "largest relative error" in str(report)


def test_truncation_pads_when_the_update_has_lower_rank_than_asked():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 3, generator=g), torch.randn(5, 6, generator=g)  # B A has rank <= 3
    A2, B2, err = truncate_lora(A, B, 4)
    assert A2.shape == (4, 3) and B2.shape == (5, 4) and err == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-5, rtol=1e-5)
    A0, B0, err0 = truncate_lora(torch.zeros(6, 3), torch.zeros(5, 6), 2)
    assert err0 == 0.0 and not A0.any() and not B0.any()


def test_vllm_max_lora_rank_picks_the_smallest_allowed_value():
    cases = {1: 1, 2: 8, 8: 8, 9: 16, 33: 64, 64: 64, 112: 128, 257: 320, 320: 320, 321: 512, 512: 512}
    for r, expected in cases.items():
        assert vllm_max_lora_rank(r) == expected
    for r in range(1, 513):
        k = vllm_max_lora_rank(r)
        assert k >= r and all(v < r for v in VLLM_MAX_LORA_RANKS if v < k)
    with pytest.raises(ConfigError, match="--max_rank"):
        vllm_max_lora_rank(513)


# ------------------------------------------------------------------------------------- merged export


def test_merged_export_loads_with_our_logits(all7, fp_base, tmp_path, x):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, adapter = all7
    ours_logits = logits(ours, x)
    base_gap = (ours_logits - logits(load(fp_base), x)).abs().max().item()
    merged = {}
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out = tmp_path / dtype
        report = export_merged(adapter, fp_base, out, dtype=dtype)
        assert report.tokenizer and not report.dequantized
        assert json.loads((out / "config.json").read_text())["dtype"] == str(torch_dtype).removeprefix("torch.")
        state = load_file(out / "model.safetensors")
        assert all(v.dtype == torch_dtype for v in state.values())
        assert not any("lora" in key or "msplora" in key for key in state)
        merged[dtype] = state
        model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        assert model.dtype == torch_dtype
        diff = (logits(model, x) - ours_logits).abs().max().item()
        if dtype == "fp32":
            assert max_rel_diff(logits(model, x), ours_logits) < 1e-5, f"merged fp32 logits differ from ours by {diff}"
        else:
            assert diff < 0.1 * base_gap, f"merged bf16 logits differ from ours by {diff} (the adapter moves them {base_gap})"
        tok, base_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(fp_base)
        assert tok("Hello\nworld")["input_ids"] == base_tok("Hello\nworld")["input_ids"]
    for key, w32 in merged["fp32"].items():  # the bf16 export is the fp32 merge rounded once
        assert torch.equal(merged["bf16"][key], w32.bfloat16()), key


def test_an_fp32_export_of_a_bf16_base_adds_the_update_without_rounding_it_to_bf16(all7, fp_base, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, adapter = all7
    bf16_base = tmp_path / "bf16_base"
    AutoModelForCausalLM.from_pretrained(fp_base, dtype=torch.bfloat16).save_pretrained(bf16_base)
    char_tokenizer().save_pretrained(bf16_base)
    export_merged(adapter, fp_base, tmp_path / "from_fp32", dtype="fp32")
    export_merged(adapter, bf16_base, tmp_path / "from_bf16", dtype="fp32")
    w32, w16 = load_file(fp_base / "model.safetensors"), load_file(bf16_base / "model.safetensors")
    m32, m16 = load_file(tmp_path / "from_fp32" / "model.safetensors"), load_file(tmp_path / "from_bf16" / "model.safetensors")
    checked = 0
    for key in (k for k in m32 if k.endswith("proj.weight")):
        delta = m32[key] - w32[key]
        # Merged in bf16 first, the update came through with a relative error of 7e-3 here, and ~0.17 where it
        # is 1% of the weight (a trained adapter's usual size).
        error = (m16[key] - w16[key].float() - delta).norm() / delta.norm()
        assert error < 1e-5, f"{key}: the update came through with relative error {error:.2e}"
        checked += 1
    assert checked == 7 * TINY["num_hidden_layers"]


def test_merged_export_of_a_4bit_base_is_dequantized(tmp_path, x):
    import shutil

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    fp = save_base(tmp_path / "fp", tokenizer=False, **TINY_4BIT)
    load(fp, four_bit=True).save_pretrained(tmp_path / "q4")  # a directory that holds only packed 4-bit weights
    assert "quantization_config" in json.loads((tmp_path / "q4" / "config.json").read_text())
    config = MSPLoRAConfig(ranks=(4, 2, 1), num_mid_groups=2, target_modules=ALL7, dropout=0.0)
    ours = make_adapter(tmp_path / "q4", tmp_path / "adapter", config)  # loads 4-bit from the dir's config
    assert type(ours.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    _exact_4bit_path(ours)

    report = export_merged(tmp_path / "adapter", tmp_path / "q4", tmp_path / "merged", dtype="fp32")
    assert report.dequantized
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    diff = max_rel_diff(logits(merged, x), logits(ours, x))
    assert diff < 1e-5, f"merged dequantized model differs from our 4-bit model by {diff} (relative to the largest logit)"

    # A config that asks for 4-bit over the original fp32 weights: those are loaded, not quantized.
    shutil.copytree(fp, tmp_path / "fp_q")
    cfg = json.loads((fp / "config.json").read_text())
    cfg["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()
    (tmp_path / "fp_q" / "config.json").write_text(json.dumps(cfg))
    report = export_merged(tmp_path / "adapter", tmp_path / "fp_q", tmp_path / "merged_fp", dtype="fp32")
    assert not report.dequantized
    from msplora_dist import load_adapter

    reference = load_adapter(load(fp), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_fp", attn_implementation="eager").eval()
    assert max_rel_diff(logits(merged, x), logits(reference, x)) < 1e-5


def test_merged_export_onto_a_model_of_other_shapes_is_refused(all7, tmp_path):
    _, adapter = all7
    other = save_base(tmp_path / "other", tokenizer=False, intermediate_size=40)  # same hidden size, other MLP
    with pytest.raises(CheckpointError, match="gate_proj"):
        export_merged(adapter, other, tmp_path / "merged", dtype="fp32")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


# ----------------------------------------------------------------------------- output directory safety


def _previous_export(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True)
    (path / REPORT_NAME).write_text('{"format": "peft"}\n')
    (path / "sentinel.txt").write_text("must survive a failed export\n")
    return _snapshot(path)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_failure_while_writing_leaves_nothing_and_keeps_the_old_export(all7, tmp_path, monkeypatch):
    import safetensors.torch

    _, adapter = all7

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        export_peft(adapter, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    before = _previous_export(tmp_path / "old")
    with pytest.raises(RuntimeError, match="disk full"):
        export_peft(adapter, tmp_path / "old")
    assert _snapshot(tmp_path / "old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary siblings left


def test_out_must_not_clobber_inputs_or_unrelated_directories(all7, tmp_path):
    _, adapter = all7
    with pytest.raises(ConfigError, match="would replace the input"):
        export_peft(adapter, adapter)
    with pytest.raises(ConfigError, match="would replace the input"):
        export_peft(adapter, adapter.parent)
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="--overwrite"):
        export_peft(adapter, unrelated)
    assert (unrelated / "notes.txt").read_text() == "keep"
    export_peft(adapter, unrelated, overwrite=True)
    assert not (unrelated / "notes.txt").exists()
    export_peft(adapter, unrelated, max_rank=3)  # a previous export is replaced without --overwrite
    assert json.loads((unrelated / PEFT_CONFIG_NAME).read_text())["r"] == 3


# ------------------------------------------------------------------------------------ the real script


def _script(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # tiny models: threads only contend
    return subprocess.Popen([sys.executable, str(EXPORT_SCRIPT), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _load_script_main():
    from msplora_dist.cli.export import main

    return main


def _run_main(main, capfd, *args) -> tuple[int, str, str]:
    capfd.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse errors
        rc = exit_.code
    out, err = capfd.readouterr()
    return rc, out, err


def test_script_exports_and_prints_the_vllm_commands_and_refuses_bad_input(all7, fp_base, tmp_path, capfd):
    _, adapter = all7
    cases = tmp_path / "cases"
    cases.mkdir()

    big = cases / "big_adapter"  # ranks 256 + 256 + 8 = 520 > 512
    big_model = apply_msplora(load(fp_base), MSPLoRAConfig(ranks=(256, 256, 8), num_mid_groups=1, target_modules=("q_proj",)))
    save_adapter(big_model, big)

    no_weights = cases / "no_weights"
    no_weights.mkdir()
    (no_weights / CONFIG_NAME).write_bytes((adapter / CONFIG_NAME).read_bytes())

    flipped = cases / "flipped"  # bytes changed: the recorded sha256 no longer matches
    flipped.mkdir()
    (flipped / CONFIG_NAME).write_bytes((adapter / CONFIG_NAME).read_bytes())
    data = bytearray((adapter / WEIGHTS_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / WEIGHTS_NAME).write_bytes(bytes(data))

    garbage = cases / "garbage"  # not safetensors at all, and no sha256 to catch it first
    garbage.mkdir()
    meta = json.loads((adapter / CONFIG_NAME).read_text())
    del meta["weights_sha256"]
    (garbage / CONFIG_NAME).write_text(json.dumps(meta))
    (garbage / WEIGHTS_NAME).write_bytes(b"\xff" * 8 + b"not a safetensors header")

    other = save_base(cases / "other_base", tokenizer=False, hidden_size=48)

    bad = {  # name: (args, expected words in the error line)
        "other_base": (["--adapter", adapter, "--format", "merged", "--base", other], "hidden_size=32"),
        "rank_520": (["--adapter", big, "--format", "peft"], "--max_rank"),
        "format": (["--adapter", adapter, "--format", "gguf"], "--format"),
        "no_weights": (["--adapter", no_weights, "--format", "peft"], "is missing"),
        "flipped": (["--adapter", flipped, "--format", "peft"], "sha256"),
    }
    in_process = {  # the same main(), without a fresh interpreter each (they cost seconds apiece)
        "no_adapter": (["--adapter", cases / "nowhere", "--format", "peft"], "does not exist"),
        "garbage": (["--adapter", garbage, "--format", "peft"], "not a readable safetensors file"),
        "merged_max_rank": (["--adapter", adapter, "--format", "merged", "--base", fp_base, "--max_rank", "4"], "--max_rank"),
        "merged_no_base": (["--adapter", adapter, "--format", "merged"], "--base"),
        "max_rank_0": (["--adapter", adapter, "--format", "peft", "--max_rank", "0"], "--max_rank"),
    }
    procs, outs = {}, {}
    for i, (name, (args, _)) in enumerate({**bad, **in_process}.items()):
        out = tmp_path / f"out_{name}"
        outs[name] = (out, _previous_export(out) if i % 2 else None)  # every other one replaces an old export
        if name in bad:
            procs[name] = _script(*args, "--out", out)
    good_out = tmp_path / "good"
    procs["good"] = _script("--adapter", adapter, "--format", "peft", "--out", good_out)
    results = {}
    main = _load_script_main()
    for name, (args, _) in in_process.items():
        results[name] = _run_main(main, capfd, *args, "--out", outs[name][0])
    results.update({name: (p.wait(timeout=120), *p.communicate()) for name, p in procs.items()})

    for name, (_, expected) in {**bad, **in_process}.items():
        rc, stdout, stderr = results[name]
        lines = stderr.strip().splitlines()
        assert rc == 2, f"{name}: exit {rc}, stderr {stderr!r}"
        assert "Traceback" not in stderr, f"{name}: {stderr}"
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], f"{name}: {stderr!r}"
        out, before = outs[name]
        if before is None:
            assert not out.exists(), f"{name}: {out} was created"
        else:
            assert _snapshot(out) == before, f"{name}: the existing {out} was changed"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    rc, stdout, stderr = results["good"]
    assert rc == 0, stderr
    assert "max_lora_rank=8" in stdout and "--max-lora-rank 8" in stdout
    assert "LoRARequest('adapter', 1, " in stdout and "vllm.entrypoints.openai.api_server" in stdout and str(good_out) in stdout
    assert json.loads((good_out / PEFT_CONFIG_NAME).read_text())["r"] == 7
    rc, stdout, stderr = _run_main(main, capfd, "--adapter", big, "--format", "peft", "--out", tmp_path / "big", "--max_rank", "300")
    assert rc == 0, stderr
    assert "max_lora_rank=320" in stdout and "--max-lora-rank 320" in stdout and "largest relative error" in stdout


def test_an_adapter_trained_on_a_gguf_base_asks_for_its_converted_directory(tmp_path, make_model):
    """The trainer records a GGUF base as the file; export and sampling need a plain directory, so they say which
    conversion to run instead of "not a directory here"."""
    from msplora_dist.adapters.export import resolve_base

    model = apply_msplora(make_model("llama", num_layers=2), MSPLoRAConfig(ranks=(2, 2, 2), num_mid_groups=1))
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF")
    save_adapter(model, tmp_path / "adapter", base_model=gguf)
    with pytest.raises(CheckpointError, match=r"is a GGUF model; convert it once \(python launch/convert_gguf.py"):
        resolve_base(tmp_path / "adapter", None)
