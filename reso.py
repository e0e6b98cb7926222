"""ReSO (Re-training for Small Objects): the small regions of a category's similarity map,
the crops of the original images around them, encoded once (cached), and the training tensors
of those crops. The region rule and the crops also serve the peers that re-encode regions
(peers.py's TagCLIP- and CDUL-style rows).

A region of category o in an image: the patches where o's similarity map, min-max normalised
over the patches, exceeds tau; it is small when it covers less than eps of the image. The paper
crops such regions of the captions' positives (pseudo-positives), upscales them to the input
size and trains on them from epoch E_reso, a hard sample weighing more the worse it is predicted.
"""
from __future__ import annotations

import math
import time
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch

import data
import registry
from cache import CachedFeatures
from pipeline import Split, compute_dtype, feature_spec, load_or_encode, log, predict, prefetched, scoring_batch

# --------------------------------------------------------------------------------------------
# Regions and crops of the original images (ReSO, and the peers that re-encode crops)
# --------------------------------------------------------------------------------------------

def region_masks(maps: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, N, C] -> bool [B, N, C]: where each image's map of each category, min-max normalised
    over its N patches, exceeds `tau` (ReSO's regions, and TagCLIP's re-identified ones)."""
    lo, hi = maps.amin(1, keepdim=True), maps.amax(1, keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12) > tau


def peak_components(region: torch.Tensor, maps: torch.Tensor, grid: int) -> torch.Tensor:
    """bool [B, N, C]: the part of each region (`region_masks`) that is connected (8-neighbour) to
    its map's peak patch. A min-max normalised map of a weak class scatters its region over the
    image, and the box of scattered patches is the whole image; the component around the peak
    is where the map points. Grown from the peak one ring of neighbours at a time, each map's
    rows packed as the bits of an int64, and only the maps still growing taken along: 64 images
    x 40 classes on a 28 x 28 grid took 0.15 s (smooth maps) to 0.85 s (noise) on two busy CPU
    cores, 4-8x less than 3 x 3 max-pooling every map until all stopped (peak_components_ref,
    which grids wider than 62 patches use)."""
    if grid > 62:
        return peak_components_ref(region, maps, grid)
    b, n, c = region.shape
    bits = 1 << torch.arange(grid, dtype=torch.int64)
    inside = (region.permute(0, 2, 1).reshape(b * c, grid, grid).long() * bits).sum(-1)   # [M, grid]: rows as bits
    peak = maps.argmax(1).reshape(-1)
    grown = torch.zeros_like(inside)
    grown[torch.arange(b * c), peak // grid] = bits[peak % grid]
    grown &= inside                                  # a flat map has an empty region: nothing grows
    active, part = torch.arange(b * c), grown
    while len(active):
        across = (part | (part << 1) | (part >> 1)) & ((1 << grid) - 1)
        step = across.clone()
        step[:, 1:] |= across[:, :-1]
        step[:, :-1] |= across[:, 1:]
        step &= inside[active]
        growing = (step != part).any(1)
        grown[active] = step
        active, part = active[growing], step[growing]
    return (grown[..., None] & bits).ne(0).reshape(b, c, n).permute(0, 2, 1)


def peak_components_ref(region: torch.Tensor, maps: torch.Tensor, grid: int) -> torch.Tensor:
    """peak_components by 3 x 3 max-pooling of every map, kept inside its region, until none grows."""
    b, n, c = region.shape
    inside = region.permute(0, 2, 1).reshape(b * c, 1, grid, grid).float()
    grown = torch.nn.functional.one_hot(maps.argmax(1), n).reshape(b * c, 1, grid, grid).float()
    for _ in range(n + 1):
        step = torch.nn.functional.max_pool2d(grown, 3, stride=1, padding=1) * inside
        if torch.equal(step, grown):
            break
        grown = step
    return grown.reshape(b, c, n).permute(0, 2, 1).bool()


def box_of_cells(cells: torch.Tensor, grid: int) -> tuple[int, int, int, int]:
    """(r0, c0, r1, c1), inclusive, of the patches `cells` (flat indices, at least one) of a grid x grid map."""
    rows, cols = cells // grid, cells % grid
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


def crop_side(patch_box: tuple[int, int, int, int], margin: float) -> float:
    """The side, in patches, of crop_box's square crop of `patch_box` before it is clipped to the image."""
    r0, c0, r1, c1 = patch_box
    return max(r1 - r0 + 1, c1 - c0 + 1) * (1 + 2 * margin)


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
                 margin: float | None = None, choose_cache=None) -> tuple[CachedFeatures, list]:
    """(features, the crops kept) of the crops `found` [(row, class, patch box, ...)] grown by
    `margin` (default: ReSO's), each encoded once (cached under `kind` and the crops' list). A
    crop whose image could not be read is dropped. ReSO and the peers that re-encode crops
    (bench/compare.py) share it. `choose_cache(cfg, spec, what) -> cfg`, where given, picks the
    cache to read and write (eval.py never writes into a checkpoint's)."""
    margin = cfg.reso_margin if margin is None else margin
    grid = int(round(math.sqrt(split.feats.row_shapes["patches"][0])))
    row = {s.id: k for k, s in enumerate(split.dataset.samples)}
    crop_ds = CropImages(split.dataset, [(row[split.ids[f[0]]], f[1], f[2]) for f in found],
                         backbone.image_size, grid, margin)
    spec = feature_spec(cfg, backbone, split.dataset, kind)
    spec.update({"crops": crop_ds.ids, "margin": margin})
    if choose_cache is not None:
        cfg = choose_cache(cfg, spec, f"{split.dataset.name}'s {kind}")
    feats = load_or_encode(cfg, backbone, crop_ds, spec, device, kind)
    encoded = set(feats.ids)
    return feats, [f for f, i in zip(found, crop_ds.ids) if i in encoded]


# --------------------------------------------------------------------------------------------
# ReSO: crops of small pseudo-positive regions (used by stage 4)
# --------------------------------------------------------------------------------------------

def reso_regions(sim: torch.Tensor, positives: torch.Tensor, cfg, limit: int | None = None,
                 around_peak: bool = False) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Small regions worth a crop: [(image row, class, (r0, c0, r1, c1) patch box incl.)].

    For each pseudo-positive class o of an image, the similarity map S[:, o] is min-max
    normalised over the patches; the region is {patch: S_hat > tau} (`around_peak`: only its
    part connected to the peak, peak_components); it is kept when it covers less than eps of
    the image (the object is small). At most `limit` (default `reso_max_crops`) per image,
    smallest first.
    """
    limit = cfg.reso_max_crops if limit is None else limit
    n = sim.shape[1]
    grid = int(round(math.sqrt(n)))
    region = region_masks(sim, cfg.reso_tau)       # [B, N, C]
    if around_peak:
        region = peak_components(region, sim, grid)
    cover = region.float().mean(1)                          # [B, C]
    out = []
    for b, c in (positives & (cover < cfg.reso_eps) & (cover > 0)).nonzero().tolist():
        out.append((b, c, box_of_cells(region[b, :, c].nonzero()[:, 0], grid), float(cover[b, c])))
    out.sort(key=lambda t: (t[0], t[3]))
    kept, per_image = [], {}
    for b, c, box, _ in out:
        if per_image.get(b, 0) < limit:
            per_image[b] = per_image.get(b, 0) + 1
            kept.append((b, c, box))
    return kept


@dataclass
class ResoCrops:
    """The ReSO crops of a run, ready to train on: row k is crop k."""
    feats: CachedFeatures            # cached features, as for images
    targets: torch.Tensor            # [n, O] its class 1 (a verified proposal: its CLIP probability), uncaptioned 0
    masks: torch.Tensor              # [n, O] 1 where an entry is trained
    classes: torch.Tensor            # [n] the class each crop was cut for
    found: list                      # [(image row, class, patch box[, probability])]: the run state keeps it

    def __len__(self) -> int:
        return len(self.classes)


def class_maps(model, split: Split, num_classes: int, device: str, dtype):
    """(first row, similarity maps [B, N, C] of the classes, fp32 on the CPU) of the head on a
    split, batch by batch (all maps of COCO would not fit in memory); the head scores in eval
    mode and is back in training mode afterwards."""
    step = scoring_batch(split.feats)
    batches = [torch.arange(i, min(i + step, len(split.ids))) for i in range(0, len(split.ids), step)]
    model.eval()
    try:
        with torch.no_grad(), closing(prefetched([(split.feats, b) for b in batches], device, dtype)) as stream:
            for idx, x in zip(batches, stream):
                yield int(idx[0]), model(x)["sim"][:, :, :num_classes].float().cpu()
    finally:
        model.train()


def find_small_regions(cfg, model, split: Split, hard: torch.Tensor, num_classes: int, device: str,
                       dtype) -> tuple[list, list]:
    """(crops, proposals). Crops: reso_regions of the pseudo-positive classes over a whole split,
    batch by batch (all similarity maps of COCO would not fit in memory), kept only where the
    region's peak similarity beats the class's noise floor: the `reso_floor_quantile` of that
    class's peaks on images whose captions do not name it (no hard pseudo label). A min-max
    normalised map always yields a region, even where the map is noise; the floor is what tells
    the two apart. Proposals (with `reso_propose`, else []): small regions of the classes the
    captions do *not* name whose peak beats the `reso_propose_quantile` floor (with
    `reso_propose_peak`, the regions around the peaks) and whose square crop is a close-up, at
    most `reso_propose_side` of the image's side (a crop of most of the image is the image again,
    which CLIP names by its background: sky passed as an aeroplane), at most twice
    `reso_propose_max` per image, highest peak first; they still need verify_proposals. Every
    process of a distributed job scans every image (the model is the same on all of them, so
    they agree on the crops) and encodes only its share of the crops."""
    found, candidates, peaks = [], [], []
    for first, sim in class_maps(model, split, num_classes, device, dtype):
        rows = slice(first, first + len(sim))
        peaks.append(sim.amax(1))
        found += [(first + b, c, box) for b, c, box in reso_regions(sim, hard[rows, :num_classes], cfg)]
        if cfg.reso_propose:
            candidates += [(first + b, c, box) for b, c, box in
                           reso_regions(sim, ~hard[rows, :num_classes], cfg, limit=num_classes,
                                        around_peak=cfg.reso_propose_peak)]
    peaks = torch.cat(peaks)                                             # [n, C]
    unnamed = ~hard[:, :num_classes]         # the soft targets are never exactly 0 (the caption-context tie-break)

    def floor(quantile: float) -> torch.Tensor:
        return torch.stack([torch.quantile(peaks[unnamed[:, c], c], quantile) if unnamed[:, c].any()
                            else peaks[:, c].min() for c in range(num_classes)])
    paper_floor = floor(cfg.reso_floor_quantile)
    kept = [(b, c, box) for b, c, box in found if peaks[b, c] > paper_floor[c]]
    log(f"ReSO: {len(kept)} of {len(found)} small regions peak above their class's noise floor")
    if not candidates:
        return kept, []
    propose_floor = floor(cfg.reso_propose_quantile)
    grid = int(round(math.sqrt(split.feats.row_shapes["patches"][0])))
    above = sorted((f for f in candidates if peaks[f[0], f[1]] > propose_floor[f[1]]
                    and min(crop_side(f[2], cfg.reso_margin), grid) <= cfg.reso_propose_side * grid),
                   key=lambda f: (f[0], -float(peaks[f[0], f[1]])))
    proposals = first_per_image(above, 2 * cfg.reso_propose_max)
    log(f"ReSO: {len(proposals)} proposals beyond the captions (of {len(candidates)} small uncaptioned regions)")
    return kept, proposals


def first_per_image(found: list, limit: int) -> list:
    """The first `limit` entries of each image (entries (row, ...), in their order)."""
    out, count = [], {}
    for f in found:
        if count.get(f[0], 0) < limit:
            count[f[0]] = count.get(f[0], 0) + 1
            out.append(f)
    return out


def verified_crops(probs: torch.Tensor, proposals: list, cfg, head_first: torch.Tensor | None = None) -> list:
    """The proposals [(row, class, box)] whose crop CLIP re-identifies on its own (TagCLIP's
    class-wise check): the class is the crop's top class, at probability >= `reso_verify_min`
    (`probs` [n, C or O]: each crop's zero-shot softmax over the classes, or over the classes
    and backgrounds with `reso_verify_backgrounds`), and, where `head_first` [n, C] (the trained
    head's logits on the crop) is given, the head's first class too. At most `reso_propose_max`
    per image, most probable first. Returns [(row, class, box, probability)]."""
    top = probs.argmax(1)
    head_top = None if head_first is None else head_first.argmax(1)
    kept = [(b, c, box, float(probs[k, c])) for k, (b, c, box) in enumerate(proposals)
            if int(top[k]) == c and float(probs[k, c]) >= cfg.reso_verify_min
            and (head_top is None or int(head_top[k]) == c)]
    kept.sort(key=lambda f: (f[0], -f[3]))
    return first_per_image(kept, cfg.reso_propose_max)


def verify_proposals(cfg, backbone, split: Split, proposals: list, text: torch.Tensor, device: str,
                     model=None) -> list:
    """Encode each proposal's crop once (cached) and keep those the frozen CLIP confirms on the
    crop alone (verified_crops), scored against CLIP's own class embeddings `text` [C or O, E], not
    the trained prompts: the check must not share the head's mistakes. With `reso_verify_head`,
    the trained head `model` must name the class first on the crop too: a second judge, whose
    mistakes are the captions' silence about small objects, which a close-up is not."""
    if not proposals:
        return []
    feats, proposals = encode_crops(cfg, backbone, split, proposals, "reso-proposals", device)
    g = torch.cat([feats.gather(torch.arange(i, min(i + 4096, len(feats))), ["g"])["g"].float()
                   for i in range(0, len(feats), 4096)])
    w = torch.nn.functional.normalize(text.float(), dim=-1)
    scale = float(backbone.clip.logit_scale.detach().exp())
    logits = scale * torch.nn.functional.normalize(g, dim=-1) @ w.t()
    if cfg.reso_verify_debias:       # close-ups are out of CLIP's distribution, and it favours some classes on them
        logits = logits - logits.mean(0)
    probs = logits.softmax(-1)
    num_classes = len(split.dataset.class_names)
    head = (torch.from_numpy(predict(model, feats, device, compute_dtype(device, cfg.amp)))[:, :num_classes]
            if cfg.reso_verify_head else None)
    return verified_crops(probs, [f[:3] for f in proposals], cfg, head)


def add_evidence(targets: torch.Tensor, found: list, cfg) -> None:
    """A verified proposal is evidence for the whole image: its class's soft target rises to at
    least `reso_evidence` times the crop's probability (in place; paper crops carry none)."""
    for f in found:
        if len(f) > 3:
            targets[f[0], f[1]] = max(float(targets[f[0], f[1]]), cfg.reso_evidence * f[3])


def crop_precision(cfg, split: Split, found: list) -> float | None:
    """Share of the crops whose box holds most (>= half) of a true instance of their class,
    from the VOC-layout boxes (Annotations/); None where the dataset has none."""
    year = registry.get(cfg.dataset).voc_year
    if year is None or not found:
        return None
    base = data.voc_root(cfg.data_root, year, cfg.train_split)
    grid = int(round(math.sqrt(split.feats.row_shapes["patches"][0])))
    names, hits = split.dataset.class_names, 0
    for row, cls, patch_box, *_ in found:
        ann = data.read_voc_annotation(base / "Annotations" / f"{split.ids[row]}.xml")
        x0, y0, x1, y1 = crop_box(patch_box, grid, ann.width, ann.height, cfg.reso_margin)
        for o in ann.objects:
            area = max((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]), 1e-9)
            inside = max(0.0, min(x1, o.box[2]) - max(x0, o.box[0])) * max(0.0, min(y1, o.box[3]) - max(y0, o.box[1]))
            if o.name == names[cls] and inside >= 0.5 * area:
                hits += 1
                break
    return 100.0 * hits / len(found)


def build_reso_crops(cfg, backbone, train: Split, found: list, targets: torch.Tensor,
                     device: str) -> ResoCrops | None:
    """Crop the small regions `found` [(row, class, patch box[, probability])] from the original
    images, encode each crop once (cached), and return their training tensors. `targets` are the
    images' caption targets, before any proposal's evidence (add_evidence)."""
    if not found:
        return None
    feats, found = encode_crops(cfg, backbone, train, found, "reso-crops", device)
    parents = torch.tensor([f[0] for f in found], dtype=torch.int64)
    cls = torch.tensor([f[1] for f in found], dtype=torch.int64)
    # Crop targets: its class is present (a verified proposal: as sure as CLIP was on the crop);
    # what the captions never named in the parent is absent in the crop too; the parent's other
    # positives may or may not be inside: not trained.
    crop_targets = torch.zeros(len(found), targets.shape[1])
    crop_targets[torch.arange(len(found)), cls] = torch.tensor([f[3] if len(f) > 3 else 1.0 for f in found])
    crop_masks = (targets[parents].cpu() <= cfg.missing_threshold).float()
    crop_masks[torch.arange(len(found)), cls] = 1.0
    # On the device once: copied per batch from pageable memory, each step waited for the host.
    return ResoCrops(feats, crop_targets.to(device), crop_masks.to(device), cls.to(device), found)


# --------------------------------------------------------------------------------------------
# The test-time small-object pass (ours, DESIGN stage 7; off unless `test_crops`)
# --------------------------------------------------------------------------------------------

def peak_crops(sim: torch.Tensor, cfg) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """[(image row, class, patch box)]: for each image, the `test_crops` classes whose region
    around the peak (peak_components of the region at `reso_tau`) is small (< `reso_eps`),
    highest peak first. No class is ruled out: at test time there are no captions."""
    grid = int(round(math.sqrt(sim.shape[1])))
    around = peak_components(region_masks(sim, cfg.reso_tau), sim, grid)
    cover = around.float().mean(1)                                       # [B, C]
    peaks = sim.amax(1).masked_fill((cover >= cfg.reso_eps) | (cover == 0), float("-inf"))   # a flat map: none
    top = peaks.topk(min(cfg.test_crops, sim.shape[2]), dim=1)
    return [(b, c, box_of_cells(around[b, :, c].nonzero()[:, 0], grid))
            for b in range(sim.shape[0]) for c, p in zip(top.indices[b].tolist(), top.values[b].tolist())
            if p != float("-inf")]


def fuse_crop_logits(logits: np.ndarray, found: list, crop_logits: np.ndarray, weight: float) -> np.ndarray:
    """A copy of `logits` [n, O] in which crop k of `found` [(row, class, box)] raises its image's
    logit of its class by `weight` of the crop's excess over it, and never lowers it."""
    out = logits.copy()
    for k, (row, cls, _) in enumerate(found):
        out[row, cls] += weight * max(0.0, float(crop_logits[k, cls] - logits[row, cls]))
    return out


def small_object_pass(cfg, model, backbone, split: Split, logits: np.ndarray, device: str,
                      choose_cache=None) -> tuple[np.ndarray, dict]:
    """(logits, what it did) after the test-time pass: the crops of `peak_crops` are cut from the
    original images, encoded once (cached; `choose_cache` as encode_crops') and scored by the
    trained head, which ReSO taught close-ups; a crop can only raise its class's logit, by
    `test_crop_weight` of its excess over the image's own. `logits` [n, O] are the head's on the
    split; returned unchanged when the pass is off."""
    if not cfg.test_crops:
        return logits, {}
    dtype, found = compute_dtype(device, cfg.amp), []
    for first, sim in class_maps(model, split, len(split.dataset.class_names), device, dtype):
        found += [(first + b, c, box) for b, c, box in peak_crops(sim, cfg)]
    t_encode = time.time()
    feats, found = encode_crops(cfg, backbone, split, found, "test-crops", device, choose_cache=choose_cache)
    out = fuse_crop_logits(logits, found, predict(model, feats, device, dtype), cfg.test_crop_weight)
    log(f"test-time pass: {len(found)} crops of small regions encoded and scored in {time.time() - t_encode:.1f} s")
    return out, {"crops": len(found), "seconds": round(time.time() - t_encode, 2)}
