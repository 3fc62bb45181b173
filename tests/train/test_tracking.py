"""--report_to: the trainer's scalars reach TensorBoard, wandb (offline) and mlflow (local store), the step-0 eval
included; unknown or missing backends are refused before anything runs. wandb and mlflow are optional: their
tests skip where the package is not installed (`pip install -e ".[tracking]"`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from msplora_dist.errors import ConfigError
from msplora_dist.train.flags import parse_config
from msplora_dist.train.tracking import Tracker
from tests.launch_utils import run_train

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("wandb", "mlflow")}
needs = {name: pytest.mark.skipif(not ok, reason=f"{name} not installed") for name, ok in HAVE.items()}


def tensorboard_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(out: Path) -> bytes:
    """The transaction log of the single offline run under out/wandb. wandb (0.2x on) has no Python reader for it;
    its history records hold each key and its value's JSON as plain protobuf strings."""
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    return runs[0].read_bytes()


def mlflow_metric(out: Path, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("msplora").experiment_id])
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_report_to_is_checked_and_none_turns_every_backend_off():
    assert parse_config([]).report_to == ("tensorboard",)
    assert parse_config(["--report_to", "none"]).report_to == ()
    with pytest.raises(ConfigError, match="'comet' is not a backend; expected a comma-separated list of tensorboard, wandb, mlflow"):
        parse_config(["--report_to", "tensorboard,comet"])
    for name, ok in HAVE.items():
        if not ok:
            with pytest.raises(ConfigError, match=f"report_to includes {name}, which is not installed"):
                parse_config(["--report_to", name])


@pytest.mark.parametrize("backend", ["tensorboard", pytest.param("wandb", marks=needs["wandb"]),
                                     pytest.param("mlflow", marks=needs["mlflow"])])
def test_tracker_writes_every_scalar_at_its_step(backend, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker((backend,), tmp_path, {"lr": 0.003, "ranks": [8, 4, 2]})
    for step, value in ((0, 3.5), (1, 2.25), (2, 1.5)):
        tracker.add_scalar("eval/loss", value, step)
    tracker.close()
    if backend == "tensorboard":
        assert tensorboard_scalars(tmp_path / "tb")["eval/loss"] == [(0, 3.5), (1, 2.25), (2, 1.5)]
    elif backend == "wandb":
        records = wandb_records(tmp_path)
        assert records.count(b"eval/loss") >= 3 and all(v in records for v in (b"3.5", b"2.25", b"1.5"))
    else:
        assert mlflow_metric(tmp_path, "eval/loss") == [(0, 3.5), (1, 2.25), (2, 1.5)]
    assert not (tmp_path / "tb").exists() or backend == "tensorboard", "only the backends asked for write anything"


@pytest.mark.slow
def test_a_run_logs_the_step_0_eval_to_every_backend(tmp_path):
    backends = ["tensorboard", *(name for name, ok in HAVE.items() if ok)]
    out = tmp_path / "run"
    run_train(out, "--ds_config", "ds_configs/zero2.json", "--max_steps", "2", "--eval_steps", "1", "--analyze", "false",
              "--report_to", ",".join(backends))
    evals = [(h["step"], h["eval_loss"]) for h in json.loads((out / "summary.json").read_text())["history"] if "eval_loss" in h]
    assert [s for s, _ in evals] == [0, 1, 2]
    tb = tensorboard_scalars(out / "tb")
    assert [s for s, _ in tb["eval/loss"]] == [0, 1, 2]
    assert [v for _, v in tb["eval/loss"]] == pytest.approx([v for _, v in evals], rel=1e-6)
    assert [s for s, _ in tb["train/loss"]] == [1, 2]
    if HAVE["wandb"]:
        assert wandb_records(out).count(b"eval/loss") >= 3 and wandb_records(out).count(b"train/loss") >= 2
    if HAVE["mlflow"]:
        logged = mlflow_metric(out, "eval/loss")
        assert [s for s, _ in logged] == [0, 1, 2] and [v for _, v in logged] == pytest.approx([v for _, v in evals], rel=1e-6)
