"""After training: tag a folder of images, draw similarity maps, plot per-class AP (eval.py)."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import eval as eval_cli
import figures
import pipeline
import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_world):
    """A checkpoint trained one epoch on a tiny world with the shipped tiny CLIP, and a folder
    holding the JPEGs of its test split plus one corrupt file."""
    root = tmp_path_factory.mktemp("after")
    world = make_world(seed=3, train=40, test=24)
    torch.manual_seed(0)
    assert train.main([f"--data-root={world}", "--epochs=1", "--use-reso=false", f"--out={root / 'run'}",
                       f"--cache-dir={root / 'cache'}", "--workers=0", "--batch-size=16", "--log-every=100"]) == 0
    photos = root / "photos"
    photos.mkdir()
    test_ids = (world / "ImageSets" / "Main" / "test.txt").read_text().split()
    for image_id in test_ids:
        shutil.copy(world / "JPEGImages" / f"{image_id}.jpg", photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return {"root": root, "world": world, "ckpt": str(root / "run" / "ckpt.safetensors"), "photos": photos,
            "test_ids": test_ids}


def read_tags(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def one_error_line(capsys, after_progress: bool = False) -> str:
    """The error line; stderr holds nothing else, unless images were read (`after_progress`:
    then the progress bar and the skip summary come before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    if after_progress:
        err = err.splitlines()[-1]
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------------------------
# tagging
# --------------------------------------------------------------------------------------------

def test_tags_equal_the_checkpoint_scores_and_are_valid_scores(trained, capsys):
    out = trained["root"] / "tags.csv"
    with pytest.warns(UserWarning, match=r"skipping image: .*broken\.jpg"):        # named
        assert eval_cli.main([trained["ckpt"], "--images", str(trained["photos"]), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "25 images read, 1 skipped" in captured.err                                  # counted
    assert f"{len(trained['test_ids'])} images tagged, 1 skipped" in captured.out
    header, rows = read_tags(out)
    cfg, classes, split, logits, _ = eval_cli.checkpoint_logits(trained["ckpt"])
    assert header == ["image_id", *classes, "tags"]
    assert sorted(r[0] for r in rows) == sorted(split.ids) == sorted(trained["test_ids"])
    probs = {r[0]: np.array([float(v) for v in r[1:-1]]) for r in rows}
    tagged = np.stack([probs[i] for i in split.ids])
    np.testing.assert_allclose(tagged, 1 / (1 + np.exp(-logits[:, :len(classes)])), rtol=0, atol=1e-5)
    # the checkpoint's own tag rule: each class at or above its threshold, best first
    thresholds = pipeline.recorded_thresholds(checkpoints.read_checkpoint(trained["ckpt"])[4], classes)
    assert thresholds is not None and len(thresholds) == len(classes)
    for r in rows:
        p = probs[r[0]]
        want = [classes[c] for c in np.argsort(-p, kind="stable") if p[c] >= thresholds[c]]
        assert r[-1] == ";".join(want)
    assert any(r[-1] for r in rows)
    # --threshold sets one for all
    fixed = trained["root"] / "tags-0.5.csv"
    assert eval_cli.main([trained["ckpt"], "--images", str(trained["photos"]), "--out", str(fixed),
                          "--threshold", "0.5"]) == 0
    for r in read_tags(fixed)[1]:
        p = probs[r[0]]
        assert r[-1] == ";".join(classes[c] for c in np.argsort(-p, kind="stable") if p[c] >= 0.5)
    # the same file scores as a --scores input, with the checkpoint's own mAP
    report = eval_cli.evaluate_csv(str(out), str(trained["world"] / "labels_test.csv"))
    assert report["mAP"] == pytest.approx(eval_cli.evaluate_checkpoint(trained["ckpt"])["mAP"], abs=1e-6)


@pytest.mark.filterwarnings("ignore:skipping image")
def test_the_test_time_pass_scores_a_split_and_a_folder_alike(trained, capsys):
    """`--test-crops 2` on a checkpoint trained without the pass: evaluating its test split
    (crops cached) and tagging the same images as a folder (crops encoded on the fly) give the
    same scores; a crop only raises its class's logit, at most two classes per image."""
    _, classes, split, plain, _ = eval_cli.checkpoint_logits(trained["ckpt"])
    _, _, _, passed, _ = eval_cli.checkpoint_logits(trained["ckpt"], overrides={"test_crops": 2})
    raised = passed > plain + 1e-6
    assert raised.any() and (passed >= plain - 1e-6).all() and raised.sum(1).max() <= 2
    assert not raised[:, len(classes):].any()                        # backgrounds are not cropped
    out = trained["root"] / "tags-with-crops.csv"
    assert eval_cli.main([trained["ckpt"], "--images", str(trained["photos"]), "--out", str(out),
                          "--test-crops", "2"]) == 0
    assert "test-time crops" in capsys.readouterr().err                  # its own progress bar
    _, rows = read_tags(out)
    probs = {r[0]: np.array([float(v) for v in r[1:-1]]) for r in rows}
    tagged = np.stack([probs[i] for i in split.ids])
    np.testing.assert_allclose(tagged, 1 / (1 + np.exp(-passed[:, :len(classes)])), rtol=0, atol=1e-4)
    report = eval_cli.evaluate_checkpoint(trained["ckpt"], test_crops=2)
    assert report["mAP"] == pytest.approx(eval_cli.evaluate_csv(str(out), str(trained["world"] / "labels_test.csv"))
                                          ["mAP"], abs=0.05)


def test_glob_ids_are_relative_to_its_fixed_folder_and_top_k_caps_tags(trained, tmp_path, capsys):
    ids = trained["test_ids"][:3]
    for k, image_id in enumerate(ids):
        folder = tmp_path / "shots" / ("a" if k else "a/b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(trained["world"] / "JPEGImages" / f"{image_id}.jpg").save(folder / f"{image_id}.png")
    out = tmp_path / "tags.csv"
    assert eval_cli.main([trained["ckpt"], "--images", str(tmp_path / "shots" / "a" / "**" / "*.png"),
                          "--out", str(out), "--threshold", "0", "--top-k", "2"]) == 0
    header, rows = read_tags(out)
    assert sorted(r[0] for r in rows) == sorted([f"b/{ids[0]}", ids[1], ids[2]])
    assert all(len(r[-1].split(";")) == 2 for r in rows)
    capsys.readouterr()


def test_scores_reader_skips_a_tags_column(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("image_id,cat,dog,tags\na,0.9,0.2,cat\nb,0.1,0.7,dog;cat\n")
    ids, cols, values = data.read_table_csv(path, ignore=("tags",))
    assert ids == ["a", "b"] and cols == ["cat", "dog"] and values.tolist() == [[0.9, 0.2], [0.1, 0.7]]
    with pytest.raises(data.DataError, match="line 2: a value is not a number"):
        data.read_table_csv(path)
    labels = tmp_path / "l.csv"
    labels.write_text("image_id,cat,dog\na,1,-1\nb,-1,1\n")
    assert eval_cli.evaluate_csv(str(path), str(labels))["mAP"] == 100.0


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------

def panels_in_first_row(png: np.ndarray, top: int, height: int) -> int:
    """Runs of columns that are not all background over the first row of panels."""
    band = png[top:top + height]
    busy = (band != np.array(figures.BACKGROUND, dtype=np.uint8)).any(axis=(0, 2))
    return int(busy[0]) + int((busy[1:] & ~busy[:-1]).sum())


def test_visualize_draws_one_panel_per_category_with_pooled_patches(trained, capsys):
    image = trained["photos"] / f"{trained['test_ids'][0]}.jpg"
    out = trained["root"] / "maps.png"
    assert eval_cli.main([trained["ckpt"], "--visualize", str(image), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    fig = np.asarray(Image.open(out).convert("RGB"))
    w, h = figures.panel_size(*Image.open(image).size)
    title_h = figures.line_height()
    shown = 1 + 3 + 2                                   # the image, 3 classes, 2 backgrounds
    assert fig.shape[1] == figures.GAP + shown * (w + figures.GAP)
    assert fig.shape[0] >= figures.GAP + title_h + h and fig.astype(float).var() > 100
    top = figures.GAP + title_h
    assert panels_in_first_row(fig, top, h) == shown
    for k in range(shown):
        x = figures.GAP + k * (w + figures.GAP)
        panel, title = fig[top:top + h, x:x + w], fig[figures.GAP:top, x:x + w]
        assert (title.max(axis=2) < 100).sum() > 10                 # dark text in every title strip
        marked = (panel == np.array(figures.MARK, dtype=np.uint8)).all(axis=2).sum()
        assert (marked > 0) == (k > 0)                              # squares on every map, none on the photo

    chosen = trained["root"] / "chosen.png"
    assert eval_cli.main([trained["ckpt"], "--visualize", str(image), "--categories", "car, sky",
                          "--out", str(chosen)]) == 0
    assert "car" in capsys.readouterr().out
    assert Image.open(chosen).width == figures.GAP + 3 * (w + figures.GAP)
    assert eval_cli.main([trained["ckpt"], "--visualize", str(image), "--categories", "car,dog",
                          "--out", str(chosen)]) == 2
    err = one_error_line(capsys)
    assert "--categories" in err and "'dog'" in err and "valid: aeroplane" in err and "sky" in err


def test_plot_ap_one_report_and_two(trained, tmp_path, capsys):
    first = tmp_path / "a.json"
    assert eval_cli.main([trained["ckpt"], "--json", str(first)]) == 0
    report = json.loads(first.read_text())
    second = tmp_path / "b.json"
    halved = {c: None if k == 0 else v / 2 for k, (c, v) in enumerate(report["AP"].items())}    # one class n/a
    second.write_text(json.dumps({**report, "mAP": report["mAP"] / 2, "AP": halved}))
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert eval_cli.main(["--plot-ap", str(first), "--out", str(one)]) == 0
    assert eval_cli.main(["--plot-ap", str(first), str(second), "--out", str(two)]) == 0
    capsys.readouterr()
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (one, two))
    classes = len(report["AP"])
    assert a.shape[0] > classes * figures.line_height() and b.shape[0] > a.shape[0] and a.astype(float).var() > 100
    colour_pixels = [[(img == np.array(c, dtype=np.uint8)).all(axis=2).sum() for c in figures.REPORT_COLOURS]
                     for img in (a, b)]
    assert colour_pixels[0][0] > 0 and colour_pixels[0][1] == 0
    assert colour_pixels[1][0] > 0 and colour_pixels[1][1] > 0
    # bars are proportional to AP: the halved report's bars cover about half the pixels, less one class
    assert 0.2 < colour_pixels[1][1] / colour_pixels[1][0] < 0.6
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"mAP": 50.0, "AP": {"cat": 50.0}}))
    assert eval_cli.main(["--plot-ap", str(first), str(other), "--out", str(two)]) == 2
    assert "other.json" in one_error_line(capsys)
    first.write_text("[1, 2]")
    assert eval_cli.main(["--plot-ap", str(first), "--out", str(one)]) == 2
    assert "not an eval.py --json report" in one_error_line(capsys)


# --------------------------------------------------------------------------------------------
# one-line errors
# --------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:skipping image")
@pytest.mark.parametrize("case", ["empty folder", "no match", "out is a folder", "no checkpoint", "all corrupt",
                                  "no --out", "two modes"])
def test_errors_are_one_line(trained, tmp_path, capsys, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "x.png").write_bytes(b"PNG? no")
    ckpt, out = trained["ckpt"], str(tmp_path / "tags.csv")
    argv, expect = {
        "empty folder": ([ckpt, "--images", str(empty), "--out", out], "no JPEG or PNG files"),
        "no match": ([ckpt, "--images", str(tmp_path / "*.jpg"), "--out", out], "matches no JPEG or PNG file"),
        "out is a folder": ([ckpt, "--images", str(trained["photos"]), "--out", str(empty)], "existing directory"),
        "no checkpoint": ([str(tmp_path / "gone.safetensors"), "--images", str(trained["photos"]), "--out", out],
                          "gone.safetensors: checkpoint not found"),
        "all corrupt": ([ckpt, "--images", str(corrupt), "--out", out], "none of its 1 image files could be read"),
        "no --out": ([ckpt, "--visualize", str(trained["photos"] / "broken.jpg")], "--out: --visualize needs a file"),
        "two modes": ([ckpt, "--images", str(empty), "--plot-ap", "r.json", "--out", out], "one of --images"),
    }[case]
    assert eval_cli.main(argv) == 2
    assert expect in one_error_line(capsys, after_progress=case == "all corrupt")
