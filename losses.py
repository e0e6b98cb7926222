"""Multi-label losses for pseudo labels that miss positives: what the captions never mention is
not known to be absent (they name under half of the small objects).

  loss = elementwise(logits, targets, cfg)            # [B, O], before any mask or mean
  loss, mask = large_loss(logits, targets, cfg, rate)  # LL-R / LL-Ct on the unmentioned entries

Its own file because these are pure functions of (logits, targets, settings), each checked
against a hand-computed case (tests/test_missing_labels.py), and because train.py is capped at 500
lines with its loop meant to be read top to bottom. Implemented from the papers' definitions:
- asymmetric loss, negative focusing only (Ridnik et al., ICCV 2021);
- Hill and SPLC (Zhang et al., "Simple and Robust Loss Design for Multi-Label Learning with
  Missing Labels", 2021): positives take the focal margin loss (1 - p_m)^gamma * -log(p_m),
  p_m = sigmoid(x - m); Hill's negatives (lambda - p) p^2 (lambda = 1.5), whose gradient vanishes
  as p -> 1, so a confident prediction of an unlabelled class is barely pushed down; SPLC's
  negatives p^gamma * -log(1 - p), except that an entry the model scores above tau is trained as
  a positive (the label is taken as missing);
- large-loss rejection / correction (Kim et al., "Large Loss Matters in Weakly Supervised
  Multi-Label Classification", CVPR 2022): among the entries assumed negative, the largest
  losses of the batch are the likeliest missing labels; LL-R drops them, LL-Ct trains them as
  positives for this step; the share grows linearly with the epoch.
Soft targets t in [0, 1] weigh the two parts: t * positive + (1 - t) * negative, so t in {0, 1}
gives each paper's loss exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HILL_LAMBDA = 1.5      # Zhang et al.: the hill's top sits at p = 1 with this lambda
FOCAL_GAMMA = 2.0      # Zhang et al.'s gamma for the focal margin positives and SPLC's negatives
FOCAL_MARGIN = 1.0     # Zhang et al.'s margin m of the focal margin loss


def focal_margin_positive(logits: torch.Tensor, gamma: float = FOCAL_GAMMA, margin: float = FOCAL_MARGIN):
    """(1 - p_m)^gamma * -log(p_m), p_m = sigmoid(x - m): the positive part of Hill and SPLC."""
    shifted = logits - margin
    return (1 - torch.sigmoid(shifted)).pow(gamma) * -F.logsigmoid(shifted)


def hill_negative(logits: torch.Tensor, lam: float = HILL_LAMBDA) -> torch.Tensor:
    """(lambda - p) * p^2."""
    p = torch.sigmoid(logits)
    return (lam - p) * p * p


def splc_negative(logits: torch.Tensor, tau: float, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """p^gamma * -log(1 - p) where p <= tau; where p > tau the entry is taken as a missing
    positive and gets the focal margin positive loss instead."""
    p = torch.sigmoid(logits)
    negative = p.pow(gamma) * -F.logsigmoid(-logits)
    # p > tau decides the label, not the gradient: the switch is a step, as in the paper.
    return torch.where(p.detach() > tau, focal_margin_positive(logits, gamma), negative)


def elementwise(logits: torch.Tensor, targets: torch.Tensor, cfg, epoch: int | None = None) -> torch.Tensor:
    """Per-entry loss [B, O] of `cfg.loss` (bce | asl | hill | splc) against soft targets; hill
    and splc are BCE before `robust_loss_epoch` (when `epoch` is given)."""
    logits = logits.float()
    warming = cfg.loss in ("hill", "splc") and epoch is not None and epoch < cfg.robust_loss_epoch
    if cfg.loss == "bce" or warming:
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if cfg.loss == "asl":
        p = torch.sigmoid(logits)
        return -(targets * F.logsigmoid(logits) + (1 - targets) * p.pow(cfg.asl_gamma_neg) * F.logsigmoid(-logits))
    if cfg.loss == "hill":
        return targets * focal_margin_positive(logits) + (1 - targets) * hill_negative(logits)
    if cfg.loss == "splc":
        return targets * focal_margin_positive(logits) + (1 - targets) * splc_negative(logits, cfg.splc_tau)
    raise ValueError(f"unknown loss {cfg.loss!r}")


def large_loss_rate(cfg, epoch: int) -> float:
    """Share of the unmentioned entries treated as missing labels at `epoch` (0-based): Kim et
    al.'s schedule, 0 in the first epoch and `large_loss_delta` more in each one after."""
    return min(1.0, cfg.large_loss_delta * epoch)


def large_loss(logits: torch.Tensor, targets: torch.Tensor, cfg, rate: float,
               epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-entry loss, mask) with Kim et al.'s rule on the entries the captions leave unmentioned
    (soft target <= `missing_threshold`): the floor(rate * their count) largest of their losses
    in the batch are taken as missing labels; `large_loss=reject` drops them (mask 0),
    `correct` trains them as positives (target 1) for this step."""
    loss = elementwise(logits, targets, cfg, epoch)
    mask = torch.ones_like(loss)
    if cfg.large_loss == "none" or rate <= 0:      # before the count: it waits for the device
        return loss, mask
    candidates = targets <= cfg.missing_threshold
    k = int(math.floor(rate * int(candidates.sum())))
    if k == 0:
        return loss, mask
    ranked = torch.where(candidates, loss.detach(), torch.full_like(loss, -math.inf)).flatten()
    chosen = torch.zeros(loss.numel(), dtype=torch.bool, device=loss.device)
    chosen[ranked.topk(k).indices] = True
    chosen = chosen.view_as(loss)
    if cfg.large_loss == "reject":
        mask = (~chosen).float()
    else:  # correct
        loss = torch.where(chosen, elementwise(logits, torch.ones_like(targets), cfg, epoch), loss)
    return loss, mask
