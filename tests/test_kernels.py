"""Kernels against their fp64 references: in the Triton interpreter on the CPU (conftest sets
TRITON_INTERPRET=1 before triton is imported, where there is no CUDA), compiled on the GPU where
there is. Shapes are small but odd: N not a multiple of the block, topk = 1 and topk = N, O = 1,
empty graph rows, duplicate columns, an all-zero graph.
"""
import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels._common import interpret_mode  # noqa: E402
from kernels.gcn_propagate import gcn_propagate_ref  # noqa: E402
from kernels.similarity_pool import similarity_pool_ref, topk_lowest_index  # noqa: E402
from tests.kernel_cases import CPU_DTYPES, assert_close, normalised, random_csr, separated_topk  # noqa: E402

needs_interpreter = pytest.mark.skipif(not interpret_mode(), reason="TRITON_INTERPRET=1 not set before triton import")
# The odd-shape tests run wherever the kernels do: the interpreter on the CPU, or a GPU.
needs_kernels = pytest.mark.skipif(not (interpret_mode() or torch.cuda.is_available()),
                                   reason="neither TRITON_INTERPRET=1 nor CUDA")
DEVICE = "cpu" if interpret_mode() else "cuda"
DTYPES = CPU_DTYPES if interpret_mode() else [torch.bfloat16, *CPU_DTYPES]


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Fresh allocations come back full of NaN (or a wild index), so an element a kernel
    forgets to write fails the comparison instead of passing on a lucky zero."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-123456)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


# --------------------------------------------------------------------------------------------
# similarity_pool
# --------------------------------------------------------------------------------------------

SIM_SHAPES = [  # B, N, D, O, topk
    (2, 17, 33, 5, 3),     # N, D, O all odd, N not a block multiple
    (1, 33, 16, 1, 1),     # O = 1, topk = 1
    (2, 20, 48, 17, 20),   # topk = N
    (3, 49, 24, 40, 8),    # O spans two prompt blocks
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SIM_SHAPES)
def test_similarity_pool_matches_reference(shape, dtype, poisoned_outputs):
    b, n, d, o, k = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    patches = normalised(b, n, d, dtype=dtype, gen=gen).to(DEVICE).requires_grad_()
    prompts = normalised(o, d, dtype=dtype, gen=gen).to(DEVICE).requires_grad_()
    temperature = 0.07
    local, sim, pooled = kernels.similarity_pool(patches, prompts, k, temperature, with_indices=True)
    assert local.dtype == sim.dtype == dtype and local.shape == (b, o, d) and sim.shape == (b, n, o)
    dlocal = torch.randn(local.shape, generator=gen, dtype=torch.float64)
    dsim = torch.randn(sim.shape, generator=gen, dtype=torch.float64)
    ((local.double().cpu() * dlocal).sum() + (sim.double().cpu() * dsim).sum()).backward()

    p64 = patches.detach().double().requires_grad_()
    w64 = prompts.detach().double().requires_grad_()
    local_ref, sim_ref = similarity_pool_ref(p64, w64, k, temperature)
    ((local_ref * dlocal).sum() + (sim_ref * dsim).sum()).backward()
    if dtype != torch.bfloat16:   # bf16 rounding reorders near-ties; its values are checked below
        assert torch.equal(pooled.cpu(), topk_lowest_index(sim_ref, k).transpose(1, 2))
    assert_close(sim, sim_ref, dtype, d, "sim")
    assert_close(local, local_ref, dtype, max(d, k), "local")
    assert_close(patches.grad, p64.grad, dtype, max(o, d), "d patches")
    assert_close(prompts.grad, w64.grad, dtype, b * n, "d prompts")


@needs_kernels
def test_similarity_pool_local_only_gradient(poisoned_outputs):
    """Backward when sim is not used downstream (its gradient is absent)."""
    gen = torch.Generator().manual_seed(1)
    patches = normalised(2, 17, 16, dtype=torch.float32, gen=gen).to(DEVICE).requires_grad_()
    prompts = normalised(3, 16, dtype=torch.float32, gen=gen).to(DEVICE).requires_grad_()
    kernels.similarity_pool(patches, prompts, 4, 0.1)[0].sum().backward()
    p64, w64 = (t.detach().double().requires_grad_() for t in (patches, prompts))
    similarity_pool_ref(p64, w64, 4, 0.1)[0].sum().backward()
    assert_close(patches.grad, p64.grad, torch.float32, 16, "d patches")
    assert_close(prompts.grad, w64.grad, torch.float32, 34, "d prompts")


@needs_kernels
def test_similarity_pool_ties_go_to_the_lower_index():
    patches = torch.zeros(1, 19, 16)
    patches[0, :, 0] = torch.linspace(0, 0.5, 19)
    patches[0, 5, 0] = patches[0, 11, 0] = 0.9     # two equal best patches
    patches[0, 5, 1] = 0.3                          # ... with different content
    patches[0, 11, 2] = 0.3
    prompts = torch.zeros(1, 16)
    prompts[0, 0] = 1.0
    local, _ = kernels.similarity_pool(patches.to(DEVICE), prompts.to(DEVICE), 1, 0.1)
    assert torch.equal(local[0, 0].cpu(), patches[0, 5])
    local_ref, _ = similarity_pool_ref(patches, prompts, 1, 0.1)
    assert torch.equal(local_ref[0, 0], patches[0, 5])


def _exact_inputs(b, n, d, o, gen):
    """Patches and prompts in eighths with small D: every dot product is exact in fp32 whatever
    the summation order, so ties are exact ties (the reference breaks them the same way) and few
    distinct values make many of them, within and across patch tiles."""
    patches = torch.randint(-4, 5, (b, n, d), generator=gen).double() / 8
    prompts = torch.randint(-4, 5, (o, d), generator=gen).double() / 8
    # Image 1: every patch from 64 on repeats one 64 back, so each tile ties with the previous one.
    patches[1, 64:] = patches[1, :n - 64].clone()
    # Image 2: the first tile leads every later one (prompt coordinate 0 is 1 and the patches'
    # is 16 in the first tile, 0 after it; the other d - 1 coordinates add at most (d - 1) / 4 in
    # magnitude), so no later tile beats a K-th value for K <= 64: the merge's skip branch.
    patches[2, :, 0] = 0.0
    patches[2, :64, 0] = 16.0
    prompts[:, 0] = 1.0
    return patches.float(), prompts.float()


@needs_interpreter
@pytest.mark.parametrize("n, topk", [(130, 1), (130, 8), (200, 16), (193, 33), (200, 64)])
def test_similarity_pool_gpu_tiles_in_the_interpreter(n, topk, poisoned_outputs):
    """The GPU's tile plan (BLOCK_N = 64: several patch tiles, the running top-K merge, its skip
    branch, ties across tiles, K up to MAX_TRITON_TOPK) run in the interpreter, whose own plan is
    one tile over all N: without this test the GPU would be the first to execute these paths."""
    from kernels.similarity_pool import MAX_TRITON_TOPK, backward_launch, forward_launch, launch_config

    assert topk <= MAX_TRITON_TOPK and launch_config("forward", topk, torch.float32, n, gpu_tiles=True)["BLOCK_N"] < n
    b, d, o, temperature = 3, 32, 21, 0.5
    gen = torch.Generator().manual_seed(n * 100 + topk)
    patches, prompts = _exact_inputs(b, n, d, o, gen)
    launch, (local, sim, idx, wgt) = forward_launch(patches, prompts, topk, temperature, gpu_tiles=True)
    launch()
    dlocal = torch.randn(b, o, d, generator=gen)
    dsim = torch.randn(b, n, o, generator=gen)
    launch, (g, a) = backward_launch(patches, dlocal, dsim, idx, wgt, temperature, gpu_tiles=True)
    launch()
    # d patches and d prompts from G and A exactly as the op's backward makes them (cuBLAS there).
    dpatches = torch.baddbmm(g.double() @ prompts.double(), a.double(), dlocal.double())
    dprompts = g.double().flatten(0, 1).t() @ patches.double().flatten(0, 1)

    p64, w64 = (t.detach().double().requires_grad_() for t in (patches, prompts))
    local_ref, sim_ref = similarity_pool_ref(p64, w64, topk, temperature)
    ((local_ref * dlocal.double()).sum() + (sim_ref * dsim.double()).sum()).backward()
    assert torch.equal(idx.long(), topk_lowest_index(sim_ref, topk).transpose(1, 2))
    assert torch.equal(sim.double(), sim_ref.detach())
    assert_close(local, local_ref, torch.float32, max(d, topk), "local")
    assert_close(dpatches, p64.grad, torch.float32, max(o, d), "d patches")
    assert_close(dprompts, w64.grad, torch.float32, b * n, "d prompts")


@pytest.mark.parametrize("topk", [1, 3, 16, 33])
def test_topk_mask_is_the_sorted_selection(topk):
    """The reference selects by mask (no sort): the same patches as a stable sort, with columns
    full of ties at the K-th value."""
    from kernels.similarity_pool import topk_mask

    gen = torch.Generator().manual_seed(topk)
    sim = (torch.randn(3, 33, 7, generator=gen) * 2).round() / 2        # few distinct values: many ties
    sim[1, :, 2] = 0.5                                                   # a column that is all one tie
    sorted_pick = torch.zeros_like(sim, dtype=torch.bool).scatter(1, topk_lowest_index(sim, topk), True)
    assert torch.equal(topk_mask(sim, topk), sorted_pick)
    assert (topk_mask(sim, topk).sum(1) == topk).all()


def test_similarity_pool_rejects_bad_arguments():
    p, w = torch.zeros(2, 5, 8), torch.zeros(3, 8)
    with pytest.raises(ValueError, match="topk"):
        kernels.similarity_pool(p, w, 6, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        kernels.similarity_pool(p, w, 2, 0.0)
    with pytest.raises(ValueError, match="expected patches"):
        kernels.similarity_pool(p, torch.zeros(3, 7), 2, 0.1)


# --------------------------------------------------------------------------------------------
# gcn_propagate
# --------------------------------------------------------------------------------------------

GCN_CASES = [  # B, V, D, density, graph options
    (3, 17, 33, {}),
    (1, 1, 16, {"empty_rows": ()}),
    (2, 9, 17, {"zero_values": True}),            # all-zero graph
    (2, 12, 20, {"duplicates": False, "empty_rows": (0, 5, 11)}),
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "gelu"])
@pytest.mark.parametrize("case", range(len(GCN_CASES)))
def test_gcn_propagate_matches_reference(case, activation, dtype, poisoned_outputs):
    b, v, d, opts = GCN_CASES[case]
    gen = torch.Generator().manual_seed(case * 7 + 1)
    indptr, indices, values = random_csr(v, 0.3, gen, **opts)
    x = torch.randn(b, v, d, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    bias = torch.randn(d, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    residual = torch.randn(b, v, d, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    values = values.to(DEVICE).requires_grad_()
    y = kernels.gcn_propagate(x, indptr.to(DEVICE), indices.to(DEVICE), values, bias, activation, residual)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (y.double().cpu() * dy).sum().backward()
    ref = [t.detach().double().cpu().requires_grad_() for t in (x, values, bias, residual)]
    y_ref = gcn_propagate_ref(ref[0], indptr, indices, ref[1], ref[2], activation, ref[3])
    (y_ref * dy).sum().backward()
    nnz_row = max(1, int(indptr.diff().max()))
    assert_close(y, y_ref, dtype, nnz_row, "y")
    assert_close(x.grad, ref[0].grad, dtype, v, "d x")
    assert_close(values.grad, ref[1].grad, dtype, b * d, "d values")
    assert_close(bias.grad, ref[2].grad, dtype, b * v, "d bias")
    assert_close(residual.grad, ref[3].grad, dtype, 1, "d residual")


@needs_kernels
def test_gcn_propagate_without_bias_or_residual(poisoned_outputs):
    gen = torch.Generator().manual_seed(3)
    indptr, indices, values = random_csr(7, 0.4, gen)
    x = torch.randn(2, 7, 16, generator=gen).to(DEVICE).requires_grad_()
    y = kernels.gcn_propagate(x, indptr.to(DEVICE), indices.to(DEVICE), values.to(DEVICE))
    y.sum().backward()
    x64 = x.detach().double().cpu().requires_grad_()
    gcn_propagate_ref(x64, indptr, indices, values.double()).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, 7, "d x")


def test_gcn_propagate_rejects_bad_arguments():
    x = torch.zeros(2, 3, 4)
    indptr, indices, values = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 2]), torch.ones(2)
    with pytest.raises(ValueError, match="indptr"):
        kernels.gcn_propagate(x, indptr[:3], indices, values)
    with pytest.raises(ValueError, match="activation"):
        kernels.gcn_propagate(x, indptr, indices, values, activation="tanh")
    with pytest.raises(ValueError, match="bias"):
        kernels.gcn_propagate(x, indptr, indices, values, bias=torch.zeros(3))


# --------------------------------------------------------------------------------------------
# torch.compile traces through both ops
# --------------------------------------------------------------------------------------------

@needs_interpreter
def test_compile_traces_both_ops_without_graph_breaks():
    import torch._dynamo

    from kernels.gcn_propagate import csr_plan

    gen = torch.Generator().manual_seed(0)
    inputs = [normalised(2, 17, 16, dtype=torch.float32, gen=gen).requires_grad_(),
              normalised(5, 16, dtype=torch.float32, gen=gen).requires_grad_(),
              *random_csr(5, 0.5, gen, empty_rows=()), torch.zeros(16, requires_grad=True)]
    plan = csr_plan(inputs[2], inputs[3], 5)     # made once, as CLIPGCN does: no host read-back in the step

    def step(patches, prompts, indptr, indices, values, bias):
        local, sim = kernels.similarity_pool(patches, prompts, 3, 0.1)
        y = kernels.gcn_propagate(local, indptr, indices, values, bias, "relu", local, plan=plan)
        return y.square().mean() + sim.mean()

    inputs[4].requires_grad_()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*inputs), [inputs[0], inputs[1], inputs[4]])
    eager = torch.autograd.grad(step(*inputs), [inputs[0], inputs[1], inputs[4]])
    for g, e in zip(grads, eager):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------------
# GPU only: bf16 (the interpreter computes bf16 wrongly) on the real hardware
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(8, 196, 512, 105, 8), (8, 784, 512, 105, 16), (4, 1024, 768, 84, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_on_gpu(dtype, shape):
    """The real shapes (ViT-B/16 at 224 and 448 px, ViT-L/14 at 448), compiled for this GPU, on
    inputs whose top-K leads the rest by a margin: plain random ones put the 16th and 17th of a
    column 4.7e-8 apart (fp16, N = 784), and a tensor-core summation order may swap them."""
    gen = torch.Generator().manual_seed(0)
    b, n, d, o, k = shape
    patches, prompts = separated_topk(b, n, d, o, k, dtype, gen)
    patches, prompts = patches.cuda().requires_grad_(), prompts.cuda().requires_grad_()
    local, sim, pooled = kernels.similarity_pool(patches, prompts, k, 0.07, with_indices=True)
    (local.float().square().sum() + sim.float().sum()).backward()
    p64, w64 = (t.detach().double().cpu().requires_grad_() for t in (patches, prompts))
    local_ref, sim_ref = similarity_pool_ref(p64, w64, k, 0.07)
    (local_ref.square().sum() + sim_ref.sum()).backward()
    picked_ref = topk_lowest_index(sim_ref, k).transpose(1, 2)
    assert torch.equal(pooled.cpu().sort(-1).values, picked_ref.sort(-1).values)
    assert_close(sim, sim_ref, dtype, d, "sim")
    assert_close(local, local_ref, dtype, max(d, k), "local")
    assert_close(patches.grad, p64.grad, dtype, max(o, d), "d patches")
    assert_close(prompts.grad, w64.grad, dtype, b * n, "d prompts")
    v = o + 3
    indptr, indices, values = (t.cuda() for t in random_csr(v, 0.2, gen))
    x = torch.randn(b, v, d, generator=gen).to(dtype).cuda().requires_grad_()
    y = kernels.gcn_propagate(x, indptr, indices, values.to(dtype), None, "gelu", x)
    y.float().sum().backward()
    x64 = x.detach().double().cpu().requires_grad_()
    graph = (indptr.cpu(), indices.cpu(), values.to(dtype).double().cpu())
    y_ref = gcn_propagate_ref(x64, *graph, None, "gelu", x64)
    y_ref.sum().backward()
    assert_close(y, y_ref, dtype, v, "y")
    assert_close(x.grad, x64.grad, dtype, v, "d x")


@needs_interpreter
def test_interpreter_takes_small_calls_and_leaves_training_sizes_to_the_reference():
    """The interpreter checks kernels; a training-size call there would cost seconds a step."""
    from kernels._common import INTERPRET_MAX_WORK, use_triton

    x = torch.zeros(2, 3)
    assert use_triton(x, work=INTERPRET_MAX_WORK)
    assert not use_triton(x, work=INTERPRET_MAX_WORK + 1)
