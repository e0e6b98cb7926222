"""What a hostile user tries, by family: images that end an image job, resource limits, run states
that lie, outputs that lie, caches named "read only", errors that name the wrong thing. The rule
is the README's: one line naming the file or option, a non-zero exit, nothing half-written,
nothing lost that was good, never a hang."""
import contextlib
import csv
import io
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import captions
import checkpoints
import cli
import config
import data
import eval as eval_cli
import frozen_clip
import pipeline
import runs
import synthetic as S
import train
from tests.conftest import world_fixture
from tests.helpers import one_error_line, rewrite_file, write_checkpoint

FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


world = world_fixture(seed=5, train=16, test=16)


@pytest.fixture(scope="module")
def ckpt(world, tmp_path_factory):
    """An untrained head over the world's categories with the shipped tiny CLIP (no cache dir of
    its own: each test gives one)."""
    dim = frozen_clip.create_clip(S.TINY_CLIP).visual.proj.shape[1]
    cfg = config.BACGCNConfig(data_root=str(world), clip_weights=str(S.TINY_CLIP_WEIGHTS), test_split="test",
                              workers=0)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.safetensors", cfg, dim)


@pytest.fixture
def photos(world, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for jpg in sorted((world / "JPEGImages").glob("*.jpg"))[:3]:
        shutil.copy(jpg, folder)
    return folder


@contextlib.contextmanager
def file_size_limit(limit: int):
    """`ulimit -f` for this process and the processes it starts (Python ignores SIGXFSZ, so a
    write past the limit fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail instead of waiting forever."""
    def give_up(*_):
        raise TimeoutError(f"still waiting after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _error_line(capsys) -> str:
    """The last stderr line, which must be the only error line (progress bars may come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]


# --------------------------------------------------------------------------------------------
# 1. One crafted image never ends an image job
# --------------------------------------------------------------------------------------------

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _declaring(fmt: str, width: int, height: int) -> bytes:
    """A small image file whose header declares width x height pixels."""
    if fmt == "PNG":
        header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")
    small = io.BytesIO()
    Image.new("RGB", (4, 4)).save(small, format=fmt)
    raw = bytearray(small.getvalue())
    if fmt == "GIF":       # logical screen and image descriptor
        raw[6:10] = struct.pack("<HH", width, height)
        at = raw.index(b",")
        raw[at + 5:at + 9] = struct.pack("<HH", width, height)
    else:                  # BMP: BITMAPINFOHEADER
        raw[18:26] = struct.pack("<ii", width, height)
    return bytes(raw)


@FEW
@given(fmt=st.sampled_from(["PNG", "GIF", "BMP"]), width=st.integers(20_000, 65_535),
       height=st.integers(20_000, 65_535))
def test_decompression_bombs_are_skipped_and_named(tmp_path_factory, fmt, width, height):
    path = tmp_path_factory.mktemp("bomb") / f"bomb.{fmt.lower()}"
    path.write_bytes(_declaring(fmt, width, height))
    with pytest.raises(data.DataError) as e:
        data.decode_image(path)
    assert str(e.value).startswith(f"{path}: cannot decode image") and "\n" not in str(e.value)
    images = data.MultiLabelImages([data.Sample("bomb", path, np.zeros(0, dtype=np.int8))], [])
    with pytest.warns(UserWarning, match="skipping image"):
        assert images[0] is None                   # the feature cache and the captioner read this way


@pytest.mark.filterwarnings("ignore:skipping image")
def test_images_job_survives_a_bomb_and_counts_a_looping_symlink(ckpt, photos, tmp_path, capsys):
    (photos / "bomb.png").write_bytes(_declaring("PNG", 30_000, 30_000))
    (photos / "loop.jpg").symlink_to(photos / "loop2.jpg")
    (photos / "loop2.jpg").symlink_to(photos / "loop.jpg")
    assert sorted(data.image_files(str(photos)).ids)[-2:] == ["loop", "loop2"]
    out = tmp_path / "tags.csv"
    assert eval_cli.main([str(ckpt), "--images", str(photos), "--out", str(out)]) == 0
    assert "3 images tagged, 3 skipped (corrupt)" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 1 + 3
    assert eval_cli.main([str(ckpt), "--visualize", str(photos / "bomb.png"), "--out", str(tmp_path / "m.png")]) == 2
    assert f"{photos / 'bomb.png'}: cannot decode image" in _error_line(capsys)
    assert not (tmp_path / "m.png").exists()
    os.mkfifo(tmp_path / "fifo.jpg")       # no writer: reading it would wait for ever
    with no_hang(), pytest.raises(data.DataError, match="not a regular file"):
        data.decode_image(tmp_path / "fifo.jpg")


# --------------------------------------------------------------------------------------------
# 2. Resource limits: one line naming the file, never a hang
# --------------------------------------------------------------------------------------------

WRITERS = {
    "csv": lambda p: data.write_scores_csv(p, [f"image{k}" for k in range(2000)], ["a", "b"], np.ones((2000, 2))),
    "json": lambda p: data.write_json(p, {"AP": {str(k): 50.0 for k in range(2000)}}),
    "safetensors": lambda p: data.atomic_write(p, lambda tmp: __import__("safetensors.torch").torch.save_file(
        {"w": torch.zeros(10_000)}, str(tmp))),
    "png": lambda p: eval_cli.write_png(Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (200, 200, 3), dtype=np.uint8)), p),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_write_past_a_file_size_limit_names_the_file_and_leaves_nothing(kind, tmp_path):
    path = tmp_path / f"out.{kind}"
    with file_size_limit(4096), pytest.raises(data.DataError) as e:
        WRITERS[kind](path)
    assert str(e.value).startswith(f"{path}: cannot be written (") and "File too large" in str(e.value)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_clis_under_a_file_size_limit_give_one_line(world, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    with file_size_limit(1024):
        code = captions.main(["pseudo-labels", "--dataset", "synthetic", "--captions", str(world), "--out", str(out),
                          "--quiet"])
    assert code == 2 and f"{out}: cannot be written (File too large)" in _error_line(capsys)
    assert not out.exists()
    cache = tmp_path / "cache"
    with file_size_limit(64 * 1024):    # the feature cache's first shard is larger
        code = train.main([f"--data-root={world}", f"--out={tmp_path / 'run'}", f"--cache-dir={cache}", "--workers=0",
                           "--epochs=1"])
    assert code == 2 and "shard-00000.safetensors: cannot be written (" in _error_line(capsys)
    assert not list(cache.rglob("*.safetensors"))


def test_a_world_build_under_a_file_size_limit_names_the_file(tmp_path):
    with file_size_limit(1024), pytest.raises(data.DataError) as e:
        S.build(tmp_path / "world", S.WorldConfig(seed=1, train=2, test=2), progress=False)
    assert "JPEGImages" in e.value.path and str(e.value).endswith("cannot be written (File too large)")
    assert not (tmp_path / "world" / "world.json").exists()
    copy = pickle.loads(pickle.dumps(e.value))      # as a render process hands it back
    assert str(copy) == str(e.value) and copy.path == e.value.path


@pytest.mark.parametrize("failure", ["no shared memory", "killed", "stuck"])
def test_a_failing_worker_ends_the_images_job_in_one_line(failure, ckpt, photos, tmp_path, monkeypatch, capsys):
    resize = pipeline.image_transform

    def in_worker(size):
        def transform(image):
            if torch.utils.data.get_worker_info() is not None and failure == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            if torch.utils.data.get_worker_info() is not None and failure == "stuck":
                import time
                time.sleep(3)
            return resize(size)(image)
        return transform
    monkeypatch.setattr(pipeline, "image_transform", in_worker)
    monkeypatch.setattr(data, "LOADER_TIMEOUT_S", 1)
    out = tmp_path / "tags.csv"
    argv = [str(ckpt), "--images", str(photos), "--out", str(out), "--workers", "1"]
    with no_hang(), (file_size_limit(16 * 1024) if failure == "no shared memory" else contextlib.nullcontext()):
        assert eval_cli.main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: folder {photos}: reading images in 1 worker process(es) failed: "), line
    why = {"no shared memory": "File too large", "killed": "exited unexpectedly", "stuck": "timed out"}[failure]
    assert why in line
    assert line.endswith("(--workers 0 reads them in this process)") and not out.exists()


def test_eval_workers_is_checked(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        eval_cli.main([str(ckpt), "--workers", "-1"])
    assert e.value.code == 2 and "--workers: expected an integer >= 0, got '-1'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 3. Run states are checked like checkpoints
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    assert train.main([f"--data-root={world}", f"--out={root / 'run'}", f"--cache-dir={root / 'cache'}",
                       "--workers=0", "--epochs=1", "--use-reso=false", "--batch-size=8"]) == 0
    return root


def _contents(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_resume_of_a_finished_run_is_refused(finished, capsys):
    run = finished / "run"
    before = _contents(run)
    assert train.main(["--resume", str(run)]) == 2
    assert one_error_line(capsys, f"{run}: this run has finished", "nothing to resume")
    assert _contents(run) == before


@pytest.fixture
def unfinished(finished, tmp_path):
    """A copy of the finished run as if stopped after its last epoch's state was saved."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished / "run" / runs.STATE_FILE, run)
    return run


@FEW
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_byte_changed_in_a_state_or_checkpoint_is_refused(unfinished, ckpt, tmp_path_factory, where, mask):
    """The digest written with the file: a changed byte is refused, or changed nothing read."""
    for original, read in ((unfinished / runs.STATE_FILE, lambda p: runs.read_state(p.parent)),
                           (ckpt, lambda p: checkpoints.read_checkpoint(str(p)))):
        path = tmp_path_factory.mktemp("flip") / original.name
        raw = bytearray(original.read_bytes())
        at = int(where * len(raw))
        raw[at] ^= mask
        path.write_bytes(bytes(raw))
        try:
            got = read(path)
        except data.DataError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
            continue
        want = read(original)
        tensors = (got["tensors"], want["tensors"]) if isinstance(got, dict) else (got[3], want[3])
        assert tensors[0].keys() == tensors[1].keys()
        assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0]), f"byte {at} changed a tensor"


def test_a_state_changed_on_disk_is_refused_before_any_work(unfinished, capsys):
    path = unfinished / runs.STATE_FILE
    rewrite_file(path, tensors={"model.bias": torch.ones(20)}, digest=False)
    assert train.main(["--resume", str(unfinished)]) == 2
    one_error_line(capsys, f"{path}: its content does not match the digest written with it")


def test_nan_in_a_state_names_the_file(unfinished, capsys):
    path = unfinished / runs.STATE_FILE
    rewrite_file(path, tensors={"model.bias": torch.full((20,), float("nan"))})
    assert train.main(["--resume", str(unfinished)]) == 2
    assert one_error_line(capsys) == f"error: {path}: tensor model.bias holds NaN or infinite values"


@pytest.mark.parametrize("key", ["model.gcn.weights.0", "opt.3.exp_avg"])
def test_a_state_that_does_not_fit_its_config_gives_both_shapes(key, unfinished, capsys):
    path = unfinished / runs.STATE_FILE
    rewrite_file(path, tensors={key: torch.zeros(7, 3)})
    assert train.main(["--resume", str(unfinished)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {path}: tensor {key} has shape [7, 3], the recorded config gives ["), line


# --------------------------------------------------------------------------------------------
# 4. No output that lies with exit 0
# --------------------------------------------------------------------------------------------

def test_scores_that_overflow_are_refused_not_tagged(ckpt, photos, tmp_path, capsys):
    overflowing = tmp_path / "overflow.safetensors"
    shutil.copy(ckpt, overflowing)
    rewrite_file(overflowing, tensors={"model.branch": torch.tensor([3e38, -3e38, 3e38])})
    out = tmp_path / "tags.csv"
    assert eval_cli.main([str(overflowing), "--images", str(photos), "--out", str(out)]) == 2
    assert f"{overflowing}: its head gives NaN or infinite scores for 3 of 3 images" in _error_line(capsys)
    assert eval_cli.main([str(overflowing), "--visualize", str(next(photos.iterdir())), "--out", str(out)]) == 2
    assert "NaN or infinite scores" in _error_line(capsys)
    assert not out.exists()


def test_pseudo_labels_of_no_caption_is_an_error(tmp_path, capsys):
    (tmp_path / "captions.json").write_text("{}")
    out = tmp_path / "scores.csv"
    assert captions.main(["pseudo-labels", "--dataset", "voc2007", "--captions", str(tmp_path), "--out", str(out),
                      "--quiet"]) == 2
    assert one_error_line(capsys) == f"error: {tmp_path / 'captions.json'}: names no image (an empty object)"
    assert not out.exists()


caption_ids = st.lists(st.from_regex(r"[0-9a-z_]{1,8}", fullmatch=True), min_size=1, max_size=6, unique=True)


@FEW
@given(ids=caption_ids, pick=st.integers(0, 5), twin=st.sampled_from(["same key", "dot", "two dots"]),
       in_re_captions=st.booleans())
def test_duplicate_caption_ids_are_refused_by_name(tmp_path_factory, ids, pick, twin, in_re_captions):
    folder = tmp_path_factory.mktemp("captions")
    dup, suffix = ids[pick % len(ids)], {"same key": ".", "dot": "", "two dots": ".."}[twin]
    entries = [f'"{i}.": ["a photo of {i}"]' for i in ids] + [f'"{dup}{suffix}": ["another photo"]']
    text = "{" + ", ".join(entries) + "}"
    plain = json.dumps({f"{i}.": ["a photo"] for i in ids})
    (folder / "captions.json").write_text(plain if in_re_captions else text)
    (folder / "re_captions.json").write_text(text if in_re_captions else plain)
    with pytest.raises(data.DataError) as e:
        captions.read_captions(folder)
    named = "re_captions.json" if in_re_captions else "captions.json"
    assert str(e.value).startswith(f"{folder / named}: image id {dup!r} appears more than once")
    (folder / "re_captions.json").write_text(plain)
    (folder / "captions.json").write_text(plain)   # an id in both files is a caption and its re-caption
    assert captions.read_captions(folder) == {i: ["a photo", "a photo"] for i in ids}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "half"])
def test_threshold_must_be_a_finite_number(value, world, capsys):
    labels = str(world / "labels_test.csv")
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--scores", labels, "--labels", labels, f"--threshold={value}"])
    assert e.value.code == 2 and f"--threshold: expected a finite number, got '{value}'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 5. A read-only cache is never written
# --------------------------------------------------------------------------------------------

def test_a_damaged_read_only_cache_is_encoded_into_the_local_one(world, tmp_path, monkeypatch, capsys):
    recorded = tmp_path / "recorded"
    dim = frozen_clip.create_clip(S.TINY_CLIP).visual.proj.shape[1]
    cfg = config.BACGCNConfig(data_root=str(world), clip_weights=str(S.TINY_CLIP_WEIGHTS), test_split="test",
                              cache_dir=str(recorded), workers=0)
    path = write_checkpoint(tmp_path / "ckpt.safetensors", cfg, dim)
    assert eval_cli.main([str(path), "--cache-dir", str(recorded)]) == 0
    shard = next(recorded.rglob("*shard*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    before = _contents(recorded)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    capsys.readouterr()
    assert eval_cli.main([str(path)]) == 0
    out = capsys.readouterr().out
    local = tmp_path / "here" / ".cache" / "features"
    assert f"the checkpoint's feature cache {recorded} is damaged ({shard}: truncated" in out
    assert f"encoding into {local}" in out
    assert _contents(recorded) == before and list(local.rglob("meta.json"))


def test_the_test_time_crops_of_a_read_only_cache_go_to_the_local_one(world, tmp_path, monkeypatch, capsys):
    recorded = tmp_path / "recorded"
    dim = frozen_clip.create_clip(S.TINY_CLIP).visual.proj.shape[1]
    cfg = config.BACGCNConfig(data_root=str(world), clip_weights=str(S.TINY_CLIP_WEIGHTS), test_split="test",
                              cache_dir=str(recorded), workers=0, test_crops=2)
    path = write_checkpoint(tmp_path / "ckpt.safetensors", cfg, dim)
    assert eval_cli.main([str(path), "--cache-dir", str(recorded), "--test-crops", "0"]) == 0   # the images only
    before = _contents(recorded)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    capsys.readouterr()
    assert eval_cli.main([str(path)]) == 0                                  # the checkpoint's pass: 2 crops
    out = capsys.readouterr().out
    local = tmp_path / "here" / ".cache" / "features"
    assert f"the checkpoint's feature cache {recorded} lacks synthetic/test's test-crops: encoding into {local}" in out
    assert _contents(recorded) == before
    assert [json.loads(m.read_text())["spec"]["kind"] for m in local.rglob("meta.json")] == ["test-crops"]


# --------------------------------------------------------------------------------------------
# 6. Errors name the right thing
# --------------------------------------------------------------------------------------------

def test_a_cache_dir_that_is_a_file_is_named_before_any_work(ckpt, world, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert eval_cli.main([str(ckpt), "--cache-dir", str(a_file)]) == 2
    assert one_error_line(capsys) == f"error: --cache-dir={a_file}: exists and is not a folder"
    assert train.main([f"--data-root={world}", f"--out={tmp_path / 'run'}", f"--cache-dir={a_file}"]) == 2
    assert one_error_line(capsys) == f"error: --cache-dir={a_file}: exists and is not a folder"
    assert a_file.read_text() == "keep" and not (tmp_path / "run").exists()


def test_pseudo_labels_outputs_are_checked_before_any_work(world, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    out = tmp_path / "scores.csv"
    for extra, problem in (([f"--out={tmp_path}"], f"--out={tmp_path}: is a folder, not a file"),
                           ([f"--out={a_file / 'x.csv'}"], f"--out={a_file / 'x.csv'}: cannot be written"),
                           ([f"--out={out}", f"--graph={tmp_path}"], f"--graph={tmp_path}: is a folder, not a file")):
        assert captions.main(["pseudo-labels", "--dataset", "synthetic", "--captions", str(world), "--quiet",
                          *extra]) == 2
        assert one_error_line(capsys).startswith(f"error: {problem}")
    assert not out.exists() and a_file.read_text() == "keep"


@FEW
@given(value=st.one_of(st.floats().filter(lambda x: not 0 <= x <= 100), st.just(1e300)), on_map=st.booleans())
def test_plot_ap_refuses_a_report_whose_ap_is_no_percentage(tmp_path_factory, value, on_map, capsys):
    folder = tmp_path_factory.mktemp("report")
    report = folder / "report.json"
    ap = {"cat": 50.0, "dog": 70.0}
    report.write_text(json.dumps({"mAP": value, "AP": ap} if on_map else {"mAP": 60.0, "AP": {**ap, "dog": value}}))
    assert eval_cli.main(["--plot-ap", str(report), "--out", str(folder / "ap.png")]) == 2
    assert one_error_line(capsys, f"{report}: ", "not a number from 0 to 100")
    assert not (folder / "ap.png").exists()


def test_visualize_with_empty_categories_is_an_error(ckpt, photos, tmp_path, capsys):
    out = tmp_path / "maps.png"
    for names in ("", " , "):
        assert eval_cli.main([str(ckpt), "--visualize", str(next(photos.iterdir())), "--categories", names,
                              "--out", str(out)]) == 2
        assert one_error_line(capsys).startswith("error: --categories: names no category; valid: ")
    assert not out.exists()


def test_a_closed_stdout_pipe_ends_quietly(world, tmp_path, monkeypatch, capsys):
    """`eval.py ... | head`: the reader goes away; the command stops without a word."""
    labels = str(world / "labels_test.csv")
    for main, argv in ((eval_cli.main, ["--scores", labels, "--labels", labels]),
                       (captions.main, ["pseudo-labels", "--dataset", "synthetic", "--captions", str(world), "--quiet",
                                    "--out", str(tmp_path / "scores.csv")])):
        read_end, write_end = os.pipe()
        os.close(read_end)
        with os.fdopen(write_end, "w") as closed:
            monkeypatch.setattr("sys.stdout", closed)
            assert main(argv) == 141
        assert capsys.readouterr().err == ""


def test_metrics_log_is_strict_json_with_an_undefined_figure(tmp_path):
    """An undefined figure (a size band with no positives is NaN) is null in metrics.jsonl, as in
    report.json: a bare NaN is not JSON, and jq or a strict parser refuses the whole file."""
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        runs.MetricsLog(f).record({"test": {"mAP": 70.0, "mAP_large": float("nan")}}, None)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    (line,) = path.read_text().splitlines()
    assert json.loads(line, parse_constant=refuse) == {"test": {"mAP": 70.0, "mAP_large": None}}


# --------------------------------------------------------------------------------------------
# 7. Names: a newline, bytes that are not UTF-8, ids a spreadsheet would run
# --------------------------------------------------------------------------------------------

def test_a_name_holding_a_newline_stays_one_error_line(world, unfinished, tmp_path, capsys):
    run = tmp_path / "run\nfolder"
    run.mkdir()
    assert train.main(["--resume", str(run)]) == 2
    assert one_error_line(capsys, f"{tmp_path}/run\\nfolder: ")
    shutil.copy(unfinished / runs.STATE_FILE, run)          # the line of a stopped run names the folder
    assert runs.stopped_note(run).endswith(f"python train.py --resume {tmp_path}/run\\nfolder")
    a_file = tmp_path / "a\nfile"
    a_file.write_text("keep")
    assert train.main([f"--data-root={world}", f"--out={a_file / 'run'}"]) == 2
    assert one_error_line(capsys, f"--out={tmp_path}/a\\nfile/run: cannot be written ({tmp_path}/a\\nfile is a file")
    nowhere = tmp_path / "no\nworld"
    assert train.main([f"--data-root={nowhere}"]) == 2
    assert one_error_line(capsys, f"{tmp_path}/no\\nworld: no proving-ground world here")
    assert cli.run_command(lambda: open(run)) == 2          # an OSError naming its file
    assert one_error_line(capsys, f"{tmp_path}/run\\nfolder: Is a directory")
    assert cli.run_command(lambda: os.listdir(a_file)) == 2
    assert one_error_line(capsys, f"{tmp_path}/a\\nfile: Not a directory")


FORMULAS = ["=1+2", "+1+2", "-1+2", "@SUM(1)", "\t=1+2", "\r=1+2", "'quoted", "''twice", "'=1+2", "plain"]


def test_ids_a_spreadsheet_would_run_are_neutralised_and_read_back(world, tmp_path, capsys):
    scores, labels = tmp_path / "scores.csv", tmp_path / "labels.csv"
    truth = np.where(np.arange(len(FORMULAS) * 2).reshape(-1, 2) % 3 == 0, 1, -1)
    data.write_scores_csv(scores, FORMULAS, ["cat", "=dog"], (truth + 1) / 2.0, tags=["cat", "=dog;cat", *"-" * 8])
    data.write_scores_csv(labels, FORMULAS, ["cat", "=dog"], truth)
    with open(scores, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    cells = rows[0] + [row[0] for row in rows[1:]] + [row[-1] for row in rows[1:]]
    assert not [c for c in cells if c[:1] in data.FORMULA_STARTS and c], cells     # no cell a spreadsheet runs
    assert [row[0] for row in rows[1:7]] == ["'" + i for i in FORMULAS[:6]]           # OWASP: a leading '
    ids, columns, values = data.read_table_csv(scores, ignore=("tags",))
    assert ids == FORMULAS and columns == ["cat", "=dog"] and np.array_equal(values, (truth + 1) / 2.0)
    assert eval_cli.main(["--scores", str(scores), "--labels", str(labels)]) == 0    # ids and classes line up
    assert "mAP 100.00" in capsys.readouterr().out


@FEW
@given(ids=st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6),
                    min_size=1, max_size=5, unique=True))
def test_any_id_written_to_a_scores_csv_is_read_back_exactly(tmp_path_factory, ids):
    path = tmp_path_factory.mktemp("csv") / "scores.csv"
    data.write_scores_csv(path, ids, ["a"], np.zeros((len(ids), 1)))
    assert data.read_table_csv(path)[0] == ids


def test_a_file_name_that_is_not_utf8_is_tagged_with_an_escaped_id(ckpt, photos, tmp_path, capsys):
    folder = os.fsencode(photos)
    shutil.copy(next(photos.glob("*.jpg")), os.fsdecode(folder + b"/caf\xe9.jpg"))
    (photos / os.fsdecode(b"bad\xff.png")).write_bytes(b"not a png")
    out = tmp_path / os.fsdecode(b"tags\xe9.csv")                         # --out's name too
    with pytest.warns(UserWarning, match=r"bad\\xff\.png: cannot decode image"):   # named, escaped
        assert eval_cli.main([str(ckpt), "--images", str(photos), "--out", str(out)]) == 0
    assert (f"wrote {tmp_path}/tags\\xe9.csv: 4 images tagged, 1 skipped (corrupt), 1 id of a file name that is not "
            "UTF-8 written with \\xNN escapes" in capsys.readouterr().out)
    ids, _, _ = data.read_table_csv(out, ignore=("tags",))
    assert "caf\\xe9" in ids and len(ids) == 4           # the byte as the four characters \xe9
    assert out.read_bytes().decode("utf-8").count("caf\\xe9") == 1


@pytest.mark.filterwarnings("ignore:skipping image")
def test_names_that_are_no_regular_file_are_counted_never_read(ckpt, photos, tmp_path, capsys):
    (photos / "zero.jpg").symlink_to("/dev/zero")
    (photos / "random.png").symlink_to("/dev/urandom")
    os.mkfifo(photos / "fifo.jpg")                      # no writer: opening it would wait forever
    (photos / "y.jpg").mkdir()
    (photos / "link.jpg").symlink_to(next(photos.glob("*.jpg")))     # a link to an image is an image
    (photos / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "tags.csv"
    with no_hang():
        assert eval_cli.main([str(ckpt), "--images", str(photos), "--out", str(out)]) == 0
    assert ("4 images tagged, 5 skipped (1 corrupt; 4 not regular files, never read: 2 devices, 1 FIFO, 1 folder)"
            in capsys.readouterr().out)
    assert "link" in data.read_table_csv(out, ignore=("tags",))[0]
    with no_hang():
        assert eval_cli.main([str(ckpt), "--images", str(photos / "*.jpg"), "--out", str(out)]) == 0
    assert "4 images tagged, 3 skipped (3 not regular files, never read: 1 device, 1 FIFO, 1 folder)" in \
        capsys.readouterr().out
    assert eval_cli.main([str(ckpt), "--images", str(photos / "fifo.jpg"), "--out", str(out)]) == 2
    assert one_error_line(capsys, f"{photos / 'fifo.jpg'}: matches no JPEG or PNG file (1 not a regular file, "
                                  "never read: 1 FIFO)")


# --------------------------------------------------------------------------------------------
# 8. Photos as a viewer shows them
# --------------------------------------------------------------------------------------------

def _phone_photo(path, orientation: int) -> np.ndarray:
    """A JPEG stored on its side with the EXIF Orientation tag a phone writes (6: turn it 90°
    clockwise to view, 8: counter-clockwise); returns the pixels a viewer shows, [H, W, 3]."""
    shown = np.zeros((48, 32, 3), dtype=np.uint8)            # portrait, one red corner: asymmetric
    shown[..., 2] = 200
    shown[:16, :16] = (220, 30, 30)
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90 if orientation == 6
                                              else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return shown


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_photo_is_tagged_as_a_viewer_shows_it_datasets_keep_raw_pixels(orientation, ckpt, tmp_path, monkeypatch,
                                                                         capsys):
    folder = tmp_path / "phone"
    folder.mkdir()
    shown = _phone_photo(folder / "upright.jpg", orientation)

    def close(image: torch.Tensor) -> bool:
        return image.shape == (3, 48, 32) and np.abs(image.permute(1, 2, 0).numpy() - shown.astype(int)).mean() < 4
    assert close(data.decode_image(folder / "upright.jpg", upright=True))
    raw = data.decode_image(folder / "upright.jpg")                    # the benchmarks' convention
    assert raw.shape == (3, 32, 48)
    assert data.image_folder(folder)[0]["image"].shape == (3, 32, 48)          # a dataset: raw pixels
    assert close(data.image_files(str(folder), upright=True)[0]["image"])
    seen, resize = [], pipeline.image_transform

    def recording(size):
        def transform(image):
            seen.append(image.clone())
            return resize(size)(image)
        return transform
    monkeypatch.setattr(pipeline, "image_transform", recording)
    assert eval_cli.main([str(ckpt), "--images", str(folder), "--out", str(tmp_path / "tags.csv")]) == 0
    assert len(seen) == 1 and close(seen[0])                        # what the model is given: upright
