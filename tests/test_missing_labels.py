"""Ours beyond the paper, each rule against a hand-computed case: the missing-label losses
(losses.py), the local bypass around the graph (bacgcn.py), and ReSO's proposals beyond the
captions with their verification and evidence (reso.py). CPU, small tensors, seconds."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import bacgcn
import cache
import config
import losses
import metrics
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


def test_close_ups_only_drop_proposals_whose_crop_is_most_of_the_image():
    assert reso.crop_side((0, 0, 0, 2), 0.5) == 6.0                  # 3 patches wide, grown by half on each side
    grid, classes = 8, 3
    maps = torch.zeros(4, grid * grid, classes)
    maps[:, :, 0] = 0.5                                        # class 0: named by the captions
    maps[0, :, 2].view(grid, grid)[0, 0] = maps[0, :, 2].view(grid, grid)[7, 7] = 1.0   # two far corners
    maps[1, :, 2].view(grid, grid)[3, 3] = 1.0                 # one patch: a 3 x 3 crop
    hard = torch.zeros(4, classes, dtype=torch.bool)
    hard[:, 0] = True
    cfg = _cfg(reso_propose=True, reso_propose_quantile=0.0, reso_tau=0.5, reso_eps=0.1)

    def proposed(**kw):
        return [p[:2] for p in reso.find_small_regions(cfg.replace(**kw), _MapsAreThePatches(), _split(maps), hard,
                                                        classes, "cpu", torch.float32)[1]]
    assert proposed() == [(0, 2), (1, 2)]                      # image 0's box: the whole 8 x 8 grid
    assert proposed(reso_propose_side=0.5) == [(1, 2)]         # its crop (8 x 2 = 16 > 4 patches): dropped
    assert proposed(reso_propose_side=0.5, reso_propose_peak=True) == [(0, 2), (1, 2)]   # around the peak: 1 patch


def test_proposals_do_not_fire_without_a_small_object():
    grid, classes = 8, 3
    maps = torch.zeros(6, grid * grid, classes)
    maps[:, :, 1] = torch.linspace(0, 1, grid * grid)       # a smooth ramp: the top is a wide band, not small
    hard = torch.zeros(6, classes, dtype=torch.bool)
    cfg = _cfg(reso_propose=True, reso_propose_quantile=0.0, reso_tau=0.5, reso_eps=0.1)
    _, proposals = reso.find_small_regions(cfg, _MapsAreThePatches(), _split(maps), hard, classes, "cpu",
                                           torch.float32)
    assert proposals == []                                   # flat maps have no region; the ramp's is half the image


def test_peak_components_keep_the_part_of_the_region_around_the_peak():
    grid = 6
    maps = torch.zeros(1, grid * grid, 2)
    plane = maps[0, :, 0].view(grid, grid)
    plane[0:2, 0:2] = 0.9                  # a weaker blob in one corner
    plane[4, 4] = plane[5, 5] = 0.8        # a diagonal pair (8-neighbours) ...
    plane[3, 3] = 1.0                      # ... touching the peak diagonally
    maps[0, :, 1] = torch.linspace(0, 1, grid * grid)      # a ramp: one band connected to its top
    region = reso.region_masks(maps, 0.5)
    around = reso.peak_components(region, maps, grid)
    assert around[0, :, 0].view(grid, grid).nonzero().tolist() == [[3, 3], [4, 4], [5, 5]]
    assert torch.equal(around[0, :, 1], region[0, :, 1])    # all of it connected: unchanged
    # the paper's box of class 0 spans the corners; the peak's is its own 3 x 3
    assert reso.box_of_cells(region[0, :, 0].nonzero()[:, 0], grid) == (0, 0, 5, 5)
    assert reso.box_of_cells(around[0, :, 0].nonzero()[:, 0], grid) == (3, 3, 5, 5)


@pytest.mark.parametrize("grid", [1, 5, 7, 16, 28, 63])
def test_peak_components_equal_the_pooling_reference(grid):
    gen = torch.Generator().manual_seed(grid)
    noise = torch.randn(6, grid * grid, 5, generator=gen)
    ramp = torch.linspace(0, 1, grid)
    smooth = (ramp[:, None] * ramp[None, :]).reshape(1, grid * grid, 1) + 0.05 * noise
    flat = torch.zeros(2, grid * grid, 3)
    for maps in (noise, smooth, flat):
        for tau in (0.3, 0.6, 0.9):
            region = reso.region_masks(maps, tau)
            assert torch.equal(reso.peak_components(region, maps, grid), reso.peak_components_ref(region, maps, grid))


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


# --------------------------------------------------------------------------------------------
# The proposal rule in a tiny world: the shipped tiny CLIP reads rendered scenes
# --------------------------------------------------------------------------------------------

def _tiny_world(folder, scenes):
    """A dataset of the rendered `scenes`, as JPEGs the frozen tiny CLIP reads."""
    import data
    import synthetic

    folder.mkdir()
    samples = []
    for k, scene in enumerate(scenes):
        path = folder / f"{k:03d}.jpg"
        Image.fromarray(scene.image).save(path, quality=92, subsampling=0)     # as synthetic.py stores its worlds
        labels = [1 if c in scene.classes else -1 for c in range(len(synthetic.CLASS_NAMES))]
        samples.append(data.Sample(f"{k:03d}", path, np.array(labels, dtype=np.int8)))
    return data.MultiLabelImages(samples, synthetic.CLASS_NAMES, name="tiny-world")


def test_proposal_rule_finds_a_planted_small_object_in_a_tiny_world(tmp_path):
    """The rule of the *-beyond presets end to end on rendered scenes, read by the shipped tiny CLIP
    through an untrained head (its maps are CLIP's own): 24 images hold one small object (2 % of
    the image, the small bucket's edge) on a background, which no caption names; 24 hold the
    background alone. Proposals (where a class's map peaks) are verified on the crop by the frozen
    CLIP. Planted objects are found, of their class, in a tight crop over each; nothing is verified
    on an image without one. Two rules make that so, each measured here: around the peak
    (`reso_propose_peak`) the crop is tight, where the paper's region of the same map spans the
    image; close-ups only (`reso_propose_side`): without it a near-whole-image crop of sky passed
    as an aeroplane on 1-2 of the 24 empty images. The tiny CLIP's maps point at a 2 % object in a
    few cases only, and half of what it verifies on planted images is named wrong (the README's
    measurements): the bounds asked here held at JPEG qualities 75-95 of the same scenes (2-3
    found, none on an empty image)."""
    import frozen_clip
    import pipeline
    import synthetic

    classes, planted_images = len(synthetic.CLASS_NAMES), 24
    rng = np.random.default_rng(7)
    world, planted, scenes = synthetic.WorldConfig(), {}, []
    for k in range(2 * planted_images):
        if k < planted_images:
            scene = synthetic.render_scene(rng, world, 1, classes=[k * 5 % classes], areas=[metrics.SMALL_AREA])
            planted[k] = scene.objects[0]
        else:
            scene = synthetic.render_scene(rng, world, 0, classes=[], areas=[])
        scenes.append(scene)
    cfg, _ = config.parse_overrides(["--preset=synthetic-tiny-beyond", f"--cache-dir={tmp_path / 'cache'}"])
    cfg = cfg.replace(clip_weights=str(pipeline.here_or_in_repo(cfg.clip_weights)))
    backbone = pipeline.build_backbone(cfg, "cpu")
    text = backbone.class_embeddings(synthetic.CLASS_NAMES, frozen_clip.tokenizer_for(cfg.clip_model))
    split = pipeline.cached_features(cfg, backbone, _tiny_world(tmp_path / "images", scenes), "cpu")
    hard = torch.zeros(len(scenes), classes, dtype=torch.bool)          # the captions name no class
    m = torch.eye(classes)
    model = bacgcn.build_model(cfg.replace(use_backgrounds=False), text, classes, m, m.diagonal(),
                               float(backbone.clip.logit_scale.detach().exp()))
    _, proposals = reso.find_small_regions(cfg, model, split, hard, classes, "cpu", torch.float32)
    verified = reso.verify_proposals(cfg, backbone, split, proposals, text, "cpu")

    grid, size = int(round(math.sqrt(split.feats.row_shapes["patches"][0]))), synthetic.RENDER_SIZE
    image = [int(i) for i in split.ids]                                  # row -> scene

    def right(row, cls, box):
        obj = planted.get(image[row])
        x0, y0, x1, y1 = reso.crop_box(box, grid, size, size, cfg.reso_margin)
        return (obj is not None and obj.cls == cls and x1 - x0 <= size / 2          # a close-up of it
                and x0 <= obj.box[0] and y0 <= obj.box[1] and x1 >= obj.box[2] and y1 >= obj.box[3])
    found = [v[:3] for v in verified if right(*v[:3])]
    assert len(found) >= 2, (found, verified)
    assert not [v for v in verified if image[v[0]] >= planted_images]        # nothing on an empty image
    # the paper's region of the same map: scattered patches, whose box spans much of the image
    with torch.no_grad():
        inputs = pipeline.head_inputs(split.feats.gather(range(len(scenes))), torch.float32, cfg.cache_format)
        sim = model(inputs)["sim"]
    region = reso.region_masks(sim, cfg.reso_tau)
    spans = [max(r1 - r0, c1 - c0) + 1 for r0, c0, r1, c1 in
             (reso.box_of_cells(region[row, :, cls].nonzero()[:, 0], grid) for row, cls, _ in found)]
    assert max(spans) >= grid // 2, spans


# --------------------------------------------------------------------------------------------
# reso.py: the test-time small-object pass
# --------------------------------------------------------------------------------------------

def test_test_time_crops_take_the_highest_small_peaks():
    grid = 6
    sim = torch.zeros(2, grid * grid, 4)
    sim[0, :, 0].view(grid, grid)[1, 1] = 0.9          # small, highest peak
    sim[0, :, 1].view(grid, grid)[4, 4] = 0.5          # small, lower
    sim[0, :, 2].view(grid, grid)[:, :3] = 1.0         # highest peak of all, but half the image: not small
    sim[0, :, 3].view(grid, grid)[2, 4] = 0.7          # small, second
    sim[1, :, 1].view(grid, grid)[0, 0] = 0.3          # image 1: one small region; flat maps have none
    cfg = _cfg(test_crops=2, reso_tau=0.5, reso_eps=0.1)
    assert reso.peak_crops(sim, cfg) == [(0, 0, (1, 1, 1, 1)), (0, 3, (2, 4, 2, 4)), (1, 1, (0, 0, 0, 0))]
    assert reso.peak_crops(sim, cfg.replace(test_crops=1))[0] == (0, 0, (1, 1, 1, 1))


def test_a_test_time_crop_only_raises_its_class_by_the_weight_of_its_excess():
    logits = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]], dtype=np.float32)
    found = [(0, 1, None), (0, 0, None), (1, 2, None)]
    crop_logits = np.array([[0.0, 2.0, 9.0],     # class 1: 2 over -2 -> -2 + 0.5 * 4
                            [0.0, 0.0, 0.0],     # class 0: 0 under 1 -> unchanged
                            [0.0, 0.0, 5.0]])    # class 2: 5 over 3 -> 3 + 0.5 * 2
    fused = reso.fuse_crop_logits(logits, found, crop_logits, 0.5)
    np.testing.assert_allclose(fused, [[1.0, 0.0, 0.5], [0.0, 0.0, 4.0]])
    assert logits[0, 1] == -2.0                                   # a copy
    np.testing.assert_allclose(reso.fuse_crop_logits(logits, found, crop_logits, 0.0), logits)
