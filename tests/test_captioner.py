"""`python captions.py generate` end to end on the CPU, with a tiny randomly initialised BLIP-2 built
here (no download), on the real VOC photos of ../shared/data/real_sample."""
import json
import shutil
import sys

import pytest

import captions
import data
import registry
from tests.helpers import tiny_blip2

transformers = pytest.importorskip("transformers",
                                   reason="captions need the optional extra (requirements-captions.txt)")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:skipping image:UserWarning")

@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return tiny_blip2(tmp_path_factory.mktemp("blip2-tiny"))


@pytest.fixture
def photos(shared_data, tmp_path):
    """The three real VOC JPEGs, one in a subfolder, plus a corrupt PNG."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    jpgs = sorted((shared_data / "real_sample" / "voc" / "JPEGImages").glob("*.jpg"))
    assert len(jpgs) == 3
    for k, p in enumerate(jpgs):
        shutil.copy(p, folder / ("sub" if k == 2 else "") / p.name)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def _captions(args, out, model, *extra):
    return captions.main(["generate", *args, "--model", str(model), "--out", str(out), "--max-new-tokens", "6",
                      "--workers", "0", "--quiet", *extra])


def _count_generate(monkeypatch, fail_at=None, on_fail=None):
    """Wrap captions._generate: record every prompt; raise on call number `fail_at`."""
    calls = []
    real = captions._generate

    def generate(model, tokenizer, features, prompts, max_new_tokens):
        calls.append(list(prompts))
        if len(calls) == fail_at:
            if on_fail is not None:
                on_fail()
            raise RuntimeError("interrupted by the test")
        return real(model, tokenizer, features, prompts, max_new_tokens)

    monkeypatch.setattr(captions, "_generate", generate)
    return calls


def test_precomputed_features_give_blip2s_own_answers(blip2_dir, shared_data):
    model, processor = captions.load_blip2(blip2_dir, "cpu")
    jpgs = sorted((shared_data / "real_sample" / "voc" / "JPEGImages").glob("*.jpg"))[:2]
    images = [data.decode_image(p) for p in jpgs]
    prompts = [[captions.PROMPT_TEMPLATE.format(captions.CAPTION_PROMPTS[0])],
               captions.recaption_prompts(["person", "sky"])[2:4]]
    pixels = torch.stack([captions._BlipPreprocess(processor.image_processor)(im) for im in images])
    with torch.inference_mode():
        ours = captions._caption_images(model, processor.tokenizer, captions._image_features(model, pixels), prompts, 6)
        flat = [(im, p) for im, ps in zip(images, prompts) for p in ps]
        inputs = processor(images=[im for im, _ in flat], text=[p for _, p in flat], return_tensors="pt", padding=True)
        ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    ref = processor.tokenizer.batch_decode(ref[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [a for answers in ours for a in answers] == [r.strip() for r in ref]
    assert any(a for a in ref)


def test_prompts_follow_the_released_files():
    assert len(captions.CAPTION_PROMPTS) == 6
    assert captions.recaption_prompts(["car"])[3] == \
        "Question: What objects are present in this image, excluding car? Answer:"
    assert captions.recaption_prompts(["aeroplane", "sky"])[4] == \
        "Question: Please explain this photo in detail, excluding aeroplane sky? Answer:"
    assert captions.recaption_prompts([])[0] == "Question: What is in the photo? Answer:"


def test_folder_end_to_end(blip2_dir, photos, tmp_path, monkeypatch, capsys):
    calls = _count_generate(monkeypatch)
    out = tmp_path / "caps"
    synonyms = registry.get("voc2007").synonym_file()
    with pytest.warns(UserWarning, match="broken.png: cannot decode image"):
        assert _captions(["--dataset", "folder", "--data-root", str(photos), "--synonyms", str(synonyms),
                          "--batch-size", "2"], out, blip2_dir) == 0
    assert "4 images read, 1 skipped" in capsys.readouterr().err
    raw = json.loads((out / "captions.json").read_text())
    assert sorted(raw) == ["2011_000003.", "2011_000006.", "sub/2011_000025."]
    assert set(json.loads((out / "re_captions.json").read_text())) == set(raw)
    caps = captions.read_captions(out)
    assert all(len(c) == 12 for c in caps.values()) and not (out / "captions.partial.json").exists()
    # Second-pass prompts exclude exactly what the project's filter finds in the first six captions.
    dictionary = captions.SynonymDictionary.from_json(synonyms, 0)
    first = [a for call in calls[0::2] for a in call]
    assert first == [captions.PROMPT_TEMPLATE.format(p) for p in captions.CAPTION_PROMPTS] * 3
    expected = [p for image_id in raw for p in
                captions.recaption_prompts(captions.found_categories(raw[image_id], dictionary, dictionary.categories))]
    assert [p for call in calls[1::2] for p in call] == expected
    assert any("excluding" in p for p in expected)
    assert captions.main(["pseudo-labels", "--dataset", "voc2007", "--captions", str(out),
                      "--out", str(tmp_path / "scores.csv"), "--quiet"]) == 0
    assert "3 images, 36 captions" in capsys.readouterr().out


def test_folder_without_dictionary_writes_first_pass_only(blip2_dir, photos, tmp_path, capsys):
    out = tmp_path / "caps"
    assert _captions(["--dataset", "folder", "--data-root", str(photos)], out, blip2_dir) == 0
    assert "captions.json only" in capsys.readouterr().err
    assert not (out / "re_captions.json").exists()
    assert all(len(c) == 6 for c in captions.read_captions(out).values())


def test_voc_layout(blip2_dir, shared_data, tmp_path, capsys):
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages"):
        shutil.copytree(shared_data / "real_sample" / "voc" / sub, root / sub)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    ids = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    out = tmp_path / "caps"
    assert _captions(["--dataset", "voc2007", "--data-root", str(tmp_path), "--split", "trainval"], out, blip2_dir) == 0
    assert sorted(json.loads((out / "re_captions.json").read_text())) == [i + "." for i in ids]
    assert captions.main(["pseudo-labels", "--dataset", "voc2007", "--captions", str(out),
                      "--out", str(tmp_path / "scores.csv"), "--quiet"]) == 0
    assert f"{len(ids)} images, {12 * len(ids)} captions" in capsys.readouterr().out


def test_interrupted_run_resumes_without_captioning_twice(blip2_dir, photos, tmp_path, monkeypatch):
    out = tmp_path / "caps"
    synonyms = registry.get("voc2007").synonym_file()
    args = ["--dataset", "folder", "--data-root", str(photos), "--synonyms", str(synonyms),
            "--batch-size", "1", "--save-every", "1"]
    saved = {}

    def check_periodic_save():
        # Batch 1 (two calls: captions, re-captions) is on disk before batch 2 fails.
        saved.update(json.loads((out / "captions.partial.json").read_text()))

    _count_generate(monkeypatch, fail_at=3, on_fail=check_periodic_save)
    with pytest.raises(RuntimeError, match="interrupted"):
        _captions(args, out, blip2_dir)
    assert list(saved["captions"]) == list(saved["re_captions"]) == ["2011_000003."]
    assert not (out / "captions.json").exists()

    calls = _count_generate(monkeypatch)
    assert _captions(args, out, blip2_dir) == 0
    assert len(calls) == 4 and all(len(c) == 6 for c in calls)   # 2 images left, 2 passes each
    final = {name: json.loads((out / f"{name}.json").read_text()) for name in ("captions", "re_captions")}
    assert sorted(final["captions"]) == sorted(final["re_captions"]) == \
        ["2011_000003.", "2011_000006.", "sub/2011_000025."]
    assert final["captions"]["2011_000003."] == saved["captions"]["2011_000003."]
    assert not (out / "captions.partial.json").exists()

    calls = _count_generate(monkeypatch)
    assert _captions(args, out, blip2_dir) == 0 and calls == []


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_one_line_errors(blip2_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    run = ["--dataset", "folder", "--data-root", str(folder)]
    assert _captions(run, tmp_path / "o", blip2_dir) == 2
    assert _error_line(capsys) == f"error: {folder}: no image to caption"
    (folder / "a.jpg").write_bytes(b"junk")
    assert _captions(run, tmp_path / "o", blip2_dir) == 2
    assert _error_line(capsys) == f"error: folder {folder}: none of the 1 images could be read; nothing captioned"
    missing = tmp_path / "no-model"
    assert _captions(run, tmp_path / "o", missing) == 2
    assert _error_line(capsys) == (f"error: {missing}: model folder not found (nor a Hugging Face hub id such as "
                                   "Salesforce/blip2-opt-2.7b)")
    # a hub id that is not in the (empty, offline) cache: one line
    assert _captions(run, tmp_path / "o", "nobody/no-such-blip2") == 2
    assert _error_line(capsys).startswith("error: nobody/no-such-blip2: not a local model folder, and not loadable "
                                          "from the Hugging Face hub (")
    assert _captions(run, tmp_path / "o", folder) == 2
    assert _error_line(capsys) == f"error: {folder}: no config.json here: not a model folder written by save_pretrained"
    assert _captions(["--dataset", "voc2007", "--data-root", str(folder), "--split", "nope"], tmp_path / "o",
                     blip2_dir) == 2
    assert _error_line(capsys) == "error: --split: voc2007 splits are trainval, test, train, val; got 'nope'"
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert _captions(run, tmp_path / "o", blip2_dir) == 2
    assert _error_line(capsys) == ("error: transformers: not installed; captions need the optional extra: "
                                   "pip install -r requirements-captions.txt")
