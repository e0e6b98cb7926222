"""The feature cache at scale: streamed reads equal in-memory ones, resident memory stays
bounded, a damaged cache is named and rebuilt, a changed image is encoded again."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cache as cache_mod
import config
import data
import pipeline
import registry
import train
from tests.conftest import world_fixture

ROOT = Path(__file__).resolve().parent.parent


class _Rows(torch.utils.data.Dataset):
    """Item k is a 1x1 'image' whose value is k; the encoder below turns it into rows that
    say which image they came from."""

    def __init__(self, n: int):
        self.n, self.name = n, "rows"

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        return {"image": torch.full((3, 1, 1), k % 256, dtype=torch.uint8), "labels": torch.zeros(0), "id": f"i{k}",
                "index": k}


def _encode(x):
    b = x.shape[0]
    v = x[:, 0, 0, 0].float()
    return {"patches": v[:, None, None] + torch.arange(6.0).view(1, 3, 2) / 8, "g": v[:, None].expand(b, 4) / 4}


@pytest.fixture
def sharded(tmp_path):
    cache = cache_mod.FeatureCache(tmp_path, {"toy": 1}, shard_rows=7)     # batches of 3: 9 rows a shard, 6 shards
    cache.build(_Rows(50), _encode, batch_size=3)
    return cache


def test_streamed_rows_equal_in_memory_rows(sharded):
    streamed = sharded.open(memory_budget_bytes=0)
    held = sharded.open()
    assert streamed.tensors is None and held.tensors is not None and len(streamed) == 50
    assert len(list(sharded.dir.glob("*.safetensors"))) == 6
    for rows in ([0], [49, 0, 7, 6, 8, 8, 21], list(range(50)), list(range(5, 30)), [13, 14, 15, 3, 4]):
        a, b = streamed.gather(rows), held.gather(torch.tensor(rows))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(a["g"][:, 0].float(), torch.tensor(rows, dtype=torch.float32).remainder(256) / 4)
    with pytest.raises(IndexError):
        streamed.gather([50])


def _flip_low_bits(shard: Path, at_end: int = 3) -> None:
    """XOR a bit of a bf16 mantissa near the end of the data: the value changes, stays finite."""
    raw = bytearray(shard.read_bytes())
    raw[-at_end] ^= 0x01
    shard.write_bytes(bytes(raw))


def test_damaged_cache_is_named(sharded, tmp_path):
    assert sharded.problem() is None
    shards = sorted(sharded.dir.glob("*.safetensors"))
    whole = {p: p.read_bytes() for p in shards}

    def restored():
        for p, b in whole.items():
            p.write_bytes(b)
        return sharded.problem() is None

    _flip_low_bits(shards[2])                       # a value changed, still finite: nothing else tells
    assert torch.isfinite(sharded.open().gather(range(50))["g"].float()).all()
    assert shards[2].name in sharded.problem() and "sha256 differs" in sharded.problem()
    assert restored()
    other = cache_mod.FeatureCache(tmp_path / "other", {"toy": 2}, shard_rows=7)   # same shapes, another key
    other.build(_Rows(50), _encode, batch_size=3)
    shards[2].write_bytes(sorted(other.dir.glob("*.safetensors"))[2].read_bytes())
    assert shards[2].name in sharded.problem() and "belongs to another cache" in sharded.problem()
    assert restored()
    shards[0].write_bytes(whole[shards[1]])          # same key, same row count: another slot's images
    assert shards[0].name in sharded.problem() and "other images" in sharded.problem()
    assert [n for n, _ in sharded.failing_shards()] == [shards[0].name]
    assert restored()
    shards[3].write_bytes(whole[shards[3]][:-10])
    assert "truncated" in sharded.problem() and shards[3].name in sharded.problem()
    shards[3].unlink()
    assert "missing" in sharded.problem() and shards[3].name in sharded.problem()
    assert restored()
    meta = json.loads((sharded.dir / "meta.json").read_text())
    (sharded.dir / "meta.json").write_text(json.dumps({**meta, **{k: meta[k][:3] + meta[k][4:]
                                                                  for k in ("shards", "rows", "digests")}}))
    assert "lists 50 ids and 41 rows" in sharded.problem()
    (sharded.dir / "meta.json").write_text(json.dumps({**meta, "shards": ["../../x.safetensors", *meta["shards"][1:]]}))
    assert "names a shard '../../x.safetensors' that is not a shard file of this folder" in sharded.problem()
    (sharded.dir / "meta.json").write_text(json.dumps({**meta, "ids": [1, *meta["ids"][1:]]}))
    assert "lacks its ids, shards, rows or digests" in sharded.problem()
    (sharded.dir / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "digests"}))
    assert "lacks its ids, shards, rows or digests" in sharded.problem()
    (sharded.dir / "meta.json").write_text("{not json")
    assert "not valid JSON" in sharded.problem()


def test_failing_shards_are_encoded_again_alone(sharded):
    held = sharded.open().gather(range(50))
    shards = sorted(sharded.dir.glob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    _flip_low_bits(shards[1])
    shards[4].unlink()
    failing = [n for n, _ in sharded.failing_shards()]
    assert failing == [shards[1].name, shards[4].name]
    rows = _Rows(50)
    rows.ids = [f"i{k}" for k in range(50)]
    assert sharded.rebuild_shards(rows, _encode, failing, batch_size=3)
    assert sharded.problem() is None
    again = sharded.open().gather(range(50))
    assert all(torch.equal(held[k], again[k]) for k in held)
    assert [p for p in shards if p.stat().st_mtime_ns != before[p]] == [shards[1], shards[4]]
    outside = shards[0].parent.parent / "outside.bin"          # a shard that is a link: named, and replaced
    outside.write_bytes(b"not yours")                           # by a file, never written through
    shards[2].unlink()
    shards[2].symlink_to(outside)
    os.mkfifo(shards[3].with_suffix(".tmp"))
    shards[3].unlink()
    shards[3].with_suffix(".tmp").rename(shards[3])            # a FIFO would block a reader forever
    failing = sharded.failing_shards()
    assert [n for n, _ in failing] == [shards[2].name, shards[3].name]
    assert all("not a regular file" in why for _, why in failing)
    assert sharded.rebuild_shards(rows, _encode, [n for n, _ in failing], batch_size=3)
    assert sharded.problem() is None and outside.read_bytes() == b"not yours" and not shards[2].is_symlink()
    rows.ids = rows.ids[:-1] + ["elsewhere"]                    # an image of the last shard is gone
    _flip_low_bits(shards[5])
    assert not sharded.rebuild_shards(rows, _encode, [shards[5].name], batch_size=3)


small_world = world_fixture(seed=3, train=60, test=30)


def _cfg(world, tmp_path, **kw):
    cfg, _ = config.parse_overrides([f"--data-root={world}", f"--cache-dir={tmp_path / 'cache'}", "--workers=0"])
    return pipeline.resolve_paths(cfg).replace(**kw)


def test_damaged_cache_is_rebuilt_and_changed_images_reencoded(small_world, tmp_path, capsys, monkeypatch):
    cfg = _cfg(small_world, tmp_path)
    backbone = pipeline.build_backbone(cfg, "cpu")
    test = registry.load("synthetic", small_world, "test")
    first = pipeline.cached_features(cfg, backbone, test, "cpu").feats.gather(range(30))
    shard = next((tmp_path / "cache").glob("*/*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    again = pipeline.cached_features(cfg, backbone, test, "cpu").feats.gather(range(30))
    out = capsys.readouterr().out
    assert f"shard {shard}: truncated" in out and "encoding its images again" in out
    assert all(torch.equal(first[k], again[k]) for k in first)
    (shard.parent / "meta.json").write_text("{}")              # an index no shard explains: built again
    pipeline.cached_features(cfg, backbone, test, "cpu")
    assert "lacks its ids" in (out := capsys.readouterr().out) and "rebuilding it" in out, out
    _flip_low_bits(shard)
    with monkeypatch.context() as m:                           # a cache that may not be written is refused
        m.setattr(pipeline.os, "access", lambda *a, **k: False)
        with pytest.raises(data.DataError, match=f"{shard}: its bytes changed.*read only"):
            pipeline.cached_features(cfg, backbone, test, "cpu")
    pipeline.cached_features(cfg, backbone, test, "cpu")
    assert "every shard checked" not in capsys.readouterr().out
    pipeline.cached_features(cfg, backbone, test, "cpu")
    assert "every shard checked in" in capsys.readouterr().out
    # an image changed on disk is not read from the stale cache
    from PIL import Image
    path = test.samples[4].path
    Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(90).save(path, quality=70)
    changed = pipeline.cached_features(cfg, backbone, test, "cpu").feats.gather(range(30))
    assert "encoding 30 images" in capsys.readouterr().out
    assert not torch.equal(changed["patches"][4], first["patches"][4])
    assert torch.equal(changed["patches"][3], first["patches"][3])


def test_streamed_training_is_bitwise_the_in_memory_training(small_world, tmp_path):
    def run(name, budget):
        out = tmp_path / name
        assert train.main([f"--data-root={small_world}", f"--cache-dir={tmp_path / 'cache'}", "--workers=0",
                           "--epochs=3", "--reso-epoch=1", "--reso-eps=0.5", "--batch-size=16",
                           f"--cache-memory-gb={budget}", f"--out={out}"]) == 0
        return load_file(str(out / "ckpt.safetensors"))
    held, streamed = run("held", 8.0), run("streamed", 0.0)
    assert held.keys() == streamed.keys() and all(torch.equal(held[k], streamed[k]) for k in held)


def _scale_row(tmp_path, images: int) -> dict:
    out = tmp_path / f"row{images}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "cache_scale.py"), "--images", str(images), "--patches", "49",
           "--dim", "128", "--classes", "12", "--formats", "bf16", "--dir", str(tmp_path), "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the CPU path, not the interpreter
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    row = json.loads(out.read_text())
    assert list(row["formats"]) == ["bf16"] and {d["dataset"] for d in row["datasets"]} == {
        "voc2007", "voc2012", "coco2014", "nuswide"}
    return row["formats"]["bf16"]


def test_resident_memory_stays_bounded_by_the_budget(tmp_path):
    """Streamed with a zero budget, a cache four times larger leaves the peak resident memory
    where it was (what grows is a batch's working set, not the cache); held in memory, the
    peak grows with the cache, which shows the measurement can tell the two apart."""
    small, large = _scale_row(tmp_path, 6000), _scale_row(tmp_path, 24000)
    more = large["cache_bytes"] - small["cache_bytes"]
    assert more > 200e6

    def growth(row, mode):
        return row[mode]["peak_rss_bytes"] - row[mode]["baseline_rss_bytes"]
    assert not large["streamed"]["held"] and large["resident"]["held"]
    assert growth(large, "streamed") - growth(small, "streamed") < 0.15 * more
    assert growth(large, "resident") - growth(small, "resident") > 0.8 * more
    assert np.isfinite(large["streamed"]["mAP_random"])
    assert large["streamed"]["mAP_random"] == pytest.approx(large["resident"]["mAP_random"])
    assert 0 < large["epoch_read_vs_plain"] and large["bytes_per_image"] == (49 * 128 + 3 * 128 + 49) * 2
