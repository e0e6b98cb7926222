"""A folder of the user's own photos as a dataset, one command from photos to tags:
`train.py --dataset=folder --data-root=DIR --classes=...` captions the folder once with BLIP-2
(the tiny random one of the captioner's tests), builds the dictionary from the class names,
trains with no labels and writes the tags; with --captions it reads the user's captions, and
with --labels it evaluates. The photos are the proving ground's, copied into a plain folder
with subfolders, odd names and a broken file."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import captions
import data
import registry
from tests.conftest import world_fixture
from tests.helpers import tiny_blip2

pytest.importorskip("transformers", reason="captions need the optional extra (requirements-captions.txt)")

ROOT = Path(__file__).resolve().parent.parent
world = world_fixture(seed=11, train=24, test=8)
FAST = ["--preset=synthetic-tiny", "--epochs=2", "--reso-epoch=1", "--batch-size=8", "--workers=0", "--device=cpu"]


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return tiny_blip2(tmp_path_factory.mktemp("blip2-tiny"))


@pytest.fixture
def photos(world, tmp_path):
    """The world's 24 training photos under odd names and in subfolders, a broken JPEG and a text
    file; returns (folder, {photo id: world id})."""
    folder = tmp_path / "my photos"
    ids = {}
    for k, image_id in enumerate(data._read_id_list(world / "ImageSets" / "Main" / "trainval.txt")):
        sub = ("2024/trip ä" if k % 3 == 0 else "") + ("/" if k % 3 == 0 else "")
        name = f"IMG {k:03d}.JPG" if k % 4 == 0 else f"{image_id}.jpg"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(world / "JPEGImages" / f"{image_id}.jpg", folder / sub / name)
        ids[f"{sub}{Path(name).stem}"] = image_id
    (folder / "broken.jpg").write_bytes(b"not a photo")
    (folder / "notes.txt").write_text("holiday photos")
    return folder, ids


def _train(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


def _tags(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {row["image_id"]: row for row in csv.DictReader(f)}


def test_photos_to_tags_in_one_command(photos, blip2_dir, tmp_path):
    folder, ids = photos
    (tmp_path / "classes.txt").write_text("# what to look for\ncar\nbus\nperson\n\ndog\nsky\n")
    run = [f"--data-root={folder}", "--classes=classes.txt", f"--captioner={blip2_dir}", *FAST]
    done = _train("--dataset=folder", *run, "--out=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 of 25 images already captioned, 25 to go" in done.stderr and "1 skipped" in done.stderr   # the broken
    assert "no labels, so no mAP" in done.stdout and "tagged 24 photos" in done.stdout
    tags = _tags(tmp_path / "run" / "tags.csv")
    assert set(tags) == set(ids)                                                # subfolders, spaces, umlauts, .JPG
    assert list(next(iter(tags.values()))) == ["image_id", "car", "bus", "person", "dog", "sky", "tags"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["mAP"] is None and report["tags"]["images"] == 24 and report["dataset"] == "folder"
    # the captions were written beside the feature cache, keyed by each photo's id, six + six each
    made = list((tmp_path / ".cache" / "captions").glob("my photos-*/captions.json"))
    assert len(made) == 1
    texts = captions.read_captions(made[0].parent)
    assert set(texts) == set(ids) and all(len(c) == 12 for c in texts.values())
    # eval.py of the checkpoint: nothing to evaluate against, said in one line; --images tags photos
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    evaluated = subprocess.run([sys.executable, str(ROOT / "eval.py"), "run/ckpt.safetensors"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 2 and evaluated.stderr.count("\n") == 1
    assert "folder/all has no label to evaluate against" in evaluated.stderr
    tagged = subprocess.run([sys.executable, str(ROOT / "eval.py"), "run/ckpt.safetensors", "--images", str(folder),
                             "--out", "again.csv"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert tagged.returncode == 0, tagged.stderr[-2000:]
    assert _tags(tmp_path / "again.csv").keys() == tags.keys()
    # a second run reads them: only the photo that could not be read is tried again
    again = _train("--dataset=folder", *run, "--out=run2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "24 of 25 images already captioned, 1 to go" in again.stderr
    assert _tags(tmp_path / "run2" / "tags.csv").keys() == tags.keys()


def test_the_users_captions_and_labels(photos, world, tmp_path):
    """--captions=DIR holding captions.json keyed by file name without extension (as `captions.py
    generate` writes them) is read and never written; --labels evaluates on the photos it names."""
    folder, ids = photos
    world_captions = json.loads((world / "captions.json").read_text())
    given = tmp_path / "my captions"
    given.mkdir()
    (given / "captions.json").write_text(json.dumps({f"{i}.": world_captions[f"{w}."] for i, w in ids.items()}))
    before = (given / "captions.json").read_bytes()
    truth = registry.load("synthetic", world, "trainval")
    classes = truth.class_names
    rows = {s.id: s.labels for s in truth.samples}
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", *classes])
        w.writerows([i, *rows[world_id]] for i, world_id in ids.items())
    done = _train("--dataset=folder", f"--data-root={folder}", f"--classes={','.join(classes)}",
                  f"--captions={given}", "--labels=labels.csv", *FAST, "--out=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CLIP zero-shot on folder/all: mAP" in done.stdout and "BAC-GCN" in done.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0 < report["mAP"] <= 100 and report["caption_quality"]["mAP"] > 50
    assert (given / "captions.json").read_bytes() == before and not (tmp_path / ".cache" / "captions").exists()
    assert len(_tags(tmp_path / "run" / "tags.csv")) == 24


def test_a_folder_run_says_what_it_lacks_in_one_line_each(tmp_path):
    done = _train("--dataset=folder", *FAST, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: --data-root: a photo folder needs --data-root=DIR")
    done = _train("--dataset=folder", f"--data-root={tmp_path / 'nowhere'}", *FAST, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2 and "Traceback" not in done.stderr
    assert lines[0].endswith("nowhere: no such folder of photos (--data-root)")
    assert lines[1].startswith("error: --classes: a folder of photos needs its class names")


@pytest.mark.parametrize("spec,problem", [
    ("cat,,dog", "--classes: an empty class name in 'cat,,dog'"),
    ("cat,Dog,dog", "--classes: names the class 'dog' twice (and as 'Dog')"),
    ("classes.txt", "classes.txt: class list file not found"),
])
def test_bad_class_lists_are_one_line(spec, problem, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError) as e:
        registry.class_list(spec)
    assert str(e.value).startswith(problem)


def test_the_dictionary_of_a_folder_is_its_class_names_and_the_backgrounds(tmp_path):
    extra = tmp_path / "more.json"
    extra.write_text(json.dumps({"dog": ["puppy", "terrier"], "sky": ["heavens"]}))
    d = captions.SynonymDictionary.for_classes(["dog", "fire truck"], extra)
    assert d.categories[:2] == ["dog", "fire truck"] and d.num_classes == 2 and "sky" in d.categories
    sky = d.categories.index("sky")
    assert d.match("two puppies under the heavens") == {0, sky}
    assert d.match("the fire trucks on a road") == {1, d.categories.index("road")}
    extra.write_text(json.dumps({"cat": ["kitten"]}))
    with pytest.raises(data.DataError, match="names the category 'cat', which is neither one of the classes"):
        captions.SynonymDictionary.for_classes(["dog"], extra)


def test_blip2_by_hub_id_from_the_hub_cache(photos, blip2_dir, tmp_path):
    """`captions.py generate --model org/name`: a hub id is read from the Hugging Face cache
    (offline here; a cache laid out as huggingface_hub writes it holds the tiny BLIP-2)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-blip2"
    shutil.copytree(blip2_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    folder, ids = photos
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "captions.py"), "generate", "--dataset=folder",
                           f"--data-root={folder}", "--model=someone/tiny-blip2", "--out=made", "--max-new-tokens=4",
                           "--workers=0", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(captions.read_captions(tmp_path / "made")) == set(ids)
