"""Defects of the CUDA path that the CPU can show: what the GPU run would have paid or got wrong."""
import pytest
import torch

import bacgcn
import kernels
import pipeline
from kernels._common import interpret_mode
from kernels.similarity_pool import topk_lowest_index

needs_kernels = pytest.mark.skipif(not (interpret_mode() or torch.cuda.is_available()),
                                   reason="neither TRITON_INTERPRET=1 nor CUDA")
DEVICE = "cpu" if interpret_mode() else "cuda"


@needs_kernels
def test_pooled_indices_are_the_kernels_own_choice():
    """The kernel selects on fp32 similarities and returns them rounded to the input dtype: a
    selection recomputed from the returned sim (what --visualize drew) picks another patch at a
    near-tie. Patch 7 is ahead by 2^-13, less than fp16's spacing at 0.5 (2^-11)."""
    patches = torch.zeros(1, 19, 16, dtype=torch.float16)
    patches[0, 3, 0] = 0.5
    patches[0, 7, 0], patches[0, 7, 1] = 0.5, 2.0 ** -13
    prompts = torch.zeros(1, 16, dtype=torch.float16)
    prompts[0, :2] = 1.0
    _, sim, pooled = kernels.similarity_pool(patches.to(DEVICE), prompts.to(DEVICE), 1, 0.1, with_indices=True)
    assert pooled[0, 0, 0].item() == 7
    assert topk_lowest_index(sim.cpu().float(), 1)[0, 0, 0].item() == 3     # the rounded sim ties


def _gcn(v=9, dim=16):
    gen = torch.Generator().manual_seed(0)
    adjacency = (torch.rand(v, v, generator=gen) < 0.4).float() + torch.eye(v)
    gcn = bacgcn.CLIPGCN(adjacency / adjacency.sum(1, keepdim=True), dim, layers=2, activation="leaky_relu")
    for w in gcn.weights:
        torch.nn.init.normal_(w, std=0.1, generator=gen)
    return gcn


@needs_kernels
def test_gcn_backward_reuses_the_graphs_transpose(monkeypatch):
    """The transposed CSR of a graph that never changes was rebuilt in every backward of every
    layer, reading the graph back to the host each time: the module keeps it from the start."""
    gcn = _gcn().to(DEVICE)
    for name in ("repeat_interleave", "bincount"):   # what read the graph back to the host
        monkeypatch.setattr(torch, name, lambda *a, _name=name, **k: pytest.fail(f"torch.{_name} during a step"))
    x = torch.randn(3, 9, 16, device=DEVICE, requires_grad=True)
    gcn(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert "t_indptr" not in gcn.state_dict()           # derived from the graph: never in checkpoints


def test_gcn_plan_matches_a_transposed_graph():
    from kernels.gcn_propagate import csr_plan, csr_to_dense

    indptr, indices, values = bacgcn.dense_to_csr(torch.tensor([[0.0, 2, 0], [1, 0, 3], [0, 4, 5]]))
    rows, t_indptr, t_indices, t_order = csr_plan(indptr, indices, 3)
    assert torch.equal(rows, torch.tensor([0, 1, 1, 2, 2]))
    assert torch.equal(csr_to_dense(t_indptr, t_indices, values[t_order], 3),
                       csr_to_dense(indptr, indices, values, 3).t())


@pytest.mark.skipif(not (interpret_mode() or torch.cuda.is_available()), reason="needs triton")
def test_gcn_launch_does_not_depend_on_the_batch_size():
    """Tiles sized from next_pow2(B) pinned every batch size (the last batch, crop batches, DDP
    slices) to its own compiled graph; the launch options must not vary with B."""
    from kernels.gcn_propagate import full_graph_meta, spmm_launch

    graph = full_graph_meta(7, torch.float32)
    options = {b: spmm_launch(torch.empty(b, 7, 32, device="meta"), *graph, None, "relu", None)[0].options
               for b in (1, 5, 19, 64, 256)}
    assert all(o == options[1] for o in options.values())


def test_local_rank_without_a_gpu_of_its_own_is_one_line(monkeypatch):
    """Two ranks on a one-GPU machine asked for cuda:1 ("invalid device ordinal" deep in CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="local rank 1 has no GPU of its own.*--device=cpu"):
        pipeline.init_distributed("cuda")


def test_feature_cache_key_records_device_and_precision():
    """A CPU fp32 cache was reused for a GPU bf16 run: the key now says how features were computed."""
    assert pipeline.encode_precision("cpu", True) == "fp32"
    assert pipeline.encode_precision("cuda", True) == "bf16-autocast"
    assert pipeline.encode_precision("cuda", False) == "tf32"
    assert {pipeline.encode_precision(d, a) for d in ("cpu", "cuda") for a in (True, False)} == \
        {"fp32", "bf16-autocast", "tf32"}


def test_tf32_is_enabled_inside_and_restored_after():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with pipeline.tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_epoch_indices_reach_the_device_in_one_copy():
    batches = [torch.tensor([3, 1]), torch.tensor([0]), torch.tensor([2, 4, 5])]
    assert pipeline.to_device_once(batches, "cpu") is batches
    if torch.cuda.is_available():
        moved = pipeline.to_device_once(batches, "cuda")
        assert [m.tolist() for m in moved] == [b.tolist() for b in batches] and moved[0].is_cuda
