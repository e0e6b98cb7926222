"""The real-size path end to end: a VOCdevkit of real photos, OpenAI's ViT-B/16 archive format
(random weights), the voc2007-vitb16 preset at 448 px with ReSO on, then eval.py on the
checkpoint. Every part is tested elsewhere; this checks that they fit together at full size."""
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


def _vocdevkit(real, root):
    """VOCdevkit/VOC2007 with the real photos copied COPIES times, per-class ImageSets files
    for trainval and test (from the XML), and captions naming each image's classes."""
    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    ids, captions = [], {}
    for xml in sorted((real / "Annotations").glob("*.xml")):
        ann = data.read_voc_annotation(xml)
        names = sorted({o.name for o in ann.objects})
        for k in range(COPIES):
            image_id = f"{xml.stem}_{k}"
            shutil.copy(real / "JPEGImages" / f"{xml.stem}.jpg", base / "JPEGImages" / f"{image_id}.jpg")
            text = xml.read_text().replace(f"{xml.stem}.jpg", f"{image_id}.jpg")
            (base / "Annotations" / f"{image_id}.xml").write_text(text)
            ids.append((image_id, names))
            captions[f"{image_id}."] = [CAPTION.format(" and a ".join(names))] * 6
    main = base / "ImageSets" / "Main"
    for split in ("trainval", "test"):
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i, _ in ids))
        for c in data.VOC_CLASSES:
            (main / f"{c}_{split}.txt").write_text("".join(f"{i} {1 if c in n else -1}\n" for i, n in ids))
    (root / "captions").mkdir()
    (root / "captions" / "captions.json").write_text(json.dumps(captions))
    return root / "VOCdevkit"


def _command(script: str, *args: str) -> str:
    """Run a command as a user would: its own process, the CPU path (not the Triton interpreter
    the in-process tests use)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_vitb16_preset_trains_and_evaluates_on_real_photos(shared_data, tmp_path):
    devkit = _vocdevkit(shared_data / "real_sample" / "voc", tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "ViT-B-16.pt"
    _torchscript_archive({k: v.contiguous() for k, v in bacgcn.create_clip("ViT-B-16-quickgelu").state_dict().items()},
                         weights)
    out = tmp_path / "run"
    common = [f"--clip-weights={weights}", "--clip-weights-format=openai-torchscript", f"--cache-dir={tmp_path / 'c'}"]
    printed = _command("train.py", "--preset=voc2007-vitb16", f"--data-root={devkit}",
                       f"--captions={tmp_path / 'captions'}", "--epochs=1", "--reso-epoch=0", "--reso-eps=0.5",
                       "--batch-size=4", "--workers=0", f"--out={out}", "--device=cpu", *common)
    assert "ReSO found" in printed and "voc2007/test" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "voc2007" and report["world_size"] == 1
    with safe_open(str(out / "ckpt.safetensors"), "pt") as f:
        cfg = bacgcn.BACGCNConfig.from_json(f.metadata()["config"])
    assert cfg.image_size == 448 and cfg.clip_model == "ViT-B-16-quickgelu" and cfg.use_reso
    _command("eval.py", str(out / "ckpt.safetensors"), *common, "--json", str(tmp_path / "eval.json"))
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["num_images"] == 12 and evaluated["mAP"] == pytest.approx(report["mAP"], abs=1e-6)
