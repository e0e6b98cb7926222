"""Ours beyond the paper, each rule against a hand-computed case: the missing-label losses
(losses.py), the local bypass around the graph (bacgcn.py), and ReSO's proposals beyond the
captions with their verification and evidence (reso.py). CPU, small tensors, seconds."""
import math

import pytest
import torch

import bacgcn
import cache
import config
import losses
import reso
import train
from pipeline import Split

LN2 = math.log(2.0)


def _cfg(**kw) -> config.BACGCNConfig:
    return config.BACGCNConfig(**kw)


# --------------------------------------------------------------------------------------------
# losses.py
# --------------------------------------------------------------------------------------------

def test_focal_margin_hill_and_splc_by_hand():
    # x = 1, margin 1: p_m = 1/2, (1 - 1/2)^2 * ln 2
    assert losses.focal_margin_positive(torch.tensor(1.0)).item() == pytest.approx(0.25 * LN2)
    # x = 0: p = 1/2, Hill (1.5 - 0.5) * 0.25
    assert losses.hill_negative(torch.tensor(0.0)).item() == pytest.approx(0.25)
    # p = 1/2 <= tau 0.6: a negative, 0.5^2 * ln 2
    assert losses.splc_negative(torch.tensor(0.0), 0.6).item() == pytest.approx(0.25 * LN2)
    # x = ln 4 (p = 0.8 > 0.6): taken as a missing positive, p_m = sigmoid(ln 4 - 1) = 4 / (4 + e)
    e = math.e
    expected = (e / (4 + e)) ** 2 * math.log((4 + e) / 4)
    assert losses.splc_negative(torch.tensor(math.log(4.0)), 0.6).item() == pytest.approx(expected)


def test_soft_targets_mix_the_two_parts():
    logits, targets = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 1.0]])
    hill = losses.elementwise(logits, targets, _cfg(loss="hill"))
    # entry 0: 0.5 * focal margin at x = 0 (p_m = sigmoid(-1)) + 0.5 * Hill at p = 1/2
    p_m = 1 / (1 + math.e)
    assert hill[0, 0].item() == pytest.approx(0.5 * (1 - p_m) ** 2 * -math.log(p_m) + 0.5 * 0.25)
    assert hill[0, 1].item() == pytest.approx(0.25 * LN2)
    bce = losses.elementwise(logits, targets, _cfg(loss="bce"))
    assert bce[0, 0].item() == pytest.approx(LN2)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_large_loss_rejects_or_corrects_the_largest_unmentioned_losses():
    logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, -2.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    # unmentioned (target <= 0.05): (0,1) loss softplus(2), (0,2) softplus(-1), (1,0) softplus(3),
    # (1,1) softplus(-2); rate 0.5 of 4 -> the 2 largest: (1,0) and (0,1)
    loss, mask = losses.large_loss(logits, targets, _cfg(large_loss="reject"), 0.5)
    assert mask.tolist() == [[1, 0, 1], [0, 1, 1]]
    assert loss[1, 0].item() == pytest.approx(_softplus(3.0))
    loss, mask = losses.large_loss(logits, targets, _cfg(large_loss="correct"), 0.5)
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert loss[0, 1].item() == pytest.approx(_softplus(-2.0))      # trained as a positive now
    assert loss[1, 0].item() == pytest.approx(_softplus(-3.0))
    assert loss[0, 2].item() == pytest.approx(_softplus(-1.0))      # kept as a negative
    # rate 0.3 of 4 -> floor(1.2) = 1: only (1,0)
    _, mask = losses.large_loss(logits, targets, _cfg(large_loss="reject"), 0.3)
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    _, mask = losses.large_loss(logits, targets, _cfg(large_loss="none"), 0.5)
    assert bool((mask == 1).all())


def test_large_loss_schedule_and_the_mean_over_kept_entries():
    cfg = _cfg(large_loss="reject", large_loss_delta=0.002)
    assert losses.large_loss_rate(cfg, 0) == 0.0
    assert losses.large_loss_rate(cfg, 10) == pytest.approx(0.02)
    logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, -2.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    got = train.multilabel_loss(logits, targets, cfg, missing_rate=0.5).item()
    kept = [LN2, _softplus(-1.0), _softplus(-2.0), LN2]     # (0,0), (0,2), (1,1), (1,2): bce at x = 0, t = 0.5
    assert got == pytest.approx(sum(kept) / 4)


# --------------------------------------------------------------------------------------------
# bacgcn.py: the local bypass
# --------------------------------------------------------------------------------------------

def test_local_bypass_starts_at_zero_and_adds_the_kernels_own_cosine():
    torch.manual_seed(0)
    o, e, n = 4, 8, 9
    cfg = _cfg(local_bypass=True, topk=2)
    m, count = torch.eye(o) * 5, torch.full((o,), 5.0)
    prompts = torch.randn(o, e)
    with_bypass = bacgcn.build_model(cfg, prompts, 3, m, count, logit_scale=10.0)
    without = bacgcn.build_model(cfg.replace(local_bypass=False), prompts, 3, m, count, logit_scale=10.0)
    feats = {k: torch.randn(2, e) for k in ("g", "gH", "gHc")}
    feats["patches"] = torch.nn.functional.normalize(torch.randn(2, n, e), dim=-1)
    start = with_bypass(feats)["logits"]
    assert torch.allclose(start, without(feats)["logits"])        # untrained: still CLIP zero-shot
    with torch.no_grad():
        with_bypass.bypass[1] = 0.5
    local = with_bypass.kernel(feats["patches"])[0]
    w = torch.nn.functional.normalize(prompts, dim=-1)
    cos = (torch.nn.functional.normalize(local, dim=-1) * w).sum(-1)   # [2, O]
    delta = with_bypass(feats)["logits"] - start
    assert torch.allclose(delta[:, 1], 10.0 * 0.5 * cos[:, 1], atol=1e-5)
    assert torch.allclose(delta[:, [0, 2, 3]], torch.zeros(2, 3), atol=1e-6)


# --------------------------------------------------------------------------------------------
# reso.py: proposals beyond the captions, verification, evidence
# --------------------------------------------------------------------------------------------

class _MapsAreThePatches(torch.nn.Module):
    """A head whose similarity maps are its input patches (channel c = class c): the test plants
    the maps it wants the proposal rule to read."""

    def forward(self, x):
        return {"sim": x["patches"]}


def _split(maps: torch.Tensor) -> Split:
    n = len(maps)
    tensors = {"patches": maps, **{k: torch.zeros(n, 1) for k in ("g", "gH", "gHc")}}
    feats = cache.CachedFeatures([str(i) for i in range(n)], [], tensors)
    feats.row_shapes = {k: tuple(v.shape[1:]) for k, v in tensors.items()}
    return Split([str(i) for i in range(n)], feats, None)


def test_proposals_find_a_planted_small_object_the_captions_do_not_name():
    grid, classes, images = 8, 3, 10
    gen = torch.Generator().manual_seed(1)
    maps = 0.05 * torch.rand(images, grid * grid, classes, generator=gen)     # noise everywhere
    maps[0, :, 2].view(grid, grid)[3:5, 3:5] = 1.0        # image 0: a small object of class 2 (4 of 64 patches)
    hard = torch.zeros(images, classes, dtype=torch.bool)
    hard[:, 0] = True                                     # the captions name class 0 only, everywhere
    cfg = _cfg(reso_propose=True, reso_propose_quantile=0.5, reso_floor_quantile=0.99, reso_tau=0.5,
               reso_eps=0.1, reso_propose_max=1)
    found, proposals = reso.find_small_regions(cfg, _MapsAreThePatches(), _split(maps), hard, classes, "cpu",
                                               torch.float32)
    assert (0, 2, (3, 3, 4, 4)) in proposals               # the planted object, box of its 2 x 2 patches
    assert all(c != 0 for _, c, _ in proposals)            # named classes are ReSO's own, not proposals
    # image 0's noise maps of class 1 may peak above a median floor, never above the planted one:
    assert [p for p in proposals if p[0] == 0][0][1] == 2
    # without proposals: nothing beyond the captions
    _, none = reso.find_small_regions(cfg.replace(reso_propose=False), _MapsAreThePatches(), _split(maps), hard,
                                      classes, "cpu", torch.float32)
    assert none == []


def test_proposals_do_not_fire_without_a_small_object():
    grid, classes = 8, 3
    maps = torch.zeros(6, grid * grid, classes)
    maps[:, :, 1] = torch.linspace(0, 1, grid * grid)       # a smooth ramp: the top is a wide band, not small
    hard = torch.zeros(6, classes, dtype=torch.bool)
    cfg = _cfg(reso_propose=True, reso_propose_quantile=0.0, reso_tau=0.5, reso_eps=0.1)
    _, proposals = reso.find_small_regions(cfg, _MapsAreThePatches(), _split(maps), hard, classes, "cpu",
                                           torch.float32)
    assert proposals == []                                   # flat maps have no region; the ramp's is half the image


def test_verification_keeps_the_crops_clip_names_first_most_probable_first():
    box = (0, 0, 1, 1)
    proposals = [(0, 2, box), (0, 1, box), (0, 0, box), (1, 0, box), (1, 1, box)]
    probs = torch.tensor([[0.1, 0.2, 0.7],     # class 2 first at 0.7: kept
                          [0.3, 0.6, 0.1],     # class 1 first at 0.6: kept
                          [0.9, 0.05, 0.05],   # class 0 first at 0.9: kept, but image 0 holds 2 at most
                          [0.4, 0.3, 0.3],     # first, below 0.5: dropped
                          [0.6, 0.35, 0.05]])  # class 1 is not first: dropped
    kept = reso.verified_crops(probs, proposals, _cfg(reso_verify_min=0.5, reso_propose_max=2))
    assert kept == [(0, 0, box, pytest.approx(0.9)), (0, 2, box, pytest.approx(0.7))]


def test_evidence_raises_the_image_target_and_paper_crops_carry_none():
    targets = torch.tensor([[0.0, 0.9], [0.2, 0.0]])
    reso.add_evidence(targets, [(0, 0, (0, 0, 0, 0), 0.8), (0, 1, (0, 0, 0, 0), 0.5), (1, 1, (0, 0, 0, 0))],
                      _cfg(reso_evidence=0.5))
    # max(0, 0.5 * 0.8); 0.9 stays; a paper crop (no probability): none
    assert torch.allclose(targets, torch.tensor([[0.4, 0.9], [0.2, 0.0]]))


def test_hill_and_splc_are_bce_before_their_epoch():
    logits, targets = torch.tensor([[0.0]]), torch.tensor([[0.0]])
    cfg = _cfg(loss="hill", robust_loss_epoch=2)
    assert losses.elementwise(logits, targets, cfg, epoch=1).item() == pytest.approx(LN2)    # BCE at x = 0
    assert losses.elementwise(logits, targets, cfg, epoch=2).item() == pytest.approx(0.25)   # Hill at p = 1/2
    assert losses.elementwise(logits, targets, cfg).item() == pytest.approx(0.25)            # no epoch: the loss


def test_verification_over_backgrounds_refuses_a_crop_a_background_wins():
    box = (0, 0, 1, 1)
    # classes 0, 1, then one background: over the classes alone class 1 would win at 0.8 / 0.9
    probs = torch.tensor([[0.05, 0.40, 0.55],      # the background is first: refused
                          [0.10, 0.60, 0.30]])     # class 1 first, above the background: kept
    kept = reso.verified_crops(probs, [(0, 1, box), (1, 1, box)], _cfg(reso_verify_min=0.4))
    assert kept == [(1, 1, box, pytest.approx(0.6))]
