"""Every kernel launch compiles for H100/H200 (sm_90) and A100 (sm_80) within the card's limits.

The interpreter the other kernel tests use checks none of a GPU's limits (shared memory per
block, registers): bench/compile_check.py compiles the launches the launchers really plan, over
every dtype, patch count up to 1024, embedding width, dataset's category count, top-K and batch
kind, with no GPU. One process per arch, side by side (CI has two cores).
"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("triton")

KERNELS = {"similarity_pool_fwd", "similarity_pool_bwd", "gcn_propagate_fwd", "gcn_activation_grad"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {arch: subprocess.Popen([sys.executable, str(ROOT / "bench" / "compile_check.py"), "--arch", str(arch),
                                    "--json", str(out / f"sm_{arch}.json")], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for arch in (90, 80)}
    results = {}
    for arch, proc in runs.items():
        log, _ = proc.communicate(timeout=1800)
        results[arch] = (proc.returncode, log, json.loads((out / f"sm_{arch}.json").read_text())
                         if (out / f"sm_{arch}.json").is_file() else None)
    return results


@pytest.mark.parametrize("arch", [90, 80])
def test_every_launch_fits_the_card(reports, arch):
    code, log, report = reports[arch]
    assert report is not None, log[-3000:]
    table = "\n".join(f"{w['kernel']} {w['dtype']}: shared {w['shared_max']} B, {w['registers_max']} registers, "
                      f"{w['spill_bytes_max']} B spilled" for w in report["summary"])
    assert code == 0 and not report["failures"], "\n".join(report["failures"]) + "\n" + table
    assert {(w["kernel"], w["dtype"]) for w in report["summary"]} == {(k, d) for k in KERNELS
                                                                      for d in ("bf16", "fp16", "fp32")}
    for w in report["summary"]:
        assert w["shared_max"] <= w["limit"], table
        if w["dtype"] != "fp32":
            assert w["spill_bytes_max"] == 0, table
    # The grid spans ViT-L/14 at 448 px too: N = 1024, D = 768.
    forward = [k["shapes"] for k in report["kernels"] if k["kernel"] == "similarity_pool_fwd"]
    assert {n for s in forward for n in s["N"]} >= {49, 196, 784, 1024}
    assert {d for s in forward for d in s["D"]} >= {512, 768}


def test_check_fails_on_a_launch_over_the_limit():
    """The check can fail: a report row over the card's shared memory or spilling in bf16 is named."""
    sys.path.insert(0, str(ROOT / "bench"))
    import compile_check

    row = {"kernel": "similarity_pool_fwd", "arch": "sm_90", "dtype": "bf16", "shared": 399_360,
           "limit": compile_check.SHARED_LIMIT[90], "registers": 255, "spill_bytes": 2048,
           "shapes": [{"N": 784}]}
    problems = compile_check.failures([row])
    assert len(problems) == 2 and "399,360" in problems[0] and "spills 2048" in problems[1]
    assert compile_check.failures([dict(row, dtype="fp32", shared=12_288)]) == []
