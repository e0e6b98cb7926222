import os
import sys
from pathlib import Path

import pytest
import torch  # (imports no triton: the interpreter switch below still takes effect)

# Before anything imports triton or huggingface_hub. Without CUDA the kernels run in the Triton
# interpreter on the CPU; with CUDA they are compiled and run on the GPU (the interpreter there
# would skip the compile, the one step a GPU can fail). Nothing may reach a model hub.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on machines without it")


@pytest.fixture(scope="session")
def make_world(tmp_path_factory):
    """`make_world(seed, train, test)`: a proving-ground world, built once per session for each
    (seed, train, test) and shared by every test asking for it, so tests read it and never
    write into it (a test that needs changed files copies the world first)."""
    import synthetic

    built: dict[tuple[int, int, int], Path] = {}

    def make(seed: int, train: int, test: int) -> Path:
        if (seed, train, test) not in built:
            root = tmp_path_factory.mktemp(f"world-seed{seed}-{train}-{test}")
            synthetic.build(root, synthetic.WorldConfig(seed=seed, train=train, test=test), progress=False)
            built[seed, train, test] = root
        return built[seed, train, test]
    return make


def world_fixture(seed: int, train: int, test: int):
    """A test module's `world`: `world = world_fixture(seed=5, train=16, test=16)` at its top."""
    @pytest.fixture(scope="module")
    def world(make_world) -> Path:
        return make_world(seed, train, test)
    return world


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA
