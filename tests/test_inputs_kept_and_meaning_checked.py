"""Trust, fourth round: no output destroys an input or a user's file, checkpoints and run states
are checked by what they mean (a crafted file comes with a digest that fits), inputs that cannot
mean what they say are refused or counted, a run folder's lock is held by the living only, and a
torchrun job's option error is said once. Each case as a user (or an attacker) would meet it."""
import json
import os
import shutil
from pathlib import Path

import pytest

import captions
import config
import eval as eval_cli
import frozen_clip
import synthetic as S
import train
from tests.conftest import world_fixture
from tests.helpers import one_error_line, write_checkpoint

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


def test_train_outputs_are_not_its_inputs(world, tmp_path, capsys):
    assert train.main([f"--data-root={world}", f"--out={tmp_path / 'run'}", f"--cache-dir={world}"]) == 2
    one_error_line(capsys, f"--cache-dir={world}: is the input --data-root {world}")
