"""What the commands share: the frozen backbone, cached features, prediction, split evaluation,
the checkpoint format, the learning-rate schedule and the run metadata.

train.py and eval.py both build on this module and never import each other, so each stays a
thin command line over one set of functions (a change to, say, the dtype rule cannot leave the
evaluation disagreeing with the training).
"""
from __future__ import annotations

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
from metrics import evaluate, size_split_map

ROOT = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = "bacgcn-1"
PREDICT_BATCH = 256          # images per forward when scoring a split (no gradients: memory is small)
CACHE_BATCH = 64             # images per encoder forward while caching features


def log(msg: str) -> None:
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
    feats: dict[str, torch.Tensor]     # patches [n, N, E], g, gH, gHc [n, E], attn [n, N] (bf16, CPU)
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
    return {"kind": kind, "clip_model": cfg.clip_model, "weights": data.file_digest(cfg.clip_weights),
            "image_size": backbone.image_size, "patch_readout": cfg.patch_readout, "h_fraction": cfg.h_fraction,
            "subset_readout": cfg.subset_readout,
            "dataset": dataset.name, "root": str(Path(cfg.data_root).resolve()),
            "ids": hashlib.sha256("\n".join(dataset.ids).encode()).hexdigest()}


def encode_features(backbone: bacgcn.CLIPBackbone, images: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """uint8 images on the device -> everything BAC-GCN caches per image."""
    x = bacgcn.preprocess(images, backbone.image_size)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda and cfg.amp):
        return backbone.features(x, cfg.h_fraction, cfg.subset_readout)


def load_or_encode(cfg, backbone, dataset, spec: dict, device: str, desc: str) -> tuple[list[str], dict]:
    """(ids, features) of `dataset` from the cache keyed by `spec`, encoding it once on a miss."""
    import time

    cache = data.FeatureCache(cfg.cache_dir, spec)
    if cache.complete:
        log(f"{desc}: feature cache hit ({cache.dir})")
        return cache.load()
    log(f"{desc}: encoding {len(dataset)} images once into {cache.dir}")
    t0 = time.time()
    ids, feats = cache.build(dataset, lambda x: encode_features(backbone, x, cfg), batch_size=CACHE_BATCH,
                             workers=cfg.workers, device=device, desc=desc, pin_memory=device.startswith("cuda"))
    seconds = max(time.time() - t0, 1e-9)
    log(f"{desc}: {len(ids)} images in {seconds:.0f} s ({len(ids) / seconds:.0f} img/s)")
    return ids, feats


def cached_features(cfg, backbone, dataset, device) -> Split:
    """The split's features, encoded once per image and read from the cache afterwards."""
    dataset.transform = image_transform(backbone.image_size)
    try:
        ids, feats = load_or_encode(cfg, backbone, dataset, feature_spec(cfg, backbone, dataset, "images"),
                                    device, dataset.name)
    finally:
        dataset.transform = None
    return Split(ids, feats, dataset)


# --------------------------------------------------------------------------------------------
# Model, prediction, evaluation
# --------------------------------------------------------------------------------------------

def build_model(cfg, prompts: torch.Tensor, num_classes: int, m, n, logit_scale: float) -> bacgcn.BACGCN:
    """BAC-GCN over the caption graph (co-occurrence counts M, N) and the given prompts."""
    adjacency = bacgcn.build_adjacency(torch.as_tensor(m).float(), torch.as_tensor(n).float(), num_classes, cfg)
    return bacgcn.BACGCN(cfg, prompts, num_classes, adjacency, logit_scale)


def batch_feats(feats: dict[str, torch.Tensor], idx: torch.Tensor, device: str, dtype) -> dict[str, torch.Tensor]:
    return {k: feats[k][idx].to(device, non_blocking=True).to(dtype) for k in ("patches", "g", "gH", "gHc")}


@torch.no_grad()
def predict(model, feats, device, dtype, batch: int = PREDICT_BATCH) -> np.ndarray:
    """Logits [n, O] of every cached image."""
    model.eval()
    logits = []
    n = feats["g"].shape[0]
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n))
        logits.append(model(batch_feats(feats, idx, device, dtype))["logits"].float().cpu())
    model.train()
    return torch.cat(logits).numpy()


def evaluate_split(cfg, logits: np.ndarray, split: Split, num_classes: int, difficult: str = "ignore") -> dict:
    """mAP, CF1, OF1 (threshold: logit 0), per-class AP; on the proving ground also the size
    rule's mAP_small / mAP_large."""
    labels = split.dataset.label_matrix()
    row = {s.id: k for k, s in enumerate(split.dataset.samples)}
    labels = labels[[row[i] for i in split.ids]]
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


def save_checkpoint(path: Path, model, cfg, classes, categories, m, n, report, preset) -> None:
    from safetensors.torch import save_file

    cfg = cfg.replace(**{k: os.path.abspath(getattr(cfg, k)) for k in RECORDED_PATHS if getattr(cfg, k)})
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["graph.M"] = torch.from_numpy(np.asarray(m, dtype=np.float32))
    tensors["graph.N"] = torch.from_numpy(np.asarray(n, dtype=np.float32))
    meta = {"format": CHECKPOINT_FORMAT, "config": cfg.to_json(), "classes": json.dumps(list(classes)),
            "categories": json.dumps(list(categories)), "metrics": json.dumps(data.json_safe(report)),
            "commit": git_commit(), "preset": preset}
    data.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


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


def _shape(t: torch.Tensor) -> str:
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
            raise data.DataError(path, f"tensor {key} has shape {_shape(tensors[key])}, expected "
                                       f"[{', '.join(map(str, shape))}] for {o} categories")
    prompts = tensors["model.kernel.prompts"]
    if prompts.dim() != 2 or prompts.shape[0] != o or prompts.shape[1] == 0:
        raise data.DataError(path, f"tensor model.kernel.prompts has shape {_shape(prompts)}, expected "
                                   f"[{o}, embedding size] for {o} categories")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise data.DataError(path, f"tensor {key} holds NaN or infinite values")


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
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"lacks the tensor model.{missing[0]}" if missing else f"has an unexpected tensor model.{unexpected[0]}"
        raise data.DataError(path, f"{what} for the recorded config")
    for k, v in own.items():
        if state[k].shape != v.shape:
            raise data.DataError(path, f"tensor model.{k} has shape {_shape(state[k])}, the recorded config "
                                       f"gives {_shape(v)}")
        if k in GRAPH_BUFFERS and not torch.allclose(state[k].to(v.dtype), v, rtol=1e-5, atol=1e-6):
            raise data.DataError(path, f"tensor model.{k} does not match the graph rebuilt from graph.M, graph.N "
                                       "and the recorded config")
    model.load_state_dict(state, strict=True)
    return model
