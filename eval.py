"""Evaluate a BAC-GCN checkpoint, or any method's predictions.

  python eval.py runs/X/ckpt.safetensors [--data-root PATH] [--split test] [--difficult MODE] [--json out.json]
      [--clip-weights FILE] [--clip-weights-format auto|openai-torchscript] [--cache-dir DIR]
  python eval.py --scores S.csv --labels L.csv [--difficult ignore|positive|negative] [--json out.json]

A checkpoint carries its config, classes and graph: the model is rebuilt from it alone (the
data root, CLIP weights and feature cache default to the ones recorded at training time, and
the command says which it reads) and evaluated on the test split. The recorded feature cache is
only read; a TorchScript archive loads only with --clip-weights-format on this command line.

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

from data import DataError, check_writable, read_table_csv, write_json
from metrics import DIFFICULT_MODES, evaluate, positive_counts


def evaluate_csv(scores_path: str, labels_path: str, difficult: str = "ignore",
                 threshold: float = 0.5) -> dict:
    """Align the scores CSV to the labels CSV by image id and class name, then evaluate."""
    s_ids, s_cols, s = read_table_csv(scores_path, "scores")
    l_ids, classes, labels = read_table_csv(labels_path, "labels")
    if not classes:
        raise DataError(labels_path, "no class column besides image_id")
    if not l_ids:
        raise DataError(labels_path, "no image rows")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise DataError(labels_path, "labels must be 1, 0 or -1")
    # mAP averages over classes with a positive; with none it is undefined, not a result
    if not positive_counts(labels, difficult).any():
        raise DataError(labels_path, f"no class has a positive label (difficult={difficult}), so mAP is undefined")
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
    print_class_ap(report["AP"], file)


def print_class_ap(ap: dict, file=None) -> None:
    """One line per class: its AP, or n/a for a class without a positive."""
    width = max(len(c) for c in ap)
    for c, value in ap.items():
        print(f"  {c:<{width}}  {'   n/a' if value is None else f'{value:6.2f}'}", file=file or sys.stdout)


def checkpoint_config(cfg, split: str | None, given: dict[str, str | None], weights_format: str):
    """The recorded config with the command line's overrides (`given`: clip_weights, data_root,
    cache_dir) and the weights format of this command line, never the checkpoint's: a file may
    name a TorchScript archive, but only the user can ask for it to be run. Prints what is read."""
    import bacgcn
    from data import SPLITS

    split, splits = split or cfg.test_split, SPLITS[cfg.dataset]
    if split not in splits:
        raise ValueError(f"--split {split}: not a split of {cfg.dataset} (its splits: {', '.join(splits)})")
    cfg = cfg.replace(test_split=split, clip_weights_format=weights_format, **{k: v for k, v in given.items() if v})
    bacgcn.validate(cfg)

    def source(key: str) -> str:
        return f"--{key.replace('_', '-')}" if given[key] else "from the checkpoint"
    print(f"loading CLIP weights {cfg.clip_weights} ({source('clip_weights')}), data root {cfg.data_root} "
          f"({source('data_root')}), feature cache {cfg.cache_dir} "
          f"({source('cache_dir')}{'' if given['cache_dir'] else ', read only'})", flush=True)
    return cfg


def read_only_cache(cfg, backbone, dataset):
    """A cache dir named by a checkpoint is only read: when it lacks this split's features, they
    are encoded into the default cache of the current folder instead."""
    import bacgcn
    import pipeline
    from data import FeatureCache

    if FeatureCache(cfg.cache_dir, pipeline.feature_spec(cfg, backbone, dataset, "images")).complete:
        return cfg
    local = str(Path(bacgcn.BACGCNConfig.cache_dir).resolve())
    print(f"the checkpoint's feature cache {cfg.cache_dir} lacks {dataset.name}: encoding into {local} "
          "(--cache-dir to choose)", flush=True)
    return cfg.replace(cache_dir=local)


def evaluate_checkpoint(path: str, data_root: str | None = None, split: str | None = None,
                        difficult: str = "ignore", clip_weights: str | None = None, cache_dir: str | None = None,
                        clip_weights_format: str = "auto") -> dict:
    """Rebuild the model from the checkpoint alone and evaluate it on a split."""
    import pipeline
    from data import load_dataset

    cfg, classes, categories, tensors, meta = pipeline.read_checkpoint(path)
    given = {"clip_weights": clip_weights, "data_root": data_root, "cache_dir": cache_dir}
    cfg = checkpoint_config(cfg, split, given, clip_weights_format)
    # the device of the training machine may not exist here: CUDA when there is one
    device = pipeline.resolve_device("cpu" if cfg.device == "cpu" else "")
    dataset = load_dataset(cfg.dataset, cfg.data_root, cfg.test_split)
    if dataset.class_names != classes:
        raise DataError(path, f"trained on {len(classes)} classes of {cfg.dataset} ({', '.join(classes[:3])}, ...), "
                              f"the data at {cfg.data_root} has {len(dataset.class_names)} "
                              f"({', '.join(dataset.class_names[:3])}, ...)")
    try:
        backbone = pipeline.build_backbone(cfg, device)
        pipeline.check_against_backbone(cfg, backbone)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(path, f"its CLIP cannot be rebuilt: {e}") from None
    model = pipeline.model_from_checkpoint(path, cfg, classes, tensors).to(device)
    if not cache_dir:
        cfg = read_only_cache(cfg, backbone, dataset)
    test = pipeline.cached_features(cfg, backbone, dataset, device)
    dtype = pipeline.compute_dtype(device, cfg.amp)
    logits = pipeline.predict(model, test.feats, device, dtype)
    result = pipeline.evaluate_split(cfg, logits, test, len(classes), difficult)
    result.update({"difficult": difficult, "num_images": len(test.ids), "dataset": cfg.dataset,
                   "split": cfg.test_split, "checkpoint": str(path), "trained": json.loads(meta["metrics"])})
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="ckpt.safetensors written by train.py")
    parser.add_argument("--data-root", help="dataset root (default: the one recorded in the checkpoint)")
    parser.add_argument("--split", help="split to evaluate (default: the dataset's test split)")
    parser.add_argument("--clip-weights", help="CLIP weights file (default: the one recorded in the checkpoint)")
    parser.add_argument("--clip-weights-format", default="auto",
                        help="auto (safetensors or a weights-only torch state dict) | openai-torchscript; "
                             "never taken from the checkpoint")
    parser.add_argument("--cache-dir", help="feature cache to read and write (default: read the checkpoint's, "
                                            "encode what it lacks into ./.cache/features)")
    parser.add_argument("--scores", help="predictions CSV (image_id + one column per class)")
    parser.add_argument("--labels", help="ground-truth CSV (image_id + 1/0/-1 per class)")
    parser.add_argument("--difficult", choices=DIFFICULT_MODES, default="ignore",
                        help="how difficult-only (0) labels count (default: ignore)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold of CP/CR/CF1, OP/OR/OF1")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if args.checkpoint is None and not (args.scores and args.labels):
        parser.error("give a checkpoint, or --scores and --labels")
    try:
        if args.json:
            check_writable(args.json, "--json")
        if args.checkpoint:
            report = evaluate_checkpoint(args.checkpoint, args.data_root, args.split, args.difficult,
                                         args.clip_weights, args.cache_dir, args.clip_weights_format)
            report["threshold"] = 0.0
            print_checkpoint_report(report, args.difficult)
        else:
            report = evaluate_csv(args.scores, args.labels, args.difficult, args.threshold)
            print_report(report)
        if args.json:
            out = {k: report[k] for k in ("mAP", "AP", "CF1", "OF1", "difficult", "num_images")}
            out.update({k: v for k, v in report.items() if k not in out})
            write_json(args.json, out, indent=2)
    except (ValueError, FileNotFoundError) as e:   # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --json={args.json}: cannot be written ({e.strerror})", file=sys.stderr)
        return 2
    return 0


def print_checkpoint_report(report: dict, difficult: str) -> None:
    print(f"{report['dataset']}/{report['split']}: mAP {report['mAP']:.2f}  CF1 {report['CF1']:.2f}  "
          f"OF1 {report['OF1']:.2f}" + "".join(f"  {k} {report[k]:.2f}" for k in ("mAP_small", "mAP_large")
                                           if k in report) + f"  ({report['num_images']} images, "
          f"difficult={difficult}, threshold: logit 0)")
    print_class_ap(report["AP"])


if __name__ == "__main__":
    sys.exit(main())
