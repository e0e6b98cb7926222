"""BAC-GCN, the method: the Similarity Kernel, the CLIP-GCN, the model that joins them over
cached frozen-CLIP features, and the graph's adjacency. Nothing else: the config is config.py,
the frozen CLIP and its read-outs backbone.py, the device kernels kernels/.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import BACGCNConfig

# ============================================================================================
# Graph (stage 4 edges)
# ============================================================================================

NUM_GLOBAL_NODES = 3   # g, g^H, g^Hc


def build_adjacency(m: torch.Tensor, n: torch.Tensor, num_classes: int, cfg: BACGCNConfig) -> torch.Tensor:
    """Dense normalised adjacency [V, V] over O local nodes + the global nodes (g, g^H, g^Hc).

    Local edges come from the caption graph, ML-GCN style: node i aggregates from node j when
    P(j|i) = M_ij / N_i >= tau_a (`graph_direction="row"`; "mlgcn" takes the transpose, as
    ML-GCN's released gen_adj does; the README gives the measurement), for class<->class and
    class<->background pairs (never background<->background); each node keeps 1 - p of its
    weight and shares p among its neighbours. Every global node is joined to every local node
    (`global_edge`); all nodes have self loops; then D^-1/2 A D^-1/2.
    """
    o = m.shape[0]
    cond = torch.where(n[:, None] > 0, m / n[:, None].clamp_min(1), torch.zeros_like(m))
    edge = (cond >= cfg.tau_a).float()
    edge.fill_diagonal_(0)
    is_bg = torch.arange(o) >= num_classes
    edge[is_bg[:, None] & is_bg[None, :]] = 0
    if cfg.graph_direction == "mlgcn":
        edge = edge.t()   # ML-GCN's gen_adj propagates over A^T: i aggregates from j when P(i|j) >= tau_a
    deg = edge.sum(1, keepdim=True)
    local = torch.where(deg > 0, cfg.reweight_p * edge / deg.clamp_min(1), torch.zeros_like(edge))
    local += torch.diag(torch.where(deg[:, 0] > 0, 1 - cfg.reweight_p, 1.0))
    v = o + NUM_GLOBAL_NODES
    adj = torch.zeros(v, v)
    adj[:o, :o] = local
    adj[:o, o:] = cfg.global_edge
    adj[o:, :o] = cfg.global_edge
    adj[o:, o:] = torch.eye(NUM_GLOBAL_NODES)
    d = adj.sum(1).rsqrt()
    return d[:, None] * adj * d[None, :]


def dense_to_csr(adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = adj.nonzero(as_tuple=True)
    indptr = torch.zeros(adj.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=adj.shape[0]), 0)
    return indptr, cols, adj[rows, cols].float()


# ============================================================================================
# Trainable head: Similarity Kernel + CLIP-GCN + logits
# ============================================================================================

class SimilarityKernel(nn.Module):
    """Stage 3: prompts W [O, E] (trainable, from CLIP's text tower) -> similarity maps S and
    Top-K softmax-pooled local features L (kernels.similarity_pool)."""

    def __init__(self, prompts: torch.Tensor, topk: int, temperature: float):
        super().__init__()
        self.prompts = nn.Parameter(prompts.clone().float())
        self.topk, self.temperature = topk, temperature

    def forward(self, patches: torch.Tensor, with_indices: bool = False) -> tuple[torch.Tensor, ...]:
        """(L, S), and with `with_indices` the pooled patches [B, O, K] the kernel itself chose."""
        from kernels import similarity_pool

        w = F.normalize(self.prompts, dim=-1).to(patches.dtype)
        return similarity_pool(patches, w, min(self.topk, patches.shape[1]), self.temperature, with_indices)


class CLIPGCN(nn.Module):
    """Stage 4: GCN layers H <- act(A H W + b) + H over local and global nodes
    (kernels.gcn_propagate). W and b start at zero: the untrained GCN is the identity."""

    def __init__(self, adjacency: torch.Tensor, dim: int, layers: int, activation: str):
        super().__init__()
        from kernels.gcn_propagate import csr_plan

        indptr, indices, values = dense_to_csr(adjacency)
        self.register_buffer("indptr", indptr)
        self.register_buffer("indices", indices)
        self.register_buffer("values", values)
        # The backward's view of the graph (edge rows, the transposed CSR), made once here and
        # moved with the module: derived from the graph, so not saved in checkpoints.
        for name, tensor in zip(("edge_rows", "t_indptr", "t_indices", "t_order"),
                                csr_plan(indptr, indices, adjacency.shape[0])):
            self.register_buffer(name, tensor, persistent=False)
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(dim, dim)) for _ in range(layers)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(layers)])
        self.activation = activation

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        from kernels import gcn_propagate

        h = nodes
        for w, b in zip(self.weights, self.biases):
            h = gcn_propagate(h @ w.to(h.dtype), self.indptr, self.indices, self.values.to(h.dtype),
                              b.to(h.dtype), self.activation, h,
                              plan=(self.edge_rows, self.t_indptr, self.t_indices, self.t_order))
        return h


class BACGCN(nn.Module):
    """The trainable part of BAC-GCN over cached CLIP features.

    logit_o = gamma * s * [cos(h_g, w_o) + a_H cos(h_gH, w_o) + a_Hc cos(h_gHc, w_o)
                           + a_L cos(h_o, w_o) (+ a_B,o cos(l_o, w_o), ours)] + bias_o
    with s CLIP's logit scale and l_o the kernel's local feature before the graph. gamma = 1,
    a_* = 0, bias = 0 and the identity GCN at start, and the prompts are CLIP's class embeddings:
    the untrained model scores exactly like CLIP zero-shot. Outputs logits over all O categories (classes first).
    """

    def __init__(self, cfg: BACGCNConfig, prompts: torch.Tensor, num_classes: int,
                 adjacency: torch.Tensor | None, logit_scale: float):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_categories = prompts.shape[0]
        self.kernel = SimilarityKernel(prompts, cfg.topk, cfg.temperature)
        dim = prompts.shape[1]
        self.gcn = CLIPGCN(adjacency, dim, cfg.gcn_layers, cfg.gcn_activation) \
            if cfg.use_gcn and adjacency is not None else None
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.log_gamma = nn.Parameter(torch.zeros(()))
        self.branch = nn.Parameter(torch.zeros(3))            # a_H, a_Hc, a_L
        self.bias = nn.Parameter(torch.zeros(self.num_categories))
        # Ours (cfg.local_bypass): the kernel's local logits around the graph, per category, from zero.
        self.bypass = nn.Parameter(torch.zeros(self.num_categories)) if cfg.local_bypass else None
        self.readout = None
        if cfg.linear_readout:
            self.readout = nn.Linear(2 * dim, self.num_categories)
            nn.init.zeros_(self.readout.weight)
            nn.init.zeros_(self.readout.bias)

    def forward(self, feats: dict[str, torch.Tensor], with_indices: bool = False) -> dict[str, torch.Tensor]:
        """{"logits" [B, O], "sim" [B, N, O]}, and "pooled" [B, O, K] with `with_indices`."""
        patches = feats["patches"]
        local, sim, *pooled = self.kernel(patches, with_indices)
        globals_ = torch.stack([feats["g"], feats["gH"], feats["gHc"]], dim=1).to(local.dtype)
        nodes = torch.cat([local, globals_], dim=1)
        if self.gcn is not None:
            nodes = self.gcn(nodes)
        o = self.num_categories
        w = F.normalize(self.kernel.prompts, dim=-1).to(nodes.dtype)
        h = F.normalize(nodes.float(), dim=-1).to(nodes.dtype)
        cos_local = (h[:, :o] * w).sum(-1)                      # [B, O]
        cos_global = h[:, o:] @ w.t()                           # [B, 3, O]
        score = cos_global[:, 0] + self.branch[0] * cos_global[:, 1] + self.branch[1] * cos_global[:, 2]
        if self.cfg.use_local:
            score = score + self.branch[2] * cos_local
        if self.bypass is not None:
            cos_before = (F.normalize(local.float(), dim=-1).to(w.dtype) * w).sum(-1)
            score = score + self.bypass * cos_before
        logits = self.log_gamma.exp() * self.logit_scale * score.float() + self.bias
        if self.readout is not None:
            x = torch.cat([feats["g"], patches.amax(1)], -1).float()
            logits = logits + self.readout(F.layer_norm(x, x.shape[-1:]))     # inputs at unit scale
        return {"logits": logits, "sim": sim, **({"pooled": pooled[0]} if pooled else {})}


def build_model(cfg, prompts: torch.Tensor, num_classes: int, m, n, logit_scale: float) -> BACGCN:
    """BAC-GCN over the caption graph (co-occurrence counts M, N) and the given prompts."""
    adjacency = build_adjacency(torch.as_tensor(m).float(), torch.as_tensor(n).float(), num_classes, cfg)
    return BACGCN(cfg, prompts, num_classes, adjacency, logit_scale)
