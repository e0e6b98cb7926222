"""Profile the two custom ops against torch eager and torch.compile of their references.

  python bench/profile_kernel.py [--dtype bf16] [--quick] [--out bench/results/<device>.json]

On a CUDA device, per case and mode (forward, backward, forward+backward): median time
(triton.testing.do_bench), speedup of Triton over eager and over compile, achieved GB/s over the
fewest bytes the op must move (each input read once, each output written once) and its fraction
of the card's measured copy bandwidth, peak memory of a forward+backward step. Backward alone is
(forward+backward) - forward. Compile time is reported apart. One JSON
row per (case, mode, provider) goes to bench/results/<device>.json with the card, versions,
commit and shapes.

Without CUDA it says so in one line, runs the interpreter correctness pass on small shapes and
times the references on the CPU (eager vs compile), and exits 0.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first triton import: the kernels then run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from checkpoints import git_commit  # noqa: E402
from data import write_json  # noqa: E402
from kernels.gcn_propagate import gcn_propagate_ref  # noqa: E402
from kernels.similarity_pool import similarity_pool_ref  # noqa: E402
from tests.kernel_cases import CPU_DTYPES, assert_close, normalised, random_csr  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("forward", "backward", "forward+backward")


# --------------------------------------------------------------------------------------------
# Cases: inputs, the three providers, and the fewest bytes each mode must move
# --------------------------------------------------------------------------------------------

def sim_case(b, n, d, o, k, dtype, device, temperature=0.07):
    gen = torch.Generator().manual_seed(0)
    patches = normalised(b, n, d, dtype=dtype, gen=gen).to(device).requires_grad_()
    prompts = normalised(o, d, dtype=dtype, gen=gen).to(device).requires_grad_()
    s = torch.tensor([], dtype=dtype).element_size()
    fwd = s * (b * n * d + o * d + b * n * o + b * o * d)          # P, W in; sim, local out
    bwd = s * (b * n * d + o * d + b * o * d + b * n * o + b * n * d + o * d)  # P, W, dlocal, dsim in; dP, dW out
    return {
        "name": f"similarity_pool B={b} N={n} D={d} O={o} topk={k}",
        "shape": {"B": b, "N": n, "D": d, "O": o, "topk": k},
        "inputs": (patches, prompts),
        "eager": lambda p, w: similarity_pool_ref(p, w, k, temperature),
        "triton": lambda p, w: kernels.similarity_pool(p, w, k, temperature),
        "bytes": {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd},
    }


def gcn_case(b, v, d, density, dtype, device, activation="relu"):
    gen = torch.Generator().manual_seed(0)
    indptr, indices, values = (t.to(device) for t in random_csr(v, density, gen, duplicates=False, empty_rows=()))
    values.requires_grad_()
    x = torch.randn(b, v, d, generator=gen).to(dtype).to(device).requires_grad_()
    res = torch.randn(b, v, d, generator=gen).to(dtype).to(device).requires_grad_()
    bias = torch.zeros(d, dtype=dtype, device=device, requires_grad=True)
    s = x.element_size()
    nnz = indices.numel()
    fwd = s * 3 * b * v * d + 12 * nnz                               # x, residual in; y out; graph
    bwd = s * 3 * b * v * d + 16 * nnz                               # x, dy in; dx out (dres is dy)
    return {
        "name": f"gcn_propagate B={b} V={v} D={d} density={density:.0%} nnz={nnz} act={activation}",
        "shape": {"B": b, "V": v, "D": d, "nnz": nnz, "density": density, "activation": activation},
        "inputs": (x, values, bias, res),
        "eager": lambda x, val, bi, r: gcn_propagate_ref(x, indptr, indices, val, bi, activation, r),
        "triton": lambda x, val, bi, r: kernels.gcn_propagate(x, indptr, indices, val, bi, activation, r),
        "bytes": {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd},
    }


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _runner(fn, inputs, mode):
    """A no-argument callable doing one `forward` or `forward+backward` step of `fn`.

    Backward alone is timed as (forward+backward) - forward: a compiled backward cannot be
    replayed on one retained graph (Inductor reuses its saved buffers), and timing every
    provider the same way keeps the ratios fair.
    """
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run

    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], allow_unused=True)
    return run


def ratio(a: float, b: float) -> float:
    """a / b, NaN where b is not positive: a backward timed as (fwd+bwd) - fwd can come out 0 on
    a loaded machine, and a speedup over it is then no figure at all (it once raised ZeroDivisionError)."""
    return a / b if b > 0 else float("nan")


def time_modes(measure, fn, inputs) -> dict[str, float]:
    """Median ms of forward, forward+backward, and backward (their difference)."""
    fwd = measure(_runner(fn, inputs, "forward"))
    both = measure(_runner(fn, inputs, "forward+backward"))
    return {"forward": fwd, "backward": max(both - fwd, 0.0), "forward+backward": both}


# --------------------------------------------------------------------------------------------
# GPU profile
# --------------------------------------------------------------------------------------------

def copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth of the card, GB/s (read + write)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * 4 / ms / 1e6


def profile_gpu(args) -> None:
    from triton.testing import do_bench

    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    card = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth(device)
    print(f"{card}: copy bandwidth {bandwidth:.0f} GB/s; torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, dtype {args.dtype}")
    # Most important first, so that a run cut at its time limit keeps what matters: the 448-px
    # shapes of the vitb16 presets (N = 784, K = 16; O = 105 for COCO, 45 for VOC), then 224 px.
    cases = [sim_case(256, 784, 512, 105, 16, dtype, device), sim_case(256, 784, 512, 45, 16, dtype, device),
             sim_case(256, 196, 512, 105, 8, dtype, device),
             gcn_case(256, 105, 512, 0.05, dtype, device), gcn_case(256, 105, 512, 0.30, dtype, device)]
    if not args.quick:
        cases += [sim_case(256, 196, 512, 45, 8, dtype, device), gcn_case(256, 105, 512, 0.15, dtype, device, "gelu")]
    out = args.out or ROOT / "bench" / "results" / f"{_slug(card)}.json"
    rows = []
    header = (f"{'case':<62} {'mode':<17} {'eager':>8} {'compile':>8} {'triton':>8} {'x eager':>8} {'x comp':>7} "
              f"{'GB/s':>7} {'%copy':>6} {'MiB':>7}")
    print(header)
    for case in cases:
        t0 = time.perf_counter()
        compiled = torch.compile(case["eager"], dynamic=False)
        _first(compiled(*case["inputs"])).sum().backward()     # compile forward and backward
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        times, peaks = {}, {}
        for provider, fn in (("eager", case["eager"]), ("compile", compiled), ("triton", case["triton"])):
            run = _runner(fn, case["inputs"], "forward+backward")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            peaks[provider] = (torch.cuda.max_memory_allocated() - base) / 2**20
            times[provider] = time_modes(lambda r: do_bench(r, warmup=25, rep=100, return_mode="median"),
                                         fn, case["inputs"])
        for mode in MODES:
            t = {p: times[p][mode] for p in times}
            gbs = ratio(case["bytes"][mode], t["triton"]) / 1e6
            print(f"{case['name']:<62} {mode:<17} {t['eager']:8.3f} {t['compile']:8.3f} {t['triton']:8.3f} "
                  f"{ratio(t['eager'], t['triton']):8.2f} {ratio(t['compile'], t['triton']):7.2f} {gbs:7.0f} "
                  f"{gbs / bandwidth:6.1%} {peaks['triton']:7.1f}")
            for provider in t:
                rows.append({
                    "op": case["name"].split()[0], "case": case["name"], "shape": case["shape"], "mode": mode,
                    "provider": provider, "dtype": args.dtype, "median_ms": t[provider],
                    "speedup_vs_eager": ratio(t["eager"], t[provider]),
                    "speedup_vs_compile": ratio(t["compile"], t[provider]),
                    "bytes": case["bytes"][mode], "gb_per_s": ratio(case["bytes"][mode], t[provider]) / 1e6,
                    "fraction_of_copy_bandwidth": ratio(case["bytes"][mode], t[provider]) / 1e6 / bandwidth,
                    "peak_mib_forward_backward": peaks[provider],
                    "compile_s": compile_s if provider == "compile" else None,
                })
        print(f"{'':<62} compile time of the reference (fwd + bwd): {compile_s:.1f} s")
        write_rows(out, card, bandwidth, rows)      # after every case: a run cut short keeps what it measured


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def write_rows(path, device: str, bandwidth: float | None, rows: list[dict]) -> None:
    import triton

    meta = {"device": device, "copy_bandwidth_gb_s": bandwidth, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d")}
    write_json(path, {**meta, "rows": rows})
    print(f"wrote {len(rows)} rows to {path}", flush=True)
    stall_if_asked()


def stall_if_asked() -> None:
    """bench/gpu_check.py's fault injection (tests/test_gpu_check.py): a step that runs past its
    time limit right after it saved a case, to prove that what it saved survives."""
    if os.environ.get("BACGCN_STALL_AFTER_SAVE") == "1":
        time.sleep(3600)


# --------------------------------------------------------------------------------------------
# CPU: interpreter correctness pass + reference timings
# --------------------------------------------------------------------------------------------

def correctness_pass() -> None:
    """The kernels in the Triton interpreter against fp64 references, small odd shapes."""
    for dtype in CPU_DTYPES:
        case = sim_case(2, 17, 33, 5, 3, dtype, "cpu")
        ref_inputs = [t.detach().double().requires_grad_() for t in case["inputs"]]
        for fn, inputs in ((case["triton"], case["inputs"]), (case["eager"], ref_inputs)):
            local, sim = fn(*inputs)
            (local.double().sum() + sim.double().square().sum()).backward()
        local, sim = case["triton"](*case["inputs"])
        local_ref, sim_ref = case["eager"](*ref_inputs)
        assert_close(local, local_ref, dtype, 33, "similarity_pool local")
        assert_close(sim, sim_ref, dtype, 33, "similarity_pool sim")
        for t, r, what in zip(case["inputs"], ref_inputs, ("d patches", "d prompts")):
            assert_close(t.grad, r.grad, dtype, 34, f"similarity_pool {what}")
        case = gcn_case(3, 17, 33, 0.3, dtype, "cpu", "gelu")
        ref_inputs = [t.detach().double().requires_grad_() for t in case["inputs"]]
        case["triton"](*case["inputs"]).double().square().sum().backward()
        case["eager"](*ref_inputs).square().sum().backward()
        assert_close(case["triton"](*case["inputs"]), case["eager"](*ref_inputs), dtype, 17, "gcn y")
        for t, r, what in zip(case["inputs"], ref_inputs, ("d x", "d values", "d bias", "d residual")):
            assert_close(t.grad, r.grad, dtype, 3 * 33, f"gcn {what}")
        print(f"interpreter correctness pass ({str(dtype).split('.')[-1]}): similarity_pool and "
              f"gcn_propagate match fp64 references, forward and every gradient")


def profile_cpu(args) -> None:
    print("no CUDA device: running the interpreter correctness pass and CPU reference timings "
          "(Triton timings need a GPU)")
    correctness_pass()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cases = [sim_case(16, 196, 512, 105, 8, torch.float32, "cpu"),
             gcn_case(16, 105, 512, 0.15, torch.float32, "cpu")]
    print(f"{'case':<62} {'mode':<17} {'eager ms':>9} {'compile ms':>11} {'x eager':>8}")
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        compiled = torch.compile(case["eager"], dynamic=False)
        _first(compiled(*case["inputs"])).sum().backward()
        compile_s = time.perf_counter() - t0
        reps = 5 if args.quick else 15

        def measure(run):
            run()
            samples = []
            for _ in range(reps):
                t = time.perf_counter()
                run()
                samples.append((time.perf_counter() - t) * 1e3)
            return statistics.median(samples)

        providers = (("eager", case["eager"]), ("compile", compiled))
        times = {p: time_modes(measure, fn, case["inputs"]) for p, fn in providers}
        for mode in MODES:
            t = {p: times[p][mode] for p in times}
            print(f"{case['name']:<62} {mode:<17} {t['eager']:9.2f} {t['compile']:11.2f} "
                  f"{ratio(t['eager'], t['compile']):8.2f}")
            rows += [{"op": case["name"].split()[0], "case": case["name"], "shape": case["shape"], "mode": mode,
                      "provider": p, "dtype": "fp32", "median_ms": v, "speedup_vs_eager": ratio(t["eager"], v),
                      "compile_s": compile_s if p == "compile" else None} for p, v in t.items()]
        print(f"{'':<62} compile time of the reference (fwd + bwd): {compile_s:.1f} s")
        if args.out:
            write_rows(args.out, f"cpu ({platform.processor() or platform.machine()}, "
                                 f"{torch.get_num_threads()} threads)", None, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="GPU input dtype (CPU runs fp32)")
    parser.add_argument("--quick", action="store_true", help="the headline shapes only (the presets' 448 and 224 px)")
    parser.add_argument("--out", help="JSON file for the rows (GPU default: bench/results/<device>.json)")
    args = parser.parse_args(argv)
    if HAS_CUDA:
        profile_gpu(args)
    else:
        profile_cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
