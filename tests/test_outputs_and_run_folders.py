"""What a run leaves: writes that respect what is at the path (a device, a FIFO, a link), one
run per run folder, a report that names the classes no caption names. Each case as a user
would meet it, each a test that failed before its fix."""
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import data
import train
from tests.conftest import world_fixture
from tests.helpers import launch_train, one_error_line, stop_after

ROOT = Path(__file__).resolve().parent.parent

world = world_fixture(seed=5, train=240, test=40)


# --------------------------------------------------------------------------------------------
# A write never replaces a device, a FIFO or a link
# --------------------------------------------------------------------------------------------

def test_a_link_to_a_device_is_written_through_not_replaced(tmp_path):
    full = tmp_path / "full"
    full.symlink_to("/dev/full")                 # as root, replacing /dev/full itself was the same bug
    with pytest.raises(data.DataError, match=f"^{full}: cannot be written \\(No space left on device\\)$"):
        data.write_json(full, {"mAP": 1.0})
    assert full.is_symlink() and os.readlink(full) == "/dev/full"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    data.check_writable(full, "--json")           # writable as it is: the failure is the device's, at write time


def test_a_fifo_is_written_through(tmp_path):
    fifo = tmp_path / "scores.fifo"
    os.mkfifo(fifo)
    got = {}
    reader = threading.Thread(target=lambda: got.update(text=fifo.read_text()))
    reader.start()
    data.write_json(fifo, {"mAP": 70.5})
    reader.join(timeout=30)
    assert json.loads(got["text"]) == {"mAP": 70.5}
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_link_to_a_file_stays_a_link(tmp_path):
    target, link = tmp_path / "real.json", tmp_path / "latest.json"
    target.write_text("{}")
    link.symlink_to(target.name)
    data.write_json(link, {"mAP": 3.0})
    assert link.is_symlink() and json.loads(target.read_text()) == {"mAP": 3.0}
    assert not list(tmp_path.glob(".*tmp*"))


def test_json_to_dev_stdout_and_to_a_link_to_it(world, tmp_path):
    labels = str(world / "labels_test.csv")
    link = tmp_path / "out.json"
    link.symlink_to("/dev/stdout")
    for target in ("/dev/stdout", str(link)):
        done = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--scores", labels, "--labels", labels,
                               "--json", target], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        written = done.stdout[done.stdout.index("\n{") + 1:]
        assert json.loads(written)["mAP"] == pytest.approx(100.0)
    assert link.is_symlink()


# --------------------------------------------------------------------------------------------
# One run per run folder
# --------------------------------------------------------------------------------------------

def _args(world, out, *more):
    return [f"--data-root={world}", f"--cache-dir={out.parent / 'cache'}", f"--out={out}", "--device=cpu",
            "--workers=0", "--epochs=6", "--reso-epoch=1", "--reso-eps=0.5", "--batch-size=16", *more]


def test_a_second_run_into_a_busy_folder_is_one_line_and_a_killed_run_leaves_no_lock(world, tmp_path, capsys):
    out = tmp_path / "run"
    first = launch_train(*_args(world, out))
    stop_after(first, out, 1, signal.SIGSTOP)           # held mid-run: it is alive and holds the folder
    try:
        for extra in ([], ["--overwrite"], ["--seed=1", "--overwrite"]):
            assert train.main([*_args(world, out), *extra]) == 2
            line = one_error_line(capsys)
            assert f"{out}: another train.py (pid {first.pid}) is running in this run folder" in line, line
        assert train.main(["--resume", str(out)]) == 2
        assert "another train.py" in one_error_line(capsys)
    finally:
        first.kill()
        first.wait()
    assert train.main(["--resume", str(out)]) == 0          # the kernel let go of the dead run's lock
    assert (out / "ckpt.safetensors").is_file() and not (out / ".run.lock").exists()


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    import runs

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / runs.LOCK_FILE).symlink_to(target)
    with pytest.raises(data.DataError, match="cannot be the run's lock file .*; remove it"):
        runs.prepare_run_folder(tmp_path / "run", resume=True, overwrite=False)
    assert target.read_text() == "keep me"


def test_a_folder_that_cannot_be_locked_is_a_warning_not_a_stop(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    import runs

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)          # what some NFS mounts answer
    lock = runs.prepare_run_folder(tmp_path / "run", resume=False, overwrite=False)
    assert lock is None and "cannot be locked (No locks available)" in capsys.readouterr().err
    runs.release_run_folder(tmp_path / "run", lock)


# --------------------------------------------------------------------------------------------
# What a run reports
# --------------------------------------------------------------------------------------------

def test_a_class_no_caption_names_is_warned_about_and_reported(world, tmp_path, capsys):
    import re
    import shutil

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    synonyms = json.loads((copy / "synonyms.json").read_text())
    name = next(iter(synonyms))
    words = re.compile(r"\b(" + "|".join(map(re.escape, synonyms[name])) + r")(e?s)?\b")
    for file in ("captions.json", "re_captions.json"):
        texts = json.loads((copy / file).read_text())
        (copy / file).write_text(json.dumps({k: [words.sub("thing", t) for t in v] for k, v in texts.items()}))
    out = tmp_path / "run"
    assert train.main([*_args(copy, out), "--epochs=1", "--use-reso=false"]) == 0
    assert f"WARNING: no caption names {name!r} (1 of" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["classes_no_caption_names"] == [name]


def test_every_json_written_is_strict(tmp_path):
    import math

    import numpy as np

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    path = tmp_path / "report.json"
    data.write_json(path, {"mAP": math.inf, "low": -math.inf, "AP": [np.float64("nan"), np.float32(1.5)],
                           "n": np.int64(3)})
    assert json.loads(path.read_text(), parse_constant=refuse) == {"mAP": None, "low": None, "AP": [None, 1.5],
                                                                   "n": 3}
