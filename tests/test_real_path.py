"""The real-size path end to end, as the project card says it is used: the paper's data layout
of real photos, OpenAI's ViT-B/16 archive format (random weights), `train.py --dataset voc07`
(the voc2007-vitb16 preset at 448 px, ReSO on), `eval.py ckpt.safetensors` and
`bench/profile_kernel.py`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import bacgcn
import data
from tests.test_model import _torchscript_archive

ROOT = Path(__file__).resolve().parent.parent
COPIES = 4          # 3 real photos x 4 = 12 images per split
CAPTION = "a photo of {} in the city street"


def _voc_tree(real, base, splits, copies):
    """A VOC2007 tree at `base` with the real photos copied `copies` times and per-class
    ImageSets files for `splits` (from the XML); returns {caption key: captions naming each
    image's classes}."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    ids, captions = [], {}
    for xml in sorted((real / "Annotations").glob("*.xml")):
        ann = data.read_voc_annotation(xml)
        names = sorted({o.name for o in ann.objects})
        for k in range(copies):
            image_id = f"{xml.stem}_{k}"
            shutil.copy(real / "JPEGImages" / f"{xml.stem}.jpg", base / "JPEGImages" / f"{image_id}.jpg")
            text = xml.read_text().replace(f"{xml.stem}.jpg", f"{image_id}.jpg")
            (base / "Annotations" / f"{image_id}.xml").write_text(text)
            ids.append((image_id, names))
            captions[f"{image_id}."] = [CAPTION.format(" and a ".join(names))] * 6
    main = base / "ImageSets" / "Main"
    for split in splits:
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i, _ in ids))
        for c in data.VOC_CLASSES:
            (main / f"{c}_{split}.txt").write_text("".join(f"{i} {1 if c in n else -1}\n" for i, n in ids))
    return captions


def release_layout(real, data_folder, copies=COPIES):
    """The paper's release layout: data_folder/voc2007/ with each tar as it unpacks (trainval
    and test in separate trees, the same photos in both) and captions.json beside them."""
    folder = data_folder / "voc2007"
    captions = _voc_tree(real, folder / "VOCtrainval_06-Nov-2007" / "VOCdevkit" / "VOC2007", ("trainval",), copies)
    _voc_tree(real, folder / "VOCtest_06-Nov-2007" / "VOCdevkit" / "VOC2007", ("test",), copies)
    (folder / "captions.json").write_text(json.dumps(captions))


def _command(script: str, *args: str, cwd: Path = ROOT) -> str:
    """Run a command as a user would: its own process, the CPU path (not the Triton interpreter
    the in-process tests use)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_card_commands_at_full_size_on_the_release_layout(shared_data, tmp_path, monkeypatch, capsys):
    """The project card's three commands as a new user types them, in a folder holding
    data_folder/ (the paper's layout, real photos) and OpenAI's archive format (random ViT-B/16
    weights): `bacgcn.py convert` to the default weights file, `train.py --dataset voc07` (its
    voc2007-vitb16 preset at 448 px; one epoch, ReSO on from it), `eval.py ckpt.safetensors`
    in the run folder, `bench/profile_kernel.py` (its CPU pass). Every part is tested
    elsewhere; this checks that they fit together at full size."""
    release_layout(shared_data / "real_sample" / "voc", tmp_path / "data_folder")
    torch.manual_seed(0)
    _torchscript_archive({k: v.contiguous() for k, v in bacgcn.create_clip("ViT-B-16-quickgelu").state_dict().items()},
                         tmp_path / "ViT-B-16.pt")
    _command("bacgcn.py", "convert", "ViT-B-16.pt", "ViT-B-16.safetensors", cwd=tmp_path)
    printed = _command("train.py", "--dataset", "voc07", "--epochs=1", "--reso-epoch=0", "--reso-eps=0.5",
                       "--batch-size=4", "--workers=0", "--out=run", "--device=cpu", cwd=tmp_path)
    assert "ReSO found" in printed and "voc2007/test" in printed and "caption pseudo labels against" in printed
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["preset"] == "voc2007-vitb16" and report["dataset"] == "voc2007" and report["world_size"] == 1
    assert report["caption_quality"]["mAP"] == pytest.approx(100.0)      # the captions name every class
    with safe_open(str(run / "ckpt.safetensors"), "pt") as f:
        cfg = bacgcn.BACGCNConfig.from_json(f.metadata()["config"])
    assert cfg.image_size == 448 and cfg.clip_model == "ViT-B-16-quickgelu" and cfg.use_reso
    assert cfg.clip_weights == str(tmp_path / "ViT-B-16.safetensors")
    evaluated = _command("eval.py", "ckpt.safetensors", cwd=run)
    assert f"voc2007/test: mAP {report['mAP']:.2f}" in evaluated and "12 images" in evaluated

    sys.path.insert(0, str(ROOT / "bench"))
    import profile_kernel

    # In process: torch.compile of the references costs over a minute on a 2-core CPU; the
    # script's own path (interpreter correctness pass, timing table) is what this checks
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    assert profile_kernel.main([]) == 0
    assert "interpreter correctness pass (float32)" in capsys.readouterr().out


def test_compare_at_full_size_on_real_photos(shared_data, tmp_path):
    """`bench/compare.py` on a dataset with a preset: the voc2007-vitb16 preset at 448 px on real
    photos in the paper's layout, random ViT-B/16 weights. Every peer runs end to end, its crops
    re-encoded at full size; the numbers mean nothing."""
    import tinyclip

    release_layout(shared_data / "real_sample" / "voc", tmp_path / "data_folder", copies=2)   # 6 images a split
    torch.manual_seed(0)
    weights = tmp_path / "ViT-B-16.safetensors"
    tinyclip.save_clip(bacgcn.create_clip("ViT-B-16-quickgelu"), weights, {})
    folder = tmp_path / "data_folder" / "voc2007"
    _command("bench/compare.py", "--preset=voc2007-vitb16", f"--data-root={folder}", f"--captions={folder}",
             f"--clip-weights={weights}", "--json", "compare.json", "--epochs=1", "--reso-epoch=0",
             "--reso-eps=0.5", "--batch-size=4", "--workers=0", "--device=cpu", "--out=runs", cwd=tmp_path)
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["preset"] == "voc2007-vitb16" and result["dataset"] == "voc2007"
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["CLIP zero-shot", "TagCLIP-style", "PIAA-style", "CDUL-style", "linear probe", "BAC-GCN"]
    for row in rows.values():
        assert row["mAP"] is not None and 0 <= row["mAP"] <= 100 and row["mAP_small"] is None
    # the peers' crops went through the feature cache, next to the images' features
    kinds = {json.loads(p.read_text())["spec"]["kind"] for p in (tmp_path / ".cache" / "features").glob("*/meta.json")}
    assert {"images", "tagclip-crops", "cdul-crops", "reso-crops"} <= kinds
