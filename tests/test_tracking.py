"""`--tracker=mlflow`: a short run against a real `mlflow server` on the loopback, stopped and
resumed into the same mlflow run, read back with mlflow's own client; the default store (a SQLite
file) and a file: store read back the same way; and the one lines: what to install, a store that
cannot be written, a tracker that does not answer. Runs are commands of their own (the CPU path,
not the Triton interpreter of in-process tests). Nothing here reaches beyond 127.0.0.1."""
import errno
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

import config
import tracking
import train
from tests.conftest import world_fixture
from tests.helpers import launch_train, stop_after

# The full mlflow (the server), the extra's version, in a venv of its own so that the trainer's
# venv holds only the extra and these tests prove it is enough (the Makefile's test setup).
SERVER = tracking.ROOT / ".venv" / "mlflow-server" / "bin" / "mlflow"
ANSWER_LIMIT = 15                     # s: a tracker that does not answer is an error by then, not a hang


world = world_fixture(seed=5, train=160, test=40)


@pytest.fixture
def loopback(monkeypatch):
    """Requests to 127.0.0.1 go there, not to a proxy the environment names (children inherit it)."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")


@pytest.fixture
def mlflow_server(tmp_path, loopback):
    """A real `mlflow server` on a free loopback port (SQLite behind it, artifacts proxied), its
    URI; ready within a bounded wait, and always stopped with all its processes."""
    if not SERVER.is_file():
        pytest.skip(f"no mlflow server at {SERVER} (make .venv/.test-installed installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(SERVER), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                                 "--artifacts-destination", str(tmp_path / "server-artifacts")],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.time() + 180           # ~25 s on 2 busy cores
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if direct.open(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, f"mlflow server not ready in 180 s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGKILL)     # with uvicorn and the job runner, its children (a SIGTERM takes ~15 s)
        proc.wait()


def _args(world, tmp_path, uri, *more):
    return [f"--data-root={world}", f"--cache-dir={tmp_path / 'cache'}", f"--out={tmp_path / 'run'}", "--workers=0",
            "--epochs=3", "--reso-epoch=1", "--reso-eps=0.5", "--batch-size=16", "--log-every=4",
            "--tracker=mlflow", f"--tracker-uri={uri}", *more]


def _only_run(client):
    experiment = client.get_experiment_by_name("bacgcn-synthetic")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_interrupted_run_resumes_into_the_same_mlflow_run_of_a_server(world, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    proc = launch_train(*_args(world, tmp_path, mlflow_server))
    stop_after(proc, run_dir, 1, signal.SIGINT)           # Ctrl-C once the first epoch is saved
    assert proc.wait() == 130, proc.communicate()[1][-2000:]
    client = MlflowClient(mlflow_server)
    killed = _only_run(client)
    assert killed.info.status == "KILLED"
    resumed = launch_train("--resume", str(run_dir))
    assert resumed.wait() == 0, resumed.communicate()[1][-2000:]

    run = _only_run(client)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert json.loads((run_dir / tracking.RUN_ID_FILE).read_text())["run_id"] == run.info.run_id
    cfg, _ = config.parse_overrides(_args(world, tmp_path, mlflow_server)[3:])
    params = run.data.params
    assert params["preset"] == "synthetic-tiny" and params["lr"] == str(cfg.lr) and params["epochs"] == "3"
    assert set(params) == set(json.loads(cfg.to_json())) | {"preset"}
    rid = run.info.run_id
    epochs = client.get_metric_history(rid, "epoch_loss")
    assert sorted(m.step for m in epochs) == [0, 1, 2]          # epoch 0 before the stop, 1 and 2 after
    losses = client.get_metric_history(rid, "loss")
    assert losses and all(m.step % 4 == 0 for m in losses)
    report = json.loads((run_dir / "report.json").read_text())
    metrics = run.data.metrics
    assert metrics["mAP"] == pytest.approx(report["mAP"]) and metrics["CF1"] == pytest.approx(report["CF1"])
    assert metrics["OF1"] == pytest.approx(report["OF1"])
    assert metrics["zeroshot/mAP"] == pytest.approx(report["zeroshot"]["mAP"])
    assert {f"AP/{c}" for c in report["AP"] if report["AP"][c] is not None} <= set(metrics)
    assert metrics["caption_quality/mAP"] == pytest.approx(report["caption_quality"]["mAP"])
    assert "reso_crops" in metrics
    assert {a.path for a in client.list_artifacts(rid)} == {"report.json", "ap.png"}   # through the server's proxy


@pytest.mark.parametrize("store", ["default", "file"])
def test_a_run_is_read_back_from_a_local_store(store, monkeypatch, tmp_path):
    """The default store is runs/mlflow.db under the repo (absolute, so the working directory does
    not matter; runs/ made if missing), its artifacts beside it; a file: folder still works."""
    pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    from mlflow.tracking import MlflowClient

    assert tracking.store_uri("") == f"sqlite:///{tracking.ROOT}/runs/mlflow.db"
    repo, elsewhere, run_dir = tmp_path / "repo", tmp_path / "elsewhere", tmp_path / "run"
    elsewhere.mkdir()
    run_dir.mkdir()
    monkeypatch.setattr(tracking, "DEFAULT_DB", repo / "runs" / "mlflow.db")
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{repo}/runs/mlflow.db" if store == "default" else (tmp_path / "mlruns").as_uri()
    cfg, _ = config.parse_overrides(["--tracker=mlflow", f"--tracker-uri={uri if store == 'file' else ''}"])
    tracker = tracking.open_tracker(cfg, "synthetic-tiny", run_dir, resumed=False, main_process=True)
    tracker.log_metrics({"loss": 0.5, "lr": 1e-3}, step=4)
    report = {"mAP": 61.0, "CF1": 50.0, "AP": {"cat": 52.0, "dog": 70.0, "cow": None}}
    (run_dir / "report.json").write_text(json.dumps(report))
    tracker.log_report(report, run_dir / "report.json")
    tracker.end("FINISHED")

    client = MlflowClient(uri)                      # mlflow's own client, not ours
    run = _only_run(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert json.loads((run_dir / tracking.RUN_ID_FILE).read_text()) == {"run_id": run.info.run_id, "tracking_uri": uri}
    assert run.data.metrics == {"loss": 0.5, "lr": 1e-3, "mAP": 61.0, "CF1": 50.0, "AP/cat": 52.0, "AP/dog": 70.0}
    assert run.data.params["preset"] == "synthetic-tiny"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"report.json", "ap.png"}
    assert list(elsewhere.iterdir()) == []          # mlflow's own artifact root for SQLite is ./mlruns
    if store == "default":
        assert (repo / "runs" / "mlartifacts" / "bacgcn-synthetic").is_dir()


@pytest.fixture(params=["refused", "silent"])
def deaf_tracker(request, loopback):
    """The URI of a loopback port that refuses connections (bound, not listening), or that accepts
    them and never answers (listening, never read); the port held so nothing else takes it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        if request.param == "silent":
            s.listen()
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_tracker_that_does_not_answer_is_one_line_not_a_hang(deaf_tracker, tmp_path):
    pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    patience = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    cfg, _ = config.parse_overrides(["--tracker=mlflow", f"--tracker-uri={deaf_tracker}"])
    for attempt in (lambda: tracking.check_available("mlflow", deaf_tracker),      # before any work
                    lambda: tracking.open_tracker(cfg, "", tmp_path, resumed=False, main_process=True)):
        t0 = time.time()
        with pytest.raises(ValueError, match=f"^--tracker-uri={re.escape(deaf_tracker)}: no answer") as e:
            attempt()
        assert time.time() - t0 < ANSWER_LIMIT and "\n" not in str(e.value)
    assert {k: os.environ.get(k) for k in patience} == patience     # mlflow's patience for the run's logging


def test_train_stops_at_a_tracker_that_does_not_answer(world, tmp_path, capsys, loopback):
    pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))                    # bound, not listening: refused
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.time()
        assert train.main([f"--data-root={world}", f"--out={tmp_path / 'run'}", "--tracker=mlflow",
                           f"--tracker-uri={uri}"]) == 2
    assert time.time() - t0 < ANSWER_LIMIT
    assert capsys.readouterr().err.splitlines() == [
        f"error: --tracker-uri={uri}: no answer ([Errno {errno.ECONNREFUSED}] Connection refused)"]
    assert not (tmp_path / "run").exists()          # refused before any work


def test_a_missing_tracking_extra_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    assert train.main(["--tracker=mlflow", f"--out={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == "error: --tracker=mlflow needs mlflow: pip install -r requirements-tracking.txt\n"
    assert not (tmp_path / "run").exists()


def test_a_store_that_cannot_be_written_is_one_line(world, tmp_path, capsys):
    pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    args = [f"--data-root={world}", f"--out={tmp_path / 'run'}", "--tracker=mlflow", "--tracker-uri=file:///proc/none"]
    assert train.main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --tracker-uri=file:///proc/none: [Errno 2] No such file or directory: '/proc/none'"]
