"""A run's bookkeeping, out of the training loop's way: the run folder (one run in it, its
files), the run state an exact resume restores (weights, optimiser, schedule, every random
state, the ReSO crops), metrics.jsonl, and how a stopped run says what it kept.
"""
from __future__ import annotations

import json
import os
import random
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import checkpoints
import cli
import config
import data
import tracking
from reso import ResoCrops


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops, the last epoch's state is kept."""


@dataclass
class Loop:
    """Where training stands: what an exact resume restores (with the model's weights)."""
    opt: torch.optim.Optimizer
    base_lr: list[float]
    gen: torch.Generator             # the batch order
    warmup: int
    total: int
    epoch: int = 0                   # the next epoch to run
    step: int = 0
    crops: ResoCrops | None = None


STATE_FILE = "state.safetensors"
STATE_FORMAT = "bacgcn-state-1"


def save_state(path: Path, model, loop: Loop, cfg, preset: str) -> None:
    """Everything an exact resume needs, atomically: weights, optimiser moments and steps, the
    schedule position, every random state, the ReSO crops (by their regions; their features
    are in the cache). Tensors in safetensors and the rest as JSON: nothing is pickled."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = loop.opt.state_dict()
    for index, moments in opt["state"].items():
        tensors.update({f"opt.{index}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in moments.items()})
    numpy_rng = np.random.get_state()
    tensors.update({"rng.torch": torch.get_rng_state(), "rng.batches": loop.gen.get_state(),
                    "rng.numpy": torch.from_numpy(numpy_rng[1].astype(np.int64))})
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"format": STATE_FORMAT, "config": cfg.to_json(), "preset": preset, "epoch": str(loop.epoch),
            "step": str(loop.step), "total": str(loop.total),
            "param_groups": json.dumps(opt["param_groups"]), "numpy_rng": json.dumps(list(numpy_rng[2:])),
            "python_rng": json.dumps(random.getstate()),
            "reso_found": json.dumps(None if loop.crops is None else loop.crops.found)}
    data.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=checkpoints.with_digest(tensors, meta)))


def read_state(run_dir: str | Path) -> dict:
    """The state a run folder holds: {"config", "tensors", "meta", "path"}; one-line errors
    otherwise, naming the file: unreadable, changed since it was written (its digest), NaN."""
    from safetensors import SafetensorError, safe_open

    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise data.DataError(run_dir, f"no {STATE_FILE} here: not a run folder, or its first epoch never ended")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError("not a train.py run state")
    except (SafetensorError, OSError, ValueError) as e:
        raise data.DataError(path, f"unreadable run state ({e})") from None
    checkpoints.check_digest(path, tensors, meta)
    try:
        cfg = config.BACGCNConfig.from_json(meta["config"])
        config.validate(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise data.DataError(path, f"unreadable run state ({e})") from None
    checkpoints.check_finite(path, tensors)
    return {"config": cfg, "tensors": tensors, "meta": meta, "path": path}


def restore_state(state: dict, model, loop: Loop) -> list | None:
    """Put a saved state back into the model and the loop; returns the ReSO regions, if any.
    Tensors that do not fit the model its config builds are one line with both shapes."""
    tensors, meta, path = state["tensors"], state["meta"], state["path"]
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    checkpoints.check_fits(path, weights, model.state_dict(), "model.")
    model.load_state_dict(weights, strict=True)
    params = [p for g in loop.opt.param_groups for p in g["params"]]
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            if name != "step" and (int(index) >= len(params) or value.shape != params[int(index)].shape):
                shape = checkpoints.shape_text(params[int(index)]) if int(index) < len(params) else "no parameter"
                raise data.DataError(path, f"tensor {key} has shape {checkpoints.shape_text(value)}, the recorded "
                                           f"config gives {shape}")
            moments.setdefault(int(index), {})[name] = value
    loop.opt.load_state_dict({"state": moments, "param_groups": json.loads(meta["param_groups"])})
    loop.gen.set_state(tensors["rng.batches"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    pos, has_gauss, cached = json.loads(meta["numpy_rng"])
    np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(meta["python_rng"])
    random.setstate((version, tuple(internal), gauss))
    loop.epoch, loop.step, loop.total = int(meta["epoch"]), int(meta["step"]), int(meta["total"])
    found = json.loads(meta["reso_found"])
    return [(f[0], f[1], tuple(f[2]), *f[3:]) for f in found] if found else None


class MetricsLog:
    """metrics.jsonl, one JSON record a line, each record's numbers also sent to the tracker
    at `step` (the training step for losses, the epoch for per-epoch figures)."""

    def __init__(self, file, tracker: tracking.Tracker | None = None):
        self.file, self.tracker = file, tracker or tracking.Tracker()

    def record(self, values: dict, step: int | None) -> None:
        self.file.write(json.dumps(data.json_safe(values), allow_nan=False) + "\n")   # strict JSON: NaN is null
        self.file.flush()
        if step is not None:
            self.tracker.log_metrics({k: v for k, v in values.items() if k not in ("step", "epoch")}, step)


LOCK_FILE = ".run.lock"
RUN_FILES = ("ckpt.safetensors", "metrics.jsonl", "report.json", STATE_FILE, tracking.RUN_ID_FILE, LOCK_FILE)


class RunStopped(RuntimeError):
    """The run stopped early (interrupted, or a non-finite loss): one line and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def lock_run_folder(out_dir: Path) -> int | None:
    """Hold the run folder for this process (an open descriptor for release_run_folder): a
    second train.py into the same folder is one line, not two runs that overwrite each other's
    checkpoint. An flock: the kernel lets go of it when the process ends, killed or not, so a
    dead run never leaves the folder locked (only its lock file, which is not a lock)."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    while True:
        try:        # never through a link: a run folder from elsewhere could point its lock file at any file
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise data.DataError(path, f"cannot be the run's lock file ({e.strerror}); remove it") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise data.DataError(path, "cannot be the run's lock file (not a regular file); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise data.DataError(out_dir, f"another train.py (pid {holder}) is running in this run folder; "
                                          "wait for it to end, or choose another --out") from None
        except OSError as e:       # a file system without locks (some NFS mounts): say so, and go on
            os.close(fd)
            print(f"warning: {data.shown_path(path)}: cannot be locked ({e.strerror}): a second run started "
                  "into this folder would not be stopped", file=sys.stderr)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)      # locked a file its holder removed as it ended: lock the one at the path now
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_run_folder(out_dir: Path, lock: int | None) -> None:
    """The lock file goes (removed while still held, so no other run can be holding it), then the lock."""
    if lock is not None:
        (out_dir / LOCK_FILE).unlink(missing_ok=True)
        os.close(lock)


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> int | None:
    """A run folder holds one run, and one process writes it (lock_run_folder, whose
    descriptor this returns): reusing one that is not empty takes --resume (continue it) or
    --overwrite (its earlier outputs are removed first, so no file mixes two runs)."""
    lock = lock_run_folder(out_dir)
    if resume:
        return lock
    if any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        try:
            if not overwrite:
                raise data.DataError(out_dir, "run folder is not empty: --resume continues the run there, "
                                              "--overwrite replaces it")
            # Decided from all it holds before anything goes: a user's file beside a run's stops it whole.
            cli.check_own_folder(out_dir, "train.py", is_run_file,
                                  "--overwrite replaces only a run folder's own files: choose another --out")
        except data.DataError:
            release_run_folder(out_dir, lock)
            raise
        for path in out_dir.iterdir():
            if path.name != LOCK_FILE:                 # this run's own, held
                path.unlink()
    return lock


def is_run_file(name: str) -> bool:
    """A name train.py writes in a run folder: its files, or the temp file of one a killed run left."""
    return name in RUN_FILES or data.temp_file_of(name) in RUN_FILES


def stopped_note(out_dir: Path) -> str:
    if (out_dir / STATE_FILE).is_file():
        epoch = read_state(out_dir)["meta"]["epoch"]
        return f"the state after epoch {epoch} is kept: python train.py --resume {data.shown_path(out_dir)}"
    return "no epoch had ended, so there is nothing to resume"


