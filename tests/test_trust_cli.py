"""Bad input on the command lines: every option checked before any work, weight files and
checkpoints that lie, paths a checkpoint names, outputs that cannot be written. Each is one line
naming the option or the file, exit status 2, no traceback, nothing half-written."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import config
import data
import eval as eval_cli
import frozen_clip
import pipeline
import registry
import synthetic as S
import train
from tests.conftest import world_fixture
from tests.helpers import one_error_line, rewrite_file, torchscript_archive, write_checkpoint

ROOT = frozen_clip.ROOT




world = world_fixture(seed=5, train=16, test=16)


# --------------------------------------------------------------------------------------------
# 1. Every config field checked up front
# --------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    "--lr=-1", "--lr=nan", "--lr=inf", "--lr=0", "--min-votes=0", "--workers=-1", "--epochs=0", "--batch-size=0",
    "--log-every=0", "--temperature=0", "--temperature=nan", "--tau-a=1.5", "--tau-a=-0.1", "--reso-tau=1",
    "--reso-eps=0", "--reso-eps=1.5", "--global-edge=-1", "--h-fraction=1", "--reweight-p=2",
    "--warmup-epochs=-1", "--weight-decay=-0.1", "--weight-decay=inf", "--prompt-lr-mult=-1", "--reso-margin=-1",
    "--reso-gamma=-1", "--reso-gamma=nan", "--asl-gamma-neg=-1", "--reso-epoch=-1", "--topk=0", "--image-size=-16",
    "--gcn-layers=0", "--reso-max-crops=0", "--seed=-1", "--device=tpu", "--device=cuda:x", "--device=gpu",
    "--dataset=nonsense", "--clip-weights-format=torchscript", "--graph-direction=col", "--train-labels=human",
]


@pytest.mark.parametrize("option", BAD_OPTIONS)
def test_bad_option_values_are_refused_before_any_work(option, tmp_path, capsys):
    name = option.split("=")[0]
    with pytest.raises(ValueError, match=f"^{name} must be") as e:
        config.parse_overrides([option])
    assert "\n" not in str(e.value)
    out = tmp_path / "run"
    assert train.main([option, f"--data-root={tmp_path / 'world'}", f"--out={out}"]) == 2
    one_error_line(capsys, name)
    assert not out.exists() and not (tmp_path / "world").exists()


def test_every_numeric_field_has_a_range():
    numeric = {f.name for f in dataclasses.fields(config.BACGCNConfig)
               if type(f.default) in (int, float)}
    assert numeric == set(config.NUMBER_RULES)


def test_unknown_dataset_lists_the_datasets_with_or_without_roots(capsys):
    for extra in ([], ["--data-root=x", "--captions=y"]):
        assert train.main(["--dataset=nonsense", *extra]) == 2
        one_error_line(capsys, "--dataset must be one of", *registry.names())


def test_cuda_device_without_cuda(monkeypatch, world, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device=cuda: CUDA cannot be used here \(.+\)$"):
        pipeline.resolve_device("cuda")
    out, missing_world = tmp_path / "run", tmp_path / "world"
    assert train.main(["--device=cuda:1", f"--data-root={world}", f"--out={out}"]) == 2
    assert one_error_line(capsys).startswith("error: --device=cuda:1: CUDA cannot be used here (")
    # found before anything else is looked at or built
    assert train.main(["--device=cuda", f"--data-root={missing_world}", "--build-world=true", f"--out={out}"]) == 2
    assert one_error_line(capsys).startswith("error: --device=cuda: CUDA cannot be used here (")
    assert not out.exists() and not missing_world.exists()


def test_image_size_and_topk_are_checked_against_the_model(world, tmp_path, capsys):
    cfg = config.BACGCNConfig(clip_weights=str(S.TINY_CLIP_WEIGHTS), image_size=100)
    with pytest.raises(ValueError, match=r"^--image-size=100: not a multiple of the patch size 8 of synthclip"):
        pipeline.build_backbone(cfg, "cpu")
    backbone = pipeline.build_backbone(cfg.replace(image_size=0), "cpu")
    pipeline.check_against_backbone(cfg.replace(topk=64), backbone)
    with pytest.raises(ValueError, match=r"^--topk=65: more than the 64 patches of synthclip-vit-t8 at 64 px$"):
        pipeline.check_against_backbone(cfg.replace(topk=65), backbone)
    cache = tmp_path / "cache"
    for option, problem in (("--topk=100000", "--topk=100000: more than the 256 patches"),   # the preset reads 128 px
                            ("--image-size=100", "--image-size=100: not a multiple")):
        assert train.main([option, f"--data-root={world}", f"--out={tmp_path / 'run'}", f"--cache-dir={cache}",
                           "--workers=0"]) == 2
        one_error_line(capsys, problem)
        # only the run's record of its start (config.json, train.log): the same command may start there again
        assert not cache.exists() and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json",
                                                                                               "train.log"]


# --------------------------------------------------------------------------------------------
# 2. --help
# --------------------------------------------------------------------------------------------

def test_help_lists_every_option_with_type_default_and_meaning(capsys):
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(config.BACGCNConfig):
        assert f"--{f.name.replace('_', '-')} " in out
    assert "--lr FLOAT" in out and "0.002" in out and "Top-K patches pooled per category" in out
    assert "--preset=NAME" in out and all(p in out for p in config.PRESETS)
    assert " Similarity Kernel (stage 3)" in out
    run = subprocess.run([sys.executable, "train.py", "-h"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0 and "--build-world BOOL" in run.stdout and not run.stderr


# --------------------------------------------------------------------------------------------
# 3. A mistyped --data-root builds nothing
# --------------------------------------------------------------------------------------------

def test_missing_world_is_built_only_at_the_default_path_or_on_request(tmp_path, monkeypatch, capsys):
    typo = tmp_path / "wrold"
    assert train.main([f"--data-root={typo}", f"--out={tmp_path / 'run'}"]) == 2
    one_error_line(capsys, f"{typo}: no proving-ground world here (no world.json)", "--build-world=true",
              f"synthetic.py build --out {typo}")
    assert not typo.exists() and not (tmp_path / "run").exists()
    built = []

    def build(entry, root, seed):
        built.append(root)
        root.mkdir(parents=True)
        (root / "world.json").write_text(json.dumps({"classes": ["a"]}))
    monkeypatch.setattr(pipeline, "build_dataset", build)
    cfg = pipeline.resolve_paths(config.BACGCNConfig(data_root=str(typo), build_world=True))
    assert built == [typo] and cfg.data_root == str(typo)
    default = tmp_path / "repo"
    monkeypatch.setattr(pipeline, "ROOT", default)
    cfg = pipeline.resolve_paths(config.BACGCNConfig(seed=7))
    assert built[-1] == default / "runs" / "world-seed7" and cfg.data_root == str(built[-1])


# --------------------------------------------------------------------------------------------
# 4, 5. Weight files that lie; no TorchScript without an explicit choice
# --------------------------------------------------------------------------------------------

class _Code:
    def __reduce__(self):
        return (print, ("a pickle that runs code",))


def _lying_weights(folder, kind: str):
    from safetensors.torch import save_file

    good = folder / "good.safetensors"
    save_file({"w": torch.zeros(64)}, str(good))
    path = folder / kind
    content = {
        "empty.safetensors": b"", "random.safetensors": np.random.default_rng(0).bytes(4096),
        "truncated.safetensors": good.read_bytes()[:-40], "empty.pt": b"",
        "random.pt": np.random.default_rng(1).bytes(4096), "text.pt": b"these are not weights\n",
        "code.pt": pickle.dumps(_Code()),
    }
    if kind in content:
        path.write_bytes(content[kind])
    elif kind == "truncated.pt":
        torch.save({"w": torch.zeros(64)}, str(path))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "list.pt":
        torch.save([torch.zeros(3)], str(path))
    elif kind == "strings.pt":
        torch.save({"w": "zero"}, str(path))
    return path


WEIGHT_CASES = [("empty.safetensors", "not a safetensors file"), ("random.safetensors", "not a safetensors file"),
                ("truncated.safetensors", "not a safetensors file"), ("empty.pt", "not a PyTorch state dict"),
                ("random.pt", "not a PyTorch state dict"), ("text.pt", "not a PyTorch state dict"),
                ("truncated.pt", "not a PyTorch state dict"), ("code.pt", "not a PyTorch state dict"),
                ("list.pt", "not a PyTorch state dict (it holds a list)"),
                ("strings.pt", "not a PyTorch state dict (entry 'w' is not a tensor)")]


@pytest.mark.parametrize("kind,problem", WEIGHT_CASES)
def test_weight_files_that_lie_give_one_line(kind, problem, tmp_path, capsys):
    path = _lying_weights(tmp_path, kind)
    with pytest.raises(data.DataError) as e:
        frozen_clip.create_clip(S.TINY_CLIP, path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: {problem}")
    assert "a pickle that runs code" not in capsys.readouterr().out


def test_lying_weights_stop_train_in_one_line(world, tmp_path, capsys):
    path = _lying_weights(tmp_path, "random.pt")
    assert train.main([f"--data-root={world}", f"--clip-weights={path}", f"--out={tmp_path / 'run'}",
                       f"--cache-dir={tmp_path / 'cache'}"]) == 2
    one_error_line(capsys, f"{path}: not a PyTorch state dict")
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / "tiny.pt"
    clip = frozen_clip.create_clip(S.TINY_CLIP, S.TINY_CLIP_WEIGHTS)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    torchscript_archive(state, path)
    return path


def test_auto_never_runs_torch_jit_load(tiny_archive, monkeypatch):
    calls = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(data.DataError, match="a TorchScript archive, which can carry code: pass "
                                             "--clip-weights-format=openai-torchscript") as e:
        frozen_clip.create_clip(S.TINY_CLIP, tiny_archive)
    assert "python frozen_clip.py convert" in str(e.value) and calls == []
    frozen_clip.create_clip(S.TINY_CLIP, tiny_archive, "openai-torchscript")
    assert len(calls) == 1


def test_convert_errors_are_one_line(tmp_path, capsys):
    assert frozen_clip.main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "out.safetensors")]) == 2
    one_error_line(capsys, "missing.pt: CLIP weights not found")
    junk = _lying_weights(tmp_path, "random.pt")
    assert frozen_clip.main(["convert", str(junk), str(tmp_path / "out.safetensors")]) == 2
    one_error_line(capsys, f"{junk}: not a PyTorch state dict")
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------------------------
# 6. Checkpoints that lie
# --------------------------------------------------------------------------------------------





def _config_with(**changes) -> str:
    raw = json.loads(config.BACGCNConfig().to_json())
    return json.dumps({**raw, **changes})


CHECKPOINT_CASES = {
    "empty": (lambda p: p.write_bytes(b""), "not a safetensors checkpoint"),
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not a safetensors checkpoint"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "not a safetensors checkpoint"),
    "no config": (lambda p: rewrite_file(p, {"config": None}), "checkpoint metadata lacks 'config'"),
    "config not JSON": (lambda p: rewrite_file(p, {"config": "{lr: 1"}), "recorded config is not JSON"),
    "config a list": (lambda p: rewrite_file(p, {"config": "[1, 2]"}), "recorded config: not a JSON object"),
    "invalid value": (lambda p: rewrite_file(p, {"config": _config_with(lr=-1)}), "recorded config: --lr must be > 0"),
    "unknown value": (lambda p: rewrite_file(p, {"config": _config_with(dataset="imagenet")}),
                      "recorded config: --dataset must be one of"),
    "wrong type": (lambda p: rewrite_file(p, {"config": _config_with(topk="8")}),
                   "recorded config: --topk must be an int, got '8'"),
    "classes not JSON": (lambda p: rewrite_file(p, {"classes": "[cat"}), "checkpoint metadata 'classes' is not JSON"),
    "no graph.M": (lambda p: rewrite_file(p, tensors={"graph.M": None}), "checkpoint lacks the tensor graph.M"),
    "no graph.N": (lambda p: rewrite_file(p, tensors={"graph.N": None}), "checkpoint lacks the tensor graph.N"),
    "graph.M shape": (lambda p: rewrite_file(p, tensors={"graph.M": torch.ones(20, 19)}),
                      "tensor graph.M has shape [20, 19], expected [20, 20] for 20 categories"),
    "prompts shape": (lambda p: rewrite_file(p, tensors={"model.kernel.prompts": torch.ones(19, 32)}),
                      "tensor model.kernel.prompts has shape [19, 32], expected [20, embedding size]"),
    "gcn weight shape": (lambda p: rewrite_file(p, tensors={"model.gcn.weights.0": torch.zeros(16, 16)}),
                         "tensor model.gcn.weights.0 has shape [16, 16], the recorded config gives [32, 32]"),
    "missing weight": (lambda p: rewrite_file(p, tensors={"model.bias": None}), "lacks the tensor model.bias"),
    "forged graph": (lambda p: rewrite_file(p, tensors={"model.gcn.indices": torch.full((1,), 10 ** 6)}),
                     "tensor model.gcn.indices has shape [1]"),
    "NaN weight": (lambda p: rewrite_file(p, tensors={"model.branch": torch.full((3,), float("nan"))}),
                   "tensor model.branch holds NaN or infinite values"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoints_that_lie_give_one_line(case, tmp_path, capsys):
    path = write_checkpoint(tmp_path / "ckpt.safetensors", config.BACGCNConfig())
    spoil, problem = CHECKPOINT_CASES[case]
    spoil(path)
    with pytest.raises(data.DataError) as e:
        cfg, classes, _, tensors, _ = checkpoints.read_checkpoint(str(path))
        checkpoints.model_from_checkpoint(str(path), cfg, classes, tensors)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: {problem}"), str(e.value)
    if "model." not in problem:   # found before any data is read: through the command line too
        assert eval_cli.main([str(path)]) == 2
        one_error_line(capsys, f"{path}: {problem}")


def test_forged_graph_of_the_right_size_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt.safetensors", config.BACGCNConfig())
    cfg, classes, _, tensors, _ = checkpoints.read_checkpoint(str(path))
    indices = tensors["model.gcn.indices"].clone()
    indices[0] = 10 ** 6
    rewrite_file(path, tensors={"model.gcn.indices": indices})
    cfg, classes, _, tensors, _ = checkpoints.read_checkpoint(str(path))
    with pytest.raises(data.DataError, match="model.gcn.indices does not match the graph rebuilt from graph.M"):
        checkpoints.model_from_checkpoint(str(path), cfg, classes, tensors)


# --------------------------------------------------------------------------------------------
# 7. eval.py: what a checkpoint names is reported, overridable, and its cache only read
# --------------------------------------------------------------------------------------------

@pytest.fixture
def trained(world, tmp_path, monkeypatch):
    """A checkpoint written from tmp_path/train with relative paths, and a separate folder to
    evaluate from."""
    import shutil

    (tmp_path / "train").mkdir()
    shutil.copy(S.TINY_CLIP_WEIGHTS, tmp_path / "train" / "clip.safetensors")
    os.symlink(world, tmp_path / "train" / "world")
    monkeypatch.chdir(tmp_path / "train")
    dim = frozen_clip.create_clip(S.TINY_CLIP).visual.proj.shape[1]
    cfg = config.BACGCNConfig(data_root="world", clip_weights="clip.safetensors", cache_dir="cache", test_split="test",
                              workers=0)
    path = write_checkpoint(tmp_path / "ckpt.safetensors", cfg, dim)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return path


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*")) if folder.exists() else []


def test_checkpoint_records_absolute_paths(trained, tmp_path):
    cfg, *_ = checkpoints.read_checkpoint(str(trained))
    assert cfg.data_root == str(tmp_path / "train" / "world")
    assert cfg.clip_weights == str(tmp_path / "train" / "clip.safetensors")
    assert cfg.cache_dir == str(tmp_path / "train" / "cache")


def test_eval_says_what_it_loads_and_never_writes_the_checkpoints_cache(trained, tmp_path, capsys):
    recorded = tmp_path / "train" / "cache"
    assert eval_cli.main([str(trained)]) == 0
    out = capsys.readouterr().out
    assert (f"loading CLIP weights {tmp_path / 'train' / 'clip.safetensors'} (from the checkpoint), data root "
            f"{tmp_path / 'train' / 'world'} (from the checkpoint), feature cache {recorded} (from the checkpoint, "
            "read only)") in out
    local = tmp_path / "elsewhere" / ".cache" / "features"
    assert f"the checkpoint's feature cache {recorded} lacks synthetic/test: encoding into {local}" in out
    assert not recorded.exists() and _files(local)
    # --cache-dir is written; once the recorded cache is complete, it is read and left as it was
    assert eval_cli.main([str(trained), "--cache-dir", str(recorded)]) == 0
    assert f"feature cache {recorded} (--cache-dir)" in capsys.readouterr().out
    before = {p: p.stat().st_mtime_ns for p in recorded.rglob("*")}
    assert eval_cli.main([str(trained)]) == 0
    assert "feature cache hit" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in recorded.rglob("*")} == before


def test_eval_overrides_the_recorded_weights_and_data_root(trained, world, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    other.write_bytes(S.TINY_CLIP_WEIGHTS.read_bytes())
    assert eval_cli.main([str(trained), "--clip-weights", str(other), "--data-root", str(world),
                          "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert f"loading CLIP weights {other} (--clip-weights), data root {world} (--data-root)" in out


def test_eval_never_takes_torchscript_from_a_checkpoint(world, tiny_archive, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a))
    dim = frozen_clip.create_clip(S.TINY_CLIP).visual.proj.shape[1]
    cfg = config.BACGCNConfig(data_root=str(world), clip_weights=str(tiny_archive), test_split="test",
                              clip_weights_format="openai-torchscript")
    path = write_checkpoint(tmp_path / "ckpt.safetensors", cfg, dim)
    assert eval_cli.main([str(path), "--cache-dir", str(tmp_path / "c")]) == 2
    one_error_line(capsys, "a TorchScript archive", "--clip-weights-format=openai-torchscript")
    assert calls == []


def test_eval_bad_split_and_unwritable_json_stop_before_the_work(trained, tmp_path, capsys):
    assert eval_cli.main([str(trained), "--split", "bogus"]) == 2
    assert one_error_line(capsys) == ("error: --split bogus: not a split of synthetic (its splits: trainval, test, "
                                      "fit, val)")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for target, problem in ((tmp_path, "is a folder, not a file"),
                            (a_file / "out.json", f"cannot be written ({a_file} is a file, not a folder)")):
        assert eval_cli.main([str(trained), "--json", str(target)]) == 2
        assert one_error_line(capsys) == f"error: --json={target}: {problem}"
    assert not (tmp_path / "elsewhere" / ".cache").exists()     # nothing was encoded
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,cat\na,1\n")
    assert eval_cli.main(["--scores", str(labels), "--labels", str(labels), "--json", str(tmp_path)]) == 2
    one_error_line(capsys, "is a folder, not a file")
    for _ in range(2):   # an existing report is replaced
        assert eval_cli.main(["--scores", str(labels), "--labels", str(labels), "--json", str(a_file)]) == 0
        assert json.loads(a_file.read_text())["mAP"] == 100.0


# --------------------------------------------------------------------------------------------
# 8, 9. synthetic.py and train.py outputs
# --------------------------------------------------------------------------------------------

def test_synthetic_cli_bad_paths(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert S.main(["build", "--out", str(a_file), "--train", "2", "--test", "2"]) == 2
    assert one_error_line(capsys) == f"error: --out={a_file}: exists and is not a folder"
    assert a_file.read_text() == "keep"
    missing = tmp_path / "no_world"
    assert S.main(["zeroshot", "--data", str(missing), "--json", str(tmp_path / "z.json")]) == 2
    one_error_line(capsys, f"{missing}: no proving-ground world here (no world.json)")
    assert not (tmp_path / "z.json").exists()


def test_train_out_that_cannot_be_a_run_folder(world, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    for out, problem in ((a_file, "exists and is not a folder"),
                         (a_file / "run", f"cannot be written ({a_file} is a file, not a folder)")):
        assert train.main([f"--data-root={world}", f"--out={out}", f"--cache-dir={tmp_path / 'cache'}"]) == 2
        assert one_error_line(capsys) == f"error: --out={out}: {problem}"
    assert a_file.read_text() == "keep" and not (tmp_path / "cache").exists()
