"""CLIP-GCN message pass: one sparse graph shared by the batch, fused with bias, activation and
residual.

    y[b, i] = act(sum_j A[i, j] * x[b, j] + bias) + residual[b, i]

A is a V x V CSR matrix (indptr [V+1], indices [nnz], values [nnz]); duplicate column indices
add up, empty rows give act(bias). Activations: None, "relu", "leaky_relu" (slope 0.2, the
ML-GCN choice), "gelu" (erf form, as torch's default). Differentiable in x, values, bias and
residual.

Forward (Triton): one program per (row i, block of images, block of features) walks row i's
non-zeros and accumulates a [BLOCK_B, BLOCK_D] fp32 tile, then adds bias, applies the
activation and the residual before its single store: y is written once and the pre-activation
never touches memory (the eager reference writes and re-reads it for the bias, the activation
and the residual). x rows are re-read once per non-zero, from L2 when the batch tile fits.

Backward: one Triton pass recomputes the pre-activation row by row and writes
gz = dy * act'(z) (skipped without an activation); dx = A^T gz is the same forward kernel run on
the transposed CSR; dvalues[e] = <gz[:, i_e], x[:, j_e]> is read off a dense V x V product
(one bmm, K = D, summed over the batch): tensor-core work instead of one B*D reduction per edge.

`gcn_propagate` dispatches: Triton on CUDA tensors (and under TRITON_INTERPRET=1), the
pure-torch `gcn_propagate_ref` otherwise.
"""
from typing import Optional

import torch

from kernels._common import Launch, interpret_mode, next_pow2, register_op, tl, triton, use_triton

ACTIVATIONS = (None, "relu", "leaky_relu", "gelu")
LEAKY_SLOPE = 0.2
_ACT_CODE = {None: 0, "relu": 1, "leaky_relu": 2, "gelu": 3}


# --------------------------------------------------------------------------------------------
# Reference (pure torch)
# --------------------------------------------------------------------------------------------

def csr_to_dense(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """Dense V x V matrix of a CSR graph (duplicates summed), differentiable in `values`."""
    rows = torch.repeat_interleave(torch.arange(size, device=indptr.device), indptr.diff().long())
    flat = torch.zeros(size * size, device=values.device, dtype=values.dtype)
    return flat.index_add(0, rows * size + indices.long(), values).view(size, size)


def apply_activation(z: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    if activation is None:
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, LEAKY_SLOPE)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def gcn_propagate_ref(x: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch twin of `gcn_propagate` (a dense V x V matmul: V is ~100 in BAC-GCN)."""
    adj = csr_to_dense(indptr, indices, values, x.shape[1]).to(x.dtype)
    z = adj @ x
    if bias is not None:
        z = z + bias
    y = apply_activation(z, activation)
    return y + residual if residual is not None else y


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _activate(z, ACT: tl.constexpr, SLOPE: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * SLOPE)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _activate_grad(z, ACT: tl.constexpr, SLOPE: tl.constexpr):
    if ACT == 1:
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where(z > 0, 1.0, SLOPE)
    else:  # gelu: Phi(z) + z * phi(z)
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    return g


@triton.jit
def _row_preactivation(X, INDPTR, INDICES, VALUES, BIAS, B, D, stride_xb, stride_xv, stride_xd,
                       HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile of z = A x + bias for one graph row: (row, offs_b, offs_d, mask, z)."""
    row = tl.program_id(0).to(tl.int64)
    offs_b = (tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B))[:, None]
    offs_d = (tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    mask = (offs_b < B) & (offs_d < D)
    start = tl.load(INDPTR + row).to(tl.int64)
    end = tl.load(INDPTR + row + 1).to(tl.int64)
    z = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    base = X + offs_b * stride_xb + offs_d * stride_xd
    for e in range(start, end):
        j = tl.load(INDICES + e).to(tl.int64)
        v = tl.load(VALUES + e).to(tl.float32)
        z += v * tl.load(base + j * stride_xv, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    return row, offs_b, offs_d, mask, z


@triton.jit
def _gcn_fwd_kernel(
    X, INDPTR, INDICES, VALUES, BIAS, RES, Y,
    B, D,
    stride_xb, stride_xv, stride_xd,
    stride_yb, stride_yv, stride_yd,   # shared by RES and Y
    ACT: tl.constexpr, SLOPE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row, offs_b, offs_d, mask, z = _row_preactivation(X, INDPTR, INDICES, VALUES, BIAS, B, D, stride_xb, stride_xv,
                                                      stride_xd, HAS_BIAS, BLOCK_B, BLOCK_D)
    y = _activate(z, ACT, SLOPE)
    out = offs_b * stride_yb + row * stride_yv + offs_d * stride_yd
    if HAS_RES:
        y += tl.load(RES + out, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gcn_act_bwd_kernel(
    X, INDPTR, INDICES, VALUES, BIAS, DY, GZ,
    B, D,
    stride_xb, stride_xv, stride_xd,
    stride_yb, stride_yv, stride_yd,   # shared by DY and GZ
    ACT: tl.constexpr, SLOPE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row, offs_b, offs_d, mask, z = _row_preactivation(X, INDPTR, INDICES, VALUES, BIAS, B, D, stride_xb, stride_xv,
                                                      stride_xd, HAS_BIAS, BLOCK_B, BLOCK_D)
    out = offs_b * stride_yb + row * stride_yv + offs_d * stride_yd
    dy = tl.load(DY + out, mask=mask, other=0.0).to(tl.float32)
    tl.store(GZ + out, (dy * _activate_grad(z, ACT, SLOPE)).to(GZ.dtype.element_ty), mask=mask)


# Batch tile: fixed, not derived from B. Sized from the batch (next_pow2(B)) it pinned every
# batch size (last batch, ReSO crop batches, DDP slices) to a torch.compile graph of its own;
# masking covers B < 16. Feature tiles of 128 contiguous elements keep loads coalesced; B = 256,
# V ~ 100 gives ~6,700 programs, enough to fill the SMs.
BLOCK_B = 16


def _launch(kernel, x: torch.Tensor, args: tuple, **options) -> Launch:
    b, v, d = x.shape
    block_d = min(128, max(16, next_pow2(d)))
    grid = (v, triton.cdiv(b, BLOCK_B), triton.cdiv(d, block_d))
    return Launch(kernel, grid, args, dict(options, BLOCK_B=BLOCK_B, BLOCK_D=block_d, num_warps=4))


def spmm_launch(x: torch.Tensor, indptr, indices, values, bias, activation: Optional[str],
                residual) -> tuple[Launch, torch.Tensor]:
    """The forward kernel's launch and its output y, allocated here."""
    y = torch.empty_like(x)
    args = (x, indptr, indices, values, bias if bias is not None else x, residual if residual is not None else y, y,
            x.shape[0], x.shape[2], *x.stride(), *y.stride())
    return _launch(_gcn_fwd_kernel, x, args, ACT=_ACT_CODE[activation], SLOPE=LEAKY_SLOPE,
                   HAS_BIAS=bias is not None, HAS_RES=residual is not None), y


def activation_grad_launch(x: torch.Tensor, indptr, indices, values, bias, activation: str,
                           dy: torch.Tensor) -> tuple[Launch, torch.Tensor]:
    """The activation-gradient kernel's launch and its output gz, allocated here."""
    gz = torch.empty_like(dy)
    args = (x, indptr, indices, values, bias if bias is not None else x, dy, gz, x.shape[0], x.shape[2],
            *x.stride(), *dy.stride())
    return _launch(_gcn_act_bwd_kernel, x, args, ACT=_ACT_CODE[activation], SLOPE=LEAKY_SLOPE,
                   HAS_BIAS=bias is not None), gz


def full_graph_meta(v: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense V-node CSR graph as meta tensors: what bench/compile_check.py launches on."""
    nnz = v * v
    return (torch.empty(v + 1, dtype=torch.int64, device="meta"), torch.empty(nnz, dtype=torch.int64, device="meta"),
            torch.empty(nnz, dtype=dtype, device="meta"))


def csr_plan(indptr: torch.Tensor, indices: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """What the backward needs of a graph, computed once: (rows, t_indptr, t_indices, t_order),
    the row of every edge and the CSR of A^T, whose values are values[t_order] (stable in the
    original order, so duplicates stay duplicates). Built per backward, this read the graph back
    to the host (repeat_interleave, bincount) twice per GCN layer per step; CLIPGCN keeps it on
    the device with the graph."""
    rows = torch.repeat_interleave(torch.arange(size, device=indptr.device, dtype=indices.dtype),
                                   indptr.diff().long())
    order = torch.sort(indices, stable=True).indices
    counts = torch.bincount(indices.long(), minlength=size)
    t_indptr = torch.zeros(size + 1, device=indptr.device, dtype=indptr.dtype)
    t_indptr[1:] = torch.cumsum(counts, 0).to(indptr.dtype)
    return rows, t_indptr, rows[order].contiguous(), order


# --------------------------------------------------------------------------------------------
# Registered ops and autograd
# --------------------------------------------------------------------------------------------

@register_op("bacgcn::gcn_propagate_fwd")
def _gcn_propagate_fwd(x: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                       bias: Optional[torch.Tensor], activation: str, residual: Optional[torch.Tensor],
                       rows: torch.Tensor, t_indptr: torch.Tensor, t_indices: torch.Tensor,
                       t_order: torch.Tensor) -> torch.Tensor:
    launch, y = spmm_launch(x, indptr, indices, values, bias, None if activation == "none" else activation, residual)
    launch()
    return y


@register_op("bacgcn::gcn_activation_grad")
def _gcn_activation_grad(x: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                         bias: Optional[torch.Tensor], activation: str, dy: torch.Tensor) -> torch.Tensor:
    """gz = dy * act'(z), the pre-activation z recomputed row by row (never stored)."""
    launch, gz = activation_grad_launch(x, indptr, indices, values, bias, activation, dy)
    launch()
    return gz


def _setup_context(ctx, inputs, output):
    x, indptr, indices, values, bias, activation, residual, rows, t_indptr, t_indices, t_order = inputs
    ctx.save_for_backward(x, indptr, indices, values, bias, rows, t_indptr, t_indices, t_order)
    ctx.activation = activation
    ctx.has_residual = residual is not None


def _backward(ctx, dy):
    x, indptr, indices, values, bias, rows, t_indptr, t_indices, t_order = ctx.saved_tensors
    dy = dy.contiguous()
    gz = dy if ctx.activation == "none" else \
        torch.ops.bacgcn.gcn_activation_grad(x, indptr, indices, values, bias, ctx.activation, dy)
    # dx = A^T gz: the same kernel on the transposed graph (its own plan is never needed here).
    dx = torch.ops.bacgcn.gcn_propagate_fwd(gz, t_indptr, t_indices, values[t_order], None, "none", None,
                                            rows, t_indptr, t_indices, t_order)
    dvalues = dbias = None
    if ctx.needs_input_grad[3]:
        dadj = torch.bmm(gz, x.transpose(1, 2)).sum(0, dtype=torch.float32)   # [V, V]
        dvalues = dadj[rows.long(), indices.long()].to(values.dtype)
    if bias is not None and ctx.needs_input_grad[4]:
        dbias = gz.sum((0, 1), dtype=torch.float32).to(bias.dtype)
    dres = dy if ctx.has_residual else None
    return dx, None, None, dvalues, dbias, None, dres, None, None, None, None


_gcn_propagate_fwd.register_autograd(_backward, setup_context=_setup_context)

if interpret_mode():
    # As in similarity_pool: interpreted kernels need real data, so compile gets the shapes.
    @_gcn_propagate_fwd.register_fake
    def _(x, indptr, indices, values, bias, activation, residual, rows, t_indptr, t_indices, t_order):
        return torch.empty_like(x)

    @_gcn_activation_grad.register_fake
    def _(x, indptr, indices, values, bias, activation, dy):
        return torch.empty_like(dy)


def gcn_propagate(x: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                  residual: Optional[torch.Tensor] = None, plan: Optional[tuple[torch.Tensor, ...]] = None
                  ) -> torch.Tensor:
    """y [B, V, D] = act(A @ x + bias) + residual for x [B, V, D] and A in CSR (V x V).

    `plan`: `csr_plan(indptr, indices, V)` of this graph, kept by a caller whose graph never
    changes; made here (with host read-backs) when absent."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, V, D], got {tuple(x.shape)}")
    v, d = x.shape[1], x.shape[2]
    if indptr.dim() != 1 or indptr.numel() != v + 1:
        raise ValueError(f"indptr must have V + 1 = {v + 1} entries, got {tuple(indptr.shape)}")
    if indices.shape != values.shape or indices.dim() != 1:
        raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must be equal 1-D")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"bias must be [D] = [{d}], got {tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must be {tuple(x.shape)}, got {tuple(residual.shape)}")
    tensors = [t for t in (x, indptr, indices, values, bias, residual) if t is not None]
    if not use_triton(*tensors, work=x.numel()):
        return gcn_propagate_ref(x, indptr, indices, values, bias, activation, residual)
    if plan is None:
        plan = csr_plan(indptr, indices, v)
    return torch.ops.bacgcn.gcn_propagate_fwd(
        x.contiguous(), indptr.contiguous(), indices.contiguous(), values.contiguous(),
        bias.contiguous() if bias is not None else None, activation or "none",
        residual.contiguous() if residual is not None else None, *plan)
