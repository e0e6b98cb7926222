"""Every component's contribution on the proving ground, between a floor and a ceiling.

  python bench/ablation.py [--seed S] [--json out.json] [--validation] [--reuse old.json] [--key=value ...]

Rows, each adding one component to the row above, then the floor and the ceiling:
  zero-shot        CLIP's global embedding, untrained
  trained global   the head on the caption pseudo labels, global nodes only (no local logits, no GCN)
  + local          + the Similarity Kernel's local logits
  + GCN            + CLIP-GCN over the classes
  + backgrounds    + background categories (nodes, prompts, targets)
  + ReSO           + ReSO: the paper's full method
  + proposals ...  ours beyond the paper, each added to the row above (config.BEYOND_THE_PAPER, the
                   switches of the synthetic-tiny-beyond preset; the last such row is the new method)
  ... (lost)       a candidate that lost on world 100's validation split, added to `+ ReSO` (the
                   paper's method, where it was judged; --validation only: that split judged it)
  linear probe     one linear layer on [g, max-pooled patches], on the same soft pseudo labels
  linear probe (true labels)   the same probe on the true labels: what the labels alone are worth
  oracle           the full method trained on the true labels: this head's ceiling on these features
Columns: mAP, mAP_small, mAP_large on the world's test split; with --validation, on a fifth of
trainval held out (ImageSets/Main/fit.txt and val.txt, written once) and trained on the rest:
the split every setting was tuned on, so that no test split chooses anything.
The world of seed S is built under runs/ if absent; extra --key=value options go to every run.
--reuse takes every row an earlier result of the same seed and split holds (rows whose code
path has not changed since) and runs only the rest; the JSON lists which rows were reused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
import data  # noqa: E402
import pipeline  # noqa: E402
import registry  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from data import json_safe, write_json  # noqa: E402
from peers import ProbeConfig, linear_probe, probe_inputs  # noqa: E402  (the floor is a peer too)

_FULL = dict(use_local=True, use_gcn=True, use_backgrounds=True, use_reso=True, train_labels="captions")
STEPS = (
    ("trained global", dict(_FULL, use_local=False, use_gcn=False, use_backgrounds=False, use_reso=False)),
    ("+ local", dict(_FULL, use_gcn=False, use_backgrounds=False, use_reso=False)),
    ("+ GCN", dict(_FULL, use_backgrounds=False, use_reso=False)),
    ("+ backgrounds", dict(_FULL, use_reso=False)),
    ("+ ReSO", _FULL),
)
# Ours beyond the paper: the row that adds each switch of config.BEYOND_THE_PAPER, in its order.
BEYOND_NAMES = {"reso_propose": "+ proposals", "reso_propose_peak": "+ peak regions",
                "reso_propose_side": "+ close-ups", "test_crops": "+ test-time crops",
                "local_bypass": "+ local bypass", "loss": "+ missing-label loss", "large_loss": "+ large-loss rule"}
BEYOND_STEPS = tuple((BEYOND_NAMES[k], dict(_FULL, **dict(list(config.BEYOND_THE_PAPER.items())[:i + 1])))
                     for i, k in enumerate(config.BEYOND_THE_PAPER))
NEW_METHOD = BEYOND_STEPS[-1][0]
# Candidates that lost on world 100's validation split, each added to the paper's method: rows that say so.
LOST = tuple((f"{name} (lost)", dict(_FULL, **switches)) for name, switches in config.LOST_CANDIDATES)
ORACLE = dict(_FULL, train_labels="true")
ROW_NAMES = ("zero-shot", *(name for name, _ in STEPS + BEYOND_STEPS + LOST), "linear probe",
             "linear probe (true labels)", "oracle")
COLUMNS = ("mAP", "mAP_small", "mAP_large")
VALIDATION_SHARE = 0.2


def carve_validation(root: Path, seed: int) -> tuple[str, str]:
    """(fit, val) split names: a seeded fifth of trainval held out, written once next to it."""
    main = data.voc_root(root, 2007) / "ImageSets" / "Main"
    fit, val = main / "fit.txt", main / "val.txt"
    if not (fit.is_file() and val.is_file()):
        ids = registry.load("synthetic", str(root), "trainval").ids
        order = np.random.default_rng([seed, 17]).permutation(len(ids))
        cut = int(round(len(ids) * VALIDATION_SHARE))
        for path, part in ((val, order[:cut]), (fit, order[cut:])):
            text = "".join(f"{ids[k]}\n" for k in sorted(part))
            data.atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
    return "fit", "val"


def probe_rows(cfg: config.BACGCNConfig, probe: ProbeConfig) -> dict[str, dict]:
    """The linear probe on the cached features the runs trained on, scored like the runs: on the
    soft pseudo labels of the C classes, and on the training split's true labels."""
    train_ds = registry.load(cfg.dataset, cfg.data_root, cfg.train_split)
    test_ds = registry.load(cfg.dataset, cfg.data_root, cfg.test_split)
    backbone = pipeline.build_backbone(cfg, "cpu")
    tr = pipeline.cached_features(cfg, backbone, train_ds, "cpu")
    te = pipeline.cached_features(cfg, backbone, test_ds, "cpu")
    num_classes = len(train_ds.class_names)
    soft, _ = pipeline.caption_labels(cfg, train_ds).targets_for(tr.ids, cfg.min_votes)
    true = torch.from_numpy((train_ds.labels_for(tr.ids) == 1).astype(np.float32))
    x_train, x_test = probe_inputs(tr.feats), probe_inputs(te.feats)
    return {name: pipeline.evaluate_split(cfg, linear_probe(x_train, y, x_test, probe), te, num_classes)
            for name, y in (("linear probe", soft[:, :num_classes].contiguous()), ("linear probe (true labels)", true))}


def checks(rows: dict[str, dict]) -> dict:
    """The issues' targets, computed from one seed's rows: the paper's method (`+ ReSO`) and,
    where its row is there, the new method (issue 26)."""
    zero, full, oracle = rows["zero-shot"]["mAP"], rows["+ ReSO"]["mAP"], rows["oracle"]["mAP"]
    steps = [name for name, _ in STEPS][1:]
    drops = [rows[b]["mAP"] - rows[a]["mAP"] for a, b in zip(steps, steps[1:])]
    out = {"gap_closed": (full - zero) / (oracle - zero) if oracle != zero else float("nan"),
           "oracle_above_zero_shot": oracle - zero,
           "worst_step_from_local": min(drops),
           "reso_small_gain": rows["+ ReSO"]["mAP_small"] - rows["+ backgrounds"]["mAP_small"],
           "full_minus_linear_probe": full - rows["linear probe"]["mAP"],
           "labels_room": rows["linear probe (true labels)"]["mAP"] - rows["linear probe"]["mAP"]}
    if NEW_METHOD in rows:
        new = rows[NEW_METHOD]
        out.update({"new_minus_linear_probe": new["mAP"] - rows["linear probe"]["mAP"],
                    "new_small_over_backgrounds": new["mAP_small"] - rows["+ backgrounds"]["mAP_small"],
                    "new_large_minus_paper": new["mAP_large"] - rows["+ ReSO"]["mAP_large"],
                    "new_gap_closed": (new["mAP"] - zero) / (oracle - zero) if oracle != zero else float("nan")})
    return out


def ablation(seed: int, overrides: list[str], validation: bool = False, probe: ProbeConfig = ProbeConfig(),
             reuse: dict | None = None) -> dict:
    base, _ = config.parse_overrides(["--preset=synthetic-tiny", f"--seed={seed}", *overrides])
    base = pipeline.resolve_paths(base)
    if validation:
        fit, val = carve_validation(Path(base.data_root), seed)
        base = base.replace(train_split=fit, test_split=val)
    folder = ROOT / "runs" / f"ablation-seed{seed}{'-val' if validation else ''}"
    split = f"{base.train_split} -> {base.test_split}"
    if reuse is not None and (reuse.get("seed"), reuse.get("split")) != (seed, split):
        raise ValueError(f"--reuse: that result is of seed {reuse.get('seed')} ({reuse.get('split')}), "
                         f"not seed {seed} ({split})")
    earlier = {r["name"]: {c: r[c] for c in COLUMNS} for r in (reuse or {}).get("rows", [])}
    rows = {n: r for n, r in earlier.items() if n in ROW_NAMES}
    extra, quality = dict((reuse or {}).get("reso", {})), (reuse or {}).get("caption_quality", {})
    for k, (name, switches) in enumerate([*STEPS, *BEYOND_STEPS, *LOST, ("oracle", ORACLE)], start=1):
        if name in rows or (not validation and (name, switches) in LOST):
            continue
        cfg = base.replace(**switches, out=str(folder / f"row{k}"))
        print(f"== seed {seed}: {name}", flush=True)
        report = train.run(cfg, "synthetic-tiny", options=runs.RunOptions(overwrite=True))
        if "zero-shot" not in rows:
            rows["zero-shot"] = {c: report["zeroshot"].get(c) for c in COLUMNS}
            quality = report["caption_quality"]
        rows[name] = {c: report.get(c) for c in COLUMNS}
        if report.get("reso") or report.get("test_pass"):
            extra[name] = {**(report.get("reso") or {}),
                           **{f"test_{k}": v for k, v in (report.get("test_pass") or {}).items()}}
    if not {"linear probe", "linear probe (true labels)"} <= set(rows):
        print(f"== seed {seed}: linear probes", flush=True)
        rows.update(probe_rows(base.replace(**_FULL), probe))
    result = {"seed": seed, "split": split, "caption_quality": quality,
              "rows": [{"name": n, **{c: rows[n].get(c) for c in COLUMNS}} for n in ROW_NAMES if n in rows],
              "checks": checks(rows), "reso": extra, "reused": sorted(set(earlier) & set(ROW_NAMES))}
    return json_safe(result)


def print_table(result: dict) -> None:
    print(f"\nseed {result['seed']} ({result['split']})")
    width = max(28, *(len(row["name"]) + 2 for row in result["rows"]))
    print(f"{'':<{width}}" + "".join(f"{c:>11}" for c in COLUMNS))
    for row in result["rows"]:
        print(f"{row['name']:<{width}}" + "".join(f"{row[c]:>11.2f}" if row[c] is not None else f"{'n/a':>11}"
                                             for c in COLUMNS))
    print("  ".join(f"{k} {v:.3f}" for k, v in result["checks"].items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=runs.PASSED_ON)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write {seed, split, caption_quality, rows: [{name, mAP, mAP_small, "
                                       "mAP_large}], checks, reso} here")
    parser.add_argument("--validation", action="store_true",
                        help="train on four fifths of trainval, score on the fifth held out (for tuning)")
    parser.add_argument("--reuse", help="an earlier --json of the same seed and split: its rows are not run again")
    args, overrides = parser.parse_known_args(argv)
    reuse = data.read_json(args.reuse, "--reuse") if args.reuse else None
    result = ablation(args.seed, overrides, args.validation, reuse=reuse)
    print_table(result)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
