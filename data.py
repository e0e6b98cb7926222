"""Data layer: the readers of the datasets' file formats (VOC, COCO, NUS-WIDE, image folders),
which the registry in registry.py wires to dataset names, and the files the project reads and
writes (scores CSV, graph, JSON, atomic writes).

Data flows one way: files -> this module -> tensors. Nothing here imports the model, nor the
modules built on it (`captions.py`, `cache.py` import this one, never the reverse).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import sys
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent





def shown_path(path: str | os.PathLike) -> str:
    """A path as it goes into a one-line message: control characters (a newline or an escape in
    a folder's name) as Python writes them in a string (`\\n`, `\\x1b`) and bytes that are not
    UTF-8 as `\\xNN`; any other path is shown as it is."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if text.isprintable():
        return text
    return "".join(_byte_escape(c) or (c if c.isprintable() else repr(c)[1:-1]) for c in text)


def _byte_escape(c: str) -> str:
    """`\\xNN` for a byte of a file name that is not UTF-8 (os.fsdecode gives it as the surrogate
    U+DCNN), '' for any other character."""
    return f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else ""


class DataError(ValueError):
    """Bad input file. The message is one line naming the file (see `shown_path`) and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{shown_path(path)}: {problem}")
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


# The VOC format's 20 classes in the standard order (the registry's voc2007 / voc2012 entries).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

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
             "segtrain": "VOC2012_train_val", "test": "VOC2012_test"},
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
    """The image ids of a split list. An id listed twice is refused: read twice, the image would
    count twice in every AP (and its second row, unlabelled, as a negative of every class)."""
    if not path.is_file():
        raise DataError(path, "split file not found")
    ids = [line.split()[0] for line in read_utf8(path, "split file").splitlines() if line.strip()]
    if not ids:
        raise DataError(path, "split file lists no image")
    if len(set(ids)) != len(ids):
        twice = next(i for i, count in Counter(ids).items() if count > 1)
        raise DataError(path, f"image id {twice!r} is listed more than once")
    return ids


def _read_voc_class_file(path: Path, known: dict[str, int]) -> dict[str, int]:
    values: dict[str, int] = {}
    for n, line in enumerate(read_utf8(path, "class file").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
            raise DataError(path, f"line {n}: expected '<image id> <1|0|-1>', got {line.strip()!r}")
        if parts[0] in values:          # the later line would win unseen
            raise DataError(path, f"line {n}: image id {parts[0]!r} is listed more than once")
        values[parts[0]] = int(parts[1])
    missing = [i for i in known if i not in values]
    if missing:
        raise DataError(path, f"{len(missing)} images of the split are missing (first: {missing[0]})")
    return values


# Splits whose image list is not ImageSets/Main/<split>.txt: (list under ImageSets/, the Main
# split whose <class>_<split>.txt files label them). VOC2012's segmentation-train images are
# the ones the paper's captions cover; they lie inside Main's trainval.
VOC_ID_LISTS = {"segtrain": ("Segmentation/train.txt", "trainval")}


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
        list_file, label_split = VOC_ID_LISTS.get(split, (f"Main/{split}.txt", split))
        id_source = base / "ImageSets" / list_file
        ids = _read_id_list(id_source)
    index = {i: k for k, i in enumerate(ids)}
    labels = np.full((len(ids), len(class_names)), -1, dtype=np.int8)
    class_files = [main / f"{c}_{label_split}.txt" for c in class_names] if split else []
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


def load_coco(annotation_file: str | os.PathLike, image_dir: str | os.PathLike,
              unused: dict | None = None) -> tuple[list[Sample], list[str]]:
    """COCO instances JSON -> samples of the images with >= 1 annotation, classes in id order.

    pycocotools is not needed. Ids are file-name stems ("COCO_val2014_000000000042").
    `unused`, when given, receives what the file holds that no sample carries (said by
    `registry.unused_annotation_words`): annotations naming a category id that no category has,
    ignored, and images without a class annotation, which the COCO protocol leaves out.
    """
    path = Path(annotation_file)
    raw = read_json(path, "annotation file")
    try:
        known = {c["id"] for c in raw["categories"]}
        cats = sorted((c for c in raw["categories"] if c["name"] not in _NON_CLASS_CATEGORIES),
                      key=lambda c: c["id"])
        column = {c["id"]: k for k, c in enumerate(cats)}
        images = {im["id"]: im["file_name"] for im in raw["images"]}
        labels: dict[int, np.ndarray] = {}
        unknown: Counter = Counter()
        for a in raw["annotations"]:
            if a["category_id"] not in column:
                if a["category_id"] not in known:
                    unknown[a["category_id"]] += 1
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
    if unused is not None:
        unused.update({"unknown_category_annotations": sum(unknown.values()),
                       "unknown_category_ids": sorted(unknown, key=str),
                       "images_without_annotations": len(images) - len(order)})
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


def decode_image(path: str | os.PathLike, upright: bool = False):
    """Decoded RGB uint8 tensor [3, H, W], or DataError naming the file.

    `upright`: apply the EXIF Orientation tag (a phone's photo taken upright is stored on its
    side with tag 6 or 8), giving the image as a viewer shows it: what a user's photos to tag
    want. False (the datasets' default): the raw pixels, the benchmarks' convention.

    Pillow decodes: pillow-simd (the setup installs it) and current Pillow wheels both link
    libjpeg-turbo, and unlike torchvision.io (deprecated for decoding since 0.29) it reads
    every format the datasets ship. CMYK and greyscale JPEGs come out RGB. A file declaring
    more pixels than Pillow's limit (a few hundred bytes can claim 30000 x 30000) raises
    DecompressionBombError, which is no OSError: caught here like every other decode failure.
    """
    import torch
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if path.exists() and not path.is_file():      # a FIFO or a device: reading it may never end
        raise DataError(path, "cannot decode image (not a regular file)")
    try:
        with Image.open(path) as im:
            arr = np.asarray((ImageOps.exif_transpose(im) if upright else im).convert("RGB"))
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
    `upright` is `decode_image`'s: False for datasets (raw pixels), True for a user's photos.
    """

    def __init__(self, samples: list[Sample], class_names: Sequence[str],
                 transform: Callable | None = None, name: str = "", upright: bool = False):
        self.samples = samples
        self.class_names = list(class_names)
        self.transform = transform
        self.name = name
        self.upright = upright
        self.left_out: Counter = Counter()   # image names that are no regular file, by kind (see image_files)
        self.unused_annotations: dict = {}    # what its annotation files hold that no sample carries (load_coco)
        self.escaped_ids: set[str] = set()   # ids of names that are not UTF-8, with \\xNN escapes

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
            image = decode_image(s.path, self.upright)
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


def reader_count(workers: int) -> int:
    """At most the cores this process may use: more only wait for one, and torch warns of them."""
    return min(workers, len(os.sched_getaffinity(0)))


def image_batches(dataset, batch_size: int, workers: int, pin_memory: bool = False):
    """The `collate_images` batches of `dataset`, read by `workers` processes. A worker that
    fails (its shared memory cannot be had), dies (killed for memory) or sends nothing for
    LOADER_TIMEOUT_S ends the job with a one-line DataError naming the images, never a hang."""
    import torch

    workers = reader_count(workers)
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


# ============================================================================================
# Unlabelled images: a folder or a glob of JPEG/PNG files
# ============================================================================================

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_folder(root: str | os.PathLike, upright: bool = False) -> MultiLabelImages:
    """Every JPEG/PNG under `root` (recursive), id = path relative to `root` without extension.
    Names that are no regular file are counted in `left_out` (see `_image_entries`); `upright`
    is `decode_image`'s."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "image folder not found")
    paths, left_out = _image_entries(sorted(root.rglob("*")))
    return _unlabelled_images(root, paths, left_out, f"folder {shown_path(root)}", upright)


def _image_entries(paths: Sequence[Path]) -> tuple[list[Path], Counter]:
    """(the JPEG/PNG names to read, {kind: count} of the JPEG/PNG names left out unread).

    Read: a file, or a symlink that leads nowhere (looping or broken), so that the decoder names
    it and it is counted with the skipped images. Left out, counted by kind and never opened: a
    folder, a FIFO (reading it would wait forever), a device (reading /dev/zero never ends), a
    socket, or a link to one of them. Only stat is called on them."""
    kept, left_out = [], Counter()
    for path in paths:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.is_file() or (path.is_symlink() and not path.exists()):
            kept.append(path)
            continue
        try:
            mode = path.stat().st_mode
        except OSError:          # gone since it was listed: the decoder names it
            kept.append(path)
            continue
        left_out["folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "socket"
                 if stat.S_ISSOCK(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "other"] += 1
    return kept, left_out


def left_out_words(left_out: Counter) -> str:
    """`4 not regular files, never read: 2 devices, 1 FIFO, 1 folder` ('' when there are none)."""
    total = sum(left_out.values())
    if not total:
        return ""
    kinds = ", ".join(f"{left_out[kind]} {kind}{'s' if left_out[kind] > 1 else ''}"
                      for kind in ("device", "FIFO", "socket", "folder", "other") if left_out[kind])
    return f"{total} not {'a regular file' if total == 1 else 'regular files'}, never read: {kinds}"


def _unlabelled_images(base: Path, paths: Sequence[Path], left_out: Counter, name: str,
                       upright: bool) -> MultiLabelImages:
    """Images without labels, id = path relative to `base` without the extension.

    A file name that is not UTF-8 (`caf\\xe9.jpg` written by an old camera or a Latin-1 system) is
    read like any other; its id shows each byte that does not decode as `\\xNN` (`caf\\xe9`), as
    no UTF-8 CSV can hold the byte itself, and `escaped_ids` holds such ids."""
    samples, seen, escaped = [], {}, set()
    for p in paths:
        relative = p.relative_to(base).with_suffix("").as_posix()
        image_id = "".join(_byte_escape(c) or c for c in relative)
        if image_id != relative:
            escaped.add(image_id)
        if image_id in seen:
            raise DataError(p, f"has the same id {image_id!r} as {shown_path(seen[image_id].name)}; "
                               "ids drop the extension")
        seen[image_id] = p
        samples.append(Sample(image_id, p, np.zeros(0, dtype=np.int8)))
    found = MultiLabelImages(samples, [], name=name, upright=upright)
    found.left_out, found.escaped_ids = left_out, escaped
    return found


GLOB_MAGIC = frozenset("*?[")


def image_files(spec: str, upright: bool = False) -> MultiLabelImages:
    """The JPEG/PNG files a user names: a folder (recursive; see `image_folder`), a glob pattern
    (`**` recurses) or one file. Ids are paths relative to the folder, or to the pattern's
    leading directory without wildcards, without the extension. No image file is a DataError.
    `upright` is `decode_image`'s (eval.py --images passes True)."""
    import glob

    if Path(spec).is_dir():
        found = image_folder(spec, upright)
        if not len(found):
            raise DataError(spec, "no JPEG or PNG files in this folder or below it"
                            + (f" ({left_out_words(found.left_out)})" if found.left_out else ""))
        return found
    parts = Path(spec).parts
    fixed = next((k for k, part in enumerate(parts) if GLOB_MAGIC & set(part)), None)
    if Path(spec).exists() or Path(spec).is_symlink():     # a FIFO or device too: counted, not read
        base, paths = Path(spec).parent, [Path(spec)]
    elif fixed is None:
        raise DataError(spec, "no such image file or folder")
    else:
        base = Path(*parts[:fixed]) if fixed else Path(".")
        paths = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
    paths, left_out = _image_entries(paths)
    if not paths:
        raise DataError(spec, "matches no JPEG or PNG file" + (f" ({left_out_words(left_out)})" if left_out else ""))
    return _unlabelled_images(base, paths, left_out, shown_path(spec), upright)



# ============================================================================================
# Files: scores CSV, graph
# ============================================================================================

def write_target(path: str | os.PathLike) -> tuple[Path, bool]:
    """(where a write of `path` goes, whether it goes through that file as it is). A device, a
    FIFO or a socket that `path` is or links to (`/dev/stdout`, a process substitution's
    /dev/fd/63) is written through, never replaced; a link to a file is followed, so the link
    stays and its target is the file replaced."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode                   # through any links
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return path, True
    return (Path(os.path.realpath(path)) if path.is_symlink() else path), False


TEMP_MARK = ".tmp"    # atomic_write's temp file of x.json is .x.json.tmp<pid>


def temp_file_of(name: str) -> str | None:
    """The file an atomic_write temp file named `name` was for (left by a killed process), or None."""
    base, mark, pid = name.rpartition(TEMP_MARK)
    return base[1:] if name.startswith(".") and mark and pid.isdigit() else None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder and rename, so a crash leaves no half file.
    The one writer of every file the project produces: a write that fails (a full disk, a quota,
    `ulimit -f`) is a one-line DataError naming `path`, and the temp file is removed. A device
    or a FIFO (or a link to one) is written through, in place (write_target)."""
    from safetensors import SafetensorError  # save_file reports I/O errors as its own type

    target, through = write_target(path)
    tmp = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
    try:
        if through:
            write(target)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)
    except OSError as e:
        raise DataError(path, f"cannot be written ({e.strerror or e})") from None
    except SafetensorError as e:
        raise DataError(path, f"cannot be written ({str(e).splitlines()[0][:160]})") from None
    finally:
        if not through and tmp.exists():
            tmp.unlink()


def check_writable(path: str | os.PathLike, option: str, folder: bool = False) -> None:
    """Refuse an output that cannot be written before any work is done: a file where a folder
    is wanted or the reverse, or a place under a file or in a read-only folder. A one-line
    ValueError naming the option."""
    p, named = Path(path), f"{option}={shown_path(path)}"
    if p.exists() and folder != p.is_dir():
        raise ValueError(f"{named}: " + ("exists and is not a folder" if folder else "is a folder, not a file"))
    target, through = write_target(p)
    if through:                                          # written in place: the file itself must take it
        if not os.access(target, os.W_OK):
            raise ValueError(f"{named}: cannot be written (not writable)")
        return
    anchor = target if folder and target.is_dir() else target.parent   # where atomic_write's temp file goes
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ValueError(f"{named}: cannot be written ({shown_path(anchor)} is a file, not a folder)")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"{named}: cannot be written ({shown_path(anchor)} is not writable)")


def json_safe(obj):
    """NaN (an undefined AP, e.g. a size band with too few positives) and the infinities become
    None, so reports stay strict JSON (json.dumps would write a bare NaN or Infinity, which jq
    and strict parsers refuse); numpy scalars become Python numbers."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
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


# A cell a spreadsheet would run as a formula (= + - @, or a tab or carriage return before one)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """A text cell (an image id, a class name, tags) as the project writes it: one starting with
    a FORMULA_STARTS character gets a leading `'` (OWASP's neutralisation of CSV injection), and
    so does one starting with `'`, so that `csv_text` gives back exactly what was written."""
    return "'" + text if text[:1] in (*FORMULA_STARTS, "'") else text


def csv_text(cell: str) -> str:
    """The text `csv_cell` wrote: a leading `'` before a FORMULA_STARTS character or another
    `'` is dropped; any other cell (a hand-written `'abc` among them) is read as it is."""
    return cell[1:] if cell[:1] == "'" and cell[1:2] in (*FORMULA_STARTS, "'") else cell


def write_scores_csv(path: str | os.PathLike, ids: Sequence[str], columns: Sequence[str],
                     scores: np.ndarray, tags: Sequence[str] | None = None) -> None:
    """`image_id,<columns...>` with one row per image (the eval.py --scores format), and a last
    text column `tags` when `tags` is given (one string per image; the scores reader skips it).
    UTF-8; text cells go through `csv_cell`, so that a spreadsheet runs no id as a formula."""
    def write(tmp: Path):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image_id", *map(csv_cell, columns), *(["tags"] if tags is not None else [])])
            for k, (image_id, row) in enumerate(zip(ids, scores)):
                w.writerow([csv_cell(image_id), *(f"{v:.10g}" for v in row),
                            *([csv_cell(tags[k])] if tags is not None else [])])
    atomic_write(Path(path), write)


def read_table_csv(path: str | os.PathLike, what: str = "scores",
                   ignore: Sequence[str] = ()) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, column names, float matrix) of a UTF-8 CSV (BOM or not) with an `image_id` column.
    Columns named in `ignore` (text such as the `tags` of `eval.py --images`) are left out. Ids
    and column names are read through `csv_text` (what `write_scores_csv` neutralised comes back)."""
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
    header = [csv_text(h) for h in rows[0]]
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
        ids.append(csv_text(row[id_col]))
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DataError(path, f"image id {dup!r} appears more than once")
    return ids, columns, np.asarray(values, dtype=np.float64).reshape(len(ids), len(columns))


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



def write_graph(path: str | os.PathLike, labels, min_votes: int = 1) -> None:
    """Image-level co-occurrence counts M [O, O] and N [O] of the hard pseudo labels, with the
    category names (metadata `categories`, JSON) and the class count (`num_classes`).
    `labels` is a `captions.PseudoLabels` (not imported here: that module builds on this one)."""
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
        raise DataError(path, f"not a graph file written by captions.py ({e})") from None


if __name__ == "__main__":
    # The caption commands moved to captions.py; a silent exit 0 here would pass for a run.
    print("data.py has no command line: run `python captions.py pseudo-labels ...` or "
          "`python captions.py generate ...`", file=sys.stderr)
    sys.exit(2)
