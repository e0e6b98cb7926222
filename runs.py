"""A run's bookkeeping, out of the training loop's way: the run folder (one run in it, its
files), the run state an exact resume restores (weights, optimiser, schedule, every random
state, the ReSO crops), metrics.jsonl, and how a stopped run says what it kept.
"""
from __future__ import annotations

import json
import math
import os
import random
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import cache
import checkpoints
import cli
import config
import data
import frozen_clip
import pipeline
import registry
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
    check_state_meaning(path, cfg, tensors, meta)
    return {"config": cfg, "tensors": tensors, "meta": meta, "path": path}


def _state_field(path: Path, meta: dict, key: str, parse):
    """A run state's metadata field as `parse` reads it (a one-line error naming it otherwise)."""
    if key not in meta:
        raise data.DataError(path, f"run state lacks the field {key}")
    try:
        return parse(meta[key])
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as e:
        raise data.DataError(path, f"run state field {key} is not what train.py writes ({str(e)[:120]})") from None


def _integer(text: str) -> int:
    if not text.lstrip("-").isdigit():
        raise ValueError(f"{text[:40]!r} is not an integer")
    return int(text)


def _python_rng(text: str) -> tuple:
    version, internal, gauss = json.loads(text)
    state = (version, tuple(internal), gauss)
    random.Random().setstate(state)           # what random.setstate would refuse, on a scratch generator
    return state


def _numpy_rng(keys: torch.Tensor):
    def parse(text: str) -> tuple:
        pos, has_gauss, cached = json.loads(text)
        state = ("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached)
        np.random.RandomState().set_state(state)
        return state
    return parse


def _reso_found(text: str) -> list | None:
    found = json.loads(text)
    if found is None:
        return None
    if not isinstance(found, list) or not all(
            isinstance(f, list) and len(f) in (3, 4) and all(type(v) is int and v >= 0 for v in f[:2])
            and isinstance(f[2], list) and len(f[2]) == 4 and all(type(v) is int for v in f[2]) for f in found):
        raise ValueError("expected null or a list of [image row, class, patch box[, probability]]")
    return found


def check_state_meaning(path: Path, cfg, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """What a digest cannot vouch for (a crafted state comes with a digest that fits): every
    field and random state is what train.py writes, and the schedule's position lies inside
    the recorded config's (epoch 99 of 8 would "finish" a run after one epoch; a total of 0
    divides by zero). One line naming the file and the field."""
    epoch, step, total = (_state_field(path, meta, key, _integer) for key in ("epoch", "step", "total"))
    if not 0 <= epoch <= cfg.epochs:
        raise data.DataError(path, f"run state field epoch is {epoch}, outside 0 to {cfg.epochs}, the epochs of "
                                   "its recorded config")
    if total < 1 or not 0 <= step <= total:
        raise data.DataError(path, f"run state fields step {step} and total {total} are no position in a schedule "
                                   "(0 <= step <= total, total >= 1)")
    for key, like in (("rng.torch", torch.get_rng_state()), ("rng.batches", torch.Generator().get_state()),
                      ("rng.numpy", torch.zeros(624, dtype=torch.int64))):
        got = tensors.get(key)
        if got is None or got.dtype != like.dtype or got.shape != like.shape:
            raise data.DataError(path, f"run state tensor {key} is " + ("missing" if got is None else
                                       f"{got.dtype} {checkpoints.shape_text(got)}")
                                       + f", train.py writes {like.dtype} {checkpoints.shape_text(like)}")
    _state_field(path, meta, "python_rng", _python_rng)
    _state_field(path, meta, "numpy_rng", _numpy_rng(tensors["rng.numpy"]))
    _state_field(path, meta, "reso_found", _reso_found)
    groups = _state_field(path, meta, "param_groups", json.loads)
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise data.DataError(path, "run state field param_groups is not what train.py writes (a list of "
                                   "parameter groups)")
    unknown = [k for k in tensors if not (k.startswith(("model.", "rng.")) or k.split(".")[0] == "opt"
                                          and len(k.split(".", 2)) == 3 and k.split(".")[1].isdigit())]
    if unknown:
        raise data.DataError(path, f"run state holds an unexpected tensor {unknown[0]}")


def restore_state(state: dict, model, loop: Loop, num_images: int, num_categories: int) -> list | None:
    """Put a saved state back into the model and the loop; returns the ReSO regions, if any.
    Tensors that do not fit the model its config builds are one line with both shapes; a
    schedule position or a region that does not fit these `num_images` training images is one
    line naming the field."""
    tensors, meta, path, cfg = state["tensors"], state["meta"], state["path"], state["config"]
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    checkpoints.check_fits(path, weights, model.state_dict(), "model.")
    check_schedule(path, cfg, meta, num_images)
    found = json.loads(meta["reso_found"])
    bad = next((f for f in found or [] if f[0] >= num_images or f[1] >= num_categories), None)
    if bad is not None:
        raise data.DataError(path, f"run state field reso_found names image row {bad[0]}, class {bad[1]}: there are "
                                   f"{num_images} training images and {num_categories} categories")
    model.load_state_dict(weights, strict=True)
    params = [p for g in loop.opt.param_groups for p in g["params"]]
    groups = json.loads(meta["param_groups"])
    own_groups = loop.opt.state_dict()["param_groups"]
    if [g["params"] for g in groups] != [g["params"] for g in own_groups]:
        raise data.DataError(path, "run state field param_groups does not fit the optimiser its recorded config "
                                   "builds")
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)       # opt.<parameter>.<moment> (check_state_meaning)
            if int(index) >= len(params):
                raise data.DataError(path, f"tensor {key} has no parameter {index} in the recorded config")
            param = params[int(index)]
            like = torch.zeros((), dtype=torch.float32) if name == "step" else param
            if value.shape != like.shape:
                raise data.DataError(path, f"tensor {key} has shape {checkpoints.shape_text(value)}, the recorded "
                                           f"config gives {checkpoints.shape_text(like)}")
            if value.dtype != like.dtype:
                raise data.DataError(path, f"tensor {key} is {value.dtype}, the recorded config gives {like.dtype}")
            moments.setdefault(int(index), {})[name] = value
    loop.opt.load_state_dict({"state": moments, "param_groups": groups})
    loop.gen.set_state(tensors["rng.batches"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    np.random.set_state(_numpy_rng(tensors["rng.numpy"])(meta["numpy_rng"]))
    random.setstate(_python_rng(meta["python_rng"]))
    loop.epoch, loop.step, loop.total = int(meta["epoch"]), int(meta["step"]), int(meta["total"])
    return [(f[0], f[1], tuple(f[2]), *f[3:]) for f in found] if found else None


def check_schedule(path: Path, cfg, meta: dict, num_images: int) -> None:
    """Every epoch takes its image batches, and ReSO's crop batches only add to them: a step or
    total that these training images cannot give is a state from elsewhere (or crafted)."""
    epoch, step, total = int(meta["epoch"]), int(meta["step"]), int(meta["total"])
    per_epoch = math.ceil(num_images / cfg.batch_size)
    with_crops = bool(json.loads(meta["reso_found"]))
    if step < epoch * per_epoch or (not with_crops and step != epoch * per_epoch):
        raise data.DataError(path, f"run state field step is {step}: {epoch} epochs of {num_images} training images "
                                   f"in batches of {cfg.batch_size} take {epoch * per_epoch}"
                                   + (" or more" if with_crops else ""))
    if total < cfg.epochs * per_epoch or (not with_crops and total != cfg.epochs * per_epoch):
        raise data.DataError(path, f"run state field total is {total}: {cfg.epochs} epochs of {num_images} training "
                                   f"images in batches of {cfg.batch_size} take {cfg.epochs * per_epoch}"
                                   + (" or more" if with_crops else ""))


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
CONFIG_FILE = "config.json"     # the resolved config, every field: `train.py --config` starts a run from it
LOG_FILE = "train.log"          # what the console showed, without progress-bar redraws
TAGS_FILE = "tags.csv"          # a photo folder's tags
RUN_FILES = ("ckpt.safetensors", "metrics.jsonl", "report.json", STATE_FILE, tracking.RUN_ID_FILE, LOCK_FILE,
             CONFIG_FILE, LOG_FILE, TAGS_FILE)


def write_config(out_dir: Path, cfg: config.BACGCNConfig, preset: str) -> None:
    """config.json: every field of the resolved config, and the preset it came from."""
    import dataclasses

    data.write_json(out_dir / CONFIG_FILE, {"preset": preset, **dataclasses.asdict(cfg)})


def read_config(path: str | os.PathLike) -> tuple[config.BACGCNConfig, str]:
    """(config, preset) of a run's config.json, to start a new run from: its run folder (`out`)
    is not taken over. Any field that is not what the config holds is one line naming it."""
    raw = data.read_json(path, "run config")
    if not isinstance(raw, dict):
        raise data.DataError(path, f"not a run's config.json (a JSON {type(raw).__name__}, not an object)")
    known = {f for f in config.BACGCNConfig.__dataclass_fields__}
    unknown = [k for k in raw if k not in known and k != "preset"]
    if unknown:
        raise data.DataError(path, f"not a run's config.json: {unknown[0]!r} is no option of train.py")
    preset = raw.get("preset", "")
    if not isinstance(preset, str) or (preset and preset not in config.PRESETS):
        raise data.DataError(path, f"names no preset of train.py ({preset!r})")
    try:
        cfg = config.BACGCNConfig.from_json(json.dumps({k: v for k, v in raw.items() if k != "preset"}))
        config.validate(cfg)
    except (ValueError, TypeError) as e:
        raise data.DataError(path, str(e)) from None
    return cfg.replace(out=""), preset


class ConsoleTee:
    """A console stream that also appends what it shows to a run's train.log: whole lines only,
    each stamped with the time, and no progress bar (a line a carriage return redraws)."""

    def __init__(self, stream, log):
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if "\r" not in line:
                import time

                self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):              # isatty, fileno, encoding...: the console's own
        return getattr(self.stream, name)


class console_logged:
    """`with console_logged(out_dir):` stdout and stderr also go to out_dir/train.log."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path, self.enabled = out_dir / LOG_FILE, enabled

    def __enter__(self):
        if self.enabled:
            try:                # never through a link planted in the run folder
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise data.DataError(self.path, f"cannot be written ({e.strerror})") from None
            self.log = os.fdopen(fd, "a", encoding="utf-8")
            self.saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = ConsoleTee(sys.stdout, self.log), ConsoleTee(sys.stderr, self.log)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            sys.stdout, sys.stderr = self.saved
            self.log.close()
        return False


class RunStopped(RuntimeError):
    """The run stopped early (interrupted, or a non-finite loss): one line and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# The descriptors of the run-folder locks this process holds. An flock belongs to the open file,
# which fork() shares: a forked child (a loader worker) would hold the lock with its parent and,
# orphaned by a SIGKILL, for seconds after it, so a requeued run found the folder held by the dead.
# Each forked child closes its copies at once: the lock lives exactly as long as its taker.
HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in HELD_LOCKS:
        os.close(fd)
    HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


ORPHAN_WAIT_S = 10.0    # a loader worker notices its parent's death within 5 s (torch's status check)


def process_alive(pid: str) -> bool:
    """Whether the process `pid` (as a lock file holds it) runs: it exists and is no zombie (a
    killed process its parent has not reaped yet)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # another user's
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):     # no /proc: it exists
        return True


def lock_run_folder(out_dir: Path) -> int | None:
    """Hold the run folder for this process (an open descriptor for release_run_folder): a
    second train.py into the same folder is one line, not two runs that overwrite each other's
    checkpoint. An flock, which no forked child keeps (HELD_LOCKS): the kernel lets go of it when
    the process ends, killed or not, so a dead run never leaves the folder locked (only its lock
    file, which is not a lock)."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    waited_since = time.monotonic()
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
            if process_alive(holder):
                raise data.DataError(out_dir, f"another train.py (pid {holder}) is running in this run folder; "
                                              "wait for it to end, or choose another --out") from None
            # Its taker is gone (or has not written its pid yet): what holds it is on its way out.
            if time.monotonic() - waited_since > ORPHAN_WAIT_S:
                raise data.DataError(out_dir, f"the run folder is still locked after its train.py (pid {holder}) "
                                              "ended, by processes it started; end them, or choose another "
                                              "--out") from None
            time.sleep(0.1)
            continue
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
    HELD_LOCKS.add(fd)
    return fd


def release_run_folder(out_dir: Path, lock: int | None) -> None:
    """The lock file goes (removed while still held, so no other run can be holding it), then the lock."""
    if lock is not None:
        (out_dir / LOCK_FILE).unlink(missing_ok=True)
        HELD_LOCKS.discard(lock)
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
            if not overwrite and not never_trained(out_dir):
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


# What a run writes before its first epoch ends: a folder holding nothing else holds no run to keep
# (it failed or was stopped at its start), and the same command may start there again.
STARTED_FILES = (CONFIG_FILE, LOG_FILE, LOCK_FILE)


def never_trained(out_dir: Path) -> bool:
    return all(p.name in STARTED_FILES for p in out_dir.iterdir())


def is_run_file(name: str) -> bool:
    """A name train.py writes in a run folder: its files, or the temp file of one a killed run left."""
    return name in RUN_FILES or data.temp_file_of(name) in RUN_FILES


def stopped_note(out_dir: Path) -> str:
    if (out_dir / STATE_FILE).is_file():
        epoch = read_state(out_dir)["meta"]["epoch"]
        return f"the state after epoch {epoch} is kept: python train.py --resume {data.shown_path(out_dir)}"
    return "no epoch had ended, so there is nothing to resume"


# --------------------------------------------------------------------------------------------
# The run's own options and its first lines
# --------------------------------------------------------------------------------------------

@dataclass
class RunOptions:
    """The run's own options: not config fields (they are about the run folder and its inputs,
    not the method), so they are never recorded in a config."""
    resume: str | None = None   # --resume DIR: continue a stopped run exactly, with its recorded config
    overwrite: bool = False     # --overwrite: the run folder's earlier run is replaced (only files train.py writes)
    download: bool = False      # --download: fetch what the dataset lacks from its official sources first
    config: str | None = None   # --config FILE: start from a run's config.json (options after it override it)


RUN_OPTIONS = tuple(RunOptions.__dataclass_fields__)
# What a bench that trains says of the options it passes on (tests/test_docs.py checks them against this --help).
PASSED_ON = "Every other --key=value is a train.py option (python train.py --help), given to every run."
RUN_OPTIONS_HELP = """run options (not config fields):
  --resume DIR                 continue a stopped run exactly, with its recorded config
  --overwrite                  replace the run folder's earlier run (only the files train.py writes)
  --download                   fetch what the dataset lacks from its official sources first, checked
  --config FILE                start from a run's config.json (runs/X/config.json); options after it override it"""


def split_run_options(args: Sequence[str]) -> tuple[RunOptions, list[tuple[str, str]]]:
    """(the run options, the config's (key, value) pairs), read like every option."""
    pairs = cli.split_options(args)
    given = {k: cli.last_value(pairs, k) for k in RUN_OPTIONS}
    rest = [(k, v) for k, v in pairs if k not in RUN_OPTIONS]
    for name, what in (("resume", "the run folder to continue"), ("config", "a run's config.json")):
        if given[name] == "true":              # a bare --resume / --config
            raise ValueError(f"--{name} needs {what}")
    options = RunOptions(resume=given["resume"], config=given["config"],
                         **{k: given[k] is not None and cli.parse_bool(given[k]) for k in ("overwrite", "download")})
    if options.resume is not None and (rest or options.overwrite or options.config):
        extra = (f"--{rest[0][0].replace('_', '-')}={rest[0][1]}" if rest else
                 "--overwrite" if options.overwrite else f"--config={options.config}")
        raise ValueError(f"--resume continues the run with its recorded config: drop {extra}")
    return options, rest


def start_block(cfg, preset: str, device: str, train_ds, test_ds) -> None:
    """The run in one block before its first long stage: what runs on what, read from where,
    and where its outputs go."""
    splits = f"{cfg.train_split} {len(train_ds):,} images" + (
        "" if cfg.test_split == cfg.train_split else f", tested on {cfg.test_split} {len(test_ds):,} images")
    weights = cfg.clip_weights
    if frozen_clip.is_named(weights):
        weights += f" ({pipeline.clip_weights_file(cfg)})"
    readers = data.reader_count(cfg.workers)
    lines = [f"preset    {preset or '(none)'}: {cfg.dataset}, trained on {splits}",
             f"device    {pipeline.describe_device(device, cfg)}",
             f"readers   {readers} image-reading process{'es' if readers != 1 else ''}"
             + (f" ({cfg.workers} asked; the cores this process may use)" if readers < cfg.workers else ""),
             f"captions  {cfg.captions}",
             f"weights   {weights} ({cfg.clip_model}{f' at {cfg.image_size} px' if cfg.image_size else ''})",
             f"run       {cfg.out}",
             f"cache     {cfg.cache_dir} ({cli.size_words(cache.folder_bytes(cfg.cache_dir))} on disk)",
             f"outputs   under {config.output_root(cfg)} (--output-root or ${config.OUTPUT_ROOT_ENV} moves them)"]
    lines += filter(None, (registry.unused_annotation_words(d.name, d.unused_annotations) for d in (train_ds, test_ds)))
    pipeline.log("\n".join(lines))


def no_labels(name: str, entry: registry.Dataset) -> dict:
    """A test split without labels trains all the same: said, and no mAP."""
    pipeline.log(f"{name}: no labels, so no mAP (--labels=CSV evaluates)" if entry.own_photos else
        f"WARNING: {name} has no positive label: nothing to evaluate")
    return {}


def print_table(report: dict) -> None:
    if report["mAP"] is None:          # a folder of photos without labels: its tags are the result
        return
    cols = [k for k in ("mAP", "mAP_small", "mAP_large") if k in report]
    print("\n" + f"{'':<16}" + "".join(f"{c:>11}" for c in cols))
    for name, row in (("CLIP zero-shot", report["zeroshot"]), ("BAC-GCN", report)):
        print(f"{name:<16}" + "".join(f"{row[c]:>11.2f}" if row.get(c) is not None else f"{'n/a':>11}" for c in cols))
