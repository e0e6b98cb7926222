"""Property-based fuzz of the readers of user files: no input may make them fail with anything
but the project's one-line `DataError` naming the file. Deterministic (derandomize) and kept
small enough to run in seconds."""
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import captions as captions_mod
import data

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAST = settings(FUZZ, max_examples=1000)


def _assert_one_line_error(error: data.DataError, inside: Path) -> None:
    message = str(error)
    assert "\n" not in message, message
    # the named file is one of the input files (the one the problem is in)
    assert Path(error.path).is_relative_to(inside) and message.startswith(data.shown_path(error.path)), message


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` names something inside `folder` once `..` are resolved (lexically)."""
    normal = Path(os.path.normpath(path))
    return normal != folder and normal.is_relative_to(folder)


def _calls_or_data_error(call, inside: Path):
    try:
        result = call()
    except data.DataError as e:
        _assert_one_line_error(e, inside)
        event(f"refused: {e.problem[:24]}")   # which problems the fuzz reaches
        return None
    event("read")
    return result


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="bacgcn-fuzz-") as d:
        yield Path(d)


def _fresh(workdir: Path, name: str) -> Path:
    folder = workdir / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# Text that hits the interesting corners: accents, ligatures, echo words, punctuation, controls.
caption_text = st.text(alphabet=st.one_of(
    st.sampled_from(list("abcdefgioprstuy sS.,;:?!'\"-_()éÅæﬁ\u00a0\u2028\x00\t\n")),
    st.characters(),
), max_size=80) | st.sampled_from([
    "Question: what is this? Answer: a dog", "excluding car, a bus", "people on buses", "'s ",
    "hot dog stand", "a cyclist without a helmet", "skies", "ies", "sses", "-", "",
])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | caption_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(caption_text, inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def dictionary(workdir):
    path = workdir / "synonyms.json"
    path.write_text(json.dumps({"bicycle": ["bicycle", "bike", "cyclist"], "dog": ["dog", "puppy"],
                                "person": ["person", "people", "cyclist"], "bus": ["bus"], "sky": ["sky"],
                                "__ignore__": ["hot dog", "bus stop"]}))
    return captions_mod.SynonymDictionary.from_json(path, num_classes=4)


# ------------------------------------------------------------------------------------------
# Caption filter
# ------------------------------------------------------------------------------------------

@FAST
@given(caption_text)
def test_normalize_and_tokenize_any_text(text):
    normal = captions_mod.normalize_text(text)
    assert re.fullmatch(r"([a-z0-9]+( [a-z0-9]+)*)?", normal), normal
    tokens = captions_mod.tokenize(text, frozenset({"bus", "glass"}))
    assert len(tokens) == len(normal.split()) and all(tokens)


@FAST
@given(st.text(alphabet="abcegiklnoprsuyz", max_size=12), st.frozensets(st.text("abcegiklnoprsuyz", max_size=6)))
def test_singularize_any_word(word, vocabulary):
    singular = captions_mod.singularize(word, vocabulary)
    assert isinstance(singular, str) and (singular or not word)
    if word in vocabulary and word not in captions_mod.IRREGULAR_PLURALS:
        assert singular == word


@FAST
@given(caption_text)
def test_match_any_caption(dictionary, caption):
    assert dictionary.match(caption) <= set(range(len(dictionary.categories)))


@FUZZ
@given(st.dictionaries(caption_text, st.lists(caption_text, max_size=4), max_size=6),
       st.sampled_from([0.0, 1e-3]))
def test_pseudo_labels_any_captions(dictionary, captions, context_weight):
    config = captions_mod.CaptionFilterConfig(context_weight=context_weight)
    labels = captions_mod.pseudo_labels(captions, dictionary, config=config)
    assert labels.scores.shape == (len(captions), len(dictionary.categories))
    assert np.isfinite(labels.scores).all() and (labels.scores >= 0).all() and (labels.scores <= 1).all()


@FUZZ
@given(json_values | st.dictionaries(caption_text, st.lists(caption_text, max_size=3), max_size=4),
       st.binary(max_size=40), st.booleans())
@example(json_values=None, garbage=b"[" * 100_000, use_garbage=True)
@example(json_values=None, garbage="\ufeff{}".encode(), use_garbage=True)
def test_read_captions_any_file(workdir, json_values, garbage, use_garbage):
    folder = _fresh(workdir, "captions")
    content = garbage if use_garbage else json.dumps(json_values).encode()
    (folder / "captions.json").write_bytes(content)
    captions = _calls_or_data_error(lambda: captions_mod.read_captions(folder), folder)
    if captions is not None:
        assert all(isinstance(c, str) for caps in captions.values() for c in caps)


# ------------------------------------------------------------------------------------------
# VOC XML
# ------------------------------------------------------------------------------------------

REAL_XML = sorted((data.ROOT.parent / "shared" / "data" / "real_sample" / "voc" / "Annotations").glob("*.xml"))
SYNTHETIC_XML = (b"<annotation><filename>a.jpg</filename><size><width>64</width><height>48</height></size>"
                 b"<object><name>dog</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>2</ymin>"
                 b"<xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>")
XML_SEEDS = [p.read_bytes() for p in REAL_XML] or [SYNTHETIC_XML]
numberish = st.sampled_from(["", " ", "0", "1", "-1", "3.5", "1e999", "-1e999", "inf", "nan", "0x10", "1_0",
                             "abc", "٣", "１", "1 2"]) | caption_text


path_like = st.sampled_from(["a.jpg", "sub/b.jpg", "../x.jpg", "../../../etc/passwd", "/etc/passwd", "..\\..\\x.jpg",
                             "", ".", "..", "C:\\x.jpg", "a/../../b.jpg", "a/./b/../c.jpg", "a\x00.jpg", "//srv/x"])


@st.composite
def mutated_xml(draw):
    """A real VOC annotation with one of: a text value replaced, the filename replaced by a
    path, a slice cut, bytes inserted."""
    xml = draw(st.sampled_from(XML_SEEDS))
    how = draw(st.sampled_from(["value", "filename", "cut", "insert"]))
    if how in ("value", "filename"):
        values = list(re.finditer(rb">([^<]*)<", xml))
        if how == "filename":
            values = [m for m in values if xml[:m.start()].endswith(b"<filename")] or values
        m = draw(st.sampled_from(values))
        new = draw(path_like if how == "filename" else numberish)
        new = new.encode("utf-8", "surrogatepass").replace(b"<", b"").replace(b"&", b"")
        return xml[:m.start(1)] + new + xml[m.end(1):]
    i = draw(st.integers(0, len(xml)))
    if how == "cut":
        return xml[:i] + xml[i + draw(st.integers(1, 200)):]
    return xml[:i] + draw(st.binary(max_size=12)) + xml[i:]


@st.composite
def random_voc_tree(draw):
    tags = ["annotation", "filename", "size", "width", "height", "object", "name", "difficult", "bndbox",
            "xmin", "ymin", "xmax", "ymax"]

    def element(depth):
        tag = draw(st.sampled_from(tags))
        if depth > 2 or draw(st.booleans()):
            text = draw(path_like if tag == "filename" else numberish).replace("<", "").replace("&", "")
            return f"<{tag}>{text}</{tag}>"
        return f"<{tag}>" + "".join(element(depth + 1) for _ in range(draw(st.integers(0, 3)))) + f"</{tag}>"

    body = "".join(element(1) for _ in range(draw(st.integers(0, 4))))
    return f"<annotation>{body}</annotation>".encode("utf-8", "surrogatepass")


@FUZZ
@given(mutated_xml() | random_voc_tree() | st.binary(max_size=60))
@example(b"<annotation><size><width>inf</width></size></annotation>")
@example(b"<annotation><object><name>dog</name><difficult>1e999</difficult></object></annotation>")
@example(b'<?xml version="1.0" encoding="utf-16"?><annotation/>')
@example(b'<?xml version="1.0" encoding="no-such-codec"?><annotation/>')
def test_read_voc_annotation_any_bytes(workdir, xml):
    path = _fresh(workdir, "xml") / "000001.xml"
    path.write_bytes(xml)
    ann = _calls_or_data_error(lambda: data.read_voc_annotation(path), path.parent)
    if ann is not None:
        assert isinstance(ann.filename, str) and all(isinstance(o.name, str) for o in ann.objects)


def _write_voc(base: Path, xml: bytes, split_text: str, class_files: bool) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    (base / "Annotations" / "000001.xml").write_bytes(xml)
    (base / "ImageSets/Main/trainval.txt").write_text(split_text, encoding="utf-8", errors="surrogatepass")
    if class_files:
        listed = [line.split()[0] for line in split_text.splitlines() if line.strip()]
        for c in data.VOC_CLASSES:
            (base / f"ImageSets/Main/{c}_trainval.txt").write_text(
                "".join(f"{i} -1\n" for i in listed), encoding="utf-8", errors="surrogatepass")


@FUZZ
@given(mutated_xml() | random_voc_tree(), st.lists(path_like.map(lambda p: p.removesuffix(".jpg")) | caption_text,
                                                   max_size=3), st.booleans())
@example(xml=SYNTHETIC_XML, split_ids=["../../../etc/passwd"], class_files=True)
@example(xml=SYNTHETIC_XML.replace(b"a.jpg", b"../../x.jpg"), split_ids=[], class_files=False)
def test_load_voc_any_xml_and_split_list(workdir, xml, split_ids, class_files):
    base = _fresh(workdir, "voc")
    _write_voc(base, xml, "\n".join(["000001", *split_ids]), class_files)
    samples = _calls_or_data_error(lambda: data.load_voc(base, 2007, "trainval"), base)
    for s in samples or []:
        assert _inside(s.path, base / "JPEGImages"), s.path


# ------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------

coco_ids = st.integers(-1, 3) | st.sampled_from(["1", None, 1.5, True, [1], {"a": 1}])


@st.composite
def coco_files(draw):
    """A well-formed instances file, then one field replaced or dropped, or a random JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    images = [{"id": k, "file_name": draw(path_like | caption_text)} for k in range(draw(st.integers(0, 4)))]
    categories = [{"id": k, "name": draw(st.sampled_from(["dog", "_background_", ""]) | caption_text)}
                  for k in range(draw(st.integers(0, 3)))]
    annotations = [{"id": j, "image_id": draw(st.integers(-1, len(images))),
                    "category_id": draw(st.integers(-1, len(categories)))} for j in range(draw(st.integers(0, 5)))]
    raw = {"images": images, "annotations": annotations, "categories": categories}
    # every (container, key) of the file, so that one of them can be corrupted
    slots = [(raw, k) for k in raw] + [(lst, i) for lst in raw.values() for i in range(len(lst))]
    slots += [(item, k) for lst in raw.values() for item in lst for k in item]
    how = draw(st.sampled_from(["keep", "replace", "drop"]))
    if how != "keep" and slots:
        container, key = draw(st.sampled_from(slots))
        if how == "drop" and isinstance(container, dict):
            del container[key]
        else:
            container[key] = draw(coco_ids | path_like | json_values)
    return raw


@FUZZ
@given(coco_files())
@example({"images": [{"id": 1, "file_name": "../../x.jpg"}], "categories": [{"id": 1, "name": "dog"}],
          "annotations": [{"image_id": 1, "category_id": 1}]})
@example({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": "2", "file_name": "b.jpg"}],
          "categories": [{"id": 1, "name": "dog"}],
          "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": "2", "category_id": 1}]})
def test_load_coco_any_json(workdir, raw):
    folder = _fresh(workdir, "coco")
    path = folder / "instances.json"
    path.write_text(json.dumps(raw), encoding="utf-8", errors="surrogatepass")
    result = _calls_or_data_error(lambda: data.load_coco(path, folder / "images"), folder)
    if result is not None:
        samples, classes = result
        assert all(_inside(s.path, folder / "images") for s in samples), [s.path for s in samples]
        assert all(len(s.labels) == len(classes) for s in samples)


# ------------------------------------------------------------------------------------------
# NUS-WIDE
# ------------------------------------------------------------------------------------------

list_lines = st.lists(st.sampled_from(["actor\\0001_1.jpg", "..\\outside.jpg", "a\\..\\..\\outside.jpg", " "])
                     | path_like | caption_text, min_size=1, max_size=4)
label_values = st.lists(st.sampled_from(["0", "1", "2", "-1", " ", ""]) | caption_text, max_size=5)
corruptions = (st.none() | st.binary(max_size=20)
               | label_values.map(lambda v: "\n".join(v).encode("utf-8", "surrogatepass")))


@pytest.mark.filterwarnings("ignore:.*listed images are missing:UserWarning")
@FUZZ
@given(st.lists(st.sampled_from(["sky", "animal"]) | caption_text, min_size=1, max_size=3, unique=True),
       list_lines, st.lists(st.booleans(), min_size=12, max_size=12), corruptions, st.integers(0, 4))
def test_load_nuswide_any_lists(workdir, concepts, listed, bits, corruption, corrupt_at):
    root = _fresh(workdir, "nus")
    (root / "Flickr/actor").mkdir(parents=True)
    (root / "Flickr/actor/0001_1.jpg").write_bytes(b"")
    (root / "outside.jpg").write_bytes(b"")        # what an escaping entry would reach
    (root / "ImageList").mkdir()
    (root / "Groundtruth/TrainTestLabels").mkdir(parents=True)
    files = [root / "Concepts81.txt", root / "ImageList/TrainImagelist.txt"]
    files[0].write_text("\n".join(concepts), encoding="utf-8", errors="surrogatepass")
    list_text = "\r\n".join(listed)
    files[1].write_text(list_text, encoding="utf-8", errors="surrogatepass")
    rows = sum(1 for line in list_text.splitlines() if line.strip())
    for c, name in enumerate(concepts):   # consistent label files, one 0/1 per listed image
        f = root / "Groundtruth/TrainTestLabels" / f"Labels_{name.strip()}_Train.txt"
        try:
            f.write_text("".join("01"[bits[(4 * c + k) % 12]] + "\n" for k in range(rows)))
        except (OSError, ValueError):     # a concept name this file system cannot hold
            continue
        files.append(f)
    if corruption is not None and corrupt_at < len(files):
        files[corrupt_at].write_bytes(corruption)
    result = _calls_or_data_error(lambda: data.load_nuswide(root, "train"), root)
    if result is not None:
        samples, names, missing = result
        assert all(_inside(s.path, root / "Flickr") for s in samples) and names and missing >= 0
        assert all(len(s.labels) == len(names) and set(s.labels.tolist()) <= {1, -1} for s in samples)


# ------------------------------------------------------------------------------------------
# CSV (eval.py --scores / --labels)
# ------------------------------------------------------------------------------------------

number_cell = st.floats().map(repr) | st.integers(-1, 1).map(str) | st.sampled_from(["1e999", " 1", "1_0", "-0", ""])
well_formed_csv = st.integers(1, 4).flatmap(lambda width: st.lists(
    st.tuples(caption_text, st.lists(number_cell | st.just("x"), min_size=width - 1, max_size=width - 1)),
    max_size=4).map(lambda rows: "\n".join(",".join(r) for r in [["image_id", *"abcd"[:width - 1]],
                                                                *([i, *v] for i, v in rows)])))
csv_text = st.lists(st.lists(st.sampled_from(["image_id", "a", "1", "-1", "0.5", "nan", "", '"', '"x,y"', " "])
                             | caption_text, max_size=4), max_size=5).map(
    lambda rows: "\n".join(",".join(r) for r in rows))


@FUZZ
@given(csv_text.map(lambda t: t.encode("utf-8", "surrogatepass"))
       | well_formed_csv.map(lambda t: t.encode("utf-8", "surrogatepass"))
       | well_formed_csv.map(lambda t: ("\ufeff" + t).encode("utf-8", "surrogatepass"))
       | st.binary(max_size=60) | st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig"]).map(
           lambda enc: "image_id,café\nx,1\n".encode(enc)))
@example(b"image_id,a\n" + b"x" * 200_000 + b",1\n")
@example(b"image_id,a\nx\x00,1\n")
def test_read_table_csv_any_bytes(workdir, content):
    path = _fresh(workdir, "csv") / "table.csv"
    path.write_bytes(content)
    result = _calls_or_data_error(lambda: data.read_table_csv(path), path.parent)
    if result is not None:
        row_ids, columns, values = result
        assert values.shape == (len(row_ids), len(columns)) and len(set(row_ids)) == len(row_ids)
