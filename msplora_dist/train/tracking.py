"""Where the trainer's scalars go: TensorBoard, Weights & Biases, MLflow, any of them (--report_to).

Tracker has the two calls the trainer makes of a TensorBoard SummaryWriter, add_scalar(tag, value, step) and
close(), and fans them out to every backend asked for; with none it does nothing. Only rank 0 makes one.

- tensorboard: {output_dir}/tb.
- wandb: offline by default (WANDB_MODE overrides it: `WANDB_MODE=online` after `wandb login`), files under
  {output_dir}/wandb; `wandb sync {output_dir}/wandb/offline-run-*` uploads an offline run later.
- mlflow: MLFLOW_TRACKING_URI when set, else a local SQLite store {output_dir}/mlflow.db (`mlflow ui
  --backend-store-uri sqlite:///$PWD/runs/default/mlflow.db`). The run's config goes in as parameters.
"""

from __future__ import annotations

import os
from pathlib import Path


class Tracker:
    def __init__(self, backends: tuple[str, ...], output_dir: Path, config: dict):
        self.backends = tuple(backends)
        self._tb = self._wandb = self._mlflow = None
        name = Path(output_dir).resolve().name
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tb"))
        if "wandb" in backends:
            import wandb

            (Path(output_dir) / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "msplora"), name=name, dir=str(output_dir),
                                     mode=os.environ.get("WANDB_MODE", "offline"), config=config, reinit="create_new")
        if "mlflow" in backends:
            import mlflow

            # mlflow 3 refuses its old ./mlruns file store by default; its local store is now a SQLite file.
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"
            self._mlflow = mlflow.MlflowClient(tracking_uri=uri)
            experiment = self._mlflow.get_experiment_by_name("msplora")
            experiment_id = experiment.experiment_id if experiment else self._mlflow.create_experiment(
                "msplora", artifact_location=(Path(output_dir) / "mlartifacts").resolve().as_uri())
            self._mlflow_run = self._mlflow.create_run(experiment_id, run_name=name).info.run_id
            for key, value in config.items():  # parameters are strings of at most 6000 characters
                self._mlflow.log_param(self._mlflow_run, key, str(value)[:6000])

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log({tag: value}, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metric(self._mlflow_run, tag, value, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._mlflow_run)
            self._mlflow = None
