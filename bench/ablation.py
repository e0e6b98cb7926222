"""Every component's contribution, on the proving ground.

  python bench/ablation.py [--seed S] [--json out.json] [--key=value ...]

Rows, each adding one component to the one above: CLIP zero-shot (global embedding); + the
Similarity Kernel's local logits; + CLIP-GCN over classes only; + background categories;
+ ReSO (the full method). Columns: mAP, mAP_small, mAP_large on the world's test split.
The world of seed S is built under runs/ if absent; extra --key=value options go to every run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bacgcn  # noqa: E402
import train  # noqa: E402
from data import json_safe, write_json  # noqa: E402

ROWS = (
    ("+ similarity kernel local logits", dict(use_local=True, use_gcn=False, use_backgrounds=False, use_reso=False)),
    ("+ GCN without background categories", dict(use_local=True, use_gcn=True, use_backgrounds=False, use_reso=False)),
    ("+ GCN with backgrounds", dict(use_local=True, use_gcn=True, use_backgrounds=True, use_reso=False)),
    ("+ ReSO (full)", dict(use_local=True, use_gcn=True, use_backgrounds=True, use_reso=True)),
)
COLUMNS = ("mAP", "mAP_small", "mAP_large")


def ablation(seed: int, overrides: list[str]) -> dict:
    base, _ = bacgcn.parse_overrides([f"--seed={seed}", *overrides])
    rows = []
    for k, (name, switches) in enumerate(ROWS, start=1):
        cfg = base.replace(**switches, out=str(ROOT / "runs" / f"ablation-seed{seed}" / f"row{k + 1}"))
        print(f"== seed {seed}: {name}", flush=True)
        report = train.run(cfg, "synthetic-tiny")
        if not rows:
            rows.append({"name": "zero-shot global", **{c: report["zeroshot"].get(c) for c in COLUMNS}})
        rows.append({"name": name, **{c: report.get(c) for c in COLUMNS}})
    return {"seed": seed, "rows": json_safe(rows)}


def print_table(result: dict) -> None:
    print(f"\nseed {result['seed']}")
    print(f"{'':<40}" + "".join(f"{c:>11}" for c in COLUMNS))
    for row in result["rows"]:
        print(f"{row['name']:<40}" + "".join(f"{row[c]:>11.2f}" if row[c] is not None else f"{'n/a':>11}"
                                               for c in COLUMNS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write {seed, rows: [{name, mAP, mAP_small, mAP_large}]} here")
    args, overrides = parser.parse_known_args(argv)
    result = ablation(args.seed, overrides)
    print_table(result)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
