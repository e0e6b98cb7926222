"""GPU acceptance: one command that checks and measures the whole CUDA path on a card.

  python bench/gpu_check.py [--budget 480] [--results bench/results] [--dry-run]

On the GPU image (Python 3.12, torch 2.11, torchvision 0.26, triton 3.6; no open_clip, no ftfy),
first bring the missing packages as wheels, downloaded where PyPI is reachable:
  pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \\
      -d wheels/py312 open-clip-torch==3.3.0 ftfy wcwidth regex safetensors tqdm
  pip install --no-index --no-deps wheels/py312/*.whl          # on the GPU machine, first thing

Steps, each in its own process under its own time limit (a failed step is recorded, the next
one runs; the whole stays within --budget seconds):
 1. the CUDA tests: the kernel tests compiled on this GPU (odd shapes, N = 784 and 1024, bf16),
    the CUDA-path tests;
 2. bench/profile_kernel.py: each kernel fwd+bwd against torch eager and torch.compile of its
    reference, and against the card's copy bandwidth;
 3. bench/train_throughput.py, ViT-B/16 (random weights) at 224 and 448 px: the bare encoder
    forward, the read-out, the cache build end to end (img/s and its ratio to the bare forward),
    training steps/s from that cache;
 4. JPEG decoding, CPU (Pillow, per core) against nvjpeg (torchvision.io.decode_jpeg on the GPU):
    whether the CPU decoders can feed the encoder;
 5. `train.py --preset=voc2007-vitb16` end to end, timed, on a generated VOC2007-layout set of
    5,011 trainval and 4,952 test images with captions.
Then bench/results/<card>.json (card, versions, commit, shapes, every step's figures and the
targets met or missed) and the table between the gpu-check markers of bench/README.md.
`--dry-run` runs the same steps on the CPU at toy sizes into a temporary folder: CI runs it, so
this script cannot rot before the first GPU runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

README = ROOT / "bench" / "README.md"
MARKERS = ("<!-- gpu-check:begin -->", "<!-- gpu-check:end -->")

# The figures a card must reach (the proving of the performance design).
TARGETS = {
    "similarity_pool fwd+bwd vs eager": 3.0, "similarity_pool fwd+bwd vs torch.compile": 1.5,
    "similarity_pool forward, fraction of copy bandwidth": 0.70, "gcn_propagate fwd+bwd vs eager": 2.0,
    "cache build vs bare encoder, 224 px": 0.8, "cache build vs bare encoder, 448 px": 0.8,
    "cache build img/s, 224 px": 2500, "cache build img/s, 448 px": 600,
}
TRAIN_SECONDS_TARGET = 60.0     # VOC2007 training from the cache, at most


def run_step(name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """One step in its own process: its exit status, time and output tail, never an exception."""
    print(f"\n=== {name}: {' '.join(cmd)}  (limit {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - t0
    print(out[-4000:], flush=True)
    print(f"=== {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {seconds:.0f} s", flush=True)
    return {"step": name, "ok": code == 0, "exit": code, "seconds": round(seconds, 1), "tail": out[-2000:]}


# --------------------------------------------------------------------------------------------
# A VOC2007-layout set of generated photos, with captions and random ViT-B/16 weights
# --------------------------------------------------------------------------------------------

def _render(args) -> None:
    """One 500 x 375 JPEG with 1-3 coloured boxes (the objects) on a gradient, and its XML."""
    import numpy as np
    from PIL import Image, ImageDraw

    base, image_id, seed, classes = args
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 500)[None, :, None] * rng.integers(0, 255, 3) + rng.integers(0, 80, 3)
    img = Image.fromarray(np.broadcast_to(ramp, (375, 500, 3)).clip(0, 255).astype(np.uint8))
    draw, objects = ImageDraw.Draw(img), []
    for name in classes:
        w, h = int(rng.integers(40, 300)), int(rng.integers(40, 250))
        x, y = int(rng.integers(0, 500 - w)), int(rng.integers(0, 375 - h))
        draw.rectangle([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        objects.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin>"
                       f"<ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>")
    img.save(base / "JPEGImages" / f"{image_id}.jpg", quality=90)
    (base / "Annotations" / f"{image_id}.xml").write_text(
        f"<annotation><filename>{image_id}.jpg</filename><size><width>500</width><height>375</height>"
        f"<depth>3</depth></size>{''.join(objects)}</annotation>")


def voc_layout(root: Path, trainval: int, test: int, workers: int) -> tuple[Path, Path]:
    """(VOCdevkit, captions folder): VOC2007's layout with per-class ImageSets files, six
    captions per trainval image naming its classes (one of them wrong now and then)."""
    from multiprocessing import Pool

    import numpy as np

    import data

    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {"trainval": [f"{k:06d}" for k in range(trainval)],
              "test": [f"{k:06d}" for k in range(trainval, trainval + test)]}
    labels = {i: sorted(set(rng.choice(data.VOC_CLASSES, int(rng.integers(1, 4))))) for ids in splits.values()
              for i in ids}
    jobs = [(base, i, int(i), labels[i]) for i in labels]
    with Pool(max(1, workers)) as pool:
        pool.map(_render, jobs, chunksize=64)
    main = base / "ImageSets" / "Main"
    for split, ids in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for c in data.VOC_CLASSES:
            (main / f"{c}_{split}.txt").write_text("".join(f"{i} {1 if c in labels[i] else -1}\n" for i in ids))
    captions = {}
    for i in splits["trainval"]:
        named = [c if rng.random() > 0.1 else str(rng.choice(data.VOC_CLASSES)) for c in labels[i]]
        captions[f"{i}."] = [f"a photo of a {' and a '.join(named)} on a plain background"] * 6
    (root / "captions").mkdir()
    (root / "captions" / "captions.json").write_text(json.dumps(captions))
    return root / "VOCdevkit", root / "captions"


def random_weights(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    import frozen_clip

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in frozen_clip.create_clip("ViT-B-16-quickgelu").state_dict().items()},
              str(path))
    return path


# --------------------------------------------------------------------------------------------
# JPEG decoding: the CPU's decoders against nvjpeg
# --------------------------------------------------------------------------------------------

def decode_rates(folder: Path, count: int, cuda: bool) -> dict:
    """img/s of one CPU core decoding with Pillow (what each loader worker does) and of nvjpeg
    decoding batches on the GPU, over the same JPEG files."""
    import io

    import torch
    from PIL import Image

    files = sorted(folder.glob("*.jpg"))[:count]
    blobs = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    for b in blobs:
        Image.open(io.BytesIO(b)).convert("RGB").load()
    out = {"jpegs": len(blobs), "cpu_core_img_s": len(blobs) / (time.perf_counter() - t0),
           "cpu_cores": os.cpu_count()}
    if cuda:
        from torchvision.io import decode_jpeg

        batch = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]
        decode_jpeg(batch[:8], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(0, len(batch), 64):
            decode_jpeg(batch[k:k + 64], device="cuda")
        torch.cuda.synchronize()
        out["nvjpeg_img_s"] = len(blobs) / (time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------
# Figures and targets
# --------------------------------------------------------------------------------------------

def kernel_figures(profile: dict) -> dict:
    """The best-case figures of profile_kernel.py's rows (Triton provider, per op)."""
    out: dict[str, float] = {}
    for r in profile.get("rows", []):
        if r["provider"] != "triton":
            continue
        op, mode = r["op"], r["mode"]
        if mode == "forward+backward":
            for key, value in ((f"{op} fwd+bwd vs eager", r["speedup_vs_eager"]),
                               (f"{op} fwd+bwd vs torch.compile", r["speedup_vs_compile"])):
                out[key] = min(out.get(key, value), value)
        if mode == "forward":
            key = f"{op} forward, fraction of copy bandwidth"
            out[key] = min(out.get(key, r["fraction_of_copy_bandwidth"]), r["fraction_of_copy_bandwidth"])
    return out


def throughput_figures(rows: dict[int, dict]) -> dict:
    out = {}
    for size, row in rows.items():
        out[f"cache build vs bare encoder, {size} px"] = row["cache_build_vs_encoder"]
        out[f"cache build img/s, {size} px"] = row["cache_build_img_s"]
        out[f"bare encoder img/s, {size} px"] = row["encoder_forward_img_s"]
        out[f"training steps/s, {size} px"] = row["train_steps_s"]
    return out


def judge(figures: dict) -> dict:
    checks = {k: {"target": t, "measured": figures.get(k), "met": figures.get(k) is not None and figures[k] >= t}
              for k, t in TARGETS.items()}
    seconds = figures.get("VOC2007 training s")
    checks["VOC2007 training s"] = {"target": TRAIN_SECONDS_TARGET, "measured": seconds,
                                    "met": seconds is not None and seconds <= TRAIN_SECONDS_TARGET}
    return checks


def readme_table(result: dict) -> str:
    lines = [f"{result['card']}, torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, "
             f"{result['date']}{' (dry run on the CPU: figures meaningless)' if result['dry_run'] else ''}", "",
             "| figure | measured | target | met |", "|---|---|---|---|"]
    for name, c in result["checks"].items():
        measured = "—" if c["measured"] is None else f"{c['measured']:.3g}"
        lines.append(f"| {name} | {measured} | {c['target']:g} | {'yes' if c['met'] else 'no'} |")
    lines += ["", "| step | ok | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {'yes' if s['ok'] else 'no (' + str(s['exit']) + ')'} | {s['seconds']:.0f} |"
              for s in result["steps"]]
    return "\n".join(lines)


def write_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    begin, end = MARKERS
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## GPU acceptance (bench/gpu_check.py)\n\n{block}\n"
    readme.write_text(text)


# --------------------------------------------------------------------------------------------

class Steps:
    """The run's steps against one time budget, and the figures they produced."""

    def __init__(self, budget: float, dry_run: bool, cuda: bool, tmp: Path):
        self.budget, self.dry_run, self.cuda, self.tmp = budget, dry_run, cuda, tmp
        self.start = time.perf_counter()
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.env["HF_HUB_OFFLINE"] = "1"
        self.workers = max(1, (os.cpu_count() or 2) - 2)
        self.sizes = {"trainval": 5011, "test": 4952, "throughput_images": 2048, "batch": 256} if not dry_run else \
            {"trainval": 8, "test": 8, "throughput_images": 8, "batch": 4}
        self.done: list[dict] = []
        self.figures: dict = {}

    def run(self, name: str, args: list[str], share: float) -> dict:
        """Run `python ARGS` with `share` of the budget at most (and no more than is left)."""
        limit = max(1.0, min(share * self.budget, self.budget - (time.perf_counter() - self.start)))
        step = run_step(name, [sys.executable, *args], limit, self.env)
        self.done.append(step)
        return step

    def tests_and_profile(self) -> None:
        tests = ["tests/test_kernels.py", "tests/test_cuda_path.py"] if self.cuda else ["tests/test_cuda_path.py"]
        self.run("CUDA tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], 0.15)
        profile = self.tmp / "profile.json"
        self.run("kernel profile", ["bench/profile_kernel.py", "--dtype", "bf16", "--out", str(profile)]
                 + ([] if self.cuda else ["--quick"]), 0.2)
        if profile.is_file():
            self.figures.update(kernel_figures(json.loads(profile.read_text())))

    def throughput(self) -> None:
        rows = {}
        for size in (224, 448) if not self.dry_run else (224,):
            out = self.tmp / f"throughput-{size}.json"
            # The dry run reads with the shipped tiny CLIP (ViT-B/16 on two CPU cores takes minutes).
            model = ["--preset=voc2007-vitb16", f"--image-size={size}"] if not self.dry_run else \
                ["--preset=synthetic-tiny", "--image-size=64", "--photos=voc"]
            self.run(f"throughput {size} px", ["bench/train_throughput.py", *model,
                                               f"--images={self.sizes['throughput_images']}",
                                               f"--batch={self.sizes['batch']}", f"--workers={self.workers}",
                                               "--json", str(out)], 0.12)
            if out.is_file():
                rows[size] = json.loads(out.read_text())
        self.figures.update(throughput_figures(rows))

    def end_to_end(self) -> None:
        import config

        devkit, captions = voc_layout(self.tmp / "voc", self.sizes["trainval"], self.sizes["test"],
                                      os.cpu_count() or 1)
        self.figures.update({f"JPEG decode: {k}": v for k, v in decode_rates(
            devkit / "VOC2007" / "JPEGImages", 512 if self.cuda else 8, self.cuda).items()})
        args = ["train.py", "--preset=voc2007-vitb16", f"--data-root={devkit}", f"--captions={captions}",
                f"--cache-dir={self.tmp / 'cache'}", f"--out={self.tmp / 'run'}"]
        if self.dry_run:
            tiny, _ = config.parse_overrides(["--preset=synthetic-tiny"])
            args += [f"--clip-weights={ROOT / tiny.clip_weights}", "--device=cpu", f"--clip-model={tiny.clip_model}",
                     f"--image-size={tiny.image_size}", "--epochs=1", "--batch-size=4", "--workers=0",
                     "--reso-epoch=0", "--reso-eps=0.5"]
        else:
            args += [f"--clip-weights={random_weights(self.tmp / 'ViT-B-16.safetensors')}",
                     f"--workers={self.workers}"]
        step = self.run("train.py --preset=voc2007-vitb16, end to end", args, 1.0)
        report = self.tmp / "run" / "report.json"
        if report.is_file():
            rep = json.loads(report.read_text())
            self.figures["VOC2007 end to end s"] = step["seconds"]
            self.figures["VOC2007 training s"] = rep["train_seconds"]
            self.figures["VOC2007 cache and caption stages s"] = rep["total_seconds"] - rep["train_seconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, help="seconds for all steps together (default: 480 on a GPU, "
                                                     "900 for the dry run on a CPU)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder of the JSON result")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes, results in "
                                                               "a temporary folder")
    parser.add_argument("--keep", metavar="DIR", help="with --dry-run: leave its results and README copy in DIR")
    args = parser.parse_args(argv)
    import torch

    from checkpoints import git_commit

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("error: no CUDA device here; --dry-run runs the steps on the CPU at toy sizes", file=sys.stderr)
        return 2
    budget = args.budget or (480.0 if cuda else 900.0)
    with tempfile.TemporaryDirectory() as tmp:
        steps = Steps(budget, args.dry_run, cuda, Path(tmp))
        steps.tests_and_profile()
        steps.throughput()
        steps.end_to_end()
        kept = Path(args.keep) if args.dry_run and args.keep else Path(tmp)
        results = Path(args.results) if not args.dry_run else kept / "results"
        results.mkdir(parents=True, exist_ok=True)
        card = torch.cuda.get_device_name() if cuda else f"cpu-{os.cpu_count()}cores"
        result = {"card": card, "dry_run": args.dry_run, "torch": torch.__version__, "triton": _triton_version(),
                  "python": platform.python_version(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                  "sizes": steps.sizes, "figures": steps.figures, "checks": judge(steps.figures),
                  "steps": steps.done, "seconds": round(time.perf_counter() - steps.start, 1)}
        path = results / f"{''.join(c if c.isalnum() else '-' for c in card.lower()).strip('-')}.json"
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        readme = README if not args.dry_run else kept / "README.md"
        if args.dry_run:
            readme.write_text(README.read_text())
        write_readme(readme, readme_table(result))
        print(f"\n{readme_table(result)}\n\nwrote {path} and the table in {readme} "
              f"({result['seconds']:.0f} s of {budget:.0f})")
    failed = [s["step"] for s in steps.done if not s["ok"]]
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
