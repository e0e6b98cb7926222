"""Trust, fourth round: no output destroys an input or a user's file, checkpoints and run states
are checked by what they mean (a crafted file comes with a digest that fits), inputs that cannot
mean what they say are refused or counted, a run folder's lock is held by the living only, and a
torchrun job's option error is said once. Each case as a user (or an attacker) would meet it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import captions
import checkpoints
import config
import data
import eval as eval_cli
import frozen_clip
import pipeline
import registry
import runs
import synthetic as S
import tracking
import train
from tests.conftest import world_fixture
from tests.helpers import one_error_line, rewrite_file, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent

world = world_fixture(seed=5, train=16, test=16)


@pytest.fixture(scope="module")
def ckpt(world, tmp_path_factory):
    dim = frozen_clip.create_clip(S.TINY_CLIP).visual.proj.shape[1]
    cfg = config.BACGCNConfig(data_root=str(world), clip_weights=str(S.TINY_CLIP_WEIGHTS), test_split="test",
                              workers=0)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.safetensors", cfg, dim)


def _contents(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _copy(path: Path, to: Path) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, to)
    return to


# --------------------------------------------------------------------------------------------
# 1. No output replaces an input or a user's file
# --------------------------------------------------------------------------------------------

def test_overwrite_decides_before_it_deletes_anything(world, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in (("notes.txt", "my notes"), ("report.json", '{"mine": 1}'), ("metrics.jsonl", "{}\n")):
        (out / name).write_text(text)
    before = _contents(out)
    assert train.main([f"--data-root={world}", f"--out={out}", "--overwrite", f"--cache-dir={tmp_path / 'c'}"]) == 2
    assert one_error_line(capsys) == (f"error: {out}: holds 'notes.txt', which train.py did not write; --overwrite "
                                      "replaces only a run folder's own files: choose another --out")
    assert _contents(out) == before and not (out / runs.LOCK_FILE).exists()


def test_overwrite_clears_a_killed_runs_temp_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / ".state.safetensors.tmp4242").write_bytes(b"half")      # what a SIGKILL mid-write leaves
    lock = runs.prepare_run_folder(out, resume=False, overwrite=True)
    runs.release_run_folder(out, lock)
    assert list(out.iterdir()) == []


def test_eval_outputs_never_replace_its_inputs(ckpt, world, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for jpg in sorted((world / "JPEGImages").glob("*.jpg"))[:3]:
        shutil.copy(jpg, photos)
    photo = sorted(photos.iterdir())[1]
    report = tmp_path / "rep.json"
    report.write_text(json.dumps({"mAP": 50.0, "AP": {"cat": 50.0}}))
    scores, labels = _copy(world / "labels_test.csv", tmp_path / "s.csv"), _copy(world / "labels_test.csv",
                                                                                 tmp_path / "l.csv")
    link = tmp_path / "link.json"
    link.symlink_to(ckpt)
    hard_link = tmp_path / "hard.csv"
    os.link(labels, hard_link)
    before = {p: p.read_bytes() for p in (ckpt, photo, report, scores, labels)}
    cases = [
        ([str(ckpt), "--images", str(photos), "--out", str(photo)], f"--out={photo}: is the input --images {photo}"),
        ([str(ckpt), "--visualize", str(photo), "--out", str(photo)], f"--out={photo}: is the input --visualize"),
        (["--plot-ap", str(report), "--out", str(report)], f"--out={report}: is the input --plot-ap {report}"),
        ([str(ckpt), "--json", str(ckpt)], f"--json={ckpt}: is the input checkpoint {ckpt}"),
        ([str(ckpt), "--json", str(link)], f"--json={link}: is the input checkpoint {ckpt}"),
        (["--scores", str(scores), "--labels", str(labels), "--json", str(scores)], f"--json={scores}: is the input "
                                                                                     f"--scores {scores}"),
        (["--scores", str(scores), "--labels", str(labels), "--json", str(hard_link)], "is the input --labels"),
    ]
    for argv, problem in cases:
        assert eval_cli.main(argv) == 2, argv
        line = one_error_line(capsys, problem, "writing it would destroy it")
        assert "loading CLIP" not in line
    assert {p: p.read_bytes() for p in before} == before and link.is_symlink()


def test_pseudo_labels_outputs_never_replace_its_inputs(world, tmp_path, capsys):
    folder = tmp_path / "captions"
    for name in ("captions.json", "re_captions.json", "synonyms.json", "world.json"):
        _copy(world / name, folder / name)
    before = _contents(folder)
    base = ["pseudo-labels", "--dataset", "synthetic", "--captions", str(folder), "--quiet"]
    graph = tmp_path / "graph.safetensors"
    for extra, problem in (
            (["--out", str(folder / "captions.json")], "is the input --captions"),
            (["--out", str(folder / "re_captions.json")], "is the input --captions"),
            (["--synonyms", str(folder / "synonyms.json"), "--out", str(folder / "synonyms.json")],
             "is the input --synonyms"),
            (["--out", str(graph), "--graph", str(graph)], f"--graph={graph}: is also --out {graph}")):
        assert captions.main([*base, *extra]) == 2
        one_error_line(capsys, problem)
    assert _contents(folder) == before and not graph.exists()


def test_convert_and_the_world_commands_never_replace_their_inputs(world, tmp_path, capsys):
    weights = _copy(S.TINY_CLIP_WEIGHTS, tmp_path / "w.safetensors")
    assert frozen_clip.main(["convert", str(weights), str(weights)]) == 2
    one_error_line(capsys, f"dest={weights}: is the input source {weights}")
    assert weights.read_bytes() == S.TINY_CLIP_WEIGHTS.read_bytes()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "captions.json").write_text("{}")
    (folder / "thesis.tex").write_text("mine")
    assert S.main(["build", "--out", str(folder), "--train", "2", "--test", "2"]) == 2
    one_error_line(capsys, f"{folder}: holds 'thesis.tex', which synthetic.py build did not write")
    assert sorted(p.name for p in folder.iterdir()) == ["captions.json", "thesis.tex"]
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    assert S.main(["zeroshot", "--data", str(copy), "--json", str(copy / "labels_test.csv")]) == 2
    one_error_line(capsys, "is the input --data")
    assert (copy / "labels_test.csv").read_bytes() == (world / "labels_test.csv").read_bytes()


def test_a_killed_world_build_is_built_again_in_place(tmp_path):
    out = tmp_path / "world"
    (out / "JPEGImages").mkdir(parents=True)
    (out / ".captions.json.tmp99").write_text("half")
    assert S.main(["build", "--out", str(out), "--train", "2", "--test", "2"]) == 0
    assert (out / "world.json").is_file()


def test_gpu_check_keeps_a_users_folder_and_refuses_a_file(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "README.md").write_text("my readme")
    (folder / "gpu_check.log").write_text("my log")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    for out, problem in ((folder, f"{folder}: holds 'README.md' and 1 more, which bench/gpu_check.py did not write"),
                         (a_file, f"--out={a_file}: exists and is not a folder")):
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip() == f"error: {problem}" + (
            "; it writes into a new or empty folder: choose another --out" if out == folder else ""), done.stderr
    assert (folder / "README.md").read_text() == "my readme" and (folder / "gpu_check.log").read_text() == "my log"
    assert a_file.read_text() == "keep"


def test_train_outputs_are_not_its_inputs(world, tmp_path, capsys):
    assert train.main([f"--data-root={world}", f"--out={tmp_path / 'run'}", f"--cache-dir={world}"]) == 2
    one_error_line(capsys, f"--cache-dir={world}: is the input --data-root {world}")


# --------------------------------------------------------------------------------------------
# 2. Checkpoints, run states and mlflow_run.json checked by meaning
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tensors,problem", [
    ({"graph.M": "int32"}, "tensor graph.M is torch.int32, train.py writes torch.float32"),
    ({"model.kernel.prompts": "int64"}, "tensor model.kernel.prompts is torch.int64, train.py writes torch.float32"),
    ({"model.gcn.weights.0": "float64"}, "tensor model.gcn.weights.0 is torch.float64, the recorded config gives "
                                         "torch.float32"),
    ({"model.gcn.indices": "int32"}, "tensor model.gcn.indices is torch.int32, the recorded config gives torch.int64"),
])
def test_a_checkpoint_whose_tensors_have_another_dtype_is_refused(tensors, problem, ckpt, tmp_path, capsys):
    path = _copy(ckpt, tmp_path / "crafted.safetensors")
    cfg, classes, _, read, _ = checkpoints.read_checkpoint(str(path))
    rewrite_file(path, tensors={k: (read[k] * 100).round().to(getattr(torch, dtype)) for k, dtype in tensors.items()})
    with pytest.raises(data.DataError) as e:
        cfg, classes, _, read, _ = checkpoints.read_checkpoint(str(path))
        checkpoints.model_from_checkpoint(str(path), cfg, classes, read)
    assert str(e.value) == f"{path}: {problem}"
    assert eval_cli.main([str(path), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert one_error_line(capsys, problem)


@pytest.fixture(scope="module")
def stopped(world, tmp_path_factory):
    """A 2-epoch run's state after its first epoch (as a stopped run leaves it), and its cache."""
    root = tmp_path_factory.mktemp("stopped")
    assert train.main([f"--data-root={world}", f"--out={root / 'run'}", f"--cache-dir={root / 'cache'}",
                       "--workers=0", "--epochs=2", "--use-reso=false", "--batch-size=8"]) == 0
    state = runs.read_state(root / "run")
    assert state["meta"]["epoch"] == "2" and state["meta"]["step"] == "4" and state["meta"]["total"] == "4"
    return root


@pytest.fixture
def unfinished(stopped, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(stopped / "run" / runs.STATE_FILE, run)
    rewrite_file(run / runs.STATE_FILE, {"epoch": "1", "step": "2"})
    return run


STATE_CASES = [
    ({"epoch": "99"}, "run state field epoch is 99, outside 0 to 2, the epochs of its recorded config"),
    ({"epoch": "-1"}, "run state field epoch is -1, outside 0 to 2"),
    ({"step": "-5", "total": "0"}, "run state fields step -5 and total 0 are no position in a schedule"),
    ({"step": "9"}, "run state fields step 9 and total 4 are no position in a schedule"),
    ({"step": "two"}, "run state field step is not what train.py writes ('two' is not an integer)"),
    ({"python_rng": "[3, [1, 2], null]"}, "run state field python_rng is not what train.py writes"),
    ({"numpy_rng": "{}"}, "run state field numpy_rng is not what train.py writes"),
    ({"reso_found": "[[0, 1]]"}, "run state field reso_found is not what train.py writes"),
    ({"param_groups": "[1]"}, "run state field param_groups is not what train.py writes"),
    ({"param_groups": "garbage"}, "run state field param_groups is not what train.py writes"),
    ({"total": None}, "run state lacks the field total"),
]


@pytest.mark.parametrize("meta,problem", STATE_CASES)
def test_a_state_whose_fields_cannot_be_is_refused_before_any_work(meta, problem, unfinished, tmp_path, capsys):
    path = unfinished / runs.STATE_FILE
    rewrite_file(path, meta)
    assert train.main(["--resume", str(unfinished)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {path}: {problem}"), line
    assert sorted(p.name for p in unfinished.iterdir()) == [runs.STATE_FILE]      # nothing ran


@pytest.mark.parametrize("tensors,problem", [
    ({"rng.torch": torch.zeros(7, dtype=torch.uint8)}, "run state tensor rng.torch is torch.uint8 [7], train.py "
                                                        "writes torch.uint8 [5056]"),
    ({"rng.numpy": None}, "run state tensor rng.numpy is missing, train.py writes torch.int64 [624]"),
    ({"junk": torch.zeros(1)}, "run state holds an unexpected tensor junk"),
    ({"opt.x": torch.zeros(1)}, "run state holds an unexpected tensor opt.x"),
])
def test_a_state_whose_random_states_cannot_be_is_refused(tensors, problem, unfinished, capsys):
    path = unfinished / runs.STATE_FILE
    rewrite_file(path, tensors=tensors)
    assert train.main(["--resume", str(unfinished)]) == 2
    assert one_error_line(capsys) == f"error: {path}: {problem}"


@pytest.mark.parametrize("meta,tensors,problem", [
    ({"step": "1"}, {}, "run state field step is 1: 1 epochs of 16 training images in batches of 8 take 2"),
    ({"step": "2", "total": "3"}, {}, "run state field total is 3: 2 epochs of 16 training images in batches of 8 "
                                      "take 4"),
    ({}, {"opt.0.exp_avg": "float64"}, "tensor opt.0.exp_avg is torch.float64, the recorded config gives "
                                       "torch.float32"),
    ({}, {"model.bias": "float64"}, "tensor model.bias is torch.float64, the recorded config gives torch.float32"),
])
def test_a_state_that_does_not_fit_the_schedule_or_the_model_is_refused(meta, tensors, problem, unfinished, capsys):
    path = unfinished / runs.STATE_FILE
    state = runs.read_state(unfinished)["tensors"]
    rewrite_file(path, meta, {k: state[k].to(getattr(torch, dtype)) for k, dtype in tensors.items()})
    assert train.main(["--resume", str(unfinished)]) == 2
    assert problem in one_error_line(capsys, str(path))
    assert not (unfinished / "ckpt.safetensors").exists()


@pytest.mark.parametrize("content,problem", [
    ("", "not valid JSON"), ("garbage", "not valid JSON"), ("[1, 2]", "field run_id is not a non-empty string"),
    ('{"run_id": "abc"}', "field tracking_uri is not a non-empty string"),
])
def test_a_garbled_mlflow_run_record_is_one_line_naming_it(content, problem, unfinished, capsys):
    pytest.importorskip("mlflow")
    record = unfinished / tracking.RUN_ID_FILE
    record.write_text(content)
    with pytest.raises(data.DataError) as e:
        tracking.read_run_record(unfinished)
    assert str(e.value).startswith(f"{record}: {problem}")
    path = unfinished / runs.STATE_FILE
    recorded = json.loads(runs.read_state(unfinished)["meta"]["config"])
    rewrite_file(path, {"config": json.dumps({**recorded, "tracker": "mlflow"})})
    assert train.main(["--resume", str(unfinished)]) == 2
    one_error_line(capsys, f"{record}: {problem}")
    assert sorted(p.name for p in unfinished.iterdir()) == [tracking.RUN_ID_FILE, runs.STATE_FILE]


# --------------------------------------------------------------------------------------------
# 3. Inputs that cannot mean what they say: refused or counted
# --------------------------------------------------------------------------------------------

def test_an_image_listed_twice_in_a_split_is_refused_by_id(world, tmp_path, capsys):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    main = copy / "ImageSets" / "Main"
    first = (main / "test.txt").read_text().split()[0]
    (main / "test.txt").write_text((main / "test.txt").read_text() + f"{first}\n")
    with pytest.raises(data.DataError) as e:
        data.load_voc(copy, 2007, "test", S.CLASS_NAMES)
    assert str(e.value) == f"{main / 'test.txt'}: image id {first!r} is listed more than once"
    (main / "test.txt").write_text((world / "ImageSets" / "Main" / "test.txt").read_text())
    name = S.CLASS_NAMES[3]
    (main / f"{name}_test.txt").write_text((main / f"{name}_test.txt").read_text() + f"{first}  1\n")
    with pytest.raises(data.DataError) as e:
        data.load_voc(copy, 2007, "test", S.CLASS_NAMES)
    assert str(e.value) == f"{main / f'{name}_test.txt'}: line 17: image id {first!r} is listed more than once"


def test_captions_that_name_no_class_fail_the_run_before_any_encoding(world, tmp_path, capsys):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    for name in ("captions.json", "re_captions.json"):
        texts = json.loads((copy / name).read_text())
        (copy / name).write_text(json.dumps({k: ["a photo of the and with on"] * len(v) for k, v in texts.items()}))
    cache = tmp_path / "cache"
    assert train.main([f"--data-root={copy}", f"--out={tmp_path / 'run'}", f"--cache-dir={cache}", "--workers=0"]) == 2
    assert one_error_line(capsys) == (f"error: {copy / 'captions.json'}: no caption names any of the "
                                      f"{len(S.CLASS_NAMES)} classes of synthetic/trainval: no class has a positive "
                                      "pseudo label to train on (do the captions and the dictionary match?)")
    assert not cache.exists() and not (tmp_path / "run" / "ckpt.safetensors").exists()


@pytest.mark.parametrize("synonym,becomes", [("(a+)+$", "the single letter 'a'"), (".*", "nothing"),
                                             ("The", "the stopword 'the'"), ("of the", "stopwords and single letters "
                                                                                   "only ('of the')")])
def test_a_synonym_that_names_nothing_is_refused_at_load(synonym, becomes, world, tmp_path, capsys):
    table = json.loads((world / "synonyms.json").read_text())
    name = S.CLASS_NAMES[2]
    table[name].append(synonym)
    path = tmp_path / "synonyms.json"
    path.write_text(json.dumps(table))
    problem = (f"{path}: synonym {synonym!r} of {name!r} normalises to {becomes}, which names no category: remove it "
               "or spell the phrase out")
    with pytest.raises(data.DataError) as e:
        captions.SynonymDictionary.from_json(path, len(S.CLASS_NAMES))
    assert str(e.value) == problem
    assert captions.main(["pseudo-labels", "--dataset", "synthetic", "--captions", str(world), "--synonyms", str(path),
                          "--out", str(tmp_path / "s.csv"), "--quiet"]) == 2
    assert one_error_line(capsys) == f"error: {problem}"


@pytest.mark.parametrize("dataset", ["voc2007", "voc2012", "coco2014", "nuswide"])
@pytest.mark.parametrize("which", ["", "paper"])
def test_the_shipped_dictionaries_name_something_with_every_synonym(dataset, which):
    entry = registry.get(dataset)
    captions.SynonymDictionary.from_json(entry.synonym_file(which), len(entry.classes))


def _coco_like(world: Path, root: Path) -> None:
    """The world's images as COCO instances files (train/test), one annotation naming category
    999 that no category has, and one image left without a class annotation."""
    for split in ("trainval", "test"):
        ids, _, labels = data.read_table_csv(world / f"labels_{split}.csv")
        images = [{"id": k, "file_name": f"{i}.jpg"} for k, i in enumerate(ids)]
        annotations = [{"id": len(images) * k + c, "image_id": k, "category_id": c + 1}
                       for k in range(1, len(ids)) for c in range(labels.shape[1]) if labels[k, c] == 1]
        annotations.append({"id": -1, "image_id": 1, "category_id": 999})
        categories = [{"id": c + 1, "name": name} for c, name in enumerate(S.CLASS_NAMES)]
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                        "categories": categories}))


def test_annotations_of_no_category_and_unannotated_images_are_counted(world, tmp_path, capsys):
    root = tmp_path / "cocolike"
    root.mkdir()
    _coco_like(world, root)

    def load(base: Path, split: str, paths: dict):
        unused: dict = {}
        samples, classes = data.load_coco(base / f"{split}.json", world / "JPEGImages", unused)
        return samples, classes, unused
    registry.register(registry.Dataset("cocolike", load, splits=("trainval", "test"), train_split="trainval",
                                       test_split="test", classes=tuple(S.CLASS_NAMES), preset="synthetic-tiny"))
    try:
        images = registry.load("cocolike", root, "test")
        assert images.unused_annotations == {"unknown_category_annotations": 1, "unknown_category_ids": [999],
                                             "images_without_annotations": 1}
        assert len(images) == 15
        out = tmp_path / "run"
        assert train.main(["--dataset=cocolike", f"--data-root={root}", f"--captions={world}", f"--out={out}",
                           f"--cache-dir={tmp_path / 'cache'}", "--workers=0", "--epochs=1", "--use-reso=false"]) == 0
    finally:
        registry.REGISTRY.pop("cocolike")
    printed = capsys.readouterr().out
    for split in ("trainval", "test"):
        assert (f"cocolike/{split}: annotations naming a category id that no category has: 1 (id 999), ignored; "
                "images without a class annotation: 1, left out") in printed
    head = printed[:printed.index("pseudo labels: ")]
    assert "cocolike/trainval: annotations naming" in head      # among the run's first lines
    report = json.loads((out / "report.json").read_text())
    assert report["unused_annotations"]["cocolike/test"]["images_without_annotations"] == 1
    assert report["unused_annotations"]["cocolike/trainval"]["unknown_category_ids"] == [999]


# --------------------------------------------------------------------------------------------
# 4. A run folder's lock is held by the living only
# --------------------------------------------------------------------------------------------

LOCK_THEN_FORK = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import runs
    runs.lock_run_folder(Path({folder!r}))
    child = os.fork()
    if child == 0:                      # a loader worker: outlives its parent's SIGKILL for a while
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
""")


def test_a_killed_runs_lock_is_free_although_its_forked_children_live_on(tmp_path):
    folder = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-c", LOCK_THEN_FORK.format(root=str(ROOT), folder=str(folder))],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        os.kill(child, 0)                                               # the orphan lives on
        started = time.monotonic()
        lock = runs.prepare_run_folder(folder, resume=True, overwrite=False)      # the requeued run, at once
        assert lock is not None and time.monotonic() - started < 2
        runs.release_run_folder(folder, lock)
    finally:
        os.kill(child, signal.SIGKILL)
        parent.stdout.close()


LOCK_FOR_THE_DEAD = textwrap.dedent("""
    import fcntl, os, time
    fd = os.open({lock!r}, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"{dead}\\n", 0)
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_lock_whose_taker_is_dead_never_names_it_as_running(tmp_path, monkeypatch):
    """A lock kept by what a dead train.py started (a fork that did not drop it) is waited for,
    then named as such: never `another train.py (pid N) is running` with N dead."""
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_FOR_THE_DEAD.format(lock=str(folder / runs.LOCK_FILE),
                                                                              dead=dead.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(runs, "ORPHAN_WAIT_S", 0.5)
        with pytest.raises(data.DataError) as e:
            runs.prepare_run_folder(folder, resume=True, overwrite=False)
        assert str(e.value) == (f"{folder}: the run folder is still locked after its train.py (pid {dead.pid}) ended, "
                                "by processes it started; end them, or choose another --out")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


# --------------------------------------------------------------------------------------------
# 5. A torchrun job says an option error once
# --------------------------------------------------------------------------------------------

def test_an_option_error_is_said_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(pipeline, "LAUNCHER_WAIT_S", 0)        # torchrun would end it once rank 0 has failed
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert train.main(["--epochz=3"]) == 2
    finally:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL     # ended without a word when torchrun ends it
        signal.signal(signal.SIGTERM, handler)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert train.main(["--epochz=3"]) == 2
    one_error_line(capsys, "--epochz")


def test_torchrun_prints_an_option_error_once():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "train.py"), "--epochz=3"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--epochz" in errors[0], done.stderr[-3000:]
