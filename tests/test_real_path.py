"""The real-size path end to end, as the project card says it is used: the paper's data layout
of real photos, the ViT-B/16 weights by name from a hub cache (random weights), `train.py --dataset voc07`
(the voc2007-vitb16 preset at 448 px, ReSO on), `eval.py ckpt.safetensors` and
`bench/profile_kernel.py`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import config
import frozen_clip
import tinyclip
from tests.helpers import fake_hub_cache, pinned_command, release_layout, run_timed

ROOT = Path(__file__).resolve().parent.parent






def _command(command, *args: str, cwd: Path = ROOT, env: dict | None = None) -> str:
    """Run a command as a user would: its own process, the CPU path (not the Triton interpreter
    the in-process tests use). `command`: a script of the repo, or a whole command line."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / command)] if isinstance(command, str) else command
    result = subprocess.run([*command, *args], cwd=cwd, env={**environ, **(env or {})}, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_card_commands_at_full_size_on_the_release_layout(shared_data, tmp_path, monkeypatch, capsys):
    """The project card's commands as a new user types them, in a folder holding data_folder/ (the
    paper's layout, real photos), with the preset's CLIP weights by name from a Hugging Face cache
    (random ViT-B/16 weights, their digest pinned in place of OpenAI's): `train.py --dataset voc07`
    (its voc2007-vitb16 preset at 448 px; one epoch, ReSO on from it), `eval.py ckpt.safetensors`
    in the run folder, `bench/profile_kernel.py` (its CPU pass). Every part is tested elsewhere;
    this checks that they fit together at full size."""
    release_layout(shared_data / "real_sample" / "voc", tmp_path / "data_folder")
    torch.manual_seed(0)
    weights = tmp_path / "random-vitb16.safetensors"
    tinyclip.save_clip(frozen_clip.create_clip("ViT-B-16-quickgelu"), weights, {})
    digest = fake_hub_cache(tmp_path / "hub", weights)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    environ = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}
    status, printed, err, silence, after = run_timed(
        pinned_command(digest, "train.py", "--dataset", "voc07", "--epochs=1", "--reso-epoch=0", "--reso-eps=0.5",
                       "--batch-size=4", "--workers=0", "--out=run", "--device=cpu"), tmp_path, environ)
    assert status == 0, err[-3000:]
    # ViT-B/16 at 448 px on a CPU: seconds an image and a category, yet never 10 s without a word or a bar
    assert silence < 10, f"{silence:.1f} s of silence before {after!r}"
    assert "ReSO found" in printed and "voc2007/test" in printed and "caption pseudo labels against" in printed
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["preset"] == "voc2007-vitb16" and report["dataset"] == "voc2007" and report["world_size"] == 1
    assert report["caption_quality"]["mAP"] == pytest.approx(100.0)      # the captions name every class
    with safe_open(str(run / "ckpt.safetensors"), "pt") as f:
        cfg = config.BACGCNConfig.from_json(f.metadata()["config"])
    assert cfg.image_size == 448 and cfg.clip_model == "ViT-B-16-quickgelu" and cfg.use_reso
    assert cfg.clip_weights == "openai"
    evaluated = _command(pinned_command(digest, "eval.py", "ckpt.safetensors"), cwd=run, env=env)
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
    release_layout(shared_data / "real_sample" / "voc", tmp_path / "data_folder", copies=2)   # 6 images a split
    torch.manual_seed(0)
    weights = tmp_path / "ViT-B-16.safetensors"
    tinyclip.save_clip(frozen_clip.create_clip("ViT-B-16-quickgelu"), weights, {})
    folder = tmp_path / "data_folder" / "voc2007"
    _command("bench/compare.py", "--preset=voc2007-vitb16", f"--data-root={folder}", f"--captions={folder}",
             f"--clip-weights={weights}", "--json", "compare.json", "--epochs=1", "--reso-epoch=0",
             "--reso-eps=0.5", "--batch-size=4", "--workers=0", "--device=cpu", "--out=runs",
             # six training images: a 0.9 quantile floor leaves no proposal; at 0 they are encoded and verified
             "--reso-propose-quantile=0", cwd=tmp_path)
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["preset"] == "voc2007-vitb16" and result["dataset"] == "voc2007"
    rows = {r["name"]: r for r in result["rows"]}
    # "BAC-GCN beyond" is the voc2007-vitb16-beyond preset's config at full size (ReSO proposals around the maps'
    # peaks verified on the crop, the test-time small-object pass)
    assert list(rows) == ["CLIP zero-shot", "TagCLIP-style", "PIAA-style", "CDUL-style", "linear probe", "BAC-GCN",
                          "BAC-GCN beyond"]
    for row in rows.values():
        assert row["mAP"] is not None and 0 <= row["mAP"] <= 100 and row["mAP_small"] is None
    # the peers' crops went through the feature cache, next to the images' features; the beyond
    # row's proposals were encoded at full size to be verified, and its test-time crops to be scored
    kinds = {json.loads(p.read_text())["spec"]["kind"] for p in (tmp_path / ".cache" / "features").glob("*/meta.json")}
    want = {"images", "tagclip-crops", "cdul-crops", "reso-crops", "reso-proposals", "test-crops"}
    assert want <= kinds, want - kinds
