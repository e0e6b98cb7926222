"""Defects of the training method, each with the measurement that shows it."""
import json

import pytest
import torch

import bacgcn
import config
import train
from tests.conftest import world_fixture

world = world_fixture(seed=6, train=160, test=40)


def _run(world, tmp_path, *more):
    out = tmp_path / "run"
    assert train.main([f"--data-root={world}", f"--cache-dir={tmp_path / 'cache'}", f"--out={out}", "--workers=0",
                       "--epochs=4", "--reso-epoch=2", "--reso-eps=0.5", "--batch-size=16", "--log-every=1",
                       *more]) == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_schedule_covers_the_crop_steps(world, tmp_path):
    """With ReSO's crop batches the steps outnumber the image batches: the cosine must still end
    on the last step, not reach 0 early and train the last epochs at learning rate 0."""
    lines = _run(world, tmp_path)
    steps = [x for x in lines if "lr" in x]
    assert any(x.get("crops") for x in lines), "no crop batch: nothing was tested"
    assert len(steps) > 4 * 10                         # more steps than the 4 x 10 image batches
    assert all(x["lr"] > 0 for x in steps)
    lrs = [x["lr"] for x in steps]
    assert lrs[-1] < 0.05 * max(lrs)                   # and it does reach the end of the cosine


def test_reso_logs_crop_precision_and_floors_noise(world, tmp_path, capsys):
    lines = _run(world, tmp_path, "--reso-floor-quantile=0.9")
    log = capsys.readouterr().out
    assert "peak above their class's noise floor" in log and "crop precision" in log
    found = [x for x in lines if "reso_crop_precision" in x]
    assert len(found) == 1 and 0 <= found[0]["reso_crop_precision"] <= 100


def test_relu_is_refused_because_it_never_trains():
    """relu'(0) = 0: from the zero-initialised GCN no gradient reaches its weights."""
    gcn_input = torch.randn(4, 6, 8)
    adjacency = torch.full((6, 6), 1 / 6)
    grads = {}
    for activation in ("relu", "leaky_relu", "gelu"):
        layer = bacgcn.CLIPGCN(adjacency, 8, 2, activation)
        layer(gcn_input).pow(2).sum().backward()
        grads[activation] = sum(float(w.grad.abs().sum()) for w in layer.weights)
    assert grads["relu"] == 0 and grads["leaky_relu"] > 0 and grads["gelu"] > 0
    with pytest.raises(ValueError, match="relu cannot train the zero-initialised GCN"):
        config.parse_overrides(["--gcn-activation=relu"])


def test_graph_direction_is_a_transpose():
    m = torch.tensor([[10.0, 9.0, 1.0], [9.0, 30.0, 0.0], [1.0, 0.0, 5.0]])
    n = m.diagonal()
    cfg = config.BACGCNConfig(tau_a=0.5)
    row = bacgcn.build_adjacency(m, n, 3, cfg)[:3, :3]
    col = bacgcn.build_adjacency(m, n, 3, cfg.replace(graph_direction="mlgcn"))[:3, :3]
    # P(1|0) = 0.9 >= 0.5 but P(0|1) = 0.3: node 0 aggregates from node 1 in "row", node 1 from 0 in "mlgcn"
    assert row[0, 1] > 0 and row[1, 0] == 0 and col[1, 0] > 0 and col[0, 1] == 0
