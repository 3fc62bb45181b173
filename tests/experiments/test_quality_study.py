"""The SmolLM2 quality study's cheap parts (experiments/quality/): the arms' parameter counts on real shapes, the
numbers task's generator and scorer, the statistics and verdict rule on synthetic numbers, the learning-rate
widening, the batched greedy generation and per-example losses on the shipped tiny model, and the report's
tables and JSON from a synthetic grid. No DeepSpeed; the end-to-end run is `python -m experiments.quality.smoke --smol`."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

from experiments.quality import arms as armlib
from experiments.quality import grid, numbers, qlib, report, stats, tables
from msplora_dist.train.backbone import projection_features

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "msplora_dist" / "assets" / "tiny_llama"


# --- arms ------------------------------------------------------------------------------------------------

def _arms(shape: dict) -> dict[str, armlib.Arm]:
    return {a.name: a for a in armlib.define_arms(projection_features(shape), shape["num_hidden_layers"])}


def test_the_paper_counts_on_llama2_7b_shapes():
    arms = _arms(armlib.LLAMA2_7B)
    assert arms["msp_qv_paper"].params == 11_010_048  # the paper's 11.0 M
    assert arms["lora_qv_r64"].params == 33_554_432  # the paper's 33.6 M
    assert arms["lora_qv_eq_paper"].ranks == (0, 0, 21) and arms["lora_qv_eq_paper"].params == 11_010_048


def test_smollm2_counts_follow_the_formula():
    # Per unit of rank a target costs in + out: q 576 + 576, v 576 + 192 (3 key-value heads of 64), so q,v cost 1920;
    # all seven 1152 + 768 + 768 + 1152 + 3 * (576 + 1536) = 10176. MSPLoRA (g, m, l) costs width * (g + 3 m + 30 l).
    shape = armlib.SMOLLM2_135M
    assert projection_features(shape)["v_proj"] == (576, 192)
    arms = _arms(shape)
    qv, all7 = 1920, 10176
    assert arms["lora_qv_r64"].params == qv * 30 * 64 == 3_686_400
    assert arms["msp_qv_paper"].params == qv * (64 + 3 * 32 + 30 * 16) == 1_228_800
    assert arms["msp_qv_paper"].params * 3 == arms["lora_qv_r64"].params  # on 30 layers the paper's ranks are exactly a third
    assert arms["msp_qv_eq_lora64"].ranks == (192, 96, 48) and arms["msp_qv_eq_lora64"].params == arms["lora_qv_r64"].params
    assert arms["lora_qv_eq_paper"].ranks == (0, 0, 21) and arms["lora_qv_eq_paper"].params == qv * 30 * 21
    assert arms["lora_all_r16"].params == all7 * 30 * 16 == 4_884_480
    assert arms["msp_all_eq_lora16"].ranks == (48, 24, 12) and arms["msp_all_eq_lora16"].params == arms["lora_all_r16"].params
    assert arms["msp_all_third"].ranks == (16, 8, 4) and arms["msp_all_third"].params * 3 == arms["lora_all_r16"].params
    assert {a.kind for a in arms.values()} == {"LoRA", "MSPLoRA"} and len(arms) == 7


# --- the numbers task ------------------------------------------------------------------------------------

def _parse_words(text: str) -> int:
    """An independent reading of the words (a parser, not the generator run backwards)."""
    small = {w: i for i, w in enumerate(numbers.ONES)} | {w: 10 * i for i, w in enumerate(numbers.TENS) if w}
    scale = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
    total = group = 0
    for word in text.split():
        if word == "hundred":
            group *= 100
        elif word in scale:
            total, group = total + group * scale[word], 0
        else:
            group += sum(small[p] for p in word.split("-"))
    return total + group


def test_number_words_follow_the_convention_and_read_back():
    assert numbers.to_words(0) == "zero" and numbers.to_words(15) == "fifteen" and numbers.to_words(40) == "forty"
    assert numbers.to_words(73_204) == "seventy-three thousand two hundred four"
    assert numbers.to_words(2_000_000_300) == "two billion three hundred"
    assert numbers.to_words(999_999_999_999).startswith("nine hundred ninety-nine billion")
    rng = random.Random(1)
    for _ in range(2000):
        n = rng.randint(0, 10 ** rng.randint(1, 12) - 1)
        words = numbers.to_words(n)
        assert _parse_words(words) == n and " and " not in words and "," not in words and words == words.lower()
    with pytest.raises(ValueError):
        numbers.to_words(10**12)


def test_numbers_splits_are_seeded_disjoint_and_cover_every_length():
    counts = {"train": 300, "dev": 50, "test": 100}
    rows = numbers.build(7, counts, 12)
    assert rows == numbers.build(7, counts, 12) and rows != numbers.build(8, counts, 12)
    assert {s: len(r) for s, r in rows.items()} == counts
    # test is drawn first, so a larger train split leaves dev and test as they were
    assert numbers.build(7, dict(counts, train=600), 12)["test"] == rows["test"]
    value = {s: {int((r["output"] if r["instruction"] == numbers.TO_DIGITS else r["input"]).replace(",", "")) for r in rs}
             for s, rs in rows.items()}
    assert not (value["train"] & value["test"]) and not (value["train"] & value["dev"]) and not (value["dev"] & value["test"])
    lengths = {len(str(n)) for n in value["train"]}
    assert lengths == set(range(1, 13))
    directions = [r["instruction"] for r in rows["train"]]
    assert 0.35 < directions.count(numbers.TO_WORDS) / len(directions) < 0.65
    for r in rows["test"]:
        n = int((r["output"] if r["instruction"] == numbers.TO_DIGITS else r["input"]).replace(",", ""))
        assert {r["input"], r["output"]} == {numbers.to_words(n), f"{n:,}"}
    with pytest.raises(ValueError, match="at most half"):
        numbers.build(0, {"train": 4, "dev": 1, "test": 1}, 1)


def test_exact_match_forgives_whitespace_only():
    assert numbers.exact_match("  seventy-three thousand\n two hundred four ", "seventy-three thousand two hundred four") == 1.0
    assert numbers.exact_match("Seventy-three thousand two hundred four", "seventy-three thousand two hundred four") == 0.0
    assert numbers.exact_match("73204", "73,204") == 0.0


def test_chrf_scores_identical_text_one_and_other_text_less():
    pytest.importorskip("sacrebleu")
    from experiments.quality.generation import score

    ref = "Return the number of items in the queue."
    assert score("chrf", ref, ref) == pytest.approx(1.0)
    assert 0.0 < score("chrf", "Return the items of the queue.", ref) < 1.0
    assert score("chrf", "", ref) == 0.0
    with pytest.raises(ValueError):
        score("bleu", ref, ref)


# --- statistics ------------------------------------------------------------------------------------------

def test_seed_interval_is_the_t_interval_of_the_paired_differences():
    s = stats.seed_interval([-0.10, -0.12, -0.08])
    half = 4.303 * 0.02 / math.sqrt(3)
    assert s["mean"] == pytest.approx(-0.10) and s["ci"] == pytest.approx((-0.10 - half, -0.10 + half))
    assert stats.seed_interval([0.1])["ci"] is None and stats.seed_interval([])["mean"] is None
    assert stats.t95(2) == 4.303 and stats.t95(11) == stats.T95[10] and stats.t95(100) == stats.T95[30]


def test_bootstrap_interval_is_seeded_weighted_and_brackets_the_statistic():
    rng = random.Random(0)
    diffs = [rng.gauss(-0.05, 0.2) for _ in range(400)]
    b = stats.bootstrap_interval(diffs, n_boot=2000, seed=3)
    assert b == stats.bootstrap_interval(diffs, n_boot=2000, seed=3)
    assert b["ci"][0] < b["mean"] < b["ci"][1] and b["mean"] == pytest.approx(sum(diffs) / 400)
    assert (b["ci"][1] - b["ci"][0]) == pytest.approx(2 * 1.96 * 0.2 / 20, rel=0.25)  # ~ the normal interval's width
    assert stats.bootstrap_interval([0.5] * 10)["ci"] == pytest.approx((0.5, 0.5))
    # token-weighted: loss sums over tokens, so the centre is the difference of the token means
    w = stats.bootstrap_interval([3.0, 1.0], [2, 1])
    assert w["mean"] == pytest.approx(4.0 / 3)
    with pytest.raises(ValueError):
        stats.bootstrap_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize("seed_ci, example_ci, higher, expected", [
    ((-0.2, -0.1), (-0.3, -0.05), False, stats.BETTER),      # loss: both below 0, MSPLoRA lower
    ((0.1, 0.2), (0.05, 0.3), False, stats.WORSE),
    ((0.1, 0.2), (0.05, 0.3), True, stats.BETTER),           # metric: both above 0, MSPLoRA higher
    ((-0.2, 0.1), (-0.3, -0.05), False, stats.UNRESOLVED),   # the seed interval holds 0
    ((-0.2, -0.1), (0.05, 0.3), False, stats.UNRESOLVED),    # the two disagree
    (None, (-0.3, -0.05), False, stats.UNRESOLVED),          # one seed: no seed interval, no verdict
    ((-0.2, -0.1), None, False, stats.UNRESOLVED),
])
def test_a_verdict_needs_both_intervals_to_exclude_zero_on_one_side(seed_ci, example_ci, higher, expected):
    assert stats.verdict(seed_ci, example_ci, higher) == expected


def test_compare_measure_pairs_by_seed_and_by_example():
    rng = random.Random(5)
    n = 300
    lora_ex = {s: [rng.random() < 0.5 for _ in range(n)] for s in (1, 2, 3)}
    msp_ex = {s: [float(v or rng.random() < 0.3) for v in lora_ex[s]] for s in (1, 2, 3)}  # strictly more right answers
    lora_ex = {s: [float(v) for v in vs] for s, vs in lora_ex.items()}
    mean = {s: sum(v) / n for s, v in msp_ex.items()}, {s: sum(v) / n for s, v in lora_ex.items()}
    c = stats.compare_measure(mean[0], mean[1], msp_ex, lora_ex, None, higher_is_better=True, n_boot=2000)
    assert c["seeds"] == [1, 2, 3] and c["mean_diff"] > 0.1 and c["verdict"] == stats.BETTER
    assert c["example_mean_diff"] == pytest.approx(c["mean_diff"]) and c["n_examples"] == n
    only_two = stats.compare_measure(mean[0], {1: mean[1][1], 4: 0.0}, msp_ex, lora_ex, None, higher_is_better=True)
    assert only_two["seeds"] == [1] and only_two["seed_ci"] is None and only_two["verdict"] == stats.UNRESOLVED


# --- the learning-rate search widens past a winning edge -----------------------------------------------

def _lr_result(grid_dir: Path, arm: str, lr: float, loss) -> None:
    cell = grid.Cell(arm, "lr", lr, 0)
    qlib.write_json(grid.cell_dir(grid_dir, cell.name) / "result.json",
                    {"name": cell.name, "arm": arm, "phase": "lr", "lr": lr, "seed": 0, "status": "ok", "final_eval_loss": loss,
                     "wall_s": 1})


def test_an_edge_choice_widens_the_search_then_settles(tmp_path):
    lrs = [3e-4, 1e-3, 3e-3]
    arms = [armlib.Arm("a", (0, 0, 4), armlib.QV, 100)]
    for lr, loss in zip(lrs, [2.0, 1.9, 1.8], strict=True):  # the largest rate wins
        _lr_result(tmp_path, "a", lr, loss)
    assert grid.search_lrs(tmp_path, "a", lrs, 0, widen=2) == [3e-4, 1e-3, 3e-3, 0.009]
    assert grid.best_lr(tmp_path, "a", lrs, 0, widen=2) == (None, False)  # the widened cell is still to run
    assert grid.best_lr(tmp_path, "a", lrs, 0, widen=0) == (3e-3, True)  # no widening: the edge is taken
    assert [c.lr for c in grid.planned_cells(tmp_path, arms, lrs, [1], 0, widen=2)] == [3e-4, 1e-3, 3e-3, 0.009]
    _lr_result(tmp_path, "a", 0.009, 1.7)  # the new edge wins again: one more step
    assert grid.search_lrs(tmp_path, "a", lrs, 0, widen=2)[-1] == 0.027
    _lr_result(tmp_path, "a", 0.027, 5.0)  # and loses: the best is inside, the search is done
    assert grid.best_lr(tmp_path, "a", lrs, 0, widen=2) == (0.009, True)
    finals = [c for c in grid.planned_cells(tmp_path, arms, lrs, [1], 0, widen=2) if c.phase == "final"]
    assert [c.name for c in finals] == ["a__final__lr0.009__s1"]
    assert grid.search_lrs(tmp_path, "b", lrs, 0, widen=2) == lrs  # nothing run for b


# --- generation and per-example losses on the shipped tiny model -----------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TINY).eval(), AutoTokenizer.from_pretrained(TINY)


def test_batched_greedy_generation_equals_the_generate_command_one_by_one(tiny):
    from experiments.quality import generation
    from msplora_dist.cli import generate as cli

    model, tok = tiny
    rows = qlib.read_jsonl(REPO / "msplora_dist" / "assets" / "data" / "instructions.jsonl")[:5]
    prompts = [generation.prompt_ids(tok, r) for r in rows]
    assert prompts == [generation.training_prefix(tok, r) for r in rows]  # what training conditioned the response on
    batched = generation.greedy_batched(model, tok, prompts, max_new_tokens=10, batch_size=3)
    for row, out in zip(rows, batched, strict=True):
        ids = cli.format_prompt(tok, row["instruction"], input=row.get("input", ""))
        assert out == cli.generate(model, tok, ids, max_new_tokens=10, temperature=0)


def test_example_losses_sum_to_the_trainers_loss(tiny):
    import torch

    from experiments.quality import generation
    from msplora_dist.train.data import collate, tokenize_row
    from msplora_dist.train.trainer import token_loss_sum

    model, tok = tiny
    rows = qlib.read_jsonl(REPO / "msplora_dist" / "assets" / "data" / "instructions.jsonl")[:7]
    per = generation.example_losses(model, tok, rows, max_seq_len=128, micro_batch_size=3)
    tokenized = [tokenize_row(r, "alpaca", tok, 128, False) for r in rows]
    with torch.no_grad():
        total = sum(token_loss_sum(model, collate(tokenized[i:i + 3], tok.pad_token_id)).item() for i in range(0, 7, 3))
    assert sum(s for s, _ in per) == pytest.approx(total, rel=1e-5)
    assert [n for _, n in per] == [t["num_loss_tokens"] for t in tokenized]
    out = generation.evaluate_model(model, tok, rows, "exact_match", max_new_tokens=4, batch_size=4, max_seq_len=128, micro_batch_size=3)
    assert out["n"] == 7 and out["prompt_mismatches"] == 0 and len(out["scores"]) == 7 and model.training is False
    assert out["loss_from_examples"] == pytest.approx(total / sum(n for _, n in per), rel=1e-5)


# --- the report from a synthetic grid ------------------------------------------------------------------

def _final(arm: dict, seed: int, loss: float, scores: list[float]) -> dict:
    n = len(scores)
    return {"name": f"{arm['name']}__final__lr0.001__s{seed}", "arm": arm["name"], "kind": arm["kind"], "phase": "final", "seed": seed,
            "lr": 1e-3, "status": "ok", "final_eval_loss": loss, "base_eval_loss": 3.0, "wall_s": 5.0, "trainable_params": arm["params"],
            "command": "python launch/train.py ...", "metric": "exact_match", "metric_mean": sum(scores) / n,
            "evaluation": {"metric": "exact_match", "metric_mean": sum(scores) / n, "n": n, "scores": scores,
                           "example_loss_sums": [loss * 10] * n, "example_loss_tokens": [10] * n}}


def test_report_renders_a_task_and_writes_every_cell_as_json(tmp_path):
    shape = armlib.SMOLLM2_135M
    arms = [armlib.arm_dict(a) for a in armlib.define_arms(projection_features(shape), 30)]
    by = {a["name"]: a for a in arms}
    root = tmp_path / "numbers"
    qlib.write_json(root / "task" / "manifest.json", {"task": "numbers", "metric": "exact_match", "seed": 1, "max_digits": 12,
                                                     **{s: {"rows": 4, "to_words": 2} for s in ("train", "dev", "test")}})
    qlib.write_json(root / "grid" / "grid.json", {"arms": arms, "seeds": [1, 2, 3], "search_seed": 0, "base": {"path": "models/x"}})
    for seed in (1, 2, 3):
        for arm, loss, scores in (("msp_qv_paper", 1.0 - 0.01 * seed, [1.0] * 30 + [0.0] * 10),
                                  ("lora_qv_r64", 1.1 - 0.01 * seed, [1.0] * 20 + [0.0] * 20)):
            r = _final(by[arm], seed, loss, scores)
            qlib.write_json(grid.cell_dir(root / "grid", r["name"]) / "result.json", r)
    t = report.task_results("numbers", root, None, tmp_path / "img", tmp_path / "quality.md", "p.png", n_boot=500)
    c = next(c for c in t["comparisons"] if c["msp"] == "msp_qv_paper" and c["lora"] == "lora_qv_r64")
    assert c["loss"]["mean_diff"] == pytest.approx(-0.1) and c["loss"]["verdict"] == stats.BETTER
    assert c["metric"]["mean_diff"] == pytest.approx(0.25) and c["metric"]["verdict"] == stats.BETTER
    assert c["params_ratio"] == pytest.approx(1 / 3)
    assert "**MSPLoRA better**" in t["markdown"] and (tmp_path / "img" / "p.png").stat().st_size > 1000
    assert re.search(r"`msp_all_third` \| MSPLoRA \| 1,628,160 \| – \| – ± – \(n=0\)", t["markdown"])  # not run: an empty row
    report.write_results_json(tmp_path / "r.json", "smol", Path("models/x"), [t])
    data = qlib.read_json(tmp_path / "r.json")["studies"]["smol"]["tasks"]["numbers"]
    assert len(data["cells"]) == 6 and "scores" not in data["cells"][0]["evaluation"]
    assert {k for k in ("arm", "seed", "lr", "trainable_params", "final_eval_loss", "metric_mean", "command")} <= set(data["cells"][0])
    assert data["comparisons"][0]["metric"]["verdict"] == stats.BETTER


def test_the_reading_states_the_range_both_intervals_leave_open_as_a_share_of_loras_gain():
    unresolved = {"seed_ci": [-0.011, 0.016], "example_ci": [-0.001, 0.0055], "verdict": stats.UNRESOLVED}
    barely = {"seed_ci": [-0.005, 3.6e-6], "example_ci": [-0.0048, -0.0004], "verdict": stats.UNRESOLVED}
    resolved = {"seed_ci": [0.01, 0.03], "example_ci": [0.02, 0.04], "verdict": stats.BETTER}
    comps = [{"msp": "m", "lora": "l", "params_ratio": 1 / 3, "loss": unresolved, "metric": resolved, "lora_gain": 0.5},
             {"msp": "m2", "lora": "l", "params_ratio": 1.0, "loss": barely, "metric": {"seed_ci": None, "example_ci": None},
              "lora_gain": 0.5}]
    text = tables.render_reading(comps, "chrf")
    first, second = text.splitlines()[-2:]
    assert tables.bounds(unresolved) == (-0.011, 0.016)  # the union: ruled out only where both exclude it
    assert "between -0.0110 and +0.0160 nats still open (-2.2% to +3.2% of the 0.500 nats LoRA gained" in first
    assert f"chrF **{stats.BETTER}**." in first and "chrF" not in second  # a resolved verdict has no open range
    assert "+3.6e-06 nats" in second  # a bound that barely crosses 0 does not print as +0.0000


def test_the_document_has_the_smol_blocks_and_an_unrun_task_says_so(tmp_path):
    doc = (REPO / "docs" / "quality.md").read_text()
    for name in ("status", "setup", "arms", "results"):
        assert f"<!-- BEGIN generated:smol:{name} -->" in doc and f"<!-- END generated:smol:{name} -->" in doc
        assert f"<!-- BEGIN generated:{name} -->" in doc  # the 22 M study keeps its own
    t = report.task_results("docstring", tmp_path, None, tmp_path, tmp_path / "q.md", "p.png", n_boot=10)
    assert "Not yet run" in t["markdown"] and len(t["arms"]) == 7
    assert report.render_status("smol", [t]).startswith("**Status: plan and code ready")
    assert tables.compare({}, "a", "b") is None


def test_a_file_split_for_two_calls_joins_back_and_refuses_a_missing_or_bad_part(tmp_path):
    from experiments.quality import bundle

    data = random.Random(2).randbytes(100_001)
    (tmp_path / "m.gguf").write_bytes(data)
    record = bundle.split_file(tmp_path / "m.gguf", 2, tmp_path / "parts")
    assert [p["bytes"] for p in record["parts"]] == [50_001, 50_000]
    assert bundle.join_file(tmp_path / "parts", tmp_path / "out" / "m.gguf").read_bytes() == data
    (tmp_path / "parts" / "m.gguf.part1").write_bytes(b"x" * 50_000)
    with pytest.raises(SystemExit, match="part1 does not match"):
        bundle.join_file(tmp_path / "parts", tmp_path / "again.gguf")
    (tmp_path / "parts" / "m.gguf.part0").unlink()
    with pytest.raises(SystemExit, match="part0 is missing"):
        bundle.join_file(tmp_path / "parts", tmp_path / "again.gguf")
    assert not (tmp_path / "again.gguf").exists()
