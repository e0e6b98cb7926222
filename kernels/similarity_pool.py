"""Similarity Kernel of BAC-GCN: similarity maps and top-K softmax pooling of patch features.

    sim[b, n, o]   = <patches[b, n], prompts[o]>
    local[b, o]    = sum_{n in K(b, o)} softmax_{n in K}(sim[b, n, o] / T) * patches[b, n]

K(b, o) is the set of the `topk` patches with the largest sim[b, :, o], ties broken by the lower
patch index. The selection is not differentiated; everything else is.

Forward (Triton): one program per (image, block of prompts) walks the patches in tiles of
BLOCK_N: it computes the sim tile with tl.dot over D, stores it, and merges the tile into a
running top-K per prompt ([BLOCK_O, K] values and indices in registers, K rounds of max, the
lowest index winning ties; a tile that beats no K-th value is skipped). Then the softmax over
the K values and the pooling as K row gathers of patches[b] (from L2: the tile loop has just
read them). Nothing scales with N but the loop count, so N = 1024 fits as N = 49 does; the
B x O x K x D gather is never materialised. It also writes the top-K indices and weights
([B, O, K], tiny), so the backward sees the exact forward selection.

Backward: a Triton kernel computes d loss / d weight at the K selected patches only (the same
row gathers against dlocal), the softmax Jacobian, and writes two dense [B, N, O] matrices, A
(the pooling weights) and G (d loss / d sim); the three large products, dpatches = A @ dlocal +
G @ prompts and dprompts = G^T @ patches, go to cuBLAS.

`similarity_pool` dispatches: Triton on CUDA tensors (and under TRITON_INTERPRET=1), the
pure-torch `similarity_pool_ref` otherwise.
"""
from typing import Optional

import torch

from kernels._common import Launch, interpret_mode, next_pow2, register_op, tl, triton, use_triton

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
    # No tie at the K-th value, the usual case, is the cheap path on the CPU; on a GPU asking
    # would stop the host for a device read-back every step (and break a compiled graph).
    if not sim.is_cuda and bool((at_least.sum(1) == topk).all()):
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
def _prompt_block(O, BLOCK_O: tl.constexpr, K_PAD: tl.constexpr):
    """This program's image b (int64 for pointer math), its prompt offsets and mask, the K slots."""
    b = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    return b, offs_o, offs_o < O, tl.arange(0, K_PAD)


# Nested jit functions stay out of the loops: the interpreter (every CPU test and CPU training
# run under TRITON_INTERPRET=1) re-patches triton.language on each nested call, which made the
# proving ground's in-process training tests ~10x slower when the merge and the K-slot reads were
# helpers. Column k of a [BLOCK_O, K_PAD] register tile is read as a masked sum (registers
# cannot be indexed): tl.sum(tl.where(offs_k[None, :] == k, tile, 0), axis=1).
@triton.jit
def _pool_rows(p_base, top_i, wgt, offs_o, mask_o, offs_k, D, stride_pn, stride_pd, out_base, stride_lo, stride_ld,
               K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr):
    """local[o] = sum_k wgt[o, k] * P[b, idx[o, k]]: K row gathers per prompt, from L2 (the tile
    loop has just read P[b]); the B x O x K x D gather never exists in memory."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_od = mask_o[:, None] & (offs_d[None, :] < D)
        out = tl.zeros((BLOCK_O, BLOCK_D), dtype=tl.float32)
        for k in range(K):
            row = tl.sum(tl.where(offs_k[None, :] == k, top_i, 0), axis=1).to(tl.int64)
            rows = tl.load(p_base + row[:, None] * stride_pn + offs_d[None, :] * stride_pd, mask=mask_od,
                           other=0.0).to(tl.float32)
            out += tl.sum(tl.where(offs_k[None, :] == k, wgt, 0.0), axis=1)[:, None] * rows
        tl.store(out_base + offs_o[:, None] * stride_lo + offs_d[None, :] * stride_ld,
                 out.to(out_base.dtype.element_ty), mask=mask_od)


# N is only a loop bound and a mask across rows (never a stride), so specialising on N % 16 buys
# no vectorisation; it did change ptxas's register choice: at N % 16 == 0 (64 ... 1024) the
# forward was capped at 80 registers and spilled 16-24 B (bf16, K = 1 and 4), at N = 49 or 196
# it did not. One compiled kernel for every N.
@triton.jit(do_not_specialize=["N"])
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
    b, offs_o, mask_o, offs_k = _prompt_block(O, BLOCK_O, K_PAD)
    p_base = P + b * stride_pb
    # The running top-K of every prompt row, sorted by (value desc, index asc); slots >= K
    # stay -inf. Patches arrive in increasing index, so on equal values the list wins.
    top_v = tl.full((BLOCK_O, K_PAD), float("-inf"), tl.float32)
    top_i = tl.full((BLOCK_O, K_PAD), 2147483647, tl.int32)
    kth = tl.full((BLOCK_O,), float("-inf"), tl.float32)

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        # 1. sim tile [BLOCK_O, BLOCK_N] = W[o] . P[b, n] over D, fp32 accumulation.
        acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            q = tl.load(W + offs_o[:, None] * stride_wo + offs_d[None, :] * stride_wd,
                        mask=mask_o[:, None] & mask_d[None, :], other=0.0)
            p = tl.load(p_base + offs_n[None, :] * stride_pn + offs_d[:, None] * stride_pd,
                        mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            if UPCAST:  # the interpreter computes bf16 products wrongly unless they are fp32
                q = q.to(tl.float32)
                p = p.to(tl.float32)
            if IEEE:    # fp32 inputs: full precision, not tf32
                acc = tl.dot(q, p, acc, input_precision="ieee")
            else:
                acc = tl.dot(q, p, acc)
        tl.store(SIM + b * stride_sb + offs_n[None, :] * stride_sn + offs_o[:, None] * stride_so,
                 acc.to(SIM.dtype.element_ty), mask=mask_o[:, None] & mask_n[None, :])

        # 2. merge the tile into the running top-K, only where some value beats the K-th.
        s = tl.where(mask_n[None, :], acc, float("-inf"))
        gain = tl.where(mask_o, tl.max(s, axis=1) - kth, -1.0)
        if tl.max(gain, axis=0) > 0:
            # K rounds of max over (tile, list); the list's patches precede the tile's, so on
            # equal values the list wins, and within each the lowest index does.
            new_v = tl.full((BLOCK_O, K_PAD), float("-inf"), tl.float32)
            new_i = tl.full((BLOCK_O, K_PAD), 2147483647, tl.int32)
            rest = top_v
            for k in range(K):
                m_tile, m_list = tl.max(s, axis=1), tl.max(rest, axis=1)
                from_tile = m_tile > m_list
                i_tile = tl.min(tl.where(s == m_tile[:, None], offs_n[None, :], 2147483647), axis=1)
                i_list = tl.min(tl.where(rest == m_list[:, None], top_i, 2147483647), axis=1)
                new_v = tl.where(offs_k[None, :] == k, tl.where(from_tile, m_tile, m_list)[:, None], new_v)
                new_i = tl.where(offs_k[None, :] == k, tl.where(from_tile, i_tile, i_list)[:, None], new_i)
                s = tl.where(from_tile[:, None] & (offs_n[None, :] == i_tile[:, None]), float("-inf"), s)
                rest = tl.where(~from_tile[:, None] & (top_i == i_list[:, None]), float("-inf"), rest)
            top_v, top_i = new_v, new_i
            kth = tl.min(tl.where(offs_k[None, :] < K, top_v, float("inf")), axis=1)

    # 3. softmax over the K selected values (slot 0 holds the maximum, so exp cannot overflow).
    e = tl.exp((top_v - tl.max(top_v, axis=1)[:, None]) * inv_t)
    wgt = e / tl.sum(e, axis=1)[:, None]
    mask_ok = mask_o[:, None] & (offs_k[None, :] < K)
    ik = (b * O + offs_o[:, None]) * K + offs_k[None, :]
    tl.store(IDX + ik, top_i, mask=mask_ok)
    tl.store(WGT + ik, wgt, mask=mask_ok)

    # 4. the pooling, in a helper called once per program.
    _pool_rows(p_base, top_i, wgt, offs_o, mask_o, offs_k, D, stride_pn, stride_pd, LOCAL + b * stride_lb,
               stride_lo, stride_ld, K, BLOCK_O, BLOCK_D)


@triton.jit(do_not_specialize=["N"])
def _similarity_pool_bwd_kernel(
    P, DLOCAL, DSIM, IDX, WGT, G, A,
    N, O, D, inv_t,
    stride_pb, stride_pn, stride_pd,
    stride_lb, stride_lo, stride_ld,
    stride_sb, stride_sn, stride_so,   # shared by DSIM, G and A (all [B, N, O] contiguous)
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_DSIM: tl.constexpr,
):
    b, offs_o, mask_o, offs_k = _prompt_block(O, BLOCK_O, K_PAD)
    mask_ok = mask_o[:, None] & (offs_k[None, :] < K)
    ik = (b * O + offs_o[:, None]) * K + offs_k[None, :]
    top_i = tl.load(IDX + ik, mask=mask_ok, other=-1)
    wgt = tl.load(WGT + ik, mask=mask_ok, other=0.0)

    # pd[o, k] = <P[b, idx[o, k]], dlocal[b, o]>: d loss / d pooling weight, at the selection only.
    pd = tl.zeros((BLOCK_O, K_PAD), dtype=tl.float32)
    p_base = P + b * stride_pb
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_od = mask_o[:, None] & (offs_d[None, :] < D)
        dl = tl.load(DLOCAL + b * stride_lb + offs_o[:, None] * stride_lo + offs_d[None, :] * stride_ld,
                     mask=mask_od, other=0.0).to(tl.float32)
        for k in range(K):
            row = tl.sum(tl.where(offs_k[None, :] == k, top_i, 0), axis=1).to(tl.int64)
            rows = tl.load(p_base + row[:, None] * stride_pn + offs_d[None, :] * stride_pd, mask=mask_od,
                           other=0.0).to(tl.float32)
            pd += tl.where(offs_k[None, :] == k, tl.sum(rows * dl, axis=1)[:, None], 0.0)
    # Softmax Jacobian: ds = a / T * (pd - sum_k a * pd).
    grad = wgt * inv_t * (pd - tl.sum(wgt * pd, axis=1)[:, None])

    # Dense G = dsim + scatter(grad) and A = scatter(wgt) over [N, O], tile by tile.
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_on = mask_o[:, None] & (offs_n[None, :] < N)
        so = b * stride_sb + offs_n[None, :] * stride_sn + offs_o[:, None] * stride_so
        g = tl.zeros((BLOCK_O, BLOCK_N), dtype=tl.float32)
        if HAS_DSIM:
            g += tl.load(DSIM + so, mask=mask_on, other=0.0).to(tl.float32)
        a = tl.zeros((BLOCK_O, BLOCK_N), dtype=tl.float32)
        for k in range(K):
            slot = offs_k[None, :] == k
            hit = offs_n[None, :] == tl.sum(tl.where(slot, top_i, 0), axis=1)[:, None]
            g += tl.where(hit, tl.sum(tl.where(slot, grad, 0.0), axis=1)[:, None], 0.0)
            a += tl.where(hit, tl.sum(tl.where(slot, wgt, 0.0), axis=1)[:, None], 0.0)
        tl.store(G + so, g.to(G.dtype.element_ty), mask=mask_on)
        tl.store(A + so, a.to(A.dtype.element_ty), mask=mask_on)


# Beyond this K the [BLOCK_O, K_PAD] top-K lists and the K merge rounds per patch tile stop
# paying off: the op runs its reference (BAC-GCN uses K <= 16).
MAX_TRITON_TOPK = 64


def _k_pad(topk: int) -> int:
    return max(2, next_pow2(topk))


def launch_config(kernel: str, topk: int, dtype: torch.dtype, n: int = 64, gpu_tiles: bool = False) -> dict:
    """Tile sizes and launch options of the "forward" or "backward" kernel; with `gpu_tiles`,
    the GPU's plan even in the interpreter (the tests run the multi-tile paths that way).

    Patch tiles of BLOCK_N = 64 walk N (the running top-K merge makes N free), so nothing here
    grows with N: every N up to 1024 (ViT-L/14 at 448 px) compiles to the same resources. The
    old design held a whole patch column per tile (BLOCK_N = next_pow2(N)) and asked for
    399,360 B of shared memory at N = 784 in bf16 (the limit is 232,448 on sm_90), with 255
    registers and spills in fp32. Chosen with bench/compile_check.py (sm_90, ptxas 12.8 of
    triton 3.8; worst over K <= 16, N <= 1024, D <= 768): bf16/fp16 at 8 warps, forward 98-100
    registers, backward 95-117, no spill (at 4 warps ptxas capped the forward at 128 registers
    and spilled 8-12 B); fp32 forward at 4 warps 156-193 registers, no spill (8 warps spilled at
    K = 16), fp32 backward at 8 warps 95-97. BLOCK_O = 32 halves the K-lists' registers when
    K > 32.
    """
    block_o = 32 if _k_pad(topk) <= 32 else 16
    if interpret_mode() and not gpu_tiles:
        # The interpreter pays per op, not per byte: one tile over all N (no GPU limits apply
        # there) keeps CPU training under TRITON_INTERPRET=1 at the old kernel's speed.
        return {"BLOCK_N": max(64, next_pow2(n)), "BLOCK_O": block_o, "BLOCK_D": 64, "num_warps": 4,
                "num_stages": 2}
    if dtype != torch.float32:
        return {"BLOCK_N": 64, "BLOCK_O": block_o, "BLOCK_D": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_N": 64, "BLOCK_O": block_o, "BLOCK_D": 32, "num_warps": 4 if kernel == "forward" else 8,
            "num_stages": 2}


def _flags(dtype: torch.dtype) -> dict:
    return {"UPCAST": interpret_mode() and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}


def forward_launch(patches: torch.Tensor, prompts: torch.Tensor, topk: int, temperature: float,
                   gpu_tiles: bool = False) -> tuple[Launch, tuple[torch.Tensor, ...]]:
    """The forward kernel's launch and its outputs (local, sim, idx, wgt), allocated here."""
    b, n, d = patches.shape
    o = prompts.shape[0]
    sim = torch.empty((b, n, o), device=patches.device, dtype=patches.dtype)
    local = torch.empty((b, o, d), device=patches.device, dtype=patches.dtype)
    idx = torch.empty((b, o, topk), device=patches.device, dtype=torch.int32)
    wgt = torch.empty((b, o, topk), device=patches.device, dtype=torch.float32)
    options = launch_config("forward", topk, patches.dtype, n, gpu_tiles)
    grid = (b, triton.cdiv(o, options["BLOCK_O"]))
    args = (patches, prompts, sim, local, idx, wgt, n, o, d, 1.0 / temperature,
            *patches.stride(), *prompts.stride(), *sim.stride(), *local.stride())
    options.update(K=topk, K_PAD=_k_pad(topk), **_flags(patches.dtype))
    return Launch(_similarity_pool_fwd_kernel, grid, args, options), (local, sim, idx, wgt)


def backward_launch(patches: torch.Tensor, dlocal: torch.Tensor, dsim: Optional[torch.Tensor], idx: torch.Tensor,
                    wgt: torch.Tensor, temperature: float,
                    gpu_tiles: bool = False) -> tuple[Launch, tuple[torch.Tensor, ...]]:
    """The backward kernel's launch and its outputs (G, A), allocated here."""
    b, n, d = patches.shape
    o, topk = idx.shape[1], idx.shape[2]
    g = torch.empty((b, n, o), device=patches.device, dtype=patches.dtype)
    a = torch.empty_like(g)
    options = launch_config("backward", topk, patches.dtype, n, gpu_tiles)
    grid = (b, triton.cdiv(o, options["BLOCK_O"]))
    args = (patches, dlocal, dsim if dsim is not None else g, idx, wgt, g, a, n, o, d, 1.0 / temperature,
            *patches.stride(), *dlocal.stride(), *g.stride())
    options.update(K=topk, K_PAD=_k_pad(topk), HAS_DSIM=dsim is not None)
    return Launch(_similarity_pool_bwd_kernel, grid, args, options), (g, a)


# --------------------------------------------------------------------------------------------
# Registered ops (torch.compile traces through them) and autograd
# --------------------------------------------------------------------------------------------

@register_op("bacgcn::similarity_pool_fwd")
def _similarity_pool_fwd(patches: torch.Tensor, prompts: torch.Tensor, topk: int,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    launch, outputs = forward_launch(patches, prompts, topk, temperature)
    launch()
    return outputs


@register_op("bacgcn::similarity_pool_bwd")
def _similarity_pool_bwd(patches: torch.Tensor, dlocal: torch.Tensor, dsim: Optional[torch.Tensor],
                         idx: torch.Tensor, wgt: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    launch, outputs = backward_launch(patches, dlocal, dsim, idx, wgt, temperature)
    launch()
    return outputs


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


def similarity_pool(patches: torch.Tensor, prompts: torch.Tensor, topk: int, temperature: float,
                    with_indices: bool = False) -> tuple[torch.Tensor, ...]:
    """(local [B, O, D], sim [B, N, O]) for patches [B, N, D] and prompts [O, D]; with
    `with_indices`, also the pooled patches [B, O, K] (int64, best first), the very selection
    the op made (on CUDA it selects on fp32 similarities, finer than the sim it returns).

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
    work = patches.shape[0] * patches.shape[1] * prompts.shape[0]
    if not use_triton(patches, prompts, work=work) or topk > MAX_TRITON_TOPK:
        local, sim = similarity_pool_ref(patches, prompts, topk, temperature)
        if not with_indices:
            return local, sim
        return local, sim, topk_lowest_index(sim, topk).transpose(1, 2)
    local, sim, idx, _ = torch.ops.bacgcn.similarity_pool_fwd(
        patches.contiguous(), prompts.contiguous(), int(topk), float(temperature))
    return (local, sim, idx.long()) if with_indices else (local, sim)
