"""GPU acceptance: one command that checks and measures the whole CUDA path on a card.

  python bench/gpu_check.py --out DIR [--budget 360] [--dry-run]

Before it, where PyPI is reachable: `make gpu-wheels` (the wheels of bench/gpu-wheels.txt into the
git-ignored wheels/py312, which travels with the working tree to the GPU machine). The run then:
 0. installs, from wheels/py312 with no index, each listed distribution this Python lacks (the GPU
    image has no open_clip, ftfy or, maybe, pytest), and checks the machine: CUDA visible, a C
    compiler and Python.h for Triton's launcher, free /dev/shm for the loader, free disk for the
    generated data set and the caches; one line per problem;
 1. runs the steps, most important first, each under its share of --budget seconds:
    CUDA tests (the kernel tests compiled on this GPU, the CUDA-path tests); kernel profile
    (bench/profile_kernel.py --quick: the presets' 448-px shapes first); throughput at 448 and
    224 px (bench/train_throughput.py, ViT-B/16, random weights: bare encoder, read-out, cache
    build, training steps/s); the feature cache held on the GPU against streamed from disk
    (bench/cache_scale.py on VOC2007 trainval's shape, 5,011 images x 784 patches x 512, 44
    categories, int8 and bf16: an epoch's img/s each way, the streamed epoch's read rate against a
    plain read of the same files); a generated VOC2007-layout set of 5,011 trainval and 4,952 test
    images with captions; random ViT-B/16 weights; JPEG decoding on one CPU core against nvjpeg;
    `train.py --preset=voc2007-vitb16` end to end on that set.
Nothing measured is lost: a step that fails, raises or is cut at its limit is recorded with its
error and the next one runs, and after every step (the profile and throughput steps also after
every case, into their own files) DIR holds the figures so far:
  DIR/<card>.json       card, versions, commit, sizes, figures, targets met or missed, each step
  DIR/README.md         bench/README.md with the table between the gpu-check markers filled in
  DIR/gpu_check.log     everything every step printed
  DIR/profile.json, DIR/throughput-448.json, DIR/throughput-224.json, DIR/cache-scale.json
                        the steps' own rows
The exit status is the number of steps that failed. `--dry-run` runs the same steps on the CPU at
toy sizes (the shipped tiny CLIP instead of ViT-B/16): tests/test_gpu_check.py runs it in CI, so
this script cannot rot before a card runs it. BACGCN_GPU_CHECK_RAISE=<step> makes a step raise and
BACGCN_GPU_CHECK_STALL=<step> makes the profile or a throughput step stall after its first saved
case until its limit cuts it: that test proves with them that the other steps' figures survive.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

README = ROOT / "bench" / "README.md"
MARKERS = ("<!-- gpu-check:begin -->", "<!-- gpu-check:end -->")
WHEEL_LIST = ROOT / "bench" / "gpu-wheels.txt"
WHEELS = ROOT / "wheels" / "py312"
GPU_BUDGET_S = 360.0      # six minutes of a 15-minute lease: room for the machine's start and a rerun
DRY_BUDGET_S = 900.0

# The figures a card must reach (the proving of the performance design).
TARGETS = {
    "similarity_pool fwd+bwd vs eager": 3.0, "similarity_pool fwd+bwd vs torch.compile": 1.5,
    "similarity_pool forward, fraction of copy bandwidth": 0.70, "gcn_propagate fwd+bwd vs eager": 2.0,
    "cache build vs bare encoder, 224 px": 0.8, "cache build vs bare encoder, 448 px": 0.8,
    "cache build img/s, 224 px": 2500, "cache build img/s, 448 px": 600,
    "epoch read vs plain read, int8": 0.8,
}
TRAIN_SECONDS_TARGET = 60.0     # VOC2007 training from the cache, at most


# --------------------------------------------------------------------------------------------
# The wheels and the machine
# --------------------------------------------------------------------------------------------

def wheel_list(path: Path = WHEEL_LIST) -> dict[str, list[str]]:
    """bench/gpu-wheels.txt: the pinned requirements ("wheels"), and the names of its `# image:`
    and `# unused:` lines (requirement strings, a version where the image's is known)."""
    out: dict[str, list[str]] = {"wheels": [], "image": [], "unused": []}
    for line in path.read_text().splitlines():
        line = line.strip()
        for kind in ("image", "unused"):
            if line.startswith(f"# {kind}:"):
                out[kind] += line.split(":", 1)[1].split()
        if line and not line.startswith("#"):
            out["wheels"].append(line.split("#")[0].strip())
    return out


def missing_distributions(requirements: list[str]) -> list[str]:
    """The requirements whose distribution is not installed in this Python at any version (one
    that is there stays: the image's own build wins over a carried one)."""
    missing = []
    for req in requirements:
        try:
            importlib.metadata.version(req.split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
    return missing


def install_missing(site: Path) -> tuple[list[str], list[str]]:
    """pip-install the listed distributions this Python lacks from wheels/py312 (no index, no
    dependencies: the list is closed, tests/test_gpu_check.py proves it) into `site`, which goes
    on sys.path and on the steps' PYTHONPATH (the image's own environment is left as it is).
    Returns (what was installed, the problems, one line each)."""
    missing = missing_distributions(wheel_list()["wheels"])
    if not missing:
        return [], []
    print(f"installing from {WHEELS.relative_to(ROOT)}: {' '.join(missing)}", flush=True)
    if not WHEELS.is_dir():
        return [], [f"missing {', '.join(missing)} and no {WHEELS.relative_to(ROOT)} folder: run `make gpu-wheels` "
                    "where PyPI is reachable and carry wheels/py312 to this machine"]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--disable-pip-version-check", "--no-compile", "--find-links", str(WHEELS),
                           "--target", str(site), *missing], capture_output=True, text=True,
                          env=dict(os.environ, PIP_CONFIG_FILE=os.devnull))    # the carried wheels only
    if proc.returncode != 0:
        return [], [f"pip could not install {' '.join(missing)} from {WHEELS.relative_to(ROOT)}: "
                    + (proc.stderr.strip().splitlines() or ["(no message)"])[-1]]
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    return missing, []


def machine_problems(cuda: bool, dry_run: bool, scratch: Path, need_gb: float) -> list[str]:
    """What would fail a step on this machine, one line each (empty when all is well)."""
    problems = []
    if not cuda and not dry_run:
        problems.append("no CUDA device visible to torch "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                        "--dry-run runs the steps on the CPU at toy sizes")
    if cuda:
        # Triton builds a small C launcher per kernel signature with the host compiler.
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang") or shutil.which("cc")
        if not compiler:
            problems.append("no C compiler (gcc, clang, cc or $CC): Triton cannot build its kernel launchers")
        include = Path(sysconfig.get_paths()["include"]) / "Python.h"
        if not include.is_file():
            problems.append(f"no {include}: Triton's launchers include it (install the Python development headers)")
    if Path("/dev/shm").is_dir():
        shm_gb = shutil.disk_usage("/dev/shm").free / 1e9
        if shm_gb < 1.0:
            problems.append(f"/dev/shm has {shm_gb:.2f} GB free: the data loader's workers need about 1 GB "
                            "(docker: --shm-size=8g)")
    free_gb = shutil.disk_usage(scratch).free / 1e9
    if free_gb < need_gb:
        problems.append(f"{scratch} has {free_gb:.1f} GB free; the generated data set and the feature caches "
                        f"need about {need_gb:.0f} GB")
    return problems


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


def random_weights(model: str, path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    import frozen_clip

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in frozen_clip.create_clip(model).state_dict().items()}, str(path))
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
    """The worst-case figures of profile_kernel.py's rows (Triton provider, per op)."""
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


def throughput_figures(size: int, row: dict) -> dict:
    """The figures of one train_throughput.py row, as far as it got."""
    names = {"cache_build_vs_encoder": f"cache build vs bare encoder, {size} px",
             "cache_build_img_s": f"cache build img/s, {size} px",
             "encoder_forward_img_s": f"bare encoder img/s, {size} px",
             "train_steps_s": f"training steps/s, {size} px"}
    return {name: row[key] for key, name in names.items() if key in row}


def cache_scale_figures(row: dict) -> dict:
    """The figures of cache_scale.py's row, per cache format, as far as it got."""
    out: dict[str, float] = {}
    for fmt, r in row.get("formats", {}).items():
        streamed_run = r.get("streamed") or {}
        streamed = streamed_run.get("train_images_per_s")
        held = (r.get("resident") or {}).get("train_images_per_s")     # resident is null when it did not fit
        if streamed is not None:
            out[f"epoch img/s streamed, {fmt}"] = streamed
        if streamed_run.get("peak_rss_bytes") is not None:
            out[f"streamed epoch peak RSS GiB, {fmt}"] = streamed_run["peak_rss_bytes"] / 2**30
        if held is not None:
            out[f"epoch img/s held on the GPU, {fmt}"] = held
        if streamed and held:
            # From the two speeds, not the row's streamed_vs_resident_speed: held over streamed,
            # as the other "X vs Y" figures read, whichever way the row's ratio is taken.
            out[f"held vs streamed epoch speed, {fmt}"] = held / streamed
        if r.get("epoch_read_vs_plain") is not None:
            out[f"epoch read vs plain read, {fmt}"] = r["epoch_read_vs_plain"]
        if r.get("bytes_per_image") is not None:
            out[f"cache KiB per image, {fmt}"] = r["bytes_per_image"] / 2**10
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
             f"{result['date']}{' (dry run on the CPU: figures meaningless)' if result['dry_run'] else ''}", ""]
    lines += [f"Machine check: {p}" for p in result["problems"]] + ([""] if result["problems"] else [])
    lines += ["| figure | measured | target | met |", "|---|---|---|---|"]
    for name, c in result["checks"].items():
        lines.append(f"| {name} | {shown(c['measured'])} | {c['target']:g} | {'yes' if c['met'] else 'no'} |")
    lines += [f"| {name} | {shown(value)} | — | — |" for name, value in result["figures"].items()
              if name not in result["checks"]]
    lines += ["", "| step | ok | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {'yes' if s['ok'] else 'no (' + str(s['exit']) + ')'} | {s['seconds']:.0f} |"
              for s in result["steps"]]
    return "\n".join(lines)


def shown(value) -> str:
    """A figure in the table: three significant digits; a figure that is not a number (a CPU count
    the OS could not tell) as it is."""
    if value is None:
        return "—"
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def with_table(text: str, table: str) -> str:
    """bench/README.md's text with `table` between the gpu-check markers."""
    begin, end = MARKERS
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + f"\n\n## GPU acceptance (bench/gpu_check.py)\n\n{block}\n"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# --------------------------------------------------------------------------------------------
# The run: its steps against one budget, and what it writes into DIR after each
# --------------------------------------------------------------------------------------------

# (name, share of the budget), in the order they run: most important first. The in-process steps
# (no share) are bounded by their sizes; the last step gets whatever is left.
# The capped shares sum to 0.68: at the 360-s budget, ~115 s at least stay for the in-process steps
# and the last one. The cache step writes two random caches of 5,011 images (~100 img/s each on 2
# CPU cores; 16 cores not measured yet); its JSON is written after each format, int8 first.
STEPS = (("CUDA tests", 0.12), ("kernel profile", 0.22), ("throughput 448 px", 0.11), ("throughput 224 px", 0.09),
         ("cache resident vs streamed", 0.14), ("VOC2007 layout", None), ("random weights", None),
         ("JPEG decode", None), ("train.py --preset=voc2007-vitb16, end to end", 1.0))
STALLABLE = ("kernel profile", "throughput 448 px", "throughput 224 px")   # steps that save case by case


class StepFailed(Exception):
    """A step that cannot run (what it needs failed before it): recorded, not raised further."""


class Run:
    def __init__(self, out: Path, scratch: Path, budget: float, dry_run: bool, cuda: bool):
        import torch

        from checkpoints import git_commit

        self.out, self.scratch, self.budget, self.dry_run, self.cuda = out, scratch, budget, dry_run, cuda
        self.start = time.perf_counter()
        self.log_path = out / "gpu_check.log"
        self.env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BACGCN_STALL_AFTER_SAVE")}
        self.env["HF_HUB_OFFLINE"] = "1"
        self.env["PYTHONUNBUFFERED"] = "1"
        self.workers = max(1, (os.cpu_count() or 2) - 2)
        self.sizes = {"trainval": 5011, "test": 4952, "throughput_images": 2048, "batch": 256, "jpegs": 512,
                      "cache_scale": {"images": 5011, "patches": 784, "dim": 512, "classes": 44}} \
            if not dry_run else {"trainval": 8, "test": 8, "throughput_images": 8, "batch": 4, "jpegs": 8,
                                 "cache_scale": {"images": 64, "patches": 49, "dim": 64, "classes": 12}}
        card = torch.cuda.get_device_name() if cuda else f"cpu-{os.cpu_count()}cores"
        self.result = {"card": card, "dry_run": dry_run, "torch": torch.__version__, "triton": _triton_version(),
                       "python": platform.python_version(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                       "budget_s": budget, "sizes": self.sizes, "problems": [], "installed": [], "figures": {},
                       "checks": {}, "steps": [], "seconds": 0.0}
        self.raise_in = os.environ.get("BACGCN_GPU_CHECK_RAISE", "")
        self.stall_in = os.environ.get("BACGCN_GPU_CHECK_STALL", "")
        self.made: dict[str, Path] = {}     # what one step makes for a later one
        self.shares = dict(STEPS)

    # ---- the log and the files in DIR

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def save(self) -> None:
        """The figures so far into DIR: the JSON and bench/README.md's copy with the table."""
        r = self.result
        r["checks"] = judge(r["figures"])
        r["seconds"] = round(time.perf_counter() - self.start, 1)
        (self.out / f"{slug(r['card'])}.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
        (self.out / "README.md").write_text(with_table(README.read_text(), readme_table(r)))

    # ---- steps

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def step(self, name: str, work) -> None:
        """Run one step (a callable returning its figures), record it whatever happens, save."""
        self.log(f"\n=== {name} ({self.left():.0f} s of the budget left)")
        t0 = time.perf_counter()
        record = {"step": name, "ok": False, "exit": None}
        try:
            if self.raise_in == name:
                raise RuntimeError(f"BACGCN_GPU_CHECK_RAISE={name}: raised on purpose")
            ok, code, figures = work()
            self.result["figures"].update(figures)
            record.update(ok=ok, exit=code)
        except Exception as e:        # a step's failure is a figure too; the next step runs
            with open(self.log_path, "a") as f:
                traceback.print_exc(file=f)
            record.update(exit=f"{type(e).__name__}: {e}")
        record["seconds"] = round(time.perf_counter() - t0, 1)
        self.result["steps"].append(record)
        status = "ok" if record["ok"] else f"FAILED ({record['exit']})"
        self.log(f"=== {name}: {status} in {record['seconds']:.0f} s")
        self.save()

    def child(self, name: str, args: list[str]) -> tuple[bool, object]:
        """`python ARGS` in its own process group, its output appended to the log, cut at the
        step's share of the budget (or what is left of it): (ok, exit status or "timeout")."""
        limit = max(1.0, min(self.shares[name] * self.budget, self.left()))
        env = dict(self.env)
        if self.stall_in == name:
            env["BACGCN_STALL_AFTER_SAVE"] = "1"
        cmd = [sys.executable, *args]
        self.log(f"$ {' '.join(cmd)}  (limit {limit:.0f} s)")
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                # The whole group: loader workers and compile workers must not outlive the step.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = "timeout"
        return code == 0, code

    def cuda_tests(self):
        tests = ["tests/test_kernels.py", "tests/test_cuda_path.py"] if self.cuda else ["tests/test_cuda_path.py"]
        ok, code = self.child("CUDA tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", *tests])
        return ok, code, {}

    def profile(self):
        path = self.out / "profile.json"
        ok, code = self.child("kernel profile", ["bench/profile_kernel.py", "--dtype", "bf16", "--quick",
                                                 "--out", str(path)])
        return ok, code, kernel_figures(json.loads(path.read_text())) if path.is_file() else {}

    def throughput(self, size: int):
        path = self.out / f"throughput-{size}.json"
        # The dry run reads with the shipped tiny CLIP (ViT-B/16 on two CPU cores takes minutes).
        model = ["--preset=voc2007-vitb16", f"--image-size={size}"] if not self.dry_run else \
            ["--preset=synthetic-tiny", f"--image-size={size // 224 * 64}", "--photos=voc"]
        ok, code = self.child(f"throughput {size} px", ["bench/train_throughput.py", *model,
                                                        f"--images={self.sizes['throughput_images']}",
                                                        f"--batch={self.sizes['batch']}", f"--workers={self.workers}",
                                                        "--json", str(path)])
        return ok, code, throughput_figures(size, json.loads(path.read_text())) if path.is_file() else {}

    def cache_scale(self):
        path = self.out / "cache-scale.json"
        shape = self.sizes["cache_scale"]
        caches = self.scratch / "cache-scale"
        caches.mkdir(exist_ok=True)
        try:
            ok, code = self.child("cache resident vs streamed", [
                "bench/cache_scale.py", *(f"--{k}={v}" for k, v in shape.items()), "--formats", "int8", "bf16",
                "--device", "cpu" if self.dry_run else "cuda", "--dir", str(caches), "--json", str(path)])
        finally:
            # A child cut at its limit leaves the cache it was measuring (4 GB in bf16 at VOC's
            # shape): disk the end-to-end step's caches need.
            shutil.rmtree(caches, ignore_errors=True)
        return ok, code, cache_scale_figures(json.loads(path.read_text())) if path.is_file() else {}

    def layout(self):
        devkit, captions = voc_layout(self.scratch / "voc", self.sizes["trainval"], self.sizes["test"],
                                      os.cpu_count() or 1)
        self.made.update(devkit=devkit, captions=captions)
        return True, 0, {}

    def weights(self):
        import config

        tiny, _ = config.parse_overrides(["--preset=synthetic-tiny"])
        model = tiny.clip_model if self.dry_run else "ViT-B-16-quickgelu"
        self.made["weights"] = random_weights(model, self.scratch / f"{model}.safetensors")
        return True, 0, {}

    def decode(self):
        if "devkit" not in self.made:
            raise StepFailed("no generated data set (the VOC2007 layout step failed)")
        rates = decode_rates(self.made["devkit"] / "VOC2007" / "JPEGImages", self.sizes["jpegs"], self.cuda)
        return True, 0, {f"JPEG decode: {k}": v for k, v in rates.items()}

    def end_to_end(self):
        import config

        name = STEPS[-1][0]
        needs = [k for k in ("devkit", "captions", "weights") if k not in self.made]
        if needs:
            raise StepFailed(f"missing {', '.join(needs)} (an earlier step failed)")
        run = self.scratch / "run"
        args = ["train.py", "--preset=voc2007-vitb16", f"--data-root={self.made['devkit']}",
                f"--captions={self.made['captions']}", f"--cache-dir={self.scratch / 'cache'}", f"--out={run}",
                f"--clip-weights={self.made['weights']}"]
        if self.dry_run:
            tiny, _ = config.parse_overrides(["--preset=synthetic-tiny"])
            args += ["--device=cpu", f"--clip-model={tiny.clip_model}", f"--image-size={tiny.image_size}",
                     "--epochs=1", "--batch-size=4", "--workers=0", "--reso-epoch=0", "--reso-eps=0.5"]
        else:
            args += [f"--workers={self.workers}"]
        t0 = time.perf_counter()
        ok, code = self.child(name, args)
        seconds = time.perf_counter() - t0
        report = run / "report.json"
        if not report.is_file():
            return ok, code, {}
        rep = json.loads(report.read_text())
        return ok, code, {"VOC2007 end to end s": round(seconds, 1), "VOC2007 training s": rep["train_seconds"],
                          "VOC2007 cache and caption stages s": rep["total_seconds"] - rep["train_seconds"]}

    def all_steps(self) -> None:
        work = {"CUDA tests": self.cuda_tests, "kernel profile": self.profile,
                "throughput 448 px": lambda: self.throughput(448), "throughput 224 px": lambda: self.throughput(224),
                "cache resident vs streamed": self.cache_scale, "VOC2007 layout": self.layout,
                "random weights": self.weights, "JPEG decode": self.decode,
                STEPS[-1][0]: self.end_to_end}
        for name, _ in STEPS:
            self.step(name, work[name])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder of everything the run writes (JSON, README copy with the table, log, the steps' "
                             "rows): a new or empty one (created if absent)")
    parser.add_argument("--budget", type=float, help=f"seconds for all steps together (default {GPU_BUDGET_S:.0f} "
                                                     f"on a GPU, {DRY_BUDGET_S:.0f} for the dry run on a CPU)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    parser.add_argument("--scratch", metavar="DIR", help="folder for the generated data set, caches and installed "
                                                         "wheels (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    names = [n for n, _ in STEPS]
    for var, allowed in (("BACGCN_GPU_CHECK_RAISE", names), ("BACGCN_GPU_CHECK_STALL", STALLABLE)):
        if os.environ.get(var, "") not in ("", *allowed):
            print(f"error: {var}={os.environ[var]!r} names none of: {', '.join(allowed)}", file=sys.stderr)
            return 2
    import cli
    import data  # numpy only: nothing the wheels install

    try:    # a user's README.md or log there would be overwritten: a folder of its own, before any step
        data.check_writable(args.out, "--out", folder=True)
        cli.check_own_folder(args.out, "bench/gpu_check.py", lambda name: False,
                              "it writes into a new or empty folder: choose another --out")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_text("")
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        scratch = Path(tmp)
        installed, problems = install_missing(scratch / "site")
        import torch

        cuda = torch.cuda.is_available()
        budget = args.budget or (GPU_BUDGET_S if cuda else DRY_BUDGET_S)
        run = Run(out, scratch, budget, args.dry_run, cuda)
        # 10k JPEGs, the end-to-end caches (10k images x 784 x 512), cache_scale.py's int8 and bf16 caches
        need_gb = 14.0 if not args.dry_run else 0.5
        run.result["installed"] = installed
        run.result["problems"] = problems + machine_problems(cuda, args.dry_run, scratch, need_gb)
        run.log(f"bench/gpu_check.py: {run.result['card']}, torch {run.result['torch']}, triton "
                f"{run.result['triton']}, budget {budget:.0f} s{', dry run' if args.dry_run else ''}; out {out}")
        for p in run.result["problems"]:
            run.log(f"machine check: {p}")
        run.save()
        if not cuda and not args.dry_run:
            for name in names:
                run.result["steps"].append({"step": name, "ok": False, "exit": "not run: no CUDA device",
                                            "seconds": 0.0})
            run.save()
        else:
            run.all_steps()
        table = readme_table(run.result)
    failed = [s["step"] for s in run.result["steps"] if not s["ok"]]
    run.log(f"\n{table}\n\nwrote {out}: {slug(run.result['card'])}.json, README.md, gpu_check.log "
            f"({run.result['seconds']:.0f} s of {budget:.0f})")
    if failed:
        run.log(f"failed steps: {', '.join(failed)}")
    return min(len(failed), 100)


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
