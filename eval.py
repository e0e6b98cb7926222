"""Evaluate a BAC-GCN checkpoint or any method's predictions; tag images; draw what a model sees.

  python eval.py runs/X/ckpt.safetensors [--data-root PATH] [--split test] [--difficult MODE] [--json out.json]
  python eval.py --scores S.csv --labels L.csv [--difficult ignore|positive|negative] [--json out.json]
  python eval.py runs/X/ckpt.safetensors --images DIR_OR_GLOB [--out tags.csv] [--threshold P] [--top-k K]
  python eval.py runs/X/ckpt.safetensors --visualize IMG [--categories a,b,...] --out maps.png
  python eval.py --plot-ap report.json [report2.json] --out ap.png

A checkpoint carries its config, classes and graph: the model is rebuilt from it alone (the
data root defaults to the one recorded at training time) and evaluated on the test split.

Both CSVs have an `image_id` column and one column per class; labels are 1 / 0 (difficult-only)
/ -1. Score columns that are not classes of the labels file (backgrounds) are ignored; a class
or an image missing from the scores is an error. This evaluates any method's predictions.

After training: `--images` runs the frozen CLIP and the trained head on every JPEG/PNG of a
folder (recursive) or a glob and writes `image_id,<class probabilities>,tags` (a valid --scores
file) to --out or standard output; a class is a tag at or above the checkpoint's per-class
threshold (chosen on its pseudo-labelled training images) unless --threshold says one for
all. `--visualize` draws an image beside the similarity map of each chosen category with the
patches the Similarity Kernel pooled; `--plot-ap` draws the per-class AP of one or two --json
reports.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from cli import check_outputs_apart, finite_float, integer_from, run_command
from data import DataError, atomic_write, check_writable, read_table_csv, shown_path, write_json
from metrics import DIFFICULT_MODES, evaluate, positive_counts, sigmoid


def evaluate_csv(scores_path: str, labels_path: str, difficult: str = "ignore",
                 threshold: float = 0.5) -> dict:
    """Align the scores CSV to the labels CSV by image id and class name, then evaluate."""
    s_ids, s_cols, s = read_table_csv(scores_path, "scores", ignore=("tags",))   # eval.py --images writes tags
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


# --------------------------------------------------------------------------------------------
# A checkpoint, rebuilt
# --------------------------------------------------------------------------------------------

def announce(cfg, given: dict) -> None:
    """Say which CLIP weights, data and cache a checkpoint's command reads, and from where."""
    def source(key: str) -> str:
        return f"--{key.replace('_', '-')}" if given.get(key) else "from the checkpoint"
    print(f"loading CLIP weights {cfg.clip_weights} ({source('clip_weights')}), data root {cfg.data_root} "
          f"({source('data_root')}), feature cache {cfg.cache_dir} "
          f"({source('cache_dir')}{'' if given.get('cache_dir') else ', read only'})", flush=True)


def read_only_cache(cfg, spec: dict, what: str):
    """A cache dir named by a checkpoint is only read, never written: when it lacks the features
    of `spec` (`what`: a split, or the test-time pass's crops of one), or holds them damaged, they
    are encoded into the default cache of the output root instead (the current folder, or
    $BACGCN_OUTPUT_ROOT; a damaged cache is rebuilt where it lies only when it is the user's own)."""
    import config
    from cache import FeatureCache

    cache = FeatureCache(cfg.cache_dir, spec, fmt=cfg.cache_format)
    problem = cache.problem() if cache.complete else f"lacks {what}"
    if problem is None:
        return cfg
    local = str(config.default_cache_dir())
    if cache.complete:
        problem = f"is damaged ({problem})"
    print(f"the checkpoint's feature cache {cfg.cache_dir} {problem}: encoding into {local} "
          "(--cache-dir to choose)", flush=True)
    return cfg.replace(cache_dir=local)


def open_model(path: str, overrides: dict, weights_format: str, split: str | None = None,
               before_build=None):
    """The checkpoint's TrainedModel (pipeline.load_trained's checks), what it reads said first;
    `before_build(categories)` runs before the CLIP is built (a typo fails before that cost)."""
    import pipeline

    parts = pipeline.open_checkpoint(path, overrides, weights_format, split)
    announce(parts[0], overrides)
    if before_build is not None:
        before_build(parts[2])
    return pipeline.TrainedModel.build(path, *parts)


def checkpoint_logits(path: str, split: str | None = None, overrides: dict | None = None,
                      weights_format: str = "auto"):
    """(config, classes, split features, logits [n, O], metadata) of a checkpoint on a split of its
    dataset; with the test-time small-object pass when its config turns it on (`test_crops`)."""
    import pipeline
    import reso

    given = overrides or {}
    model = open_model(path, given, weights_format, split)
    cfg, classes = model.cfg, model.classes
    dataset = pipeline.load_split(cfg, cfg.test_split)
    if dataset.class_names != classes:
        raise DataError(path, f"trained on {len(classes)} classes of {cfg.dataset} ({', '.join(classes[:3])}, ...), "
                              f"the data at {cfg.data_root} has {len(dataset.class_names)} "
                              f"({', '.join(dataset.class_names[:3])}, ...)")
    if not given.get("cache_dir"):
        cfg = read_only_cache(cfg, pipeline.feature_spec(cfg, model.backbone, dataset, "images"), dataset.name)
    test = pipeline.cached_features(cfg, model.backbone, dataset, model.device)
    logits = pipeline.predict(model.head, test.feats, model.device, model.dtype)
    logits, _ = reso.small_object_pass(cfg, model.head, model.backbone, test, logits, model.device,
                                       None if given.get("cache_dir") else read_only_cache)
    return cfg, classes, test, logits, model.metadata


def evaluate_checkpoint(path: str, data_root: str | None = None, split: str | None = None,
                        difficult: str = "ignore", clip_weights: str | None = None, cache_dir: str | None = None,
                        clip_weights_format: str = "auto", workers: int | None = None,
                        test_crops: int | None = None) -> dict:
    """Rebuild the model from the checkpoint alone and evaluate it on a split (`test_crops`: the
    test-time pass's crops per image, default the checkpoint's)."""
    import pipeline

    overrides = {"clip_weights": clip_weights, "data_root": data_root, "cache_dir": cache_dir, "workers": workers,
                 "test_crops": test_crops}
    cfg, classes, test, logits, meta = checkpoint_logits(path, split, overrides, clip_weights_format)
    if not pipeline.has_labels(test.dataset):
        raise DataError(path, f"{test.dataset.name} has no label to evaluate against (a photo folder trained without "
                              "--labels: tag photos with --images DIR)")
    result = pipeline.evaluate_split(cfg, logits, test, len(classes), difficult)
    result.update({"difficult": difficult, "num_images": len(test.ids), "dataset": cfg.dataset,
                   "split": cfg.test_split, "checkpoint": str(path), "trained": json.loads(meta["metrics"])})
    return result


# --------------------------------------------------------------------------------------------
# After training: tag a folder, draw similarity maps, plot AP
# --------------------------------------------------------------------------------------------

STDOUT = "/dev/stdout"      # where --images writes its CSV without --out (written through, never replaced)
EVAL_THRESHOLD = 0.5        # the score threshold of CP/CR/CF1 and OP/OR/OF1 without --threshold


def check_out(out: str | None, option: str) -> Path:
    """The --out file, refused before any work when absent or a directory."""
    if not out:
        raise DataError("--out", f"{option} needs a file to write")
    if Path(out).is_dir():
        raise DataError(out, "--out is an existing directory; give a file path")
    return Path(out)


def write_png(image, out: Path) -> None:
    atomic_write(out, lambda tmp: image.save(tmp, format="PNG"))


def check_finite_scores(checkpoint: str, ids: Sequence[str], logits: np.ndarray) -> None:
    """Scores that overflowed to NaN or infinity are the checkpoint's failure, not tags to write."""
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise DataError(checkpoint, f"its head gives NaN or infinite scores for {int(bad.sum())} of {len(ids)} "
                                    f"images (first: {ids[int(np.argmax(bad))]!r}): its weights overflow")


def folder_crops(cfg, crops: list):
    """predict_dataset's `on_maps` for the test-time pass: appends (row, class, patch box) of each
    image's small regions around its maps' peaks (reso.peak_crops) to `crops`."""
    import reso

    def on_maps(first_row: int, sim) -> None:
        crops.extend((first_row + b, c, box) for b, c, box in reso.peak_crops(sim, cfg))
    return on_maps


def folder_small_object_pass(model, dataset, ids: list[str], logits: np.ndarray, crops: list) -> np.ndarray:
    """The test-time pass over a folder (reso.small_object_pass without the feature cache, as the
    folder's images): each crop cut from the photo and scored by predict_dataset, then fused."""
    import frozen_clip
    import reso

    if not crops:
        return logits
    grid = frozen_clip.grid_for(model.backbone.visual, model.backbone.image_size)[1]
    index = {s.id: k for k, s in enumerate(dataset.samples)}
    crop_ds = reso.CropImages(dataset, [(index[ids[row]], c, box) for row, c, box in crops],
                              model.backbone.image_size, grid, model.cfg.reso_margin)
    crop_ids, crop_logits = model.predict_dataset(crop_ds, desc="test-time crops")
    at = {crop_id: k for k, crop_id in enumerate(crop_ds.ids)}
    return reso.fuse_crop_logits(logits, [crops[at[i]] for i in crop_ids], crop_logits, model.cfg.test_crop_weight)


def tag_images(checkpoint: str, images: str, out: str, threshold: float | None = None, top_k: int | None = None,
               overrides: dict | None = None, weights_format: str = "auto") -> dict:
    """Score every JPEG/PNG of `images` (folder, glob or file) and write the tags CSV. A photo is
    scored as a viewer shows it (its EXIF orientation applied), unlike a dataset's images. A
    class becomes a tag at or above `threshold`; without one, at or above the checkpoint's own
    per-class thresholds (chosen on its pseudo-labelled training images), else 0.5."""
    import pipeline
    from data import image_files

    target = check_out(out, "--images")
    dataset = image_files(images, upright=True)     # before the model: a mistyped path fails at once
    model = open_model(checkpoint, overrides or {}, weights_format)
    crops: list = []                                 # the test-time pass's, where the checkpoint has it on
    ids, logits = model.predict_dataset(dataset, on_maps=folder_crops(model.cfg, crops) if model.cfg.test_crops
                                        else None)
    if not ids:
        raise DataError(images, f"none of its {len(dataset)} image files could be read")
    logits = folder_small_object_pass(model, dataset, ids, logits, crops)
    check_finite_scores(checkpoint, ids, logits)
    classes = model.classes
    if threshold is None:
        recorded = pipeline.recorded_thresholds(model.metadata, classes)
        threshold = pipeline.TAG_THRESHOLD if recorded is None else recorded
    tags = pipeline.write_tags(target, ids, logits, classes, threshold, top_k)
    corrupt = len(dataset) - len(ids)
    return {"images": len(ids), "skipped": corrupt + sum(dataset.left_out.values()), "corrupt": corrupt,
            "left_out": dataset.left_out, "escaped_ids": sum(i in dataset.escaped_ids for i in ids),
            "classes": len(classes), "out": str(target), "threshold": tags["threshold"]}


def tagged_words(done: dict) -> str:
    """The summary of tag_images: `N images tagged, K skipped (why: corrupt, or not regular files
    by kind)`, and the ids written with \\xNN escapes when some file names are not UTF-8."""
    from data import left_out_words

    why = "corrupt" if not done["left_out"] else "; ".join(
        ([f"{done['corrupt']} corrupt"] if done["corrupt"] else []) + [left_out_words(done["left_out"])])
    escaped = done["escaped_ids"]
    return (f"{done['images']} images tagged, {done['skipped']} skipped ({why})"
            + (f", {escaped} {'id' if escaped == 1 else 'ids'} of a file name that is not UTF-8 written with \\xNN "
               "escapes" if escaped else ""))


def choose_categories(requested: str | None, categories: list[str], num_classes: int,
                      probs: np.ndarray | None = None, classes_shown: int = 3, backgrounds_shown: int = 2) -> list[int]:
    """Indices of the categories to draw: the requested names (comma-separated; an unknown one
    is an error listing the valid ones), or the best classes and backgrounds by `probs`."""
    if requested is not None:               # --categories "" names nothing: an error, not the defaults
        names = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = [n for n in names if n not in categories]
        if unknown or not names:
            problem = f"unknown category {unknown[0]!r}" if unknown else "names no category"
            raise DataError("--categories", f"{problem}; valid: {', '.join(categories)}")
        return [categories.index(n) for n in names]
    best = np.argsort(-probs, kind="stable")
    return ([int(c) for c in best if c < num_classes][:classes_shown]
            + [int(c) for c in best if c >= num_classes][:backgrounds_shown])


def visualize(checkpoint: str, image_path: str, out: str, requested: str | None = None,
              overrides: dict | None = None, weights_format: str = "auto") -> list[str]:
    """Draw the image beside the similarity map of each chosen category; returns their titles."""
    import figures
    from data import decode_image

    target = check_out(out, "--visualize")

    image = None

    def before_build(categories: list[str]) -> None:
        nonlocal image
        if requested is not None:           # a typo fails before the model loads
            choose_categories(requested, categories, 0)
        image = decode_image(image_path, upright=True)      # as --images scores it
    model = open_model(checkpoint, overrides or {}, weights_format, before_build=before_build)
    categories = model.categories
    seen = model.explain(image)
    check_finite_scores(checkpoint, [image_path], seen["logits"][None])
    probs = sigmoid(seen["logits"])
    chosen = choose_categories(requested, categories, len(model.classes), probs)
    grid = int(round(seen["sim"].shape[0] ** 0.5))
    panels = [figures.MapPanel(f"{categories[o]} {probs[o]:.2f}", seen["sim"][:, o].reshape(grid, grid),
                               seen["pooled"][:, o].tolist()) for o in chosen]
    note = (f"similarity to each category, min-max per map; squares: the {seen['pooled'].shape[0]} patches "
            "the Similarity Kernel pooled; number: probability")
    fig = figures.similarity_figure(image.permute(1, 2, 0).numpy(), Path(image_path).name, panels, note)
    write_png(fig, target)
    return [p.title for p in panels]


def read_report(path: str) -> tuple[dict, float | None]:
    """(per-class AP, mAP) of an eval.py --json (or train.py report.json) file."""
    from data import read_json

    raw = read_json(path, "report")
    ap = raw.get("AP") if isinstance(raw, dict) else None
    if not isinstance(ap, dict) or not ap:
        raise DataError(path, "not an eval.py --json report (no per-class 'AP' object)")
    for name, value in ap.items():
        if value is not None and not is_percentage(value):
            raise DataError(path, f"the AP of {name!r} is {value!r}, not a number from 0 to 100")
    mean = raw.get("mAP")
    if mean is not None and not is_percentage(mean):
        raise DataError(path, f"its mAP is {mean!r}, not a number from 0 to 100")
    return ap, None if mean is None else float(mean)


def is_percentage(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 100   # NaN is not


def plot_ap(paths: Sequence[str], out: str) -> None:
    """Per-class AP bars of one report, or paired bars of two."""
    import figures

    target = check_out(out, "--plot-ap")
    reports = [read_report(p) for p in paths]
    if len(reports) == 2 and set(reports[0][0]) != set(reports[1][0]):
        extra = sorted(set(reports[0][0]) ^ set(reports[1][0]))
        raise DataError(paths[1], f"its classes differ from those of {paths[0]} ({extra[0]!r}, ...)")
    names = [Path(p).name for p in paths]
    labels = names if len(set(names)) == len(names) else list(paths)
    write_png(figures.ap_figure([figures.APSeries(lb, ap, m) for lb, (ap, m) in zip(labels, reports)]), target)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="ckpt.safetensors written by train.py")
    parser.add_argument("--data-root", help="dataset root (default: the one recorded in the checkpoint)")
    parser.add_argument("--split", help="split to evaluate (default: the dataset's test split)")
    parser.add_argument("--clip-weights", help="CLIP weights file (default: the one recorded in the checkpoint)")
    parser.add_argument("--clip-weights-format", default="auto",
                        help="auto (safetensors or a weights-only torch state dict) | openai-torchscript; "
                             "never taken from the checkpoint")
    parser.add_argument("--cache-dir", help="feature cache to read and write (default: read the checkpoint's, "
                                            "encode what it lacks into <output root>/.cache/features: the "
                                            "current folder or $BACGCN_OUTPUT_ROOT)")
    parser.add_argument("--workers", type=integer_from(0), metavar="N",
                        help="image-reading processes for the feature cache and --images (default: "
                             "the checkpoint's; 0 reads in this process)")
    parser.add_argument("--test-crops", type=integer_from(0), metavar="N",
                        help="with a checkpoint (evaluating, or tagging --images): the test-time small-object "
                             "pass's crops per image (default: the checkpoint's; 0 turns it off)")
    parser.add_argument("--scores", help="predictions CSV (image_id + one column per class; a 'tags' column is "
                                         "skipped)")
    parser.add_argument("--labels", help="ground-truth CSV (image_id + 1/0/-1 per class)")
    parser.add_argument("--difficult", choices=DIFFICULT_MODES, default="ignore",
                        help="how difficult-only (0) labels count (default: ignore)")
    parser.add_argument("--threshold", type=finite_float, default=None,
                        help="score threshold of CP/CR/CF1, OP/OR/OF1 (default 0.5); with --images the probability "
                             "at or above which a class becomes a tag (default: the checkpoint's per-class "
                             "thresholds, chosen on its pseudo-labelled training images, else 0.5)")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--images", metavar="DIR_OR_GLOB",
                        help="tag every JPEG/PNG of a folder (recursive), a glob pattern ('**' recurses) or one "
                             "file; --out gets image_id, the sigmoid probability of each of the C classes, and "
                             "tags (the classes at or above --threshold, best first, ';'-separated)")
    parser.add_argument("--top-k", type=integer_from(1), metavar="K", help="with --images: at most K tags per image")
    parser.add_argument("--visualize", metavar="IMG",
                        help="draw IMG beside the similarity maps of chosen categories (PNG to --out)")
    parser.add_argument("--categories", metavar="A,B,...",
                        help="with --visualize: categories to draw (default: the 3 best classes and 2 best "
                             "backgrounds)")
    parser.add_argument("--plot-ap", nargs="+", metavar="REPORT",
                        help="draw per-class AP bars of one eval.py --json report, or paired bars of two (PNG "
                             "to --out)")
    parser.add_argument("--out", help="file to write: the tags CSV of --images (default: standard output), the PNG "
                                      "of --visualize or --plot-ap")
    return parser


def after_training_mode(args: argparse.Namespace) -> str | None:
    """The one of --images, --visualize or --plot-ap given, or None (evaluate instead)."""
    chosen = [name for name, value in (("--images", args.images), ("--visualize", args.visualize),
                                       ("--plot-ap", args.plot_ap)) if value]
    if len(chosen) > 1:
        raise DataError(chosen[1], f"give one of {', '.join(chosen)} at a time")
    return chosen[0] if chosen else None


def after_training(args: argparse.Namespace, mode: str) -> None:
    """Run --images, --visualize or --plot-ap (`mode`)."""
    if mode == "--plot-ap":
        if len(args.plot_ap) > 2:
            raise DataError("--plot-ap", f"takes one or two reports, got {len(args.plot_ap)}")
        plot_ap(args.plot_ap, args.out)
        print(f"wrote {args.out}: per-class AP of {' and '.join(args.plot_ap)}")
        return
    if not args.checkpoint:
        raise DataError(mode, "needs a checkpoint (eval.py ckpt.safetensors " + mode + " ...)")
    overrides = {"clip_weights": args.clip_weights, "workers": args.workers, "test_crops": args.test_crops}
    if args.images:
        # Without --out the CSV is standard output, and everything else the command says goes to stderr.
        to_stdout = not args.out
        with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
            done = tag_images(args.checkpoint, args.images, args.out or STDOUT, args.threshold, args.top_k,
                              overrides, args.clip_weights_format)
        print(f"wrote {'the CSV to standard output' if to_stdout else shown_path(done['out'])}: {tagged_words(done)}, "
              f"{done['classes']} class probabilities each, threshold {done['threshold']}"
              + (f", at most {args.top_k} tags" if args.top_k else ""), file=sys.stderr if to_stdout else sys.stdout)
    else:
        titles = visualize(args.checkpoint, args.visualize, args.out, args.categories, overrides,
                           args.clip_weights_format)
        print(f"wrote {args.out}: {args.visualize} beside {', '.join(titles)}")


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: neither --out nor --json is one of the files the command reads (the
    checkpoint, CLIP weights, a CSV, a report, an image: the photo to draw, every image to tag)."""
    from data import image_files

    photos = ([("--images", s.path) for s in image_files(args.images, upright=True).samples]
              if args.images and args.out else [])
    check_outputs_apart([("--out", args.out), ("--json", args.json)],
                        [("checkpoint", args.checkpoint), ("--clip-weights", args.clip_weights),
                         ("--scores", args.scores), ("--labels", args.labels), ("--visualize", args.visualize),
                         *(("--plot-ap", report) for report in args.plot_ap or []), *photos])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> None:
        mode = after_training_mode(args)
        check_outputs(args)
        if mode:
            after_training(args, mode)
        else:
            evaluate_command(parser, args)
    return run_command(body)


def evaluate_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A checkpoint on a split, or --scores against --labels; the report printed (and --json)."""
    if args.checkpoint is None and not (args.scores and args.labels):
        parser.error("give a checkpoint, or --scores and --labels")
    if args.json:
        check_writable(args.json, "--json")       # before the expensive part
    if args.cache_dir:
        check_writable(args.cache_dir, "--cache-dir", folder=True)
    if args.checkpoint:
        report = evaluate_checkpoint(args.checkpoint, args.data_root, args.split, args.difficult,
                                     args.clip_weights, args.cache_dir, args.clip_weights_format, args.workers,
                                     args.test_crops)
        report["threshold"] = 0.0
        print_checkpoint_report(report, args.difficult)
    else:
        report = evaluate_csv(args.scores, args.labels, args.difficult,
                              EVAL_THRESHOLD if args.threshold is None else args.threshold)
        print_report(report)
    if args.json:
        out = {k: report[k] for k in ("mAP", "AP", "CF1", "OF1", "difficult", "num_images")}
        out.update({k: v for k, v in report.items() if k not in out})
        write_json(args.json, out, indent=2)


def print_checkpoint_report(report: dict, difficult: str) -> None:
    print(f"{report['dataset']}/{report['split']}: mAP {report['mAP']:.2f}  CF1 {report['CF1']:.2f}  "
          f"OF1 {report['OF1']:.2f}" + "".join(f"  {k} {report[k]:.2f}" for k in ("mAP_small", "mAP_large")
                                           if k in report) + f"  ({report['num_images']} images, "
          f"difficult={difficult}, threshold: logit 0)")
    print_class_ap(report["AP"])


if __name__ == "__main__":
    sys.exit(main())
