"""What the commands share: the frozen backbone, cached features, prediction, split evaluation,
the checkpoint format, the learning-rate schedule and the run metadata.

train.py and eval.py both build on this module and never import each other, so each stays a
thin command line over one set of functions (a change to, say, the dtype rule cannot leave the
evaluation disagreeing with the training).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import bacgcn
import data
from cache import CachedFeatures, FeatureCache, encode_images, file_digest
from metrics import evaluate, size_split_map

ROOT = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = "bacgcn-1"
PREDICT_BATCH = 256          # images per forward when scoring a split (no gradients: memory is small) ...
PREDICT_BYTES = 64 * 2**20   # ... but at most this many bytes of cached features (ViT-B/16 at 448: 80 images)
CACHE_BATCH = 64             # images per encoder forward while caching features


def log(msg: str) -> None:
    """Progress lines, printed once per job (by rank 0 in a distributed one)."""
    if is_main_process():
        print(msg, flush=True)


def git_commit() -> str:
    """Short hash of the checkout, recorded in checkpoints and benchmark rows."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def resolve_device(requested: str) -> str:
    """'' means CUDA when there is one, else the CPU. A CUDA device that is not there is a
    one-line ValueError (bacgcn.validate has checked the spelling)."""
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device={requested}: CUDA is not available")
        index, count = int(requested.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"--device={requested}: there {'is' if count == 1 else 'are'} {count} CUDA "
                             f"device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    return requested


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


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def init_distributed(requested_device: str) -> str:
    """Join the torchrun job when launched by torchrun (NCCL on CUDA, gloo on the CPU) and
    return this process's device; a plain `python train.py` stays a single process."""
    import os

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
# Frozen backbone and cached features
# --------------------------------------------------------------------------------------------

def build_backbone(cfg: bacgcn.BACGCNConfig, device: str) -> bacgcn.CLIPBackbone:
    """The frozen CLIP of `cfg` (weights loaded strict), at the configured input size."""
    clip = bacgcn.create_clip(cfg.clip_model, cfg.clip_weights, cfg.clip_weights_format)
    if cfg.image_size:
        patch = clip.visual.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if cfg.image_size % patch:
            raise ValueError(f"--image-size={cfg.image_size}: not a multiple of the patch size {patch} of "
                             f"{cfg.clip_model} (0 = its own size, {clip.visual.image_size[0]} px)")
        bacgcn.set_image_size(clip, cfg.image_size)
    return bacgcn.CLIPBackbone(clip.to(device), cfg.patch_readout).eval()


def check_against_backbone(cfg: bacgcn.BACGCNConfig, backbone: bacgcn.CLIPBackbone) -> None:
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


def feature_spec(cfg: bacgcn.BACGCNConfig, backbone: bacgcn.CLIPBackbone, dataset: data.MultiLabelImages,
                 kind: str) -> dict:
    """Everything that changes the cached features of `dataset`: the cache key."""
    import hashlib
    device = next(backbone.parameters()).device.type
    return {"kind": kind, "clip_model": cfg.clip_model, "weights": file_digest(cfg.clip_weights),
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


def encode_features(backbone: bacgcn.CLIPBackbone, images: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """uint8 images on the device -> everything BAC-GCN caches per image."""
    x = bacgcn.preprocess(images, backbone.image_size)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda and cfg.amp), \
            tf32_matmuls(encode_precision(x.device.type, cfg.amp) == "tf32"):
        return backbone.features(x, cfg.h_fraction, cfg.subset_readout)


def load_or_encode(cfg, backbone, dataset, spec: dict, device: str, desc: str) -> CachedFeatures:
    """The features of `dataset` from the cache keyed by `spec`, encoding it once on a miss
    (each process of a distributed job encodes its share) or when the cache is damaged."""
    import shutil
    import time

    cache = FeatureCache(cfg.cache_dir, spec)
    state = "miss"
    if is_main_process() and cache.complete:
        problem = cache.problem()
        state = "hit" if problem is None else "damaged"
        if problem is not None:
            log(f"warning: feature cache {cache.dir} is damaged ({problem}); rebuilding it")
            shutil.rmtree(cache.dir)
    if broadcast_object(state) == "hit":
        log(f"{desc}: feature cache hit ({cache.dir})")
    else:
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
        log(f"{desc}: {len(dataset)} images in {seconds:.0f} s ({len(dataset) / seconds:.0f} img/s)")
    return cache.open(cfg.cache_memory_gb * 2**30)


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
# Crops of the original images (ReSO, and the peers that re-encode crops)
# --------------------------------------------------------------------------------------------

def region_masks(maps: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, N, C] -> bool [B, N, C]: where each image's map of each category, min-max normalised
    over its N patches, exceeds `tau` (ReSO's regions, and TagCLIP's re-identified ones)."""
    lo, hi = maps.amin(1, keepdim=True), maps.amax(1, keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12) > tau


def box_of_cells(cells: torch.Tensor, grid: int) -> tuple[int, int, int, int]:
    """(r0, c0, r1, c1), inclusive, of the patches `cells` (flat indices, at least one) of a grid x grid map."""
    rows, cols = cells // grid, cells % grid
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


def crop_box(patch_box: tuple[int, int, int, int], grid: int, width: int, height: int,
             margin: float) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of a patch-grid box grown by `margin` of its size on each
    side, made square (objects keep their aspect when upscaled) and clipped to the image."""
    r0, c0, r1, c1 = patch_box
    x0, x1 = c0 / grid * width, (c1 + 1) / grid * width
    y0, y1 = r0 / grid * height, (r1 + 1) / grid * height
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = min(side, width, height)
    x0 = min(max(cx - side / 2, 0), width - side)
    y0 = min(max(cy - side / 2, 0), height - side)
    return int(round(x0)), int(round(y0)), int(round(x0 + side)), int(round(y0 + side))


class CropImages(torch.utils.data.Dataset):
    """Crops of original images, upscaled to the encoder's input size."""

    def __init__(self, dataset: data.MultiLabelImages, crops: list[tuple[int, int, tuple]], size: int, grid: int,
                 margin: float):
        """`crops`: (dataset index, class, patch box) each."""
        self.dataset, self.crops, self.size, self.grid, self.margin = dataset, crops, size, grid, margin
        self.name = f"{dataset.name} crops"
        self.ids = [f"{dataset.samples[i].id}:{c}:{','.join(map(str, box))}" for i, c, box in crops]

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, k):
        from torchvision.transforms.v2 import functional as TF

        index, _, patch_box = self.crops[k]
        item = self.dataset[index]
        if item is None:
            return None
        img = item["image"]
        x0, y0, x1, y1 = crop_box(patch_box, self.grid, img.shape[2], img.shape[1], self.margin)
        img = TF.resize(img[:, y0:y1, x0:x1], [self.size, self.size], antialias=True)
        return {"image": img, "labels": item["labels"], "id": self.ids[k], "index": k}


def encode_crops(cfg, backbone, split: Split, found: list, kind: str, device: str,
                 margin: float | None = None) -> tuple[CachedFeatures, list]:
    """(features, the crops kept) of the crops `found` [(row, class, patch box)] grown by
    `margin` (default: ReSO's), each encoded once (cached under `kind` and the crops' list). A
    crop whose image could not be read is dropped. ReSO and the peers that re-encode crops
    (bench/compare.py) share it."""
    margin = cfg.reso_margin if margin is None else margin
    grid = int(round(math.sqrt(split.feats.row_shapes["patches"][0])))
    row = {s.id: k for k, s in enumerate(split.dataset.samples)}
    crop_ds = CropImages(split.dataset, [(row[split.ids[b]], c, box) for b, c, box in found],
                         backbone.image_size, grid, margin)
    spec = feature_spec(cfg, backbone, split.dataset, kind)
    spec.update({"crops": crop_ds.ids, "margin": margin})
    feats = load_or_encode(cfg, backbone, crop_ds, spec, device, kind)
    encoded = set(feats.ids)
    return feats, [f for f, i in zip(found, crop_ds.ids) if i in encoded]



# --------------------------------------------------------------------------------------------
# Model, prediction, evaluation
# --------------------------------------------------------------------------------------------

def build_model(cfg, prompts: torch.Tensor, num_classes: int, m, n, logit_scale: float) -> bacgcn.BACGCN:
    """BAC-GCN over the caption graph (co-occurrence counts M, N) and the given prompts."""
    adjacency = bacgcn.build_adjacency(torch.as_tensor(m).float(), torch.as_tensor(n).float(), num_classes, cfg)
    return bacgcn.BACGCN(cfg, prompts, num_classes, adjacency, logit_scale)


FEATURE_KEYS = ("patches", "g", "gH", "gHc")   # what the head reads per image


def batch_feats(feats: CachedFeatures, idx, device: str, dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True).to(dtype) for k, v in feats.gather(idx, FEATURE_KEYS).items()}


def prefetched(items, device: str, dtype, depth: int = 2):
    """batch_feats of each (features, rows) in `items`, read `depth` batches ahead in a thread,
    so file reads (a streamed cache) and, on CUDA, page-locking overlap the compute. Pinned
    batches come from torch's caching host allocator, which reuses a buffer only after the copy
    that read it has finished: a small ring of staging buffers without bookkeeping here."""
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    pin = device.startswith("cuda")

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read():
        try:
            for feats, idx in items:
                rows = feats.gather(idx, FEATURE_KEYS)
                if not offer({k: v.pin_memory() for k, v in rows.items()} if pin else rows):
                    return
            offer(None)
        except Exception as e:  # handed to the consumer, which raises it in its own thread
            offer(e)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    try:
        while (rows := ready.get()) is not None:
            if isinstance(rows, Exception):
                raise rows
            yield {k: v.to(device, non_blocking=True).to(dtype) for k, v in rows.items()}
    finally:
        stop.set()
        worker.join()


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
    with contextlib.closing(prefetched([(feats, b) for b in batches], device, dtype)) as stream:
        logits = [model(x)["logits"].float().cpu() for x in stream]
    model.train()
    width = model.num_categories
    return gather_rows(torch.cat(logits).numpy() if logits else np.zeros((0, width), dtype=np.float32))


def evaluate_split(cfg, logits: np.ndarray, split: Split, num_classes: int, difficult: str = "ignore") -> dict:
    """mAP, CF1, OF1 (threshold: logit 0), per-class AP; on the proving ground also the size
    rule's mAP_small / mAP_large."""
    labels = split.dataset.labels_for(split.ids)
    scores = logits[:, :num_classes]
    report = evaluate(scores, labels, split.dataset.class_names, difficult, threshold=0.0)
    out = {"mAP": report["mAP"], "CF1": report["CF1"], "OF1": report["OF1"], "AP": report["AP"]}
    if cfg.dataset == "synthetic":
        import synthetic
        areas = data.largest_instance_area(cfg.data_root, split.ids, split.dataset.class_names)
        out.update(size_split_map(scores, labels, areas, synthetic.SMALL_AREA, synthetic.LARGE_AREA))
    return out


# --------------------------------------------------------------------------------------------
# Checkpoint: model weights, caption graph and config in one safetensors file
# --------------------------------------------------------------------------------------------

# Paths the checkpoint records as absolute, so that eval.py run from another folder finds (and
# reports) the same files, never whatever its own working directory holds under those names.
RECORDED_PATHS = ("clip_weights", "data_root", "cache_dir")


DIGEST_KEY = "sha256"   # metadata key of the digest of a file's tensors and other metadata


def content_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and every metadata entry but the
    digest itself: written with a checkpoint or run state, checked when it is read, so a byte
    changed on disk is refused instead of training or scoring with other weights."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    for key in sorted(k for k in meta if k != DIGEST_KEY):
        digest.update(f"{key}\0{meta[key]}\0".encode())
    return digest.hexdigest()


def with_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    return {**meta, DIGEST_KEY: content_digest(tensors, meta)}


def check_digest(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    if meta.get(DIGEST_KEY) != content_digest(tensors, meta):
        raise data.DataError(path, "its content does not match the digest written with it (changed or damaged "
                                   "on disk since)" if DIGEST_KEY in meta else "holds no digest of its content")


def check_finite(path, tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise data.DataError(path, f"tensor {key} holds NaN or infinite values")


def save_checkpoint(path: Path, model, cfg, classes, categories, m, n, report, preset) -> None:
    from safetensors.torch import save_file

    cfg = cfg.replace(**{k: os.path.abspath(getattr(cfg, k)) for k in RECORDED_PATHS if getattr(cfg, k)})
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["graph.M"] = torch.from_numpy(np.asarray(m, dtype=np.float32))
    tensors["graph.N"] = torch.from_numpy(np.asarray(n, dtype=np.float32))
    meta = {"format": CHECKPOINT_FORMAT, "config": cfg.to_json(), "classes": json.dumps(list(classes)),
            "categories": json.dumps(list(categories)), "metrics": json.dumps(data.json_safe(report)),
            "commit": git_commit(), "preset": preset}
    data.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=with_digest(tensors, meta)))


def _recorded_json(path: str, meta: dict, key: str):
    if key not in meta:
        raise data.DataError(path, f"checkpoint metadata lacks {key!r}")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise data.DataError(path, f"checkpoint metadata {key!r} is not JSON ({e})") from None


def _recorded_names(path: str, meta: dict, key: str) -> list[str]:
    names = _recorded_json(path, meta, key)
    if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
        raise data.DataError(path, f"checkpoint metadata {key!r} is not a list of names")
    return names


def read_checkpoint(path: str):
    """(config, classes, categories, tensors, metadata) of a train.py checkpoint; a file that is
    not one, or whose parts disagree, is a one-line DataError naming it."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise data.DataError(path, "checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise data.DataError(path, f"not a safetensors checkpoint ({str(e).splitlines()[0][:160]})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise data.DataError(path, "not a checkpoint written by train.py (no bacgcn metadata)")
    check_digest(path, tensors, meta)
    if "config" not in meta:
        raise data.DataError(path, "checkpoint metadata lacks 'config'")
    try:
        cfg = bacgcn.BACGCNConfig.from_json(meta["config"])
        bacgcn.validate(cfg)
    except json.JSONDecodeError as e:
        raise data.DataError(path, f"recorded config is not JSON ({e})") from None
    except (ValueError, TypeError) as e:
        raise data.DataError(path, f"recorded config: {e}") from None
    classes, categories = _recorded_names(path, meta, "classes"), _recorded_names(path, meta, "categories")
    if categories[:len(classes)] != classes:
        raise data.DataError(path, "recorded categories do not start with the recorded classes")
    meta = {**meta, "metrics": json.dumps(_recorded_json(path, meta, "metrics") if "metrics" in meta else {})}
    check_checkpoint_tensors(path, tensors, len(categories))
    return cfg, classes, categories, tensors, meta


def shape_text(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def check_checkpoint_tensors(path: str, tensors: dict[str, torch.Tensor], num_categories: int) -> None:
    """The graph and the prompts fit the recorded categories, and no weight is NaN or infinite."""
    o = num_categories
    expected = {"graph.M": (o, o), "graph.N": (o,), "model.logit_scale": ()}
    for key in (*expected, "model.kernel.prompts"):
        if key not in tensors:
            raise data.DataError(path, f"checkpoint lacks the tensor {key}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise data.DataError(path, f"tensor {key} has shape {shape_text(tensors[key])}, expected "
                                       f"[{', '.join(map(str, shape))}] for {o} categories")
    prompts = tensors["model.kernel.prompts"]
    if prompts.dim() != 2 or prompts.shape[0] != o or prompts.shape[1] == 0:
        raise data.DataError(path, f"tensor model.kernel.prompts has shape {shape_text(prompts)}, expected "
                                   f"[{o}, embedding size] for {o} categories")
    check_finite(path, tensors)


def check_fits(path, saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor], prefix: str) -> None:
    """The saved tensors are those of the model the recorded config builds (`own`), shape for
    shape; else one line naming the tensor and both shapes (load_state_dict's is a traceback)."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        what = f"lacks the tensor {prefix}{missing[0]}" if missing else \
            f"has an unexpected tensor {prefix}{unexpected[0]}"
        raise data.DataError(path, f"{what} for the recorded config")
    for k, v in own.items():
        if saved[k].shape != v.shape:
            raise data.DataError(path, f"tensor {prefix}{k} has shape {shape_text(saved[k])}, the recorded config "
                                       f"gives {shape_text(v)}")


# The GCN's sparse graph is rebuilt from graph.M, graph.N and the config; the stored copy must
# match it (its indices address node rows: a forged one could read out of bounds in a kernel).
GRAPH_BUFFERS = ("gcn.indptr", "gcn.indices", "gcn.values")


def model_from_checkpoint(path: str, cfg, classes, tensors) -> bacgcn.BACGCN:
    """The trained head rebuilt from a checkpoint's tensors and recorded config."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    prompts = torch.zeros_like(state["kernel.prompts"], dtype=torch.float32)
    model = build_model(cfg, prompts, len(classes), tensors["graph.M"], tensors["graph.N"],
                        float(state["logit_scale"]))
    own = model.state_dict()
    check_fits(path, state, own, "model.")
    for k, v in own.items():
        if k in GRAPH_BUFFERS and not torch.allclose(state[k].to(v.dtype), v, rtol=1e-5, atol=1e-6):
            raise data.DataError(path, f"tensor model.{k} does not match the graph rebuilt from graph.M, graph.N "
                                       "and the recorded config")
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------------------------
# Inference on images outside a dataset: tagging, similarity maps
# --------------------------------------------------------------------------------------------

HEAD_INPUTS = ("patches", "g", "gH", "gHc")


def head_inputs(feats: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """Encoder outputs -> what the head reads, rounded through bf16 first: the head was trained
    and is evaluated on the bf16 feature cache, so an image scores the same here as it does
    inside a dataset."""
    return {k: feats[k].to(torch.bfloat16).to(dtype) for k in HEAD_INPUTS}


@torch.no_grad()
def predict_images(cfg, backbone, model, dataset: data.MultiLabelImages, device: str,
                   desc: str = "tagging") -> tuple[list[str], np.ndarray]:
    """(ids, logits [n, O]) of the readable images of `dataset`, encoded in batches with a
    progress bar and no feature cache (a folder is scored once). Corrupt files are skipped
    and counted by `cache.encode_images`; the ids say which images the rows are."""
    dtype = compute_dtype(device, cfg.amp)
    model.eval()
    head = torch.compile(model) if cfg.compile and device.startswith("cuda") else model    # as in training
    dataset.transform = image_transform(backbone.image_size)
    ids: list[str] = []
    logits = []
    try:
        for batch_ids, _, feats in encode_images(
                dataset, lambda x: encode_features(backbone, x, cfg), batch_size=CACHE_BATCH, workers=cfg.workers,
                device=device, desc=desc, pin_memory=device.startswith("cuda")):
            logits.append(head(head_inputs(feats, dtype))["logits"].float().cpu())
            ids.extend(batch_ids)
    finally:
        dataset.transform = None
    return ids, torch.cat(logits).numpy() if logits else np.zeros((0, model.num_categories), dtype=np.float32)


@torch.no_grad()
def explain_image(cfg, backbone, model, image: torch.Tensor, device: str) -> dict[str, np.ndarray]:
    """What the head saw in one uint8 image [3, H, W]: logits [O], the similarity maps
    sim [N, O] over the patch grid, and `pooled` [K, O], the patches the Similarity Kernel
    pooled for each category: the kernel's own selection, not one recomputed from the returned
    sim, whose bf16 rounding on a GPU reorders near-ties the kernel told apart in fp32."""
    # Not compiled even when cfg.compile: one forward would pay the whole compile time.
    model.eval()
    x = image_transform(backbone.image_size)(image)[None].to(device)
    out = model(head_inputs(encode_features(backbone, x, cfg), compute_dtype(device, cfg.amp)), with_indices=True)
    return {"logits": out["logits"][0].float().cpu().numpy(), "sim": out["sim"][0].float().cpu().numpy(),
            "pooled": out["pooled"][0].t().cpu().numpy()}
