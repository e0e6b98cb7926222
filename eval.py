"""Evaluate multi-label predictions.

  python eval.py --scores S.csv --labels L.csv [--difficult ignore|positive|negative] [--json out.json]

Both CSVs have an `image_id` column and one column per class; labels are 1 / 0 (difficult-only)
/ -1. Score columns that are not classes of the labels file (backgrounds) are ignored; a class
or an image missing from the scores is an error. This evaluates any method's predictions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from data import DataError, _atomic_write, read_table_csv
from metrics import DIFFICULT_MODES, evaluate


def evaluate_csv(scores_path: str, labels_path: str, difficult: str = "ignore",
                 threshold: float = 0.5) -> dict:
    """Align the scores CSV to the labels CSV by image id and class name, then evaluate."""
    s_ids, s_cols, s = read_table_csv(scores_path, "scores")
    l_ids, classes, labels = read_table_csv(labels_path, "labels")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise DataError(labels_path, "labels must be 1, 0 or -1")
    col = {c: k for k, c in enumerate(s_cols)}
    missing = [c for c in classes if c not in col]
    if missing:
        raise DataError(scores_path, f"no column for class {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    row = {i: k for k, i in enumerate(s_ids)}
    absent = [i for i in l_ids if i not in row]
    if absent:
        raise DataError(scores_path, f"no scores for image {absent[0]!r}"
                        + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    aligned = s[np.array([row[i] for i in l_ids], dtype=np.int64)][:, [col[c] for c in classes]]
    if not np.isfinite(aligned).all():
        raise DataError(scores_path, "scores contain NaN or infinity")
    return evaluate(aligned, labels.astype(np.int8), classes, difficult, threshold)


def print_report(report: dict, file=None) -> None:
    file = file or sys.stdout
    print(f"mAP {report['mAP']:.2f}  CF1 {report['CF1']:.2f}  OF1 {report['OF1']:.2f}  "
          f"(top-3: CF1 {report['CF1_top3']:.2f}  OF1 {report['OF1_top3']:.2f})  "
          f"{report['num_images']} images, difficult={report['difficult']}, threshold={report['threshold']}",
          file=file)
    width = max(len(c) for c in report["AP"])
    for c, ap in report["AP"].items():
        print(f"  {c:<{width}}  {'   n/a' if ap is None else f'{ap:6.2f}'}", file=file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", required=True, help="predictions CSV (image_id + one column per class)")
    parser.add_argument("--labels", required=True, help="ground-truth CSV (image_id + 1/0/-1 per class)")
    parser.add_argument("--difficult", choices=DIFFICULT_MODES, default="ignore",
                        help="how difficult-only (0) labels count (default: ignore)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold of CP/CR/CF1, OP/OR/OF1")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    try:
        report = evaluate_csv(args.scores, args.labels, args.difficult, args.threshold)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        out = {k: report[k] for k in ("mAP", "AP", "CF1", "OF1", "difficult", "num_images")}
        out.update({k: v for k, v in report.items() if k not in out})
        _atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(out, indent=2) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
