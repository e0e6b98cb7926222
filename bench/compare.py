"""Every annotation-free method on the same cached features, splits and metrics: one table.

  python bench/compare.py [--seed S] [--json out.json] [--validation] [--sweep] [--key=value ...]
  python bench/compare.py --preset=voc2007-vitb16 --data-root=... --captions=... --clip-weights=... --json out.json

Rows (peers.py holds the methods, their papers, equations and deviations):
  CLIP zero-shot   the global embedding against the prompt ensemble
  TagCLIP-style    training-free local-to-global classification + class-wise crop re-identification
  PIAA-style       training-free patch-level visual classifier (GDA on confident patches) + aggregation
  CDUL-style       crop-aggregated CLIP pseudo labels, a linear classifier trained with label updates
  linear probe     one linear layer on [g, max-pooled patches], on the caption pseudo labels
  BAC-GCN          the full method (train.py with the same config)
  BAC-GCN beyond   the same with ours beyond the paper on (config.BEYOND_THE_PAPER: ReSO proposals
                   beyond the captions around the maps' peaks, verified on the crop, and the test-time
                   small-object pass; the *-beyond presets)
Columns: mAP, CF1, OF1 (training-free rows at their threshold setting, trained ones at p = 0.5),
mAP_small and mAP_large (proving ground only), seconds (wall clock of the row once the images'
features are cached, its own crops' encoding included), trained (whether it fits parameters).
The proving ground of --seed S is built under runs/ if absent (default: the synthetic-tiny
preset); --key=value options configure the backbone, data and BAC-GCN as for train.py.
--validation scores on the fifth of trainval held out (as bench/ablation.py); --sweep varies
each training-free setting around its default there and prints the table the defaults were
chosen from.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ablation import carve_validation  # noqa: E402

import config  # noqa: E402
import data  # noqa: E402
import frozen_clip  # noqa: E402
import peers  # noqa: E402
import pipeline  # noqa: E402
import registry  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from metrics import best_f1  # noqa: E402

ROWS = ("CLIP zero-shot", "TagCLIP-style", "PIAA-style", "CDUL-style", "linear probe", "BAC-GCN", "BAC-GCN beyond")
# The trained rows of this trainer: the paper's method and the same with ours beyond the paper on.
TRAINER_ROWS = {"BAC-GCN": {}, "BAC-GCN beyond": config.BEYOND_THE_PAPER}
# The configurable peers: their settings (the defaults chosen on world 100's validation split) and methods
PEERS = {"TagCLIP-style": (peers.TagCLIPConfig(), peers.tagclip), "PIAA-style": (peers.PIAAConfig(), peers.piaa),
         "CDUL-style": (peers.CDULConfig(), peers.cdul)}
COLUMNS = ("mAP", "CF1", "OF1", "mAP_small", "mAP_large")
# Settings each --sweep varies, one at a time around the defaults
SWEEP = {
    "TagCLIP-style": {"global_weight": (0.25, 0.5, 0.75), "region_tau": (0.3, 0.5, 0.7),
                      "crop_margin": (0.0, 0.25, 0.5)},
    "PIAA-style": {"visual_weight": (0.0, 0.5, 1.0, 2.0), "topk": (1, 4, 16), "global_weight": (0.0, 0.5, 1.0, 2.0),
                   "patches_per_class": (100, 500, 2000)},
    "CDUL-style": {"label_update": (0.0, 0.1, 0.3)},
}


def configure(seed: int | None, overrides: list[str], validation: bool) -> tuple[config.BACGCNConfig, str]:
    args = list(overrides) + ([f"--seed={seed}"] if seed is not None else [])
    cfg, preset = config.parse_overrides(args)
    pipeline.resolve_device(cfg.device)
    cfg = pipeline.resolve_paths(cfg)
    if validation:
        if not registry.get(cfg.dataset).build_command:     # carve_validation splits a built world
            raise ValueError("--validation: only on the proving ground (real datasets have a validation split "
                             "of their own: pass --train-split / --test-split)")
        fit, val = carve_validation(Path(cfg.data_root), cfg.seed)
        cfg = cfg.replace(train_split=fit, test_split=val)
    return cfg.replace(out=cfg.out or str(ROOT / "runs" / f"compare-{cfg.dataset}-seed{cfg.seed}")), preset


def build_context(cfg) -> tuple[peers.Context, pipeline.CaptionLabels]:
    """The frozen backbone, both splits' cached features, T over the C classes and the scale."""
    device = pipeline.resolve_device(cfg.device)
    train_ds = registry.load(cfg.dataset, cfg.data_root, cfg.train_split)
    test_ds = registry.load(cfg.dataset, cfg.data_root, cfg.test_split)
    labels = pipeline.caption_labels(cfg, train_ds)
    backbone = pipeline.build_backbone(cfg, device)
    pipeline.check_against_backbone(cfg, backbone)
    c = len(labels.classes)
    text = backbone.class_embeddings(labels.prompt_names[:c], frozen_clip.tokenizer_for(cfg.clip_model), device=device)
    splits = [pipeline.cached_features(cfg, backbone, ds, device) for ds in (train_ds, test_ds)]
    for split, ds in zip(splits, (train_ds, test_ds)):
        pipeline.check_features(split, ds, cfg.data_root)
    scale = float(backbone.clip.logit_scale.exp().item())
    return peers.Context(cfg, backbone, splits[0], splits[1], text.float().cpu(), scale, device), labels


def _scored(ctx: peers.Context, scores: np.ndarray, threshold: float) -> dict:
    """Scores cut at `threshold` for CF1 / OF1 (evaluate_split cuts logits at 0)."""
    return pipeline.evaluate_split(ctx.cfg, scores - threshold, ctx.test, ctx.text.shape[0])


def peer_rows(ctx: peers.Context, labels: pipeline.CaptionLabels, names=ROWS, preset: str = "") -> dict[str, dict]:
    """{row: {columns..., seconds, trained}} for the rows `names`, each timed on its own."""
    c = ctx.text.shape[0]

    def run_linear_probe():
        soft, _ = labels.targets_for(ctx.train.ids, ctx.cfg.min_votes)
        x_test = peers.probe_inputs(ctx.test.feats)
        return peers.linear_probe(peers.probe_inputs(ctx.train.feats), soft[:, :c].contiguous(), x_test), 0.0

    def run_peer(name):      # trained rows are cut at p = 0.5 (logit 0), training-free ones at their threshold
        settings, method = PEERS[name]
        return method(ctx, settings), getattr(settings, "threshold", 0.0)

    runners = {
        "CLIP zero-shot": lambda: (peers.zero_shot(ctx.test.feats, ctx.text, ctx.scale), ZERO_SHOT_THRESHOLD),
        **{name: lambda name=name: run_peer(name) for name in PEERS},
        "linear probe": run_linear_probe,
    }
    out = {}
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        if name in TRAINER_ROWS:
            folder = str(Path(ctx.cfg.out) / name.lower().replace("-", "").replace(" ", "-"))
            report = train.run(ctx.cfg.replace(out=folder, **TRAINER_ROWS[name]), preset,
                               options=runs.RunOptions(overwrite=True))
            row = {k: report.get(k) for k in COLUMNS}
        else:
            scores, threshold = runners[name]()
            row = {k: v for k, v in _scored(ctx, scores, threshold).items() if k in COLUMNS}
        out[name] = {**{k: row.get(k) for k in COLUMNS}, "seconds": round(time.perf_counter() - t0, 1),
                     "trained": name in ("CDUL-style", "linear probe", *TRAINER_ROWS)}
    return out


# CLIP zero-shot's decision threshold on s * cos(g, T_c), chosen on world 100's validation
# split (--sweep): the logit at which pooled F1 is best there.
ZERO_SHOT_THRESHOLD = 3.87


def sweep(ctx: peers.Context) -> list[dict]:
    """Each training-free setting varied one at a time around its default, with the threshold
    that gives the best OF1 (pooled F1) for that setting; CDUL-style's label step too."""
    labels = ctx.test.dataset.labels_for(ctx.test.ids)
    table = []
    zs = peers.zero_shot(ctx.test.feats, ctx.text, ctx.scale)
    table.append({"row": "CLIP zero-shot", "setting": "-", "value": "-",
                  "mAP": _scored(ctx, zs, 0.0)["mAP"], "best_OF1_threshold": best_f1(zs, labels)[1]})
    for name, grid in SWEEP.items():
        base, fn = PEERS[name]
        for key, values in grid.items():
            for value in values:
                scores = fn(ctx, replace(base, **{key: value}))
                f1, cut = best_f1(scores, labels)
                table.append({"row": name, "setting": key, "value": value, "mAP": _scored(ctx, scores, 0.0)["mAP"],
                              "best_OF1": f1, "best_OF1_threshold": cut})
                print(f"{name:<14} {key}={value}: mAP {table[-1]['mAP']:.2f}, best OF1 {f1:.3f} at {cut:.3f}",
                      flush=True)
    return table


def print_table(rows: dict[str, dict]) -> None:
    print(f"\n{'':<16}" + "".join(f"{c:>11}" for c in (*COLUMNS, "seconds")) + "  trained")
    for name, row in rows.items():
        cells = "".join(f"{row[c]:>11.2f}" if row[c] is not None else f"{'-':>11}" for c in (*COLUMNS, "seconds"))
        print(f"{name:<16}{cells}  {'yes' if row['trained'] else 'no'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=runs.PASSED_ON)
    parser.add_argument("--seed", type=int, help="the proving ground's world (default: the preset's seed)")
    parser.add_argument("--json", type=Path, help='write {"rows": [{name, mAP, CF1, OF1, mAP_small, mAP_large, '
                                                  'seconds, trained}], ...} here')
    parser.add_argument("--rows", help=f"a comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--validation", action="store_true", help="train on four fifths of trainval, score on the "
                                                                  "fifth held out (for choosing settings)")
    parser.add_argument("--sweep", action="store_true", help="vary the training-free settings (with --validation)")
    args, overrides = parser.parse_known_args(argv)
    try:
        names = ROWS if not args.rows else tuple(r.strip() for r in args.rows.split(","))
        unknown = [r for r in names if r not in ROWS]
        if unknown:
            raise ValueError(f"--rows: unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
        if args.json:
            data.check_writable(args.json, "--json")
        cfg, preset = configure(args.seed, overrides, args.validation)
        ctx, labels = build_context(cfg)
        if args.sweep:
            result = {"sweep": sweep(ctx)}
        else:
            rows = peer_rows(ctx, labels, names, preset)
            print_table(rows)
            result = {"rows": [{"name": n, **r} for n, r in rows.items()]}
    except (ValueError, FileNotFoundError) as e:   # DataError, MissingPieces, bad options
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    settings = {"CLIP zero-shot": {"threshold": ZERO_SHOT_THRESHOLD},
                **{name: asdict(config) for name, (config, _) in PEERS.items()}}
    result.update({"preset": preset, "dataset": cfg.dataset, "seed": cfg.seed,
                   "split": f"{cfg.train_split} -> {cfg.test_split}", "settings": settings})
    if args.json:
        data.write_json(args.json, data.json_safe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
