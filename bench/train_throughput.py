"""Throughput of the whole path, measured in one run: encoder, read-out, cache build, training.

  python bench/train_throughput.py [--model NAME] [--image-size S] [--batch B] [--images N]
                                   [--workers W] [--device cpu|cuda] [--compile] [--json out.json]

Rows (images/s unless said): the bare encoder forward (`clip.encode_image`), the full feature
read-out BAC-GCN caches (`CLIPBackbone.features`, both g^H / g^Hc read-outs), the end-to-end
cache build (JPEG decode, resize, read-out, bf16 shards; `pipeline.load_or_encode`, the code
`train.py` runs), and training steps/s from that cache (`train.train_epochs`). The figure that
matters is the ratio of the cache build to the bare forward: 1.0 means decoding and the
read-out cost nothing beyond the encoder. Compile time (CUDA, --compile) is reported apart.
One JSON row (device, versions, commit, shapes) goes to bench/results/ or --json.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bacgcn  # noqa: E402
import checkpoints  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import frozen_clip  # noqa: E402
import pipeline  # noqa: E402
import registry  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

REAL_PHOTOS = ROOT.parent / "shared" / "data" / "real_sample" / "voc" / "JPEGImages"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def images_per_s(fn, batch: int, device: str, seconds: float = 3.0) -> float:
    """Steady-state rate of `fn` (one batch per call) after two warm-up calls."""
    fn()
    fn()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls < 3:
        fn()
        calls += 1
    sync(device)
    return calls * batch / (time.perf_counter() - t0)


def photo_folder(folder: Path, count: int, kind: str = "voc") -> data.MultiLabelImages:
    """`count` JPEGs to decode. "voc": the real VOC photos when present, else seeded noise photos
    of VOC's typical 500 x 375; "world": the proving ground's own 128-px renders (what the tiny
    CLIP's cache build decodes)."""
    from PIL import Image

    if kind == "world":
        import synthetic

        world = synthetic.build(folder / "world", synthetic.WorldConfig(seed=0, train=count, test=1), progress=False)
        return registry.load("synthetic", world, "trainval")
    sources = sorted(REAL_PHOTOS.glob("*.jpg")) if REAL_PHOTOS.is_dir() else []
    rng = np.random.default_rng(0)
    samples = []
    for k in range(count):
        path = folder / f"{k:06d}.jpg"
        if sources:
            shutil.copy(sources[k % len(sources)], path)
        else:
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        samples.append(data.Sample(f"{k:06d}", path, np.zeros(1, dtype=np.int8)))
    return data.MultiLabelImages(samples, ["object"], name="photos")


def measure_encoder(cfg, backbone, batch: int, device: str) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") and cfg.amp else torch.float32
    x = torch.randn(batch, 3, backbone.image_size, backbone.image_size, device=device)

    def run(fn):
        def call():
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype == torch.bfloat16):
                fn(x)
        return call
    out = {"encoder_forward_img_s": images_per_s(run(backbone.clip.encode_image), batch, device)}
    for readout in config.SUBSET_READOUTS:
        out[f"readout_{readout}_img_s"] = images_per_s(
            run(lambda v, r=readout: backbone.features(v, cfg.h_fraction, r)), batch, device)
    return out


def measure_cache_and_training(cfg, backbone, photos: data.MultiLabelImages, device: str) -> dict:
    spec = {"bench": "train_throughput", "model": cfg.clip_model, "size": backbone.image_size,
            "readout": cfg.subset_readout, "time": time.time()}
    photos.transform = pipeline.image_transform(backbone.image_size)
    t0 = time.perf_counter()
    feats = pipeline.load_or_encode(cfg, backbone, photos, spec, device, "cache build")
    sync(device)
    build_s = time.perf_counter() - t0
    classes, dim = 20, feats.row_shapes["g"][0]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    targets = (torch.rand(len(feats), classes, generator=gen) < 0.1).float()
    counts = targets.t() @ targets
    model = bacgcn.build_model(cfg, prompts, classes, counts, counts.diagonal(), 100.0).to(device)
    split = pipeline.Split(feats.ids, feats, photos)
    with open(os.devnull, "w") as devnull:
        sink = runs.MetricsLog(devnull)
        t0 = time.perf_counter()
        train.train_epochs(cfg.replace(epochs=1), model, backbone, train.TrainSet(split, targets, targets > 0, classes),
                           device, sink)
        sync(device)
        first_epoch_s = time.perf_counter() - t0        # includes torch.compile when asked
        t0 = time.perf_counter()
        train.train_epochs(cfg.replace(epochs=1), model, backbone, train.TrainSet(split, targets, targets > 0, classes),
                           device, sink)
        sync(device)
        epoch_s = time.perf_counter() - t0
    steps = -(-len(feats) // cfg.batch_size)
    return {"cache_build_img_s": len(feats) / build_s, "train_steps_s": steps / epoch_s,
            "train_compile_s": max(0.0, first_epoch_s - epoch_s) if cfg.compile else 0.0}


def save(path, row: dict) -> None:
    data.write_json(path, row)
    print(f"wrote {path}", flush=True)
    # bench/gpu_check.py's fault injection (tests/test_gpu_check.py): a step that runs past its
    # time limit right after it saved a measurement, to prove that what it saved survives.
    if os.environ.get("BACGCN_STALL_AFTER_SAVE") == "1":
        time.sleep(3600)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="synthetic-tiny", help="config preset to start from")
    parser.add_argument("--model", help="open_clip architecture (default: the preset's; random weights unless "
                                        "the preset's weights file exists)")
    parser.add_argument("--image-size", type=int, help="input size (default: the preset's)")
    parser.add_argument("--batch", type=int, default=64, help="encoder batch (and training batch)")
    parser.add_argument("--images", type=int, default=512, help="photos in the cache build")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers of the cache build")
    parser.add_argument("--photos", choices=("auto", "voc", "world"), default="auto",
                        help="what the cache build decodes: VOC photos (500 x 375) or the proving ground's 128-px "
                             "renders (auto: the renders for the preset's tiny CLIP, VOC photos otherwise)")
    parser.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step (CUDA)")
    parser.add_argument("--json", help="write the row here (default: bench/results/throughput-<device>-<model>.json)")
    args = parser.parse_args(argv)
    cfg, _ = config.parse_overrides([f"--preset={args.preset}"])
    model_name = args.model or cfg.clip_model
    weights = Path(cfg.clip_weights) if Path(cfg.clip_weights).is_absolute() else ROOT / cfg.clip_weights
    device = pipeline.resolve_device(args.device)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu-{os.cpu_count()}cores"
    with tempfile.TemporaryDirectory() as tmp:
        if model_name != cfg.clip_model or not weights.is_file():     # random weights, saved so the cache can key them
            weights = Path(tmp) / "random.safetensors"
            torch.manual_seed(0)
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in frozen_clip.create_clip(model_name).state_dict().items()},
                      str(weights))
        cfg = cfg.replace(clip_model=model_name, clip_weights=str(weights),
                          image_size=args.image_size or cfg.image_size, batch_size=args.batch,
                          workers=args.workers, compile=args.compile, cache_dir=str(Path(tmp) / "cache"),
                          use_reso=False, log_every=10**9)
        backbone = pipeline.build_backbone(cfg, device)
        (Path(tmp) / "photos").mkdir()
        kind = args.photos if args.photos != "auto" else ("world" if model_name == "synthclip-vit-t8" else "voc")
        photos = photo_folder(Path(tmp) / "photos", args.images, kind)
        row = {"device": name, "model": model_name, "image_size": backbone.image_size, "batch": args.batch,
               "images": args.images, "photos": kind, "workers": args.workers, "subset_readout": cfg.subset_readout,
               "dtype": "bf16" if device.startswith("cuda") and cfg.amp else "fp32", "torch": torch.__version__,
               "python": platform.python_version(), "commit": checkpoints.git_commit(),
               "date": time.strftime("%Y-%m-%d")}
        slug = "".join(c if c.isalnum() else "-" for c in f"{name}-{model_name}-{backbone.image_size}".lower())
        out = args.json or ROOT / "bench" / "results" / f"throughput-{slug}.json"
        # The row is saved after each measurement: a run cut at a time limit keeps what it measured.
        row.update(measure_encoder(cfg, backbone, args.batch, device))
        save(out, row)
        row.update(measure_cache_and_training(cfg, backbone, photos, device))
        row["cache_build_vs_encoder"] = row["cache_build_img_s"] / row["encoder_forward_img_s"]
    for k, v in row.items():
        print(f"{k:>28}: {v:.3f}" if isinstance(v, float) else f"{k:>28}: {v}")
    save(out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
