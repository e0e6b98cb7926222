"""Multi-label metrics: per-class AP / mAP, CP/CR/CF1, OP/OR/OF1 (at a threshold and top-k).

Labels follow the VOC convention: 1 present, -1 absent, 0 difficult-only. How a 0 counts is
the `difficult` mode:
  ignore   (default) the entry is dropped from that class's ranking and from every count,
  positive it counts as present,
  negative it counts as absent.

AP is non-interpolated: sum over recall steps of (R_n - R_{n-1}) * P_n, as sklearn's
`average_precision_score`. Tie rule (also sklearn's): images with equal scores form one
step, so every positive in a tie group gets the precision at the *end* of its group. On
tie-free scores this is the usual "precision at each positive" average; coarse scores (vote
counts) are penalised for their ties, never rewarded by an arbitrary order.

Everything is vectorised over classes with numpy; no Python loop over images.
"""
from __future__ import annotations

import numpy as np

DIFFICULT_MODES = ("ignore", "positive", "negative")
# The size rule of mAP_small / mAP_large: an image's instance of a class is small when its box
# covers under 2 % of the image, large from 10 % (the proving ground's reports, datasets whose
# registry entry asks for size buckets).
SMALL_AREA = 0.02
LARGE_AREA = 0.10


def _targets_and_weights(labels: np.ndarray, difficult: str) -> tuple[np.ndarray, np.ndarray]:
    """Map {1, 0, -1} labels to (binary targets, 0/1 weights) under a difficult mode."""
    if difficult not in DIFFICULT_MODES:
        raise ValueError(f"difficult must be one of {DIFFICULT_MODES}, got {difficult!r}")
    labels = np.asarray(labels)
    bad = ~np.isin(labels, (-1, 0, 1))
    if bad.any():
        raise ValueError(f"labels must be in {{1, 0, -1}}; found {np.unique(labels[bad])[:5]}")
    targets = labels == 1
    weights = np.ones(labels.shape, dtype=np.float64)
    if difficult == "ignore":
        weights[labels == 0] = 0.0
    elif difficult == "positive":
        targets = labels >= 0
    return targets.astype(np.float64), weights


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))   # no overflow for large |x|


def positive_counts(labels: np.ndarray, difficult: str = "ignore") -> np.ndarray:
    """Positives per class under a difficult mode: a class's AP exists only where this is > 0."""
    targets, weights = _targets_and_weights(labels, difficult)
    return (targets * weights).sum(axis=0)


def average_precision(scores: np.ndarray, labels: np.ndarray, difficult: str = "ignore") -> np.ndarray:
    """AP per class (column) of `scores` [n_images, n_classes] against {1,0,-1} `labels`.

    Returns a float64 array [n_classes] in [0, 1]; NaN for a class with no positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        return average_precision(scores[:, None], np.asarray(labels)[:, None], difficult)
    if scores.shape != np.shape(labels):
        raise ValueError(f"scores {scores.shape} and labels {np.shape(labels)} differ in shape")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    targets, weights = _targets_and_weights(labels, difficult)
    n = scores.shape[0]
    if n == 0:
        return np.full(scores.shape[1], np.nan)
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    t = np.take_along_axis(targets * weights, order, axis=0)
    f = np.take_along_axis((1.0 - targets) * weights, order, axis=0)
    tp = np.cumsum(t, axis=0)
    fp = np.cumsum(f, axis=0)
    # Index of the last row of each tie group, propagated to every row of the group.
    is_end = np.ones_like(s, dtype=bool)
    is_end[:-1] = s[:-1] != s[1:]
    end_idx = np.where(is_end, np.arange(n)[:, None], n)
    end_idx = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]
    tp_end = np.take_along_axis(tp, end_idx, axis=0)
    fp_end = np.take_along_axis(fp, end_idx, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_end = tp_end / (tp_end + fp_end)
        npos = tp[-1]
        ap = np.where(t > 0, precision_end, 0.0).sum(axis=0) / npos
    ap[npos == 0] = np.nan
    return ap


def mean_ap(scores: np.ndarray, labels: np.ndarray, difficult: str = "ignore") -> float:
    """mAP x 100 over the classes that have at least one positive."""
    ap = average_precision(scores, labels, difficult)
    if np.isnan(ap).all():
        raise ValueError("no class has a positive label: mAP is undefined")
    return float(np.nanmean(ap) * 100.0)


def _f1(p: float, r: float) -> float:
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def prf_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5,
                topk: int | None = None, difficult: str = "ignore") -> dict[str, float]:
    """CP, CR, CF1 (per-class means, ML-GCN convention) and OP, OR, OF1 (pooled counts), x 100.

    A label is predicted when its score is >= `threshold`; with `topk`, it must also be among
    the image's `topk` highest scores (the ML-GCN top-3 protocol). A class never predicted has
    precision 0; a class with no positive is left out of CR.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets, weights = _targets_and_weights(labels, difficult)
    pred = scores >= threshold
    if topk is not None:
        k = min(topk, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        in_top = np.zeros_like(pred)
        np.put_along_axis(in_top, top, True, axis=1)
        pred &= in_top
    pred = pred * weights
    tp = (pred * targets).sum(axis=0)
    n_pred = pred.sum(axis=0)
    n_pos = (targets * weights).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cp = float(np.where(n_pred > 0, tp / n_pred, 0.0).mean())
        has_pos = n_pos > 0
        cr = float((tp[has_pos] / n_pos[has_pos]).mean()) if has_pos.any() else 0.0
    op = float(tp.sum() / n_pred.sum()) if n_pred.sum() > 0 else 0.0
    orc = float(tp.sum() / n_pos.sum()) if n_pos.sum() > 0 else 0.0
    out = {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orc, "OF1": _f1(op, orc)}
    return {k: v * 100.0 for k, v in out.items()}


def best_f1(scores: np.ndarray, labels: np.ndarray, difficult: str = "ignore") -> tuple[float, float]:
    """Best pooled F1 over one global threshold on the scores: (F1 in [0,1], threshold).

    Used to judge pseudo labels: it says how well a single cut turns scores into labels.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets, weights = _targets_and_weights(labels, difficult)
    keep = weights.ravel() > 0
    s, t = scores[keep], targets.ravel()[keep]
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    tp = np.cumsum(t)
    n_pred = np.arange(1, len(s) + 1)
    is_end = np.ones(len(s), dtype=bool)
    is_end[:-1] = s[:-1] != s[1:]
    f1 = 2 * tp[is_end] / (n_pred[is_end] + t.sum())
    i = int(np.argmax(f1))
    return float(f1[i]), float(s[is_end][i])


def per_class_thresholds(scores: np.ndarray, positive: np.ndarray, default: float = 0.5) -> np.ndarray:
    """[C] per class, the score at or above which it is predicted: the cut with the best F1
    against `positive` ([n, C] bool; pseudo labels, never a test split's); `default` for a class
    with no positive."""
    labels = np.where(np.asarray(positive, dtype=bool), 1, -1)
    return np.array([best_f1(scores[:, c:c + 1], labels[:, c:c + 1])[1] if (labels[:, c] > 0).any() else default
                     for c in range(scores.shape[1])])


def tagging_rules(probs: np.ndarray, labels: np.ndarray, per_class: np.ndarray, fixed: float = 0.5) -> dict:
    """How well each decision rule tags a labelled split (probabilities [n, C]): CF1 / OF1 and the
    share of images left with no tag, for the fixed threshold, the per-class thresholds and the
    best single threshold (chosen on this split itself: the rule a user could not know before)."""
    best = best_f1(probs, labels)[1]
    out = {}
    for name, threshold in (("fixed", fixed), ("per_class", per_class), ("best_single", best)):
        prf = prf_metrics(probs, labels, threshold)
        out[name] = {"CF1": prf["CF1"], "OF1": prf["OF1"],
                     "untagged": float((probs < threshold).all(axis=1).mean() * 100)}
    out["best_single"]["threshold"] = best
    out["fixed"]["threshold"] = fixed
    return out


def evaluate(scores: np.ndarray, labels: np.ndarray, class_names: list[str],
             difficult: str = "ignore", threshold: float = 0.5) -> dict:
    """The full report that eval.py prints and writes."""
    ap = average_precision(scores, labels, difficult)
    report = {
        "mAP": float(np.nanmean(ap) * 100.0),
        "AP": {c: (None if np.isnan(a) else float(a * 100.0)) for c, a in zip(class_names, ap)},
        "difficult": difficult,
        "num_images": int(np.shape(scores)[0]),
        "threshold": threshold,
    }
    report.update(prf_metrics(scores, labels, threshold, None, difficult))
    report.update({f"{k}_top3": v for k, v in prf_metrics(scores, labels, threshold, 3, difficult).items()})
    return report


def size_split_map(scores: np.ndarray, labels: np.ndarray, largest_area: np.ndarray,
                   small: float = 0.02, large: float = 0.10, min_positives: int = 10) -> dict[str, float]:
    """mAP over small and over large positives (the proving ground's size rule), x 100.

    `largest_area[i, c]`: area (fraction of the image) of the largest instance of class c in
    image i. Per class, small positives are those with largest_area < `small`, large ones
    >= `large`; AP is taken over those positives plus every negative, and classes with fewer
    than `min_positives` such positives are skipped. NaN when no class qualifies.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    out = {}
    for name, keep in (("mAP_small", largest_area < small), ("mAP_large", largest_area >= large)):
        pos = (labels == 1) & keep
        use = pos.sum(0) >= min_positives
        if not use.any():
            out[name] = float("nan")
            continue
        # positives outside the size band are left out of the ranking (label 0 = ignored)
        lab = np.where(labels == 1, np.where(keep, 1, 0), labels)[:, use]
        out[name] = float(np.nanmean(average_precision(scores[:, use], lab, "ignore")) * 100.0)
    return out
