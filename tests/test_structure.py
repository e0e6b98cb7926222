"""The codebase's own rules: imports run one way, functions and files stay small, optional Triton,
and the open_clip internals the backbone re-implements still match open_clip."""
import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import frozen_clip
import synthetic as S

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 900
# The method and the trainer stay small enough to read in one sitting.
FILE_CAPS = {"bacgcn.py": 400, "train.py": 500}
MODEL = {"bacgcn", "pipeline", "train", "eval", "reso", "runs", "checkpoints", "frozen_clip"}
# The proving ground and what only it uses; everything else at the top is the production path.
PROVING_GROUND = {"synthetic.py", "tinyclip.py"}


def _sources(skip_tests: bool = True) -> list[Path]:
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "kernels").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    return [p for p in files if not (skip_tests and p.parts[-2] == "tests")]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", ["eval.py", "pipeline.py", "data.py", "captions.py", "cache.py", "bacgcn.py",
                                  "metrics.py", "tracking.py", "peers.py", "config.py", "registry.py", "downloads.py",
                                  "cli.py", "frozen_clip.py", "reso.py", "runs.py", "checkpoints.py",
                                  "bench/profile_kernel.py", "bench/caption_table.py", "bench/caption_fit.py",
                                  "bench/compile_check.py", "bench/gpu_check.py"])
def test_commands_never_import_the_trainer(path):
    # bench/ablation.py and bench/compare.py are the exceptions: they run training by design.
    assert "train" not in _imported_modules(ROOT / path)


@pytest.mark.parametrize("path", ["train.py", "pipeline.py", "bacgcn.py", "eval.py"])
def test_the_trainer_never_imports_the_peers(path):
    assert "peers" not in _imported_modules(ROOT / path)


@pytest.mark.parametrize("path", ["data.py", "captions.py", "cache.py", "registry.py", "downloads.py"])
def test_data_layer_never_imports_the_model(path):
    assert not MODEL & _imported_modules(ROOT / path)


def test_the_downloader_builds_on_data_py_alone():
    project = {p.stem for p in ROOT.glob("*.py")}
    assert project & _imported_modules(ROOT / "downloads.py") == {"data"}


def test_data_py_is_the_bottom_of_the_data_layer():
    # captions.py and cache.py build on data.py; an import back would be a cycle, and
    # `python captions.py` (its own __main__) would then load a second copy of itself.
    assert not {"captions", "cache"} & _imported_modules(ROOT / "data.py")
    assert "data" in _imported_modules(ROOT / "captions.py") and "data" in _imported_modules(ROOT / "cache.py")


def _registered_names() -> set[str]:
    import registry
    return set(registry.names()) | set(registry.aliases())


def test_no_dataset_name_is_compared_outside_the_registry():
    """Every fact about a dataset is read from its registry entry: no `cfg.dataset == "voc2007"`,
    no `in ("synthetic", ...)`, no name sliced for its year."""
    names, found = _registered_names(), []
    for path in _sources():
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names]
                found += [f"{path.relative_to(ROOT)}:{node.lineno} compares with {c.value!r}" for c in consts]
    assert not found, "; ".join(found)


def test_the_production_path_never_imports_the_proving_ground():
    production = [p for p in sorted(ROOT.glob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
                  if p.name not in PROVING_GROUND]
    assert not [p.name for p in production if "synthetic" in _imported_modules(p)]


def test_the_method_and_the_trainer_stay_small():
    long = {name: n for name, cap in FILE_CAPS.items() if (n := len((ROOT / name).read_text().splitlines())) > cap}
    assert not long, f"over their caps ({FILE_CAPS}): {long}"


def test_no_file_over_900_lines():
    files = _sources() + sorted((ROOT / "tests").glob("*.py"))
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in files
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, "files over 900 lines: " + ", ".join(long)


def test_importing_eval_loads_no_trainer():
    code = "import sys; import eval; assert 'train' not in sys.modules, 'eval imported train'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_no_function_over_80_lines():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_kernels_import_and_run_without_triton():
    code = """
import sys
sys.modules["triton"] = None            # any `import triton` now raises ImportError
sys.modules["triton.language"] = None
import torch
import kernels
from kernels._common import HAS_TRITON
assert not HAS_TRITON
p, w = torch.randn(2, 17, 8), torch.randn(5, 8)
assert torch.equal(kernels.similarity_pool(p, w, 3, 0.1)[0], kernels.similarity_pool_ref(p, w, 3, 0.1)[0])
x = torch.randn(2, 4, 8)
indptr, indices, values = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1, 0, 3, 2]), torch.ones(4)
graph = (indptr, indices, values)
assert torch.equal(kernels.gcn_propagate(x, *graph), kernels.gcn_propagate_ref(x, *graph))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# open_clip internals used by frozen_clip.CLIPBackbone
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", [S.TINY_CLIP, "ViT-B-16-quickgelu"])
def test_reimplemented_last_block_matches_open_clip(model_name):
    """g from the re-implemented last block is exactly open_clip's encode_image, and the [cls]
    attention read from `in_proj_weight` equals nn.MultiheadAttention's own weights: an
    open_clip upgrade that changes those internals fails here."""
    torch.manual_seed(0)
    weights = S.TINY_CLIP_WEIGHTS if model_name == S.TINY_CLIP else None
    clip = frozen_clip.create_clip(model_name, weights)
    backbone = frozen_clip.CLIPBackbone(clip)
    size = backbone.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = backbone.encode_image(x)
        theirs = F.normalize(clip.encode_image(x), dim=-1)
        v = clip.visual
        h = v._embeds(x)
        for blk in v.transformer.resblocks[:-1]:
            h = blk(h)
        last = v.transformer.resblocks[-1]
        y = last.ln_1(h)
        _, attn = last.attn(y, y, y, need_weights=True, average_attn_weights=True)
    assert torch.equal(ours["g"], theirs)
    torch.testing.assert_close(ours["attn"], attn[:, 0, 1:], rtol=1e-5, atol=1e-6)


def test_random_init_warning_is_filtered_and_nothing_else(caplog):
    root = logging.getLogger()
    level, filters = root.level, list(root.filters)
    with caplog.at_level(logging.WARNING):
        frozen_clip.create_clip(S.TINY_CLIP)
        logging.warning("No pretrained weights loaded: a record that is not open_clip's")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["No pretrained weights loaded: a record that is not open_clip's"]
    assert root.level == level and root.filters == filters


# Packages of the ecosystem a user's environment may hold: a top-level module of the same name
# here would shadow it for anything run from the repository (transformers imports `datasets`).
WELL_KNOWN = {"datasets", "evaluate", "accelerate", "transformers", "tokenizers", "timm", "open_clip", "torch",
              "torchvision", "numpy", "safetensors", "huggingface_hub", "mlflow", "tqdm", "PIL", "sklearn",
              "scipy", "matplotlib", "triton", "ftfy", "regex", "yaml", "requests", "pytest", "hypothesis"}


def test_no_module_is_named_after_a_well_known_package():
    from importlib.metadata import packages_distributions

    ours = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    installed = set(packages_distributions())
    assert not ours & (WELL_KNOWN | installed), ours & (WELL_KNOWN | installed)
