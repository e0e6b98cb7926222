"""Size, read rate and memory of training from a feature cache, per cache format, side by side.

  python bench/cache_scale.py --images N --patches P --dim D [--classes C] [--formats int8 bf16]
                              [--device cpu|cuda] [--memory-gb G] [--read-only] [--streamed-only]
                              [--dir DIR] [--json out.json]
  python bench/cache_scale.py --on-paper      # the datasets' cache sizes and epoch times from bandwidths

Per format, in one run: writes a cache of N random images of P patch tokens of width D through the
real writer (no encoder); reads its shard files front to back (the plain sequential read: the disk's
or, where the files are cached, the page cache's speed), once into an 8 MiB buffer and once into a
buffer of one batch's bytes (the epoch's baseline: a batch must land in memory, not in the CPU's
cache); then, each in a fresh process so that its peak resident memory is its own, streamed from
disk (budget `--memory-gb`, default 0):
  epoch read   one epoch of the trainer's loader alone (`cache.stream`, the training order, batches
               of 64): the rows as they cross to the device, timed against the plain read, and
               again decoded as the head gets them;
  train        one epoch of BAC-GCN's head and a scoring pass over every image (not with --read-only);
and the same with the cache held on the device (GPU memory, or RAM on the CPU) when it fits half of
what is free. Peak resident memory is found phase by phase (the kernel's peak is reset between
them) and named: the process before the cache is opened (torch and the code), the loader's batches,
the training step, the scoring pass. The row ends with the bytes per image and per training epoch
of VOC2007, VOC2012, COCO and NUS-WIDE at 448 px (ViT-B/16), and the cost of the check every cache
hit makes (each shard's identity and sha256).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cache  # noqa: E402
import checkpoints  # noqa: E402
import data  # noqa: E402
import pipeline  # noqa: E402
import registry  # noqa: E402
import runs  # noqa: E402

VIT_B16_448 = {"patches": 784, "dim": 512}     # ViT-B/16 at 448 px: 28 x 28 patch tokens of 512
BATCH = 64                                     # the presets' batch size
# Bandwidths for the on-paper table: datasheet figures, not measured here (bench/README.md says
# which the GPU acceptance run has replaced with its own).
DATASHEET_BYTES_PER_S = {
    "H100 SXM HBM3": 3.35e12, "H200 HBM3e": 4.8e12, "PCIe 5.0 x16 (pinned host memory)": 64e9,
    "NVMe PCIe 4.0 x4 SSD": 7e9,
}
GPU_MEMORY_GB = {"80 GB GPU": 80, "141 GB GPU": 141}
COMPARED = ("int8", "bf16")     # the formats a run uses (fp32 is the accuracy reference of cache_format.py)


class _Blank(torch.utils.data.Dataset):
    """Stand-in images for the writer: the 'encoder' below ignores them."""

    def __init__(self, n: int):
        self.n, self.name = n, "random features"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> dict:
        return {"image": torch.zeros(3, 1, 1, dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int8),
                "id": f"{k:08d}", "index": k}


def random_rows(batch: int, patches: int, dim: int, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """What the encoder gives per image (the fields and shapes of CLIPBackbone.features), random."""
    normal = torch.nn.functional.normalize
    return {"patches": normal(torch.randn(batch, patches, dim, generator=gen), dim=-1),
            **{k: normal(torch.randn(batch, dim, generator=gen), dim=-1) for k in ("g", "gH", "gHc")},
            "attn": torch.rand(batch, patches, generator=gen)}


def bytes_per_image(fmt: str, patches: int, dim: int) -> int:
    """What one image takes in a cache of format `fmt`, from the writer's own conversion."""
    fields: dict[str, list] = {}
    cache.keep_rows(fields, random_rows(1, patches, dim), fmt)
    return sum(v[0].nbytes for v in fields.values())


def write_cache(root: Path, images: int, patches: int, dim: int, fmt: str) -> cache.FeatureCache:
    gen = torch.Generator().manual_seed(0)
    spec = {"bench": "cache_scale", "images": images, "patches": patches, "dim": dim}
    written = cache.FeatureCache(root, spec, fmt=fmt)
    if not written.complete:
        written.build(_Blank(images), lambda x: random_rows(x.shape[0], patches, dim, gen), batch_size=64,
                      desc=f"writing random features ({fmt})")
    return written


def plain_read_bytes_per_s(folder: Path, block: int = 8 << 20) -> float:
    """Every shard read once front to back in blocks of `block` bytes, into one reused buffer."""
    files = sorted(folder.glob("*.safetensors"))
    buffer, total = bytearray(block), 0
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# The child: one format, one mode, its memory measured phase by phase
# --------------------------------------------------------------------------------------------

def rss_bytes(field: str = "VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident set. Not getrusage's ru_maxrss: a
    child started by fork and exec inherits its parent's maximum, here the writer's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # not Linux: the best there is


def reset_peak() -> None:
    """Start a new peak from the current resident set (Linux: clear_refs 5 resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def child(cache_dir: Path, spec: dict, fmt: str, classes: int, memory_gb: float, device: str,
          read_only: bool = False) -> dict:
    """The loader's epoch, then (unless `read_only`) one epoch of the head and a scoring pass."""
    import numpy as np

    import bacgcn
    import config
    import train
    from metrics import mean_ap

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = config.BACGCNConfig(epochs=1, use_reso=False, cache_memory_gb=memory_gb, log_every=10**9, batch_size=BATCH)
    dtype = pipeline.compute_dtype(device, cfg.amp)
    memory, peaks = {"torch and the code": rss_bytes("VmRSS")}, [rss_bytes()]

    @contextlib.contextmanager
    def phase(name: str):
        """What the phase adds to the resident set at its peak, and that peak."""
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        reset_peak()
        base = rss_bytes("VmRSS")
        yield
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        memory[name] = max(memory.get(name, 0), rss_bytes() - base)
        peaks.append(rss_bytes())

    with phase("opening the cache"):
        feats, where = cache.FeatureCache(cache_dir, spec, fmt=fmt).open_within(memory_gb, device)
    n, dim = len(feats), feats.row_shapes["g"][0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    batches = [(feats, order[i:i + BATCH]) for i in range(0, n, BATCH)]
    seconds = {}
    for decoded in (False, True):       # the rows as they cross to the device, then as the head gets them
        t0 = time.perf_counter()
        with phase("the loader's batches in flight"), \
                contextlib.closing(cache.stream(batches, pipeline.FEATURE_KEYS, device, dtype,
                                                decoded=decoded)) as rows:
            while next(rows, None) is not None:      # no name holds a batch while the next is read
                pass
        seconds[decoded] = time.perf_counter() - t0
    row = {"images": n, "where": where, "held": feats.tensors is not None, "epoch_read_s": seconds[False],
           "epoch_read_bytes_per_s": feats.nbytes / seconds[False],
           "epoch_read_decoded_bytes_per_s": feats.nbytes / seconds[True], "memory": memory,
           "baseline_rss_bytes": memory["torch and the code"]}
    if read_only:
        return {**row, "peak_rss_bytes": max(peaks)}

    gen = torch.Generator().manual_seed(1)
    prompts = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    targets = (torch.rand(n, classes, generator=gen) < 0.1).float()
    counts = targets.t() @ targets
    model = bacgcn.build_model(cfg, prompts, classes, counts, counts.diagonal(), 100.0).to(device)
    trainset = train.TrainSet(pipeline.Split(feats.ids, feats, None), targets.to(device), targets.to(device) > 0,
                              classes)
    t0 = time.perf_counter()
    with phase("a training step"), open(os.devnull, "w") as devnull:
        train.train_epochs(cfg, model, None, trainset, device, runs.MetricsLog(devnull))
    train_s = time.perf_counter() - t0
    with phase("the scoring pass"):
        logits = pipeline.predict(model, feats, device, dtype)
    labels = np.where(targets.numpy() > 0, 1, -1).astype(np.int8)
    return {**row, "train_images_per_s": n / train_s, "mAP_random": mean_ap(logits, labels),
            "peak_rss_bytes": max(peaks)}


def run_child(written: cache.FeatureCache, fmt: str, args: argparse.Namespace, memory_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", str(written.dir.parent), json.dumps(written.spec), "--formats", fmt,
           "--classes", str(args.classes), "--memory-gb", str(memory_gb), "--device", args.device,
           *(["--read-only"] if args.read_only else [])]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Sizes of the real datasets, and the on-paper table
# --------------------------------------------------------------------------------------------

def dataset_rows() -> list[dict]:
    """Bytes per image and per training epoch (its train split, read once an epoch) at 448 px."""
    per_image = {fmt: bytes_per_image(fmt, **VIT_B16_448) for fmt in COMPARED}
    rows = []
    for entry in registry.REGISTRY.values():
        if entry.split_images:
            train = entry.split_images[entry.train_split]
            rows.append({"dataset": entry.name, "train_split": entry.train_split, "train_images": train,
                         "images": sum(entry.split_images.values()), "bytes_per_image": per_image,
                         "epoch_bytes": {fmt: train * b for fmt, b in per_image.items()},
                         "cache_bytes": {fmt: sum(entry.split_images.values()) * b for fmt, b in per_image.items()}})
    return rows


def on_paper() -> str:
    """bench/README.md's table: per dataset and format, the training split's cache, whether it is
    held on an 80 GB and a 141 GB GPU (pipeline's share of free memory), and an epoch's read time
    resident on the GPU, from pinned host memory and from NVMe, from datasheet bandwidths."""
    share = cache.RESIDENT_SHARE["cuda"]
    hbm = [k for k in DATASHEET_BYTES_PER_S if "HBM" in k]
    links = [k for k in DATASHEET_BYTES_PER_S if "HBM" not in k]
    head = ["dataset (train split)", "format", "epoch GB", *[f"held on {g}" for g in GPU_MEMORY_GB],
            *[f"epoch on {k}" for k in hbm], *[f"epoch from {k}" for k in links]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in dataset_rows():
        for fmt in COMPARED:
            size = row["epoch_bytes"][fmt]
            fits = ["yes" if size <= share * gb * 1e9 else "no" for gb in GPU_MEMORY_GB.values()]
            times = [seconds_words(size / DATASHEET_BYTES_PER_S[k]) for k in hbm + links]
            lines.append(f"| {row['dataset']} ({row['train_split']}, {row['train_images']:,}) | {fmt} | "
                         f"{size / 1e9:.1f} | " + " | ".join(fits + times) + " |")
    return "\n".join(lines)


def seconds_words(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.1f} s"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def measure_format(root: Path, args: argparse.Namespace, fmt: str) -> dict:
    t0 = time.perf_counter()
    written = write_cache(root, args.images, args.patches, args.dim, fmt)
    write_s = time.perf_counter() - t0
    cache_bytes = sum(f.stat().st_size for f in written.dir.glob("*.safetensors"))
    t0 = time.perf_counter()
    assert written.problem() is None
    check_s = time.perf_counter() - t0
    # The plain read twice: into an 8 MiB buffer, which stays in the CPU's cache (dd's figure, a
    # copy no consumer can use), and into a buffer of one batch's bytes, which lands in memory as a
    # batch must: the baseline the epoch's read is held to. The first pass also warms the page cache.
    plain = plain_read_bytes_per_s(written.dir)
    plain_batch = plain_read_bytes_per_s(written.dir, BATCH * bytes_per_image(fmt, args.patches, args.dim))
    streamed = run_child(written, fmt, args, args.memory_gb)
    free = torch.cuda.mem_get_info()[0] if args.device.startswith("cuda") else cache.available_ram()
    fits = cache_bytes < 0.5 * free and not args.streamed_only
    resident = run_child(written, fmt, args, float("inf")) if fits else None
    shutil.rmtree(written.dir)         # before the next format is written: the disk and the page cache are its
    speeds = [r["train_images_per_s"] for r in (streamed, resident) if r and "train_images_per_s" in r]
    return {"bytes_per_image": bytes_per_image(fmt, args.patches, args.dim), "cache_bytes": cache_bytes,
            "write_images_per_s": args.images / write_s, "plain_read_bytes_per_s": plain,
            "plain_read_batch_bytes_per_s": plain_batch, "epoch_read_vs_plain_8mib": streamed[
                "epoch_read_bytes_per_s"] / plain,
            "epoch_read_bytes_per_s": streamed["epoch_read_bytes_per_s"],
            "epoch_read_vs_plain": streamed["epoch_read_bytes_per_s"] / plain_batch,
            "streamed": streamed, "resident": resident,
            "streamed_vs_resident_speed": speeds[0] / speeds[1] if len(speeds) == 2 else None,
            "check_bytes_per_s": cache_bytes / check_s,
            "check_vs_epoch_read": check_s / streamed["epoch_read_s"],
            "check_seconds": {r["dataset"]: r["cache_bytes"][fmt] / (cache_bytes / check_s) for r in dataset_rows()}}


def report_line(fmt: str, r: dict) -> str:
    gib = 2**30
    s = r["streamed"]
    named = ", ".join(f"{k} {v / gib:.2f}" for k, v in s["memory"].items())
    line = (f"{fmt}: {r['bytes_per_image'] / 1e3:.0f} kB an image, cache {r['cache_bytes'] / gib:.2f} GiB; plain read "
            f"{r['plain_read_batch_bytes_per_s'] / gib:.2f} GiB/s into a batch's buffer "
            f"({r['plain_read_bytes_per_s'] / gib:.2f} into 8 MiB), epoch read {r['epoch_read_bytes_per_s'] / gib:.2f} "
            f"GiB/s ({r['epoch_read_vs_plain']:.2f} of it; {r['epoch_read_vs_plain_8mib']:.2f} of the 8-MiB one); "
            f"streamed: peak RSS {s['peak_rss_bytes'] / gib:.2f} GiB "
            f"({named} GiB)")
    if "train_images_per_s" in s:
        line += f", train {s['train_images_per_s']:.0f} img/s"
    line += f"; the hit's check {r['check_bytes_per_s'] / gib:.2f} GiB/s (" + ", ".join(
        f"{name} {seconds:.0f} s" for name, seconds in r["check_seconds"].items()) + ")"
    if r["resident"] and "train_images_per_s" in r["resident"]:
        held = r["resident"]
        line += (f"; held: peak RSS {held['peak_rss_bytes'] / gib:.2f} GiB, train {held['train_images_per_s']:.0f} "
                 f"img/s (streamed/held {r['streamed_vs_resident_speed']:.2f})")
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--patches", type=int, default=196)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=44, help="categories (classes + backgrounds)")
    parser.add_argument("--formats", nargs="+", choices=list(cache.FORMATS), default=list(COMPARED))
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the head trains and a held cache lives")
    parser.add_argument("--memory-gb", type=float, default=0.0, help="in-memory budget of the streamed run")
    parser.add_argument("--dir", help="where the caches go (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the row here")
    parser.add_argument("--on-paper", action="store_true", help="print the datasets' on-paper table and stop")
    parser.add_argument("--read-only", action="store_true", help="the loader's epoch only: no training, no scoring")
    parser.add_argument("--streamed-only", action="store_true", help="no run with the cache held on the device")
    parser.add_argument("--child", nargs=2, metavar=("CACHE_ROOT", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.on_paper:
        print(on_paper())
        return 0
    if args.child:
        print(json.dumps(child(Path(args.child[0]), json.loads(args.child[1]), args.formats[0], args.classes,
                               args.memory_gb, args.device, args.read_only)))
        return 0
    row = {"shapes": {"images": args.images, "patches": args.patches, "dim": args.dim, "classes": args.classes},
           "device": args.device, "formats": {}, "datasets": dataset_rows(), "torch": torch.__version__,
           "python": platform.python_version(), "commit": checkpoints.git_commit(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fmt in args.formats:
            row["formats"][fmt] = measure_format(Path(tmp), args, fmt)
            print(report_line(fmt, row["formats"][fmt]), flush=True)
            if args.json:           # after each format: a run cut short keeps what it measured
                data.write_json(args.json, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
