"""Similarity Kernel of BAC-GCN: similarity maps and top-K softmax pooling of patch features.

    sim[b, n, o]   = <patches[b, n], prompts[o]>
    local[b, o]    = sum_{n in K(b, o)} softmax_{n in K}(sim[b, n, o] / T) * patches[b, n]

K(b, o) is the set of the `topk` patches with the largest sim[b, :, o], ties broken by the lower
patch index. The selection is not differentiated; everything else is.

Forward (Triton): one program per (image, block of prompts) computes the sim tile with tl.dot
over D, selects the top-K by K rounds of column max (lowest index wins ties), builds the softmax
weights as a dense [N, BLOCK_O] tile that is zero off the selection, and pools with a second
tl.dot over D. The B x O x K x D gather is never materialised; patches[b] (200 KB at N=196,
D=512, bf16) is read twice by the same program, so the second pass should come from L2 (not yet
measured on a GPU: bench/README.md). It also writes the top-K indices and weights ([B, O, K], tiny)
so the backward sees the exact forward selection.

Backward: a Triton kernel turns (indices, weights, dlocal, dsim) into two dense [B, N, O]
matrices, A (the pooling weights) and G (d loss / d sim, softmax Jacobian included); the three
large products, dpatches = A @ dlocal + G @ prompts and dprompts = G^T @ patches, go to cuBLAS.

`similarity_pool` dispatches: Triton on CUDA tensors (and under TRITON_INTERPRET=1), the
pure-torch `similarity_pool_ref` otherwise.
"""
from typing import Optional

import torch
from torch.library import wrap_triton

from kernels._common import interpret_mode, next_pow2, register_op, tl, triton, use_triton

# --------------------------------------------------------------------------------------------
# Reference (pure torch): the CPU path and the ground truth of the tests
# --------------------------------------------------------------------------------------------

def topk_lowest_index(sim: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices [B, K, O] of the `topk` largest sim[b, :, o], ties to the lower patch index."""
    return torch.sort(sim.detach(), dim=1, descending=True, stable=True).indices[:, :topk, :]


def topk_mask(sim: torch.Tensor, topk: int) -> torch.Tensor:
    """Bool [B, N, O]: the same selection as `topk_lowest_index`, as a mask. Everything at or
    above the K-th largest value is in; where that takes more than K (ties at the K-th value),
    the lowest patch indices among the ties fill what is left. A topk instead of a stable sort
    of every column, which took 27 % of a CPU training step at 256 patches (py-spy)."""
    sim = sim.detach()
    kth = torch.topk(sim, topk, dim=1).values[:, -1:, :]
    at_least = sim >= kth
    if bool((at_least.sum(1) == topk).all()):          # no tie at the K-th value: the usual case
        return at_least
    ties = sim == kth
    room = topk - (sim > kth).sum(1, keepdim=True)
    return (sim > kth) | (ties & (torch.cumsum(ties, dim=1) <= room))


def similarity_pool_ref(patches: torch.Tensor, prompts: torch.Tensor, topk: int,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of `similarity_pool`: (local [B, O, D], sim [B, N, O])."""
    sim = patches @ prompts.t()
    # Softmax over each column's Top-K as a dense [B, N, O] pooling matrix, zero off the
    # selection: one bmm instead of a [B, K, O, D] gather, the fast path on the CPU too. The
    # column max is always selected, so exp(s - max) cannot overflow.
    scaled = sim.float() / temperature
    weights = torch.exp(scaled - scaled.amax(1, keepdim=True)) * topk_mask(sim, topk)
    pool = (weights / weights.sum(1, keepdim=True)).to(sim.dtype)
    local = pool.transpose(1, 2) @ patches
    return local, sim


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _tile(N, O, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr):
    """This program's image b (int64 for pointer math), its patch and prompt offsets and masks."""
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    return b, offs_n, offs_o, offs_n < N, offs_o < O


@triton.jit
def _patch_products(p_base, q_base, stride_pn, stride_pd, stride_qo, stride_qd, offs_n, offs_o, mask_n, mask_o,
                    D, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_O] tile of <patches[b, n], q[o]> for n, o in the tile, over all D."""
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        p = tl.load(p_base + offs_n[:, None] * stride_pn + offs_d[None, :] * stride_pd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        q = tl.load(q_base + offs_o[None, :] * stride_qo + offs_d[:, None] * stride_qd,
                    mask=mask_o[None, :] & mask_d[:, None], other=0.0)
        if UPCAST:  # the interpreter computes bf16 products wrongly unless they are fp32
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        if IEEE:  # fp32 inputs: full precision, not tf32
            acc = tl.dot(p, q, acc, input_precision="ieee")
        else:
            acc = tl.dot(p, q, acc)
    return acc


@triton.jit
def _similarity_pool_fwd_kernel(
    P, W, SIM, LOCAL, IDX, WGT,
    N, O, D, inv_t,
    stride_pb, stride_pn, stride_pd,
    stride_wo, stride_wd,
    stride_sb, stride_sn, stride_so,
    stride_lb, stride_lo, stride_ld,
    K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    b, offs_n, offs_o, mask_n, mask_o = _tile(N, O, BLOCK_N, BLOCK_O)
    p_base = P + b * stride_pb

    # 1. sim tile [BLOCK_N, BLOCK_O], fp32 accumulation.
    acc = _patch_products(p_base, W, stride_pn, stride_pd, stride_wo, stride_wd, offs_n, offs_o, mask_n, mask_o,
                          D, BLOCK_N, BLOCK_O, BLOCK_D, UPCAST, IEEE)
    tl.store(SIM + b * stride_sb + offs_n[:, None] * stride_sn + offs_o[None, :] * stride_so,
             acc.to(SIM.dtype.element_ty), mask=mask_n[:, None] & mask_o[None, :])

    # 2. top-K by K rounds of column max; the lowest index among equal maxima wins.
    s = tl.where(mask_n[:, None], acc, float("-inf"))
    m0 = tl.max(s, axis=0)
    pool = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)  # unnormalised softmax weights
    offs_k = tl.arange(0, K_PAD)
    idx_tile = tl.zeros((BLOCK_O, K_PAD), dtype=tl.int32)
    val_tile = tl.zeros((BLOCK_O, K_PAD), dtype=tl.float32)
    for k in range(K):
        m = tl.max(s, axis=0)
        idx = tl.min(tl.where(s == m[None, :], offs_n[:, None], BLOCK_N), axis=0)
        hit = offs_n[:, None] == idx[None, :]
        e = tl.exp((m - m0) * inv_t)
        pool = tl.where(hit, e[None, :], pool)
        s = tl.where(hit, float("-inf"), s)
        idx_tile = tl.where(offs_k[None, :] == k, idx[:, None], idx_tile)
        val_tile = tl.where(offs_k[None, :] == k, e[:, None], val_tile)
    denom = tl.sum(pool, axis=0)
    pool = pool / denom[None, :]
    mask_ok = mask_o[:, None] & (offs_k[None, :] < K)
    ik = (b * O + offs_o[:, None]) * K + offs_k[None, :]
    tl.store(IDX + ik, idx_tile, mask=mask_ok)
    tl.store(WGT + ik, val_tile / denom[:, None], mask=mask_ok)

    # 3. local [BLOCK_O, D] = pool^T @ patches[b].
    pool_t = tl.trans(pool)
    if not UPCAST:
        pool_t = pool_t.to(P.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        p = tl.load(p_base + offs_n[:, None] * stride_pn + offs_d[None, :] * stride_pd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
        if IEEE:
            out = tl.dot(pool_t, p, input_precision="ieee")
        else:
            out = tl.dot(pool_t, p)
        tl.store(LOCAL + b * stride_lb + offs_o[:, None] * stride_lo + offs_d[None, :] * stride_ld,
                 out.to(LOCAL.dtype.element_ty), mask=mask_o[:, None] & mask_d[None, :])


@triton.jit
def _similarity_pool_bwd_kernel(
    P, DLOCAL, DSIM, IDX, WGT, G, A,
    N, O, D, inv_t,
    stride_pb, stride_pn, stride_pd,
    stride_lb, stride_lo, stride_ld,
    stride_sb, stride_sn, stride_so,   # shared by DSIM, G and A (all [B, N, O] contiguous)
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_DSIM: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    b, offs_n, offs_o, mask_n, mask_o = _tile(N, O, BLOCK_N, BLOCK_O)
    mask_no = mask_n[:, None] & mask_o[None, :]

    # pd[n, o] = <patches[b, n], dlocal[b, o]>: d loss / d pooling weight, for every patch.
    pd = _patch_products(P + b * stride_pb, DLOCAL + b * stride_lb, stride_pn, stride_pd, stride_lo, stride_ld,
                         offs_n, offs_o, mask_n, mask_o, D, BLOCK_N, BLOCK_O, BLOCK_D, UPCAST, IEEE)

    # Dense pooling weights from the forward's selection.
    pool = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for k in range(K):
        ik = (b * O + offs_o) * K + k
        idx = tl.load(IDX + ik, mask=mask_o, other=-1)
        wk = tl.load(WGT + ik, mask=mask_o, other=0.0)
        pool = tl.where(offs_n[:, None] == idx[None, :], wk[None, :], pool)
    # Softmax Jacobian: ds = a / T * (pd - sum_n a * pd), zero off the selection.
    inner = tl.sum(pool * pd, axis=0)
    grad = pool * inv_t * (pd - inner[None, :])
    so = b * stride_sb + offs_n[:, None] * stride_sn + offs_o[None, :] * stride_so
    if HAS_DSIM:
        grad += tl.load(DSIM + so, mask=mask_no, other=0.0).to(tl.float32)
    tl.store(G + so, grad.to(G.dtype.element_ty), mask=mask_no)
    tl.store(A + so, pool.to(A.dtype.element_ty), mask=mask_no)


def _blocks(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_O, BLOCK_D, num_warps). The whole patch column must sit in one tile
    for the top-K; two [BLOCK_N, BLOCK_O] fp32 tiles live through the selection, so BLOCK_O
    shrinks as N grows to keep them in registers (16 is tl.dot's minimum). A first guess, to
    be tuned on a GPU: autotuning with several configs cannot run in the CPU interpreter."""
    block_n = max(16, next_pow2(n))
    block_o = 32 if block_n <= 256 else 16
    return block_n, block_o, 64, 8 if block_n >= 256 else 4


def _flags(dtype: torch.dtype) -> dict:
    return {"UPCAST": interpret_mode() and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}


# --------------------------------------------------------------------------------------------
# Registered ops (torch.compile traces through them) and autograd
# --------------------------------------------------------------------------------------------

@register_op("bacgcn::similarity_pool_fwd")
def _similarity_pool_fwd(patches: torch.Tensor, prompts: torch.Tensor, topk: int,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, d = patches.shape
    o = prompts.shape[0]
    sim = torch.empty((b, n, o), device=patches.device, dtype=patches.dtype)
    local = torch.empty((b, o, d), device=patches.device, dtype=patches.dtype)
    idx = torch.empty((b, o, topk), device=patches.device, dtype=torch.int32)
    wgt = torch.empty((b, o, topk), device=patches.device, dtype=torch.float32)
    block_n, block_o, block_d, warps = _blocks(n, topk)
    grid = (b, triton.cdiv(o, block_o))
    wrap_triton(_similarity_pool_fwd_kernel)[grid](
        patches, prompts, sim, local, idx, wgt, n, o, d, 1.0 / temperature,
        *patches.stride(), *prompts.stride(), *sim.stride(), *local.stride(),
        K=topk, K_PAD=max(2, next_pow2(topk)), BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_D=block_d,
        num_warps=warps, **_flags(patches.dtype))
    return local, sim, idx, wgt


@register_op("bacgcn::similarity_pool_bwd")
def _similarity_pool_bwd(patches: torch.Tensor, dlocal: torch.Tensor, dsim: Optional[torch.Tensor],
                         idx: torch.Tensor, wgt: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, d = patches.shape
    o, topk = idx.shape[1], idx.shape[2]
    g = torch.empty((b, n, o), device=patches.device, dtype=patches.dtype)
    a = torch.empty_like(g)
    block_n, block_o, block_d, warps = _blocks(n, topk)
    grid = (b, triton.cdiv(o, block_o))
    wrap_triton(_similarity_pool_bwd_kernel)[grid](
        patches, dlocal, dsim if dsim is not None else g, idx, wgt, g, a, n, o, d, 1.0 / temperature,
        *patches.stride(), *dlocal.stride(), *g.stride(),
        K=topk, BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_D=block_d,
        HAS_DSIM=dsim is not None, num_warps=warps, **_flags(patches.dtype))
    return g, a


def _setup_context(ctx, inputs, output):
    patches, prompts, topk, temperature = inputs
    _, _, idx, wgt = output
    ctx.save_for_backward(patches, prompts, idx, wgt)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(idx, wgt)


def _backward(ctx, dlocal, dsim, _didx, _dwgt):
    patches, prompts, idx, wgt = ctx.saved_tensors
    if dlocal is None:
        dlocal = torch.zeros((patches.shape[0], prompts.shape[0], patches.shape[2]),
                             device=patches.device, dtype=patches.dtype)
    dsim = dsim.contiguous() if dsim is not None else None
    g, a = torch.ops.bacgcn.similarity_pool_bwd(patches, dlocal.contiguous(), dsim, idx, wgt,
                                                ctx.temperature)
    dpatches = dprompts = None
    if ctx.needs_input_grad[0]:
        dpatches = torch.baddbmm(g @ prompts, a, dlocal)
    if ctx.needs_input_grad[1]:
        dprompts = g.flatten(0, 1).t() @ patches.flatten(0, 1)
    return dpatches, dprompts, None, None


_similarity_pool_fwd.register_autograd(_backward, setup_context=_setup_context)

if interpret_mode():
    # Interpreted kernels read data pointers, which fake tensors lack: give torch.compile the
    # output shapes directly. On a GPU, triton_op's own tracing lets Inductor see the kernel.
    @_similarity_pool_fwd.register_fake
    def _(patches, prompts, topk, temperature):
        b, n, d = patches.shape
        o = prompts.shape[0]
        return (patches.new_empty((b, o, d)), patches.new_empty((b, n, o)),
                patches.new_empty((b, o, topk), dtype=torch.int32),
                patches.new_empty((b, o, topk), dtype=torch.float32))

    @_similarity_pool_bwd.register_fake
    def _(patches, dlocal, dsim, idx, wgt, temperature):
        shape = (patches.shape[0], patches.shape[1], idx.shape[1])
        return patches.new_empty(shape), patches.new_empty(shape)


def similarity_pool(patches: torch.Tensor, prompts: torch.Tensor, topk: int,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(local [B, O, D], sim [B, N, O]) for patches [B, N, D] and prompts [O, D].

    The caller normalises both; output in the input dtype, accumulation in fp32.
    """
    if patches.dim() != 3 or prompts.dim() != 2 or patches.shape[2] != prompts.shape[1]:
        raise ValueError(f"expected patches [B, N, D] and prompts [O, D], got {tuple(patches.shape)} "
                         f"and {tuple(prompts.shape)}")
    if not 1 <= topk <= patches.shape[1]:
        raise ValueError(f"topk must be in [1, N={patches.shape[1]}], got {topk}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if patches.dtype != prompts.dtype:
        raise ValueError(f"patches ({patches.dtype}) and prompts ({prompts.dtype}) differ in dtype")
    if not use_triton(patches, prompts):
        return similarity_pool_ref(patches, prompts, topk, temperature)
    local, sim, _, _ = torch.ops.bacgcn.similarity_pool_fwd(
        patches.contiguous(), prompts.contiguous(), int(topk), float(temperature))
    return local, sim
