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
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA
