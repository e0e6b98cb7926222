"""The proving ground's caption noise against real BLIP-2 captions, statistic by statistic.

  python bench/caption_fit.py [--seeds 0 1 2 23] [--json out.json] [--markdown]

Real: the paper's BLIP-2 captions of VOC2007 trainval against the 2,500 dev labels of
../shared/data/voc2007/ (the caption filter as the trainer runs it: our dictionary, the context
tie-break, hard labels at one vote). World: the training split of world S (runs/world-seedS,
built if absent) against its truth, the same filter on its captions.json + re_captions.json.
The noise model's parameters (synthetic.CaptionNoise) were fit so that the world's column
matches the real one; recall by instance size exists only where boxes are known (the world).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import metrics  # noqa: E402
import registry  # noqa: E402
import synthetic  # noqa: E402
from captions import SynonymDictionary, label_quality, pseudo_labels, read_captions  # noqa: E402

VOC2007 = ROOT.parent / "shared" / "data" / "voc2007"
# (key, what it measures); the README's table prints them in this order
STATISTICS = (
    ("mAP", "soft pseudo labels: mAP over the classes"),
    ("precision", "hard labels (one vote): precision"),
    ("recall", "hard labels: recall"),
    ("recall_small", "recall of instances < 2 % of the image"),
    ("recall_large", "recall of instances >= 10 %"),
    ("positives_per_image", "true labels per image"),
    ("false_per_image", "false positives per image"),
    ("unvoted_positives", "true labels no caption names"),
    ("confident_positives", "true labels >= 3/4 of the captions name"),
    ("single_vote_false", "false positives one caption names"),
    ("confident_false", "false positives >= half of the captions name"),
    ("context_lift", "false positives' companion rate / all negatives'"),
    ("weakest_classes", "lowest per-class recall (3 classes)"),
)


def statistics(pseudo, labels: np.ndarray, class_names, largest_area: np.ndarray | None = None) -> dict:
    """Every statistic of STATISTICS for pseudo labels against labels [n, C] (1 / -1 / 0)."""
    c = len(class_names)
    votes, hard = pseudo.votes[:, :c], pseudo.hard(1)[:, :c]
    fraction = votes / np.maximum(pseudo.num_captions, 1)[:, None]
    positive, negative = labels == 1, labels == -1
    false = (hard > 0) & negative
    out = label_quality(pseudo.scores[:, :c], hard, labels, largest_area,
                        (metrics.SMALL_AREA, metrics.LARGE_AREA))
    # How often a class's companions are there: P(j | i) over the true labels; a false positive
    # of j whose image holds a class i that j often comes with is one that follows context.
    together = positive.T.astype(float) @ positive.astype(float)
    np.fill_diagonal(together, 0)
    given = together / np.maximum(positive.sum(0), 1)[:, None]

    def companion_rate(mask):
        rows, cols = np.nonzero(mask)
        return np.mean([given[positive[r], j].max(initial=0.0) for r, j in zip(rows, cols)])

    recall = ((hard > 0) & positive).sum(0) / np.maximum(positive.sum(0), 1)
    weakest = np.argsort(recall, kind="stable")[:3]
    out.update({
        "positives_per_image": positive.sum(1).mean(),
        "false_per_image": false.sum(1).mean(),
        "unvoted_positives": (votes[positive] == 0).mean(),
        "confident_positives": (fraction[positive] >= 0.75).mean(),
        "single_vote_false": (votes[false] == 1).mean(),
        "confident_false": (fraction[false] >= 0.5).mean(),
        "context_lift": companion_rate(false) / companion_rate(negative),
        "weakest_classes": ", ".join(f"{class_names[k]} {recall[k]:.2f}" for k in weakest),
    })
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}


def real_statistics(captions_dir: Path = VOC2007, labels_file: Path = VOC2007 / "trainval_labels_dev.csv") -> dict:
    ids, classes, labels = data.read_table_csv(labels_file, "labels")
    dictionary = SynonymDictionary.from_json(registry.get("voc2007").synonym_file(), len(classes))
    pseudo = pseudo_labels(read_captions(captions_dir), dictionary, data.VOC_CLASSES, ids=ids)
    return statistics(pseudo, labels.astype(np.int8), list(data.VOC_CLASSES))


def world_statistics(root: Path) -> dict:
    train = registry.load("synthetic", root, "trainval")
    dictionary = SynonymDictionary.from_json(root / "synonyms.json", len(train.class_names))
    pseudo = pseudo_labels(read_captions(root), dictionary, train.class_names, ids=train.ids)
    areas = data.largest_instance_area(root, train.ids, train.class_names)
    return statistics(pseudo, train.labels_for(train.ids), train.class_names, areas)


def world_root(seed: int) -> Path:
    root = ROOT / "runs" / f"world-seed{seed}"
    if not (root / "world.json").is_file():
        synthetic.build(root, synthetic.WorldConfig(seed=seed))
    return root


def markdown(columns: dict[str, dict]) -> str:
    names = list(columns)
    lines = ["| statistic | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, what in STATISTICS:
        cells = []
        for name in names:
            v = columns[name].get(key)
            cells.append("–" if v is None or (isinstance(v, float) and np.isnan(v))
                         else v if isinstance(v, str) else f"{v:.1f}" if key == "mAP" else f"{v:.2f}")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 23], help="worlds to measure")
    parser.add_argument("--json", type=Path, help="write {column: {statistic: value}} here")
    args = parser.parse_args(argv)
    try:
        if args.json:
            data.check_writable(args.json, "--json")
        columns = {"VOC2007 dev (real BLIP-2)": real_statistics()}
        for seed in args.seeds:
            columns[f"world {seed}"] = world_statistics(world_root(seed))
    except ValueError as e:   # data.DataError, and check_writable's refusal
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(columns))
    if args.json:
        data.write_json(args.json, columns, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
