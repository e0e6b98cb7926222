"""bench/gpu_check.py, the GPU acceptance script, runs end to end on the CPU (--dry-run) so it
cannot rot before the first card runs it: every step, the results JSON and the README table."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    readme_before = (ROOT / "bench" / "README.md").read_text()
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--keep", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert (ROOT / "bench" / "README.md").read_text() == readme_before      # a dry run writes only its own copy
    (report,) = (tmp_path / "results").glob("*.json")
    row = json.loads(report.read_text())
    assert row["dry_run"] and [s["step"] for s in row["steps"]] == [
        "CUDA tests", "kernel profile", "throughput 224 px", "train.py --preset=voc2007-vitb16, end to end"]
    assert all(s["ok"] for s in row["steps"])
    for key in ("card", "torch", "triton", "commit", "sizes", "checks"):
        assert key in row
    assert row["figures"]["VOC2007 training s"] > 0 and row["figures"]["JPEG decode: cpu_core_img_s"] > 0
    table = (tmp_path / "README.md").read_text()
    assert "<!-- gpu-check:begin -->" in table and "| VOC2007 training s |" in table
