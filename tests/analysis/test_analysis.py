"""msplora_dist.analysis and launch/analyze.py: spectra, effective ranks, level shares, subspace overlaps and
cross-layer similarity on adapters of known structure; agreement with dense computations; --compare against
a PEFT LoRA; the script end to end and its errors.

The models are LLaMA-shaped toys (model.layers[i].self_attn.q_proj, ...), not transformers models: building
one takes milliseconds, and the analysis only ever sees the saved adapter.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from msplora_dist import CheckpointError, ConfigError, MSPLoRAConfig, UserError, apply_msplora, get_hierarchy, save_adapter
from msplora_dist.adapters.inject import msplora_linears
from msplora_dist.analysis import (
    analyze_adapter,
    analyze_model,
    effective_rank,
    energy_topk,
    gram_of_updates,
    report_entries,
    subspace_overlap,
    tensorboard_scalars,
    thin_svd,
    update_inner,
    write_report,
)
from msplora_dist.analysis.linalg import svd_from_grams

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "analyze.py"
HIDDEN, KV, INTER, LAYERS = 16, 8, 24, 4
TARGETS = ("q_proj", "v_proj", "down_proj")
PNGS = ("spectra.png", "level_share.png", "overlap.png", "cross_layer.png")
COMPARE_PNGS = ("compare_effective_rank.png", "compare_spectra.png", "compare_similarity.png", "compare_cross_layer.png")


# ------------------------------------------------------------------------------------------------ toy models


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False), nn.Linear(HIDDEN, KV, bias=False)
        self.v_proj, self.o_proj = nn.Linear(HIDDEN, KV, bias=False), nn.Linear(HIDDEN, HIDDEN, bias=False)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, INTER, bias=False), nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = _Attn(), _MLP()


class _Inner(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList([_Layer() for _ in range(n)])


class ToyLlama(nn.Module):
    def __init__(self, n: int = LAYERS):
        super().__init__()
        self.model = _Inner(n)


def make_model(ranks=(4, 3, 2), alphas=(8.0, 6.0, 2.0), groups=2, targets=TARGETS, **kw) -> nn.Module:
    torch.manual_seed(0)
    return apply_msplora(ToyLlama(), MSPLoRAConfig(ranks=ranks, alphas=alphas, num_mid_groups=groups,
                                                   target_modules=targets, dropout=0.0, **kw))


def randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(get_hierarchy(model).named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def pair(model, key: str):
    """The LoRAPair under checkpoint key 'global.q_proj', 'mid.1.q_proj' or 'layer.3.q_proj'."""
    return dict(get_hierarchy(model).named_pairs())[key]


def set_update(p, U: torch.Tensor, sigma, V: torch.Tensor, scale: float) -> None:
    """Make scale * B A = U diag(sigma) V^T, with rank(U) <= r: the remaining columns of B are zero."""
    k = len(sigma)
    with torch.no_grad():
        p.lora_B.zero_()
        p.lora_B[:, :k] = U * torch.tensor(sigma) / scale
        p.lora_A.copy_(torch.randn(p.lora_A.shape))      # rows past k meet zero columns of B
        p.lora_A[:k] = V.T


def orthonormal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))[0]


def erank(sigma) -> float:
    p = [s / sum(sigma) for s in sigma if s > 0]
    return math.exp(-sum(x * math.log(x) for x in p))


# q_proj of the structured adapter: scales s = (8/4, 6/3, 2/2) = (2, 2, 1); groups [0, 2), [2, 4).
#   global  rank 2, sigma (3, 0.5),  columns Qo[0:2], rows Qi[0:2]
#   mid 0   zero;    mid 1 rank 1, sigma (2,), columns Qo[6], rows Qi[6]
#   layer 0 sigma (1, 1),    columns Qo[0:2] (= global's), rows Qi[2:4] (orthogonal to global's)
#   layer 1 sigma (2, 1),    columns Qo[2:4] (orthogonal),  rows Qi[0:2] (= global's)
#   layer 2 = layer 3: sigma (1.5, 0.5), columns Qo[4:6], rows Qi[4:6]
SIG_G, SIG_M1 = (3.0, 0.5), (2.0,)
SIG_L = {0: (1.0, 1.0), 1: (2.0, 1.0), 2: (1.5, 0.5), 3: (1.5, 0.5)}


@pytest.fixture(scope="module")
def structured(tmp_path_factory) -> tuple[Path, nn.Module]:
    model = make_model()
    randomize(model)   # v_proj and down_proj stay random
    Qo, Qi = orthonormal(HIDDEN, 10), orthonormal(HIDDEN, 11)
    torch.manual_seed(2)
    set_update(pair(model, "global.q_proj"), Qo[:, 0:2], SIG_G, Qi[:, 0:2], 2.0)
    with torch.no_grad():
        pair(model, "mid.0.q_proj").lora_B.zero_()
    set_update(pair(model, "mid.1.q_proj"), Qo[:, 6:7], SIG_M1, Qi[:, 6:7], 2.0)
    set_update(pair(model, "layer.0.q_proj"), Qo[:, 0:2], SIG_L[0], Qi[:, 2:4], 1.0)
    set_update(pair(model, "layer.1.q_proj"), Qo[:, 2:4], SIG_L[1], Qi[:, 0:2], 1.0)
    for layer in (2, 3):
        set_update(pair(model, f"layer.{layer}.q_proj"), Qo[:, 4:6], SIG_L[layer], Qi[:, 4:6], 1.0)
    path = save_adapter(model, tmp_path_factory.mktemp("structured") / "adapter")
    return path, model


@pytest.fixture(scope="module")
def report(structured) -> dict:
    return analyze_adapter(structured[0])


# ------------------------------------------------------------------------------------------- linear algebra


def test_linalg_helpers_match_dense():
    g = torch.Generator().manual_seed(3)
    B1, A1 = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    B2, A2 = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(3, 12, generator=g, dtype=torch.float64)
    dense = torch.linalg.svdvals(B1 @ A1)[:5]
    assert torch.allclose(thin_svd(B1, A1).S, dense, atol=1e-10)
    assert torch.allclose(svd_from_grams(B1.T @ B1, A1 @ A1.T, 5).S, dense, atol=1e-10)
    assert update_inner(B1, A1, B2, A2) == pytest.approx(float(((B1 @ A1) * (B2 @ A2)).sum()), rel=1e-10)
    K = gram_of_updates([(B1, A1), (B2, A2)])
    assert float(K[0, 1]) == pytest.approx(update_inner(B1, A1, B2, A2), rel=1e-10)
    assert float(K[1, 1]) == pytest.approx(float((B2 @ A2).square().sum()), rel=1e-10)
    # Closed forms: k equal values have effective rank k; energy is cumulative and ends at 1.
    assert effective_rank([2.0, 2.0, 2.0, 0.0]) == pytest.approx(3.0)
    assert effective_rank([0.0, 0.0]) == 0.0
    assert energy_topk([3.0, 1.0, 0.0]) == {"1": pytest.approx(0.9), "2": pytest.approx(1.0), "3": pytest.approx(1.0)}
    assert energy_topk([0.0, 0.0]) is None
    # Overlap of the same update with itself is 1; with an update on orthogonal columns, 0.
    s1 = thin_svd(B1, A1)
    assert subspace_overlap(s1, s1, "column")["mean_sq_cos"] == pytest.approx(1.0)
    Q = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0]
    a, b = thin_svd(Q[:, :3], A1[:3]), thin_svd(Q[:, 3:6], A1[:3])
    col, row = subspace_overlap(a, b, "column"), subspace_overlap(a, b, "row")
    assert col["mean_sq_cos"] == pytest.approx(0.0, abs=1e-12) and col["max_cos"] == pytest.approx(0.0, abs=1e-6)
    assert row["mean_sq_cos"] == pytest.approx(1.0) and row["chance"] == pytest.approx(3 / 12)


# -------------------------------------------------------------------------------------- structured adapter


def test_level_spectra_are_the_constructed_singular_values(report):
    g = report["global.q_proj"]
    assert g["level"] == "global" and g["rank"] == 4 and g["scale"] == pytest.approx(2.0)
    assert g["singular_values"] == pytest.approx([3.0, 0.5, 0.0, 0.0], abs=1e-5)
    assert g["numerical_rank"] == 2
    assert g["effective_rank"] == pytest.approx(erank(SIG_G), abs=1e-5)
    assert g["energy"] == {"1": pytest.approx(9 / 9.25), "2": pytest.approx(1.0), "4": pytest.approx(1.0)}
    assert g["frobenius_norm"] == pytest.approx(math.sqrt(9.25), abs=1e-5)
    assert report["mid.0.q_proj"]["singular_values"] == pytest.approx([0.0] * 3, abs=1e-6)
    assert report["mid.0.q_proj"]["effective_rank"] == 0.0 and report["mid.0.q_proj"]["energy"] is None
    assert report["mid.1.q_proj"]["singular_values"] == pytest.approx([2.0, 0.0, 0.0], abs=1e-5)
    assert report["mid.1.q_proj"]["effective_rank"] == pytest.approx(1.0)
    for layer, sigma in SIG_L.items():
        e = report[f"layer.{layer}.q_proj"]
        assert e["level"] == "layer" and e["layer"] == layer
        assert e["singular_values"] == pytest.approx(list(sigma), abs=1e-5)
        assert e["effective_rank"] == pytest.approx(erank(sigma), abs=1e-5)
    assert report["summary"]["q_proj"]["effective_rank"]["layer"] == pytest.approx(
        sum(erank(s) for s in SIG_L.values()) / 4, abs=1e-5)


def test_layer_totals_have_the_closed_form_singular_values(report):
    # Layer 0 shares global's columns with orthogonal rows: singular values sqrt(sigma_g^2 + sigma_l^2).
    expected = {0: [math.sqrt(10), math.sqrt(1.25)], 1: [math.sqrt(13), math.sqrt(1.25)],
                2: [3.0, 2.0, 1.5, 0.5, 0.5], 3: [3.0, 2.0, 1.5, 0.5, 0.5]}
    for layer, sv in expected.items():
        e = report[f"delta.{layer}.q_proj"]
        assert e["rank"] == 9 and len(e["singular_values"]) == 9
        assert e["levels"] == ["global.q_proj", f"mid.{layer // 2}.q_proj", f"layer.{layer}.q_proj"]
        assert e["singular_values"] == pytest.approx(sv + [0.0] * (9 - len(sv)), abs=1e-5)
        assert e["effective_rank"] == pytest.approx(erank(sv), abs=1e-5)
        assert e["frobenius_norm"] == pytest.approx(math.sqrt(sum(s * s for s in sv)), abs=1e-5)


def test_level_shares_and_subspace_overlaps(report):
    rows = {r["layer"]: r for r in report["decoupling"]["q_proj"]["layers"]}
    r0 = rows[0]
    total = 9.25 + 0.0 + 2.0     # the levels of layer 0 are mutually orthogonal: the squares add up
    for share in ("sq_norm_share", "energy_share"):
        assert r0[share]["global"] == pytest.approx(9.25 / total, abs=1e-6)
        assert r0[share]["mid"] == pytest.approx(0.0, abs=1e-9)
        assert r0[share]["layer"] == pytest.approx(2.0 / total, abs=1e-6)
    assert r0["norm_ratio"]["global"] == pytest.approx(math.sqrt(9.25 / total), abs=1e-6)
    assert r0["norm"]["delta"] == pytest.approx(math.sqrt(total), abs=1e-6)
    assert r0["frobenius_cos"]["global-layer"] == pytest.approx(0.0, abs=1e-6)
    # Identical column spaces (layer 0) / row spaces (layer 1): 1. Orthogonal ones: 0.
    assert r0["column_overlap"]["global-layer"]["mean_sq_cos"] == pytest.approx(1.0, abs=1e-6)
    assert r0["column_overlap"]["global-layer"]["max_cos"] == pytest.approx(1.0, abs=1e-6)
    assert r0["column_overlap"]["global-layer"]["weighted"] == pytest.approx(1.0, abs=1e-6)
    assert r0["row_overlap"]["global-layer"]["mean_sq_cos"] == pytest.approx(0.0, abs=1e-6)
    assert r0["column_overlap"]["global-layer"]["chance"] == pytest.approx(2 / HIDDEN)
    assert r0["column_overlap"]["global-mid"] is None      # mid group 0 is zero: no subspace to compare
    assert rows[1]["column_overlap"]["global-layer"]["mean_sq_cos"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["row_overlap"]["global-layer"]["mean_sq_cos"] == pytest.approx(1.0, abs=1e-6)
    for side in ("column", "row"):
        for name in ("global-mid", "global-layer", "mid-layer"):
            assert rows[2][f"{side}_overlap"][name]["mean_sq_cos"] == pytest.approx(0.0, abs=1e-6)
    # Layer 2: all orthogonal, ||delta||^2 = 9.25 + 4 + 2.5.
    assert rows[2]["sq_norm_share"]["mid"] == pytest.approx(4 / 15.75, abs=1e-6)
    assert sum(rows[2]["energy_share"].values()) == pytest.approx(1.0)


def test_cross_layer_similarity(report):
    cl = report["cross_layer"]["q_proj"]
    cos = cl["cosine"]
    assert cos[2][3] == pytest.approx(1.0, abs=1e-9) and cos[3][2] == pytest.approx(1.0, abs=1e-9)
    assert all(cos[i][i] == pytest.approx(1.0) for i in range(LAYERS))
    # <delta_0, delta_1> = ||G||^2 (every other pair of terms is orthogonal).
    assert cos[0][1] == pytest.approx(9.25 / math.sqrt(11.25 * 14.25), abs=1e-6)
    assert cl["groups"] == [[0, 2], [2, 4]]
    assert cl["layer_level"]["cosine"][2][3] == pytest.approx(1.0, abs=1e-9)


def test_report_matches_dense_updates_of_a_random_adapter(tmp_path):
    """Every number of a random adapter against the dense delta_weight() of the model's own modules."""
    model = make_model(use_rslora=True)
    randomize(model, seed=5)
    rep = analyze_adapter(save_adapter(model, tmp_path / "a"))
    dense = {(m.layer_index, m.target): m.delta_weight(torch.float64) for m in msplora_linears(model)}
    for (layer, t), W in dense.items():
        e = rep[f"delta.{layer}.{t}"]
        assert torch.allclose(torch.tensor(e["singular_values"], dtype=torch.float64), torch.linalg.svdvals(W)[:9],
                              rtol=1e-7, atol=1e-9)
        assert e["frobenius_norm"] == pytest.approx(float(W.norm()), rel=1e-9)
        for other in range(LAYERS):
            W2 = dense[(other, t)]
            assert rep["cross_layer"][t]["cosine"][layer][other] == pytest.approx(
                float((W * W2).sum() / (W.norm() * W2.norm())), abs=1e-9)
    h = get_hierarchy(model)
    s = [h.config.scale(i) for i in range(3)]
    for t in TARGETS:
        for row in rep["decoupling"][t]["layers"]:
            layer = row["layer"]
            pairs = h.pairs_for(layer, t)
            levels = {name: (p.lora_B.detach().double() * sc) @ p.lora_A.detach().double()
                      for name, p, sc in zip(("global", "mid", "layer"), pairs, s, strict=True)}
            W = dense[(layer, t)]
            for name, Wl in levels.items():
                assert row["energy_share"][name] == pytest.approx(float((Wl * W).sum() / W.square().sum()), abs=1e-9)
                assert row["norm"][name] == pytest.approx(float(Wl.norm()), rel=1e-9)
            Ug = torch.linalg.svd(levels["global"])[0][:, :4]
            Ul = torch.linalg.svd(levels["layer"])[0][:, :2]
            want = float((Ug.T @ Ul).square().sum()) / 2
            assert row["column_overlap"]["global-layer"]["mean_sq_cos"] == pytest.approx(want, abs=1e-7)


def test_untrained_adapter_is_all_zero_and_still_renders(tmp_path):
    model = make_model(targets=("q_proj",))     # B = 0 at init
    rep = analyze_adapter(save_adapter(model, tmp_path / "a"))
    assert rep["delta.0.q_proj"]["singular_values"] == [0.0] * 9
    assert rep["summary"]["q_proj"]["effective_rank"]["delta"] == 0.0
    assert rep["cross_layer"]["q_proj"]["cosine"][0][1] is None
    out = write_report(rep, tmp_path / "out")
    assert json.loads((out / "report.json").read_text())["delta.0.q_proj"]["energy"] is None
    assert all((out / f).is_file() for f in PNGS)


def test_analyze_model_equals_analyze_adapter(structured, report):
    rep = analyze_model(structured[1])
    for key in ("global.q_proj", "delta.2.q_proj", "layer.1.down_proj"):
        assert rep[key]["singular_values"] == pytest.approx(report[key]["singular_values"], abs=1e-9)
    assert rep["adapter"]["path"] is None


def test_tensorboard_scalars(report):
    scalars = tensorboard_scalars(report)
    assert all(isinstance(v, float) and math.isfinite(v) for v in scalars.values())
    assert scalars["analysis/q_proj/effective_rank/global"] == pytest.approx(erank(SIG_G), abs=1e-5)
    for tag in ("analysis/v_proj/sq_norm_share/layer", "analysis/down_proj/cross_layer_cosine",
                "analysis/q_proj/column_overlap/global-layer", "analysis/q_proj/effective_rank/delta"):
        assert tag in scalars
    assert "analysis/q_proj/row_overlap/global-mid" in scalars   # a mean over the layers where it exists


# ------------------------------------------------------------------------------------------------ --compare


def write_peft_lora(path: Path, layers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], *, r: int,
                    alpha: float, use_rslora: bool = False, alpha_pattern: dict | None = None) -> Path:
    """A PEFT LoRA directory as peft's save_pretrained writes it (adapter name stripped from the keys)."""
    path.mkdir(parents=True)
    state = {}
    for (layer, t), (B, A) in layers.items():
        sub = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        prefix = f"base_model.model.model.layers.{layer}.{sub}.{t}"
        state[f"{prefix}.lora_A.weight"] = A.detach().float().contiguous().clone()
        state[f"{prefix}.lora_B.weight"] = B.detach().float().contiguous().clone()
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora,
              "target_modules": sorted({t for _, t in layers}), "lora_dropout": 0.0, "bias": "none",
              "rank_pattern": {}, "alpha_pattern": alpha_pattern or {}, "use_dora": False,
              "base_model_name_or_path": None, "fan_in_fan_out": False, "modules_to_save": None}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def export_as_lora(model: nn.Module) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """The exact plain-LoRA export of MSPLORA.md: A = [A_G; A_M; A_L], B = [s_G B_G, s_M B_M, s_L B_L], alpha = r."""
    out = {}
    for m in msplora_linears(model):
        A = torch.cat([p.lora_A for p in m.pairs], 0).detach()
        B = torch.cat([p.lora_B * s for p, s in zip(m.pairs, m.scales, strict=True)], 1).detach()
        out[(m.layer_index, m.target)] = (B, A)
    return out


def test_compare_with_its_own_plain_lora_export(structured, report, tmp_path):
    path, model = structured
    lora = write_peft_lora(tmp_path / "lora", export_as_lora(model), r=9, alpha=9.0)
    rep = analyze_adapter(path, compare=lora)
    other = rep["compare"]
    assert other["adapter"]["kind"] == "lora" and other["adapter"]["num_layers"] == LAYERS
    assert not report_entries(other, "global") and len(report_entries(other, "delta")) == LAYERS * len(TARGETS)
    for key, e in report_entries(report, "delta").items():
        assert other[key]["singular_values"] == pytest.approx(e["singular_values"], abs=1e-5)
        assert other[key]["effective_rank"] == pytest.approx(e["effective_rank"], abs=1e-5)
    for t in TARGETS:
        v = rep["compare"]["versus"][t]
        assert v["comparable"] and v["delta_cosine"] == pytest.approx([1.0] * LAYERS, abs=1e-6)
        assert v["column_overlap"] == pytest.approx([1.0] * LAYERS, abs=1e-6)
        assert v["row_overlap_weighted"] == pytest.approx([1.0] * LAYERS, abs=1e-6)
        assert torch.allclose(torch.tensor(other["cross_layer"][t]["cosine"]), torch.tensor(report["cross_layer"][t]["cosine"]),
                              atol=1e-6)
        sbs = rep["compare"]["side_by_side"][t]
        assert sbs["effective_rank_delta"]["this"] == pytest.approx(sbs["effective_rank_delta"]["other"], abs=1e-5)
    assert "analysis/q_proj/delta_cosine_vs_compare" in tensorboard_scalars(rep)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_scaling_and_alpha_pattern(structured, tmp_path, use_rslora):
    Q = orthonormal(HIDDEN, 20)
    layers = {(layer, "q_proj"): (Q[:, :2] * torch.tensor([1.0, 0.5]), Q[:, 2:4].T) for layer in range(LAYERS)}
    lora = write_peft_lora(tmp_path / "lora", layers, r=2, alpha=8.0, use_rslora=use_rslora,
                           alpha_pattern={"layers.3.self_attn.q_proj": 2.0})
    rep = analyze_adapter(structured[0], compare=lora)["compare"]
    scale = 8.0 / (math.sqrt(2) if use_rslora else 2)
    assert rep["delta.0.q_proj"]["singular_values"] == pytest.approx([scale, scale * 0.5], abs=1e-5)
    scale3 = 2.0 / (math.sqrt(2) if use_rslora else 2)
    assert rep["delta.3.q_proj"]["singular_values"] == pytest.approx([scale3, scale3 * 0.5], abs=1e-5)
    assert rep["cross_layer"]["q_proj"]["cosine"][0][3] == pytest.approx(1.0)   # same direction, other size
    assert rep["adapter"]["targets"] == ["q_proj"]


def test_compare_with_another_msplora_adapter(structured, tmp_path):
    model = make_model(ranks=(2, 2, 2), groups=4)
    randomize(model, seed=9)
    other = analyze_adapter(structured[0], compare=save_adapter(model, tmp_path / "b"))["compare"]
    assert other["adapter"]["kind"] == "msplora" and other["adapter"]["groups"] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert "mid.3.q_proj" in other and "q_proj" in other["decoupling"]
    assert all(-1 <= c <= 1 for c in other["versus"]["down_proj"]["delta_cosine"])


# ----------------------------------------------------------------------------------------- errors and output


def test_bad_inputs_raise_user_errors(structured, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        analyze_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an adapter directory"):
        analyze_adapter(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        analyze_adapter(structured[0], compare=bad)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        analyze_adapter(bad)


def test_write_report_refuses_to_replace_what_is_not_a_report(structured, report, tmp_path):
    with pytest.raises(ConfigError, match="is or contains the adapter"):
        write_report(report, structured[0], plots=False)
    with pytest.raises(ConfigError, match="is or contains the adapter"):
        write_report(report, structured[0].parent, plots=False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an analysis report"):
        write_report(report, precious, plots=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert (structured[0] / "adapter_model.safetensors").is_file()
    out = write_report(report, tmp_path / "r", plots=False)
    assert write_report(report, out, plots=False) == out          # an earlier report is replaced
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "report.json"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_script_end_to_end_with_compare(structured, tmp_path):
    lora = write_peft_lora(tmp_path / "lora", export_as_lora(structured[1]), r=9, alpha=9.0)
    proc = _run("--adapter", str(structured[0]), "--out", str(tmp_path / "out"), "--compare", str(lora))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    rep = json.loads((out / "report.json").read_text())
    assert {"global.q_proj", "mid.1.q_proj", "layer.3.q_proj", "delta.3.q_proj", "decoupling", "cross_layer",
            "compare", "summary"} <= set(rep)
    assert rep["compare"]["delta.3.q_proj"]["singular_values"] == pytest.approx(rep["delta.3.q_proj"]["singular_values"], abs=1e-5)
    index = (out / "index.html").read_text()
    for name in PNGS + COMPARE_PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"src='{name}'" in index
    assert "Effective rank" in index and "q_proj" in index
    assert "index.html" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]      # no temporary left behind


def test_script_bad_input_exits_2_with_one_line(tmp_path):
    proc = _run("--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]
    assert not (tmp_path / "out").exists()


def test_script_main_in_process_errors(structured, tmp_path, capsys):
    from msplora_dist.cli import analyze as script
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    cases = [["--adapter", str(tmp_path / "plain"), "--out", str(tmp_path / "o1")],
             ["--adapter", str(structured[0]), "--out", str(tmp_path / "plain"), "--no-plots"]]
    for argv in cases:
        assert script.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
    assert issubclass(CheckpointError, UserError) and issubclass(ConfigError, UserError)
