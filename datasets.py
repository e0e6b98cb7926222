"""The dataset registry: every fact about a dataset, in one entry.

An entry holds a dataset's name and the short names people type, its classes, its splits and
which two a run trains and tests on, what the paper's release puts on disk, the preset a run
takes, its synonym dictionary and its loader. Everything else reads the entry: no code outside
this file compares a dataset's name to a string. Adding a dataset is one `register(Dataset(...))`
and one loader function `(root, split, paths) -> (samples, class names)`:

    def load_toy(root, split, paths):
        return data.load_voc(root, 2007, split, TOY_CLASSES), TOY_CLASSES
    datasets.register(datasets.Dataset("toy", load_toy, splits=("trainval", "test"),
                                       train_split="trainval", test_split="test", classes=TOY_CLASSES,
                                       preset="synthetic-tiny", synonyms="toy.json"))

The data layer: this file imports data.py's loaders and nothing of the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import data
from data import MultiLabelImages, Sample

ROOT = Path(__file__).resolve().parent
SYNONYM_DIR = ROOT / "assets" / "synonyms"       # the project's dictionaries; the paper's under paper/
WORLD_SYNONYMS = "synonyms.json"                 # a dataset without a shipped dictionary keeps it beside its captions

# Loader: (root, split, file-location overrides such as annotation_file / image_dir) ->
# (samples with {1, 0, -1} labels, class names in column order), and optionally a third item:
# what the annotation files hold that no sample carries, counted (data.load_coco's `unused`).
Loader = Callable[[Path, str, dict], "tuple[list[Sample], Sequence[str]] | tuple[list[Sample], Sequence[str], dict]"]


@dataclass(frozen=True)
class Dataset:
    name: str
    loader: Loader
    splits: tuple[str, ...]              # the split names its loader reads
    train_split: str                     # what a run trains on without --train-split ...
    test_split: str                      # ... and evaluates on without --test-split
    aliases: tuple[str, ...] = ()        # short names accepted by --dataset (voc07, coco, ...)
    classes: tuple[str, ...] = ()        # class names in column order; () = read from the data (`classes_from`)
    classes_from: Callable[[Path], Sequence[str]] | None = None
    preset: str | None = None            # the preset a run takes without --preset (None: --preset is required)
    release_layout: str = ""             # what the paper's release puts in <data_folder>/<name>/ ('' = built here)
    synonyms: str = ""                   # dictionary file in assets/synonyms/ ('' = synonyms.json beside the captions)
    voc_year: int | None = None          # VOC layout with boxes in Annotations/ (crop precision, size buckets)
    size_buckets: bool = False           # report mAP_small / mAP_large (the proving ground's size rule)
    build_command: tuple[str, ...] = ()  # a command that writes the dataset where it is missing (+ --out DIR --seed S)
    build_marker: str = ""               # the file a built copy holds
    title: str = ""                      # what messages call a copy of it ('' = its name)
    default_root: str = ""               # '' = <data_folder>/<name>; else a folder under the repo, {seed} filled in
    split_notes: dict[str, str] = field(default_factory=dict)   # said in the first lines of a run on that split

    def class_names(self, root: str | os.PathLike) -> list[str]:
        """The classes, in column order (from the data itself where the entry has none)."""
        if self.classes:
            return list(self.classes)
        if self.classes_from is None:
            raise ValueError(f"dataset {self.name}: the entry names neither classes nor classes_from")
        return list(self.classes_from(Path(root)))

    def check_split(self, split: str, option: str = "split") -> None:
        if split not in self.splits:
            raise ValueError(f"--{option.replace('_', '-')} {split}: not a split of {self.name} (its splits: "
                             f"{', '.join(self.splits)})")

    def load(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
             **paths) -> MultiLabelImages:
        """The images and labels of one split; `paths` overrides the loader's default file
        locations (`annotation_file`, `image_dir`)."""
        self.check_split(split)
        samples, classes, *unused = self.loader(Path(root), split, paths)
        images = MultiLabelImages(samples, classes, transform, name=f"{self.name}/{split}")
        images.unused_annotations = unused[0] if unused else {}
        return images

    def synonym_file(self, synonyms: str = "", beside: str | os.PathLike = "") -> Path:
        """The one rule for the dictionary: an explicit path; `paper` (the paper's own, where
        shipped); else the entry's shipped file, or synonyms.json in `beside` (the captions'
        folder) for a dataset that carries its own."""
        if synonyms and synonyms != "paper":
            return Path(synonyms)
        if not self.synonyms:
            if synonyms == "paper":
                raise ValueError(f"--synonyms=paper: the paper published no dictionary for {self.name}")
            return Path(beside) / WORLD_SYNONYMS
        return SYNONYM_DIR / ("paper" if synonyms == "paper" else "") / self.synonyms


REGISTRY: dict[str, Dataset] = {}


def register(entry: Dataset) -> Dataset:
    """Add a dataset (its name and aliases must be new)."""
    taken = [n for n in (entry.name, *entry.aliases) if n in REGISTRY or n in aliases()]
    if taken:
        raise ValueError(f"dataset name {taken[0]!r} is registered already")
    if entry.train_split not in entry.splits or entry.test_split not in entry.splits:
        raise ValueError(f"dataset {entry.name}: train_split and test_split must be among its splits")
    REGISTRY[entry.name] = entry
    return entry


def aliases() -> dict[str, str]:
    return {a: e.name for e in REGISTRY.values() for a in e.aliases}


def canonical(name: str) -> str:
    """A dataset's registered name from its name or a short name (any case); unknown names pass
    through unchanged, for the config's validation to refuse in one line."""
    key = name.lower()
    return key if key in REGISTRY else aliases().get(key, name)


def get(name: str) -> Dataset:
    entry = REGISTRY.get(canonical(name))
    if entry is None:
        raise ValueError(f"unknown dataset {name!r}; datasets: {', '.join(names())} "
                         f"(or {', '.join(aliases())})")
    return entry


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def load(name: str, root: str | os.PathLike, split: str, transform: Callable | None = None,
         **paths) -> MultiLabelImages:
    return get(name).load(root, split, transform, **paths)


# ============================================================================================
# Classes
# ============================================================================================

VOC_CLASSES = data.VOC_CLASSES   # the VOC reader's 20 classes, in the standard order
# COCO 2014's 80 classes in category-id order (official names; the dictionary spells some
# differently, so columns are mapped by position).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
# NUS-WIDE's 81 concepts in the order of the official Concepts81.txt.
NUSWIDE_CONCEPTS = (
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars",
    "castle", "cat", "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog",
    "earthquake", "elk", "fire", "fish", "flags", "flowers", "food", "fox", "frost", "garden",
    "glacier", "grass", "harbor", "horses", "house", "lake", "leaf", "map", "military", "moon",
    "mountain", "nighttime", "ocean", "person", "plane", "plants", "police", "protest", "railroad",
    "rainbow", "reflection", "road", "rocks", "running", "sand", "sign", "sky", "snow", "soccer",
    "sports", "statue", "street", "sun", "sunset", "surf", "swimmers", "tattoo", "temple", "tiger",
    "tower", "town", "toy", "train", "tree", "valley", "vehicle", "water", "waterfall", "wedding",
    "whales", "window", "zebra",
)


# ============================================================================================
# Loaders: the registry's side of data.py's file readers
# ============================================================================================

def voc_loader(year: int, classes: Sequence[str]) -> Loader:
    def load_voc(root: Path, split: str, paths: dict) -> tuple[list[Sample], Sequence[str]]:
        return data.load_voc(root, year, split, classes), classes
    return load_voc


def load_coco2014(root: Path, split: str, paths: dict) -> tuple[list[Sample], Sequence[str], dict]:
    annotations = paths.get("annotation_file") or root / "annotations" / f"instances_{split}2014.json"
    unused: dict = {}
    samples, classes = data.load_coco(annotations, paths.get("image_dir") or root / f"{split}2014", unused)
    return samples, classes, unused


def unused_annotation_words(name: str, unused: dict) -> str:
    """One line on what a split's annotation files hold that none of its samples carries
    (`data.load_coco`'s `unused`), '' when there is nothing: said in a run's first lines."""
    parts = []
    if unused.get("unknown_category_annotations"):
        ids = unused["unknown_category_ids"]
        parts.append(f"annotations naming a category id that no category has: {unused['unknown_category_annotations']}"
                     f" (id {', '.join(map(str, ids[:5]))}{', ...' if len(ids) > 5 else ''}), ignored")
    if unused.get("images_without_annotations"):
        parts.append(f"images without a class annotation: {unused['images_without_annotations']}, left out")
    return f"{name}: " + "; ".join(parts) if parts else ""


def load_nuswide(root: Path, split: str, paths: dict) -> tuple[list[Sample], Sequence[str]]:
    samples, concepts, _ = data.load_nuswide(root, split, paths.get("image_dir"))
    return samples, concepts


def load_synthetic(root: Path, split: str, paths: dict) -> tuple[list[Sample], Sequence[str]]:
    classes = data.synthetic_classes(root)
    return data.load_voc(root, 2007, split, classes), classes


register(Dataset(
    "voc2007", voc_loader(2007, VOC_CLASSES), splits=("trainval", "test", "train", "val"),
    train_split="trainval", test_split="test", aliases=("voc07",), classes=VOC_CLASSES, preset="voc2007-vitb16",
    release_layout="VOCtrainval_06-Nov-2007/ and VOCtest_06-Nov-2007/ (each tar as it unpacks: VOCdevkit/VOC2007)",
    synonyms="voc2007.json", voc_year=2007))
register(Dataset(
    # The paper's captions cover the 1,464 segmentation-train images, not the 5,717 of Main
    # `train`: on `train`, 74 % of the images would train on no caption at all.
    "voc2012", voc_loader(2012, VOC_CLASSES), splits=("segtrain", "train", "val", "trainval"),
    train_split="segtrain", test_split="val", aliases=("voc12",), classes=VOC_CLASSES, preset="voc2012-vitb16",
    release_layout="VOC2012_train_val/ (the trainval tar as it unpacks: VOCdevkit/VOC2012)",
    synonyms="voc2012.json", voc_year=2012,
    split_notes={"segtrain": "training on segtrain, the 1,464 images of ImageSets/Segmentation/train.txt that the "
                             "paper's captions cover; for all 5,717 of `train`, caption the rest (`python captions.py "
                             "generate --dataset voc2012 --split train ...`) and pass --train-split=train"}))
register(Dataset(
    "coco2014", load_coco2014, splits=("train", "val"), train_split="train", test_split="val",
    aliases=("coco", "coco14"), classes=COCO_CLASSES, preset="coco2014-vitb16",
    release_layout="train2014/, val2014/ and annotations/instances_{train,val}2014.json", synonyms="coco2014.json"))
register(Dataset(
    "nuswide", load_nuswide, splits=("train", "test"), train_split="train", test_split="test",
    aliases=("nus", "nus-wide"), classes=NUSWIDE_CONCEPTS, preset="nuswide-vitb16",
    release_layout="Flickr/, ImageList/, Groundtruth/TrainTestLabels/ and Concepts81.txt", synonyms="nuswide.json"))
register(Dataset(
    # The proving ground (synthetic.py), VOC2007 layout, built here on first use; fit/val split
    # its trainval for tuning (bench/ablation.py --validation).
    "synthetic", load_synthetic, splits=("trainval", "test", "fit", "val"), train_split="trainval",
    test_split="test", classes_from=data.synthetic_classes, preset="synthetic-tiny", voc_year=2007,
    size_buckets=True, build_command=("synthetic.py", "build"), build_marker="world.json", title="proving-ground world",
    default_root="runs/world-seed{seed}"))

