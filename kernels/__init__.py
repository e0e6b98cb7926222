"""Custom ops of BAC-GCN. Each file: Triton kernel(s), launcher, autograd, a pure-torch `_ref`.

Dispatch: Triton on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1), the reference
otherwise, so training on the CPU needs no Triton.
"""
from kernels.gcn_propagate import gcn_propagate, gcn_propagate_ref
from kernels.similarity_pool import similarity_pool, similarity_pool_ref

__all__ = ["gcn_propagate", "gcn_propagate_ref", "similarity_pool", "similarity_pool_ref"]
