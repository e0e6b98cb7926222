"""bench/gpu_check.py, the GPU acceptance script, on the CPU (--dry-run), so it cannot rot before
the first card runs it; and the wheel set it installs there, resolved offline for Python 3.12.

One dry run with two faults injected (the script's own switches): a main-process step raises, and
the 448-px throughput step stalls after its first saved measurement until its time limit cuts it.
Every other step must still run and leave its figures in --out, the stalled step what it saved,
and the exit status must count the two failures."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

STEP_NAMES = [name for name, _ in gpu_check.STEPS]


def test_dry_run_keeps_every_figure_through_a_raise_and_a_stall(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(BACGCN_GPU_CHECK_RAISE="JPEG decode", BACGCN_GPU_CHECK_STALL="throughput 448 px")
    readme_before = (ROOT / "bench" / "README.md").read_text()
    out = tmp_path / "out"
    # 400 s: the stalled step's share (0.11) is 44 s, ample for its first save (~10 s here).
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--budget", "400", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = (out / "gpu_check.log").read_text()
    assert result.returncode == 2, log[-4000:] + result.stderr[-2000:]     # the two failed steps
    assert (ROOT / "bench" / "README.md").read_text() == readme_before     # a run writes only into --out

    (report,) = out.glob("cpu-*.json")
    row = json.loads(report.read_text())
    steps = {s["step"]: s for s in row["steps"]}
    assert row["dry_run"] and [s["step"] for s in row["steps"]] == STEP_NAMES
    assert steps["JPEG decode"]["exit"] == "RuntimeError: BACGCN_GPU_CHECK_RAISE=JPEG decode: raised on purpose"
    assert steps["throughput 448 px"]["exit"] == "timeout"
    assert all(s["ok"] for name, s in steps.items() if name not in ("JPEG decode", "throughput 448 px")), steps
    for key in ("card", "torch", "triton", "commit", "sizes", "checks", "problems"):
        assert key in row

    # Every other step's figures, and what the stalled step saved before it was cut.
    figures = row["figures"]
    profile = json.loads((out / "profile.json").read_text())
    assert {r["op"] for r in profile["rows"]} == {"similarity_pool", "gcn_propagate"}
    assert json.loads((out / "throughput-224.json").read_text())["cache_build_vs_encoder"] > 0
    assert figures["cache build vs bare encoder, 224 px"] > 0 and figures["training steps/s, 224 px"] > 0
    stalled = json.loads((out / "throughput-448.json").read_text())
    assert stalled["encoder_forward_img_s"] > 0 and "cache_build_img_s" not in stalled
    assert figures["bare encoder img/s, 448 px"] > 0 and "cache build img/s, 448 px" not in figures
    assert figures["VOC2007 training s"] > 0 and not any(k.startswith("JPEG decode") for k in figures)
    # Both formats reached the cache bench, each measured streamed and held (a toy cache fits in RAM).
    assert set(json.loads((out / "cache-scale.json").read_text())["formats"]) == {"int8", "bf16"}
    for fmt in ("int8", "bf16"):
        assert figures[f"epoch img/s streamed, {fmt}"] > 0 and figures[f"epoch img/s held on the GPU, {fmt}"] > 0
        assert figures[f"held vs streamed epoch speed, {fmt}"] > 0 and figures[f"epoch read vs plain read, {fmt}"] > 0
    assert figures["cache KiB per image, int8"] < figures["cache KiB per image, bf16"]

    # The README copy with the table, and the full log of every step (not only the tails).
    table = (out / "README.md").read_text()
    assert "<!-- gpu-check:begin -->" in table and "| VOC2007 training s |" in table
    assert "| epoch read vs plain read, int8 |" in table and "| held vs streamed epoch speed, bf16 |" in table
    assert "| JPEG decode | no (RuntimeError" in table and "| throughput 448 px | no (timeout) |" in table
    assert all(f"=== {name}" in log for name in STEP_NAMES)
    assert "Traceback" in log and "interpreter correctness pass" in log


def test_cache_figures_of_a_format_that_did_not_fit_on_the_device():
    """A cache too large to hold has only its streamed figures: no held speed, no ratio from a null."""
    streamed = {"train_images_per_s": 100.0, "peak_rss_bytes": 2**30}
    row = {"formats": {"bf16": {"bytes_per_image": 2048, "epoch_read_vs_plain": 0.9, "streamed": streamed,
                                "resident": None, "streamed_vs_resident_speed": None},
                       "int8": {"bytes_per_image": 1024, "epoch_read_vs_plain": 0.85, "streamed": streamed,
                                "resident": {"train_images_per_s": 150.0, "peak_rss_bytes": 2**31},
                                "streamed_vs_resident_speed": 100 / 150}}}
    figures = gpu_check.cache_scale_figures(row)
    assert figures["epoch img/s streamed, bf16"] == 100 and figures["streamed epoch peak RSS GiB, bf16"] == 1
    assert not any(k.endswith("bf16") and ("held" in k) for k in figures)
    assert figures["held vs streamed epoch speed, int8"] == 1.5 and figures["cache KiB per image, int8"] == 1
    assert gpu_check.judge(figures)["epoch read vs plain read, int8"]["met"]


def test_fault_switch_names_a_step(tmp_path):
    """A misspelt switch would let the fault test pass without its fault: it stops the run instead."""
    env = dict(os.environ, BACGCN_GPU_CHECK_STALL="JPEG decode")
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "BACGCN_GPU_CHECK_STALL='JPEG decode' names none of" in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# The wheels for the GPU image: bench/gpu-wheels.txt, built by `make gpu-wheels`
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheels():
    """wheels/py312, built here when absent (`make gpu-wheels` needs PyPI, as CI's install does)."""
    if not (gpu_check.WHEELS / ".complete").is_file():
        subprocess.run(["make", "gpu-wheels"], cwd=ROOT, check=True, timeout=600)
    return gpu_check.WHEELS


def wheel_requirements(path):
    """Requires-Dist of a wheel, as packaging Requirements."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        lines = z.read(meta).decode().splitlines()
    return [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]


def test_gpu_wheels_resolve_offline_for_python_312(wheels, tmp_path):
    """Every listed wheel is in the folder and installs on CPython 3.12 / manylinux x86_64 with no
    index (pip's own resolver, --dry-run), and every dependency any of them declares for that
    Python is met by the list or the image (none of them pulled in silently): a wheel missing from
    either fails here, not on the GPU machine."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    listed = gpu_check.wheel_list()
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index", "--no-deps",
               "--find-links", str(wheels), "--only-binary=:all:", "--python-version", "3.12", "--implementation",
               "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
               "manylinux2014_x86_64", "--target", str(tmp_path / "site"), "--report", str(tmp_path / "report.json"),
               *listed["wheels"]]
    # No pip configuration either: a machine's own find-links or mirror must not supply a wheel.
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    installs = json.loads((tmp_path / "report.json").read_text())["install"]
    assert sorted(canonicalize_name(i["metadata"]["name"]) for i in installs) == \
        sorted(canonicalize_name(Requirement(r).name) for r in listed["wheels"])

    have = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    image = {canonicalize_name(Requirement(r).name): Requirement(r) for r in listed["image"]}
    unused = {canonicalize_name(n) for n in listed["unused"]}
    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                   "os_name": "posix", "extra": ""}
    unmet = []
    for install in installs:
        wheel = wheels / install["download_info"]["url"].rsplit("/", 1)[-1]
        for req in wheel_requirements(wheel):
            if req.marker is not None and not req.marker.evaluate(environment):
                continue
            name = canonicalize_name(req.name)
            if name in have:
                ok = req.specifier.contains(have[name], prereleases=True)
            elif name in image:
                pinned = [s.version for s in image[name].specifier if s.operator == "=="]
                ok = not pinned or req.specifier.contains(pinned[0], prereleases=True)
            else:
                ok = name in unused
            if not ok:
                unmet.append(f"{wheel.name} needs {req}")
    assert not unmet, "\n".join(unmet)
    assert sum(f.stat().st_size for f in wheels.glob("*.whl")) < 30e6


def test_gpu_wheels_pin_open_clip_as_requirements_txt():
    pins = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.startswith("open-clip-torch")]
    assert pins and pins[0] in gpu_check.wheel_list()["wheels"]
