"""The dataset registry: every fact about a dataset, in one entry.

An entry holds a dataset's name and the short names people type, its classes, its splits and
which two a run trains and tests on, what the paper's release puts on disk, the preset a run
takes, its synonym dictionary and its loader. Everything else reads the entry: no code outside
this file compares a dataset's name to a string. Adding a dataset is one `register(Dataset(...))`
and one loader function `(root, split, paths) -> (samples, class names)`:

    def load_toy(root, split, paths):
        return data.load_voc(root, 2007, split, TOY_CLASSES), TOY_CLASSES
    registry.register(registry.Dataset("toy", load_toy, splits=("trainval", "test"),
                                       train_split="trainval", test_split="test", classes=TOY_CLASSES,
                                       preset="synthetic-tiny", synonyms="toy.json"))

(Named `registry`, not `datasets`: a module of that name here would shadow the Hugging Face
`datasets` package, which transformers imports when it is installed.)

Each entry also names where its pieces are downloaded from, with their checksums (`Download`):
the official archives and the authors' captions at a pinned commit of their repository.

  python registry.py download voc07 [--data-folder DIR] [--data-root DIR] [--captions DIR]

fetches the pieces that are missing into the places a run reads (train.py --download does the
same before a run).

The data layer: this file imports data.py's loaders (and downloads.py) and nothing of the model.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

import cli
import data
import downloads
from data import MultiLabelImages, Sample

ROOT = Path(__file__).resolve().parent
SYNONYM_DIR = ROOT / "assets" / "synonyms"       # the project's dictionaries; the paper's under paper/
WORLD_SYNONYMS = "synonyms.json"                 # a dataset without a shipped dictionary keeps it beside its captions
DATA_FOLDER = "data_folder"                      # the paper's release layout: <data folder>/<dataset>/

# Loader: (root, split, file-location overrides such as annotation_file / image_dir) ->
# (samples with {1, 0, -1} labels, class names in column order), and optionally a third item:
# what the annotation files hold that no sample carries, counted (data.load_coco's `unused`).
Loader = Callable[[Path, str, dict], "tuple[list[Sample], Sequence[str]] | tuple[list[Sample], Sequence[str], dict]"]


def here_or_in_repo(path: str | os.PathLike, repo: Path = ROOT) -> Path:
    """A relative path as given when it exists here, else under `repo` when it exists there
    (where the default places are: data_folder/, assets/synthclip.safetensors), else as given."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (repo / p).exists():
        return repo / p
    return p


@dataclass(frozen=True)
class Download:
    """One official piece of a dataset: where it is fetched from, its checksum, and where it goes."""
    url: str
    checksum: str                # "md5:HEX" or "sha256:HEX" of the official file
    into: str                    # archive: the folder it unpacks into ('' = the place itself); file: its name
    present: str                 # what exists once it is in place: the piece is fetched only when this is missing
    unpack: bool = True          # an archive (.tar, .zip), unpacked into `into` and then deleted; else a file
    place: str = "data_root"     # the folder `into` and `present` are under: "data_root" or "captions"

    @property
    def file_name(self) -> str:
        return Path(urlsplit(self.url).path).name


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
    downloads: tuple[Download, ...] = ()   # its official pieces (`python registry.py download`, train.py --download)
    download_note: str = ""              # why a real dataset has none (said with its release_layout)
    # Images of its train and test split in the official release (the feature cache's sizes in bench/README.md)
    split_images: dict[str, int] = field(default_factory=dict)
    # A user's own photos: classes from --classes, no human labels (evaluated only with --labels), captioned
    # by BLIP-2 where it has no captions, its dictionary built from the class names, tagged after training.
    own_photos: bool = False

    def release_places(self, data_folder: str | os.PathLike, data_root: str = "",
                       captions: str = "") -> dict[str, Path]:
        """Where a run reads a real dataset and its captions (the keys are Download.place's and
        the config's): both <data_folder>/<name>/ in the paper's layout, unless given."""
        folder = Path(data_folder) / self.name
        return {"data_root": Path(data_root or folder), "captions": Path(captions or folder)}

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
        images = MultiLabelImages(samples, classes, transform, name=f"{self.name}/{split}", upright=self.own_photos)
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


# ============================================================================================
# Downloads: the official archives and the authors' captions, each with its checksum
# ============================================================================================

VOC_SITE = "https://thor.robots.ox.ac.uk/pascal/VOC"    # the VOC mirror torchvision reads (same md5s)
COCO_SITE = "http://images.cocodataset.org"
# The authors' repository at a pinned commit, so the caption files (and their sha256) cannot
# change under a run; it holds VOC captions only (COCO's and NUS-WIDE's: `captions.py generate`).
AUTHORS_CAPTIONS = ("https://raw.githubusercontent.com/yonghyeonjo46/BAC-GCN/"
                    "825d9d9bf0b87311ccaa9e4da0d0645cd3575642/caption")
# The paper's synonym dictionaries, shipped byte for byte in assets/synonyms/paper/ (voc2012.json
# is the same file as voc2007.json): pinned, so that any change to them fails a test.
PAPER_SYNONYMS_SHA256 = {
    "voc2007.json": "a239a75db247a1d00d085223d753e9defd97427ff2406b943012333f64a4f4e9",
    "voc2012.json": "a239a75db247a1d00d085223d753e9defd97427ff2406b943012333f64a4f4e9",
    "coco2014.json": "7df9cfc9eabe26ff896c40db06b3542c40dbd1d5c212dddec1629e29a6a7fae9",
    "nuswide.json": "91d49fec107e90d08272ba6924cea8d92da3cdcc7ae8652c8df4721b5e9a6da1",
}


def voc_archive(year: int, split: str, file_name: str, md5: str) -> Download:
    """A VOC tar, unpacked into its split's own release tree (data.VOC_RELEASE_TREES) as it unpacks: VOCdevkit/."""
    tree = data.VOC_RELEASE_TREES[str(year)][split]
    return Download(f"{VOC_SITE}/voc{year}/{file_name}", f"md5:{md5}", into=tree,
                    present=f"{tree}/VOCdevkit/VOC{year}")


def coco_archive(path: str, md5: str, present: str) -> Download:
    """A COCO zip: it holds its top folder (train2014/, val2014/, annotations/), unpacked into the root."""
    return Download(f"{COCO_SITE}/{path}", f"md5:{md5}", into="", present=present)


def authors_captions(dataset: str, captions_sha256: str, re_captions_sha256: str) -> tuple[Download, ...]:
    """The authors' <dataset>_captions.json and _re_captions.json, saved as captions.json and
    re_captions.json in the run's captions folder (where the caption stage reads them)."""
    return tuple(Download(f"{AUTHORS_CAPTIONS}/{dataset}/{dataset}_{name}", f"sha256:{sha256}", into=name,
                          present=name, unpack=False, place="captions")
                 for name, sha256 in (("captions.json", captions_sha256), ("re_captions.json", re_captions_sha256)))


register(Dataset(
    "voc2007", voc_loader(2007, VOC_CLASSES), splits=("trainval", "test", "train", "val"),
    train_split="trainval", test_split="test", aliases=("voc07",), classes=VOC_CLASSES, preset="voc2007-vitb16",
    release_layout="VOCtrainval_06-Nov-2007/ and VOCtest_06-Nov-2007/ (each tar as it unpacks: VOCdevkit/VOC2007)",
    synonyms="voc2007.json", voc_year=2007, split_images={"trainval": 5011, "test": 4952},
    downloads=(voc_archive(2007, "trainval", "VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64"),
               voc_archive(2007, "test", "VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f"),
               *authors_captions("voc2007", "72f757eb64a1968895487f552918035562ebdf00583e1f8202a0190e953338fa",
                                 "b1e8ed058f0e85326aab3f6d1fcfe671597c3465f020c599297428f686be7f7d"))))
register(Dataset(
    # The paper's captions cover the 1,464 segmentation-train images, not the 5,717 of Main
    # `train`: on `train`, 74 % of the images would train on no caption at all.
    "voc2012", voc_loader(2012, VOC_CLASSES), splits=("segtrain", "train", "val", "trainval"),
    train_split="segtrain", test_split="val", aliases=("voc12",), classes=VOC_CLASSES, preset="voc2012-vitb16",
    release_layout="VOC2012_train_val/ (the trainval tar as it unpacks: VOCdevkit/VOC2012)",
    synonyms="voc2012.json", voc_year=2012, split_images={"segtrain": 1464, "val": 5823},
    downloads=(voc_archive(2012, "trainval", "VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd"),
               *authors_captions("voc2012", "4e4ccef27627f2f2010336515baceafbe53f3d811f462bb92bc72e6ed1bf47f9",
                                 "22bfb2abc9d8724b8674d52769a757b5a5bc3cc00a4bd4e58d3c548bcc0b5706")),
    split_notes={"segtrain": "training on segtrain, the 1,464 images of ImageSets/Segmentation/train.txt that the "
                             "paper's captions cover; for all 5,717 of `train`, caption the rest (`python captions.py "
                             "generate --dataset voc2012 --split train ...`) and pass --train-split=train"}))
register(Dataset(
    "coco2014", load_coco2014, splits=("train", "val"), train_split="train", test_split="val",
    aliases=("coco", "coco14"), classes=COCO_CLASSES, preset="coco2014-vitb16",
    release_layout="train2014/, val2014/ and annotations/instances_{train,val}2014.json", synonyms="coco2014.json",
    split_images={"train": 82081, "val": 40137},      # the images with >= 1 annotation (DESIGN, evaluation)
    downloads=(coco_archive("zips/train2014.zip", "0da8c0bd3d6becc4dcb32757491aca88", "train2014"),
               coco_archive("zips/val2014.zip", "a3d79f5ed8d289b7a7554ce06a5782b3", "val2014"),
               coco_archive("annotations/annotations_trainval2014.zip", "0a379cfc70b0e71301e0f377548639bd",
                            "annotations"))))
register(Dataset(
    "nuswide", load_nuswide, splits=("train", "test"), train_split="train", test_split="test",
    aliases=("nus", "nus-wide"), classes=NUSWIDE_CONCEPTS, preset="nuswide-vitb16",
    release_layout="Flickr/, ImageList/, Groundtruth/TrainTestLabels/ and Concepts81.txt", synonyms="nuswide.json",
    download_note="no official download of its images", split_images={"train": 161789, "test": 107859}))


def class_list(spec: str) -> list[str]:
    """--classes: a file of class names (one a line; blank lines and # comments skipped) or a
    comma-separated list (`cat,dog,person`). Names are unique (in any case) and not empty."""
    path = Path(spec)
    if path.is_file():
        where, names = spec, [line.split("#", 1)[0].strip() for line in data.read_utf8(path, "class list").splitlines()]
        names = [n for n in names if n]
    elif "," not in spec and (path.suffix or os.sep in spec):
        raise data.DataError(spec, "class list file not found (--classes takes a file, one class a line, or "
                                   "cat,dog,...)")
    else:
        where, names = "--classes", [n.strip() for n in spec.split(",")]
        if not all(names):
            raise data.DataError(where, f"an empty class name in {spec!r} (two commas in a row, or one at an end)")
    if not names:
        raise data.DataError(where, "names no class")
    seen: dict[str, str] = {}
    for name in names:
        if name.lower() in seen:
            raise data.DataError(where, f"names the class {name!r} twice" + (f" (and as {seen[name.lower()]!r})"
                                                                         if seen[name.lower()] != name else ""))
        seen[name.lower()] = name
    return names


def labelled_folder(root: str | os.PathLike, classes: Sequence[str], labels: str = "") -> MultiLabelImages:
    """The user's photos under `root` as a dataset of `classes` (see `image_folder`; scored upright,
    as a viewer shows them). Without `labels` every label is 0 (unknown: nothing to evaluate);
    with a labels CSV (eval.py --labels format: image_id and one column per class, 1 / -1 / 0)
    the photos it names carry those labels, the others stay unknown (left out of every AP)."""
    found = data.image_folder(root, upright=True)
    if not len(found):
        raise data.DataError(root, "no JPEG or PNG files in this folder or below it"
                        + (f" ({data.left_out_words(found.left_out)})" if found.left_out else ""))
    table: dict[str, np.ndarray] = {}
    if labels:
        ids, columns, values = data.read_table_csv(labels, "labels")
        missing = [c for c in classes if c not in columns]
        if missing:
            raise data.DataError(labels, f"no column for the class {missing[0]!r} (its columns: "
                                         f"{', '.join(columns[:5])}{', ...' if len(columns) > 5 else ''})")
        bad = ~np.isin(values, (1, 0, -1))
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            raise data.DataError(labels, f"image {ids[row]!r}, class {columns[col]!r}: {values[row, col]:g} is "
                                         "not 1, -1 or 0")
        take = [columns.index(c) for c in classes]
        table = {i: values[k, take].astype(np.int8) for k, i in enumerate(ids)}
        if not set(table) & set(found.ids):
            raise data.DataError(labels, f"names none of the photos under {data.shown_path(root)} (its ids: "
                                         f"{ids[0]!r}, ...; the photos': {found.ids[0]!r}, ...: the path under the "
                                         "folder without extension)")
    unknown = np.zeros(len(classes), dtype=np.int8)
    samples = [Sample(s.id, s.path, table.get(s.id, unknown)) for s in found.samples]
    folder = MultiLabelImages(samples, classes, name=found.name, upright=True)
    folder.left_out, folder.escaped_ids = found.left_out, found.escaped_ids
    return folder


def load_folder(root: Path, split: str, paths: dict) -> tuple[list[Sample], Sequence[str]]:
    if not paths.get("classes"):
        raise data.DataError("--classes", "a folder of photos needs its class names: --classes=FILE (one a line) "
                                          "or --classes=cat,dog,...")
    classes = class_list(paths["classes"])
    return labelled_folder(root, classes, paths.get("labels") or "").samples, classes


register(Dataset(
    # Every JPEG/PNG under --data-root (subfolders too), one split: the photos train on their captions
    # and are tagged by the result.
    "folder", load_folder, splits=("all",), train_split="all", test_split="all", preset="folder-vitb16",
    title="photo folder", own_photos=True))
register(Dataset(
    # The proving ground (synthetic.py), VOC2007 layout, built here on first use; fit/val split
    # its trainval for tuning (bench/ablation.py --validation).
    "synthetic", load_synthetic, splits=("trainval", "test", "fit", "val"), train_split="trainval",
    test_split="test", classes_from=data.synthetic_classes, preset="synthetic-tiny", voc_year=2007,
    size_buckets=True, build_command=("synthetic.py", "build"), build_marker="world.json", title="proving-ground world",
    default_root="runs/world-seed{seed}"))



# ============================================================================================
# Fetching what is missing: `python registry.py download NAME`, train.py --download
# ============================================================================================

def fetch_missing(entry: Dataset, places: dict[str, Path], say: Callable[[str], None] = print) -> None:
    """Download, check and unpack the entry's pieces whose `present` path is missing, into
    `places` (its release_places: exactly where a run reads them), one line per piece. A dataset
    with no official download is one DataError line saying what to put where; one that is
    built here (the proving ground) has nothing to fetch."""
    if not entry.downloads:
        if entry.build_command or entry.own_photos:
            say(f"{entry.title or entry.name}: " + ("your own photos" if entry.own_photos else
                                                   "built here on first use, not downloaded") + ": nothing to fetch")
            return
        raise data.DataError(places["data_root"], f"{entry.download_note or 'no official download'}: put "
                                                  f"{entry.release_layout} here yourself (or elsewhere, and pass "
                                                  "--data-root=DIR)")
    show = data.shown_path
    for piece in entry.downloads:
        base = places[piece.place]
        if (base / piece.present).exists():
            say(f"in place: {show(base / piece.present)} (not fetched)")
            continue
        dest = base / (piece.file_name if piece.unpack else piece.into)
        how = "fetched" if downloads.fetch(piece.url, dest, piece.checksum) else "found"
        checked = f"{piece.checksum.partition(':')[0]} checked"
        if piece.unpack:
            downloads.unpack(dest, base / piece.into)
            say(f"{how} {piece.url} ({checked}), unpacked into {show(base / piece.into)}")
        else:
            say(f"{how} {piece.url} ({checked}) as {show(dest)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="registry.py", description="The dataset registry's command line.")
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="fetch, check and unpack what is missing of a dataset, from its "
                                                    "official sources, into the places a run reads",
                                   formatter_class=cli.DefaultsHelp)
    download.add_argument("name", help=f"a dataset ({', '.join(names())}) "
                                       "or its short name")
    download.add_argument("--data-folder", default=DATA_FOLDER,
                          help="the paper's layout: DIR/<dataset>/ (default data_folder: ./ first, then the repo)")
    download.add_argument("--data-root", default="", help="the dataset's own folder (default <data folder>/<dataset>)")
    download.add_argument("--captions", default="", help="the folder for captions.json and re_captions.json "
                                                         "(default <data folder>/<dataset>)")
    args = parser.parse_args(argv)

    def body() -> None:
        entry = get(args.name)
        fetch_missing(entry, entry.release_places(here_or_in_repo(args.data_folder), args.data_root,
                                                  args.captions))
    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
