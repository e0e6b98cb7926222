"""BAC-GCN: config and presets, the frozen CLIP backbone wrapper, SimilarityKernel, CLIPGCN, BACGCN.

The backbone turns images into what BAC-GCN needs from a frozen CLIP:
  g        [B, E]     the usual image embedding (cls token, ln_post, proj)
  patches  [B, N, E]  text-aligned patch embeddings: the last block with self-only attention
                      (each token attends to itself), then ln_post and proj, L2-normalised
  attn     [B, N]     the [cls] attention of the last block over the patches (head mean)
and class prompt embeddings from the text tower with a prompt ensemble.

It works the same on OpenAI ViT-B/16 (open_clip `ViT-B-16-quickgelu`) and on the project's
tiny CLIP (`synthclip-vit-t8`, assets/), both built by `open_clip.create_model`.

  python bacgcn.py convert ViT-B-16.pt ViT-B-16.safetensors   # OpenAI's TorchScript archive, once
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DATASETS, DataError

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Prompt ensemble for class embeddings (a subset of CLIP's ImageNet templates that reads well
# for multi-label scenes).
PROMPT_TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.",
    "a {} in the scene.", "a photo of a small {}.", "a photo of a large {}.", "there is a {} in the photo.",
)
# Ways the last block can read out per-patch embeddings.
PATCH_READOUTS = ("self_attention", "value")
# Ways to read g^H and g^Hc (CLIPBackbone.features).
SUBSET_READOUTS = ("reencode", "last_block")
LOSSES = ("bce", "asl")
# The GCN starts at zero weights (so the untrained model is CLIP zero-shot): its activation
# needs a nonzero gradient at 0. relu has none (measured: a relu run left every GCN weight at 0).
GCN_ACTIVATIONS = ("leaky_relu", "gelu")
GRAPH_DIRECTIONS = ("row", "mlgcn")
# How CLIP weight files may be read. "auto" never runs torch.jit.load: a TorchScript archive can
# carry code, so OpenAI's archive loads only when it is asked for by name.
WEIGHT_FORMATS = ("auto", "openai-torchscript")
# What the head trains on: the caption pseudo labels (the method) or the dataset's human labels
# (the ceiling of the head on the same features: bench/ablation.py's oracle row).
TRAIN_LABELS = ("captions", "true")
# Where a run's numbers and files also go (tracking.py).
TRACKERS = ("none", "mlflow")


# ============================================================================================
# Config
# ============================================================================================

@dataclass
class BACGCNConfig:
    """Every knob of the method. The paper leaves most open; the defaults are ours."""
    # data
    dataset: str = "synthetic"          # synthetic | voc2007 (voc07) | voc2012 (voc12) | coco2014 (coco) | nuswide
    data_folder: str = "data_folder"    # the paper's release layout: <data_folder>/<dataset>/ (./ first, then the repo)
    data_root: str = ""                 # '' = <data_folder>/<dataset>; synthetic: '' = runs/world-seed{seed}
    build_world: bool = False           # synthetic: build the world at --data-root when it is missing
    captions: str = ""                  # folder with captions.json (+ re_captions.json) ('' = <data_folder>/<dataset>)
    synonyms: str = ""                  # dictionary JSON ('' = the project's for the dataset, 'paper')
    train_split: str = ""               # '' = the dataset's training split
    test_split: str = ""                # '' = the dataset's test split
    # frozen CLIP (stage 2)
    clip_model: str = "synthclip-vit-t8"   # open_clip name; OpenAI weights need ViT-B-16-quickgelu
    clip_weights: str = "assets/synthclip.safetensors"   # safetensors or a torch state dict; ./ first, then the repo
    clip_weights_format: str = "auto"   # auto (safetensors or a weights-only torch state dict) | openai-torchscript
    image_size: int = 0                 # 0 = the model's own; ViT-B/16 at 448 interpolates position embeddings
    patch_readout: str = "self_attention"  # last block: self_attention (residual + MLP kept) | value (MaskCLIP)
    h_fraction: float = 0.25            # share of patches in the most-attended set H (fixed count)
    subset_readout: str = "last_block"  # g^H, g^Hc: last_block (one encoder pass) | reencode (subset, every block)
    # Similarity Kernel (stage 3)
    topk: int = 8                       # Top-K patches pooled per category
    temperature: float = 0.05           # T of the softmax over the Top-K similarities
    # CLIP-GCN (stage 4)
    tau_a: float = 0.3                  # keep edge i->j when P(j|i) >= tau_a
    graph_direction: str = "row"        # row: i aggregates from j when P(j|i) >= tau_a | mlgcn: the transpose
    reweight_p: float = 0.25            # ML-GCN re-weighting: neighbours share p, the node keeps 1 - p
    global_edge: float = 0.5            # weight of each global<->local edge before normalisation
    gcn_layers: int = 2
    gcn_activation: str = "leaky_relu"  # leaky_relu | gelu (not relu: see GCN_ACTIVATIONS)
    # ablation switches (bench/ablation.py)
    use_local: bool = True              # local logits from the Similarity Kernel
    use_gcn: bool = True
    use_backgrounds: bool = True        # background categories as nodes, prompts and targets
    use_reso: bool = True
    # Ours, not the paper's (off by default): + a linear layer over [g, max-pooled patches] added
    # to every logit, zero-initialised (the untrained model is still CLIP zero-shot). The ablation
    # found the paper's head within 0.2-0.5 mAP of a linear probe on those inputs (README).
    linear_readout: bool = False
    # training (stage 5, 6)
    train_labels: str = "captions"      # captions | true: human class labels (the oracle; backgrounds keep captions)
    loss: str = "bce"                   # bce | asl (asymmetric loss, gamma_neg below)
    asl_gamma_neg: float = 2.0
    epochs: int = 16
    batch_size: int = 64
    lr: float = 2e-3
    prompt_lr_mult: float = 0.1         # the prompts start at CLIP's text embeddings: move them gently
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_votes: int = 1                  # captions needed for a hard pseudo label (graph, ReSO)
    # ReSO (stage 6)
    reso_epoch: int = 10                # E_reso: first epoch (0-based) that trains on crops
    reso_tau: float = 0.5               # a patch is in the region where the normalised similarity > tau
    reso_eps: float = 0.1               # crop only regions covering less than eps of the image
    reso_margin: float = 0.5            # crop box = region box grown by this fraction on each side
    reso_max_crops: int = 2             # per image, smallest regions first
    reso_gamma: float = 2.0             # crop loss weight 1 + (1 - p)^gamma grows with the error
    reso_floor_quantile: float = 0.9    # a region's peak must beat this quantile of its class's uncaptioned peaks
    # runtime
    seed: int = 0
    device: str = ""                    # '' = cuda if available else cpu
    compile: bool = False               # torch.compile the head (CUDA)
    amp: bool = True                    # bf16 autocast on CUDA (the CPU always runs fp32)
    workers: int = 2                    # image decoding workers while caching features
    cache_dir: str = ".cache/features"  # frozen-CLIP features, encoded once per image
    cache_memory_gb: float = 8.0        # cached features held in memory up to this size; larger ones stream from disk
    out: str = ""                       # run folder ('' = runs/<preset or dataset>-<time>)
    log_every: int = 50
    tracker: str = "none"               # none | mlflow (pip install -r requirements-tracking.txt; main process only)
    tracker_uri: str = ""               # mlflow tracking URI ('' = runs/mlruns, a local store `mlflow ui` reads)

    def replace(self, **kw) -> "BACGCNConfig":
        return dataclasses.replace(self, **kw)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BACGCNConfig":
        """The config of `to_json` (fields it does not know are dropped); not validated."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"not a JSON object but a {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


_VITB16 = dict(clip_model="ViT-B-16-quickgelu", clip_weights="ViT-B-16.safetensors", image_size=448, topk=16,
               temperature=0.03, batch_size=64, epochs=16, reso_epoch=10, workers=8)
PRESETS: dict[str, dict] = {
    # Read at twice the tiny CLIP's native 64 px, as the paper reads ViT-B/16 (native 224) at 448:
    # at 64 px a head on the true labels stopped ~1 mAP above zero-shot, no room for any component.
    # The training settings were chosen on world 100's validation split (bench/ablation.py
    # --validation; README): prompts at the full learning rate (x0.1 held the trained global
    # branch 4.7 mAP lower), 32 epochs (+0.6), and a ReSO floor at the 0.99 quantile (crop
    # precision 84 -> 94 %, +1.1 mAP: wrong crops cost more than missed ones). With the captions
    # calibrated to real BLIP-2 noise, ReSO regions at tau 0.6 (+0.13 mAP, +0.8 mAP_small over 0.5;
    # asymmetric loss and tau_a 0.5 gave -0.05 and +0.1).
    "synthetic-tiny": dict(image_size=128, lr=5e-3, prompt_lr_mult=1.0, epochs=32, reso_epoch=20,
                           reso_floor_quantile=0.99, reso_tau=0.6),
    "voc2007-vitb16": dict(_VITB16, dataset="voc2007"),
    "voc2012-vitb16": dict(_VITB16, dataset="voc2012"),
    "coco2014-vitb16": dict(_VITB16, dataset="coco2014", tau_a=0.4),
    "nuswide-vitb16": dict(_VITB16, dataset="nuswide", tau_a=0.4),
}


# The short names people type (`--dataset voc07`), each for its dataset's name.
DATASET_ALIASES = {"voc07": "voc2007", "voc12": "voc2012", "coco": "coco2014", "coco14": "coco2014",
                   "nus": "nuswide", "nus-wide": "nuswide"}


def preset_for(dataset: str | None) -> str:
    """The preset a run takes without --preset: a real dataset's ViT-B/16 one (the tiny CLIP
    of the proving ground knows nothing of real photos), else the proving ground's."""
    return f"{dataset}-vitb16" if f"{dataset}-vitb16" in PRESETS else "synthetic-tiny"


def parse_overrides(args: Sequence[str], base: BACGCNConfig | None = None) -> tuple[BACGCNConfig, str]:
    """`--preset=NAME` and `--key=value` (or `--key value`) overrides, checked by field type.
    `--dataset` takes the short names too and, without --preset, chooses the dataset's preset.
    Returns (config, preset name). An unknown key or a bad value is a one-line ValueError."""
    fields = {f.name: f for f in dataclasses.fields(BACGCNConfig)}
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r} (use --key=value)")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            k, v = a[2:], args[i + 1]
            i += 1
        else:
            k, v = a[2:], "true"
        k = k.replace("-", "_")
        pairs.append((k, DATASET_ALIASES.get(v.lower(), v) if k == "dataset" else v))
        i += 1
    preset = next((v for k, v in pairs if k == "preset"), None) or preset_for(
        next((v for k, v in pairs if k == "dataset"), None))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    cfg = base or BACGCNConfig(**PRESETS[preset])
    updates = {}
    for k, v in pairs:
        if k == "preset":
            continue
        if k not in fields:
            raise ValueError(f"unknown option --{k.replace('_', '-')}")
        kind = type(getattr(cfg, k))
        try:
            if kind is bool:
                if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                updates[k] = v.lower() in ("1", "true", "yes")
            else:
                updates[k] = kind(v)
        except ValueError:
            raise ValueError(f"--{k.replace('_', '-')}: expected {kind.__name__}, got {v!r}") from None
    cfg = cfg.replace(**updates)
    validate(cfg)
    return cfg, preset


# Range of every numeric config field: (test, what the value must be). A field missing here fails
# tests/test_trust_cli.py, so a new knob cannot skip validation.
NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "image_size": (lambda v: v >= 0, ">= 0 (0 = the model's own size)"),
    "h_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "topk": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v > 0, "> 0"),
    "tau_a": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "reweight_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "global_edge": (lambda v: v >= 0, ">= 0"),
    "gcn_layers": (lambda v: v >= 1, ">= 1 (--use-gcn=false turns the GCN off)"),
    "asl_gamma_neg": (lambda v: v >= 0, ">= 0"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "prompt_lr_mult": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "min_votes": (lambda v: v >= 1, ">= 1 (0 would make every category a positive)"),
    "reso_epoch": (lambda v: v >= 0, ">= 0"),
    "reso_tau": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "reso_eps": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "reso_margin": (lambda v: v >= 0, ">= 0"),
    "reso_max_crops": (lambda v: v >= 1, ">= 1 (--use-reso=false turns ReSO off)"),
    "reso_gamma": (lambda v: v >= 0, ">= 0"),
    "reso_floor_quantile": (lambda v: 0 <= v <= 1, "in [0, 1] (0: no floor)"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    "workers": (lambda v: v >= 0, ">= 0 (0 = decode in the main process)"),
    "cache_memory_gb": (lambda v: v >= 0, ">= 0 (0 = always stream the cache from disk)"),
    "log_every": (lambda v: v >= 1, ">= 1"),
}
CHOICES = {"dataset": DATASETS, "patch_readout": PATCH_READOUTS, "subset_readout": SUBSET_READOUTS,
           "loss": LOSSES, "clip_weights_format": WEIGHT_FORMATS, "train_labels": TRAIN_LABELS,
           "graph_direction": GRAPH_DIRECTIONS, "tracker": TRACKERS}
DEVICE_PATTERN = re.compile(r"(cpu|cuda(:\d+)?)?")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_problem(value, default) -> str | None:
    """What is wrong with the type of `value` for a field whose default is `default` (JSON from
    a checkpoint can hold anything), or None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a bool"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an int"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None if isinstance(value, str) else "a string"


def validate(cfg: BACGCNConfig) -> None:
    """Every field, before any work: types, ranges (finite numbers), choices and the device's
    spelling. A bad value is a one-line ValueError naming the option. What only the model can
    judge (image size, Top-K against the patch count) is checked by pipeline.build_backbone and
    pipeline.check_against_backbone; whether CUDA is there, by pipeline.resolve_device."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = _type_problem(value, f.default)
        if kind:
            raise ValueError(f"{_option(f.name)} must be {kind}, got {value!r}")
        if f.name in NUMBER_RULES:
            test, rule = NUMBER_RULES[f.name]
            if not math.isfinite(value):
                raise ValueError(f"{_option(f.name)} must be a finite number {rule}, got {value!r}")
            if not test(value):
                raise ValueError(f"{_option(f.name)} must be {rule}, got {value!r}")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            aliases = f" (or {', '.join(DATASET_ALIASES)})" if f.name == "dataset" else ""
            raise ValueError(f"{_option(f.name)} must be one of {', '.join(CHOICES[f.name])}{aliases}, got {value!r}")
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ValueError(f"--device must be '' (CUDA when there is one), cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.gcn_activation not in GCN_ACTIVATIONS:
        raise ValueError(f"gcn_activation must be one of {GCN_ACTIVATIONS}"
                         + (": relu cannot train the zero-initialised GCN (its gradient at 0 is 0, so the "
                            "weights never move)" if cfg.gcn_activation == "relu" else ""))


def _config_comments() -> tuple[dict[str, str], dict[str, str]]:
    """(trailing comment, section heading) of each config field, read from this file's source:
    the comments are the options' documentation, so --help cannot drift from them."""
    import ast
    import io
    import tokenize

    source = Path(__file__).read_text()
    comments = {}   # line -> (comment text, whether the line holds nothing else)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "BACGCNConfig")
    trailing, heading, last = {}, {}, cls.lineno
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            text, alone = comments.get(node.lineno, ("", True))
            trailing[name] = "" if alone else text
            above = [comments[k][0] for k in range(last + 1, node.lineno) if comments.get(k, ("", False))[1]]
            if above:
                heading[name] = above[-1]
            last = node.end_lineno
    return trailing, heading


def options_help() -> str:
    """The presets and every config option with its type, default and documentation."""
    trailing, heading = _config_comments()
    lines = ["presets (--preset=NAME; default: the --dataset's vitb16 preset, else synthetic-tiny):"]
    for name, values in PRESETS.items():
        lines.append(f"  {name:<17} " + (" ".join(f"{k}={v}" for k, v in values.items()) or "the defaults below"))
    lines += ["", "options (--key=value or --key value; a bare --flag means true):"]
    for f in dataclasses.fields(BACGCNConfig):
        if f.name in heading:
            lines.append(f" {heading[f.name]}")
        spec = f"{_option(f.name)} {type(f.default).__name__.upper()}"
        lines.append(f"  {spec:<28} {f.default!r:<20} {trailing[f.name]}".rstrip())
    return "\n".join(lines)


def register_local_model_configs() -> None:
    """Make the project's open_clip model configs (assets/*.json) known to open_clip."""
    import open_clip

    for cfg in ASSETS.glob("*-vit-*.json"):
        if cfg.stem not in open_clip.list_models():
            open_clip.add_model_config(cfg)


def resize_position_embedding(pos: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """[1 + old*old, W] -> [1 + new*new, W]: the [cls] row kept, the grid resized bicubically.
    Differentiable, so a vision tower can also be trained at a size it is later read at."""
    cls, grid = pos[:1], pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(new * new, -1)])


def grid_for(visual, size: int) -> tuple[int, int]:
    """(native grid side, grid side at `size` px) of an open_clip vision tower."""
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    return visual.grid_size[0], size // patch


def set_image_size(model, size: int) -> None:
    """Run the vision tower at `size` px: bicubic interpolation of the position embeddings
    (e.g. ViT-B/16 at 448: 14x14 -> 28x28 patches)."""
    v = model.visual
    old, new = grid_for(v, size)
    if new == old:
        return
    v.positional_embedding = nn.Parameter(resize_position_embedding(v.positional_embedding.data, old, new))
    v.grid_size = (new, new)
    v.image_size = (size, size)


# open_clip 3.3 logs through the module-level `logging` calls, i.e. the root logger: that is the
# logger its records come from, so the filter sits there (its level stays untouched).
OPEN_CLIP_LOGGER = logging.getLogger()


class _RandomInitWarningFilter(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" record: every
    model here is created empty and loaded (strict) right after. Nothing else is filtered."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_open_clip = f"{os.sep}open_clip{os.sep}" in record.pathname
        return not (from_open_clip and record.getMessage().startswith("No pretrained weights loaded"))


def create_clip(model_name: str, weights: str | os.PathLike | None = None, weights_format: str = "auto"):
    """An open_clip CLIP, random-init or loaded with strict=True from a local file.

    Weight files: safetensors or a weights-only torch state dict (.pt/.bin); OpenAI's TorchScript
    archive (for `*-quickgelu` OpenAI models) only with weights_format="openai-torchscript" (see
    `read_state_dict`). A file of another architecture is an error of one line that names the
    expected architecture.
    """
    import open_clip

    register_local_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {model_name!r} (OpenAI ViT-B/16 weights: ViT-B-16-quickgelu)")
    drop = _RandomInitWarningFilter()
    OPEN_CLIP_LOGGER.addFilter(drop)
    try:
        model = open_clip.create_model(model_name, pretrained=None)
    finally:
        OPEN_CLIP_LOGGER.removeFilter(drop)
    if weights is not None:
        load_strict(model, read_state_dict(weights, weights_format), weights, model_name)
    model.eval()
    return model


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source, model_name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise DataError(source, f"not a {model_name} checkpoint ({first[:160]})") from None


def weights_kind(path: str | os.PathLike) -> str:
    """What a weights file holds, judged from its bytes alone (nothing is unpickled or run):
    "safetensors", "torchscript" (a zip with TorchScript's constants.pkl) or "torch" (anything
    else: torch.load with weights_only=True decides)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":              # safetensors: a u64 header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torch"
        return "torchscript" if any(n.endswith("/constants.pkl") for n in names) else "torch"
    return "torch"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DataError(path, f"not a safetensors file ({str(e).splitlines()[0][:160]})") from None


def _load_torch(path: Path):
    import pickle
    import struct

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    # what torch.load raises on junk, truncated files and pickles that hold more than tensors
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError, KeyError, OverflowError,
            struct.error) as e:
        raise DataError(path, f"not a PyTorch state dict (torch.load with weights_only=True: {type(e).__name__})") \
            from None


def _load_torchscript(path: Path) -> dict[str, torch.Tensor]:
    import warnings

    try:
        with warnings.catch_warnings():   # torch's deprecation notice of jit.load: the user chose this format
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except (RuntimeError, ValueError) as e:
        raise DataError(path, f"not a loadable TorchScript archive ({str(e).splitlines()[0][:160]})") from None


def raw_state_dict(path: str | os.PathLike, weights_format: str = "auto") -> dict[str, torch.Tensor]:
    """The tensors of a weights file as stored (dtype kept), keys as open_clip names them.

    "auto" reads safetensors or a torch state dict through torch.load(weights_only=True) and
    refuses a TorchScript archive: torch.jit.load would run the code such an archive carries.
    "openai-torchscript" also reads OpenAI's archive (ViT-B-16.pt) with torch.jit.load."""
    path = Path(path)
    if weights_format not in WEIGHT_FORMATS:
        raise ValueError(f"--clip-weights-format must be one of {', '.join(WEIGHT_FORMATS)}, got {weights_format!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP weights not found")
    kind = weights_kind(path)
    if kind == "safetensors" or path.suffix == ".safetensors":
        return _load_safetensors(path)
    if kind == "torchscript" and weights_format != "openai-torchscript":
        raise DataError(path, "a TorchScript archive, which can carry code: pass "
                              "--clip-weights-format=openai-torchscript to load it, or convert it once with "
                              f"`python bacgcn.py convert {path} {path.with_suffix('.safetensors')}`")
    obj = _load_torchscript(path) if kind == "torchscript" else _load_torch(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise DataError(path, f"not a PyTorch state dict (it holds {'an empty ' if obj == {} else 'a '}"
                              f"{type(obj).__name__})")
    odd = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise DataError(path, f"not a PyTorch state dict (entry {odd!r} is not a tensor)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    # OpenAI archives carry three metadata entries open_clip does not have.
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return state


def read_state_dict(path: str | os.PathLike, weights_format: str = "auto") -> dict[str, torch.Tensor]:
    """`raw_state_dict` with floating tensors in fp32 (what the models are built in)."""
    state = raw_state_dict(path, weights_format)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def convert(source: str | os.PathLike, dest: str | os.PathLike, model_name: str = "ViT-B-16-quickgelu") -> int:
    """OpenAI's TorchScript archive -> a safetensors state dict (same dtypes) that `model_name`
    loads strict, checked before it is written (atomically). Returns the tensor count."""
    from safetensors.torch import save_file

    from data import atomic_write

    dest = Path(dest)
    if dest.exists():
        raise DataError(dest, "exists; remove it or choose another name")
    state = {k: v.detach().clone().contiguous() for k, v in raw_state_dict(source, "openai-torchscript").items()}
    load_strict(create_clip(model_name), {k: v.float() for k, v in state.items()}, source, model_name)
    atomic_write(dest, lambda tmp: save_file(state, str(tmp), metadata={"model": model_name,
                                                                       "converted_from": Path(source).name}))
    return len(state)


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, size, size], resized (antialiased) and CLIP-normalised."""
    x = images.float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIPBackbone(nn.Module):
    """Frozen-CLIP feature extractor (see the module docstring). Differentiable, so the tiny
    CLIP's pretraining can train its patch read-out too."""

    def __init__(self, clip: nn.Module, patch_readout: str = "self_attention"):
        super().__init__()
        if patch_readout not in PATCH_READOUTS:
            raise ValueError(f"patch_readout must be one of {PATCH_READOUTS}, got {patch_readout!r}")
        self.clip = clip
        self.visual = clip.visual
        self.patch_readout = patch_readout

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else size

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.shape[1]

    def _qkv(self, block, x):
        attn = block.attn
        w, b = attn.in_proj_weight, attn.in_proj_bias
        return F.linear(block.ln_1(x), w, b).chunk(3, dim=-1)

    def encode_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: preprocessed images [B, 3, S, S]. Returns g, patches (both L2-normalised), attn."""
        out = self._encode(x)
        return {k: out[k] for k in ("g", "patches", "attn")}

    def _encode(self, x: torch.Tensor, cls_only_g: bool = False) -> dict[str, torch.Tensor]:
        """encode_image's outputs plus what a one-pass subset read-out reuses: the last block's
        input `h` [B, T, W] and its q, k, v. `cls_only_g` computes g from the [cls] row of the
        last block alone (`cls_over_subset` with every patch), not the whole block: the patch
        read-out already runs the block's MLP on every token, so this saves a second pass
        (equal to the full block within float rounding, ~1e-7)."""
        v = self.visual
        h = v._embeds(x)
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            h = blk(h)
        last = blocks[-1]
        # [cls] attention of the last block, mean over heads.
        q, k, val = self._qkv(last, h)
        heads = last.attn.num_heads
        bsz, n_tok, width = h.shape
        qh = q.view(bsz, n_tok, heads, -1).transpose(1, 2)
        kh = k.view(bsz, n_tok, heads, -1).transpose(1, 2)
        cls_attn = torch.softmax(qh[:, :, :1] @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)
        attn = cls_attn.mean(1)[:, 0, 1:]                                     # [B, N]
        internals = {"h": h, "q": q, "k": k, "v": val}
        if cls_only_g:
            every = torch.arange(n_tok - 1, device=h.device).expand(bsz, -1)
            g = self.cls_over_subset(internals, every)
        else:
            g = F.normalize(v.ln_post(last(h)[:, 0]) @ v.proj, dim=-1)
        # Self-only attention: softmax over one key is 1, so the attention output of each
        # token is out_proj(its own value).
        own = F.linear(val, last.attn.out_proj.weight, last.attn.out_proj.bias)
        if self.patch_readout == "self_attention":
            p = h + last.ls_1(own)
            p = p + last.ls_2(last.mlp(last.ln_2(p)))
        else:  # "value": the attention output alone (MaskCLIP)
            p = own
        patches = v.ln_post(p[:, 1:]) @ v.proj
        return {"g": g, "patches": F.normalize(patches, dim=-1), "attn": attn, **internals}

    def encode_subset(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Global embedding [B, E] of the image seen through a subset of its patches only:
        [cls] + the patch tokens `keep` [B, K] (indices into the N patches), same K per image."""
        v = self.visual
        h = v._embeds(x)
        patches = h[:, 1:].gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
        h = torch.cat([h[:, :1], patches], dim=1)
        for blk in v.transformer.resblocks:
            h = blk(h)
        return F.normalize(v.ln_post(h[:, 0]) @ v.proj, dim=-1)

    def cls_over_subset(self, enc: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """One-pass subset read-out: the [cls] token through the last block when its attention
        sees only itself and the patches `keep` [B, K], from `_encode`'s h, q, k, v; the blocks
        below are shared with the full image. With every patch kept it equals g."""
        last = self.visual.transformer.resblocks[-1]
        h, q = enc["h"], enc["q"]
        bsz, _, width = h.shape
        heads = last.attn.num_heads
        tokens = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)     # [cls] + kept patches
        index = tokens[..., None].expand(-1, -1, width)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, t.shape[1], heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(split_heads(q[:, :1]), split_heads(enc["k"].gather(1, index)),
                                           split_heads(enc["v"].gather(1, index)))
        a = F.linear(a.transpose(1, 2).reshape(bsz, 1, width), last.attn.out_proj.weight, last.attn.out_proj.bias)
        c = h[:, :1] + last.ls_1(a)
        c = c + last.ls_2(last.mlp(last.ln_2(c)))
        return F.normalize(self.visual.ln_post(c[:, 0]) @ self.visual.proj, dim=-1)

    def features(self, x: torch.Tensor, h_fraction: float,
                 subset_readout: str = "last_block") -> dict[str, torch.Tensor]:
        """Everything BAC-GCN caches per image: patches P, g, g^H, g^Hc and the attention map
        (min-max normalised). H is the `h_fraction` most-attended patches, a fixed count so a
        batch stays dense; H^c is the rest. `subset_readout`: "reencode" runs [cls] + each
        subset through every block (2.2x the encoder's cost), "last_block" restricts only the
        last block's [cls] attention to it (one pass)."""
        enc = self._encode(x, cls_only_g=subset_readout == "last_block")
        attn = enc["attn"]
        lo, hi = attn.amin(1, keepdim=True), attn.amax(1, keepdim=True)
        attn = (attn - lo) / (hi - lo).clamp_min(1e-12)
        n = attn.shape[1]
        n_h = min(n - 1, max(1, round(h_fraction * n)))
        order = torch.sort(attn, dim=1, descending=True, stable=True).indices
        if subset_readout == "last_block":
            g_h, g_hc = self.cls_over_subset(enc, order[:, :n_h]), self.cls_over_subset(enc, order[:, n_h:])
        elif subset_readout == "reencode":
            g_h, g_hc = self.encode_subset(x, order[:, :n_h]), self.encode_subset(x, order[:, n_h:])
        else:
            raise ValueError(f"subset_readout must be one of {SUBSET_READOUTS}, got {subset_readout!r}")
        return {"g": enc["g"], "patches": enc["patches"], "attn": attn, "gH": g_h, "gHc": g_hc}

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    @torch.no_grad()
    def class_embeddings(self, names: Sequence[str], tokenizer, templates: Sequence[str] = PROMPT_TEMPLATES,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """[C, E] prompt-ensemble embeddings: mean of the normalised template embeddings."""
        out = []
        for name in names:
            tokens = tokenizer([t.format(name) for t in templates]).to(device)
            out.append(F.normalize(self.encode_text(tokens).mean(0), dim=-1))
        return torch.stack(out)


def tokenizer_for(model_name: str):
    import open_clip

    register_local_model_configs()
    return open_clip.get_tokenizer(model_name)


def model_config(model_name: str) -> dict:
    import open_clip

    register_local_model_configs()
    return json.loads(json.dumps(open_clip.get_model_config(model_name)))


# ============================================================================================
# Graph (stage 4 edges)
# ============================================================================================

NUM_GLOBAL_NODES = 3   # g, g^H, g^Hc


def build_adjacency(m: torch.Tensor, n: torch.Tensor, num_classes: int, cfg: BACGCNConfig) -> torch.Tensor:
    """Dense normalised adjacency [V, V] over O local nodes + the global nodes (g, g^H, g^Hc).

    Local edges come from the caption graph, ML-GCN style: node i aggregates from node j when
    P(j|i) = M_ij / N_i >= tau_a (`graph_direction="row"`; "mlgcn" takes the transpose, as
    ML-GCN's released gen_adj does; the README gives the measurement), for class<->class and
    class<->background pairs (never background<->background); each node keeps 1 - p of its
    weight and shares p among its neighbours. Every global node is joined to every local node
    (`global_edge`); all nodes have self loops; then D^-1/2 A D^-1/2.
    """
    o = m.shape[0]
    cond = torch.where(n[:, None] > 0, m / n[:, None].clamp_min(1), torch.zeros_like(m))
    edge = (cond >= cfg.tau_a).float()
    edge.fill_diagonal_(0)
    is_bg = torch.arange(o) >= num_classes
    edge[is_bg[:, None] & is_bg[None, :]] = 0
    if cfg.graph_direction == "mlgcn":
        edge = edge.t()   # ML-GCN's gen_adj propagates over A^T: i aggregates from j when P(i|j) >= tau_a
    deg = edge.sum(1, keepdim=True)
    local = torch.where(deg > 0, cfg.reweight_p * edge / deg.clamp_min(1), torch.zeros_like(edge))
    local += torch.diag(torch.where(deg[:, 0] > 0, 1 - cfg.reweight_p, 1.0))
    v = o + NUM_GLOBAL_NODES
    adj = torch.zeros(v, v)
    adj[:o, :o] = local
    adj[:o, o:] = cfg.global_edge
    adj[o:, :o] = cfg.global_edge
    adj[o:, o:] = torch.eye(NUM_GLOBAL_NODES)
    d = adj.sum(1).rsqrt()
    return d[:, None] * adj * d[None, :]


def dense_to_csr(adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = adj.nonzero(as_tuple=True)
    indptr = torch.zeros(adj.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=adj.shape[0]), 0)
    return indptr, cols, adj[rows, cols].float()


# ============================================================================================
# Trainable head: Similarity Kernel + CLIP-GCN + logits
# ============================================================================================

class SimilarityKernel(nn.Module):
    """Stage 3: prompts W [O, E] (trainable, from CLIP's text tower) -> similarity maps S and
    Top-K softmax-pooled local features L (kernels.similarity_pool)."""

    def __init__(self, prompts: torch.Tensor, topk: int, temperature: float):
        super().__init__()
        self.prompts = nn.Parameter(prompts.clone().float())
        self.topk, self.temperature = topk, temperature

    def forward(self, patches: torch.Tensor, with_indices: bool = False) -> tuple[torch.Tensor, ...]:
        """(L, S), and with `with_indices` the pooled patches [B, O, K] the kernel itself chose."""
        from kernels import similarity_pool

        w = F.normalize(self.prompts, dim=-1).to(patches.dtype)
        return similarity_pool(patches, w, min(self.topk, patches.shape[1]), self.temperature, with_indices)


class CLIPGCN(nn.Module):
    """Stage 4: GCN layers H <- act(A H W + b) + H over local and global nodes
    (kernels.gcn_propagate). W and b start at zero: the untrained GCN is the identity."""

    def __init__(self, adjacency: torch.Tensor, dim: int, layers: int, activation: str):
        super().__init__()
        from kernels.gcn_propagate import csr_plan

        indptr, indices, values = dense_to_csr(adjacency)
        self.register_buffer("indptr", indptr)
        self.register_buffer("indices", indices)
        self.register_buffer("values", values)
        # The backward's view of the graph (edge rows, the transposed CSR), made once here and
        # moved with the module: derived from the graph, so not saved in checkpoints.
        for name, tensor in zip(("edge_rows", "t_indptr", "t_indices", "t_order"),
                                csr_plan(indptr, indices, adjacency.shape[0])):
            self.register_buffer(name, tensor, persistent=False)
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(dim, dim)) for _ in range(layers)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(layers)])
        self.activation = activation

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        from kernels import gcn_propagate

        h = nodes
        for w, b in zip(self.weights, self.biases):
            h = gcn_propagate(h @ w.to(h.dtype), self.indptr, self.indices, self.values.to(h.dtype),
                              b.to(h.dtype), self.activation, h,
                              plan=(self.edge_rows, self.t_indptr, self.t_indices, self.t_order))
        return h


class BACGCN(nn.Module):
    """The trainable part of BAC-GCN over cached CLIP features.

    logit_o = gamma * s * [cos(h_g, w_o) + a_H cos(h_gH, w_o) + a_Hc cos(h_gHc, w_o)
                           + a_L cos(h_o, w_o)] + bias_o
    with s CLIP's logit scale. gamma = 1, a_* = 0, bias = 0 and the identity GCN at start, and
    the prompts are CLIP's class embeddings: the untrained model scores exactly like CLIP
    zero-shot. Outputs logits over all O categories (classes first).
    """

    def __init__(self, cfg: BACGCNConfig, prompts: torch.Tensor, num_classes: int,
                 adjacency: torch.Tensor | None, logit_scale: float):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_categories = prompts.shape[0]
        self.kernel = SimilarityKernel(prompts, cfg.topk, cfg.temperature)
        dim = prompts.shape[1]
        self.gcn = CLIPGCN(adjacency, dim, cfg.gcn_layers, cfg.gcn_activation) \
            if cfg.use_gcn and adjacency is not None else None
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.log_gamma = nn.Parameter(torch.zeros(()))
        self.branch = nn.Parameter(torch.zeros(3))            # a_H, a_Hc, a_L
        self.bias = nn.Parameter(torch.zeros(self.num_categories))
        self.readout = None
        if cfg.linear_readout:
            self.readout = nn.Linear(2 * dim, self.num_categories)
            nn.init.zeros_(self.readout.weight)
            nn.init.zeros_(self.readout.bias)

    def forward(self, feats: dict[str, torch.Tensor], with_indices: bool = False) -> dict[str, torch.Tensor]:
        """{"logits" [B, O], "sim" [B, N, O]}, and "pooled" [B, O, K] with `with_indices`."""
        patches = feats["patches"]
        local, sim, *pooled = self.kernel(patches, with_indices)
        globals_ = torch.stack([feats["g"], feats["gH"], feats["gHc"]], dim=1).to(local.dtype)
        nodes = torch.cat([local, globals_], dim=1)
        if self.gcn is not None:
            nodes = self.gcn(nodes)
        o = self.num_categories
        w = F.normalize(self.kernel.prompts, dim=-1).to(nodes.dtype)
        h = F.normalize(nodes.float(), dim=-1).to(nodes.dtype)
        cos_local = (h[:, :o] * w).sum(-1)                      # [B, O]
        cos_global = h[:, o:] @ w.t()                           # [B, 3, O]
        score = cos_global[:, 0] + self.branch[0] * cos_global[:, 1] + self.branch[1] * cos_global[:, 2]
        if self.cfg.use_local:
            score = score + self.branch[2] * cos_local
        logits = self.log_gamma.exp() * self.logit_scale * score.float() + self.bias
        if self.readout is not None:
            x = torch.cat([feats["g"], patches.amax(1)], -1).float()
            logits = logits + self.readout(F.layer_norm(x, x.shape[-1:]))     # inputs at unit scale
        return {"logits": logits, "sim": sim, **({"pooled": pooled[0]} if pooled else {})}


# ============================================================================================
# CLI
# ============================================================================================

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bacgcn.py", description="CLIP weight files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="OpenAI's TorchScript archive -> a safetensors state dict (once)",
                       description="Read OpenAI's TorchScript archive (torch.jit.load: run it on a file you trust) "
                                   "and write its weights as safetensors, which load without running any code.")
    p.add_argument("source", help="OpenAI's archive, e.g. ViT-B-16.pt")
    p.add_argument("dest", help="the safetensors file to write, e.g. ViT-B-16.safetensors")
    p.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip architecture that must load it strict")
    args = parser.parse_args(argv)
    try:
        count = convert(args.source, args.dest, args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dest}: {count} tensors; {args.model} loads it strict (--clip-weights={args.dest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
