"""Shared by the kernel files: Triton itself (or its stand-in), when to launch it, helpers."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.library import custom_op, triton_op, wrap_triton


class _TritonMissing:
    """Stands in for `triton` and `triton.language` where Triton is not installed (macOS, a CPU
    wheel of torch): the kernel files still import, because `@triton.jit` returns the function
    unchanged and `tl.constexpr` annotations evaluate, and every op runs its pure-torch
    reference, since `use_triton` is then always False."""

    @staticmethod
    def jit(fn=None, **_options):
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name: str):
        return None


def interpret_mode() -> bool:
    """True under TRITON_INTERPRET=1: kernels then run in the Triton interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compile_only() -> bool:
    """True under BACGCN_TRITON=1: Triton is imported without a device, so that the kernels can be
    compiled for a GPU that is not there (bench/compile_check.py); every op still runs its
    reference on CPU tensors."""
    return os.environ.get("BACGCN_TRITON", "0") == "1"


# Triton is imported only where a kernel can run (a CUDA device, or the interpreter): in a
# CPU-only process the import alone added 146 MB of resident memory (measured with the CUDA
# wheel of torch 2.14), a tenth of the streamed cache's memory bound, for kernels never launched.
HAS_TRITON = False
triton = tl = _TritonMissing()
if interpret_mode() or compile_only() or torch.cuda.is_available():
    try:
        import triton  # noqa: F401, F811  (replaces the stand-in; the kernel files use it)
        import triton.language as tl  # noqa: F401, F811
        HAS_TRITON = True
    except ImportError as e:
        if torch.cuda.is_available():
            # Silently, every step would run the references: slower, and a host sync per step.
            warnings.warn(f"Triton could not be imported ({e}): the custom kernels run their pure-torch "
                          f"references on this GPU (pip install triton to match torch {torch.__version__})",
                          stacklevel=1)


# The interpreter runs a kernel op by op in Python: it is there to check the kernels on small
# shapes (tests/test_kernels.py, tests/test_cuda_path.py). At training sizes it costs seconds a
# step (one GCN backward at B 64 x 22 nodes x 128 wide), and the in-process training tests spent
# most of CI there; calls with more work than this run the reference, which computes the same.
INTERPRET_MAX_WORK = 2**15


def use_triton(*tensors: torch.Tensor, work: int = 0) -> bool:
    """Dispatch rule of every op: Triton on CUDA tensors (or in the interpreter, for calls of at
    most INTERPRET_MAX_WORK elements of `work`), the pure-torch reference otherwise, so CPU
    training needs no Triton at all."""
    if not HAS_TRITON:
        return False
    if interpret_mode():
        return work <= INTERPRET_MAX_WORK
    return all(t.is_cuda for t in tensors)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher plans it: the kernel, its grid, its arguments and its
    options (constexprs, num_warps, num_stages). The op runs it; bench/compile_check.py hands
    the same plan, made from meta tensors, to the compiler for a GPU that is not there, so the
    check cannot drift from the settings the launchers really choose."""
    kernel: Any
    grid: tuple
    args: tuple
    options: dict

    def __call__(self) -> None:
        wrap_triton(self.kernel)[self.grid](*self.args, **self.options)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def register_op(name: str):
    """Decorator registering a kernel launcher as a torch op that torch.compile traces through.

    On GPUs: `triton_op`, so Inductor sees the Triton kernel itself. In the interpreter the
    kernel needs real data, which tracing (fake tensors) does not have: there it is an opaque
    `custom_op`, and each file registers the output shapes with `register_fake`.
    """
    if interpret_mode() or not HAS_TRITON:
        return custom_op(name, mutates_args=())
    return triton_op(name, mutates_args=())
