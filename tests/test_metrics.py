import json

import numpy as np
import pytest

import eval as eval_cli
from metrics import average_precision, best_f1, mean_ap, prf_metrics


def test_ap_hand_worked():
    # ranking: +, -, +, -, +  -> precisions at positives 1, 2/3, 3/5
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, -1, 1, -1, 1])
    assert average_precision(scores, labels)[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_ap_ties_take_precision_at_end_of_group():
    # scores tie for a positive and a negative: both ranks share precision 1/2 (sklearn's rule)
    scores = np.array([0.5, 0.5, 0.1])
    labels = np.array([1, -1, 1])
    assert average_precision(scores, labels)[0] == pytest.approx((0.5 + 2 / 3) / 2)


def test_ap_matches_sklearn_with_and_without_ties():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for coarse in (False, True):
        scores = rng.random((301, 17))
        if coarse:
            scores = np.round(scores * 6) / 6  # heavy ties, like vote fractions
        labels = np.where(rng.random((301, 17)) < 0.2, 1, -1)
        ours = average_precision(scores, labels)
        ref = [sklearn.average_precision_score(labels[:, c] == 1, scores[:, c]) for c in range(17)]
        np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_difficult_modes():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    labels = np.array([1, 0, -1, 1])
    # ignore: ranking 0.9(+), 0.7(-), 0.1(+) -> (1 + 2/3) / 2
    assert average_precision(scores, labels, "ignore")[0] == pytest.approx((1 + 2 / 3) / 2)
    # positive: +, +, -, + -> (1 + 1 + 3/4) / 3
    assert average_precision(scores, labels, "positive")[0] == pytest.approx((1 + 1 + 0.75) / 3)
    # negative: +, -, -, + -> (1 + 2/4) / 2
    assert average_precision(scores, labels, "negative")[0] == pytest.approx((1 + 0.5) / 2)


def test_class_without_positive_is_nan_and_left_out_of_map():
    scores = np.array([[0.9, 0.2], [0.1, 0.3]])
    labels = np.array([[1, -1], [-1, -1]])
    ap = average_precision(scores, labels)
    assert ap[0] == 1.0 and np.isnan(ap[1])
    assert mean_ap(scores, labels) == 100.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels must be"):
        average_precision(np.zeros(3), np.array([1, 2, -1]))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([np.nan, 0.1]), np.array([1, -1]))
    with pytest.raises(ValueError, match="difficult"):
        average_precision(np.zeros(2), np.array([1, -1]), "maybe")


def test_prf_hand_worked():
    scores = np.array([[0.9, 0.6, 0.1],
                       [0.2, 0.7, 0.8],
                       [0.6, 0.1, 0.2]])
    labels = np.array([[1, -1, -1],
                       [-1, 1, 1],
                       [-1, -1, 1]])
    m = prf_metrics(scores, labels, threshold=0.5)
    # predictions: class0 {0,2} tp 1; class1 {0,1} tp 1; class2 {1} tp 1
    assert m["CP"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
    assert m["CR"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    assert m["OP"] == pytest.approx(100 * 3 / 5)
    assert m["OR"] == pytest.approx(100 * 3 / 4)
    assert m["OF1"] == pytest.approx(2 * 60 * 75 / 135)
    top1 = prf_metrics(scores, labels, threshold=0.5, topk=1)
    # top-1 and >= 0.5: image0 class0, image1 class2, image2 class0 -> tp 2 of 3 predictions
    assert top1["OP"] == pytest.approx(100 * 2 / 3)


def test_best_f1():
    scores = np.array([0.9, 0.8, 0.3, 0.2])
    labels = np.array([1, 1, -1, 1])
    f1, thr = best_f1(scores, labels)
    # cut at 0.2 predicts all four: P 3/4, R 1 -> F1 6/7 (better than 0.8: P 1, R 2/3 -> 0.8)
    assert f1 == pytest.approx(6 / 7) and thr == 0.2


def _write(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return str(path)


def test_eval_cli_scores_mode(tmp_path, capsys):
    labels = _write(tmp_path / "l.csv", ["image_id", "cat", "dog"], [["a", 1, -1], ["b", -1, 1], ["c", 0, 1]])
    # extra background column and another column order are fine
    scores = _write(tmp_path / "s.csv", ["image_id", "dog", "sky", "cat"],
                    [["c", 0.9, 0.5, 0.8], ["b", 0.7, 0.1, 0.2], ["a", 0.1, 0.3, 0.6]])
    out = tmp_path / "out.json"
    assert eval_cli.main(["--scores", scores, "--labels", labels, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["AP"] == {"cat": 100.0, "dog": 100.0}
    assert report["mAP"] == 100.0 and report["difficult"] == "ignore" and report["num_images"] == 3
    assert {"CF1", "OF1"} <= set(report)
    # difficult c counted negative: cat ranking c(0.8,-) a(0.6,+) b(0.2,-) -> AP 1/2
    assert eval_cli.main(["--scores", scores, "--labels", labels, "--difficult", "negative",
                          "--json", str(out)]) == 0
    assert json.loads(out.read_text())["AP"]["cat"] == pytest.approx(50.0)
    assert "mAP" in capsys.readouterr().out


def test_eval_cli_errors_name_the_file(tmp_path, capsys):
    labels = _write(tmp_path / "l.csv", ["image_id", "cat", "dog"], [["a", 1, -1], ["b", -1, 1]])
    no_dog = _write(tmp_path / "s1.csv", ["image_id", "cat"], [["a", 1], ["b", 0]])
    assert eval_cli.main(["--scores", no_dog, "--labels", labels]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "s1.csv" in err and "'dog'" in err
    no_b = _write(tmp_path / "s2.csv", ["image_id", "cat", "dog"], [["a", 1, 0]])
    assert eval_cli.main(["--scores", no_b, "--labels", labels]) == 2
    assert "s2.csv: no scores for image 'b'" in capsys.readouterr().err
    ragged = tmp_path / "s3.csv"
    ragged.write_text("image_id,cat,dog\na,1\n")
    assert eval_cli.main(["--scores", str(ragged), "--labels", labels]) == 2
    assert "s3.csv: line 2" in capsys.readouterr().err
    assert eval_cli.main(["--scores", str(tmp_path / "nope.csv"), "--labels", labels]) == 2
    assert "nope.csv: scores file not found" in capsys.readouterr().err


def test_size_split_map():
    from metrics import size_split_map
    # one class; 12 small positives ranked top, 12 large positives ranked bottom, 4 negatives between
    n_small, n_large = 12, 12
    scores = np.concatenate([np.linspace(1.0, 0.9, n_small), [0.5, 0.45, 0.4, 0.35], np.linspace(0.3, 0.2, n_large)])
    labels = np.array([1] * n_small + [-1] * 4 + [1] * n_large)
    areas = np.array([0.01] * n_small + [0.0] * 4 + [0.2] * n_large)
    out = size_split_map(scores[:, None], labels[:, None], areas[:, None], min_positives=10)
    assert out["mAP_small"] == pytest.approx(100.0)
    # large positives sit below all 4 negatives: precision at the k-th is k / (k + 4)
    assert out["mAP_large"] == pytest.approx(100 * np.mean([k / (k + 4) for k in range(1, 13)]))
    # a class with fewer than min_positives in a band is skipped
    assert np.isnan(size_split_map(scores[:, None], labels[:, None], areas[:, None], min_positives=13)["mAP_small"])
