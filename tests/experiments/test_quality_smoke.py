"""The cheap parts of the quality test (experiments/quality/, docs/quality.md), no training: the corpus split and
tokenizer on a few standard-library modules, the docstring task, parameter matching of the grid's arms, the
grid's learning-rate protocol and cell configurations, a failing cell in a worker, the report's statistics
and the bundles. The end-to-end run with training is `python -m experiments.quality.smoke` (a few minutes)."""

from __future__ import annotations

import ast
import json
import math
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from experiments.quality import arms as armlib
from experiments.quality import bundle, grid, make_task, prepare, qlib, report, tables, worker
from msplora_dist import MSPLoRAConfig, count_params
from msplora_dist.train.backbone import projection_features
from msplora_dist.train.config import TrainConfig
from msplora_dist.train.flags import parse_config
from msplora_dist.utils.fileio import sha256_file

REPO = Path(__file__).resolve().parents[2]

# --- corpus --------------------------------------------------------------------------------------------

def test_units_follow_their_module():
    rels = ["json/__init__.py", "json/decoder.py", "decimal.py", "_pydecimal.py", "io.py", "_pyio.py", "urllib/parse.py",
            "test/test_json/test_dump.py", "test/test_urllib2.py", "test/test_decimal.py", "test/support/__init__.py",
            "test/test_grammar.py", "_collections_abc.py", "collections/__init__.py", "os.py"]
    units = prepare.assign_units(rels)
    assert units["json/decoder.py"] == units["test/test_json/test_dump.py"] == "json"
    assert units["_pydecimal.py"] == units["test/test_decimal.py"] == "decimal"
    assert units["_pyio.py"] == "io"
    assert units["test/test_urllib2.py"] == "urllib"
    assert units["_collections_abc.py"] == "collections"
    assert units["test/support/__init__.py"] == units["test/test_grammar.py"] == prepare.CATCH_ALL_UNIT
    roles = prepare.split_units(units.values(), 0.5, "salt")
    assert roles[prepare.CATCH_ALL_UNIT] == "pretrain"  # the catch-all is never held out
    assert roles == prepare.split_units(reversed(list(units.values())), 0.5, "salt")  # order-free, deterministic
    assert qlib.stable_fraction("json", "a") != qlib.stable_fraction("json", "b")


def test_stdlib_archive_is_deterministic_and_reads_back(tmp_path):
    lib = tmp_path / "lib"
    files = {"json/__init__.py": 'def f():\n    """Doc."""\n    return 1\n', "os.py": "x = 1\n",
             "site-packages/pkg.py": "no", "__pycache__/os.cpython.py": "no"}
    for rel, text in files.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(text)
    a = prepare.write_archive(lib, tmp_path / "a.tgz")
    b = prepare.write_archive(lib, tmp_path / "b.tgz")
    assert a["sha256"] == b["sha256"] and a["files"] == 2  # same bytes whatever the name; no third-party or cache files
    root, source = prepare.open_stdlib(tmp_path / "a.tgz", tmp_path / "x")
    assert prepare.list_source_files(root) == ["json/__init__.py", "os.py"] and "archive" in source["stdlib_source"]
    assert (root / "json/__init__.py").read_text() == files["json/__init__.py"]


def _small_units(n_pretrain: int = 3, n_task: int = 3) -> list[str]:
    """A few small units of each role of this Python's standard library; task units with docstrings."""
    root = prepare.stdlib_dir()
    rels = prepare.list_source_files(root)
    units = prepare.assign_units(rels)
    roles = prepare.split_units(units.values(), 0.3, prepare.DEFAULT_SALT)
    files_of: dict[str, list[str]] = {}
    for rel, u in units.items():
        files_of.setdefault(u, []).append(rel)
    size = {u: sum((root / f).stat().st_size for f in fs) for u, fs in files_of.items()}
    pick = {"pretrain": [], "task": []}
    for u in sorted(files_of, key=lambda u: (size[u], u)):
        role = roles[u]
        if size[u] < 3000 or len(pick[role]) >= (n_pretrain if role == "pretrain" else n_task):
            continue
        if role == "task":
            n_doc = sum(len(make_task.extract_functions((root / f).read_text("utf-8", "replace"), f)) for f in files_of[u])
            if n_doc < 3:
                continue
        pick[role].append(u)
    assert len(pick["pretrain"]) == n_pretrain and len(pick["task"]) == n_task
    return pick["pretrain"] + pick["task"]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    prepare.main(["--root", str(root), "--units", ",".join(_small_units()), "--vocab_size", "600"])
    make_task.main(["--root", str(root), "--min_doc_chars", "10", "--test_fraction", "0.3", "--dev_fraction", "0.2"])
    return root


def test_prepare_splits_modules_and_writes_a_loadable_tokenizer(small_root):
    manifest = qlib.read_json(small_root / "corpus" / "manifest.json")
    assert manifest["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    task_units = set(manifest["task_units"])
    records = {role: qlib.read_jsonl(small_root / "corpus" / f"{role}.jsonl") for role in prepare.ROLES}
    assert records["pretrain"] and records["task"]
    assert all(r["unit"] in task_units for r in records["task"])
    assert not any(r["unit"] in task_units for r in records["pretrain"] + records["pretrain_val"])  # base never sees them
    root = Path(manifest["stdlib_dir"])
    for f in manifest["files"][:5]:
        assert sha256_file(root / f["path"]) == f["sha256"]
    assert [f["path"] for f in manifest["files"]] == sorted(f["path"] for f in manifest["files"])

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_root / "tokenizer")
    text = records["task"][0]["text"][:2000].lstrip()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte fallback: any text round-trips, also unseen modules
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 3


def test_task_rows_are_docstring_free_code_and_splits_share_no_file(small_root):
    rows = {s: qlib.read_jsonl(small_root / "task" / f"{s}.jsonl") for s in make_task.SPLITS}
    manifest = qlib.read_json(small_root / "task" / "manifest.json")
    assert all(rows[s] for s in make_task.SPLITS)
    outputs = [r["output"] for s in make_task.SPLITS for r in rows[s]]
    assert len(outputs) == len(set(outputs))  # each docstring once: no eval answer is a train answer
    for s in make_task.SPLITS:
        assert sha256_file(small_root / "task" / f"{s}.jsonl") == manifest["sha256"][s]
        for r in rows[s]:
            assert r["instruction"] == qlib.TASK_INSTRUCTION and r["output"].strip() == r["output"]
            fn = ast.parse(r["input"]).body[0]
            assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(fn) is None
        assert all(m["tokens"] <= 512 for m in manifest["functions"][s])
    files = {s: {m["path"] for m in manifest["functions"][s]} for s in make_task.SPLITS}
    assert not (files["train"] & files["dev"]) and not (files["train"] & files["test"]) and not (files["dev"] & files["test"])


def test_strip_docstring_cases():
    src = '''
import functools

@functools.cache
def f(a,
      b=1):
    """Add.

    Longer.
    """
    return a + b

def g(): "one line"; return 1

class C:
    def m(self):
        \'\'\'Method doc.\'\'\'
        def inner():
            """Nested: not a row of its own."""
            return 2
        return inner()

    def only_doc(self):
        """Nothing else."""
'''
    found = {f["name"]: f for f in make_task.extract_functions(src, "x.py")}
    assert set(found) == {"f", "m"}  # g: docstring shares its line; only_doc: body is the docstring alone; inner: nested
    assert found["f"]["code"] == "@functools.cache\ndef f(a,\n      b=1):\n    return a + b"
    assert found["f"]["docstring"] == "Add.\n\nLonger."
    assert found["m"]["code"].startswith("def m(self):\n    def inner():") and "Nested" in found["m"]["code"]


def test_assign_splits_keeps_big_files_out_of_eval_and_fills_every_split():
    rows = {f"f{i}.py": 3 for i in range(30)} | {"big.py": 200}
    split = make_task.assign_splits(rows, {"train": 0.7, "dev": 0.1, "test": 0.2}, "s")
    assert split["big.py"] == "train" and set(split.values()) == {"train", "dev", "test"}
    assert split == make_task.assign_splits(dict(reversed(list(rows.items()))), {"train": 0.7, "dev": 0.1, "test": 0.2}, "s")


# --- grid ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["base", "smoke"])
def test_matched_arms_have_the_same_trainable_parameters(preset):
    shape = qlib.MODEL_PRESETS[preset]
    features, L = projection_features(shape), shape["num_hidden_layers"]
    arms = {a.name: a for a in armlib.define_arms(features, L, groups=3, tol=0.03)}
    for a in arms.values():
        cfg = MSPLoRAConfig(ranks=a.ranks, target_modules=a.targets, num_mid_groups=3)
        assert a.params == count_params(cfg, L, {t: features[t] for t in a.targets}).total
        if a.matched_to:
            assert abs(a.params / arms[a.matched_to].params - 1) <= 0.03, a
        if a.kind == "MSPLoRA":
            assert a.ranks[0] >= a.ranks[1] >= a.ranks[2] >= 1  # a pyramid
    assert arms["msp_qv_paper"].ranks == (64, 32, 16) and arms["lora_qv_r64"].ranks == (0, 0, 64)
    assert arms["msp_qv_paper"].params < arms["lora_qv_r64"].params
    if preset == "base":  # the numbers docs/quality.md quotes
        assert arms["lora_qv_r64"].params == 851_968 and arms["msp_qv_paper"].params == 479_232
        assert arms["msp_qv_eq_lora64"].ranks == (117, 57, 28) and arms["msp_all_eq_lora16"].ranks == (30, 14, 7)


def test_match_keeps_the_shape_and_refuses_the_impossible():
    features = projection_features(qlib.MODEL_PRESETS["base"])
    target = armlib.trainable_params((0, 0, 64), armlib.QV, features, 8, 3)
    g, m, low = armlib.match_msplora_ranks(target, armlib.QV, features, 8, 3)
    assert 1.6 < g / m < 2.5 and 1.6 < m / low < 2.5
    with pytest.raises(ValueError):
        armlib.match_msplora_ranks(10, armlib.QV, features, 8, 3)  # below one rank of everything


def _write_result(grid_dir: Path, cell: grid.Cell, loss, status: str = "ok") -> None:
    qlib.write_json(grid.cell_dir(grid_dir, cell.name) / "result.json",
                    {"name": cell.name, "arm": cell.arm, "phase": cell.phase, "lr": cell.lr, "seed": cell.seed, "status": status,
                     "final_eval_loss": loss, "base_eval_loss": 3.0, "wall_s": 10.0})


def test_lr_search_then_final_cells(tmp_path):
    arms = [armlib.Arm("a", (0, 0, 4), armlib.QV, 100), armlib.Arm("b", (4, 2, 1), armlib.QV, 60)]
    lrs, seeds = [1e-4, 1e-3, 1e-2], [1, 2]
    cells = grid.planned_cells(tmp_path, arms, lrs, seeds, 0)
    assert [c.phase for c in cells] == ["lr"] * 6  # no final cell before its arm's search is done
    for lr, loss in zip(lrs, [2.0, 1.5, None], strict=True):
        _write_result(tmp_path, grid.Cell("a", "lr", lr, 0), loss, "ok" if loss else "diverged")
    assert grid.best_lr(tmp_path, "a", lrs, 0) == (1e-3, True)
    assert grid.best_lr(tmp_path, "b", lrs, 0) == (None, False)
    cells = grid.planned_cells(tmp_path, arms, lrs, seeds, 0)
    finals = [c.name for c in cells if c.phase == "final"]
    assert finals == ["a__final__lr0.001__s1", "a__final__lr0.001__s2"]
    assert grid.planned_cells(tmp_path, arms, [1e-3], seeds, 0)[0].name == "a__final__lr0.001__s1"  # one lr: no search
    assert grid.is_done(qlib.read_json(grid.cell_dir(tmp_path, "a__lr__lr0.01__s0") / "result.json"), retry_errors=True)
    assert not grid.is_done({"status": "error"}, retry_errors=True) and grid.is_done({"status": "error"}, retry_errors=False)


def test_a_cells_config_is_the_command_it_records(tmp_path):
    arm = armlib.Arm("msp", (4, 2, 1), armlib.QV, 60)
    values = grid.cell_values(grid.Cell("msp", "final", 3e-4, 2), arm, grid.Protocol(), tmp_path, tmp_path / "grid")
    argv = shlex.split(grid.train_command(values))
    assert argv[:2] == ["python", "launch/train.py"]
    cfg = TrainConfig(**values)
    assert parse_config(argv[2:]) == cfg  # the recorded command trains exactly the cell
    assert (cfg.ranks, cfg.target_modules, cfg.lr, cfg.seed, cfg.alphas) == ((4, 2, 1), armlib.QV, 3e-4, 2, (16.0,) * 3)
    assert [s.path for s in cfg.eval_data] == [str(tmp_path / "task" / "test.jsonl")]
    assert cfg.output_dir == str(tmp_path / "grid" / "cells" / "msp__final__lr0.0003__s2")


def test_a_worker_that_dies_fails_only_its_cell():
    w = worker.Worker(0, grid.cell_env(0, 1, None))
    w.proc.kill()
    w.proc.join(30)
    w.busy_since = time.perf_counter()  # as if it had been training a cell
    outcome = w.poll()
    assert outcome["status"] == "error" and outcome["retire"] and f"worker process {w.proc.pid} ended" in outcome["error"]
    w.kill()


def _tiny_root(root: Path) -> None:
    """An experiment root on the shipped tiny model and a few of the shipped instruction rows."""
    assets = REPO / "msplora_dist" / "assets"
    shutil.copytree(assets / "tiny_llama", root / "base")
    rows = qlib.read_jsonl(assets / "data" / "instructions.jsonl")
    for split, part in (("train", rows[:16]), ("dev", rows[16:20]), ("test", rows[20:24])):
        qlib.write_jsonl(root / "task" / f"{split}.jsonl", part)
    qlib.write_json(root / "task" / "manifest.json", {"sha256": {}})


@pytest.mark.slow
def test_grid_trains_its_cells_in_one_worker_records_a_failed_one_and_resumes(tmp_path):
    _tiny_root(tmp_path)
    # lr -1 is refused by TrainConfig: that cell fails; the search picks 1e-3 and the final cell trains at it.
    argv = ["--root", str(tmp_path), "--arms", "msp_qv_paper", "--lrs", "1e-3,-1", "--seeds", "1", "--steps", "2",
            "--micro_batch_size", "4", "--eval_steps", "2", "--max_seq_len", "128", "--jobs", "1"]
    counts = grid.main(argv)
    assert (counts["ran"], counts["ok"], counts["failed"], counts["workers_started"], counts["pending"]) == (3, 2, 1, 1, 0)
    results = {r["name"]: r for r in report.load_results(tmp_path / "grid")}
    bad = results["msp_qv_paper__lr__lr-1__s0"]
    assert bad["status"] == "error" and "lr=-1.0" in bad["error"] and bad["final_eval_loss"] is None
    assert "lr=-1.0" in (tmp_path / "grid" / "cells" / bad["name"] / "train.log").read_text()  # the cell's own log
    good = [results["msp_qv_paper__lr__lr0.001__s0"], results["msp_qv_paper__final__lr0.001__s1"]]
    assert all(r["status"] == "ok" and math.isfinite(r["final_eval_loss"]) and r["steps"] == 2 for r in good)
    assert good[1]["eval_split"] == "test" and good[1]["train_config"]["eval_data"].endswith("task/test.jsonl")
    # One process trained every cell, one after another.
    assert {r["worker"]["pid"] for r in results.values()} == {good[0]["worker"]["pid"]}
    assert sorted(r["worker"]["cells_before"] for r in results.values()) == [0, 1, 2]
    assert (tmp_path / "grid" / "cells" / good[1]["name"] / "adapter" / "msplora_config.json").exists()
    # The final cell generated for its test rows on the model it trained, through the DeepSpeed engine's module.
    ev = good[1]["evaluation"]
    assert good[1]["metric"] == "chrf" and ev["n"] == 4 and ev["prompt_mismatches"] == 0 and "metric_mean" not in good[0]
    assert math.isclose(ev["loss_from_examples"], good[1]["final_eval_loss"], rel_tol=1e-4)  # the trainer's test loss, per example
    assert len(qlib.read_jsonl(tmp_path / "grid" / "cells" / good[1]["name"] / "generations.jsonl")) == 4
    assert grid.main(argv)["ran"] == 0  # finished cells (the failed one too) are skipped on a rerun


# --- report and bundles ----------------------------------------------------------------------------------

def test_report_statistics_and_blocks(tmp_path):
    arms = [dict(name="msp", kind="MSPLoRA", params=50, targets=list(armlib.QV), ranks=[4, 2, 1]),
            dict(name="lora", kind="LoRA", params=100, targets=list(armlib.QV), ranks=[0, 0, 8])]
    results = []
    for seed, (a, b) in enumerate([(2.00, 2.10), (2.02, 2.11), (2.01, 2.12)], start=1):
        results += [{"arm": "msp", "phase": "final", "seed": seed, "status": "ok", "final_eval_loss": a, "base_eval_loss": 3.0,
                     "lr": 1e-3, "wall_s": 5, "name": f"m{seed}"},
                    {"arm": "lora", "phase": "final", "seed": seed, "status": "ok", "final_eval_loss": b, "base_eval_loss": 3.0,
                     "lr": 1e-3, "wall_s": 5, "name": f"l{seed}"}]
    stats = tables.aggregate(results, arms)
    assert stats["msp"]["n"] == 3 and math.isclose(stats["msp"]["mean"], 2.01)
    c = tables.compare(stats, "msp", "lora")
    # no per-example values (a grid of the 22 M study, loss only): the seed interval alone, so no verdict
    assert c["loss"]["seed_ci"][1] < 0 and math.isclose(c["loss"]["mean_diff"], -0.1) and c["loss"]["example_ci"] is None
    assert c["loss"]["verdict"] == "no difference resolved" and c["metric"]["verdict"] == "not run yet"
    assert math.isclose(c["gain_ratio"], (3 - 2.01) / (3 - 2.11))
    results[1]["final_eval_loss"] = 1.9  # seed 1's LoRA much better: the interval now spans 0
    c = tables.compare(tables.aggregate(results, arms), "msp", "lora")
    assert c["loss"]["seed_ci"][0] < 0 < c["loss"]["seed_ci"][1]
    assert tables.plot_vs_params(stats, tmp_path / "p.png", "t").stat().st_size > 1000

    doc = (REPO / "docs" / "quality.md").read_text()
    for name in ("status", "setup", "arms", "results"):
        assert f"<!-- BEGIN generated:{name} -->" in doc and f"<!-- END generated:{name} -->" in doc
    out = report.replace_block(doc, "results", "NEW")
    assert "NEW\n<!-- END generated:results -->" in out and report.replace_block(out, "results", "NEW") == out
    assert "<!-- BEGIN generated:smol:results -->" in out  # another study's block is left alone


def test_bundle_round_trip_in_parts(tmp_path):
    root = tmp_path / "root"
    (root / "base").mkdir(parents=True)
    (root / "base" / "model.bin").write_bytes(random.Random(0).randbytes(1_000_000))  # incompressible: several 0.25 MiB parts
    (root / "task").mkdir()
    (root / "task" / "train.jsonl").write_text(json.dumps({"a": 1}) + "\n")
    (root / "corpus").mkdir()
    (root / "corpus" / "manifest.json").write_text("{}")
    (root / "corpus" / "pretrain.jsonl").write_text("never packed")
    manifest = bundle.pack(root, bundle.base_members(root), tmp_path / "out", "base", part_mb=0.25)
    assert len(manifest["parts"]) >= 2 and "corpus/pretrain.jsonl" not in manifest["members"]
    bundle.unpack(tmp_path / "out", tmp_path / "back")
    assert (tmp_path / "back" / "base" / "model.bin").read_bytes() == (root / "base" / "model.bin").read_bytes()
    assert not (tmp_path / "back" / "corpus" / "pretrain.jsonl").exists()
    part = tmp_path / "out" / manifest["parts"][0]["file"]
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(SystemExit, match="sha256"):
        bundle.unpack(tmp_path / "out", tmp_path / "again")
