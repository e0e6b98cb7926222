"""The compact feature cache against bf16: what 8-bit patch tokens cost in accuracy.

  python bench/cache_format.py [--seeds 0 1 2 23] [--presets synthetic-tiny synthetic-tiny-beyond]
                               [--runs bf16 int8 fp32 bf16-half-threads] [--validation]
                               [--skip-training | --skip-tokens] [--json out.json]

Two measurements, one JSON row:
  tokens      the patch tokens of ViT-B/16 at 448 px (random weights: no pretrained CLIP here) on the
              real photos of ../shared/data/real_sample, and of the proving ground's tiny CLIP on 64 of
              its test images: each stored as the cache stores it (bf16; int8 with an fp32 scale per
              token; fp8 e4m3 with the same scale, the candidate) against the fp32 the encoder gave.
              1 - cosine (mean, max) and the relative L2 error per token.
  training    `python train.py --preset=P --seed=S --cache-format=F` for every seed, preset and run
              (each in its own process and run folder; the world and both caches built once per seed):
              BAC-GCN's mAP on the world's test split, and each run's difference to bf16. The run
              bf16-half-threads is the null: bf16 again with half the CPU threads, whose only change is
              the order of the training's floating-point sums, so its difference to bf16 is how far the
              training moves from a perturbation that changes nothing. --validation trains on world
              100's fit split and scores its val split (bench/ablation.py's), where settings are chosen.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cache  # noqa: E402
import checkpoints  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import frozen_clip  # noqa: E402
import pipeline  # noqa: E402

REAL_PHOTOS = ROOT.parent / "shared" / "data" / "real_sample" / "voc" / "JPEGImages"
FP8_MAX = 448.0          # the largest finite float8_e4m3fn


def stored_as(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """x [..., D] fp32 after a round trip through the cache's format `fmt` (fp8: the candidate)."""
    if fmt == "bf16":
        return x.bfloat16().float()
    if fmt == "int8":
        q, scale = cache.quantize_tokens(x)
        return cache.decode({"patches": q, "patches" + cache.SCALE: scale}, torch.float32)["patches"]
    scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


def token_errors(patches: torch.Tensor) -> dict:
    """{format: {cosine_error_mean, cosine_error_max, relative_l2_mean}} of fp32 tokens [n, P, D]."""
    x = patches.float().reshape(-1, patches.shape[-1])
    out = {}
    for fmt in ("bf16", "int8", "fp8_e4m3"):
        y = stored_as(fmt, x)
        cos_err = 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).double()
        rel = (x - y).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)
        out[fmt] = {"cosine_error_mean": float(cos_err.mean()), "cosine_error_max": float(cos_err.max()),
                    "relative_l2_mean": float(rel.double().mean())}
    return out


def real_size_tokens() -> dict:
    """ViT-B/16 at 448 px, random weights, on the real photos."""
    torch.manual_seed(0)
    clip = frozen_clip.create_clip("ViT-B-16-quickgelu")
    frozen_clip.set_image_size(clip, 448)
    backbone = frozen_clip.CLIPBackbone(clip).eval()
    photos = sorted(REAL_PHOTOS.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"error: {REAL_PHOTOS}: no photos (../shared/data is needed beside the repository)")
    resize = pipeline.image_transform(448)
    images = torch.stack([resize(data.decode_image(p)) for p in photos])
    with torch.no_grad():
        patches = backbone.features(frozen_clip.preprocess(images, 448), 0.5)["patches"]
    return {"model": "ViT-B-16-quickgelu (random weights)", "image_size": 448, "images": len(photos),
            "tokens": int(patches.shape[0] * patches.shape[1]), "dim": int(patches.shape[-1]),
            "errors": token_errors(patches)}


def tiny_clip_tokens(seed: int) -> dict:
    """The proving ground's tiny CLIP (trained weights) on 64 of its test images."""
    cfg = pipeline.resolve_paths(config.parse_overrides([f"--seed={seed}", "--device=cpu"])[0])
    backbone = pipeline.build_backbone(cfg, "cpu")
    test = pipeline.load_split(cfg, "test")
    resize = pipeline.image_transform(backbone.image_size)
    images = torch.stack([resize(test[k]["image"]) for k in range(64)])
    with torch.no_grad():
        patches = pipeline.encode_features(backbone, images, cfg)["patches"]
    return {"model": cfg.clip_model, "image_size": backbone.image_size, "images": 64,
            "tokens": int(patches.shape[0] * patches.shape[1]), "dim": int(patches.shape[-1]),
            "errors": token_errors(patches)}


# The runs: (cache format, environment). train.py gives each process cpu_count / LOCAL_WORLD_SIZE threads.
RUNS = {"bf16": ("bf16", {}), "int8": ("int8", {}), "fp32": ("fp32", {}),
        "bf16-half-threads": ("bf16", {"LOCAL_WORLD_SIZE": "2"})}


def train_map(preset: str, seed: int, run: str, out: Path, splits: list[str]) -> float:
    fmt, more_env = RUNS[run]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **more_env}
    cmd = [sys.executable, str(ROOT / "train.py"), f"--preset={preset}", f"--seed={seed}", f"--cache-format={fmt}",
           "--device=cpu", f"--out={out}", *splits]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text())["mAP"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 23])
    parser.add_argument("--presets", nargs="+", default=["synthetic-tiny", "synthetic-tiny-beyond"])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=["bf16", "int8"])
    parser.add_argument("--validation", action="store_true", help="world 100's fit -> val split (replaces --seeds)")
    parser.add_argument("--skip-training", action="store_true", help="the token errors only")
    parser.add_argument("--skip-tokens", action="store_true", help="the training runs only")
    parser.add_argument("--json", help="also write the row here")
    args = parser.parse_args(argv)
    row = {"tokens": {} if args.skip_tokens else {"real_size": real_size_tokens(),
                                                    "tiny_clip": tiny_clip_tokens(args.seeds[0])},
           "training": [], "torch": torch.__version__, "commit": checkpoints.git_commit()}
    for name, part in row["tokens"].items():
        for fmt, e in part["errors"].items():
            print(f"{name:10s} {fmt:9s} 1-cos mean {e['cosine_error_mean']:.2e} max {e['cosine_error_max']:.2e}, "
                  f"relative L2 {e['relative_l2_mean']:.2e}", flush=True)
    seeds, splits = args.seeds, []
    if args.validation:
        import ablation  # bench/: the validation split every setting is chosen on, carved once

        seeds = [100]
        world = pipeline.resolve_paths(config.parse_overrides(["--seed=100", "--device=cpu"])[0]).data_root
        splits = [f"--{k}-split={v}" for k, v in zip(("train", "test"), ablation.carve_validation(Path(world), 100))]
    row["split"] = "fit -> val" if args.validation else "trainval -> test"
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [] if args.skip_training else seeds:
            for preset in args.presets:
                got = {run: train_map(preset, seed, run, Path(tmp) / f"{preset}-{seed}-{run}", splits)
                       for run in args.runs}
                minus = {f"{run} - bf16": got[run] - got["bf16"] for run in got if run != "bf16" and "bf16" in got}
                row["training"].append({"seed": seed, "preset": preset, "mAP": got, "differences": minus})
                print(f"seed {seed:3d} {preset:24s} mAP " + ", ".join(f"{k} {v:.2f}" for k, v in got.items())
                      + "".join(f"; {k} {v:+.3f}" for k, v in minus.items()), flush=True)
                if args.json:          # written as it goes: a long run keeps what it measured
                    data.write_json(args.json, row)
    if args.json:
        data.write_json(args.json, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
