"""The compact feature cache (int8 patch tokens with a scale per token) beside bf16, the stream that
carries either to the device through reused staging buffers, and the line a run prints about where
its features are."""
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cache
import data
import pipeline
import train
from tests.conftest import world_fixture

world = world_fixture(seed=6, train=60, test=30)


class _Random(torch.utils.data.Dataset):
    """n stand-in images; the encoder below gives each its own random tokens."""

    def __init__(self, n: int):
        self.n, self.name = n, "random"

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        return {"image": torch.full((3, 1, 1), k % 256, dtype=torch.uint8), "labels": torch.zeros(0), "id": f"r{k}",
                "index": k}


def _tokens(n: int = 40, patches: int = 9, dim: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    scale = torch.rand(n, patches, 1, generator=gen) * 4 + 0.01        # tokens of very different sizes
    return {"patches": torch.randn(n, patches, dim, generator=gen) * scale,
            "g": torch.randn(n, dim, generator=gen), "attn": torch.rand(n, patches, generator=gen)}


def _build(root, fmt: str, tokens: dict, shard_rows: int = 7) -> cache.FeatureCache:
    built = cache.FeatureCache(root, {"toy": "formats"}, shard_rows=shard_rows, fmt=fmt)
    row = {"n": 0}

    def encode(x):
        b, start = x.shape[0], row["n"]
        row["n"] += b
        return {k: v[start:start + b] for k, v in tokens.items()}
    built.build(_Random(len(tokens["g"])), encode, batch_size=3)
    return built


def test_int8_rows_are_the_tokens_within_half_a_step_and_half_the_bytes(tmp_path):
    tokens = _tokens()
    compact, plain = _build(tmp_path, "int8", tokens), _build(tmp_path, "bf16", tokens)
    assert compact.dir != plain.dir                       # the format is part of the key
    # bf16 adds nothing to the key: the caches written before the compact format are still hits
    before = json.dumps({"toy": "formats", "cache_format": cache.FeatureCache.FORMAT}, sort_keys=True)
    assert plain.key == hashlib.sha256(before.encode()).hexdigest()[:20]
    shard = load_file(str(sorted(compact.dir.glob("*.safetensors"))[0]))
    assert shard["patches"].dtype == torch.int8 and shard["patches_scale"].dtype == torch.float32
    assert shard["g"].dtype == shard["attn"].dtype == torch.bfloat16      # the global read-outs as before
    for budget in (0, float("inf")):
        feats = compact.open(budget)
        assert feats.compact and sorted(feats.keys) == ["attn", "g", "patches"]
        got = feats.gather(range(40))
        step = tokens["patches"].abs().amax(-1, keepdim=True) / 127
        assert got["patches"].dtype == torch.float32
        assert ((got["patches"] - tokens["patches"]).abs() <= step / 2 * (1 + 1e-5)).all()
        assert torch.equal(got["g"], tokens["g"].bfloat16())
        stored = feats.gather_stored([3, 1], ["patches"])
        assert sorted(stored) == ["patches", "patches_scale"] and stored["patches"].dtype == torch.int8
    held, streamed = plain.open(), plain.open(0)
    assert not held.compact and torch.equal(held.gather(range(40))["patches"], tokens["patches"].bfloat16())
    assert torch.equal(streamed.gather([5, 2])["patches"], tokens["patches"][[5, 2]].bfloat16())
    per_row = {fmt: c.open(0).row_bytes for fmt, c in (("int8", compact), ("bf16", plain))}
    assert per_row["int8"] == 9 * 32 + 9 * 4 + 32 * 2 + 9 * 2 and per_row["bf16"] == (9 * 32 + 32 + 9) * 2


def test_the_stream_hands_over_every_batch_intact_through_reused_buffers(tmp_path):
    """More batches than staging buffers, of changing sizes, from a streamed cache: each batch as the
    held cache gives it, decoded or as stored, while the consumer keeps only the batch it has."""
    compact = _build(tmp_path, "int8", _tokens(n=60), shard_rows=8)
    streamed, held = compact.open(0), cache.FeatureCache(tmp_path, {"toy": "formats"}, fmt="int8").open()
    assert streamed.tensors is None and held.tensors is not None
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(60, generator=gen)
    sizes = [5, 9, 1, 7, 9, 9, 3, 8, 9]
    batches = [order[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    for decoded in (True, False):
        stream = cache.stream([(streamed, b) for b in batches], ["patches", "g"], "cpu", torch.float32,
                              decoded=decoded)
        for b in batches:
            got = next(stream)
            want = held.gather(b, ["patches", "g"]) if decoded else held.gather_stored(b, ["patches", "g"])
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k].to(want[k].dtype), want[k]) for k in want)
        assert next(stream, None) is None


def test_a_scale_that_is_not_its_tokens_scale_is_named(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    path = folder / "part000-shard-00000.safetensors"
    save_file({"patches": torch.zeros(2, 3, 4, dtype=torch.int8), "patches_scale": torch.ones(2, 3).bfloat16()},
              str(path))
    with pytest.raises(data.DataError, match="'patches_scale' is no fp32 scale per token of an int8 field"):
        cache.CachedFeatures.from_shards(folder, ["a", "b"], [path.name])
    save_file({"patches": torch.zeros(2, 3, 4, dtype=torch.int16)}, str(path))
    with pytest.raises(data.DataError, match="field 'patches' is I16"):
        cache.CachedFeatures.from_shards(folder, ["a", "b"], [path.name])


def test_an_image_scores_through_the_runs_cache_format(tmp_path):
    """The public API rounds one image's features as the run's cache stored them."""
    tokens = _tokens(n=2)
    feats = {"patches": tokens["patches"], **{k: tokens["g"] for k in ("g", "gH", "gHc")}}
    cached = _build(tmp_path, "int8", {**tokens, "gH": tokens["g"], "gHc": tokens["g"]}).open().gather(range(2))
    for fmt in ("int8", "bf16"):
        inputs = pipeline.head_inputs(feats, torch.float32, fmt)
        if fmt == "int8":
            assert all(torch.equal(inputs[k], cached[k].float()) for k in pipeline.FEATURE_KEYS)
        else:
            assert torch.equal(inputs["patches"], tokens["patches"].bfloat16().float())


def test_a_run_says_where_its_features_are_and_both_formats_train(world, tmp_path, capsys):
    def run(name, *more):
        out = tmp_path / name
        assert train.main([f"--data-root={world}", f"--cache-dir={tmp_path / 'cache'}", "--workers=0", "--epochs=1",
                           "--use-reso=false", "--batch-size=16", f"--out={out}", *more]) == 0
        return capsys.readouterr().out, json.loads((out / "report.json").read_text())
    printed, _ = run("held")
    assert "synthetic/trainval: features " in printed and "(bf16 patch tokens) held on the CPU (in memory), " \
        "within the budget of " in printed and "of RAM available)" in printed
    printed, _ = run("streamed", "--cache-memory-gb=0")
    assert "(bf16 patch tokens) streamed from disk (2 batches read ahead), over the budget of --cache-memory-gb=0" \
        in printed and "would take" not in printed
    printed, report = run("int8", "--cache-format=int8")
    assert "(int8 patch tokens) held on the CPU" in printed and np.isfinite(report["mAP"])
    assert len({m.parent.name for m in (tmp_path / "cache").glob("*/meta.json")}) == 4   # 2 splits x 2 formats


def test_a_streamed_bf16_cache_says_when_int8_would_be_held(tmp_path):
    plain = _build(tmp_path, "bf16", _tokens())
    row_bytes = {fmt: plain.open(0).row_bytes_as(fmt) for fmt in ("bf16", "int8")}
    assert row_bytes["bf16"] == plain.open(0).row_bytes == (9 * 32 + 32 + 9) * 2
    assert row_bytes["int8"] == _build(tmp_path, "int8", _tokens()).open(0).row_bytes
    between = 40 * (row_bytes["int8"] + row_bytes["bf16"]) / 2 / 2**30
    feats, line = plain.open_within(between, "cpu")
    assert feats.tensors is None and f"over the budget of --cache-memory-gb={between:g}; --cache-format=int8 would " \
        f"take {40 * row_bytes['int8'] / 1024:.1f} KiB and be held" in line


def test_a_config_from_before_the_compact_cache_keeps_reading_bf16():
    """A checkpoint, run folder or --config file written before `cache_format` existed was trained
    on bf16 features: eval.py, --resume and reruns find its caches under their old key."""
    import config

    old = {k: v for k, v in json.loads(config.BACGCNConfig(cache_format="int8").to_json()).items()
           if k != "cache_format"}
    assert config.BACGCNConfig.from_json(json.dumps(old)).cache_format == "bf16"
    assert config.BACGCNConfig.from_json(config.BACGCNConfig(cache_format="int8").to_json()).cache_format == "int8"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cache_held_on_the_gpu_hands_over_what_the_streamed_one_does(tmp_path):
    """Loaded onto the GPU in slices, gathered there: the same batches as streamed through pinned
    staging buffers, decoded on the GPU both ways."""
    compact = _build(tmp_path, "int8", _tokens(n=60), shard_rows=8)
    compact_cls = type(compact.open(0))
    compact_cls.LOAD_BYTES, saved = 4096, compact_cls.LOAD_BYTES          # several slices
    try:
        held = compact.open(float("inf"), "cuda")
    finally:
        compact_cls.LOAD_BYTES = saved
    assert held.device.startswith("cuda")
    streamed = compact.open(0, "cuda")
    batches = [torch.arange(i, min(i + 7, 60)).flip(0) for i in range(0, 60, 7)]
    pairs = zip(cache.stream([(held, b) for b in batches], ["patches", "g"], "cuda", torch.bfloat16),
                cache.stream([(streamed, b) for b in batches], ["patches", "g"], "cuda", torch.bfloat16))
    for a, b in pairs:
        assert a["patches"].is_cuda and all(torch.equal(a[k], b[k]) for k in a)
