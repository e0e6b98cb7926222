"""What the commands share: where a run's data, captions and weights are (read from the dataset
registry), the caption stage (pseudo labels and graph), the frozen backbone and cached features,
prediction and split evaluation, the learning-rate schedule, the distributed helpers, and the
Python API of a trained model (`load_trained`).

train.py and eval.py both build on this module and never import each other, so each stays a
thin command line over one set of functions (a change to, say, the dtype rule cannot leave the
evaluation disagreeing with the training).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import bacgcn
import captions
import checkpoints
import config
import data
import frozen_clip
import metrics
import registry
from cache import CachedFeatures, FeatureCache, as_stored, decode, encode_images, file_digest, stream

ROOT = Path(__file__).resolve().parent
PREDICT_BATCH = 256          # images per forward when scoring a split (no gradients: memory is small) ...
PREDICT_BYTES = 64 * 2**20   # ... but at most this many bytes of cached features (ViT-B/16 at 448: 80 images)
CACHE_BATCH = 64             # images per encoder forward while caching features
# Names the text encoder should read instead of a dataset's run-together spelling.
PROMPT_SPELLING = {"tvmonitor": "tv monitor", "diningtable": "dining table", "pottedplant": "potted plant",
                   "tv": "television"}
MAX_MISSING_SHARE = 0.05   # above this share of images without captions or unreadable, warn loudly


def log(msg: str) -> None:
    """Progress lines, printed once per job (by rank 0 in a distributed one)."""
    if is_main_process():
        print(msg, flush=True)


def resolve_device(requested: str) -> str:
    """'' means CUDA when there is one, else the CPU. A CUDA device that is not there is a
    one-line ValueError (config.validate has checked the spelling)."""
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device={requested}: CUDA cannot be used here ({cuda_problem()})")
        index, count = int(requested.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"--device={requested}: there {'is' if count == 1 else 'are'} {count} CUDA "
                             f"device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    return requested


def cuda_problem() -> str:
    """Why CUDA cannot be used here, in a few words (the driver's own reason where it gives one)."""
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "no GPU is visible (CUDA_VISIBLE_DEVICES is empty)"
    try:
        torch.cuda.init()                  # raises with the reason: no driver, a driver too old for this build
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".")[:200]    # the first sentence
        return f"torch {torch.__version__} is built for CUDA {torch.version.cuda}: {reason}"
    if not torch.cuda.device_count():
        return "no CUDA device is visible"
    return "CUDA is not available"


def check_device_for_preset(requested: str, preset: str) -> None:
    """A preset made for a GPU runs on the CPU only when asked for by name (--device=cpu)."""
    device = resolve_device(requested)          # a CUDA device asked for and not there: refused here
    if preset in config.GPU_PRESETS and not requested and device == "cpu":
        raise ValueError(f"--preset={preset} is made for a GPU and CUDA cannot be used here ({cuda_problem()}): on "
                         "the CPU it takes hours; pass --device=cpu to run it there anyway")


def describe_device(device: str, cfg: config.BACGCNConfig) -> str:
    """The device in words, with the dtype and compile mode: `cuda:0 (NVIDIA H100 80GB HBM3,
    79.1 GiB), bf16 autocast, compile on` or `CPU, 2 threads, fp32, compile off (CUDA ...)`."""
    dtype = "bf16 autocast" if compute_dtype(device, cfg.amp) == torch.bfloat16 else "fp32"
    compiled = "compile on" if cfg.compile and device.startswith("cuda") else "compile off"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB), {dtype}, {compiled}"
    why = "" if torch.version.cuda is None else f" (CUDA cannot be used: {cuda_problem()})"
    return f"CPU, {torch.get_num_threads()} threads, {dtype}, {compiled}{why}"


def compute_dtype(device: str, amp: bool) -> torch.dtype:
    """bf16 on CUDA with amp; fp32 on the CPU, where bf16 autocast is several times slower."""
    return torch.bfloat16 if device.startswith("cuda") and amp else torch.float32


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor of 0-based `step`: linear warmup over `warmup` steps, then a cosine
    from 1 to 0 at `total` (held at 0 past it)."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


# --------------------------------------------------------------------------------------------
# Distributed runs (torchrun): every process runs the same code on its share
# --------------------------------------------------------------------------------------------

def rank_and_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside a distributed job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def launched_as_main_process() -> bool:
    """Whether torchrun started this process as rank 0 (or no torchrun at all): known from the
    environment before any process group is made."""
    return os.environ.get("RANK", "0").strip() in ("0", "")


LAUNCHER_WAIT_S = 60   # how long a rank other than 0 waits to be ended after an option error


def leave_after_rank_0() -> int:
    """Exit status 2 for a rank other than 0 after an option error, once torchrun ends it: rank 0
    says why, and a rank leaving first had torchrun end rank 0 before it printed (seen under
    load). Ended by torchrun's SIGTERM without a word; after LAUNCHER_WAIT_S on its own."""
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(LAUNCHER_WAIT_S)
    return 2


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def init_distributed(requested_device: str) -> str:
    """Join the torchrun job when launched by torchrun (NCCL on CUDA, gloo on the CPU) and
    return this process's device; a plain `python train.py` stays a single process."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(requested_device)
    if world == 1 or torch.distributed.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"torchrun: local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                             f"CUDA device(s)); start at most that many processes per node, or pass --device=cpu")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def share(num: int, granule: int = 1) -> range:
    """This process's contiguous share of `num` items, cut at multiples of `granule` so that
    shares concatenated in rank order are the single-process order, batch for batch."""
    rank, world = rank_and_world()
    per = math.ceil(math.ceil(num / world) / granule) * granule
    return range(min(num, rank * per), min(num, (rank + 1) * per))


def broadcast_object(obj):
    """Rank 0's `obj` on every process."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the processes (itself outside a distributed job)."""
    world = rank_and_world()[1]
    if world == 1:
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value / world


def max_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The maximum of a scalar over the processes (itself outside a distributed job)."""
    if rank_and_world()[1] == 1:
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value


def to_device_once(tensors: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """`tensors` on `device` through one pinned copy (views of it, in order); as they are on the CPU."""
    if not device.startswith("cuda") or not tensors:
        return tensors
    flat = torch.cat(tensors).pin_memory().to(device, non_blocking=True)
    return list(flat.split([len(t) for t in tensors]))


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every process's `rows` concatenated in rank order (on every process)."""
    if rank_and_world()[1] == 1:
        return rows
    parts = [None] * rank_and_world()[1]
    torch.distributed.all_gather_object(parts, rows)
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# Paths: the dataset, its captions and the CLIP weights, where the registry and the paper put them
# --------------------------------------------------------------------------------------------

class MissingPieces(ValueError):
    """What a run lacks before it can start: one line per piece, each saying what to put where."""


def here_or_in_repo(path: str) -> Path:
    """registry.here_or_in_repo under this repo (ROOT, which a test points at a clean clone)."""
    return registry.here_or_in_repo(path, ROOT)


def missing_pieces(cfg: config.BACGCNConfig) -> list[str]:
    """One line per piece a run needs and lacks (its data, captions, CLIP weights), each naming
    the place and what goes there; [] when everything is in place."""
    entry, lines, show = registry.get(cfg.dataset), [], data.shown_path    # a newline in a name: still one line
    root = Path(cfg.data_root)
    fetches = {piece.place for piece in entry.downloads}
    fetch_data = "; --download fetches it from the official source" if "data_root" in fetches else ""
    if entry.own_photos:
        if not root.is_dir():
            lines.append(f"{show(root)}: no such folder of photos (--data-root)")
        if not cfg.classes:
            lines.append("--classes: a folder of photos needs its class names: --classes=FILE (one a line) or "
                         "--classes=cat,dog,...")
    if entry.release_layout and not root.is_dir():
        lines.append(f"{show(root)}: no {entry.name} here: put {entry.release_layout} there (the paper's layout), "
                     f"or pass --data-root=DIR{fetch_data}")
    elif entry.release_layout and entry.voc_year is not None:     # the release's trees, split by split
        for split in dict.fromkeys((cfg.train_split, cfg.test_split)):
            try:
                data.voc_root(root, entry.voc_year, split)
            except data.DataError as e:
                lines.append(f"{e}{fetch_data}")
    captions_file = Path(cfg.captions) / captions.CAPTIONS_FILE
    if entry.release_layout and captions.find_captions(cfg.captions, entry.name) is None:
        lines.append(f"{show(captions_file)}: no captions: put the paper's captions.json (and re_captions.json) "
                     f"for {entry.name} there" + (" (--download fetches the authors')" if "captions" in fetches
                                                   else "") +
                     f", make them with `python captions.py generate --dataset {entry.name} ...`, or pass "
                     "--captions=DIR (a folder with captions.json, or the authors' caption/ folder or a clone)")
    weights = clip_weights_problem(cfg)
    if weights:
        lines.append(weights)
    return lines


def clip_weights_problem(cfg: config.BACGCNConfig) -> str | None:
    """What keeps the run from its CLIP weights (None: they are here). Weights named by the
    registry (`openai`) are fetched into the Hugging Face cache now, the first time."""
    if frozen_clip.is_named(cfg.clip_weights):
        try:
            frozen_clip.weights_file(cfg.clip_weights, cfg.clip_model)
        except data.DataError as e:
            return str(e)
        return None
    if Path(cfg.clip_weights).is_file():
        return None
    named = [n for n, e in frozen_clip.PRETRAINED.items() if e.model == cfg.clip_model]
    how = f": pass --clip-weights={named[0]} (fetched once) or --clip-weights=FILE" if named else ""
    return f"{data.shown_path(cfg.clip_weights)}: CLIP weights not found{how}"


def clip_weights_file(cfg: config.BACGCNConfig) -> Path:
    """The local file of the run's CLIP weights (a name of the registry resolved and checked)."""
    return frozen_clip.weights_file(cfg.clip_weights, cfg.clip_model)


def build_dataset(entry: registry.Dataset, root: Path, seed: int) -> None:
    """Run the entry's build command (the proving ground's `synthetic.py build`) into `root`:
    a command of its own, so the production path never imports the proving ground."""
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / entry.build_command[0]), *entry.build_command[1:], "--out", str(root),
               "--seed", str(seed)]
    log(f"building {entry.name} in {root} (once)")
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise data.DataError(root, f"building {entry.name} failed (`{' '.join(command[1:])}`: see above)")


def resolve_paths(cfg: config.BACGCNConfig, download: bool = False) -> config.BACGCNConfig:
    """Fill the defaults that depend on the dataset (a real one in the paper's layout under
    --data-folder); build a dataset that is built here (the proving ground) if absent, at its
    default path or where --build-world=true asks (a mistyped --data-root builds nothing); with
    `download`, fetch the registry's pieces that are missing into those places first. Every
    piece still missing is one line of MissingPieces."""
    entry, updates = registry.get(cfg.dataset), {}
    if entry.build_command:
        default = ROOT / entry.default_root.format(seed=cfg.seed)
        root = Path(cfg.data_root or default)
        if not (root / entry.build_marker).is_file():
            if root.resolve() != default.resolve() and not cfg.build_world:
                build, what = " ".join(entry.build_command), entry.title or entry.name
                raise data.DataError(root, f"no {what} here (no {entry.build_marker}); build one with "
                                           f"--build-world=true or `python {build} --out {data.shown_path(root)}`")
            build_dataset(entry, root, cfg.seed)
        updates["data_root"] = str(root)
        updates["captions"] = cfg.captions or str(root)
    elif entry.own_photos:
        if not cfg.data_root:
            raise MissingPieces(f"--data-root: a {entry.title or entry.name} needs --data-root=DIR, the folder whose "
                                "JPEG/PNG photos (subfolders too) are to be tagged")
        updates["data_root"] = os.path.abspath(cfg.data_root)
        updates["captions"] = (os.path.abspath(cfg.captions) if cfg.captions else
                               str(captions.photo_captions_folder(cfg)))
        if cfg.classes and Path(cfg.classes).is_file():       # recorded where any folder finds it again
            updates["classes"] = os.path.abspath(cfg.classes)
        if cfg.labels:
            updates["labels"] = os.path.abspath(cfg.labels)
    else:
        places = entry.release_places(here_or_in_repo(cfg.data_folder), cfg.data_root, cfg.captions)
        updates.update({key: str(place) for key, place in places.items()})
    updates["train_split"] = cfg.train_split or entry.train_split
    updates["test_split"] = cfg.test_split or entry.test_split
    if not frozen_clip.is_named(cfg.clip_weights):
        updates["clip_weights"] = str(here_or_in_repo(cfg.clip_weights))
    cfg = cfg.replace(**updates)
    if download:
        registry.fetch_missing(entry, {"data_root": Path(cfg.data_root), "captions": Path(cfg.captions)}, say=log)
    missing = missing_pieces(cfg)
    if missing:
        raise MissingPieces("\n".join(missing))
    return cfg


# --------------------------------------------------------------------------------------------
# Stage 1: the captions' pseudo labels and graph
# --------------------------------------------------------------------------------------------

@dataclass
class CaptionLabels:
    """What the captions say about the training images, over the O categories trained."""
    classes: list[str]
    categories: list[str]        # the C classes, then the backgrounds when they are used
    prompt_names: list[str]      # what the text encoder reads for each category
    pseudo: captions.PseudoLabels
    m: np.ndarray                # co-occurrence counts of the hard labels [O, O]
    n: np.ndarray                # label counts [O]
    quality: dict                # the captions' pseudo labels against the training split's human labels

    def targets_for(self, ids: Sequence[str], min_votes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft targets, hard labels) [len(ids), O], rows in the order of `ids`."""
        row = {i: k for k, i in enumerate(self.pseudo.ids)}
        take = [row[i] for i in ids]
        o = len(self.categories)
        targets = torch.from_numpy(self.pseudo.scores[take, :o]).float()
        hard = torch.from_numpy(self.pseudo.hard(min_votes)[take, :o]) > 0
        return targets, hard


def check_captions_match(cfg, caption_texts: dict, pseudo: captions.PseudoLabels,
                         train_ds: data.MultiLabelImages) -> None:
    """Captions that name none of the training images would train on all-zero targets: refuse;
    a few without a caption train as negatives of every class: say so loudly past 5 %."""
    matched, total = int((pseudo.num_captions > 0).sum()), len(pseudo.ids)
    if total and not matched:
        first = next(iter(caption_texts), None)
        raise data.DataError(captions.find_captions(cfg.captions, cfg.dataset) or cfg.captions,
                             f"no caption id matches an image of {train_ds.name} (captions name {first!r}, the "
                             f"images are named like {train_ds.ids[0]!r})")
    if total - matched > MAX_MISSING_SHARE * total:
        log(f"WARNING: {total - matched} of {total} training images ({100 * (total - matched) / total:.0f}%) have "
            "no caption: they train as negatives of every class")


def classes_no_caption_names(classes: Sequence[str], hard: torch.Tensor, min_votes: int) -> list[str]:
    """The classes that no training image's captions name (with `min_votes` votes), with a
    warning: they train on no positive at all, so their scores rest on CLIP's prompt and the
    graph alone; report.json lists them."""
    unnamed = [name for c, name in enumerate(classes) if not bool(hard[:, c].any())]
    if unnamed:
        log(f"WARNING: no caption names {', '.join(map(repr, unnamed))} ({len(unnamed)} of {len(classes)} classes"
            f"{'' if min_votes == 1 else f' at --min-votes={min_votes}'}): they train on no positive image")
    return unnamed


def check_some_positive(cfg, hard: np.ndarray, train_ds: data.MultiLabelImages) -> None:
    """A run whose labels name no class on any training image would train every class towards 0
    (and score far below zero-shot): refused before any encoding. A few unnamed classes are
    only a warning (classes_no_caption_names)."""
    if hard.any():
        return
    if cfg.train_labels == "true":
        raise data.DataError(cfg.data_root, f"no image of {train_ds.name} has a positive label: nothing to train on")
    votes = "" if cfg.min_votes == 1 else f" with --min-votes={cfg.min_votes}"
    raise data.DataError(captions.find_captions(cfg.captions, cfg.dataset) or cfg.captions,
                         f"no caption names any of the {hard.shape[1]} classes of {train_ds.name}{votes}: no class "
                         "has a positive pseudo label to train on (do the captions and the dictionary match?)")


def check_features(split: Split, dataset: data.MultiLabelImages, root: str) -> None:
    """A split none of whose images could be read is an error; many skipped ones a loud warning."""
    if not split.ids:
        raise data.DataError(root, f"none of the {len(dataset)} images of {dataset.name} could be read "
                                   "(missing or corrupt; see the warnings above)")
    skipped = len(dataset) - len(split.ids)
    if skipped > MAX_MISSING_SHARE * len(dataset):
        log(f"WARNING: {skipped} of {len(dataset)} images of {dataset.name} ({100 * skipped / len(dataset):.0f}%) "
            "could not be read and are left out")


def load_split(cfg: config.BACGCNConfig, split: str) -> data.MultiLabelImages:
    """One split of the run's dataset (a folder of photos reads --classes and --labels too)."""
    return registry.get(cfg.dataset).load(cfg.data_root, split, classes=cfg.classes, labels=cfg.labels)


def has_labels(dataset: data.MultiLabelImages) -> bool:
    """Whether any class of `dataset` has a positive to rank (a folder of photos without --labels has none)."""
    return bool(metrics.positive_counts(dataset.label_matrix()).any())


def caption_photos(cfg: config.BACGCNConfig, photos: data.MultiLabelImages, device: str) -> None:
    """A folder of photos is captioned by BLIP-2 (--captioner) into its captions folder, once:
    the photos it lacks only. Captions the user gives (--captions=DIR) are read, never written."""
    entry = registry.get(cfg.dataset)
    if not entry.own_photos or Path(cfg.captions) != captions.photo_captions_folder(cfg):
        return
    if is_main_process():
        dictionary = captions.dictionary_for(cfg, photos.class_names)
        options = captions.CaptionerOptions(device=device, workers=cfg.workers)
        for path in captions.generate(photos, cfg.captioner, cfg.captions, dictionary, options):
            log(f"captions: {path}")
    barrier()


def caption_labels(cfg: config.BACGCNConfig, train_ds: data.MultiLabelImages) -> CaptionLabels:
    classes = train_ds.class_names
    entry = registry.get(cfg.dataset)
    dictionary = captions.dictionary_for(cfg, classes)
    caption_texts = captions.read_captions(cfg.captions, entry.name)
    config = captions.CaptionFilterConfig(min_votes=cfg.min_votes)
    pseudo = captions.pseudo_labels(caption_texts, dictionary, classes, config, ids=train_ds.ids)
    check_captions_match(cfg, caption_texts, pseudo, train_ds)
    areas, size_rule = None, (0.0, 1.0)
    if entry.size_buckets:   # the proving ground knows its instances' sizes
        areas = data.largest_instance_area(cfg.data_root, pseudo.ids, classes, entry.voc_year)
        size_rule = (metrics.SMALL_AREA, metrics.LARGE_AREA)
    quality = captions.caption_quality(pseudo, train_ds, cfg.min_votes, areas, size_rule)
    if quality:
        sizes = (f", recall of small / large instances {quality['recall_small']:.3f} / {quality['recall_large']:.3f}"
                 if areas is not None else "")
        log(f"caption pseudo labels against the training split's labels: mAP {quality['mAP']:.2f}, "
            f"precision {quality['precision']:.3f}, recall {quality['recall']:.3f}{sizes}")
    if cfg.train_labels == "true":
        pseudo = captions.with_true_labels(pseudo, train_ds, cfg.min_votes)
    num_cat = len(pseudo.categories) if cfg.use_backgrounds else len(classes)
    hard = pseudo.hard(cfg.min_votes)
    check_some_positive(cfg, hard[:, :len(classes)], train_ds)
    m, n = data.cooccurrence(hard[:, :num_cat])
    kind = "true" if cfg.train_labels == "true" else "pseudo"
    log(f"{kind} labels: {len(pseudo.ids)} images, {len(classes)} classes + {num_cat - len(classes)} backgrounds, "
        f"{hard[:, :len(classes)].sum(1).mean():.2f} classes per image")
    # The dictionary's own spelling reads better in a prompt than the dataset's ("dining table")
    prompt_names = [PROMPT_SPELLING.get(c, c) for c in dictionary.categories[:num_cat]]
    return CaptionLabels(classes, pseudo.categories[:num_cat], prompt_names, pseudo, m, n, quality)


# --------------------------------------------------------------------------------------------
# Frozen backbone and cached features
# --------------------------------------------------------------------------------------------

def build_backbone(cfg: config.BACGCNConfig, device: str) -> frozen_clip.CLIPBackbone:
    """The frozen CLIP of `cfg` (weights loaded strict), at the configured input size."""
    clip = frozen_clip.create_clip(cfg.clip_model, clip_weights_file(cfg), cfg.clip_weights_format)
    if cfg.image_size:
        patch = clip.visual.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if cfg.image_size % patch:
            raise ValueError(f"--image-size={cfg.image_size}: not a multiple of the patch size {patch} of "
                             f"{cfg.clip_model} (0 = its own size, {clip.visual.image_size[0]} px)")
        frozen_clip.set_image_size(clip, cfg.image_size)
    return frozen_clip.CLIPBackbone(clip.to(device), cfg.patch_readout).eval()


def check_against_backbone(cfg: config.BACGCNConfig, backbone: frozen_clip.CLIPBackbone) -> None:
    """What only the built backbone can judge: Top-K cannot exceed the patches there are."""
    grid = backbone.visual.grid_size
    patches = grid[0] * grid[1]
    if cfg.topk > patches:
        raise ValueError(f"--topk={cfg.topk}: more than the {patches} patches of {cfg.clip_model} "
                         f"at {backbone.image_size} px")


@dataclass
class Split:
    ids: list[str]
    feats: CachedFeatures              # patches [N, E], g, gH, gHc [E], attn [N] per row (bf16, CPU or disk)
    dataset: data.MultiLabelImages     # for labels and (ReSO) the original images


def image_transform(size: int):
    """uint8 [3, H, W] -> uint8 [3, size, size] (antialiased), in the loader workers."""
    from torchvision.transforms.v2 import functional as TF

    def resize(img: torch.Tensor) -> torch.Tensor:
        if img.shape[-2:] == (size, size):
            return img
        return TF.resize(img, [size, size], antialias=True)
    return resize


def feature_spec(cfg: config.BACGCNConfig, backbone: frozen_clip.CLIPBackbone, dataset: data.MultiLabelImages,
                 kind: str) -> dict:
    """Everything that changes the cached features of `dataset`: the cache key."""
    import hashlib
    device = next(backbone.parameters()).device.type
    return {"kind": kind, "clip_model": cfg.clip_model, "weights": file_digest(clip_weights_file(cfg)),
            # A CPU fp32 cache is not a GPU bf16 one: the features differ past bf16's rounding.
            "device": device, "precision": encode_precision(device, cfg.amp),
            "image_size": backbone.image_size, "patch_readout": cfg.patch_readout, "h_fraction": cfg.h_fraction,
            "subset_readout": cfg.subset_readout,
            "dataset": dataset.name, "root": str(Path(cfg.data_root).resolve()),
            "ids": hashlib.sha256("\n".join(dataset.ids).encode()).hexdigest(), "files": dataset.files_stamp()}


def encode_precision(device_type: str, amp: bool) -> str:
    """How the frozen encoder computes on this device: bf16 autocast on CUDA with amp, TF32
    matmuls on CUDA without (fp32 storage, the tensor cores' 10-bit mantissa), fp32 on the CPU."""
    if device_type != "cuda":
        return "fp32"
    return "bf16-autocast" if amp else "tf32"


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 for the matmuls and convolutions inside, restored after: the frozen encoder in fp32 on
    CUDA would otherwise run at a fraction of the tensor cores' rate; the head keeps fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def encode_features(backbone: frozen_clip.CLIPBackbone, images: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """uint8 images on the device -> everything BAC-GCN caches per image."""
    x = frozen_clip.preprocess(images, backbone.image_size)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda and cfg.amp), \
            tf32_matmuls(encode_precision(x.device.type, cfg.amp) == "tf32"):
        return backbone.features(x, cfg.h_fraction, cfg.subset_readout)


def checked_cache(cache: FeatureCache, dataset, encode, workers: int, device: str, desc: str) -> str:
    """"hit" when the complete cache passes its check, every byte read once (a shard that
    fails is named and its images encoded again), "miss" when it must be built again (its
    index is unsound, or a failing shard's images no longer give its rows). A cache that may
    not be written is refused, not trusted."""
    import shutil
    import time

    t0 = time.time()
    try:
        failing, unsound = cache.failing_shards(), None
    except data.DataError as e:
        failing, unsound = [], e
    if not failing and unsound is None:
        log(f"{desc}: feature cache hit ({cache.dir}; every shard checked in {time.time() - t0:.1f} s)")
        return "hit"
    first = unsound or data.DataError(cache.dir / failing[0][0], failing[0][1])
    if not os.access(cache.dir, os.W_OK):
        raise data.DataError(first.path, f"{first.problem} (the feature cache here is read only: choose another "
                                         "--cache-dir, or rebuild it where it may be written)")
    for name, why in failing:
        log(f"warning: feature cache shard {cache.dir / name}: {why}; encoding its images again")
    if failing and cache.rebuild_shards(dataset, encode, [n for n, _ in failing], CACHE_BATCH, workers, device):
        return "hit"
    log(f"warning: feature cache {cache.dir} is damaged ({first}); rebuilding it")
    shutil.rmtree(cache.dir)
    return "miss"


def load_or_encode(cfg, backbone, dataset, spec: dict, device: str, desc: str) -> CachedFeatures:
    """The features of `dataset` from the cache keyed by `spec`, encoding it once on a miss
    (each process of a distributed job encodes its share) or when the cache is damaged."""
    import time

    cache = FeatureCache(cfg.cache_dir or config.default_cache_dir(cfg), spec, fmt=cfg.cache_format)
    state = "miss"
    if is_main_process() and cache.complete:
        state = checked_cache(cache, dataset, lambda x: encode_features(backbone, x, cfg), cfg.workers, device, desc)
    if broadcast_object(state) != "hit":
        log(f"{desc}: encoding {len(dataset)} images once into {cache.dir}")
        t0 = time.time()
        part, parts = rank_and_world()
        mine = torch.utils.data.Subset(dataset, share(len(dataset), CACHE_BATCH)) if parts > 1 else dataset
        cache.build(mine, lambda x: encode_features(backbone, x, cfg), batch_size=CACHE_BATCH, workers=cfg.workers,
                    device=device, desc=desc, pin_memory=device.startswith("cuda"), part=part, parts=parts)
        barrier()
        if parts > 1 and is_main_process():
            cache.merge(parts)
        barrier()
        seconds = max(time.time() - t0, 1e-9)
        rate = len(dataset) / seconds
        log(f"{desc}: {len(dataset)} images in {seconds:.0f} s ({rate:.0f} img/s)" if rate >= 10 else
            f"{desc}: {len(dataset)} images in {seconds:.0f} s ({seconds / max(len(dataset), 1):.1f} s an image)")
    feats, where = cache.open_within(cfg.cache_memory_gb, device)
    log(f"{desc}: {where}")
    return feats


def cached_features(cfg, backbone, dataset, device) -> Split:
    """The split's features, encoded once per image and read from the cache afterwards."""
    dataset.transform = image_transform(backbone.image_size)
    try:
        feats = load_or_encode(cfg, backbone, dataset, feature_spec(cfg, backbone, dataset, "images"),
                               device, dataset.name)
    finally:
        dataset.transform = None
    return Split(feats.ids, feats, dataset)


# --------------------------------------------------------------------------------------------
# Model, prediction, evaluation
# --------------------------------------------------------------------------------------------

FEATURE_KEYS = ("patches", "g", "gH", "gHc")   # what the head reads per image


def prefetched(items, device: str, dtype):
    """The head's inputs of each (features, rows) in `items`, on `device` in `dtype` (cache.stream)."""
    return stream(items, FEATURE_KEYS, device, dtype)


def scoring_batch(feats: CachedFeatures, batch: int = PREDICT_BATCH) -> int:
    """Images per scoring forward: few enough that the batches in flight (read ahead, converted
    to fp32) stay small next to a streamed cache (measured on a 3.9 GB cache of 784 x 512
    patches: 256 images a batch held the peak at 2.7 GB)."""
    row_bytes = sum(2 * int(np.prod(feats.row_shapes[k])) for k in FEATURE_KEYS if k in feats.row_shapes)
    return max(1, min(batch, PREDICT_BYTES // max(row_bytes, 1)))


@torch.no_grad()
def predict(model, feats: CachedFeatures, device, dtype, batch: int = PREDICT_BATCH) -> np.ndarray:
    """Logits [n, O] of every cached image; in a distributed job each process scores its share
    and every process gets all rows."""
    model.eval()
    batch = scoring_batch(feats, batch)
    rows = share(len(feats))
    batches = [torch.arange(i, min(i + batch, rows.stop)) for i in range(rows.start, rows.stop, batch)]
    with contextlib.closing(prefetched([(feats, b) for b in batches], device, dtype)) as inputs:
        logits = []
        for x in inputs:
            logits.append(model(x)["logits"].float().cpu())
            del x                   # before the next batch is decoded, not after
    model.train()
    width = model.num_categories
    return gather_rows(torch.cat(logits).numpy() if logits else np.zeros((0, width), dtype=np.float32))


def evaluate_split(cfg, logits: np.ndarray, split: Split, num_classes: int, difficult: str = "ignore") -> dict:
    """mAP, CF1, OF1 (threshold: logit 0), per-class AP; on the proving ground also the size
    rule's mAP_small / mAP_large."""
    labels = split.dataset.labels_for(split.ids)
    scores = logits[:, :num_classes]
    report = metrics.evaluate(scores, labels, split.dataset.class_names, difficult, threshold=0.0)
    out = {"mAP": report["mAP"], "CF1": report["CF1"], "OF1": report["OF1"], "AP": report["AP"]}
    entry = registry.get(cfg.dataset)
    if entry.size_buckets:
        areas = data.largest_instance_area(cfg.data_root, split.ids, split.dataset.class_names, entry.voc_year)
        out.update(metrics.size_split_map(scores, labels, areas, metrics.SMALL_AREA, metrics.LARGE_AREA))
    return out


TAG_THRESHOLD = 0.5   # the probability that makes a tag where a model has no per-class thresholds


def tag_thresholds(model, split: Split, hard: torch.Tensor, num_classes: int, device: str, dtype) -> np.ndarray:
    """[C] the per-class tag thresholds of a trained head: on its own training images, the
    probability cut with the best F1 against their hard pseudo labels (no human label)."""
    probs = metrics.sigmoid(predict(model, split.feats, device, dtype)[:, :num_classes])
    return metrics.per_class_thresholds(probs, hard[:, :num_classes].cpu().numpy(), TAG_THRESHOLD)


def tag_lists(probs: np.ndarray, classes: Sequence[str], threshold, top_k: int | None) -> list[str]:
    """Per image: the classes scoring >= threshold (one for all, or one per class [C]), best
    first, at most top_k, joined by ';'."""
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(classes),))
    out = []
    for row in probs:
        order = [int(c) for c in np.argsort(-row, kind="stable") if row[c] >= threshold[c]]
        out.append(";".join(classes[c] for c in order[:top_k]))
    return out


def write_tags(path: str | os.PathLike, ids: Sequence[str], logits: np.ndarray, classes: Sequence[str],
               threshold=TAG_THRESHOLD, top_k: int | None = None) -> dict:
    """The tags CSV (eval.py --images's): each image's class probabilities and its tags
    (`threshold`: one for all classes, or one per class)."""
    probs = metrics.sigmoid(logits[:, :len(classes)])
    tags = tag_lists(probs, classes, threshold, top_k)
    data.write_scores_csv(path, ids, classes, probs, tags)
    per_class = np.ndim(threshold) > 0
    return {"file": str(path), "threshold": "per class" if per_class else float(threshold), "top_k": top_k,
            "images": len(ids), "images_with_tags": sum(bool(t) for t in tags)}


def recorded_thresholds(meta: dict, classes: Sequence[str]) -> np.ndarray | None:
    """The per-class tag thresholds a checkpoint records (in its metrics), or None: written by
    train.py, checked here as any recorded value (one per class, each a probability)."""
    recorded = json.loads(meta.get("metrics", "{}")).get("tag_thresholds")
    if not isinstance(recorded, dict) or list(recorded) != list(classes):
        return None
    values = np.array([v if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan
                       for v in recorded.values()], dtype=np.float64)
    return values if np.all((values >= 0) & (values <= 1)) else None


# --------------------------------------------------------------------------------------------
# The Python API: a trained model from its checkpoint, scoring images
# --------------------------------------------------------------------------------------------

def head_inputs(feats: dict[str, torch.Tensor], dtype, cache_format: str) -> dict[str, torch.Tensor]:
    """Encoder outputs -> what the head reads, through the feature cache's format first: the head
    was trained and is evaluated on cached features, so an image scores the same here as it does
    inside a dataset."""
    return decode(as_stored({k: feats[k] for k in FEATURE_KEYS}, cache_format), dtype)


def open_checkpoint(path: str, overrides: dict | None = None, weights_format: str = "auto",
                    split: str | None = None) -> tuple[config.BACGCNConfig, list[str], list[str], dict, dict]:
    """(config, classes, categories, tensors, metadata) of a checkpoint (every check of
    checkpoints.read_checkpoint), with `overrides` of its recorded paths (clip_weights, data_root,
    cache_dir, workers) and its test-time pass (test_crops; None or '' keep the recorded one), the
    weights format of the caller, never the checkpoint's (a file may name a TorchScript archive,
    but only the user can ask for it to be run), and `split` as the split to evaluate (default:
    its test split)."""
    cfg, classes, categories, tensors, meta = checkpoints.read_checkpoint(path)
    split = split or cfg.test_split
    registry.get(cfg.dataset).check_split(split)
    cfg = cfg.replace(test_split=split, clip_weights_format=weights_format,
                      **{k: v for k, v in (overrides or {}).items() if v not in (None, "")})   # --workers 0 is given
    config.validate(cfg)
    cfg = checkpoints.clip_weights_here(path, cfg, checkpoints.recorded_weights(meta),
                                  given=bool((overrides or {}).get("clip_weights")))
    return cfg, classes, categories, tensors, meta


@dataclass
class TrainedModel:
    """A trained BAC-GCN that scores images: the frozen CLIP and the trained head of one
    checkpoint (`load_trained`), its class names and its preprocessing."""
    cfg: config.BACGCNConfig
    classes: list[str]               # the C classes scored, in column order
    categories: list[str]            # the O categories of the head: classes, then backgrounds
    backbone: frozen_clip.CLIPBackbone
    head: bacgcn.BACGCN
    device: str
    metadata: dict

    @classmethod
    def build(cls, path: str, cfg, classes, categories, tensors, meta) -> "TrainedModel":
        """From `open_checkpoint`'s parts. The training machine's device may not exist here: CUDA
        when there is one, unless it was the CPU."""
        device = resolve_device("cpu" if cfg.device == "cpu" else "")
        try:
            backbone = build_backbone(cfg, device)
            check_against_backbone(cfg, backbone)
        except (ValueError, FileNotFoundError) as e:
            raise data.DataError(path, f"its CLIP cannot be rebuilt: {e}") from None
        head = checkpoints.model_from_checkpoint(path, cfg, classes, tensors).to(device).eval()
        return cls(cfg, classes, categories, backbone, head, device, meta)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.device, self.cfg.amp)

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image (any mode) or a uint8 tensor [3, H, W] -> uint8 [3, S, S] at the encoder's
        input size (the CLIP normalisation happens inside `logits`)."""
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        return image_transform(self.backbone.image_size)(image)

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        """Logits [B, O] over every category of a list of PIL images or uint8 tensors [3, H, W],
        or of a uint8 batch [B, 3, S, S] already preprocessed."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.preprocess(im) for im in images])
        feats = encode_features(self.backbone, images.to(self.device), self.cfg)
        return self.head(head_inputs(feats, self.dtype, self.cfg.cache_format))["logits"].float().cpu()

    def scores(self, images) -> np.ndarray:
        """Probabilities [B, C] of the classes (sigmoid of the logits), columns as `classes`."""
        return torch.sigmoid(self.logits(images)[:, :len(self.classes)]).numpy()

    @torch.no_grad()
    def predict_dataset(self, dataset: data.MultiLabelImages, desc: str = "tagging",
                        on_maps=None) -> tuple[list[str], np.ndarray]:
        """(ids, logits [n, O]) of the readable images of `dataset`, encoded in batches with a
        progress bar and no feature cache (a folder is scored once). Corrupt files are skipped
        and counted by `cache.encode_images`; the ids say which images the rows are.
        `on_maps(first_row, sim [B, N, C])`, where given, sees each batch's class maps while they
        are at hand (eval.py's test-time pass picks its crops there); `first_row` is the batch's
        first row of the returned arrays."""
        cfg, device = self.cfg, self.device
        head = torch.compile(self.head) if cfg.compile and device.startswith("cuda") else self.head   # as in training
        dataset.transform = image_transform(self.backbone.image_size)
        ids, logits = [], []
        try:
            for batch_ids, _, feats in encode_images(
                    dataset, lambda x: encode_features(self.backbone, x, cfg), batch_size=CACHE_BATCH,
                    workers=cfg.workers, device=device, desc=desc, pin_memory=device.startswith("cuda")):
                out = head(head_inputs(feats, self.dtype, self.cfg.cache_format))
                logits.append(out["logits"].float().cpu())
                if on_maps is not None:
                    on_maps(len(ids), out["sim"][:, :, :len(self.classes)].float().cpu())
                ids.extend(batch_ids)
        finally:
            dataset.transform = None
        return ids, torch.cat(logits).numpy() if logits else np.zeros((0, len(self.categories)), dtype=np.float32)

    @torch.no_grad()
    def explain(self, image: torch.Tensor) -> dict[str, np.ndarray]:
        """What the head saw in one uint8 image [3, H, W]: logits [O], the similarity maps
        sim [N, O] over the patch grid, and `pooled` [K, O], the patches the Similarity Kernel
        pooled for each category: the kernel's own selection, not one recomputed from the returned
        sim, whose bf16 rounding on a GPU reorders near-ties the kernel told apart in fp32."""
        # Not compiled even when cfg.compile: one forward would pay the whole compile time.
        x = self.preprocess(image)[None].to(self.device)
        feats = head_inputs(encode_features(self.backbone, x, self.cfg), self.dtype, self.cfg.cache_format)
        out = self.head(feats, with_indices=True)
        return {"logits": out["logits"][0].float().cpu().numpy(), "sim": out["sim"][0].float().cpu().numpy(),
                "pooled": out["pooled"][0].t().cpu().numpy()}


def load_trained(path: str, clip_weights: str | None = None, weights_format: str = "auto") -> TrainedModel:
    """A trained BAC-GCN from its checkpoint alone (the CLIP weights it recorded, or
    `clip_weights`), every check of eval.py's included:

        model = pipeline.load_trained("runs/X/ckpt.safetensors")
        probs = model.scores([Image.open("photo.jpg")])        # [1, C], columns model.classes
    """
    parts = open_checkpoint(path, {"clip_weights": clip_weights}, weights_format)
    return TrainedModel.build(path, *parts)
