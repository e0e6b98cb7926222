"""The dataset registry (a dataset is one entry and one loader), the Python API of a trained model
(the documented example, run as written), and the defaults the registry gives: VOC2012 trains on
the images the paper's captions cover, and a repeated option means its last value everywhere."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import eval as eval_cli
import pipeline
import registry
import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, make_world):
    """A toy dataset registered in one place, trained on and evaluated end to end: the proving
    ground's files under another name, with a class list of its own."""
    root = tmp_path_factory.mktemp("toy")
    world = make_world(seed=5, train=32, test=16)
    toy_classes = tuple(data.synthetic_classes(world))

    # -- the whole of adding a dataset: one loader and one entry --
    def load_toy(folder, split, paths):
        return data.load_voc(folder, 2007, split, toy_classes), toy_classes
    entry = registry.register(registry.Dataset(
        "toy", load_toy, splits=("trainval", "test"), train_split="trainval", test_split="test",
        aliases=("toy-set",), classes=toy_classes, preset="synthetic-tiny"))
    # --
    try:
        torch.manual_seed(0)
        code = train.main(["--dataset=toy-set", f"--data-root={world}", f"--captions={world}", "--epochs=1",
                           "--use-reso=false", f"--out={root / 'run'}", f"--cache-dir={root / 'cache'}",
                           "--workers=0", "--batch-size=16", "--log-every=100"])
        yield {"code": code, "root": root, "world": world, "entry": entry,
               "ckpt": str(root / "run" / "ckpt.safetensors")}
    finally:
        registry.REGISTRY.pop("toy")


def test_a_registered_toy_dataset_trains_and_evaluates(toy_run, capsys):
    assert toy_run["code"] == 0
    report = eval_cli.evaluate_checkpoint(toy_run["ckpt"])
    assert report["dataset"] == "toy" and report["split"] == "test" and report["num_images"] == 16
    assert 0 <= report["mAP"] <= 100
    assert "mAP_small" not in report          # the entry asks for no size buckets, so none are made


def test_an_unknown_dataset_and_one_without_a_preset_are_one_line():
    with pytest.raises(ValueError, match=r"^--dataset must be one of .*synthetic.*got 'nope'$"):
        config.parse_overrides(["--dataset=nope"])
    entry = registry.register(registry.Dataset("bare", lambda *a: ([], ()), splits=("a",), train_split="a",
                                               test_split="a"))
    try:
        with pytest.raises(ValueError, match=r"^--dataset=bare has no preset of its own: pass --preset=NAME"):
            config.parse_overrides(["--dataset=bare"])
        assert config.parse_overrides(["--dataset=bare", "--preset=synthetic-tiny"])[0].dataset == "bare"
        with pytest.raises(ValueError, match="registered already"):
            registry.register(entry)
    finally:
        registry.REGISTRY.pop("bare")


def test_a_repeated_option_means_its_last_value():
    cfg, preset = config.parse_overrides(["--dataset=voc07", "--dataset=synthetic"])
    assert (cfg.dataset, preset) == ("synthetic", "synthetic-tiny")
    cfg, preset = config.parse_overrides(["--dataset=synthetic", "--dataset=voc07"])
    assert (cfg.dataset, preset, cfg.image_size) == ("voc2007", "voc2007-vitb16", 448)
    assert config.parse_overrides(["--epochs=3", "--epochs", "5"])[0].epochs == 5


def test_voc2012_trains_on_the_images_its_captions_cover(tmp_path, shared_data):
    """The paper's VOC2012 captions cover the segmentation-train images: the default train split
    reads those (ImageSets/Segmentation/train.txt) with Main's labels, and every one has a caption."""
    entry = registry.get("voc12")
    assert entry.train_split == "segtrain" and "segtrain" in entry.split_notes
    captioned = [i.rstrip(".") for i in json.loads((shared_data / "voc2012" / "captions.json").read_text())]
    assert len(captioned) == 1464
    base = tmp_path / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "JPEGImages").mkdir()
    seg, extra = captioned[:5], ["2099_000001", "2099_000002"]       # Main's trainval holds more images
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(seg) + "\n")
    for c in registry.VOC_CLASSES:
        rows = [f"{i} {1 if (c == 'cat') == (k % 2 == 0) else -1}" for k, i in enumerate(seg + extra)]
        (base / "ImageSets" / "Main" / f"{c}_trainval.txt").write_text("\n".join(rows) + "\n")
    images = entry.load(tmp_path / "VOCdevkit", "segtrain")
    assert images.ids == seg and images.name == "voc2012/segtrain"
    cat = registry.VOC_CLASSES.index("cat")
    assert images.label_matrix()[:, cat].tolist() == [1, -1, 1, -1, 1]


def test_the_documented_api_example_runs_as_written(toy_run, tmp_path, monkeypatch):
    """The Python example of docs/evaluation.md, taken from the page itself, on the toy run's checkpoint."""
    readme = (ROOT / "docs" / "evaluation.md").read_text()
    example = re.search(r"<!-- api-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(example.strip().splitlines()) <= 8
    photo = Path(tmp_path / "photo.jpg")
    first = (toy_run["world"] / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    shutil.copy(toy_run["world"] / "JPEGImages" / f"{first}.jpg", photo)
    monkeypatch.chdir(tmp_path)
    namespace = {"CHECKPOINT": toy_run["ckpt"]}
    exec(compile(example.replace('"runs/X/ckpt.safetensors"', "CHECKPOINT"), "README.md", "exec"), namespace)
    model, scores = namespace["model"], namespace["scores"]
    assert scores.shape == (1, len(model.classes)) and ((scores >= 0) & (scores <= 1)).all()
    # the API scores an image as eval.py's tagging of a folder does
    folder_ids, folder_logits = model.predict_dataset(data.image_folder(tmp_path))
    np.testing.assert_allclose(scores[0], torch.sigmoid(torch.from_numpy(folder_logits[0, :len(model.classes)])),
                               rtol=1e-5, atol=1e-6)
    assert model.preprocess(Image.open(photo)).dtype == torch.uint8
    assert isinstance(pipeline.load_trained(toy_run["ckpt"]), pipeline.TrainedModel)
