"""Files from elsewhere: image paths stay inside their dataset, other encodings and binary junk
give one line naming the file, and an evaluation with nothing to evaluate is an error."""
import json
import shutil

import pytest

import captions
import data
import eval as eval_cli

ESCAPES = ["../../outside", "..\\..\\outside", "sub/../../../outside", "/tmp/outside"]


@pytest.fixture
def voc_copy(tmp_path, shared_data):
    """The real VOC sample copied to tmp_path/dataset/voc (Annotations/, JPEGImages/, ImageSets/Main/)."""
    base = tmp_path / "dataset" / "voc"
    shutil.copytree(shared_data / "real_sample" / "voc", base)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    # a real annotation just outside the dataset: what `../../outside` in a split list reaches
    shutil.copy(base / "Annotations" / "2011_000003.xml", base.parent / "outside.xml")
    return base


def one_error_line(error: pytest.ExceptionInfo, file_name: str, *fragments: str) -> str:
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(error.value.path))
    assert error.value.path.endswith(file_name), message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------------
# Image paths stay inside their root
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("class_files", [False, True])
def test_voc_split_list_ids_cannot_leave_the_dataset(voc_copy, escape, class_files):
    main = voc_copy / "ImageSets" / "Main"
    ids = ["2011_000003", escape]
    (main / "trainval.txt").write_text("\n".join(ids) + "\n")
    if class_files:   # the official label files: paths come from the ids alone, no XML is read
        for c in data.VOC_CLASSES:
            (main / f"{c}_trainval.txt").write_text("".join(f"{i} -1\n" for i in ids))
    with pytest.raises(data.DataError) as e:
        data.load_voc(voc_copy, 2011, "trainval")
    one_error_line(e, "trainval.txt", repr(escape + (".jpg" if class_files else ".xml")))


def test_voc_symlinked_image_folder_is_accepted_and_xml_filename_is_checked(voc_copy, tmp_path):
    # datasets often live on another disk behind a symlink: that is the user's choice
    real_images = tmp_path / "elsewhere" / "JPEGImages"
    real_images.parent.mkdir()
    shutil.move(voc_copy / "JPEGImages", real_images)
    (voc_copy / "JPEGImages").symlink_to(real_images, target_is_directory=True)
    samples = data.load_voc(voc_copy, 2011, split=None)
    assert data.decode_image(samples[0].path).shape == (3, 338, 500)
    xml = voc_copy / "Annotations" / "2011_000025.xml"
    xml.write_text(xml.read_text().replace("<filename>2011_000025.jpg</filename>",
                                           "<filename>../../../../etc/passwd</filename>"))
    with pytest.raises(data.DataError) as e:
        data.load_voc(voc_copy, 2011, split=None)
    one_error_line(e, "2011_000025.xml", "'../../../../etc/passwd' leads outside", "JPEGImages")


def test_voc_empty_xml_filename_falls_back_to_the_id(voc_copy):
    xml = voc_copy / "Annotations" / "2011_000006.xml"
    xml.write_text(xml.read_text().replace("<filename>2011_000006.jpg</filename>", "<filename></filename>"))
    samples = data.load_voc(voc_copy, 2011, split=None)
    assert samples[1].path == voc_copy / "JPEGImages" / "2011_000006.jpg"


@pytest.mark.parametrize("file_name,problem", [
    ("../../x.jpg", "leads outside"), ("JPEGImages/../../x.jpg", "leads outside"),
    ("..\\..\\x.jpg", "leads outside"), ("/etc/passwd", "is absolute"), ("C:\\Windows\\x.jpg", "is absolute"),
    ("", "names no file"),
])
def test_coco_file_names_cannot_leave_the_image_dir(tmp_path, shared_data, file_name, problem):
    raw = json.loads((shared_data / "real_sample/coco/instances_sample.json").read_text())
    raw["images"][1]["file_name"] = file_name
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(data.DataError) as e:
        data.load_coco(path, shared_data / "real_sample/voc")
    one_error_line(e, "instances.json", repr(file_name), problem)


@pytest.mark.parametrize("image,problem", [
    ({"id": 1, "file_name": 7}, "file_name 7 is not a string"),
    ({"id": "1", "file_name": "b.jpg"}, "not a COCO instances file"),   # ids of mixed types
])
def test_coco_bad_image_entries_give_one_line(tmp_path, image, problem):
    raw = {"images": [{"id": 0, "file_name": "a.jpg"}, image], "categories": [{"id": 1, "name": "dog"}],
           "annotations": [{"image_id": 0, "category_id": 1}, {"image_id": image["id"], "category_id": 1}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(data.DataError) as e:
        data.load_coco(path, tmp_path)
    one_error_line(e, "instances.json", problem)


def _nus_root(tmp_path, listed, concepts="sky\n"):
    root = tmp_path / "nus"
    (root / "ImageList").mkdir(parents=True)
    (root / "Groundtruth/TrainTestLabels").mkdir(parents=True)
    (root / "Flickr").mkdir()
    (root / "Concepts81.txt").write_text(concepts)
    (root / "ImageList/TrainImagelist.txt").write_text("\r\n".join(listed) + "\r\n")
    (root / "Groundtruth/TrainTestLabels/Labels_sky_Train.txt").write_text("1\n" * len(listed))
    return root


@pytest.mark.parametrize("entry", ["..\\..\\x.jpg", "../../x.jpg", "actor\\..\\..\\..\\x.jpg", "\\\\server\\x.jpg"])
def test_nuswide_list_entries_cannot_leave_the_image_dir(tmp_path, entry):
    root = _nus_root(tmp_path, ["actor\\0001_1.jpg", entry])
    (tmp_path / "x.jpg").write_bytes(b"")   # what the escaping entry would reach
    with pytest.raises(data.DataError) as e:
        data.load_nuswide(root, "train")
    one_error_line(e, "TrainImagelist.txt", repr(entry))


def test_nuswide_empty_concept_list(tmp_path):
    root = _nus_root(tmp_path, ["actor\\0001_1.jpg"], concepts="\n \n")
    with pytest.raises(data.DataError) as e:
        data.load_nuswide(root, "train")
    one_error_line(e, "Concepts81.txt", "names no concept")


# ------------------------------------------------------------------------------------------
# Encodings: BOM accepted, UTF-16 and binary refused in one line
# ------------------------------------------------------------------------------------------

def _labels_and_scores(tmp_path, labels_bytes: bytes, scores_bytes: bytes) -> tuple[str, str]:
    labels, scores = tmp_path / "labels.csv", tmp_path / "scores.csv"
    labels.write_bytes(labels_bytes)
    scores.write_bytes(scores_bytes)
    return str(labels), str(scores)


LABELS_CSV = "image_id,cat,dog\r\na,1,-1\r\nb,-1,1\r\n"
SCORES_CSV = "image_id,dog,cat\r\na,0.2,0.9\r\nb,0.8,0.1\r\n"


def test_bom_csv_from_a_spreadsheet_is_read(tmp_path, capsys):
    labels, scores = _labels_and_scores(tmp_path, LABELS_CSV.encode("utf-8-sig"), SCORES_CSV.encode("utf-8-sig"))
    ids, columns, values = data.read_table_csv(labels)
    assert ids == ["a", "b"] and columns == ["cat", "dog"] and values.tolist() == [[1, -1], [-1, 1]]
    assert eval_cli.main(["--scores", scores, "--labels", labels]) == 0
    assert capsys.readouterr().out.startswith("mAP 100.00")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_csv_gives_one_line(tmp_path, capsys, encoding):
    labels, scores = _labels_and_scores(tmp_path, LABELS_CSV.encode("utf-8"), SCORES_CSV.encode(encoding))
    assert eval_cli.main(["--scores", scores, "--labels", labels]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {scores}: not a UTF-8 CSV")


def test_binary_csv_gives_one_line(tmp_path, capsys, shared_data):
    jpeg = (shared_data / "real_sample/voc/JPEGImages/2011_000003.jpg").read_bytes()
    labels, scores = _labels_and_scores(tmp_path, jpeg, SCORES_CSV.encode())
    assert eval_cli.main(["--scores", scores, "--labels", labels]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {labels}: not a UTF-8 CSV")


def test_oversized_csv_field_gives_one_line(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("image_id,cat\n" + "x" * 200_000 + ",1\n")
    with pytest.raises(data.DataError) as e:
        data.read_table_csv(path)
    one_error_line(e, "scores.csv", "line 2: not readable as CSV")


def test_undecodable_list_files_give_one_line(voc_copy, tmp_path):
    main = voc_copy / "ImageSets" / "Main"
    (main / "trainval.txt").write_bytes("2011_000003\n".encode("utf-16"))
    with pytest.raises(data.DataError) as e:
        data.load_voc(voc_copy, 2011, "trainval")
    one_error_line(e, "trainval.txt", "not a UTF-8 split file")
    (main / "trainval.txt").write_text("\ufeff2011_000003\n")   # a BOM is not part of the first id
    for c in data.VOC_CLASSES:
        (main / f"{c}_trainval.txt").write_text("2011_000003 -1\n")
    (main / "dog_trainval.txt").write_bytes(b"2011_000003 \xff1\n")
    with pytest.raises(data.DataError) as e:
        data.load_voc(voc_copy, 2011, "trainval")
    one_error_line(e, "dog_trainval.txt", "not a UTF-8 class file")
    root = _nus_root(tmp_path, ["actor\\0001_1.jpg"])
    (root / "Groundtruth/TrainTestLabels/Labels_sky_Train.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(data.DataError) as e:
        data.load_nuswide(root, "train")
    one_error_line(e, "Labels_sky_Train.txt", "not a UTF-8 label file")


@pytest.mark.parametrize("old,new,problem", [
    ("<width>500</width>", "<width>inf</width>", "malformed annotation"),
    ('<annotation>', '<?xml version="1.0" encoding="no-such-codec"?><annotation>', "not valid XML (unknown encoding"),
])
def test_voc_xml_oddities_give_one_line(voc_copy, old, new, problem):
    xml = voc_copy / "Annotations" / "2011_000003.xml"
    text = xml.read_text()
    assert old in text
    xml.write_text(text.replace(old, new, 1))
    with pytest.raises(data.DataError) as e:
        data.load_voc(voc_copy, 2011, split=None)
    one_error_line(e, "2011_000003.xml", problem)


def test_deeply_nested_captions_json_gives_one_line(tmp_path, capsys):
    (tmp_path / "captions.json").write_text("[" * 100_000)
    assert captions.main(["pseudo-labels", "--dataset", "voc2007", "--captions", str(tmp_path),
                      "--out", str(tmp_path / "s.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "captions.json: not valid JSON (nested too deeply)" in err


# ------------------------------------------------------------------------------------------
# eval.py --scores/--labels with nothing to evaluate
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels_csv,difficult,problem", [
    ("image_id,cat,dog\na,-1,-1\nb,-1,-1\n", "ignore", "no class has a positive label (difficult=ignore)"),
    ("image_id,cat,dog\na,0,-1\nb,-1,0\n", "ignore", "no class has a positive label (difficult=ignore)"),
    ("image_id,cat,dog\na,0,-1\nb,-1,0\n", "negative", "no class has a positive label (difficult=negative)"),
    ("image_id,cat,dog\n", "ignore", "no image rows"),
    ("image_id\na\nb\n", "ignore", "no class column"),
])
def test_eval_with_no_evaluable_class_exits_2(tmp_path, capsys, labels_csv, difficult, problem):
    labels, scores = _labels_and_scores(tmp_path, labels_csv.encode(), SCORES_CSV.encode())
    assert eval_cli.main(["--scores", scores, "--labels", labels, "--difficult", difficult]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith(f"error: {labels}: {problem}") and "mAP" not in captured.out


def test_eval_evaluable_classes_follow_the_difficult_mode(tmp_path, capsys):
    labels, scores = _labels_and_scores(tmp_path, b"image_id,cat,dog\na,0,-1\nb,-1,-1\n", SCORES_CSV.encode())
    assert eval_cli.main(["--scores", scores, "--labels", labels]) == 2
    assert "no class has a positive label (difficult=ignore)" in capsys.readouterr().err
    # counted as present, the difficult-only cat is a positive: cat's AP is defined, dog's is n/a
    assert eval_cli.main(["--scores", scores, "--labels", labels, "--difficult", "positive"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mAP 100.00") and "n/a" in out
