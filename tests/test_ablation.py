"""The ablation's floor and ceiling: the oracle's labels, the linear probe, the validation split."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cache
import config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import ablation  # noqa: E402

import pipeline
import registry
from tests.conftest import world_fixture

world = world_fixture(seed=8, train=60, test=20)


def _cfg(world, **kw):
    cfg, _ = config.parse_overrides(["--preset=synthetic-tiny", f"--data-root={world}"])
    return pipeline.resolve_paths(cfg).replace(**kw)


def test_rows_are_the_issue_rows():
    beyond = tuple(name for name, _ in ablation.BEYOND_STEPS + ablation.LOST)
    assert ablation.ROW_NAMES == ("zero-shot", "trained global", "+ local", "+ GCN", "+ backgrounds", "+ ReSO",
                                  *beyond, "linear probe", "linear probe (true labels)", "oracle")
    # beyond the paper: each row adds one switch of config.BEYOND_THE_PAPER to the row above, and the
    # paper's presets leave them all off (the paper's method stays one flag away)
    previous = ablation.STEPS[-1][1]
    for (_, switches), key in zip(ablation.BEYOND_STEPS, config.BEYOND_THE_PAPER):
        assert {k for k in switches if switches[k] != previous.get(k, getattr(config.BACGCNConfig, k))} == {key}
        previous = switches
    for name, values in config.PRESETS.items():
        on = {k for k, v in config.BEYOND_THE_PAPER.items() if values.get(k, getattr(config.BACGCNConfig, k)) == v}
        assert on == (set(config.BEYOND_THE_PAPER) if name.endswith("-beyond") else set()), name
    switches = [s for _, s in ablation.STEPS]
    # each step turns exactly one component on, in order; the oracle differs from the full method in labels only
    order = ["use_local", "use_gcn", "use_backgrounds", "use_reso"]
    for k, (before, after) in enumerate(zip(switches, switches[1:])):
        assert {f for f in order if before[f] != after[f]} == {order[k]}
    assert {k for k in ablation.ORACLE if ablation.ORACLE[k] != switches[-1][k]} == {"train_labels"}


def test_oracle_trains_on_the_true_class_labels(world):
    train_ds = registry.load("synthetic", world, "trainval")
    captions = pipeline.caption_labels(_cfg(world), train_ds)
    oracle = pipeline.caption_labels(_cfg(world, train_labels="true"), train_ds)
    c = len(train_ds.class_names)
    soft, hard = oracle.targets_for(train_ds.ids, 1)
    truth = torch.from_numpy(train_ds.label_matrix() == 1)
    assert torch.equal(soft[:, :c] > 0.5, truth) and torch.equal(hard[:, :c], truth)
    assert set(soft[:, :c].unique().tolist()) <= {0.0, 1.0}
    # background categories have no human labels: they keep what the captions say
    cap_soft, cap_hard = captions.targets_for(train_ds.ids, 1)
    assert soft.shape[1] > c and torch.equal(soft[:, c:], cap_soft[:, c:]) and torch.equal(hard[:, c:], cap_hard[:, c:])
    assert not torch.equal(cap_hard[:, :c], truth)          # the captions miss some objects: the oracle differs
    with pytest.raises(ValueError, match="--train-labels must be one of captions, true"):
        config.parse_overrides(["--train-labels=human"])


def test_validation_split_is_a_fixed_fifth_of_trainval(world):
    fit, val = ablation.carve_validation(world, 0)
    fit_ids = registry.load("synthetic", world, fit).ids
    val_ids = registry.load("synthetic", world, val).ids
    trainval = registry.load("synthetic", world, "trainval").ids
    assert not set(fit_ids) & set(val_ids) and sorted(fit_ids + val_ids) == sorted(trainval)
    assert len(val_ids) == round(len(trainval) * ablation.VALIDATION_SHARE)
    assert ablation.carve_validation(world, 0) == (fit, val)
    assert registry.load("synthetic", world, val).ids == val_ids          # written once, read back the same


def test_linear_probe_reads_g_and_max_pooled_patches():
    gen = torch.Generator().manual_seed(0)
    n, p, e, c = 300, 9, 8, 3
    labels = torch.rand(n, c, generator=gen) < 0.4
    g = torch.randn(n, e, generator=gen) * 0.3
    patches = torch.randn(n, p, e, generator=gen) * 0.3
    g[:, :c] += labels.float()                               # classes 0..2 visible in g
    patches[torch.arange(n), 0, c:2 * c] += 2 * labels.float()   # and in one patch each
    feats = cache.CachedFeatures([str(i) for i in range(n)], [],
                                {"g": g.bfloat16(), "patches": patches.bfloat16()})
    feats.row_shapes = {"g": (e,), "patches": (p, e)}
    x = ablation.probe_inputs(feats, chunk=64)
    assert torch.equal(x, torch.cat([g.bfloat16().float(), patches.bfloat16().float().amax(1)], 1))
    logits = ablation.linear_probe(x[:200], labels[:200].float(), x[200:], ablation.ProbeConfig(epochs=60, batch=32))
    from metrics import mean_ap
    assert mean_ap(logits, np.where(labels[200:].numpy(), 1, -1)) > 95


def test_checks_measure_the_targets():
    names = ("zero-shot", "trained global", "+ local", "+ GCN", "+ backgrounds", "+ ReSO", "linear probe",
             "linear probe (true labels)", "oracle")
    maps = dict(zip(names, (70.0, 74.0, 75.0, 76.0, 75.9, 77.0, 76.0, 78.5, 80.0)))
    rows = {n: {"mAP": maps[n], "mAP_small": 40.0, "mAP_large": 90.0} for n in names}
    rows["+ ReSO"]["mAP_small"] = 44.0
    checks = ablation.checks(rows)
    assert checks["gap_closed"] == pytest.approx(0.7)
    assert checks["oracle_above_zero_shot"] == pytest.approx(10.0)
    assert checks["worst_step_from_local"] == pytest.approx(-0.1)
    assert checks["reso_small_gain"] == pytest.approx(4.0)
    assert checks["full_minus_linear_probe"] == pytest.approx(1.0)
    assert checks["labels_room"] == pytest.approx(2.5)
    assert "new_minus_linear_probe" not in checks            # no row of the new method: the paper's checks only
    rows[ablation.NEW_METHOD] = {"mAP": 78.5, "mAP_small": 46.0, "mAP_large": 89.8}
    checks = ablation.checks(rows)
    assert checks["new_minus_linear_probe"] == pytest.approx(2.5)
    assert checks["new_small_over_backgrounds"] == pytest.approx(6.0)
    assert checks["new_large_minus_paper"] == pytest.approx(-0.2)
    assert checks["new_gap_closed"] == pytest.approx(0.85)


def test_probe_rows_fit_pseudo_and_true_labels(world):
    cfg = _cfg(world, epochs=1, workers=0, device="cpu", cache_dir=str(world / "cache"))
    rows = ablation.probe_rows(cfg, ablation.ProbeConfig(epochs=2))
    assert set(rows) == {"linear probe", "linear probe (true labels)"}
    assert rows["linear probe"]["mAP"] != rows["linear probe (true labels)"]["mAP"]   # different targets
