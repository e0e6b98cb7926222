"""Experiment tracking: a training run's numbers and files, sent to mlflow as they are made.

  python train.py --tracker=mlflow [--tracker-uri=URI]     # needs: pip install -r requirements-tracking.txt
  mlflow ui --backend-store-uri sqlite:///runs/mlflow.db   # browse, from the repo root (the full `mlflow` package)

Only the client is used (`mlflow-skinny`, with SQLAlchemy and Alembic for a database store):
params (the config), the loss at every log interval, per-epoch figures, the final mAP / CF1 / OF1 /
per-class AP, caption quality and ReSO, and report.json and the AP plot as artifacts. The default
store is the one mlflow 3 recommends for a single machine, a SQLite file, runs/mlflow.db, with the
artifacts beside it in runs/mlartifacts; `--tracker-uri` names a server or another store. A
tracker that does not answer within a few seconds stops the run before any work. A run folder
remembers its mlflow run (`mlflow_run.json`), so a resumed run goes on logging into the same
mlflow run. Only the main process of a torchrun job tracks.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import data

ROOT = Path(__file__).resolve().parent
DEFAULT_DB = ROOT / "runs" / "mlflow.db"   # the default store; absolute, so any working directory finds it
ANSWER_SECONDS = 5                  # a tracker slower than this to answer a run's first requests is not there
RUN_ID_FILE = "mlflow_run.json"      # in the run folder: the mlflow run a resume continues
INSTALL = "pip install -r requirements-tracking.txt"


class Tracker:
    """No tracking: every call does nothing (no --tracker, or not the main process)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_report(self, report: dict, report_file: Path) -> None:
        pass

    def end(self, status: str) -> None:
        pass


def store_uri(uri: str) -> str:
    """The tracking URI a run logs to: --tracker-uri, or the default SQLite file."""
    return uri or f"sqlite:///{DEFAULT_DB.as_posix()}"


def check_available(tracker: str, uri: str = "") -> None:
    """Before any work: the chosen tracker's package is there, and a tracking server at
    --tracker-uri answers (a local store is a file: it answers at once, or fails when opened).
    A one-line ValueError otherwise: a run should not go silently untracked."""
    if tracker != "mlflow":
        return
    if importlib.util.find_spec("mlflow") is None:
        raise ValueError(f"--tracker=mlflow needs mlflow: {INSTALL}")
    if uri.startswith(("http://", "https://")):
        from mlflow.exceptions import MlflowException

        try:
            with answering_quickly():
                mlflow_client(uri).search_experiments(max_results=1)
        except MlflowException as e:
            raise ValueError(f"--tracker-uri={uri}: {reason(e)}") from None


@contextlib.contextmanager
def answering_quickly():
    """mlflow's client retries a server that does not answer for about 4 minutes (7 retries with
    backoff, a 120 s timeout each): while a run starts, one try with a short timeout instead
    (mlflow reads these at each request); the run's own logging keeps mlflow's patience."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(ANSWER_SECONDS)}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reason(e: Exception) -> str:
    """Why a store refused, in a few words: mlflow wraps a failed request in urllib3's messages."""
    text = str(e)
    if "timed out" in text:
        return f"no answer within {ANSWER_SECONDS} s"
    cause = re.search(r"\[Errno -?\d+\][^\"'()]+", text)      # connection refused, unknown host
    if cause:
        return f"no answer ({cause.group(0).strip()})"
    return text.split(". Response body")[0].splitlines()[0][:200]


def numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) dict as flat metric names: {"test/AP/cat": 91.2}."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def mlflow_client(uri: str):
    """mlflow's client for a tracking URI. A local folder (file:) is mlflow's file store, which
    mlflow 3 keeps in maintenance mode behind an opt-in: given by name, it is still opened."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's files go: beside a SQLite file (mlartifacts/<experiment>);
    mlflow's own choice for a SQLite store is ./mlruns in whatever folder the run started from.
    Other stores (a server, a file: folder) keep their own choice (None)."""
    path = uri.removeprefix("sqlite:///")
    if path == uri or not path or path == ":memory:":
        return None
    return (Path(path).resolve().parent / "mlartifacts" / experiment).as_uri()


def read_run_record(out_dir: Path) -> dict | None:
    """The mlflow run a run folder logs to ({"run_id", "tracking_uri"}), None when it has none;
    a record that is not one (garbage from a killed write, a list) is one line naming the file."""
    record = Path(out_dir) / RUN_ID_FILE
    if not record.is_file():
        return None
    known = data.read_json(record, "mlflow run record")
    for field in ("run_id", "tracking_uri"):
        if not isinstance(known, dict) or not isinstance(known.get(field), str) or not known[field]:
            raise data.DataError(record, f"field {field} is not a non-empty string: not a run record train.py "
                                         "writes (remove it to log the resumed run as a new mlflow run)")
    return known


class MlflowTracker(Tracker):
    """One mlflow run per run folder, through mlflow's client (no global active run)."""

    def __init__(self, cfg, preset: str, out_dir: Path, resumed: bool):
        from mlflow.entities import Param

        known = read_run_record(out_dir) if resumed else None
        # a resumed run goes on where it began (before SQLite, the default store was runs/mlruns)
        uri = known["tracking_uri"] if known else store_uri(cfg.tracker_uri)
        if uri == store_uri(""):
            DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow_client(uri)
        if known:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = f"bacgcn-{cfg.dataset}"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(name, artifact_location=artifact_location(uri, name)))
        run = self.client.create_run(experiment_id, run_name=out_dir.name, tags={"preset": preset})
        self.run_id = run.info.run_id
        data.write_json(out_dir / RUN_ID_FILE, {"run_id": self.run_id, "tracking_uri": uri}, indent=None)
        params = {**json.loads(cfg.to_json()), "preset": preset}
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        batch = [Metric(k, v, now, step) for k, v in numbers(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_report(self, report: dict, report_file: Path) -> None:
        """The final figures (test metrics, per-class AP, zero-shot, caption quality, ReSO),
        report.json and the per-class AP plot."""
        import figures

        keep = ("mAP", "mAP_small", "mAP_large", "CF1", "OF1", "AP", "zeroshot", "caption_quality", "reso")
        self.log_metrics({k: report[k] for k in keep if k in report}, step=0)
        self.client.log_artifact(self.run_id, str(report_file))
        with tempfile.TemporaryDirectory() as tmp:
            plot = Path(tmp) / "ap.png"
            figures.ap_figure([figures.APSeries(report_file.parent.name, report["AP"], report["mAP"])]).save(plot)
            self.client.log_artifact(self.run_id, str(plot))

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def open_tracker(cfg, preset: str, out_dir: Path, resumed: bool, main_process: bool) -> Tracker:
    """The run's tracker; a store that refuses the run, or a server that does not answer within
    ANSWER_SECONDS, is a one-line ValueError naming it."""
    if not (cfg.tracker == "mlflow" and main_process):
        return Tracker()
    from mlflow.exceptions import MlflowException

    try:
        with answering_quickly():
            return MlflowTracker(cfg, preset, out_dir, resumed)
    except MlflowException as e:                # a server's refusal or silence
        raise ValueError(f"--tracker-uri={store_uri(cfg.tracker_uri)}: {reason(e)}") from None
    except OSError as e:                        # a local store that cannot be written
        raise ValueError(f"--tracker-uri={store_uri(cfg.tracker_uri)}: {str(e).splitlines()[0][:200]}") from None
