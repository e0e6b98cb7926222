"""`--tracker=mlflow`: a short run, stopped and resumed into the same mlflow run, read back with
mlflow's own client; and the one line that says what to install. Runs are commands of their own
(the CPU path, not the Triton interpreter of in-process tests)."""
import json
import signal

import pytest

import bacgcn
import synthetic as S
import tracking
import train
from tests.test_resume import _launch, _stop_after


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    S.build(root, S.WorldConfig(seed=5, train=160, test=40), progress=False)
    return root


def _args(world, tmp_path, *more):
    return [f"--data-root={world}", f"--cache-dir={tmp_path / 'cache'}", f"--out={tmp_path / 'run'}", "--workers=0",
            "--epochs=3", "--reso-epoch=1", "--reso-eps=0.5", "--batch-size=16", "--log-every=4",
            "--tracker=mlflow", f"--tracker-uri={(tmp_path / 'mlruns').as_uri()}", *more]


def _only_run(client):
    experiment = client.get_experiment_by_name("bacgcn-synthetic")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_interrupted_run_resumes_into_the_same_mlflow_run(world, tmp_path):
    pytest.importorskip("mlflow", reason="the tracking extra is not installed "
                                                  "(pip install -r requirements-tracking.txt)")
    run_dir = tmp_path / "run"
    proc = _launch(*_args(world, tmp_path))
    _stop_after(proc, run_dir, 1, signal.SIGINT)           # Ctrl-C once the first epoch is saved
    assert proc.wait() == 130, proc.communicate()[1][-2000:]
    client = tracking.mlflow_client((tmp_path / "mlruns").as_uri())
    killed = _only_run(client)
    assert killed.info.status == "KILLED"
    resumed = _launch("--resume", str(run_dir))
    assert resumed.wait() == 0, resumed.communicate()[1][-2000:]

    run = _only_run(client)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert json.loads((run_dir / tracking.RUN_ID_FILE).read_text())["run_id"] == run.info.run_id
    cfg, _ = bacgcn.parse_overrides(_args(world, tmp_path)[3:])
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
    assert {a.path for a in client.list_artifacts(rid)} == {"report.json", "ap.png"}


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
