"""Compile every kernel launch for NVIDIA GPUs that are not there, and check it would launch.

  python bench/compile_check.py [--arch 90 80] [--triton DIR] [--json report.json] [--markdown table.md] [--quick]

The Triton interpreter enforces none of a GPU's limits, so a kernel that passes every CPU test
can still fail its first launch on the card. This script takes the launches the launchers
themselves plan (`forward_launch`, `backward_launch`, ... on meta tensors: the same tile sizes,
num_warps, num_stages and argument specialisation as a real call), compiles each through
Triton's own binder for sm_90 (H100/H200) and sm_80 (A100) with a stand-in driver, and reads:
- the dynamic shared memory the launch asks for (`metadata.shared`), against the card's opt-in
  limit per block (the driver refuses more: 232,448 B on sm_90, 166,912 B on sm_80);
- registers and stack (spill) bytes per thread of the binary itself (Triton's bundled cuobjdump).
It fails (exit 1) on any launch over the limit and on any spill in bf16 or fp16; fp32 spills are
reported. `--triton DIR` imports Triton from DIR first (an unpacked wheel: the GPU image has 3.6),
so one machine checks both versions. tests/test_compile.py runs it in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The per-block shared-memory limit with the opt-in attribute (CUDA C Programming Guide,
# compute capabilities table): what a launch may ask for before the driver refuses it.
SHARED_LIMIT = {90: 232_448, 80: 166_912}
CARD = {90: "H100/H200 (sm_90)", 80: "A100 (sm_80)"}

PATCHES = (49, 64, 196, 256, 576, 784, 1024)     # ViT-B/32 224 px ... ViT-L/14 448 px
DIMS = (128, 512, 768)
TOPKS = (1, 4, 8, 16)
DTYPES = ("bf16", "fp16", "fp32")
QUICK = {"patches": (49, 784, 1024), "dims": (512,), "topks": (1, 16)}


def categories_per_dataset() -> dict[str, int]:
    """O = classes + backgrounds of every dataset, read off the shipped dictionaries."""
    out = {}
    for path in sorted((ROOT / "assets" / "synonyms").glob("*.json")):
        out[path.stem] = len(json.loads(path.read_text()))
    return out


def batch_sizes() -> tuple[int, ...]:
    """A preset's full batch, VOC2007's last partial batch (5,011 images) and B = 1."""
    return (64, 5011 % 64, 1)


class CompileOnlyDriver:
    """Triton's active driver, minus the GPU: it names the target and nothing else. The device
    index is the arch, so each target keeps its own compiled-kernel cache."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("meta")


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread of the compiled binary itself, as the bundled
    cuobjdump reads them. Triton kernels keep nothing on the stack but spilled registers, so the
    stack frame is the spill space. Read off the binary that would launch, rather than a second
    `ptxas -v` run, whose flags would have to track Triton's own from version to version."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"registers": int(usage.group(1)), "spill_bytes": int(usage.group(2))}


def cases(quick: bool):
    """(kernel name, dtype, shape, Launch) for every launch the project makes over the grid of
    shapes; the launchers plan them from meta tensors."""
    from importlib import import_module

    import torch

    gcn = import_module("kernels.gcn_propagate")     # the modules (the package exports the ops' names)
    sp = import_module("kernels.similarity_pool")

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    patches, dims, topks = (QUICK["patches"], QUICK["dims"], QUICK["topks"]) if quick else (PATCHES, DIMS, TOPKS)
    meta = dict(device="meta")
    for dtype_name in DTYPES:
        dtype = dtypes[dtype_name]
        for dataset, o in categories_per_dataset().items():
            for n in patches:
                for d in dims:
                    for k in (k for k in topks if k <= min(n, sp.MAX_TRITON_TOPK)):
                        for b in batch_sizes():
                            shape = {"dataset": dataset, "B": b, "N": n, "D": d, "O": o, "topk": k}
                            p = torch.empty(b, n, d, dtype=dtype, **meta)
                            w = torch.empty(o, d, dtype=dtype, **meta)
                            launch, (local, sim, idx, wgt) = sp.forward_launch(p, w, k, 0.03)
                            yield "similarity_pool_fwd", dtype_name, shape, launch
                            for dsim in (sim, None):
                                launch, _ = sp.backward_launch(p, local, dsim, idx, wgt, 0.03)
                                yield "similarity_pool_bwd", dtype_name, dict(shape, dsim=dsim is not None), launch
            # The GCN runs over O local + 3 global nodes, at CLIP's embedding width.
            v = o + 3
            for d in dims:
                for b in batch_sizes():
                    x = torch.empty(b, v, d, dtype=dtype, **meta)
                    graph = gcn.full_graph_meta(v, dtype)
                    for act in gcn.ACTIVATIONS:
                        shape = {"dataset": dataset, "B": b, "V": v, "D": d, "activation": act or "none"}
                        bias = torch.empty(d, dtype=dtype, **meta)
                        yield "gcn_propagate_fwd", dtype_name, shape, gcn.spmm_launch(x, *graph, bias, act, x)[0]
                        if act is not None:
                            yield ("gcn_activation_grad", dtype_name, shape,
                                   gcn.activation_grad_launch(x, *graph, bias, act, x)[0])


def check(arch: int, quick: bool, progress: bool = True) -> list[dict]:
    """Compile every case for one arch; one row per distinct compiled kernel, with its shapes."""
    from triton.runtime.driver import driver

    driver.set_active(CompileOnlyDriver(arch))   # never reset: without a GPU there is no default driver
    rows: dict[str, dict] = {}
    if True:
        for name, dtype, shape, launch in cases(quick):
            compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.options)
            key = compiled.hash
            if key not in rows:
                md = compiled.metadata
                rows[key] = {"kernel": name, "arch": f"sm_{arch}", "dtype": dtype, "shared": md.shared,
                             "limit": SHARED_LIMIT[arch], "num_warps": md.num_warps, "num_stages": md.num_stages,
                             "options": {k: v for k, v in launch.options.items()
                                         if k not in ("num_warps", "num_stages")},
                             **resource_usage(compiled.asm["cubin"]), "shapes": []}
                if progress:
                    r = rows[key]
                    print(f"  sm_{arch} {name:22s} {dtype} shared {r['shared']:>7,} B  regs {r['registers']:>3}  "
                          f"spills {r['spill_bytes']:>5} B  {shape}", flush=True)
            rows[key]["shapes"].append(shape)
    return list(rows.values())


def condensed(row: dict) -> dict:
    """A compiled kernel's row with its launches as a count and, per shape field, the values seen."""
    fields: dict[str, set] = {}
    for shape in row["shapes"]:
        for key, value in shape.items():
            fields.setdefault(key, set()).add(value)
    return {**{k: v for k, v in row.items() if k != "shapes"}, "launches": len(row["shapes"]),
            "shapes": {k: sorted(v, key=str) for k, v in fields.items()}}


def failures(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        what = f"{r['kernel']} {r['dtype']} {r['arch']} (first shape {r['shapes'][0]})"
        if r["shared"] > r["limit"]:
            out.append(f"{what}: asks for {r['shared']:,} B of shared memory, the card allows {r['limit']:,}")
        if r["dtype"] != "fp32" and r["spill_bytes"]:
            out.append(f"{what}: spills {r['spill_bytes']} B per thread at {r['registers']} registers")
    return out


def summary(rows: list[dict]) -> list[dict]:
    """Worst case per (kernel, dtype, arch): what the README table shows."""
    worst: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["dtype"], r["arch"])
        w = worst.setdefault(key, {"kernel": r["kernel"], "dtype": r["dtype"], "arch": r["arch"], "shared_max": 0,
                                   "limit": r["limit"], "registers_max": 0, "spill_bytes_max": 0, "kernels": 0,
                                   "launches": 0})
        w["shared_max"] = max(w["shared_max"], r["shared"])
        w["registers_max"] = max(w["registers_max"], r["registers"] or 0)
        w["spill_bytes_max"] = max(w["spill_bytes_max"], r["spill_bytes"])
        w["kernels"] += 1
        w["launches"] += len(r["shapes"])
    return list(worst.values())


def markdown(table: list[dict], version: str) -> str:
    """The summary as the bench/README.md table: worst case per kernel, dtype and arch."""
    lines = [f"triton {version}: worst case over every launch", "",
             "| kernel | dtype | arch | shared memory (limit) | registers | spill bytes | kernels / launches |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {w['kernel']} | {w['dtype']} | {w['arch']} | {w['shared_max']:,} B ({w['limit']:,}) | "
              f"{w['registers_max']} | {w['spill_bytes_max']} | {w['kernels']} / {w['launches']} |" for w in table]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--triton", metavar="DIR", help="import Triton from this folder (an unpacked wheel)")
    parser.add_argument("--json", metavar="FILE", help="write every compiled kernel and the summary here")
    parser.add_argument("--quick", action="store_true", help="a subset of the shapes (every kernel still compiled)")
    parser.add_argument("--markdown", metavar="FILE", help="write the summary table (markdown) here")
    args = parser.parse_args(argv)
    # Before triton is imported: compile for real (no interpreter), and let the kernel files
    # import Triton although this machine has no GPU.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["BACGCN_TRITON"] = "1"
    if args.triton:
        if not (Path(args.triton) / "triton" / "__init__.py").is_file():
            print(f"error: --triton={args.triton}: no triton package in that folder", file=sys.stderr)
            return 2
        sys.path.insert(0, str(Path(args.triton).resolve()))
    sys.path.insert(0, str(ROOT))
    import cli
    try:      # the two reports, each its own file, known before minutes of compiling
        cli.check_outputs_apart([("--json", args.json), ("--markdown", args.markdown)], [])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}); compiling for "
          + ", ".join(CARD[a] for a in args.arch), flush=True)
    start = time.perf_counter()
    rows = [row for arch in args.arch for row in check(arch, args.quick)]
    table = summary(rows)
    print(f"\n{'kernel':22s} {'dtype':5s} {'arch':6s} {'shared max':>12s} {'limit':>9s} {'regs':>5s} {'spills':>7s}"
          f" {'launches':>9s}")
    for w in table:
        print(f"{w['kernel']:22s} {w['dtype']:5s} {w['arch']:6s} {w['shared_max']:>10,} B {w['limit']:>9,} "
              f"{w['registers_max']:>5} {w['spill_bytes_max']:>5} B {w['launches']:>9}")
    bad = failures(rows)
    seconds = time.perf_counter() - start
    print(f"\n{len(rows)} kernels compiled for {sum(w['launches'] for w in table)} launches in {seconds:.0f} s")
    if args.json:
        report = {"triton": triton.__version__, "archs": [f"sm_{a}" for a in args.arch], "summary": table,
                  "kernels": [condensed(r) for r in rows], "failures": bad, "seconds": round(seconds, 1)}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(table, triton.__version__))
    for line in bad:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
