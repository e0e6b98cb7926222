"""Data layer: dataset loaders, the caption filter (pseudo labels + co-occurrence graph).

Data flows one way: files -> this module -> tensors. Nothing here imports the model.

CLI:
  python data.py pseudo-labels --dataset voc2007 --captions DIR --out scores.csv \
      [--synonyms FILE.json|paper] [--graph graph.safetensors]
  python data.py captions --dataset coco2014|...|folder --data-root ROOT [--split SPLIT] \
      --model BLIP2_DIR --out DIR          # needs the optional extra: requirements-captions.txt
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import unicodedata
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent
SYNONYM_DIR = ROOT / "assets" / "synonyms"


class DataError(ValueError):
    """Bad input file. The message is one line naming the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem

    def __reduce__(self):      # raised in a worker process, it is pickled back to the main one whole
        return type(self), (self.path, self.problem)


def read_json(path: str | os.PathLike, what: str, object_pairs_hook: Callable | None = None):
    """Parsed JSON, or a one-line DataError naming the file (missing, or not JSON).
    `object_pairs_hook` is json.loads's (it sees every key of an object, duplicates included)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=object_pairs_hook)
    except FileNotFoundError:
        raise DataError(path, f"{what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(path, f"not valid JSON{where}") from None
    except RecursionError:
        raise DataError(path, "not valid JSON (nested too deeply)") from None


def read_utf8(path: Path, kind: str) -> str:
    """Text of a user's file, or a one-line DataError `not a UTF-8 <kind>` naming it.

    A leading BOM is dropped: spreadsheets ("CSV UTF-8") and Windows editors write one, and
    it would otherwise glue itself to the first header or id. NUL never occurs in text, so it
    means UTF-16 without a BOM, or binary data.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not a UTF-8 {kind} (byte {e.start} does not decode; UTF-16 or binary?)") from None
    if "\x00" in text:
        raise DataError(path, f"not a UTF-8 {kind} (it holds NUL bytes; UTF-16 or binary?)")
    return text


def contained_path(root: str | os.PathLike, relative: str, source_file: str | os.PathLike) -> Path:
    """`root / relative` for an image path read from `source_file` (a list or annotation file),
    or a one-line DataError naming that file and the entry when the path is not inside `root`.

    Annotation files come from elsewhere, so their paths are untrusted. The check is lexical:
    backslashes count as separators (lists written on Windows), the path is normalised with
    os.path.normpath, and it is refused when absolute (`/x`, `\\x`, `C:\\x`), when `..` climbs
    out of `root`, or when it names `root` itself. Symlinks are deliberately not resolved:
    datasets are often symlinked folders (`JPEGImages -> /mnt/...`), and a link placed inside
    the dataset is its owner's choice, whereas a `..` in a downloaded file is not.
    """
    entry = relative.replace("\\", "/")
    normal = os.path.normpath(entry) if entry else "."
    if PureWindowsPath(entry).anchor:
        problem = "is absolute, not inside"
    elif normal == ".." or normal.startswith("../"):
        problem = "leads outside"
    elif normal == ".":
        problem = "names no file inside"
    else:
        return Path(root) / normal
    raise DataError(source_file, f"path {relative!r} {problem} {root}")


# --------------------------------------------------------------------------------------------
# Class lists
# --------------------------------------------------------------------------------------------

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# Official split names per dataset (the folder/file naming of each release).
SPLITS = {
    "voc2007": ("trainval", "test", "train", "val"),
    "voc2012": ("train", "val", "trainval"),
    "coco2014": ("train", "val"),
    "nuswide": ("train", "test"),
    # the proving ground (synthetic.py), VOC2007 layout; fit/val: trainval split for tuning (bench/ablation.py)
    "synthetic": ("trainval", "test", "fit", "val"),
}
DATASETS = tuple(SPLITS)
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
CLASS_NAMES = {"voc2007": VOC_CLASSES, "voc2012": VOC_CLASSES, "coco2014": COCO_CLASSES,
               "nuswide": NUSWIDE_CONCEPTS}

# ============================================================================================
# Dataset loaders: real on-disk formats -> (image id, image path, {1, 0, -1} label vector)
# ============================================================================================

@dataclass
class Sample:
    id: str
    path: Path
    labels: np.ndarray  # int8 [C]: 1 present, 0 difficult-only, -1 absent


@dataclass
class VOCObject:
    name: str
    difficult: bool
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in pixels


@dataclass
class VOCAnnotation:
    filename: str
    width: int
    height: int
    objects: list[VOCObject]


def _xml_text(node: ET.Element | None, default: str = "") -> str:
    return (node.text or "").strip() if node is not None else default


def read_voc_annotation(path: str | os.PathLike) -> VOCAnnotation:
    """One VOC XML file. An empty `<difficult/>` (what many exporters write) means 0."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(path, "annotation file not found") from None
    except (ET.ParseError, LookupError) as e:  # LookupError: an unknown encoding="..." declaration
        raise DataError(path, f"not valid XML ({e})") from None
    if root.tag != "annotation":
        raise DataError(path, f"root element is <{root.tag}>, expected <annotation>")
    try:
        size = root.find("size")
        width = int(float(_xml_text(size.find("width") if size is not None else None, "0") or 0))
        height = int(float(_xml_text(size.find("height") if size is not None else None, "0") or 0))
        objects = []
        for obj in root.iter("object"):
            name = _xml_text(obj.find("name"))
            if not name:
                raise ValueError("an <object> has no <name>")
            difficult = _xml_text(obj.find("difficult"), "0") or "0"
            bb = obj.find("bndbox")
            box = tuple(float(_xml_text(bb.find(k), "0") or 0) for k in ("xmin", "ymin", "xmax", "ymax")) \
                if bb is not None else (0.0, 0.0, 0.0, 0.0)
            objects.append(VOCObject(name.lower(), int(float(difficult)) != 0, box))
    except (ValueError, OverflowError) as e:  # OverflowError: a size or flag of "inf"
        raise DataError(path, f"malformed annotation ({e})") from None
    return VOCAnnotation(_xml_text(root.find("filename")) or path.stem + ".jpg", width, height, objects)


# The paper's release layout unpacks each VOC tar into a folder of its own under
# data_folder/voc20xx/ (each holding VOCdevkit/VOC20xx), so trainval and test are separate trees.
VOC_RELEASE_TREES = {
    "2007": {"trainval": "VOCtrainval_06-Nov-2007", "train": "VOCtrainval_06-Nov-2007",
             "val": "VOCtrainval_06-Nov-2007", "test": "VOCtest_06-Nov-2007"},
    "2012": {"trainval": "VOC2012_train_val", "train": "VOC2012_train_val", "val": "VOC2012_train_val",
             "test": "VOC2012_test"},
}


def voc_root(root: str | os.PathLike, year: int | str, split: str | None = None) -> Path:
    """Accept `VOCdevkit`, `VOCdevkit/VOC2007`, a folder holding `JPEGImages/` itself, or the
    release layout: the split's own tree below `root` (`VOCtest_06-Nov-2007/VOCdevkit/VOC2007`
    for the 2007 test split), looked at first."""
    root = Path(root)
    tree = VOC_RELEASE_TREES.get(str(year), {}).get(split or "")
    for base in ([root / tree] if tree else []) + [root]:
        for cand in (base, base / f"VOC{year}", base / "VOCdevkit" / f"VOC{year}"):
            if (cand / "JPEGImages").is_dir():
                return cand
    hint = f" (for {split}: {tree}/VOCdevkit/VOC{year}, as its tar unpacks, or one merged VOCdevkit)" if tree else ""
    raise DataError(root, f"no VOC{year} folder with JPEGImages/ found here{hint}")


def _read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(path, "split file not found")
    ids = [line.split()[0] for line in read_utf8(path, "split file").splitlines() if line.strip()]
    if not ids:
        raise DataError(path, "split file lists no image")
    return ids


def _read_voc_class_file(path: Path, known: dict[str, int]) -> dict[str, int]:
    values: dict[str, int] = {}
    for n, line in enumerate(read_utf8(path, "class file").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
            raise DataError(path, f"line {n}: expected '<image id> <1|0|-1>', got {line.strip()!r}")
        values[parts[0]] = int(parts[1])
    missing = [i for i in known if i not in values]
    if missing:
        raise DataError(path, f"{len(missing)} images of the split are missing (first: {missing[0]})")
    return values


def load_voc(root: str | os.PathLike, year: int | str = 2007, split: str | None = "trainval",
             class_names: Sequence[str] = VOC_CLASSES) -> list[Sample]:
    """PASCAL VOC image-level labels in {1, 0, -1}, standard 20-class order.

    From `ImageSets/Main/<class>_<split>.txt` when all 20 exist (the official labels), else
    from the XML files: present if any non-difficult instance, 0 if only difficult ones.
    `split=None` takes every file in Annotations/ (folders without ImageSets, as exporters
    write them).
    """
    base = voc_root(root, year, split)
    main = base / "ImageSets" / "Main"
    if split is None:
        id_source = base / "Annotations"
        ids = sorted(p.stem for p in id_source.glob("*.xml"))
        if not ids:
            raise DataError(id_source, "no .xml annotation found")
    else:
        id_source = main / f"{split}.txt"
        ids = _read_id_list(id_source)
    index = {i: k for k, i in enumerate(ids)}
    labels = np.full((len(ids), len(class_names)), -1, dtype=np.int8)
    class_files = [main / f"{c}_{split}.txt" for c in class_names] if split else []
    if class_files and all(f.is_file() for f in class_files):
        for c, f in enumerate(class_files):
            for image_id, v in _read_voc_class_file(f, index).items():
                if image_id in index:
                    labels[index[image_id], c] = v
        paths = [contained_path(base / "JPEGImages", f"{i}.jpg", id_source) for i in ids]
    else:
        cls = {c: k for k, c in enumerate(class_names)}
        paths = []
        for k, image_id in enumerate(ids):
            xml = contained_path(base / "Annotations", f"{image_id}.xml", id_source)
            ann = read_voc_annotation(xml)
            for obj in ann.objects:
                if obj.name not in cls:
                    raise DataError(xml, f"unknown class {obj.name!r} (expected one of the {len(cls)} VOC classes)")
                c = cls[obj.name]
                labels[k, c] = max(labels[k, c], 0 if obj.difficult else 1)
            paths.append(contained_path(base / "JPEGImages", ann.filename, xml))
    return [Sample(i, p, labels[k]) for k, (i, p) in enumerate(zip(ids, paths))]


# Category names that annotation tools add and that are not classes.
_NON_CLASS_CATEGORIES = {"_background_", "__background__", "background", "__ignore__"}


def load_coco(annotation_file: str | os.PathLike, image_dir: str | os.PathLike) -> tuple[list[Sample], list[str]]:
    """COCO instances JSON -> samples of the images with >= 1 annotation, classes in id order.

    pycocotools is not needed. Ids are file-name stems ("COCO_val2014_000000000042").
    """
    path = Path(annotation_file)
    raw = read_json(path, "annotation file")
    try:
        cats = sorted((c for c in raw["categories"] if c["name"] not in _NON_CLASS_CATEGORIES),
                      key=lambda c: c["id"])
        column = {c["id"]: k for k, c in enumerate(cats)}
        images = {im["id"]: im["file_name"] for im in raw["images"]}
        labels: dict[int, np.ndarray] = {}
        for a in raw["annotations"]:
            if a["category_id"] not in column:
                continue
            if a["image_id"] not in images:
                raise ValueError(f"annotation {a.get('id')} names unknown image {a['image_id']}")
            row = labels.setdefault(a["image_id"], np.full(len(cats), -1, dtype=np.int8))
            row[column[a["category_id"]]] = 1
        order = sorted(labels)
        for i in order:
            if not isinstance(images[i], str):
                raise ValueError(f"image {i!r}: file_name {images[i]!r} is not a string")
    except (KeyError, TypeError) as e:
        raise DataError(path, f"not a COCO instances file (missing or bad field {e})") from None
    except ValueError as e:
        raise DataError(path, str(e)) from None
    paths = {i: contained_path(image_dir, images[i], path) for i in order}
    samples = [Sample(paths[i].stem, paths[i], labels[i]) for i in order]
    return samples, [c["name"] for c in cats]


def load_nuswide(root: str | os.PathLike, split: str = "train",
                 image_dir: str | os.PathLike | None = None) -> tuple[list[Sample], list[str], int]:
    """NUS-WIDE official layout -> (samples, 81 concepts, number of listed images missing on disk).

    `ImageList/{Train,Test}Imagelist.txt` (Windows paths `actor\\0001_2124494179.jpg`),
    `Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt` (one 0/1 per image, same
    order), `Concepts81.txt`. Images live under `Flickr/` unless `image_dir` says otherwise.
    Images missing on disk (many Flickr links died) are counted and left out, not fatal.
    """
    root = Path(root)
    tag = {"train": "Train", "test": "Test"}.get(split)
    if tag is None:
        raise ValueError(f"NUS-WIDE split must be train or test, got {split!r}")
    concepts_file = root / "Concepts81.txt"
    if not concepts_file.is_file():
        raise DataError(concepts_file, "concept list not found")
    concepts = [c.strip() for c in read_utf8(concepts_file, "concept list").splitlines() if c.strip()]
    if not concepts:
        raise DataError(concepts_file, "concept list names no concept")
    list_file = root / "ImageList" / f"{tag}Imagelist.txt"
    if not list_file.is_file():
        raise DataError(list_file, "image list not found")
    image_dir = Path(image_dir) if image_dir is not None else root / "Flickr"
    paths = [contained_path(image_dir, line.strip(), list_file)
             for line in read_utf8(list_file, "image list").splitlines() if line.strip()]
    if not paths:
        raise DataError(list_file, "image list lists no image")
    labels = np.empty((len(paths), len(concepts)), dtype=np.int8)
    for c, name in enumerate(concepts):
        f = root / "Groundtruth" / "TrainTestLabels" / f"Labels_{name}_{tag}.txt"
        if not f.is_file():
            raise DataError(f, "label file not found")
        vals = read_utf8(f, "label file").split()
        if len(vals) != len(paths):
            raise DataError(f, f"has {len(vals)} labels, {list_file.name} lists {len(paths)} images")
        if not set(vals) <= {"0", "1"}:
            raise DataError(f, f"labels must be 0 or 1, found {sorted(set(vals) - {'0', '1'})[:3]}")
        labels[:, c] = np.where(np.array(vals) == "1", 1, -1)
    samples, missing = [], 0
    for k, p in enumerate(paths):
        if p.is_file():
            samples.append(Sample(p.stem, p, labels[k]))
        else:
            missing += 1
    if missing:
        warnings.warn(f"{list_file}: {missing} of {len(paths)} listed images are missing under {image_dir}; "
                      f"evaluating on the {len(samples)} present", stacklevel=2)
    return samples, concepts, missing


def decode_image(path: str | os.PathLike):
    """Decoded RGB uint8 tensor [3, H, W], or DataError naming the file.

    Pillow decodes: pillow-simd (the setup installs it) and current Pillow wheels both link
    libjpeg-turbo, and unlike torchvision.io (deprecated for decoding since 0.29) it reads
    every format the datasets ship. CMYK and greyscale JPEGs come out RGB. A file declaring
    more pixels than Pillow's limit (a few hundred bytes can claim 30000 x 30000) raises
    DecompressionBombError, which is no OSError: caught here like every other decode failure.
    """
    import torch
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.exists() and not path.is_file():      # a FIFO or a device: reading it may never end
        raise DataError(path, "cannot decode image (not a regular file)")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise DataError(path, f"cannot decode image ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class MultiLabelImages:
    """A map-style dataset of decoded images with {1, 0, -1} label vectors.

    `dataset[i]` is {"image": transform(uint8 [3, H, W]), "labels": int8 tensor [C],
    "id": str, "index": int}, or None when the image is missing or corrupt: a one-line
    warning names the file, `collate_images` drops it and counts it in the batch, and
    `SkipReport` sums the counts for the end-of-run summary. One bad file never stops an epoch.
    """

    def __init__(self, samples: list[Sample], class_names: Sequence[str],
                 transform: Callable | None = None, name: str = ""):
        self.samples = samples
        self.class_names = list(class_names)
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def files_stamp(self) -> str:
        """Digest of every image file's size and modification time: part of a feature cache's
        key, so an image changed on disk is encoded again instead of read from the stale cache."""
        import hashlib

        digest = hashlib.sha256()
        for s in self.samples:
            try:
                st = os.stat(s.path)
                digest.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(b"missing\n")
        return digest.hexdigest()

    def label_matrix(self) -> np.ndarray:
        return np.stack([s.labels for s in self.samples]) if self.samples else \
            np.zeros((0, len(self.class_names)), dtype=np.int8)

    def labels_for(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of `label_matrix` in the order of `ids` (a cache's or a caption file's order)."""
        row = {sample.id: k for k, sample in enumerate(self.samples)}
        return self.label_matrix()[[row[i] for i in ids]]

    def __getitem__(self, index: int):
        import torch

        s = self.samples[index]
        try:
            image = decode_image(s.path)
        except DataError as e:
            warnings.warn(f"skipping image: {e}", stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "labels": torch.from_numpy(s.labels.astype(np.int8)),
                "id": s.id, "index": index}


def collate_images(batch: list[dict | None]) -> dict:
    """Stack the good items; `skipped` counts the bad ones (see MultiLabelImages).

    In a loader worker the tensors are moved to shared memory here, as torch's default_collate
    does: when that memory cannot be had (a full disk, `ulimit -f`), the error is then raised in
    the worker's loop and reaches the main process. Left to the queue's sending thread, it was
    printed there, the batch was lost, and the main process waited for it forever."""
    import torch

    good = [b for b in batch if b is not None]
    out = {"skipped": len(batch) - len(good), "id": [b["id"] for b in good]}
    if good:
        out["image"] = torch.stack([b["image"] for b in good])
        out["labels"] = torch.stack([b["labels"] for b in good])
        out["index"] = torch.tensor([b["index"] for b in good])
        if torch.utils.data.get_worker_info() is not None:
            for key in ("image", "labels", "index"):
                out[key].share_memory_()
    return out


LOADER_TIMEOUT_S = 600   # no batch of images takes this long to read; a worker stuck for good does


def image_batches(dataset, batch_size: int, workers: int, pin_memory: bool = False):
    """The `collate_images` batches of `dataset`, read by `workers` processes. A worker that
    fails (its shared memory cannot be had), dies (killed for memory) or sends nothing for
    LOADER_TIMEOUT_S ends the job with a one-line DataError naming the images, never a hang."""
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_images, pin_memory=pin_memory,
                                         timeout=LOADER_TIMEOUT_S if workers else 0)
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (RuntimeError, OSError) as e:
            if not workers:      # read in this process: an error of its own, with its traceback
                raise
            # a worker's error arrives as "Caught X in DataLoader worker ...\n<traceback>\nX: why"
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DataError(getattr(dataset, "name", "images"), f"reading images in {workers} worker process(es) "
                                                                f"failed: {why} (--workers 0 reads them in this "
                                                                "process)") from None
        yield batch


class SkipReport:
    """Counts images skipped across batches (and workers) and prints one summary line."""

    def __init__(self, what: str = "images"):
        self.what, self.seen, self.skipped = what, 0, 0

    def update(self, batch: dict) -> None:
        self.skipped += batch["skipped"]
        self.seen += batch["skipped"] + len(batch["id"])

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.seen} {self.what} read, none skipped"
        return f"{self.seen} {self.what} read, {self.skipped} skipped (missing or corrupt; see warnings above)"


def synthetic_classes(root: str | os.PathLike) -> list[str]:
    """Class names of a proving-ground world (its world.json, written by synthetic.py build)."""
    path = Path(root) / "world.json"
    raw = read_json(path, "world description (is this a world written by `synthetic.py build`?)")
    try:
        return list(raw["classes"])
    except (KeyError, TypeError) as e:
        raise DataError(path, f"malformed world description ({e})") from None


def largest_instance_area(root: str | os.PathLike, ids: Sequence[str], class_names: Sequence[str],
                          year: int | str = 2007) -> np.ndarray:
    """[n, C] area (box area / image area) of the largest instance of each class, from the VOC
    XML boxes; 0 where the class is absent. Feeds the proving ground's size rule."""
    base = voc_root(root, year)
    col = {c: k for k, c in enumerate(class_names)}
    out = np.zeros((len(ids), len(class_names)))
    for i, image_id in enumerate(ids):
        path = base / "Annotations" / f"{image_id}.xml"
        ann = read_voc_annotation(path)
        if ann.width <= 0 or ann.height <= 0:
            raise DataError(path, "no image <size> to measure boxes against")
        for o in ann.objects:
            if o.name in col:
                a = (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) / (ann.width * ann.height)
                out[i, col[o.name]] = max(out[i, col[o.name]], a)
    return out


def load_dataset(name: str, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 **paths) -> MultiLabelImages:
    """One entry point for the four benchmarks; `paths` overrides default file locations
    (`annotation_file`, `image_dir`)."""
    root = Path(root)
    if name in ("voc2007", "voc2012"):
        if split not in SPLITS[name]:
            raise ValueError(f"{name} split must be one of {SPLITS[name]}, got {split!r}")
        samples, classes = load_voc(root, name[3:], split), VOC_CLASSES
    elif name == "coco2014":
        if split not in SPLITS[name]:
            raise ValueError(f"coco2014 split must be train or val, got {split!r}")
        ann = paths.get("annotation_file") or root / "annotations" / f"instances_{split}2014.json"
        samples, classes = load_coco(ann, paths.get("image_dir") or root / f"{split}2014")
    elif name == "nuswide":
        samples, classes, _ = load_nuswide(root, split, paths.get("image_dir"))
    elif name == "synthetic":
        if split not in SPLITS[name]:
            raise ValueError(f"synthetic split must be one of {SPLITS[name]}, got {split!r}")
        classes = synthetic_classes(root)
        samples = load_voc(root, 2007, split, classes)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return MultiLabelImages(samples, classes, transform, name=f"{name}/{split}")


# ============================================================================================
# Caption filter: captions -> soft pseudo labels over O = C classes + B backgrounds
# ============================================================================================

# Irregular plurals seen in captions. Regular ones go through `singularize`'s rules.
IRREGULAR_PLURALS = {
    "people": "person", "persons": "person", "men": "man", "women": "woman",
    "children": "child", "kids": "kid", "mice": "mouse", "geese": "goose", "feet": "foot",
    "teeth": "tooth", "oxen": "ox", "knives": "knife", "wives": "wife", "lives": "life",
    "leaves": "leaf", "wolves": "wolf", "shelves": "shelf", "calves": "calf",
    "halves": "half", "loaves": "loaf", "scarves": "scarf", "thieves": "thief",
    "buses": "bus", "busses": "bus", "gases": "gas", "lenses": "lens", "cacti": "cactus",
    "fungi": "fungus", "octopi": "octopus", "indices": "index", "matrices": "matrix",
    "dice": "die", "ponies": "pony", "puppies": "puppy", "skies": "sky",
}
# Words that end in "s" but are singular (or uncountable) and must never lose it.
SINGULAR_S = {
    "bus", "gas", "lens", "glass", "grass", "class", "dress", "cross", "boss", "moss", "chess",
    "news", "species", "series", "canvas", "atlas", "alias", "christmas", "walrus", "cactus",
    "octopus", "hippopotamus", "rhinoceros", "citrus", "campus", "circus", "status", "virus",
    "chassis", "swiss", "texas", "paris", "always", "perhaps", "various", "is", "was", "has",
    "does", "this", "his", "its", "us", "yes", "plus", "thus", "across", "towards", "afterwards",
    "sheep", "fish", "deer", "aircraft", "scissors", "skis", "pants", "jeans", "trousers",
    "glasses", "sunglasses", "binoculars", "clothes", "sports", "physics", "mathematics",
    "tennis", "analysis", "basis", "crisis", "axis", "oasis", "iris", "bonus", "hummus",
    "asparagus", "hibiscus", "lotus", "lettuce",
}


def singularize(word: str, vocabulary: frozenset[str] | set[str] = frozenset()) -> str:
    """Singular form of one lower-case token.

    With a `vocabulary` (the singular words of the synonym dictionary), a token that *is* a
    vocabulary word is never touched ("bus" stays "bus") and a plural is mapped to the first
    rule candidate that is in the vocabulary ("buses" -> "bus", "horses" -> "horse",
    "glasses" -> "glass"). Without a match the plain rules apply, which is safe because
    only vocabulary words are ever matched downstream.
    """
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in vocabulary or len(word) <= 3 or not word.endswith("s"):
        return word
    candidates = [word[:-1]]  # horses -> horse
    if word.endswith("es"):
        candidates.append(word[:-2])  # boxes -> box, glasses -> glass
    if word.endswith("ies"):
        candidates.append(word[:-3] + "y")  # ponies -> pony
    for cand in candidates:
        if cand in vocabulary:
            return cand
    if word in SINGULAR_S or word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    return word[:-1]


# Fragments that name a class without claiming it is in the picture. The re-captions were
# partly conditioned on classes already found ("What objects are present in this image,
# excluding car?") and the model often echoes that condition; counting the echo would vote
# for the condition, not for the picture. Each match is cut up to the next punctuation mark.
_ECHO_RE = re.compile(
    r"\b(?:excluding|exclude|excluded|except(?: for)?|other than|apart from|aside from|"
    r"besides|not including|without)\b[^,.;:?!\"()]*"
)
# "Question: ... Answer: ..." loops repeat the prompt; the question part names nothing seen.
_QUESTION_RE = re.compile(r"\bquestion\s*:[^?]*\??")
_NON_WORD_RE = re.compile(r"[^a-z0-9]+")


def normalize_text(text: str) -> str:
    """Lower case, accents folded to ASCII, prompt echoes removed, punctuation to spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = text.replace("'s ", " ").replace("-", " ")
    text = _QUESTION_RE.sub(" ", text)
    text = _ECHO_RE.sub(" ", text)
    return _NON_WORD_RE.sub(" ", text).strip()


def tokenize(text: str, vocabulary: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Normalised, singularised tokens of one caption."""
    return [singularize(w, vocabulary) for w in normalize_text(text).split()]


IGNORE_KEY = "__ignore__"


@dataclass
class SynonymDictionary:
    """Categories (C classes first, then B backgrounds) and the phrases that name them.

    A phrase may name several categories ("cyclist" -> bicycle and person) or none: phrases
    under the reserved key `__ignore__` are consumed by the matcher and vote for nothing, so
    "hot dog" never votes for dog and "bus stop" never for bus.
    """

    categories: list[str]
    num_classes: int
    phrases: dict[tuple[str, ...], tuple[int, ...]]
    vocabulary: frozenset[str]
    source: str = ""
    max_len: int = field(init=False)

    def __post_init__(self):
        self.max_len = max((len(p) for p in self.phrases), default=1)

    @classmethod
    def from_json(cls, path: str | os.PathLike, num_classes: int) -> "SynonymDictionary":
        path = Path(path)
        raw = read_json(path, "synonym dictionary")
        if not isinstance(raw, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in raw.values()
        ):
            raise DataError(path, "expected an object {category: [synonym, ...]}")
        ignore = raw.pop(IGNORE_KEY, [])
        categories = [k.strip() for k in raw]
        if len(categories) < num_classes:
            raise DataError(path, f"has {len(categories)} categories, the dataset has {num_classes} classes")
        # Singular vocabulary first, so that dictionary phrases and caption tokens are
        # singularised by the very same function.
        raw_words = {w for syns in [*raw.values(), ignore] for s in syns for w in normalize_text(s).split()}
        vocabulary = frozenset(singularize(w) for w in raw_words)
        phrases: dict[tuple[str, ...], set[int]] = {}
        for idx, syns in enumerate(raw.values()):
            for s in syns:
                key = tuple(tokenize(s, vocabulary))
                if key:
                    phrases.setdefault(key, set()).add(idx)
        for s in ignore:
            key = tuple(tokenize(s, vocabulary))
            if key and key not in phrases:
                phrases[key] = set()
        return cls(categories, num_classes,
                   {k: tuple(sorted(v)) for k, v in phrases.items()}, vocabulary, str(path))

    def match(self, caption: str) -> set[int]:
        """Categories named in one caption: longest phrases first, spans never overlap."""
        tokens = tokenize(caption, self.vocabulary)
        used = [False] * len(tokens)
        found: set[int] = set()
        for n in range(min(self.max_len, len(tokens)), 0, -1):
            for i in range(len(tokens) - n + 1):
                if any(used[i:i + n]):
                    continue
                cats = self.phrases.get(tuple(tokens[i:i + n]))
                if cats is not None:
                    used[i:i + n] = [True] * n
                    found.update(cats)
        return found


def dictionary_path(dataset: str, synonyms: str | None = None) -> Path:
    """The dictionary file: an explicit path, `paper` (the paper's own), or ours (default)."""
    if synonyms is None:
        return SYNONYM_DIR / f"{dataset}.json"
    if synonyms == "paper":
        return SYNONYM_DIR / "paper" / f"{dataset}.json"
    return Path(synonyms)


class _KeyValuePairs(list):
    """A JSON object as its (key, value) pairs in file order, a key given twice included."""


def read_captions(directory: str | os.PathLike) -> dict[str, list[str]]:
    """captions.json (+ re_captions.json when present) -> {image id: [caption, ...]}.

    Ids lose the trailing dot of the official files ("000012." -> "000012"). An id twice in one
    file (the same key twice, or "000012." beside "000012") is refused: merged or dropped, its
    captions would change the votes unseen. A captions.json naming no image is refused too.
    """
    directory = Path(directory)
    main = directory / "captions.json"
    if not main.is_file():
        raise DataError(main, "captions file not found")
    out: dict[str, list[str]] = {}
    for path in (main, directory / "re_captions.json"):
        if not path.is_file():
            continue
        raw = read_json(path, "captions file", object_pairs_hook=_KeyValuePairs)     # duplicates kept
        if not isinstance(raw, _KeyValuePairs):
            raise DataError(path, "expected an object {image_id: [caption, ...]}")
        seen: dict[str, str] = {}
        for key, caps in raw:
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise DataError(path, f"entry {key!r} is not a list of strings")
            image_id = key.rstrip(".")
            if image_id in seen:
                raise DataError(path, f"image id {image_id!r} appears more than once (keys {seen[image_id]!r} "
                                      f"and {key!r})")
            seen[image_id] = key
            out.setdefault(image_id, []).extend(caps)
        if path == main and not seen:
            raise DataError(path, "names no image (an empty object)")
    return out


@dataclass
class CaptionFilterConfig:
    # A hard pseudo label needs at least this many captions naming the category (paper: m).
    min_votes: int = 1
    # Weight of the caption-context score that orders images with equal vote counts. Vote
    # fractions over 12 captions take only 13 values, so hundreds of images tie, and ~1/4 of
    # the true positives of chair/bottle/potted plant get no vote at all. A Bernoulli naive
    # Bayes over all caption words, fit on the hard pseudo labels themselves (no human label),
    # says which of the tied images are likelier ("living room", "window" for potted plant).
    # Kept below 1/(2 * captions) so it reorders ties and never outranks a single vote.
    # VOC2007 dev (2,500 images), our dictionary: mAP 84.1 -> 88.2, best F1 0.845 -> 0.848;
    # the paper's dictionary: 78.5 -> 85.4 (bench/caption_table.py). 0 turns it off (plain vote fraction).
    context_weight: float = 1e-3
    # Words in fewer images than this are left out of the context model (noise, names).
    context_min_images: int = 3
    # Laplace smoothing of the context model's word probabilities.
    context_smoothing: float = 1.0


@dataclass
class PseudoLabels:
    ids: list[str]
    categories: list[str]       # C classes (dataset spelling) then B backgrounds
    num_classes: int
    scores: np.ndarray          # [n, O] soft labels in [0, 1]: vote fraction (+ context tie-break)
    votes: np.ndarray           # [n, O] number of captions naming each category
    num_captions: np.ndarray    # [n] captions per image

    def hard(self, min_votes: int = 1) -> np.ndarray:
        """0/1 labels [n, O]: at least `min_votes` captions name the category."""
        return (self.votes >= min_votes).astype(np.float32)


def _context_scores(token_sets: list[list[str]], hard: np.ndarray,
                    config: CaptionFilterConfig) -> np.ndarray:
    """Context score [n, O] in [0, 1]: per category, the rank of P(category | caption words)
    under a Bernoulli naive Bayes fit on the `hard` pseudo labels, scaled to [0, 1]."""
    import torch

    df = Counter(w for words in token_sets for w in words)
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in df.items() if c >= config.context_min_images))}
    rows, cols = [], []
    for r, words in enumerate(token_sets):
        for w in words:
            if w in vocab:
                rows.append(r)
                cols.append(vocab[w])
    n, num_words = len(token_sets), max(len(vocab), 1)
    x = torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                torch.ones(len(rows), dtype=torch.float64), (n, num_words),
                                check_invariants=True).coalesce()
    y = torch.from_numpy(hard.astype(np.float64))
    a = config.context_smoothing
    n_pos = y.sum(0)
    n_neg = n - n_pos
    with_word = torch.sparse.mm(x.t(), y)                       # [W, O] positives having word
    p1 = (with_word + a) / (n_pos + 2 * a)
    p0 = (torch.sparse.sum(x, 0).to_dense()[:, None] - with_word + a) / (n_neg + 2 * a)
    present = torch.log(p1 / p0)
    absent = torch.log((1 - p1) / (1 - p0))
    logit = (torch.sparse.mm(x, present - absent) + absent.sum(0)
             + torch.log((n_pos + a) / (n_neg + a))).numpy()
    # Naive Bayes is overconfident: its probabilities sit within 1e-12 of 0 or 1, where a
    # CSV (or float32) loses the order. Its ranks keep the order at any precision.
    ranks = np.argsort(np.argsort(logit, axis=0, kind="stable"), axis=0, kind="stable")
    return ranks / max(n - 1, 1)


def pseudo_labels(captions: dict[str, list[str]], dictionary: SynonymDictionary,
                  class_names: Sequence[str] | None = None,
                  config: CaptionFilterConfig = CaptionFilterConfig(),
                  ids: Sequence[str] | None = None, progress: bool = False) -> PseudoLabels:
    """The 4-step caption filter over every image: soft and hard labels over O categories.

    Steps 1-3 (normalise, phrases longest first, dictionary without overlaps) are
    `SynonymDictionary.match`; step 4 votes across captions: the soft label of o is the
    fraction of captions naming it, ties ordered by the caption-context model.
    """
    ids = list(captions) if ids is None else list(ids)
    num_cats = len(dictionary.categories)
    votes = np.zeros((len(ids), num_cats), dtype=np.float64)
    num_captions = np.zeros(len(ids), dtype=np.int64)
    token_sets: list[list[str]] = []
    iterator = ids
    if progress:
        from tqdm import tqdm
        iterator = tqdm(ids, desc="captions", unit="img", file=sys.stderr)
    for row, image_id in enumerate(iterator):
        caps = captions.get(image_id, [])
        num_captions[row] = len(caps)
        words: set[str] = set()
        for cap in caps:
            for c in dictionary.match(cap):
                votes[row, c] += 1
            if config.context_weight > 0:
                words.update(tokenize(cap, dictionary.vocabulary))
        token_sets.append(sorted(words))
    scores = votes / np.maximum(num_captions, 1)[:, None]
    if config.context_weight > 0 and len(ids) > 0:
        hard = (votes >= config.min_votes).astype(np.float64)
        context = _context_scores(token_sets, hard, config)
        scores = (scores + config.context_weight * context) / (1.0 + config.context_weight)
        scores[num_captions == 0] = 0.0
    categories = list(dictionary.categories)
    if class_names is not None:
        categories[:len(class_names)] = list(class_names)
    return PseudoLabels(ids, categories, dictionary.num_classes, scores, votes, num_captions)


def cooccurrence(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image-level co-occurrence counts M [O, O] and category counts N [O] of 0/1 labels."""
    labels = np.asarray(labels, dtype=np.float64)
    m = labels.T @ labels
    return m, np.diag(m).copy()


def conditional_probability(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """P(j | i) = M_ij / N_i (rows of unseen categories are 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(n[:, None] > 0, m / n[:, None], 0.0)
    return p


# ============================================================================================
# Files: scores CSV, graph
# ============================================================================================

def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder and rename, so a crash leaves no half file.
    The one writer of every file the project produces: a write that fails (a full disk, a quota,
    `ulimit -f`) is a one-line DataError naming `path`, and the temp file is removed."""
    from safetensors import SafetensorError  # save_file reports I/O errors as its own type

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(path, f"cannot be written ({e.strerror or e})") from None
    except SafetensorError as e:
        raise DataError(path, f"cannot be written ({str(e).splitlines()[0][:160]})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def os_error_line(e: OSError) -> str:
    """An OSError that reached a command line, as its one line: the file it names and why."""
    if e.filename is None:
        return e.strerror or str(e)
    return f"{e.filename}: {e.strerror or e}"


def quiet_broken_pipe() -> int:
    """stdout's reader went away (`eval.py ... | head`): stop quietly, as Unix tools do. Later
    writes (Python's own flush at exit) go to /dev/null; the status is a shell's for SIGPIPE."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def check_writable(path: str | os.PathLike, option: str, folder: bool = False) -> None:
    """Refuse an output that cannot be written before any work is done: a file where a folder
    is wanted or the reverse, or a place under a file or in a read-only folder. A one-line
    ValueError naming the option."""
    p = Path(path)
    if p.exists() and folder != p.is_dir():
        raise ValueError(f"{option}={path}: " + ("exists and is not a folder" if folder else "is a folder, not a file"))
    anchor = p if folder and p.is_dir() else p.parent   # where the new entry (or atomic_write's temp file) goes
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ValueError(f"{option}={path}: cannot be written ({anchor} is a file, not a folder)")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"{option}={path}: cannot be written ({anchor} is not writable)")


def json_safe(obj):
    """NaN (an undefined AP, e.g. a size band with too few positives) becomes None, so reports
    stay valid JSON (json.dumps would write a bare NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """`obj` as strict JSON (NaN -> null), written atomically."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_scores_csv(path: str | os.PathLike, ids: Sequence[str], columns: Sequence[str],
                     scores: np.ndarray, tags: Sequence[str] | None = None) -> None:
    """`image_id,<columns...>` with one row per image (the eval.py --scores format), and a last
    text column `tags` when `tags` is given (one string per image; the scores reader skips it)."""
    def write(tmp: Path):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", *columns, *(["tags"] if tags is not None else [])])
            for k, (image_id, row) in enumerate(zip(ids, scores)):
                w.writerow([image_id, *(f"{v:.10g}" for v in row), *([tags[k]] if tags is not None else [])])
    atomic_write(Path(path), write)


def read_table_csv(path: str | os.PathLike, what: str = "scores",
                   ignore: Sequence[str] = ()) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, column names, float matrix) of a UTF-8 CSV (BOM or not) with an `image_id` column.
    Columns named in `ignore` (text such as the `tags` of `eval.py --images`) are left out."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file not found")
    reader = csv.reader(io.StringIO(read_utf8(path, "CSV"), newline=""))
    try:
        rows = list(reader)
    except csv.Error as e:  # e.g. a field over the csv module's size limit
        raise DataError(path, f"line {reader.line_num}: not readable as CSV ({e})") from None
    if not rows or "image_id" not in rows[0]:
        raise DataError(path, "no header with an 'image_id' column")
    header = rows[0]
    id_col = header.index("image_id")
    keep = [k for k, h in enumerate(header) if k != id_col and h not in ignore]
    columns = [header[k] for k in keep]
    ids, values = [], []
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(path, f"line {n}: {len(row)} fields, the header has {len(header)}")
        try:
            values.append([float(row[k]) for k in keep])
        except ValueError:
            raise DataError(path, f"line {n}: a value is not a number") from None
        ids.append(row[id_col])
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DataError(path, f"image id {dup!r} appears more than once")
    return ids, columns, np.asarray(values, dtype=np.float64).reshape(len(ids), len(columns))


def write_graph(path: str | os.PathLike, labels: PseudoLabels, min_votes: int = 1) -> None:
    """Image-level co-occurrence counts M [O, O] and N [O] of the hard pseudo labels, with the
    category names (metadata `categories`, JSON) and the class count (`num_classes`)."""
    import torch
    from safetensors.torch import save_file

    m, n = cooccurrence(labels.hard(min_votes))
    tensors = {"M": torch.from_numpy(m.astype(np.float32)), "N": torch.from_numpy(n.astype(np.float32))}
    meta = {"categories": json.dumps(labels.categories), "num_classes": str(labels.num_classes),
            "min_votes": str(min_votes), "num_images": str(len(labels.ids))}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_graph(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(M, N, category names, number of classes) written by `write_graph`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "graph file not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            m, n = f.get_tensor("M"), f.get_tensor("N")
        return m, n, json.loads(meta["categories"]), int(meta["num_classes"])
    except (KeyError, ValueError, OSError) as e:
        raise DataError(path, f"not a graph file written by data.py ({e})") from None


# ============================================================================================
# Captioning (optional extra: transformers): BLIP-2 captions for datasets published without them
# ============================================================================================
# Kept in this file rather than a module of its own: run as `python data.py`, this file is
# __main__, and a module importing `data` would load a second copy whose DataError `main` misses.

# The six BLIP-2 prompts, one per caption slot. The paper does not print them; they are read off
# its released VOC captions, where BLIP-2 sometimes runs on into "Question: ... Answer: ..." loops
# that repeat its own prompt. In captions.json slots 0, 1, 3 and 5 echo "What is in the photo?",
# "What are shown in the photo?", "What objects are present in this image?" and "What is the
# background of this image?". Slots 2 and 4 echo only in re_captions.json, as "Tell us about the
# photo, excluding car?" and "Please explain this photo in detail, excluding car?"; their answers in
# both files ("This is a photo of ...", "The photo was taken at ...") fit those requests.
CAPTION_PROMPTS = (
    "What is in the photo?",
    "What are shown in the photo?",
    "Tell us about the photo.",
    "What objects are present in this image?",
    "Please explain this photo in detail.",
    "What is the background of this image?",
)
# The wrapping the echoes show (BLIP-2's OPT question-answering format).
PROMPT_TEMPLATE = "Question: {} Answer:"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CAPTIONS_INSTALL = "pip install -r requirements-captions.txt"


def recaption_prompts(found: Sequence[str]) -> list[str]:
    """Second-pass prompts: each first-pass prompt, excluding the categories already found.

    The echoes show the found names joined by spaces ("excluding aeroplane sky?"), which also
    keeps the whole list inside one clause for the caption filter's echo removal. With nothing
    found the plain prompt is asked (the released files then show a bare "excluding?").
    """
    if not found:
        return [PROMPT_TEMPLATE.format(p) for p in CAPTION_PROMPTS]
    names = " ".join(found)
    return [PROMPT_TEMPLATE.format(f"{p.rstrip('?.')}, excluding {names}?") for p in CAPTION_PROMPTS]


def found_categories(captions: Sequence[str], dictionary: SynonymDictionary, names: Sequence[str]) -> list[str]:
    """Names of the categories (classes and backgrounds) that any of the captions names."""
    found = set().union(*(dictionary.match(c) for c in captions))
    return [names[c] for c in sorted(found)]


def image_folder(root: str | os.PathLike) -> MultiLabelImages:
    """Every JPEG/PNG under `root` (recursive), id = path relative to `root` without extension."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "image folder not found")
    paths = sorted(p for p in root.rglob("*") if _is_image_entry(p))
    return MultiLabelImages(_unlabelled_samples(root, paths), [], name=f"folder {root}")


def _is_image_entry(path: Path) -> bool:
    """A JPEG/PNG name that is a file, or a symlink that leads nowhere (looping or broken): kept,
    so that the decoder names it and it is counted with the skipped images, not silently lost.
    Anything else (a folder, a FIFO, a device, a link to one) is no image, and reading a FIFO
    would wait forever."""
    return path.suffix.lower() in IMAGE_SUFFIXES and (path.is_file() or (path.is_symlink() and not path.exists()))


def _unlabelled_samples(base: Path, paths: Sequence[Path]) -> list[Sample]:
    """Samples without labels, id = path relative to `base` without the extension."""
    samples, seen = [], {}
    for p in paths:
        image_id = p.relative_to(base).with_suffix("").as_posix()
        if image_id in seen:
            raise DataError(p, f"has the same id {image_id!r} as {seen[image_id].name}; ids drop the extension")
        seen[image_id] = p
        samples.append(Sample(image_id, p, np.zeros(0, dtype=np.int8)))
    return samples


GLOB_MAGIC = frozenset("*?[")


def image_files(spec: str) -> MultiLabelImages:
    """The JPEG/PNG files a user names: a folder (recursive; see `image_folder`), a glob pattern
    (`**` recurses) or one file. Ids are paths relative to the folder, or to the pattern's
    leading directory without wildcards, without the extension. No image file is a DataError."""
    import glob

    if Path(spec).is_dir():
        found = image_folder(spec)
        if not len(found):
            raise DataError(spec, "no JPEG or PNG files in this folder or below it")
        return found
    parts = Path(spec).parts
    fixed = next((k for k, part in enumerate(parts) if GLOB_MAGIC & set(part)), None)
    if Path(spec).is_file() or Path(spec).is_symlink():
        base, paths = Path(spec).parent, [Path(spec)]
    elif fixed is None:
        raise DataError(spec, "no such image file or folder")
    else:
        base = Path(*parts[:fixed]) if fixed else Path(".")
        paths = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
    paths = [p for p in paths if _is_image_entry(p)]
    if not paths:
        raise DataError(spec, "matches no JPEG or PNG file")
    return MultiLabelImages(_unlabelled_samples(base, paths), [], name=spec)


class _BlipPreprocess:
    """uint8 [3, H, W] -> the model's pixel values [3, h, w], run in the loader's workers."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image):
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise DataError("transformers", f"not installed; captions need the optional extra: {CAPTIONS_INSTALL}") \
            from None
    return transformers


def load_blip2(path: str | os.PathLike, device: str):
    """(model, processor) of a local BLIP-2 folder (save_pretrained layout); never downloads.
    bf16 on CUDA, fp32 on the CPU (bf16 is many times slower there)."""
    import torch

    transformers = _import_transformers()
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, "model folder not found")
    if not (path / "config.json").is_file():
        raise DataError(path, "no config.json here: not a model folder written by save_pretrained")
    config = read_json(path / "config.json", "model config")
    if not isinstance(config, dict) or config.get("model_type") != "blip-2":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise DataError(path, f"not a BLIP-2 model (model_type {kind!r}, expected 'blip-2')")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        processor = transformers.Blip2Processor.from_pretrained(path, local_files_only=True)
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(path, f"cannot load the BLIP-2 model ({first})") from None
    # Prompts of a batch differ in length; a decoder-only model continues from the right end.
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model.to(device).eval(), processor


def _image_features(model, pixel_values):
    """The language-model inputs of the images [B, queries, d] (vision tower + Q-Former + projection)."""
    out = model.get_image_features(pixel_values=pixel_values)
    return getattr(out, "pooler_output", out)


def _generate(model, tokenizer, features, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to `prompts`, one per row of `features`. Equal to BLIP-2's own `generate`
    (the test checks it), but the image features come in precomputed, so that each image is
    encoded once for its 12 prompts instead of 12 times."""
    import torch

    enc = tokenizer(list(prompts), padding=True, return_tensors="pt").to(features.device)
    embeds = model.get_input_embeddings()(enc["input_ids"])
    inputs = torch.cat([features.to(embeds.dtype), embeds], dim=1)
    mask = torch.cat([enc["attention_mask"].new_ones(features.shape[:2]), enc["attention_mask"]], dim=1)
    out = model.language_model.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        do_sample=False, num_beams=1)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def _caption_images(model, tokenizer, features, prompts: list[list[str]], max_new_tokens: int) -> list[list[str]]:
    """prompts[i] asked about image i (features[i]); one generate call for the whole batch."""
    import torch

    counts = torch.tensor([len(p) for p in prompts], device=features.device)
    answers = _generate(model, tokenizer, features.repeat_interleave(counts, dim=0),
                        [p for ps in prompts for p in ps], max_new_tokens)
    out, start = [], 0
    for ps in prompts:
        out.append(answers[start:start + len(ps)])
        start += len(ps)
    return out


class CaptionProgress:
    """Captions written so far, keyed like the paper's files ("000012."). `save` writes both passes
    to one partial file atomically, so a killed run resumes from its last save and never holds a
    re-caption without its captions; `finish` writes captions.json (+ re_captions.json)."""

    def __init__(self, out: str | os.PathLike, recaption: bool):
        self.out, self.recaption = Path(out), recaption
        self.partial = self.out / "captions.partial.json"
        self.files = {"captions": {}, "re_captions": {}}
        for name, entries in self.files.items():
            path = self.out / f"{name}.json"
            if path.is_file():
                entries.update(self._entries(path, read_json(path, "captions file")))
        if self.partial.is_file():
            raw = read_json(self.partial, "partial captions file")
            for name, entries in self.files.items():
                entries.update(self._entries(self.partial, raw.get(name, {}) if isinstance(raw, dict) else None))

    @staticmethod
    def _entries(path: Path, raw) -> dict[str, list[str]]:
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise DataError(path, "expected an object {image_id: [caption, ...]}; delete it or choose another --out")
        return raw

    def done(self, image_id: str) -> bool:
        key = image_id + "."
        return key in self.files["captions"] and (not self.recaption or key in self.files["re_captions"])

    def add(self, image_id: str, captions: list[str], re_captions: list[str] | None) -> None:
        self.files["captions"][image_id + "."] = captions
        if re_captions is not None:
            self.files["re_captions"][image_id + "."] = re_captions

    def save(self) -> None:
        atomic_write(self.partial, lambda tmp: tmp.write_text(json.dumps(self.files, ensure_ascii=False), "utf-8"))

    def finish(self) -> list[Path]:
        names = ["captions", "re_captions"] if self.recaption else ["captions"]
        for name in names:
            text = json.dumps(self.files[name], ensure_ascii=False, indent=0)
            atomic_write(self.out / f"{name}.json", lambda tmp, text=text: tmp.write_text(text, "utf-8"))
        self.partial.unlink(missing_ok=True)
        return [self.out / f"{name}.json" for name in names]


def caption_images(images: MultiLabelImages, model, processor, progress: CaptionProgress,
                   dictionary: SynonymDictionary | None = None, batch_size: int = 16, workers: int = 0,
                   max_new_tokens: int = 30, save_every: int = 20, quiet: bool = False) -> tuple[int, SkipReport]:
    """Caption the images `progress` does not hold yet: the six prompts, then (with a dictionary)
    the six re-caption prompts that exclude what the first six named. Saves every `save_every`
    batches and when interrupted. Returns (images captioned, skip report)."""
    import torch
    from tqdm import tqdm

    todo = MultiLabelImages([s for s in images.samples if not progress.done(s.id)], images.class_names,
                            _BlipPreprocess(processor.image_processor), images.name)
    names = [*images.class_names, *dictionary.categories[len(images.class_names):]] if dictionary else []
    device, dtype = model.device, model.dtype
    report, captioned = SkipReport(), 0
    bar = tqdm(total=len(todo), desc="captioning", unit="img", file=sys.stderr, disable=quiet)
    try:
        with torch.inference_mode():
            for n, batch in enumerate(image_batches(todo, batch_size, workers, device.type == "cuda"), 1):
                report.update(batch)
                if batch["id"]:
                    features = _image_features(model, batch["image"].to(device, dtype, non_blocking=True))
                    first = [[PROMPT_TEMPLATE.format(p) for p in CAPTION_PROMPTS]] * len(batch["id"])
                    caps = _caption_images(model, processor.tokenizer, features, first, max_new_tokens)
                    recaps = [None] * len(caps)
                    if dictionary is not None:
                        second = [recaption_prompts(found_categories(c, dictionary, names)) for c in caps]
                        recaps = _caption_images(model, processor.tokenizer, features, second, max_new_tokens)
                    for image_id, c, r in zip(batch["id"], caps, recaps):
                        progress.add(image_id, c, r)
                    captioned += len(caps)
                if n % save_every == 0:
                    progress.save()
                bar.update(batch["skipped"] + len(batch["id"]))
    except BaseException:
        progress.save()  # Ctrl-C or a failure mid-run keeps every finished batch
        raise
    finally:
        bar.close()
    return captioned, report


def _caption_source(args: argparse.Namespace) -> tuple[MultiLabelImages, SynonymDictionary | None]:
    """The images to caption and the dictionary that finds classes for re-captions (None: skip them)."""
    if args.dataset == "folder":
        images = image_folder(args.data_root)
        if not args.synonyms:
            return images, None
        return images, SynonymDictionary.from_json(dictionary_path("folder", args.synonyms), 0)
    if args.split not in SPLITS[args.dataset]:
        given = f"got {args.split!r}" if args.split else "none given"
        raise DataError("--split", f"{args.dataset} splits are {', '.join(SPLITS[args.dataset])}; {given}")
    images = load_dataset(args.dataset, args.data_root, args.split)
    if args.dataset == "synthetic" and not args.synonyms:
        synonyms = Path(args.data_root) / "synonyms.json"
    else:
        synonyms = dictionary_path(args.dataset, args.synonyms)
    return images, SynonymDictionary.from_json(synonyms, len(images.class_names))


def _cmd_captions(args: argparse.Namespace) -> None:
    _import_transformers()  # before any slow step: a missing extra is the likeliest first error
    images, dictionary = _caption_source(args)
    if not images.samples:
        raise DataError(args.data_root, "no image to caption")
    if dictionary is None:
        print("folder without --synonyms: writing captions.json only (re-captions exclude the categories "
              "a dictionary finds in the first captions)", file=sys.stderr)
    progress = CaptionProgress(args.out, recaption=dictionary is not None)
    left = sum(not progress.done(s.id) for s in images.samples)
    if left:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(f"{images.name}: {len(images.samples) - left} of {len(images.samples)} images already captioned, "
              f"{left} to go ({args.model} on {device})", file=sys.stderr)
        model, processor = load_blip2(args.model, device)
        _, report = caption_images(images, model, processor, progress, dictionary, args.batch_size,
                                   args.workers, args.max_new_tokens, args.save_every, args.quiet)
        print(f"{images.name}: {report.summary()}", file=sys.stderr)
        if not progress.files["captions"]:
            raise DataError(args.data_root, f"none of the {left} images could be read; nothing captioned")
    for path in progress.finish():
        print(f"wrote {path}")


# ============================================================================================
# Feature cache: the frozen encoder runs once per image
# ============================================================================================

_HASHES: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (memoised by path, size and mtime): weights identify a cache by content."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


class FeatureCache:
    """Per-image encoder outputs stored in bf16 safetensors shards under a key.

    The key hashes everything that changes the features (`spec`: encoder, weights digest, input
    size, read-out, dataset, split, image ids and file stamps), so a changed config or a changed
    image file never reads a stale cache. A folder is complete once its `meta.json` exists
    (written last, atomically); `problem()` tells a damaged one (shard missing or truncated,
    ids that do not match the rows). The build can be split into parts (one per process of a
    distributed job), each writing its own shards, and `merge` lists them in part order. This
    module never imports the model: `encode` is handed in.
    """

    SHARD = 4096
    # A shard is buffered in memory before it is written: capped by bytes too, or one shard of
    # ViT-B/16 at 448 px (800 KB a row) would hold 3.2 GB, twice over while concatenated.
    SHARD_BYTES = 256 * 2**20

    def __init__(self, root: str | os.PathLike, spec: dict, shard_rows: int = SHARD):
        import hashlib

        self.spec = spec
        self.key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = Path(root) / self.key
        self.shard_rows = shard_rows

    @property
    def complete(self) -> bool:
        return (self.dir / "meta.json").is_file()

    def _meta(self) -> dict:
        return read_json(self.dir / "meta.json", "feature cache index")

    def problem(self) -> str | None:
        """Why this complete cache cannot be read (one line), or None when it is sound."""
        try:
            meta = self._meta()
            if not isinstance(meta.get("ids"), list) or not isinstance(meta.get("shards"), list):
                return "meta.json lacks its ids or shards"
            CachedFeatures.from_shards(self.dir, meta["ids"], meta["shards"])
        except DataError as e:
            return str(e)
        return None

    def open(self, memory_budget_bytes: float = float("inf")) -> "CachedFeatures":
        """The cached rows: read into memory when they fit `memory_budget_bytes`, else streamed."""
        meta = self._meta()
        features = CachedFeatures.from_shards(self.dir, meta["ids"], meta["shards"])
        if features.nbytes <= memory_budget_bytes:
            return features.in_memory()
        fix_malloc_threshold()
        return features

    def build(self, dataset, encode: Callable, batch_size: int = 64, workers: int = 0, device: str = "cpu",
              desc: str = "caching features", pin_memory: bool = False, part: int = 0, parts: int = 1) -> None:
        """Encode every image of `dataset` with `encode` (see `encode_images`) into bf16 shards.
        Skipped images are reported and left out. With `parts` > 1 this writes part `part` only
        (its dataset is that part's images); `merge` completes the cache once all parts exist."""
        import torch
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        ids: list[str] = []
        buffer: dict[str, list] = {}
        shards: list[str] = []

        def flush():
            if not buffer:
                return
            name = f"part{part:03d}-shard-{len(shards):05d}.safetensors"
            tensors = {k: torch.cat(v).contiguous() for k, v in buffer.items()}
            atomic_write(self.dir / name, lambda tmp: save_file(tensors, str(tmp)))
            shards.append(name)
            buffer.clear()

        for batch_ids, _, out in encode_images(dataset, encode, batch_size, workers, device, desc, pin_memory):
            for k, v in out.items():
                buffer.setdefault(k, []).append(v.detach().to("cpu", torch.bfloat16))
            ids.extend(batch_ids)
            rows = sum(len(x) for x in next(iter(buffer.values())))
            if rows >= self.shard_rows or rows * sum(v[0][0].nbytes for v in buffer.values()) >= self.SHARD_BYTES:
                flush()
        flush()
        write_json(self.dir / f"part{part:03d}.json", {"ids": ids, "shards": shards}, indent=None)
        if parts == 1:
            self.merge(1)

    def merge(self, parts: int) -> None:
        """Write meta.json over the parts 0..parts-1, in part order: the cache is then complete."""
        ids, shards = [], []
        for part in range(parts):
            piece = read_json(self.dir / f"part{part:03d}.json", "feature cache part")
            ids += piece["ids"]
            shards += piece["shards"]
        write_json(self.dir / "meta.json", {"ids": ids, "shards": shards, "spec": self.spec}, indent=None)


def fix_malloc_threshold(threshold: int = 1 << 16) -> None:
    """Stream without the heap creeping up. glibc raises its mmap threshold each time a large
    block is freed, so after the first batch every batch buffer (0.1-10 MB) comes from the heap,
    whose fragments the process keeps: measured, peak memory then grew with the number of
    batches (+85 MB from a 4x larger cache), and with the threshold fixed it did not (-13 MB).
    A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3         # mallopt's parameter number, from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, threshold)
    except (OSError, AttributeError):
        pass


class CachedFeatures:
    """The rows of a feature cache: `gather(rows)` returns {name: bf16 tensor [len(rows), ...]}
    in the order asked.

    Streamed (the default of `from_shards`), rows are read on demand with positioned reads
    into the batch's own tensors: resident memory is what a batch needs, whatever the cache's
    size (file pages live on in the OS page cache, which the kernel reclaims under pressure and
    which is not this process's memory). `in_memory()` reads every row once into one tensor per
    field (no second copy, unlike concatenating loaded shards).
    """

    def __init__(self, ids: list[str], shards: list[tuple[Path, int, dict]], tensors: dict | None = None):
        self.ids = list(ids)
        self._shards = shards                    # (path, rows, {name: (row shape, file offset, row bytes)})
        self._starts = np.cumsum([0] + [rows for _, rows, _ in shards])
        self._fds: dict[int, int] = {}
        self.tensors = tensors
        first = shards[0][2] if shards else {}
        self.row_shapes = {k: v[0] for k, v in first.items()}

    @classmethod
    def from_shards(cls, directory: Path, ids: Sequence[str], names: Sequence[str]) -> "CachedFeatures":
        shards = [(Path(directory) / n, *_shard_layout(Path(directory) / n)) for n in names]
        rows = sum(r for _, r, _ in shards)
        if rows != len(ids):
            raise DataError(Path(directory) / "meta.json", f"lists {len(ids)} ids, the shards hold {rows} rows")
        layouts = {tuple(sorted((k, v[0]) for k, v in f.items())) for _, _, f in shards}
        if len(layouts) > 1:
            raise DataError(directory, "shards hold different fields or shapes")
        return cls(ids, shards)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def keys(self) -> list[str]:
        return list(self.row_shapes)

    @property
    def nbytes(self) -> int:
        return sum(len(self) * 2 * int(np.prod(s)) for s in self.row_shapes.values())

    def in_memory(self) -> "CachedFeatures":
        if self.tensors is None:
            self.tensors = self._read(np.arange(len(self)), self.keys)
            self.close()
        return self

    def gather(self, rows, keys: Sequence[str] | None = None) -> dict:
        import torch

        keys = list(keys or self.keys)
        if self.tensors is not None:
            index = torch.as_tensor(rows, dtype=torch.int64)
            return {k: self.tensors[k][index] for k in keys}
        return self._read(np.asarray(rows, dtype=np.int64).reshape(-1), keys)

    def _read(self, rows: np.ndarray, keys: list[str]) -> dict:
        """Rows read straight into the output tensors with positioned reads (`os.preadv`, one
        per row and field, in file order): the kernel copies from its page cache, so no file
        page is ever mapped into this process and resident memory stays what the batch needs.
        (Gathering from memory maps and releasing the touched pages after each batch bounded
        memory too, but every batch then paid a page fault per 4 KB: the streamed epoch ran at
        0.65x the in-memory speed, 0.80x this way: bench/cache_scale.py on a 3.9 GiB cache.)"""
        import torch

        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range [0, {len(self)})")
        out = {k: torch.empty((len(rows), *self.row_shapes[k]), dtype=torch.bfloat16) for k in keys}
        views = {k: out[k].view(torch.uint8).numpy().reshape(len(rows), -1) for k in keys}
        shards = np.searchsorted(self._starts, rows, side="right") - 1
        for i in np.argsort(rows, kind="stable"):
            s = int(shards[i])
            path, fields, fd = self._shards[s][0], self._shards[s][2], self._fd(s)
            local = int(rows[i] - self._starts[s])
            for k in keys:
                _, offset, row_bytes = fields[k]
                if _read_at(fd, views[k][i], offset + local * row_bytes) != row_bytes:
                    raise DataError(path, f"shorter than its header says (row {local} of {k!r} is cut off)")
        return out

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self._shards[shard][0], os.O_RDONLY)
        return self._fds[shard]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()


def _read_at(fd: int, buffer: np.ndarray, offset: int) -> int:
    """Fill `buffer` from file offset `offset`; the number of bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    chunk = os.pread(fd, buffer.nbytes, offset)          # platforms without preadv: one more copy
    buffer[:len(chunk)] = np.frombuffer(chunk, dtype=buffer.dtype)
    return len(chunk)


def _shard_layout(path: Path) -> tuple[int, dict]:
    """(rows, {name: (row shape, file offset of row 0, bytes per row)}) from a safetensors
    shard's header, checking that every tensor is bf16, has the same row count and lies
    inside the file (a truncated shard fails here, by name)."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise DataError(path, "feature cache shard missing") from None
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise DataError(path, f"not a readable safetensors shard ({e})") from None
    fields, counts = {}, set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if info["dtype"] != "BF16" or not shape:
            raise DataError(path, f"field {name!r} is {info['dtype']} {shape}, expected bf16 rows")
        if 8 + length + end > size:
            raise DataError(path, f"truncated: field {name!r} ends at byte {8 + length + end}, the file has {size}")
        counts.add(shape[0])
        fields[name] = (tuple(shape[1:]), 8 + length + begin, (end - begin) // max(shape[0], 1))
    if len(counts) > 1:
        raise DataError(path, "fields hold different row counts")
    return (counts.pop() if counts else 0), fields


def encode_images(dataset, encode: Callable, batch_size: int = 64, workers: int = 0, device: str = "cpu",
                  desc: str = "encoding", pin_memory: bool = False, progress: bool = True):
    """The one encode loop: yields (ids, dataset indices, `encode(uint8 batch on device)`) per
    batch of a MultiLabelImages yielding fixed-size uint8 images, under no_grad, with a progress
    bar in images; skipped images are counted and summarised in one line at the end."""
    import torch
    from tqdm import tqdm

    report = SkipReport()
    bar = tqdm(total=len(dataset), desc=desc, unit="img", file=sys.stderr, mininterval=2, disable=not progress)
    try:                  # closed on an error too, so that the error line stands on a line of its own
        with torch.no_grad():
            for batch in image_batches(dataset, batch_size, workers, pin_memory):
                report.update(batch)
                bar.update(batch["skipped"] + len(batch["id"]))
                if batch["id"]:
                    yield batch["id"], batch["index"], encode(batch["image"].to(device, non_blocking=True))
    finally:
        bar.close()
    if report.skipped:
        print(f"{getattr(dataset, 'name', 'images')}: {report.summary()}", file=sys.stderr)


# ============================================================================================
# CLI
# ============================================================================================

def _cmd_pseudo_labels(args: argparse.Namespace) -> None:
    check_writable(args.out, "--out")                 # every output before any work
    if args.graph:
        check_writable(args.graph, "--graph")
    if args.dataset == "synthetic":
        # A world carries its classes and dictionary beside its captions.
        class_names = synthetic_classes(args.captions)
        synonyms = Path(args.synonyms) if args.synonyms else Path(args.captions) / "synonyms.json"
    else:
        class_names = CLASS_NAMES[args.dataset]
        synonyms = dictionary_path(args.dataset, args.synonyms)
    dictionary = SynonymDictionary.from_json(synonyms, len(class_names))
    captions = read_captions(args.captions)
    config = CaptionFilterConfig(min_votes=args.min_votes, context_weight=args.context_weight)
    labels = pseudo_labels(captions, dictionary, class_names, config, progress=not args.quiet)
    write_scores_csv(args.out, labels.ids, labels.categories, labels.scores)
    hard = labels.hard(args.min_votes)
    per_image = hard[:, :len(class_names)].sum(1)
    print(f"{len(labels.ids)} images, {int(labels.num_captions.sum())} captions, dictionary {dictionary.source}")
    print(f"hard labels (>= {args.min_votes} votes): {per_image.mean():.2f} classes per image, "
          f"{int((per_image == 0).sum())} images with no class")
    print(f"wrote {args.out}")
    if args.graph:
        write_graph(args.graph, labels, args.min_votes)
        print(f"wrote {args.graph}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pseudo-labels", help="captions -> soft pseudo labels CSV (+ co-occurrence graph)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--captions", required=True, help="folder with captions.json (+ re_captions.json)")
    p.add_argument("--out", required=True, help="scores CSV to write")
    p.add_argument("--synonyms", default=None,
                   help="dictionary JSON, or 'paper' for the paper's own (default: the project's, assets/synonyms/)")
    p.add_argument("--graph", default=None, help="also write co-occurrence counts (safetensors)")
    p.add_argument("--min-votes", type=int, default=CaptionFilterConfig.min_votes,
                   help="captions needed for a hard label (graph and summary)")
    p.add_argument("--context-weight", type=float, default=CaptionFilterConfig.context_weight,
                   help="tie-break weight of the caption-context model (0: plain vote fraction)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("captions", help="BLIP-2 captions + re-captions for a dataset or a folder of images "
                                        f"(needs the optional extra: {CAPTIONS_INSTALL})")
    p.add_argument("--dataset", required=True, choices=(*DATASETS, "folder"),
                   help="a dataset load_dataset reads, or 'folder': every JPEG/PNG under --data-root")
    p.add_argument("--data-root", required=True, help="dataset root, or the image folder")
    p.add_argument("--split", default=None, help="split of the dataset (not for a folder)")
    p.add_argument("--model", required=True, help="local BLIP-2 folder (e.g. blip2-opt-2.7b); never downloaded")
    p.add_argument("--out", required=True, help="folder for captions.json and re_captions.json (resumes there)")
    p.add_argument("--synonyms", default=None,
                   help="dictionary JSON or 'paper' (default: the dataset's); a folder needs one for re-captions")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch (each asks 6 + 6 prompts)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=30, help="longest answer, in tokens")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--save-every", type=_positive_int, default=20, help="batches between progress saves")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.command == "pseudo-labels":
            _cmd_pseudo_labels(args)
        elif args.command == "captions":
            _cmd_captions(args)
        sys.stdout.flush()           # a closed pipe shows here, not in Python's flush at exit
    except BrokenPipeError:
        return quiet_broken_pipe()
    except ValueError as e:             # DataError is one
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
