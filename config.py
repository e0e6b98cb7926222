"""The config: every knob of BAC-GCN in one dataclass with commented defaults, the named
presets, `--key=value` overrides checked by type and range, and `--help` made from the comments.

  cfg, preset = config.parse_overrides(["--dataset=voc07", "--epochs=8"])

A run records its config in its checkpoint and run state; `BACGCNConfig.from_json` reads it
back and `validate` checks it as it checks a command line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import registry
from cache import FORMATS as CACHE_FORMATS
from cli import last_value, parse_bool, split_options

# Ways the last block can read out per-patch embeddings.
PATCH_READOUTS = ("self_attention", "value")
# Ways to read g^H and g^Hc (CLIPBackbone.features).
SUBSET_READOUTS = ("reencode", "last_block")
# hill and splc: Zhang et al. 2021, robust to missing positives (losses.py)
LOSSES = ("bce", "asl", "hill", "splc")
# Kim et al. 2022: what to do with the largest losses among the entries no caption mentions.
LARGE_LOSS_RULES = ("none", "reject", "correct")
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
    dataset: str = "synthetic"          # a dataset of the registry (registry.py; listed above) or its short name
    data_folder: str = registry.DATA_FOLDER   # the paper's layout: <data_folder>/<dataset>/ (./ first, then the repo)
    data_root: str = ""                 # '' = <data_folder>/<dataset>; synthetic: '' = runs/world-seed{seed}
    build_world: bool = False           # synthetic: build the world at --data-root when it is missing
    captions: str = ""                  # folder with captions.json (+ re_captions.json) ('' = <data_folder>/<dataset>)
    synonyms: str = ""                  # dictionary JSON ('' = the project's for the dataset, 'paper')
    classes: str = ""                   # folder: the class names, a file (one per line) or a list (cat,dog)
    labels: str = ""                    # folder: a labels CSV (eval.py --labels format) to evaluate on ('' = none)
    captioner: str = "Salesforce/blip2-opt-2.7b"   # folder: BLIP-2 (hub id or local folder) when it has no captions
    train_split: str = ""               # '' = the dataset's training split
    test_split: str = ""                # '' = the dataset's test split
    # frozen CLIP (stage 2)
    clip_model: str = "synthclip-vit-t8"   # open_clip name; OpenAI weights need ViT-B-16-quickgelu
    clip_weights: str = "assets/synthclip.safetensors"   # a name (openai: fetched once) or a file (./, then repo)
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
    gcn_layers: int = 2                 # graph convolutions over the O local + global nodes
    gcn_activation: str = "leaky_relu"  # leaky_relu | gelu (not relu: see GCN_ACTIVATIONS)
    # ablation switches (bench/ablation.py)
    use_local: bool = True              # local logits from the Similarity Kernel
    use_gcn: bool = True                # CLIP-GCN over the local features (false: the kernel alone)
    use_backgrounds: bool = True        # background categories as nodes, prompts and targets
    use_reso: bool = True               # ReSO: small regions cropped and trained from reso_epoch
    # Ours, not the paper's (off by default): + a linear layer over [g, max-pooled patches] added
    # to every logit, zero-initialised (the untrained model is still CLIP zero-shot). The ablation
    # found the paper's head within 0.2-0.5 mAP of a linear probe on those inputs (README).
    linear_readout: bool = False        # + a zero-initialised linear layer over [g, max-pooled patches]
    # The GCN lifted mAP_large and cost mAP_small (propagation from prominent companions drowns a
    # small object's own evidence): + a_B,o * cos(l_o, w_o), one zero-initialised weight per category.
    # Ours, not the paper's (off in its presets): the kernel's local logits also around the graph
    local_bypass: bool = False          # + the Similarity Kernel's pre-graph local cosine (lost on validation: README)
    # training (stage 5, 6)
    train_labels: str = "captions"      # captions | true: human class labels (the oracle; backgrounds keep captions)
    loss: str = "bce"                   # bce | asl (asymmetric loss, gamma_neg below)
    asl_gamma_neg: float = 2.0          # asl: focusing exponent of the negatives
    splc_tau: float = 0.6               # splc: an unlabelled entry scored above this is trained as a positive
    # The head starts at CLIP zero-shot, whose logits put almost every category near p = 1: Hill's
    # negative gradient vanishes there, and SPLC takes them all as positives.
    # Hill and SPLC (Zhang et al. 2021; off in the paper's presets) start after a BCE warm-up
    robust_loss_epoch: int = 1          # hill, splc: BCE before this epoch
    # Entries whose soft target is at most missing_threshold are "unmentioned"; the largest losses
    # among them are likely missing labels.
    # Missing labels (Kim et al. 2022; off in the paper's presets)
    large_loss: str = "none"            # none | reject (LL-R: drop them) | correct (LL-Ct: train them as positives)
    large_loss_delta: float = 0.002     # share of the unmentioned entries so treated grows by this per epoch
    missing_threshold: float = 0.05     # soft target at or below which an entry counts as unmentioned
    epochs: int = 16                    # passes over the training images (paper: 16)
    batch_size: int = 64                # images per step (over all processes of a torchrun job)
    lr: float = 2e-3                    # peak learning rate (AdamW), warmup then cosine to 0
    prompt_lr_mult: float = 0.1         # the prompts start at CLIP's text embeddings: move them gently
    weight_decay: float = 1e-4          # AdamW weight decay
    warmup_epochs: float = 1.0          # linear warmup of the learning rate, in epochs
    min_votes: int = 1                  # captions needed for a hard pseudo label (graph, ReSO)
    # ReSO (stage 6)
    reso_epoch: int = 10                # E_reso: first epoch (0-based) that trains on crops
    reso_tau: float = 0.5               # a patch is in the region where the normalised similarity > tau
    reso_eps: float = 0.1               # crop only regions covering less than eps of the image
    reso_margin: float = 0.5            # crop box = region box grown by this fraction on each side
    reso_max_crops: int = 2             # per image, smallest regions first
    reso_gamma: float = 2.0             # crop loss weight 1 + (1 - p)^gamma grows with the error
    reso_floor_quantile: float = 0.9    # a region's peak must beat this quantile of its class's uncaptioned peaks
    # Small regions of the classes the captions do not name are proposed where the map peaks, and kept
    # only where the frozen CLIP, on the crop alone, names that class first; a kept crop trains as a soft
    # positive and raises the image's own target for the class (the captions name under half of the
    # small objects).
    # Ours, not the paper's (off in its presets; the *-beyond presets): ReSO beyond the captions
    reso_propose: bool = False          # propose, verify and train crops of classes the captions do not name
    reso_propose_quantile: float = 0.9  # a proposal's peak must beat this quantile of its class's uncaptioned peaks
    reso_propose_peak: bool = False     # a proposal's region: only the paper's region's part connected to the peak
    reso_propose_side: float = 1.0      # a proposal's crop side at most this share of the image's (1 = any)
    reso_propose_max: int = 3           # verified crops kept per image per round (twice as many encoded to verify)
    reso_verify_min: float = 0.4        # the class's zero-shot probability on the crop (softmax over the classes)
    reso_verify_debias: bool = False    # subtract each class's mean zero-shot logit over the proposals' crops
    reso_verify_head: bool = False      # the trained head must name the class first on the crop too (two judges)
    reso_verify_backgrounds: bool = False  # that softmax over the backgrounds too (a texture crop must not pass)
    reso_evidence: float = 1.0          # the image's target of the class rises to this x the crop's probability
    # The test-time small-object pass (ours, DESIGN stage 7; off in the paper's presets): per image, the
    # classes whose map is small around its peak are cropped, encoded once and scored by the trained head;
    # a crop only raises its class's logit. Cost: test_crops encodes per image on top of the image's own.
    test_crops: int = 0                 # crops per image, highest peaks first (0 = off)
    test_crop_weight: float = 0.5       # share of a crop's logit excess over the image's that is added to it
    # runtime
    seed: int = 0                       # every random choice; the proving ground: its world too
    device: str = ""                    # '' = cuda if available else cpu
    compile: bool = False               # torch.compile the head (CUDA)
    amp: bool = True                    # bf16 autocast on CUDA (the CPU always runs fp32)
    workers: int = 2                    # image decoding workers while caching features
    output_root: str = ""               # runs/ and .cache/ go here ('' = $BACGCN_OUTPUT_ROOT, else the current folder)
    cache_dir: str = ""                 # frozen-CLIP features, encoded once ('' = <output root>/.cache/features)
    cache_format: str = "bf16"          # patch tokens cached as bf16 | int8 (a scale per token: half) | fp32
    cache_memory_gb: float = -1.0       # a split's cache up to this size (GiB) stays on the device (-1 = auto)
    out: str = ""                       # run folder ('' = <output root>/runs/<preset or dataset>-<time>)
    log_every: int = 50                 # steps between loss lines in metrics.jsonl
    tracker: str = "none"               # none | mlflow (pip install -r requirements-tracking.txt; main process only)
    tracker_uri: str = ""               # mlflow URI ('' = runs/mlflow.db, SQLite, `mlflow ui` reads it; http://HOST:PORT)

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
        # A config from before the compact cache was trained and evaluated on bf16 features: its
        # checkpoint's caches, its resume and its `--config` rerun stay in that format.
        raw = {"cache_format": "bf16", **raw}
        return cls(**{k: v for k, v in raw.items() if k in known})


_VITB16 = dict(clip_model="ViT-B-16-quickgelu", clip_weights="openai", image_size=448, topk=16,
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
    # a folder of the user's own photos: the VOC settings (the ViT-B/16 read at 448 px)
    "folder-vitb16": dict(_VITB16, dataset="folder"),
    "voc2012-vitb16": dict(_VITB16, dataset="voc2012"),
    "coco2014-vitb16": dict(_VITB16, dataset="coco2014", tau_a=0.4),
    "nuswide-vitb16": dict(_VITB16, dataset="nuswide", tau_a=0.4),
}


# Ours beyond the paper (issue 26), chosen on world 100's validation split (README): the switches
# that turn on the winning combination, in the order bench/ablation.py adds them after `+ ReSO`.
# The paper's presets leave every one off; the *-beyond presets turn them all on.
BEYOND_THE_PAPER: dict = dict(reso_propose=True, reso_propose_peak=True, reso_propose_side=0.5, test_crops=3)
# Candidates that lost there, each kept as an ablation row added to the paper's method: (row name, switches).
_PEAK_PROPOSALS = dict(reso_propose=True, reso_propose_peak=True)
LOST_CANDIDATES: tuple = (("+ peak regions, head as a second judge", dict(_PEAK_PROPOSALS, reso_verify_head=True)),
                          ("+ peak regions, debiased verification", dict(_PEAK_PROPOSALS, reso_verify_debias=True)),
                          ("+ local bypass", dict(local_bypass=True)), ("+ LL-R", dict(large_loss="reject")),
                          ("+ LL-Ct", dict(large_loss="correct")), ("+ Hill loss", dict(loss="hill")),
                          ("+ SPLC loss", dict(loss="splc")))
PRESETS.update({f"{name}-beyond": dict(values, **BEYOND_THE_PAPER) for name, values in list(PRESETS.items())})


# Presets made for a GPU (ViT-B/16 at 448 px): on a CPU one runs for hours, so a run there needs
# --device=cpu said explicitly.
GPU_PRESETS = frozenset(name for name, values in PRESETS.items() if values.get("clip_model") == _VITB16["clip_model"])
OUTPUT_ROOT_ENV = "BACGCN_OUTPUT_ROOT"   # where runs/ and .cache/ go when --output-root is not given


def output_root(cfg: "BACGCNConfig | None" = None) -> Path:
    """The one folder a run's outputs go under (runs/, .cache/): --output-root, else the
    environment's BACGCN_OUTPUT_ROOT, else the current folder; absolute."""
    given = (cfg.output_root if cfg is not None else "") or os.environ.get(OUTPUT_ROOT_ENV, "")
    return Path(given or ".").resolve()


def default_cache_dir(cfg: "BACGCNConfig | None" = None) -> Path:
    return output_root(cfg) / ".cache" / "features"


def default_run_folder(cfg: "BACGCNConfig", preset: str) -> Path:
    import time

    return output_root(cfg) / "runs" / f"{preset or cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def with_output_places(cfg: "BACGCNConfig") -> "BACGCNConfig":
    """`cfg` with its feature cache placed (absolute): the output root's unless --cache-dir."""
    return cfg.replace(cache_dir=str(Path(cfg.cache_dir).resolve() if cfg.cache_dir else default_cache_dir(cfg)))


def preset_for(dataset: str | None) -> str:
    """The preset a run takes without --preset: its dataset's entry names it (a real dataset's
    ViT-B/16 one: the tiny CLIP of the proving ground knows nothing of real photos)."""
    name = registry.canonical(dataset or BACGCNConfig.dataset)
    if name not in registry.names():
        raise ValueError(f"--dataset must be one of {dataset_choices()}, got {dataset!r}")
    entry = registry.get(name)
    if entry.preset is None:
        raise ValueError(f"--dataset={name} has no preset of its own: pass --preset=NAME "
                         f"(presets: {', '.join(PRESETS)})")
    return entry.preset


def dataset_choices() -> str:
    return f"{', '.join(registry.names())} (or {', '.join(registry.aliases())})"


def parse_overrides(args: Sequence[str], base: BACGCNConfig | None = None) -> tuple[BACGCNConfig, str]:
    """`--preset=NAME` and `--key=value` (or `--key value`) overrides, checked by field type.
    `--dataset` takes the short names too and, without --preset, chooses the dataset's preset.
    A repeated option means its last value, for the preset too. Returns (config, preset name).
    An unknown key or a bad value is a one-line ValueError."""
    return from_pairs(split_options(args), base)


def from_pairs(pairs: Sequence[tuple[str, str]], base: BACGCNConfig | None = None) -> tuple[BACGCNConfig, str]:
    """`parse_overrides` of options already split into (key, value) pairs (cli.split_options)."""
    fields = {f.name: f for f in dataclasses.fields(BACGCNConfig)}
    pairs = [(k, registry.canonical(v) if k == "dataset" else v) for k, v in pairs]
    preset = last_value(pairs, "preset") or preset_for(last_value(pairs, "dataset"))
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
            updates[k] = parse_bool(v) if kind is bool else kind(v)
        except ValueError:
            raise ValueError(f"--{k.replace('_', '-')}: expected {kind.__name__}, got {v!r}") from None
    cfg = with_output_places(cfg.replace(**updates))
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
    "splc_tau": (lambda v: 0 < v < 1, "in (0, 1)"),
    "robust_loss_epoch": (lambda v: v >= 0, ">= 0"),
    "large_loss_delta": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "missing_threshold": (lambda v: 0 <= v < 1, "in [0, 1)"),
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
    "reso_propose_quantile": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "reso_propose_side": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "reso_propose_max": (lambda v: v >= 1, ">= 1 (--reso-propose=false turns proposals off)"),
    "reso_verify_min": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "test_crops": (lambda v: v >= 0, ">= 0 (0 turns the test-time pass off)"),
    "test_crop_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "reso_evidence": (lambda v: 0 <= v <= 1, "in [0, 1] (0: the crops train, the image's targets stay)"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    "workers": (lambda v: v >= 0, ">= 0 (0 = decode in the main process)"),
    "cache_memory_gb": (lambda v: v >= 0 or v == -1, ">= 0, or -1 for a budget from the device's free memory "
                                                      "(0 = always stream the cache from disk)"),
    "log_every": (lambda v: v >= 1, ">= 1"),
}
CHOICES = {"patch_readout": PATCH_READOUTS, "subset_readout": SUBSET_READOUTS, "large_loss": LARGE_LOSS_RULES,
           "loss": LOSSES, "clip_weights_format": WEIGHT_FORMATS, "train_labels": TRAIN_LABELS,
           "graph_direction": GRAPH_DIRECTIONS, "tracker": TRACKERS, "cache_format": tuple(CACHE_FORMATS)}
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
            raise ValueError(f"{_option(f.name)} must be one of {', '.join(CHOICES[f.name])}, got {value!r}")
    if cfg.dataset not in registry.names():      # the registry's names, a dataset added at run time too
        raise ValueError(f"--dataset must be one of {dataset_choices()}, got {cfg.dataset!r}")
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
            # A comment block's last line is a section heading when it is a title, not the end of
            # a sentence that explains the fields below (those end with a full stop).
            if above and not above[-1].endswith("."):
                heading[name] = above[-1]
            last = node.end_lineno
    return trailing, heading


def options_help(preset: str | None = None) -> str:
    """The presets and every config option with its type, default (the values of `preset`, where
    one is named) and documentation."""
    trailing, heading = _config_comments()
    defaults = BACGCNConfig(**PRESETS[preset]) if preset in PRESETS else BACGCNConfig()
    lines = ["presets (--preset=NAME; default: the preset of the --dataset, listed with the datasets below):"]
    for name, values in PRESETS.items():
        lines.append(f"  {name:<17} " + (" ".join(f"{k}={v}" for k, v in values.items()) or "the defaults below"))
    lines += ["", "datasets (--dataset=NAME; short names in brackets):"]
    for entry in registry.REGISTRY.values():
        short = f" ({', '.join(entry.aliases)})" if entry.aliases else ""
        lines.append(f"  {entry.name + short:<26} splits {', '.join(entry.splits)}; trains on {entry.train_split}, "
                     f"tests on {entry.test_split}; preset {entry.preset or '(none: --preset required)'}")
    which = f"the values of the preset {preset}" if preset in PRESETS else "the defaults without a preset"
    lines += ["", f"options (--key=value or --key value; a bare --flag means true; the last of a repeated option "
                  f"wins); shown with {which}:"]
    for f in dataclasses.fields(BACGCNConfig):
        if f.name in heading:
            lines.append(f" {heading[f.name]}")
        spec = f"{_option(f.name)} {type(f.default).__name__.upper()}"
        lines.append(f"  {spec:<28} {getattr(defaults, f.name)!r:<20} {trailing[f.name]}".rstrip())
    return "\n".join(lines)

