"""The README's caption-quality table: pseudo labels from real BLIP-2 captions against human labels.

  python bench/caption_table.py [--captions DIR] [--labels FILE.csv] [--json out.json]

Defaults: the VOC2007 captions and the 2,500 dev labels of ../shared/data/voc2007/. Rows:
  naive substring match   a category is named by a caption holding one of its phrases as a
                          substring of its lower-cased text (no tokens, no plurals, no spans)
  4-step filter           `python captions.py pseudo-labels --dataset voc2007 --context-weight 0`
  + context tie-break     the same with the default --context-weight (the pipeline's labels)
each with the paper's dictionary (`--synonyms paper`) and ours. Captions and re-captions are
voted over together; the context model is fit on every captioned image, as the command does,
and scored on the labelled ids only. mAP over the 20 classes (difficult ignored) and the best
pooled F1 over one threshold. Prints the markdown table; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import data  # noqa: E402
import registry  # noqa: E402
from captions import CAPTION_FILES, CaptionFilterConfig, SynonymDictionary, pseudo_labels, read_captions  # noqa: E402
from metrics import best_f1, mean_ap  # noqa: E402

VOC2007 = ROOT.parent / "shared" / "data" / "voc2007"
# (filter, dictionary, --context-weight); None: the naive substring baseline
ROWS = (
    ("naive substring match, captions + re-captions", "paper", None),
    ("4-step filter, vote fraction", "paper", 0.0),
    ("4-step filter, vote fraction", "ours", 0.0),
    ("4-step filter + caption-context tie-break (default)", "paper", CaptionFilterConfig.context_weight),
    ("4-step filter + caption-context tie-break (default)", "ours", CaptionFilterConfig.context_weight),
)


def substring_scores(captions: dict[str, list[str]], synonyms_file: Path, ids: list[str],
                     num_classes: int) -> np.ndarray:
    """Vote fraction [len(ids), C] of the captions holding any phrase of a class as a substring."""
    raw = data.read_json(synonyms_file, "synonym dictionary")
    phrases = [[p.lower() for p in syns] for syns in list(raw.values())[:num_classes]]
    scores = np.zeros((len(ids), num_classes))
    for row, image_id in enumerate(ids):
        caps = [c.lower() for c in captions.get(image_id, [])]
        for c, names in enumerate(phrases):
            scores[row, c] = sum(any(p in cap for p in names) for cap in caps) / max(len(caps), 1)
    return scores


def filter_scores(captions: dict[str, list[str]], synonyms_file: Path, ids: list[str], num_classes: int,
                  context_weight: float) -> np.ndarray:
    """The caption filter's soft labels [len(ids), C], as `captions.py pseudo-labels` computes them."""
    dictionary = SynonymDictionary.from_json(synonyms_file, num_classes)
    labels = pseudo_labels(captions, dictionary, data.VOC_CLASSES, CaptionFilterConfig(context_weight=context_weight))
    row = {i: k for k, i in enumerate(labels.ids)}
    return labels.scores[[row[i] for i in ids], :num_classes]


def measure(captions_dir: Path, labels_file: Path) -> list[dict]:
    captions = read_captions(captions_dir)
    ids, classes, labels = data.read_table_csv(labels_file, "labels")
    if list(classes) != list(data.VOC_CLASSES):
        raise data.DataError(labels_file, "columns must be the 20 VOC classes in the standard order")
    labels = labels.astype(np.int8)
    rows = []
    for name, dictionary, context_weight in ROWS:
        synonyms = registry.get("voc2007").synonym_file("paper" if dictionary == "paper" else "")
        if context_weight is None:
            scores = substring_scores(captions, synonyms, ids, len(classes))
        else:
            scores = filter_scores(captions, synonyms, ids, len(classes), context_weight)
        rows.append({"filter": name, "dictionary": dictionary, "context_weight": context_weight,
                     "mAP": round(mean_ap(scores, labels), 1), "best_F1": round(best_f1(scores, labels)[0], 3)})
        print(f"{name}, {dictionary}: mAP {rows[-1]['mAP']}, best F1 {rows[-1]['best_F1']}", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    """The README's table; the best mAP and best F1 in bold."""
    top_map, top_f1 = max(r["mAP"] for r in rows), max(r["best_F1"] for r in rows)
    lines = ["| filter | dictionary | mAP | best F1 |", "|---|---|---|---|"]
    for r in rows:
        m = f"**{r['mAP']:.1f}**" if r["mAP"] == top_map else f"{r['mAP']:.1f}"
        f1 = f"**{r['best_F1']:.3f}**" if r["best_F1"] == top_f1 else f"{r['best_F1']:.3f}"
        lines.append(f"| {r['filter']} | {r['dictionary']} | {m} | {f1} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=Path, default=VOC2007, help="folder with captions.json (+ re_captions.json)")
    parser.add_argument("--labels", type=Path, default=VOC2007 / "trainval_labels_dev.csv",
                        help="labels CSV (image_id, the 20 VOC classes; 1 / 0 difficult / -1)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        if args.json:
            data.check_writable(args.json, "--json")
        cli.check_outputs_apart([("--json", args.json)], [("--labels", args.labels), *(
            ("--captions", args.captions / name) for name in CAPTION_FILES)])
        rows = measure(args.captions, args.labels)
    except ValueError as e:   # data.DataError, and check_writable's refusal
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(rows))
    if args.json:
        data.write_json(args.json, {"captions": str(args.captions), "labels": str(args.labels), "rows": rows},
                        indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
