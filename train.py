"""Train BAC-GCN.

  python train.py                                   # the proving ground, end to end, on the CPU
  python train.py --dataset voc07                   # real data (also voc12, coco, nus), its ViT-B/16 preset
  python bacgcn.py convert ViT-B-16.pt ViT-B-16.safetensors   # OpenAI's TorchScript archive, once
  python train.py --key=value ...                   # any field of bacgcn.BACGCNConfig
  python train.py --tracker=mlflow                  # also log to mlflow (pip install -r requirements-tracking.txt)
  python train.py --help                            # every option, its type, default and meaning

Real data is looked for where the paper's release puts it (--data-folder, default data_folder/,
in the current folder, else in the repo):
  data_folder/voc2007/VOCtrainval_06-Nov-2007/VOCdevkit/VOC2007, VOCtest_06-Nov-2007/VOCdevkit/VOC2007
  data_folder/voc2012/VOC2012_train_val/VOCdevkit/VOC2012
  data_folder/coco2014/train2014, val2014, annotations/instances_{train,val}2014.json
  data_folder/nuswide/Flickr, ImageList, Groundtruth/TrainTestLabels, Concepts81.txt
  captions: data_folder/<dataset>/captions.json (+ re_captions.json), or --captions=DIR
  CLIP weights: ViT-B-16.safetensors (current folder, else the repo), or --clip-weights=FILE;
    from OpenAI's ViT-B-16.pt with the convert line above
--data-root=DIR reads one dataset from elsewhere (for VOC also one merged VOCdevkit). Each piece
that is missing is one line saying what to put where.

Stages: (1) captions -> pseudo labels and the co-occurrence graph; (2) frozen CLIP features,
cached once per image; (3) the model, which starts at CLIP zero-shot; (4) the Similarity Kernel
and CLIP-GCN trained on the soft pseudo labels, ReSO inline from epoch `reso_epoch`; (5)
evaluation on the test split against CLIP zero-shot. Writes ckpt.safetensors, metrics.jsonl
and report.json to the run folder.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

import bacgcn
import captions
import data
import pipeline
import tracking
from cache import CachedFeatures
from pipeline import Split, log

ROOT = Path(__file__).resolve().parent

# Names the text encoder should read instead of a dataset's run-together spelling.
PROMPT_SPELLING = {"tvmonitor": "tv monitor", "diningtable": "dining table", "pottedplant": "potted plant",
                   "tv": "television"}
MAX_MISSING_SHARE = 0.05   # above this share of images without captions or unreadable, warn loudly
REPORT_KEYS = ("mAP", "mAP_small", "mAP_large", "CF1", "OF1")   # the zero-shot summary of report.json
DEFAULT_SPLITS = {"synthetic": ("trainval", "test"), "voc2007": ("trainval", "test"),
                  "voc2012": ("train", "val"), "coco2014": ("train", "val"), "nuswide": ("train", "test")}
# What the paper's release puts in <data_folder>/<dataset>/, said when that folder is missing.
RELEASE_LAYOUT = {
    "voc2007": "VOCtrainval_06-Nov-2007/ and VOCtest_06-Nov-2007/ (each tar as it unpacks: VOCdevkit/VOC2007)",
    "voc2012": "VOC2012_train_val/ (the trainval tar as it unpacks: VOCdevkit/VOC2012)",
    "coco2014": "train2014/, val2014/ and annotations/instances_{train,val}2014.json",
    "nuswide": "Flickr/, ImageList/, Groundtruth/TrainTestLabels/ and Concepts81.txt",
}
OPENAI_VITB16_URL = ("https://openaipublic.azureedge.net/clip/models/"
                     "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")


class MissingPieces(ValueError):
    """What a run lacks before it can start: one line per piece, each saying what to put where."""


def here_or_in_repo(path: str) -> Path:
    """A relative path as given when it exists here, else under the repo root when it exists
    there (where the default places are: data_folder/, ViT-B-16.safetensors), else as given."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (ROOT / p).exists():
        return ROOT / p
    return p


def missing_pieces(cfg: bacgcn.BACGCNConfig) -> list[str]:
    """One line per piece a run needs and lacks (its data, captions, CLIP weights), each naming
    the place and what goes there; [] when everything is in place."""
    lines = []
    root = Path(cfg.data_root)
    if cfg.dataset != "synthetic" and not root.is_dir():
        lines.append(f"{root}: no {cfg.dataset} here: put {RELEASE_LAYOUT[cfg.dataset]} there (the paper's "
                     "layout), or pass --data-root=DIR")
    elif cfg.dataset in ("voc2007", "voc2012"):
        for split in dict.fromkeys((cfg.train_split, cfg.test_split)):
            try:
                data.voc_root(root, cfg.dataset[3:], split)
            except data.DataError as e:
                lines.append(str(e))
    captions_file = Path(cfg.captions) / "captions.json"
    if cfg.dataset != "synthetic" and not captions_file.is_file():
        lines.append(f"{captions_file}: no captions: put the paper's captions.json (and re_captions.json) for "
                     f"{cfg.dataset} there, make them with `python captions.py generate --dataset {cfg.dataset} ...`, "
                     "or pass --captions=DIR")
    weights = Path(cfg.clip_weights)
    if not weights.is_file():
        how = (f": download OpenAI's ViT-B-16.pt ({OPENAI_VITB16_URL}), then `python bacgcn.py convert ViT-B-16.pt "
               f"{weights}`, or pass --clip-weights=FILE" if cfg.clip_model == "ViT-B-16-quickgelu" else "")
        lines.append(f"{weights}: CLIP weights not found{how}")
    return lines


def resolve_paths(cfg: bacgcn.BACGCNConfig) -> bacgcn.BACGCNConfig:
    """Fill the defaults that depend on the dataset (a real one in the paper's layout under
    --data-folder); build the proving ground if absent, at its default path or where
    --build-world=true asks (a mistyped --data-root builds nothing). Every piece still missing
    is one line of MissingPieces."""
    updates = {}
    if cfg.dataset == "synthetic":
        default = ROOT / "runs" / f"world-seed{cfg.seed}"
        root = Path(cfg.data_root or default)
        if not (root / "world.json").is_file():
            if root.resolve() != default.resolve() and not cfg.build_world:
                raise data.DataError(root, "no proving-ground world here (no world.json); build one with "
                                           f"--build-world=true or `python synthetic.py build --out {root}`")
            import synthetic
            log(f"building the proving ground in {root} (once)")
            synthetic.build(root, synthetic.WorldConfig(seed=cfg.seed))
        updates["data_root"] = str(root)
        updates["captions"] = cfg.captions or str(root)
    else:
        folder = here_or_in_repo(cfg.data_folder) / cfg.dataset
        updates["data_root"] = cfg.data_root or str(folder)
        updates["captions"] = cfg.captions or str(folder)
    train, test = DEFAULT_SPLITS[cfg.dataset]
    updates["train_split"] = cfg.train_split or train
    updates["test_split"] = cfg.test_split or test
    updates["clip_weights"] = str(here_or_in_repo(cfg.clip_weights))
    cfg = cfg.replace(**updates)
    missing = missing_pieces(cfg)
    if missing:
        raise MissingPieces("\n".join(missing))
    return cfg


# --------------------------------------------------------------------------------------------
# 1. Pseudo labels and graph
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
        raise data.DataError(Path(cfg.captions) / "captions.json",
                             f"no caption id matches an image of {train_ds.name} (captions name {first!r}, the "
                             f"images are named like {train_ds.ids[0]!r})")
    if total - matched > MAX_MISSING_SHARE * total:
        log(f"WARNING: {total - matched} of {total} training images ({100 * (total - matched) / total:.0f}%) have "
            "no caption: they train as negatives of every class")


def check_features(split: Split, dataset: data.MultiLabelImages, root: str) -> None:
    """A split none of whose images could be read is an error; many skipped ones a loud warning."""
    if not split.ids:
        raise data.DataError(root, f"none of the {len(dataset)} images of {dataset.name} could be read "
                                   "(missing or corrupt; see the warnings above)")
    skipped = len(dataset) - len(split.ids)
    if skipped > MAX_MISSING_SHARE * len(dataset):
        log(f"WARNING: {skipped} of {len(dataset)} images of {dataset.name} ({100 * skipped / len(dataset):.0f}%) "
            "could not be read and are left out")


def caption_labels(cfg: bacgcn.BACGCNConfig, train_ds: data.MultiLabelImages) -> CaptionLabels:
    classes = train_ds.class_names
    if cfg.dataset == "synthetic":
        syn_path = Path(cfg.synonyms) if cfg.synonyms else Path(cfg.captions) / "synonyms.json"
    else:
        syn_path = captions.dictionary_path(cfg.dataset, cfg.synonyms or None)
    dictionary = captions.SynonymDictionary.from_json(syn_path, len(classes))
    caption_texts = captions.read_captions(cfg.captions)
    config = captions.CaptionFilterConfig(min_votes=cfg.min_votes)
    pseudo = captions.pseudo_labels(caption_texts, dictionary, classes, config, ids=train_ds.ids)
    check_captions_match(cfg, caption_texts, pseudo, train_ds)
    areas, size_rule = None, (0.0, 1.0)
    if cfg.dataset == "synthetic":   # the proving ground knows its instances' sizes
        import synthetic
        areas = data.largest_instance_area(cfg.data_root, pseudo.ids, classes)
        size_rule = (synthetic.SMALL_AREA, synthetic.LARGE_AREA)
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
    m, n = data.cooccurrence(hard[:, :num_cat])
    kind = "true" if cfg.train_labels == "true" else "pseudo"
    log(f"{kind} labels: {len(pseudo.ids)} images, {len(classes)} classes + {num_cat - len(classes)} backgrounds, "
        f"{hard[:, :len(classes)].sum(1).mean():.2f} classes per image")
    # The dictionary's own spelling reads better in a prompt than the dataset's ("dining table")
    prompt_names = [PROMPT_SPELLING.get(c, c) for c in dictionary.categories[:num_cat]]
    return CaptionLabels(classes, pseudo.categories[:num_cat], prompt_names, pseudo, m, n, quality)


# --------------------------------------------------------------------------------------------
# ReSO: crops of small pseudo-positive regions (used by stage 4)
# --------------------------------------------------------------------------------------------

def reso_regions(sim: torch.Tensor, positives: torch.Tensor, cfg) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Small regions worth a crop: [(image row, class, (r0, c0, r1, c1) patch box incl.)].

    For each pseudo-positive class o of an image, the similarity map S[:, o] is min-max
    normalised over the patches; the region is {patch: S_hat > tau}; it is kept when it covers
    less than eps of the image (the object is small). At most `reso_max_crops` per image,
    smallest first.
    """
    n = sim.shape[1]
    grid = int(round(math.sqrt(n)))
    region = pipeline.region_masks(sim, cfg.reso_tau)       # [B, N, C]
    cover = region.float().mean(1)                          # [B, C]
    out = []
    for b, c in (positives & (cover < cfg.reso_eps) & (cover > 0)).nonzero().tolist():
        out.append((b, c, pipeline.box_of_cells(region[b, :, c].nonzero()[:, 0], grid), float(cover[b, c])))
    out.sort(key=lambda t: (t[0], t[3]))
    kept, per_image = [], {}
    for b, c, box, _ in out:
        if per_image.get(b, 0) < cfg.reso_max_crops:
            per_image[b] = per_image.get(b, 0) + 1
            kept.append((b, c, box))
    return kept


# --------------------------------------------------------------------------------------------
# 4. Training: loss, ReSO crops, the epoch loop
# --------------------------------------------------------------------------------------------

def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, cfg, weight: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """BCE (or asymmetric loss) against soft targets; `mask` 0 drops an entry, `weight` scales rows."""
    logits = logits.float()
    if cfg.loss == "bce":
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    else:  # asymmetric loss (Ridnik et al.), soft targets: focusing only on the negative part
        p = torch.sigmoid(logits)
        loss = -(targets * F.logsigmoid(logits)
                 + (1 - targets) * p.pow(cfg.asl_gamma_neg) * F.logsigmoid(-logits))
    if mask is not None:
        loss = loss * mask
    if weight is not None:
        loss = loss * weight[:, None]
    denom = mask.sum() if mask is not None else torch.tensor(float(loss.numel()))
    return loss.sum() / denom.clamp_min(1)


@dataclass
class ResoCrops:
    """The ReSO crops of a run, ready to train on: row k is crop k."""
    feats: CachedFeatures            # cached features, as for images
    targets: torch.Tensor            # [n, O] its class 1, the parent's uncaptioned categories 0
    masks: torch.Tensor              # [n, O] 1 where an entry is trained
    classes: torch.Tensor            # [n] the class each crop was cut for
    found: list                      # [(image row, class, patch box)] of each crop: the run state keeps it

    def __len__(self) -> int:
        return len(self.classes)


def find_small_regions(cfg, model, split: Split, hard: torch.Tensor, num_classes: int, device: str,
                       dtype) -> list:
    """reso_regions of the pseudo-positive classes over a whole split, batch by batch (all
    similarity maps of COCO would not fit in memory), kept only where the region's peak
    similarity beats the class's noise floor: the `reso_floor_quantile` of that class's peaks
    on images whose captions do not name it (no hard pseudo label). A min-max normalised map always yields a region,
    even where the map is noise; the floor is what tells the two apart. Every process of a
    distributed job scans every image (the model is the same on all of them, so they agree on
    the crops) and encodes only its share of the crops."""
    found, peaks = [], []
    model.eval()
    step = pipeline.scoring_batch(split.feats)
    batches = [torch.arange(i, min(i + step, len(split.ids))) for i in range(0, len(split.ids), step)]
    with torch.no_grad(), closing(pipeline.prefetched([(split.feats, b) for b in batches], device, dtype)) as stream:
        for idx, x in zip(batches, stream):
            sim = model(x)["sim"][:, :, :num_classes].float().cpu()
            peaks.append(sim.amax(1))
            found += [(int(idx[0]) + b, c, box) for b, c, box in reso_regions(sim, hard[idx, :num_classes], cfg)]
    model.train()
    peaks = torch.cat(peaks)                                             # [n, C]
    unnamed = ~hard[:, :num_classes]         # the soft targets are never exactly 0 (the caption-context tie-break)
    floor = torch.stack([torch.quantile(peaks[unnamed[:, c], c], cfg.reso_floor_quantile) if unnamed[:, c].any()
                         else peaks[:, c].min() for c in range(num_classes)])
    kept = [(b, c, box) for b, c, box in found if peaks[b, c] > floor[c]]
    log(f"ReSO: {len(kept)} of {len(found)} small regions peak above their class's noise floor")
    return kept


def crop_precision(cfg, split: Split, found: list) -> float | None:
    """Share of the crops whose box holds most (>= half) of a true instance of their class,
    from the VOC-layout boxes (Annotations/); None where the dataset has no boxes."""
    if cfg.dataset not in ("synthetic", "voc2007", "voc2012") or not found:
        return None
    base = data.voc_root(cfg.data_root, 2012 if cfg.dataset == "voc2012" else 2007, cfg.train_split)
    grid = int(round(math.sqrt(split.feats.row_shapes["patches"][0])))
    names, hits = split.dataset.class_names, 0
    for row, cls, patch_box in found:
        ann = data.read_voc_annotation(base / "Annotations" / f"{split.ids[row]}.xml")
        x0, y0, x1, y1 = pipeline.crop_box(patch_box, grid, ann.width, ann.height, cfg.reso_margin)
        for o in ann.objects:
            area = max((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]), 1e-9)
            inside = max(0.0, min(x1, o.box[2]) - max(x0, o.box[0])) * max(0.0, min(y1, o.box[3]) - max(y0, o.box[1]))
            if o.name == names[cls] and inside >= 0.5 * area:
                hits += 1
                break
    return 100.0 * hits / len(found)


def build_reso_crops(cfg, backbone, train: Split, found: list, targets: torch.Tensor,
                     device: str) -> ResoCrops | None:
    """Crop the small regions `found` [(row, class, patch box)] from the original images,
    encode each crop once (cached), and return their training tensors."""
    if not found:
        return None
    feats, found = pipeline.encode_crops(cfg, backbone, train, found, "reso-crops", device)
    parents = torch.tensor([b for b, _, _ in found], dtype=torch.int64)
    cls = torch.tensor([c for _, c, _ in found], dtype=torch.int64)
    # Crop targets: its class is present; what the captions never named in the parent is absent
    # in the crop too; the parent's other positives may or may not be inside: not trained.
    crop_targets = torch.zeros(len(found), targets.shape[1])
    crop_targets[torch.arange(len(found)), cls] = 1.0
    crop_masks = (targets[parents] <= 0.05).float()
    crop_masks[torch.arange(len(found)), cls] = 1.0
    # On the device once: copied per batch from pageable memory, each step waited for the host.
    return ResoCrops(feats, crop_targets.to(device), crop_masks.to(device), cls.to(device), found)


def make_optimizer(cfg, model) -> torch.optim.Optimizer:
    """AdamW; the prompts start at CLIP's text embeddings and move `prompt_lr_mult` slower."""
    prompt_params = [model.kernel.prompts]
    other = [p for name, p in model.named_parameters() if name != "kernel.prompts"]
    return torch.optim.AdamW([{"params": other, "lr": cfg.lr},
                              {"params": prompt_params, "lr": cfg.lr * cfg.prompt_lr_mult}],
                             weight_decay=cfg.weight_decay)


def epoch_batches(cfg, num_images: int, crops: ResoCrops | None, gen: torch.Generator,
                  epoch: int) -> list[tuple[str, torch.Tensor]]:
    """This epoch's ("image" | "crop", row indices) batches in a seeded random order."""
    order = torch.randperm(num_images, generator=gen)
    batches = [("image", order[i:i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
    if crops is not None and len(crops):
        corder = torch.randperm(len(crops), generator=gen)
        batches += [("crop", corder[i:i + cfg.batch_size]) for i in range(0, len(corder), cfg.batch_size)]
        random.Random(cfg.seed + epoch).shuffle(batches)
    return batches


def batch_loss(cfg, step_fn, kind: str, idx: torch.Tensor, x: dict[str, torch.Tensor], targets: torch.Tensor,
               crops: ResoCrops | None, dtype) -> torch.Tensor:
    """Loss of one batch (`x`: its features, rows `idx` of the images or crops; `idx`, `targets`
    and the crops' tensors on the device already)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = step_fn(x)
        if kind == "image":
            return multilabel_loss(out["logits"], targets[idx], cfg)
        logits = out["logits"].float()
        cls = crops.classes[idx]
        p_own = torch.sigmoid(logits.gather(1, cls[:, None]))[:, 0].detach()
        weight = 1 + (1 - p_own).pow(cfg.reso_gamma)   # harder crops weigh more
        return multilabel_loss(logits, crops.targets[idx], cfg, weight, crops.masks[idx])


def wrap_for_training(cfg, model, device: str):
    """The module the steps call: DDP across the processes of a torchrun job (gradients
    averaged, so each process's share of a global batch counts as in one process), compiled
    on CUDA when asked."""
    step_fn = model
    if pipeline.rank_and_world()[1] > 1:
        from torch.nn.parallel import DistributedDataParallel
        step_fn = DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda")
                                          else None)
    return torch.compile(step_fn) if cfg.compile and device.startswith("cuda") else step_fn


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
    data.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=pipeline.with_digest(tensors, meta)))


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
    pipeline.check_digest(path, tensors, meta)
    try:
        cfg = bacgcn.BACGCNConfig.from_json(meta["config"])
        bacgcn.validate(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise data.DataError(path, f"unreadable run state ({e})") from None
    pipeline.check_finite(path, tensors)
    return {"config": cfg, "tensors": tensors, "meta": meta, "path": path}


def restore_state(state: dict, model, loop: Loop) -> list | None:
    """Put a saved state back into the model and the loop; returns the ReSO regions, if any.
    Tensors that do not fit the model its config builds are one line with both shapes."""
    tensors, meta, path = state["tensors"], state["meta"], state["path"]
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    pipeline.check_fits(path, weights, model.state_dict(), "model.")
    model.load_state_dict(weights, strict=True)
    params = [p for g in loop.opt.param_groups for p in g["params"]]
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            if name != "step" and (int(index) >= len(params) or value.shape != params[int(index)].shape):
                shape = pipeline.shape_text(params[int(index)]) if int(index) < len(params) else "no parameter"
                raise data.DataError(path, f"tensor {key} has shape {pipeline.shape_text(value)}, the recorded "
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
    return [(row, cls, tuple(box)) for row, cls, box in found] if found else None


def planned_steps(cfg, num_images: int, loop: Loop) -> int:
    """The steps the run will take: those taken, plus the rest of the epochs with this epoch's
    image and crop batches. The cosine must end on the last step actually taken: counting image
    batches only, the crop batches of ReSO pushed the step past the end and the last epochs
    trained at learning rate 0."""
    per_epoch = math.ceil(num_images / cfg.batch_size)
    if loop.crops is not None:
        per_epoch += math.ceil(len(loop.crops) / cfg.batch_size)
    return loop.step + (cfg.epochs - loop.epoch) * per_epoch


class MetricsLog:
    """metrics.jsonl, one JSON record a line, each record's numbers also sent to the tracker
    at `step` (the training step for losses, the epoch for per-epoch figures)."""

    def __init__(self, file, tracker: tracking.Tracker | None = None):
        self.file, self.tracker = file, tracker or tracking.Tracker()

    def record(self, values: dict, step: int | None) -> None:
        self.file.write(json.dumps(values) + "\n")
        self.file.flush()
        if step is not None:
            self.tracker.log_metrics({k: v for k, v in values.items() if k not in ("step", "epoch")}, step)


def run_epoch(cfg, loop: Loop, step_fn, train: Split, targets: torch.Tensor, device: str, dtype,
              metrics_log: MetricsLog) -> tuple[float, int]:
    """One epoch of steps: (mean loss over the processes, steps). A non-finite loss is noticed
    on the device and raised at the next log interval, naming the first bad step."""
    rank, world = pipeline.rank_and_world()
    crops = loop.crops
    batches = [(kind, idx[rank::world]) for kind, idx in epoch_batches(cfg, len(train.ids), crops, loop.gen,
                                                                       loop.epoch)]
    sources = [(train.feats if kind == "image" else crops.feats, idx) for kind, idx in batches]
    # The epoch's row indices reach the device in one copy, not one small blocking copy per step.
    on_device = pipeline.to_device_once([idx for _, idx in batches], device)
    running, first_bad = torch.zeros((), device=device), torch.full((), -1, device=device)
    # closing(): an exception (Ctrl-C) must stop the reader thread here, not when the traceback
    # lets go of the generator at interpreter exit, where a thread inside torch aborts the process.
    with closing(pipeline.prefetched(sources, device, dtype)) as stream:
        for count, ((kind, idx), x) in enumerate(zip(batches, stream), 1):
            for g, lr in zip(loop.opt.param_groups, loop.base_lr):
                g["lr"] = lr * pipeline.warmup_cosine(loop.step, loop.warmup, loop.total)
            loss = batch_loss(cfg, step_fn, kind, on_device[count - 1], x, targets, crops, dtype)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), loop.step + 1, first_bad)
            loop.opt.zero_grad(set_to_none=True)
            loss.backward()
            loop.opt.step()
            running += loss.detach()
            loop.step += 1
            if loop.step % cfg.log_every == 0 or count == len(batches):
                # A sync only at log intervals, and every process stops together: a rank that
                # raised alone left the others waiting in the next all-reduce until NCCL's timeout.
                first_bad = pipeline.max_over_processes(first_bad)
                if int(first_bad) >= 0:
                    raise NonFiniteLoss(f"the loss became NaN or infinite at step {int(first_bad)} (epoch "
                                        f"{loop.epoch + 1}); lower --lr or check the inputs")
                if loop.step % cfg.log_every == 0:
                    value = pipeline.mean_over_processes(running / count).item()   # .item() only at log intervals
                    metrics_log.record({"step": loop.step, "epoch": loop.epoch, "loss": value,
                                    "lr": loop.opt.param_groups[0]["lr"]}, loop.step)
    return pipeline.mean_over_processes(running / max(len(batches), 1)).item(), len(batches)


def train_epochs(cfg, model, backbone, train: Split, targets: torch.Tensor, hard: torch.Tensor, num_classes: int,
                 device: str, dtype, metrics_log: MetricsLog, on_epoch_end=None, resume: dict | None = None) -> dict:
    """The training loop: every epoch over the cached images, plus the ReSO crops from
    `reso_epoch` on; loss lines every `log_every` steps and per epoch in `metrics_log`;
    `on_epoch_end(loop)` after every epoch (the run saves its state there), and `resume` (read
    by `read_state`) continues a saved run exactly. In a torchrun job every process takes its
    slice of each global batch. Returns what ReSO did ({} without ReSO or after a resume past
    its epoch): {"crops", "crop_precision"}."""
    reso = {}
    opt = make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(train.ids) / cfg.batch_size)
    loop = Loop(opt, [g["lr"] for g in opt.param_groups], torch.Generator().manual_seed(cfg.seed),
                warmup=max(1, int(cfg.warmup_epochs * steps_per_epoch)), total=cfg.epochs * steps_per_epoch)
    targets = targets.to(device)         # once: batches index it on the device
    if resume is not None:
        found = restore_state(resume, model, loop)
        loop.crops = build_reso_crops(cfg, backbone, train, found, targets, device) if found else None
    step_fn = wrap_for_training(cfg, model, device)
    while loop.epoch < cfg.epochs:
        if cfg.use_reso and loop.epoch == cfg.reso_epoch:
            found = find_small_regions(cfg, model, train, hard, num_classes, device, dtype)
            loop.crops = build_reso_crops(cfg, backbone, train, found, targets, device)
            loop.total = planned_steps(cfg, len(train.ids), loop)
            precision = crop_precision(cfg, train, found)
            log(f"epoch {loop.epoch + 1}: ReSO found {len(found)} small regions to crop"
                + ("" if precision is None else f", crop precision {precision:.1f}% (true boxes)"))
            metrics_log.record({"epoch": loop.epoch, "reso_crops": len(found), "reso_crop_precision": precision},
                           loop.epoch)
            reso = {"crops": len(found), "crop_precision": precision}
        epoch_loss, count = run_epoch(cfg, loop, step_fn, train, targets, device, dtype, metrics_log)
        crops = 0 if loop.crops is None else len(loop.crops)
        metrics_log.record({"epoch": loop.epoch, "epoch_loss": epoch_loss, "crops": crops}, loop.epoch)
        log(f"epoch {loop.epoch + 1}/{cfg.epochs}: loss {epoch_loss:.4f}, {count} steps"
            + (f", {crops} ReSO crops" if cfg.use_reso and loop.epoch >= cfg.reso_epoch else ""))
        loop.epoch += 1
        if on_epoch_end is not None:
            on_epoch_end(loop)
    return reso


# --------------------------------------------------------------------------------------------
# The run: stages 1-5
# --------------------------------------------------------------------------------------------

RUN_FILES = ("ckpt.safetensors", "metrics.jsonl", "report.json", STATE_FILE, tracking.RUN_ID_FILE)


class RunStopped(RuntimeError):
    """The run stopped early (interrupted, or a non-finite loss): one line and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """A run folder holds one run: reusing one that is not empty takes --resume (continue it)
    or --overwrite (its earlier outputs are removed first, so no file mixes two runs)."""
    if resume:
        return
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise data.DataError(out_dir, "run folder is not empty: --resume continues the run there, --overwrite "
                                          "replaces it")
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
        if any(out_dir.iterdir()):
            raise data.DataError(out_dir, "--overwrite: the folder holds files train.py did not write; "
                                          "choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)


def start_run(cfg: bacgcn.BACGCNConfig, preset: str, resume: bool = False,
              overwrite: bool = False) -> tuple[bacgcn.BACGCNConfig, str]:
    """Process group, paths, device, seeds, threads and the run folder: (completed config,
    device). In a torchrun job rank 0 builds the world and names the run folder for all."""
    device = pipeline.init_distributed(cfg.device)
    _, world = pipeline.rank_and_world()
    if cfg.batch_size < world:
        raise ValueError(f"--batch-size={cfg.batch_size} is smaller than the {world} processes sharing each batch")
    if pipeline.is_main_process():
        cfg = resolve_paths(cfg)
    pipeline.barrier()
    cfg = resolve_paths(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    out_dir = Path(cfg.out or ROOT / "runs" / f"{preset or cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir = Path(pipeline.broadcast_object(str(out_dir.resolve())))
    if pipeline.is_main_process():
        prepare_run_folder(out_dir, resume, overwrite)
    pipeline.barrier()
    return cfg.replace(out=str(out_dir)), device


def stopped_note(out_dir: Path) -> str:
    if (out_dir / STATE_FILE).is_file():
        epoch = read_state(out_dir)["meta"]["epoch"]
        return f"the state after epoch {epoch} is kept: python train.py --resume {out_dir}"
    return "no epoch had ended, so there is nothing to resume"


def run(cfg: bacgcn.BACGCNConfig, preset: str = "", resume: dict | None = None, overwrite: bool = False) -> dict:
    """The run, tracked (with --tracker) from its start to its end, failed or not."""
    t_start = time.time()
    cfg, device = start_run(cfg, preset, resume is not None, overwrite)
    tracker = tracking.open_tracker(cfg, preset, Path(cfg.out), resume is not None, pipeline.is_main_process())
    status = "FAILED"
    try:
        report = train_and_evaluate(cfg, preset, resume, device, tracker, t_start)
        status = "FINISHED"
        return report
    except RunStopped as e:
        status = "KILLED" if e.code == 130 else "FAILED"
        raise
    finally:
        tracker.end(status)


def train_and_evaluate(cfg: bacgcn.BACGCNConfig, preset: str, resume: dict | None, device: str,
                       tracker: tracking.Tracker, t_start: float) -> dict:
    if cfg.use_reso and cfg.reso_epoch >= cfg.epochs:
        log(f"WARNING: ReSO starts at epoch {cfg.reso_epoch + 1} of {cfg.epochs}: it will not run "
            "(lower --reso-epoch, or --use-reso=false to say so)")
    out_dir, main_process = Path(cfg.out), pipeline.is_main_process()
    train_ds = data.load_dataset(cfg.dataset, cfg.data_root, cfg.train_split)
    test_ds = data.load_dataset(cfg.dataset, cfg.data_root, cfg.test_split)
    labels = caption_labels(cfg, train_ds)                                         # 1
    num_classes = len(labels.classes)

    backbone = pipeline.build_backbone(cfg, device)                                 # 2
    pipeline.check_against_backbone(cfg, backbone)
    prompts = backbone.class_embeddings(labels.prompt_names, bacgcn.tokenizer_for(cfg.clip_model),
                                        device=device).cpu()
    train = pipeline.cached_features(cfg, backbone, train_ds, device)
    test = pipeline.cached_features(cfg, backbone, test_ds, device)
    for split, dataset in ((train, train_ds), (test, test_ds)):
        check_features(split, dataset, cfg.data_root)
    targets, hard = labels.targets_for(train.ids, cfg.min_votes)

    logit_scale = float(backbone.clip.logit_scale.exp().item())                    # 3
    model = pipeline.build_model(cfg, prompts, num_classes, labels.m, labels.n, logit_scale).to(device)
    dtype = pipeline.compute_dtype(device, cfg.amp)
    zeroshot = pipeline.evaluate_split(cfg, pipeline.predict(model, test.feats, device, dtype), test, num_classes)
    log(f"CLIP zero-shot on {test_ds.name}: mAP {zeroshot['mAP']:.2f}")

    # Only rank 0 writes files; the others log into the void. A resumed run appends.
    metrics_path = out_dir / "metrics.jsonl" if main_process else Path(os.devnull)

    def save_after_epoch(loop: Loop) -> None:
        save_state(out_dir / STATE_FILE, model, loop, cfg, preset)

    try:
        with open(metrics_path, "a" if resume else "w") as metrics_file:
            metrics_log = MetricsLog(metrics_file, tracker)
            t_train = time.time()                                                   # 4
            reso = train_epochs(cfg, model, backbone, train, targets, hard, num_classes, device, dtype, metrics_log,
                                save_after_epoch if main_process else None, resume)
            train_s = time.time() - t_train
            logits = pipeline.predict(model, test.feats, device, dtype)             # 5
            result = pipeline.evaluate_split(cfg, logits, test, num_classes)
            metrics_log.record({"test": {k: v for k, v in result.items() if k != "AP"}}, None)
    except KeyboardInterrupt:
        raise RunStopped(130, f"interrupted; {stopped_note(out_dir)}") from None
    except NonFiniteLoss as e:
        raise RunStopped(2, f"{e}; {stopped_note(out_dir)}") from None
    except OSError as e:     # a full disk or a file-size limit under the unnamed writes of metrics.jsonl
        if e.filename is not None or e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise data.DataError(metrics_path, f"cannot be written ({e.strerror})") from None
    report = {k: result[k] for k in ("mAP", "mAP_small", "mAP_large") if k in result}
    report.update({"CF1": result["CF1"], "OF1": result["OF1"], "AP": result["AP"],
                   "zeroshot": {k: zeroshot[k] for k in REPORT_KEYS if k in zeroshot},
                   "caption_quality": labels.quality, "reso": reso, "train_seconds": round(train_s, 3),
                   "total_seconds": round(time.time() - t_start, 1),
                   "world_size": pipeline.rank_and_world()[1], "resumed": resume is not None,
                   "preset": preset, "dataset": cfg.dataset, "split": cfg.test_split, "out": str(out_dir)})
    if main_process:
        pipeline.save_checkpoint(out_dir / "ckpt.safetensors", model, cfg, labels.classes, labels.categories,
                                 labels.m, labels.n, report, preset)
        data.write_json(out_dir / "report.json", report)
        tracker.log_report(report, out_dir / "report.json")
    return report


def print_table(report: dict) -> None:
    cols = [k for k in ("mAP", "mAP_small", "mAP_large") if k in report]
    print("\n" + f"{'':<16}" + "".join(f"{c:>11}" for c in cols))
    for name, row in (("CLIP zero-shot", report["zeroshot"]), ("BAC-GCN", report)):
        print(f"{name:<16}" + "".join(f"{row[c]:>11.2f}" if row.get(c) is not None else f"{'n/a':>11}" for c in cols))


def run_options(args: list[str]) -> tuple[str | None, bool, list[str]]:
    """(--resume DIR, --overwrite, the config options): the two are about the run folder, not
    the method, so they are not config fields."""
    resume, overwrite, rest, i = None, False, [], 0
    while i < len(args):
        a = args[i]
        if a == "--overwrite":
            overwrite = True
        elif a.startswith("--resume="):
            resume = a.split("=", 1)[1]
        elif a == "--resume":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError("--resume needs the run folder to continue")
            resume, i = args[i + 1], i + 1
        else:
            rest.append(a)
        i += 1
    if resume is not None and (rest or overwrite):
        raise ValueError(f"--resume continues the run with its recorded config: drop {(rest or ['--overwrite'])[0]}")
    return resume, overwrite, rest


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--help" in args or "-h" in args:
        print(__doc__.strip() + "\n\n" + bacgcn.options_help())
        return 0
    try:
        resume_dir, overwrite, args = run_options(args)
        if resume_dir is not None:
            if (Path(resume_dir) / "ckpt.safetensors").is_file():
                raise data.DataError(resume_dir, "this run has finished (its ckpt.safetensors is written): nothing "
                                                 "to resume; train a new one with another --out")
            state = read_state(resume_dir)
            cfg, preset = state["config"].replace(out=str(Path(resume_dir).resolve())), state["meta"].get("preset", "")
        else:
            state = None
            cfg, preset = bacgcn.parse_overrides(args)
        # before any work (a world build, caption labels): a device that is not there, a run
        # folder that cannot be written
        pipeline.resolve_device(cfg.device)
        tracking.check_available(cfg.tracker)
        if cfg.out:
            data.check_writable(cfg.out, "--out", folder=True)
        data.check_writable(cfg.cache_dir, "--cache-dir", folder=True)
        report = run(cfg, preset, state, overwrite)
        if pipeline.is_main_process():
            print_table(report)
            print(f"\n{report['total_seconds']:.0f} s in all; run folder {report['out']}")
            sys.stdout.flush()       # a closed pipe shows here, not in Python's flush at exit
    except BrokenPipeError:
        return data.quiet_broken_pipe()
    except (ValueError, FileNotFoundError) as e:   # DataError is a ValueError
        for line in str(e).splitlines():      # MissingPieces: one line per piece
            print(f"error: {line}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {data.os_error_line(e)}", file=sys.stderr)
        return 2
    except RunStopped as e:
        if pipeline.is_main_process():
            print(f"stopped: {e}", file=sys.stderr)
        return e.code
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
