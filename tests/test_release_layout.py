"""`--dataset` as people type it, the paper's data layout under data_folder/, and one line per
missing piece. The full-size run on that layout is tests/test_real_path.py."""
import pytest
from huggingface_hub import constants

import config
import data
import pipeline
import registry
import train
from tests.helpers import release_layout


@pytest.mark.parametrize("typed,dataset", [("voc07", "voc2007"), ("voc12", "voc2012"), ("coco", "coco2014"),
                                           ("coco14", "coco2014"), ("nus", "nuswide"), ("VOC07", "voc2007"),
                                           ("voc2007", "voc2007")])
def test_short_dataset_names_choose_the_vitb16_preset(typed, dataset):
    cfg, preset = config.parse_overrides(["--dataset", typed])
    assert cfg.dataset == dataset and preset == f"{dataset}-vitb16" and cfg.clip_model == "ViT-B-16-quickgelu"
    assert cfg.image_size == 448 and cfg.clip_weights == "openai"       # fetched once by name


def test_an_explicit_preset_wins_and_no_dataset_is_the_proving_ground():
    cfg, preset = config.parse_overrides(["--dataset=voc07", "--preset=synthetic-tiny"])
    assert (cfg.dataset, preset, cfg.clip_model) == ("voc2007", "synthetic-tiny", "synthclip-vit-t8")
    cfg, preset = config.parse_overrides([])
    assert (cfg.dataset, preset) == ("synthetic", "synthetic-tiny")
    assert config.parse_overrides(["--dataset=synthetic"])[1] == "synthetic-tiny"


def test_voc_splits_are_read_from_their_own_release_trees(shared_data, tmp_path):
    release_layout(shared_data / "real_sample" / "voc", tmp_path / "data_folder", copies=1)
    root = tmp_path / "data_folder" / "voc2007"
    for split, tree in (("trainval", "VOCtrainval_06-Nov-2007"), ("test", "VOCtest_06-Nov-2007")):
        ds = registry.load("voc2007", root, split)
        assert len(ds) == 3 and all(s.path.is_relative_to(root / tree / "VOCdevkit" / "VOC2007") for s in ds.samples)
        assert ds[0]["image"].shape[0] == 3
    # one merged VOCdevkit is still read as it was
    assert data.voc_root(root / "VOCtest_06-Nov-2007", 2007) == root / "VOCtest_06-Nov-2007" / "VOCdevkit" / "VOC2007"


def _error_lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines)
    return lines


def test_each_missing_piece_is_one_line_saying_what_to_put_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "ROOT", tmp_path / "repo")   # a clean clone: nothing in the repo either
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))   # nothing cached, offline
    monkeypatch.chdir(tmp_path)
    assert train.main(["--dataset", "voc07", "--device=cpu"]) == 2
    folder, captions, weights = _error_lines(capsys)
    assert folder.startswith("error: data_folder/voc2007: no voc2007 here: put VOCtrainval_06-Nov-2007/ and "
                             "VOCtest_06-Nov-2007/")
    assert captions.startswith("error: data_folder/voc2007/captions.json: no captions: put the paper's captions.json")
    assert folder.endswith("; --download fetches it from the official source") and "--download fetches" in captions
    assert weights.startswith("error: --clip-weights=openai: OpenAI's ViT-B/16 weights are not in the Hugging Face "
                              "cache (")
    assert "pass --clip-weights=FILE" in weights
    # the trainval tree alone: the test split's tree is the one piece named
    (tmp_path / "data_folder" / "voc2007" / "VOCtrainval_06-Nov-2007" / "VOCdevkit" / "VOC2007" / "JPEGImages").mkdir(
        parents=True)
    (tmp_path / "data_folder" / "voc2007" / "captions.json").write_text("{}")
    (tmp_path / "ViT-B-16.safetensors").write_bytes(b"")
    assert train.main(["--dataset", "voc07", "--clip-weights=ViT-B-16.safetensors", "--device=cpu"]) == 2
    assert _error_lines(capsys) == ["error: data_folder/voc2007: no VOC2007 folder with JPEGImages/ found here (for "
                                    "test: VOCtest_06-Nov-2007/VOCdevkit/VOC2007, as its tar unpacks, or one merged "
                                    "VOCdevkit); --download fetches it from the official source"]
    assert not (tmp_path / "runs").exists()


def test_help_names_the_default_places(capsys):
    assert train.main(["--help"]) == 0
    text = capsys.readouterr().out
    for place in ("data_folder/voc2007/VOCtrainval_06-Nov-2007/VOCdevkit/VOC2007", "VOCtest_06-Nov-2007",
                  "data_folder/<dataset>/captions.json", "--clip-weights=openai", "--data-folder",
                  "python train.py --dataset voc07", "--tracker"):
        assert place in text


def test_the_authors_caption_folder_or_a_clone_is_a_captions_folder(tmp_path):
    """--captions=<clone of the authors' repository>: its caption/voc2007/voc2007_captions.json
    is found, and no line says the captions are missing."""
    clone = tmp_path / "BAC-GCN"
    (clone / "caption" / "voc2007").mkdir(parents=True)
    (clone / "caption" / "voc2007" / "voc2007_captions.json").write_text('{"000012.": ["a car"]}')
    for given in (clone, clone / "caption", clone / "caption" / "voc2007"):
        cfg, _ = config.parse_overrides(["--dataset=voc07", f"--captions={given}", f"--data-root={tmp_path}"])
        assert not any("no captions" in line for line in pipeline.missing_pieces(cfg))
    cfg, _ = config.parse_overrides(["--dataset=voc07", f"--captions={tmp_path}", f"--data-root={tmp_path}"])
    assert any("no captions" in line for line in pipeline.missing_pieces(cfg))
