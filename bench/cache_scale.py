"""Memory and speed of training from a feature cache larger than memory.

  python bench/cache_scale.py --images N --patches P --dim D [--classes C] [--memory-gb G] [--json out.json]

Writes a cache of N random images of P patch embeddings of width D (bf16, through the real
FeatureCache writer; no encoder), then, each in a fresh process so that its peak resident memory
is its own: trains BAC-GCN's head one epoch from the cache and scores every cached image, once
streamed from disk (budget `--memory-gb`, default 0) and, when the cache fits in half the
machine's memory, once held in memory. Reports {"cache_bytes", "peak_rss_bytes",
"images_per_s"} of the streamed run, the in-memory run's figures and their ratio, and the cost
of the check every cache hit makes (every shard's identity and sha256, FeatureCache.problem):
its bytes per second, its time against one streamed epoch, and what it comes to for COCO's
66 GB cache (ViT-B/16 at 448 px) at that rate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import pipeline  # noqa: E402
import runs  # noqa: E402
from cache import FeatureCache  # noqa: E402

FIELDS = ("patches", "g", "gH", "gHc", "attn")
COCO_CACHE_BYTES = 66e9        # COCO train2014 + val2014 at ViT-B/16 448 px (README, "Feature cache")


class _Blank(torch.utils.data.Dataset):
    """Stand-in images for the writer: the 'encoder' below ignores them."""

    def __init__(self, n: int):
        self.n, self.name = n, "random features"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> dict:
        return {"image": torch.zeros(3, 1, 1, dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int8),
                "id": f"{k:08d}", "index": k}


def write_cache(root: Path, images: int, patches: int, dim: int) -> FeatureCache:
    gen = torch.Generator().manual_seed(0)

    def encode(x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        p = torch.nn.functional.normalize(torch.randn(b, patches, dim, generator=gen), dim=-1)
        g = [torch.nn.functional.normalize(torch.randn(b, dim, generator=gen), dim=-1) for _ in range(3)]
        return {"patches": p, "g": g[0], "gH": g[1], "gHc": g[2], "attn": torch.rand(b, patches, generator=gen)}

    cache = FeatureCache(root, {"bench": "cache_scale", "images": images, "patches": patches, "dim": dim})
    if not cache.complete:
        cache.build(_Blank(images), encode, batch_size=64, desc="writing random features")
    return cache


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: a child started by
    fork and exec inherits its parent's maximum, here the writer's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # not Linux: the best there is


def train_and_score(cache_dir: Path, key_spec: dict, classes: int, memory_gb: float) -> dict:
    """One epoch of the head and a scoring pass, from the cache; runs in its own process."""
    import numpy as np

    import bacgcn
    import config
    import train
    from metrics import mean_ap

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = config.BACGCNConfig(epochs=1, use_reso=False, cache_memory_gb=memory_gb, log_every=10**9)
    baseline = peak_rss_bytes()      # before the cache is opened: what the process needs without it
    feats = FeatureCache(cache_dir, key_spec).open(memory_gb * 2**30)
    n, dim = len(feats), feats.row_shapes["g"][0]
    gen = torch.Generator().manual_seed(1)
    prompts = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    targets = (torch.rand(n, classes, generator=gen) < 0.1).float()
    counts = targets.t() @ targets
    model = bacgcn.build_model(cfg, prompts, classes, counts, counts.diagonal(), 100.0)
    split = pipeline.Split(feats.ids, feats, None)
    t0 = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        sink = runs.MetricsLog(devnull)
        train.train_epochs(cfg, model, None, train.TrainSet(split, targets, targets > 0, classes), "cpu", sink)
    train_s = time.perf_counter() - t0
    logits = pipeline.predict(model, feats, "cpu", torch.float32)
    labels = np.where(targets.numpy() > 0, 1, -1).astype(np.int8)
    return {"images": n, "train_images_per_s": n / train_s, "mAP_random": mean_ap(logits, labels),
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes(),
            "held_in_memory": feats.tensors is not None}


def run_child(args: argparse.Namespace, cache: FeatureCache, memory_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", str(cache.dir.parent), json.dumps(cache.spec),
           "--classes", str(args.classes), "--memory-gb", str(memory_gb)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--patches", type=int, default=196)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=44, help="categories (classes + backgrounds)")
    parser.add_argument("--memory-gb", type=float, default=0.0, help="in-memory budget of the streamed run")
    parser.add_argument("--dir", help="where the cache goes (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the row here")
    parser.add_argument("--child", nargs=2, metavar=("CACHE_ROOT", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(train_and_score(Path(args.child[0]), json.loads(args.child[1]), args.classes,
                                         args.memory_gb)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cache = write_cache(Path(tmp), args.images, args.patches, args.dim)
        cache_bytes = sum(f.stat().st_size for f in cache.dir.glob("*.safetensors"))
        t0 = time.perf_counter()
        assert cache.problem() is None
        check_s = time.perf_counter() - t0
        streamed = run_child(args, cache, args.memory_gb)
        fits = cache_bytes < 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        in_memory = run_child(args, cache, float("inf")) if fits else None
    row = {"cache_bytes": cache_bytes, "peak_rss_bytes": streamed["peak_rss_bytes"],
           "images_per_s": streamed["train_images_per_s"], "streamed": streamed, "in_memory": in_memory,
           "streamed_vs_in_memory_speed": (streamed["train_images_per_s"] / in_memory["train_images_per_s"]
                                           if in_memory else None),
           "check_bytes_per_s": cache_bytes / check_s,
           "check_vs_streamed_epoch": check_s * streamed["train_images_per_s"] / args.images,
           "check_seconds_at_coco_66gb": COCO_CACHE_BYTES / (cache_bytes / check_s),
           "shapes": {"images": args.images, "patches": args.patches, "dim": args.dim, "classes": args.classes},
           "torch": torch.__version__, "python": platform.python_version(), "commit": checkpoints.git_commit(),
           "cpus": os.cpu_count()}
    gib = 2**30
    print(f"cache {cache_bytes / gib:.2f} GiB; streamed: peak RSS {streamed['peak_rss_bytes'] / gib:.2f} GiB, "
          f"{streamed['train_images_per_s']:.0f} img/s"
          + (f"; in memory: peak RSS {in_memory['peak_rss_bytes'] / gib:.2f} GiB, "
             f"{in_memory['train_images_per_s']:.0f} img/s; streamed/in-memory speed "
             f"{row['streamed_vs_in_memory_speed']:.2f}" if in_memory else "")
          + f"; the hit's check: {row['check_bytes_per_s'] / gib:.2f} GiB/s, {row['check_vs_streamed_epoch']:.2f} of "
          f"a streamed epoch, {row['check_seconds_at_coco_66gb']:.0f} s at COCO's 66 GB")
    if args.json:
        data.write_json(args.json, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
