import json
import warnings

import numpy as np
import pytest
import torch

import data
import registry

VOC_XML = """<annotation><filename>{id}.jpg</filename><size><width>64</width><height>48</height></size>
{objects}</annotation>"""
VOC_OBJ = ("<object><name>{name}</name><difficult>{d}</difficult>"
           "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>")


def _jpeg(path, seed=0, size=(48, 64)):
    from PIL import Image
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)


def voc_tree(root, objects_by_id, split="trainval", class_files=False):
    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for k, (image_id, objs) in enumerate(objects_by_id.items()):
        _jpeg(base / "JPEGImages" / f"{image_id}.jpg", k)
        body = "".join(VOC_OBJ.format(name=n, d=d) for n, d in objs)
        (base / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(id=image_id, objects=body))
    (base / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(objects_by_id) + "\n")
    if class_files:
        for c in data.VOC_CLASSES:
            lines = []
            for image_id, objs in objects_by_id.items():
                flags = [d for n, d in objs if n == c]
                v = -1 if not flags else (1 if "0" in flags or "" in flags else 0)
                lines.append(f"{image_id} {v:2d}")
            (base / "ImageSets/Main" / f"{c}_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


def test_voc_real_sample(shared_data):
    samples = data.load_voc(shared_data / "real_sample" / "voc", 2011, split=None)
    assert [s.id for s in samples] == ["2011_000003", "2011_000006", "2011_000025"]
    person = data.VOC_CLASSES.index("person")
    # 2011_000006 has four people, each with an empty <difficult/> tag: present, not difficult
    assert samples[1].labels[person] == 1 and (samples[1].labels == 1).sum() == 1
    ds = data.MultiLabelImages(samples, data.VOC_CLASSES)
    item = ds[1]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 375, 500)
    ann = data.read_voc_annotation(shared_data / "real_sample/voc/Annotations/2011_000006.xml")
    assert len(ann.objects) == 4 and not any(o.difficult for o in ann.objects)
    assert ann.objects[2].box == pytest.approx((254.38461538461536, 115.38461538461539,
                                                369.38461538461536, 292.38461538461536))


def test_coco_real_sample(shared_data):
    samples, classes = data.load_coco(shared_data / "real_sample/coco/instances_sample.json",
                                      shared_data / "real_sample/voc")
    assert classes[0] == "aeroplane" and len(classes) == 20  # "_background_" is not a class
    assert sorted(s.id for s in samples) == ["2011_000003", "2011_000006", "2011_000025"]
    # the COCO export has every class of the VOC XML (and more: its polygons include the
    # chair and sofa of 2011_000006 that the XML leaves out)
    voc = {s.id: s.labels for s in data.load_voc(shared_data / "real_sample" / "voc", 2011, None)}
    for s in samples:
        assert (s.labels[voc[s.id] == 1] == 1).all(), s.id
        assert data.decode_image(s.path).shape[0] == 3
    assert (samples[2].labels == 1).sum() == 3


@pytest.mark.parametrize("class_files", [True, False])
def test_voc_split_and_labels(tmp_path, class_files):
    objs = {"000001": [("dog", "0"), ("person", "0")], "000002": [("cat", "1")], "000003": [("car", "")]}
    voc_tree(tmp_path, objs, class_files=class_files)
    ds = registry.load("voc2007", tmp_path / "VOCdevkit", "trainval")
    assert len(ds) == 3 and ds.class_names == list(data.VOC_CLASSES)
    lab = ds.label_matrix()
    idx = data.VOC_CLASSES.index
    assert lab[0, idx("dog")] == 1 and lab[0, idx("person")] == 1
    assert lab[1, idx("cat")] == 0            # difficult-only
    assert lab[2, idx("car")] == 1            # empty <difficult/> is not difficult
    assert (lab == -1).sum() == 3 * 20 - 4
    assert ds[0]["labels"].tolist() == lab[0].tolist()


def test_voc_malformed_files(tmp_path):
    base = voc_tree(tmp_path, {"000001": [("dog", "0")]})
    (base / "Annotations" / "000001.xml").write_text("<annotation><object><name>dog</name>")
    with pytest.raises(data.DataError, match=r"000001\.xml: not valid XML"):
        data.load_voc(tmp_path, 2007, "trainval")
    unicorn = VOC_XML.format(id="000001", objects=VOC_OBJ.format(name="unicorn", d=0))
    (base / "Annotations" / "000001.xml").write_text(unicorn)
    with pytest.raises(data.DataError, match=r"000001\.xml: unknown class 'unicorn'"):
        data.load_voc(tmp_path, 2007, "trainval")
    with pytest.raises(data.DataError, match=r"test\.txt: split file not found"):
        data.load_voc(tmp_path, 2007, "test")
    voc_tree(tmp_path, {"000001": [("dog", "0")]}, class_files=True)
    (base / "ImageSets/Main/dog_trainval.txt").write_text("000001 yes\n")
    with pytest.raises(data.DataError, match=r"dog_trainval\.txt: line 1: expected"):
        data.load_voc(tmp_path, 2007, "trainval")
    with pytest.raises(data.DataError, match="no VOC2012 folder"):
        data.load_voc(tmp_path / "VOCdevkit", 2012, "train")


def _coco_json(path, images, annotations, categories):
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_coco_fixture(tmp_path):
    cats = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}]
    images = [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}, {"id": 9, "file_name": "c.jpg"}]
    anns = [{"id": 1, "image_id": 7, "category_id": 3}, {"id": 2, "image_id": 7, "category_id": 90},
            {"id": 3, "image_id": 8, "category_id": 1, "iscrowd": 1}]
    f = _coco_json(tmp_path / "instances_val2014.json", images, anns, cats)
    samples, classes = data.load_coco(f, tmp_path)
    assert classes == ["person", "car", "toothbrush"]           # category-id order
    assert [s.id for s in samples] == ["a", "b"]                  # c has no annotation: left out
    assert samples[0].labels.tolist() == [-1, 1, 1] and samples[1].labels.tolist() == [1, -1, -1]


@pytest.mark.parametrize("content,problem", [
    ("{", "not valid JSON"),
    ('{"images": []}', "not a COCO instances file"),
    ('{"images": [], "categories": [{"id": 1, "name": "a"}], "annotations": [{"image_id": 5, "category_id": 1}]}',
     "unknown image 5"),
])
def test_coco_malformed(tmp_path, content, problem):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(data.DataError) as e:
        data.load_coco(f, tmp_path)
    assert str(e.value).startswith(str(f)) and problem in str(e.value) and "\n" not in str(e.value)


def _nus_tree(root, concepts, rel_paths, labels, present):
    (root / "ImageList").mkdir(parents=True)
    (root / "Groundtruth/TrainTestLabels").mkdir(parents=True)
    (root / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    (root / "ImageList/TrainImagelist.txt").write_text("\r\n".join(rel_paths) + "\r\n")
    for c, name in enumerate(concepts):
        (root / f"Groundtruth/TrainTestLabels/Labels_{name}_Train.txt").write_text(
            "\n".join(str(row[c]) for row in labels) + "\n")
    for k, (rel, keep) in enumerate(zip(rel_paths, present)):
        if keep:
            p = root / "Flickr" / rel.replace("\\", "/")
            p.parent.mkdir(parents=True, exist_ok=True)
            _jpeg(p, k)


def test_nuswide_fixture_counts_missing_images(tmp_path):
    concepts = ["animal", "beach", "sky"]
    rel = ["actor\\0001_1.jpg", "beach\\0002_2.jpg", "sky\\0003_3.jpg"]
    _nus_tree(tmp_path, concepts, rel, [[1, 0, 0], [0, 1, 1], [0, 0, 1]], [True, False, True])
    with pytest.warns(UserWarning, match=r"1 of 3 listed images are missing"):
        samples, names, missing = data.load_nuswide(tmp_path, "train")
    assert names == concepts and missing == 1
    assert [s.id for s in samples] == ["0001_1", "0003_3"]
    assert samples[1].labels.tolist() == [-1, -1, 1]
    with pytest.warns(UserWarning):
        ds = registry.load("nuswide", tmp_path, "train")
    assert ds[0]["image"].shape == (3, 48, 64)


def test_nuswide_malformed(tmp_path):
    concepts = ["animal", "sky"]
    _nus_tree(tmp_path, concepts, ["a\\1.jpg", "a\\2.jpg"], [[1, 0], [0, 1]], [True, True])
    bad = tmp_path / "Groundtruth/TrainTestLabels/Labels_sky_Train.txt"
    bad.write_text("1\n")
    with pytest.raises(data.DataError, match=r"Labels_sky_Train\.txt: has 1 labels, TrainImagelist\.txt lists 2"):
        data.load_nuswide(tmp_path, "train")
    bad.write_text("1\n7\n")
    with pytest.raises(data.DataError, match=r"Labels_sky_Train\.txt: labels must be 0 or 1"):
        data.load_nuswide(tmp_path, "train")
    with pytest.raises(data.DataError, match=r"TestImagelist\.txt: image list not found"):
        data.load_nuswide(tmp_path, "test")


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    good = tmp_path / "good.jpg"
    _jpeg(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:200])                  # truncated JPEG
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    png = tmp_path / "photo.png"
    from PIL import Image
    Image.new("RGB", (10, 7), (255, 0, 0)).save(png)
    lab = np.array([1, -1], dtype=np.int8)
    samples = [data.Sample(p.stem, p, lab) for p in (good, corrupt, junk, tmp_path / "gone.jpg", png)]
    ds = data.MultiLabelImages(samples, ["a", "b"], transform=lambda im: im.float()[:, :7, :7])
    report = data.SkipReport()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers,
                                                 collate_fn=data.collate_images)
            for batch in loader:
                report.update(batch)
    # per pass: truncated JPEG, junk bytes and a missing file are skipped; JPEG and PNG load
    assert report.seen == 10 and report.skipped == 6
    ids = {w for w in map(lambda m: str(m.message), caught) if "skipping image" in w}
    assert any("junk.jpg" in w for w in ids) and any("gone.jpg: image file not found" in w for w in ids)
    assert report.summary() == "10 images read, 6 skipped (missing or corrupt; see warnings above)"
