"""The other annotation-free multi-label methods, on this project's cached CLIP features.

Each peer reads what BAC-GCN reads (the frozen CLIP's text-aligned patches P [N, E], global
embedding g [E], prompt-ensemble text embeddings T [C, E], all L2-normalised, and CLIP's logit
scale s), so that a comparison measures the methods, not their backbones, resolutions or
prompts. Crops any peer re-encodes go through the feature cache (`reso.encode_crops`), as
ReSO's do. Each function names its paper, the equations it implements and where it deviates.
`bench/compare.py` runs them side by side; the trainer never imports this file.

  zero_shot        CLIP: s * cos(g, T_c)
  tagclip          TagCLIP (Lin et al., AAAI 2024), training-free, local-to-global
  piaa             PIAA (Wang et al., ICML 2026), training-free, patch-level visual classifier
  cdul             CDUL (Abdelfattah et al., ICCV 2023): crop-aggregated CLIP pseudo labels, then a
                   classifier trained with label updates
  linear_probe     the floor of every ablation: one linear layer on [g, max-pooled P]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

import reso
from cache import CachedFeatures
from pipeline import Split

CHUNK = 256   # images per read of the cache: patches of a whole split need not fit in memory


@dataclass
class Context:
    """What every peer may read: the run's config, the frozen backbone (for crops), the splits'
    cached features, T [C, E] and the logit scale."""
    cfg: object
    backbone: object
    train: Split
    test: Split
    text: torch.Tensor
    scale: float
    device: str = "cpu"


def chunks(feats: CachedFeatures, keys: tuple[str, ...], chunk: int = CHUNK) -> Iterator[dict[str, torch.Tensor]]:
    """The cached rows in order, `chunk` at a time, as fp32 tensors."""
    for start in range(0, len(feats), chunk):
        part = feats.gather(np.arange(start, min(start + chunk, len(feats))), list(keys))
        yield {k: part[k].float() for k in keys}


# ============================================================================================
# CLIP zero-shot
# ============================================================================================

def zero_shot(feats: CachedFeatures, text: torch.Tensor, scale: float) -> np.ndarray:
    """[n, C] logits s * cos(g, T_c): the global embedding against the prompt ensemble."""
    return torch.cat([scale * x["g"] @ text.t() for x in chunks(feats, ("g",))]).numpy()


def global_softmax(feats: CachedFeatures, text: torch.Tensor, scale: float) -> torch.Tensor:
    """[n, C] softmax_c(s * g . T_c): CLIP's single-label reading of each row (image or crop)."""
    return torch.softmax(torch.from_numpy(zero_shot(feats, text, scale)), dim=-1)


# ============================================================================================
# TagCLIP-style
# ============================================================================================

@dataclass
class TagCLIPConfig:
    """Settings chosen on world 100's validation split (bench/compare.py --validation --sweep,
    one at a time: mAP 77.71 at the first guesses, 77.85 with tau 0.7, 77.99 with no margin,
    78.01 with both; w 0.25 / 0.75 within 0.1)."""
    global_weight: float = 0.5     # w in (1 - w) * local + w * global
    crops_per_image: int = 3       # R: the classes re-identified per image, highest fused score first
    region_tau: float = 0.7        # a class's region: patches whose min-max normalised probability exceeds this
    crop_margin: float = 0.0       # the crop box grows by this share of its size on each side
    threshold: float = 0.29        # CF1 / OF1: predicted where the final score exceeds this (best OF1 there)


def tagclip_local_global(feats: CachedFeatures, text: torch.Tensor, scale: float,
                         cfg: TagCLIPConfig) -> tuple[torch.Tensor, list[tuple[int, int, tuple]]]:
    """TagCLIP's first two stages: (1) coarse patch classification, p_n = softmax_c(s * P_n . T_c)
    per patch; local_c = max_n p_n,c; (2) fused with the global softmax_c(s * g . T_c):
    (1 - w) * local + w * global. Returns the fused scores [n, C] and, for the top R classes of
    each image, the patch box (r0, c0, r1, c1) of its region {n : p_hat_n,c > tau} to re-identify.

    Deviations: the paper refines patch classification with dual-masking attention over CLIP's
    last layers; here the patches are the text-aligned read-out the trainer caches (self-only
    attention in the last block, the same trick in one pass)."""
    fused, regions, row0 = [], [], 0
    for x in chunks(feats, ("g", "patches")):
        probs = torch.softmax(scale * x["patches"] @ text.t(), dim=-1)          # [b, N, C]
        local = probs.amax(1)
        glob = torch.softmax(scale * x["g"] @ text.t(), dim=-1)
        f = (1 - cfg.global_weight) * local + cfg.global_weight * glob
        fused.append(f)
        grid = int(round(probs.shape[1] ** 0.5))
        inside = reso.region_masks(probs, cfg.region_tau)
        top = f.topk(min(cfg.crops_per_image, f.shape[1]), dim=1).indices
        for b, classes in enumerate(top.tolist()):
            for cls in classes:
                cells = inside[b, :, cls].nonzero()[:, 0]
                if len(cells):          # empty only where the class's map is flat
                    regions.append((row0 + b, cls, reso.box_of_cells(cells, grid)))
        row0 += len(f)
    return torch.cat(fused), regions


def tagclip(ctx: Context, cfg: TagCLIPConfig = TagCLIPConfig()) -> np.ndarray:
    """TagCLIP-style scores [n_test, C], training-free.

    (3) Class-wise re-identification: each region of `tagclip_local_global` is cropped from the
    original image, encoded alone (through the feature cache, as ReSO's crops) and classified
    globally; the class's final score is the mean of its fused score and the crop's
    softmax_c(s * g_crop . T_c). Deviation: only the top R classes of an image are re-identified
    (the paper re-identifies every class its first stages tag), which bounds the crops to R per image."""
    fused, regions = tagclip_local_global(ctx.test.feats, ctx.text, ctx.scale, cfg)
    if not regions:
        return fused.numpy()
    crops, kept = reso.encode_crops(ctx.cfg, ctx.backbone, ctx.test, regions, "tagclip-crops", ctx.device,
                                        margin=cfg.crop_margin)
    crop_probs = global_softmax(crops, ctx.text, ctx.scale)
    final = fused.clone()
    for k, (row, cls, _) in enumerate(kept):
        final[row, cls] = 0.5 * (fused[row, cls] + crop_probs[k, cls])
    return final.numpy()


# ============================================================================================
# PIAA-style
# ============================================================================================

@dataclass
class PIAAConfig:
    """Settings chosen on world 100's validation split (bench/compare.py --validation --sweep,
    one at a time: mAP 77.88 at the first guesses; lambda 0.5 78.38 (0: 77.35, 2: 76.45), M 100
    78.02; both 78.40; K 1 / 16 and gamma 0.5 / 2 lower or within 0.1)."""
    patches_per_class: int = 100   # M: the most confident patches of each class that the classifier is fit on
    shrinkage: float = 0.1         # Sigma + shrinkage * mean(diag Sigma) * I: a well-posed inverse
    visual_weight: float = 0.5     # lambda in z = text + lambda * visual, per patch (both standardised)
    topk: int = 4                  # K: a class's patch-level score is the mean of its K highest z
    global_weight: float = 1.0     # gamma: + gamma * s * cos(g, T_c), standardised
    threshold: float = 3.6         # CF1 / OF1: the final score's decision threshold (best OF1 there)


def piaa_visual_classifier(feats: CachedFeatures, text: torch.Tensor, scale: float,
                           cfg: PIAAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PIAA's patch-based visual classifier learning (PVCL), without a label or a gradient.

    Every training patch is classified by text, p_n = softmax_c(s * P_n . T_c); its entropy
    H_n = -sum_c p_n,c log p_n,c says how sure that is. The M patches of lowest entropy among
    those whose argmax is c represent class c. Gaussian discriminant analysis on them: class
    means mu_c, one shared covariance Sigma (shrunk toward the identity), hence the linear
    classifier w_c = Sigma^-1 mu_c, b_c = -1/2 mu_c . Sigma^-1 mu_c. Returns W [E, C], b [C].
    Deviation: equal class priors (the paper's GDA may weight them by the selected counts)."""
    num_classes, width = text.shape
    best_h = torch.full((num_classes, 0), 0.0)
    best_x = torch.zeros(num_classes, 0, width)
    for x in chunks(feats, ("patches",)):
        p = x["patches"].reshape(-1, width)
        probs = torch.softmax(scale * p @ text.t(), dim=-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        owner = probs.argmax(-1)
        hs, xs = [], []
        for c in range(num_classes):
            mine = (owner == c).nonzero()[:, 0]
            h = torch.cat([best_h[c], entropy[mine]])
            pool = torch.cat([best_x[c], p[mine]])
            keep = h.topk(min(cfg.patches_per_class, len(h)), largest=False).indices
            hs.append(h[keep])
            xs.append(pool[keep])
        size = max(len(h) for h in hs)
        best_h = torch.stack([torch.cat([h, h.new_full((size - len(h),), float("inf"))]) for h in hs])
        best_x = torch.stack([torch.cat([v, v.new_zeros(size - len(v), width)]) for v in xs])
    valid = torch.isfinite(best_h)                                   # [C, M]
    counts = valid.sum(1).clamp_min(1)
    means = (best_x * valid[..., None]).sum(1) / counts[:, None]     # [C, E]
    means = torch.where(valid.any(1, keepdim=True), means, text)     # a class no patch chose: its text
    centred = (best_x - means[:, None]) * valid[..., None]
    sigma = torch.einsum("cme,cmf->ef", centred, centred) / max(int(valid.sum()) - 1, 1)
    sigma = sigma + cfg.shrinkage * sigma.diagonal().mean().clamp_min(1e-8) * torch.eye(width)
    w = torch.linalg.solve(sigma.double(), means.t().double()).float()   # [E, C]
    b = -0.5 * (means * w.t()).sum(1)
    return w, b


def piaa(ctx: Context, cfg: PIAAConfig = PIAAConfig()) -> np.ndarray:
    """PIAA-style scores [n_test, C], training-free.

    Patch-level inference: z_n,c = t_n,c + lambda * v_n,c with t = s * P . T (text) and v = P W + b
    (the visual classifier of `piaa_visual_classifier`), each standardised (mean and spread over
    the first training images' patches). Adaptive aggregation: a class's score is the mean of its
    K highest z_n,c (max-pooling of the strongest responses, robust to one noisy patch), plus
    gamma times the standardised global logit s * cos(g, T_c). Deviations: the paper's semantic
    disentanglement is the trainer's text-aligned patch read-out; its aggregation weights are a
    fixed K and gamma here."""
    w, b = piaa_visual_classifier(ctx.train.feats, ctx.text, ctx.scale, cfg)

    def logits(x):
        return ctx.scale * x["patches"] @ ctx.text.t(), x["patches"] @ w + b, ctx.scale * x["g"] @ ctx.text.t()

    sample = logits(next(chunks(ctx.train.feats, ("g", "patches"))))
    stats = [(t.mean(), t.std().clamp_min(1e-8)) for t in sample]
    out = []
    for x in chunks(ctx.test.feats, ("g", "patches")):
        (t, v, g) = [(t - m) / sd for t, (m, sd) in zip(logits(x), stats)]
        z = t + cfg.visual_weight * v                                          # [b, N, C]
        out.append(z.topk(min(cfg.topk, z.shape[1]), dim=1).values.mean(1) + cfg.global_weight * g)
    return torch.cat(out).numpy()


# ============================================================================================
# The linear floor, and CDUL-style
# ============================================================================================

@dataclass(frozen=True)
class ProbeConfig:
    """The linear probe's fit (BCE, AdamW, one-cycle lr, standardised inputs). Chosen on the
    validation split of world 100 (see README): 100 epochs at lr 1e-2 beat 60 at 3e-3 by 0.6 mAP;
    more of either gave nothing."""
    epochs: int = 100
    batch: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-2
    seed: int = 0


def probe_inputs(feats: CachedFeatures, chunk: int = 512) -> torch.Tensor:
    """[n, 2E]: the global embedding g and the max over patches, read from the cache in chunks."""
    return torch.cat([torch.cat([x["g"], x["patches"].amax(1)], 1) for x in chunks(feats, ("g", "patches"), chunk)])


def fit_linear(x_train: torch.Tensor, y_train: torch.Tensor, cfg: ProbeConfig = ProbeConfig(),
               label_update: float = 0.0) -> tuple[torch.nn.Module, torch.Tensor]:
    """One linear layer fit with BCE on (soft) targets y_train over standardised inputs; with
    `label_update` psi > 0, after every epoch the targets move toward the classifier,
    y <- (1 - psi) y + psi sigmoid(f(x)). Returns (a module mapping raw inputs to logits, the
    final targets)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    head = torch.nn.Linear(x_train.shape[1], y_train.shape[1])
    z = (x_train - mean) / std
    y = y_train.clone()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(z) // cfg.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(z), generator=gen).split(cfg.batch):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        if label_update > 0:
            with torch.no_grad():
                y = (1 - label_update) * y + label_update * torch.sigmoid(head(z))
    model = torch.nn.Sequential(_Standardise(mean, std), head).eval()
    return model, y


class _Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                 cfg: ProbeConfig = ProbeConfig()) -> np.ndarray:
    """Test logits of one linear layer fit with BCE on (soft) targets y_train."""
    model, _ = fit_linear(x_train, y_train, cfg)
    with torch.no_grad():
        return model(x_test).numpy()


@dataclass
class CDULConfig:
    """Settings chosen on world 100's validation split (bench/compare.py --validation --sweep):
    the label step psi at 0 / 0.01 / 0.03 / 0.1 / 0.3 gave mAP 77.40 / 77.56 / 77.50 / 76.79 / 74.52
    (the CLIP labels it starts from are weaker than the classifier's own drift can fix)."""
    grid: int = 2                  # each training image is cut into grid x grid crops, each encoded once
    label_update: float = 0.01     # psi: the labels' step toward the classifier after each epoch
    probe: ProbeConfig = ProbeConfig()


def cdul_initial_labels(ctx: Context, cfg: CDULConfig) -> torch.Tensor:
    """CDUL's global-local aggregation of CLIP similarities, the initial pseudo labels [n_train, C]:
    s^g = softmax_c(s * g . T_c) of the whole image, s^k the same of each of its grid x grid
    crops (encoded alone, through the feature cache); local_c = max_k s^k_c; y0 = (s^g + local) / 2.
    Deviation: CDUL aggregates crop scores with a learned-free rule mixing max and mean; the max
    alone is used here (small objects live in one crop)."""
    n_patches = ctx.train.feats.row_shapes["patches"][0]
    grid = int(round(n_patches ** 0.5))
    edges = np.linspace(0, grid, cfg.grid + 1).round().astype(int)
    cells = [(int(edges[i]), int(edges[j]), int(edges[i + 1]) - 1, int(edges[j + 1]) - 1)
             for i in range(cfg.grid) for j in range(cfg.grid)]
    crops_wanted = [(row, -1, cell) for row in range(len(ctx.train.ids)) for cell in cells]
    crops, kept = reso.encode_crops(ctx.cfg, ctx.backbone, ctx.train, crops_wanted, "cdul-crops", ctx.device,
                                        margin=0.0)
    glob = global_softmax(ctx.train.feats, ctx.text, ctx.scale)
    crop_probs = global_softmax(crops, ctx.text, ctx.scale)
    local = torch.zeros_like(glob)
    rows = torch.tensor([row for row, _, _ in kept], dtype=torch.long)
    local.scatter_reduce_(0, rows[:, None].expand_as(crop_probs), crop_probs, "amax", include_self=True)
    return 0.5 * (glob + local)


def cdul(ctx: Context, cfg: CDULConfig = CDULConfig()) -> np.ndarray:
    """CDUL-style test logits [n_test, C]: a classifier on the frozen features ([g, max-pooled P],
    the linear probe's inputs) trained on the initial pseudo labels of `cdul_initial_labels`,
    which move toward its predictions after every epoch (CDUL's gradient-alignment label update,
    y <- (1 - psi) y + psi sigmoid(f(x))). Deviation: CDUL trains a whole network end to end;
    here the frozen features carry a linear layer, as every row of the comparison keeps CLIP frozen."""
    y0 = cdul_initial_labels(ctx, cfg)
    model, _ = fit_linear(probe_inputs(ctx.train.feats), y0, cfg.probe, cfg.label_update)
    with torch.no_grad():
        return model(probe_inputs(ctx.test.feats)).numpy()
