import json

import numpy as np
import pytest
import torch

import bacgcn
import cache as cache_mod
import config
import data
import eval as eval_cli
import frozen_clip
import pipeline
import reso
import synthetic as S
import tinyclip
import train
from tests.helpers import torchscript_archive

# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

def test_overrides_are_type_checked():
    cfg, preset = config.parse_overrides(["--preset=voc2007-vitb16", "--topk=4", "--use-reso=false", "--lr", "0.01"])
    assert preset == "voc2007-vitb16" and cfg.dataset == "voc2007" and cfg.clip_model == "ViT-B-16-quickgelu"
    assert cfg.topk == 4 and cfg.use_reso is False and cfg.lr == 0.01 and cfg.image_size == 448
    with pytest.raises(ValueError, match="--topk: expected int, got 'x'"):
        config.parse_overrides(["--topk=x"])
    with pytest.raises(ValueError, match="unknown option --top-k"):
        config.parse_overrides(["--top-k=3"])
    with pytest.raises(ValueError, match="--use-gcn: expected bool"):
        config.parse_overrides(["--use-gcn=maybe"])
    with pytest.raises(ValueError, match="unknown preset"):
        config.parse_overrides(["--preset=imagenet"])
    with pytest.raises(ValueError, match="loss must be one of"):
        config.parse_overrides(["--loss=hinge"])
    assert config.BACGCNConfig.from_json(cfg.to_json()) == cfg


# --------------------------------------------------------------------------------------------
# CLIP backbone: ViT-B/16 in the three weight formats, on real photos
# --------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def vitb16_files(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("vitb16")
    torch.manual_seed(0)
    model = frozen_clip.create_clip("ViT-B-16-quickgelu")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    files = {"openai": folder / "ViT-B-16.pt", "state_dict": folder / "open_clip.pt",
             "safetensors": folder / "weights.safetensors"}
    torchscript_archive(state, files["openai"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, files["state_dict"])
    save_file(state, str(files["safetensors"]))
    return files, state


@pytest.mark.parametrize("fmt", ["openai", "state_dict", "safetensors"])
def test_vitb16_loads_in_each_format_and_encodes_real_photos(vitb16_files, fmt, shared_data):
    files, state = vitb16_files
    # TorchScript can carry code: OpenAI's archive loads only when asked for by name
    weights_format = "openai-torchscript" if fmt == "openai" else "auto"
    model = frozen_clip.create_clip("ViT-B-16-quickgelu", files[fmt], weights_format)
    loaded = model.state_dict()
    tol = 1e-3 if fmt == "openai" else 0.0          # OpenAI's archive is fp16
    for k in ("visual.proj", "visual.transformer.resblocks.11.mlp.c_fc.weight", "text_projection"):
        assert (loaded[k] - state[k]).abs().max() <= tol * state[k].abs().max()
    backbone = frozen_clip.CLIPBackbone(model)
    samples = data.load_voc(shared_data / "real_sample" / "voc", 2011, None)
    images = torch.stack([pipeline.image_transform(224)(data.decode_image(s.path)) for s in samples])
    with torch.no_grad():
        feats = backbone.features(frozen_clip.preprocess(images, backbone.image_size), h_fraction=0.25)
    assert feats["patches"].shape == (3, 196, 512) and feats["g"].shape == (3, 512)
    assert feats["gH"].shape == feats["gHc"].shape == (3, 512) and feats["attn"].shape == (3, 196)
    assert torch.allclose(feats["patches"].norm(dim=-1), torch.ones(3, 196), atol=1e-4)


def test_torchscript_needs_an_explicit_choice_and_converts_once(vitb16_files, tmp_path, capsys):
    files, state = vitb16_files
    with pytest.raises(data.DataError) as e:
        frozen_clip.create_clip("ViT-B-16-quickgelu", files["openai"])
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{files['openai']}: a TorchScript archive")
    assert "--clip-weights-format=openai-torchscript" in message and "python frozen_clip.py convert" in message
    converted = tmp_path / "ViT-B-16.safetensors"
    assert frozen_clip.main(["convert", str(files["openai"]), str(converted)]) == 0
    assert "loads it strict" in capsys.readouterr().out
    loaded = frozen_clip.create_clip("ViT-B-16-quickgelu", converted).state_dict()   # auto, strict
    for k in ("visual.proj", "text_projection", "logit_scale"):
        assert (loaded[k] - state[k]).abs().max() <= 1e-3 * state[k].abs().max()
    # the converted file is written once, never over another file
    assert frozen_clip.main(["convert", str(files["openai"]), str(converted)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {converted}: exists; remove it or choose another name"


def test_wrong_weights_name_the_architecture(tmp_path):
    tiny = frozen_clip.create_clip(S.TINY_CLIP)
    tinyclip.save_clip(tiny, tmp_path / "tiny.safetensors", {})
    with pytest.raises(ValueError, match=r"tiny\.safetensors: not a ViT-B-16-quickgelu checkpoint") as e:
        frozen_clip.create_clip("ViT-B-16-quickgelu", tmp_path / "tiny.safetensors")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown CLIP architecture 'ViT-B-17'"):
        frozen_clip.create_clip("ViT-B-17")


def test_image_size_interpolates_position_embeddings():
    model = frozen_clip.create_clip("ViT-B-16-quickgelu")
    frozen_clip.set_image_size(model, 448)
    backbone = frozen_clip.CLIPBackbone(model)
    with torch.no_grad():
        out = backbone.encode_image(torch.zeros(1, 3, 448, 448))
    assert out["patches"].shape == (1, 784, 512)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_features():
    torch.manual_seed(0)
    clip = frozen_clip.create_clip(S.TINY_CLIP)
    backbone = frozen_clip.CLIPBackbone(clip)
    scenes = [S.render_scene(np.random.default_rng(k), S.WorldConfig()) for k in range(6)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
    with torch.no_grad():
        feats = backbone.features(frozen_clip.preprocess(images, backbone.image_size), 0.25)
        names = list(S.CLASS_NAMES) + list(S.BACKGROUNDS)
        prompts = backbone.class_embeddings(names, frozen_clip.tokenizer_for(S.TINY_CLIP))
    return clip, feats, prompts


@pytest.mark.parametrize("linear_readout", [False, True])
def test_untrained_model_scores_equal_clip_zero_shot(tiny_features, linear_readout):
    clip, feats, prompts = tiny_features
    cfg = config.BACGCNConfig(linear_readout=linear_readout)
    counts = torch.rand(20, 20) * 50
    counts = (counts + counts.t()) / 2
    adjacency = bacgcn.build_adjacency(counts, counts.diagonal() + 20, 12, cfg)
    scale = float(clip.logit_scale.detach().exp())
    model = bacgcn.BACGCN(cfg, prompts, 12, adjacency, scale)
    logits = model(feats)["logits"]
    zero_shot = scale * feats["g"] @ prompts.t()
    torch.testing.assert_close(logits.detach(), zero_shot, atol=1e-4, rtol=1e-5)
    assert (model.readout is not None) == linear_readout
    if linear_readout:       # the readout starts at zero and trains: its weights get a gradient
        logits.square().mean().backward()
        assert model.readout.weight.grad.abs().sum() > 0


def test_adjacency_rules():
    cfg = config.BACGCNConfig(tau_a=0.5, reweight_p=0.2, global_edge=0.5)
    # 2 classes + 2 backgrounds; P(1|0) = 0.8, P(2|0) = 0.6 (class-bg), P(3|2) = 0.9 (bg-bg: dropped)
    m = torch.tensor([[10., 8, 6, 0], [8, 10, 0, 0], [6, 0, 10, 9], [0, 0, 9, 10]])
    adj = bacgcn.build_adjacency(m, m.diagonal(), 2, cfg)
    assert adj.shape == (7, 7)
    assert adj[0, 1] > 0 and adj[0, 2] > 0 and adj[2, 3] == 0 and adj[1, 3] == 0
    assert (adj[:4, 4:] > 0).all() and (adj[4:, 4:] == torch.diag(adj[4:, 4:].diagonal())).all()


# --------------------------------------------------------------------------------------------
# feature cache
# --------------------------------------------------------------------------------------------

def test_feature_cache_hit_miss_and_invalidation(tmp_path):
    photos = tmp_path / "img"
    photos.mkdir()
    from PIL import Image
    samples = []
    for k in range(5):
        Image.new("RGB", (16, 16), (k * 40, 0, 0)).save(photos / f"{k}.jpg")
        samples.append(data.Sample(str(k), photos / f"{k}.jpg", np.array([1], dtype=np.int8)))
    ds = data.MultiLabelImages(samples, ["a"], name="toy")
    calls = []

    def encode(x):
        calls.append(len(x))
        return {"g": x.float().mean((2, 3)), "patches": x.float()[:, :, :2, :2].flatten(2).transpose(1, 2)}

    spec = {"encoder": "toy", "h_fraction": 0.25}
    cache = cache_mod.FeatureCache(tmp_path / "cache", spec)
    assert not cache.complete
    cache.build(ds, encode, batch_size=2)
    feats = cache.open()
    assert calls == [2, 2, 1] and feats.ids == ["0", "1", "2", "3", "4"]
    rows = feats.gather(range(5))
    assert rows["g"].dtype == torch.bfloat16 and rows["patches"].shape == (5, 4, 3)
    again = cache_mod.FeatureCache(tmp_path / "cache", dict(spec))
    assert again.complete and again.dir == cache.dir and again.problem() is None
    assert again.open().ids == feats.ids and torch.equal(again.open().gather([0, 1, 2, 3, 4])["g"], rows["g"])
    changed = cache_mod.FeatureCache(tmp_path / "cache", {**spec, "h_fraction": 0.5})
    assert not changed.complete and changed.dir != cache.dir


# --------------------------------------------------------------------------------------------
# ReSO geometry
# --------------------------------------------------------------------------------------------

def test_reso_regions_and_crop_box():
    cfg = config.BACGCNConfig(reso_tau=0.5, reso_eps=0.1, reso_max_crops=2)
    grid = 8
    sim = torch.zeros(1, grid * grid, 3)
    small = sim[0, :, 0].view(grid, grid)
    small[1:3, 5:7] = 1.0                       # 4 of 64 patches = 6% of the image: small
    sim[0, :, 1].view(grid, grid)[:, :4] = 1.0  # half the image: not small
    sim[0, :, 2].view(grid, grid)[7, 7] = 1.0   # small, but not a pseudo-positive
    positives = torch.tensor([[True, True, False]])
    found = reso.reso_regions(sim, positives, cfg)
    assert found == [(0, 0, (1, 5, 2, 6))]
    # 128 px image: the region spans x 80-112, y 16-48; grown by 50% each side -> 64 px square,
    # shifted inside the image
    assert reso.crop_box((1, 5, 2, 6), grid, 128, 128, 0.5) == (64, 0, 128, 64)
    assert reso.crop_box((0, 0, 7, 7), grid, 128, 96, 0.5) == (16, 0, 112, 96)


# --------------------------------------------------------------------------------------------
# end to end: a smoke run on a tiny world, and eval from the checkpoint alone
# --------------------------------------------------------------------------------------------

def test_smoke_run_and_eval_reproduce(tmp_path, capsys, make_world):
    world = make_world(seed=2, train=80, test=50)
    torch.manual_seed(0)
    tinyclip.save_clip(frozen_clip.create_clip(S.TINY_CLIP), tmp_path / "clip.safetensors", {})
    out = tmp_path / "run"
    code = train.main([f"--data-root={world}", f"--clip-weights={tmp_path / 'clip.safetensors'}", "--epochs=2",
                       "--reso-epoch=1", "--reso-eps=0.5", f"--out={out}", f"--cache-dir={tmp_path / 'cache'}",
                       "--workers=0", "--batch-size=16", "--log-every=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "CLIP zero-shot" in printed and "BAC-GCN" in printed and "ReSO" in printed
    report = json.loads((out / "report.json").read_text())
    assert {"mAP", "mAP_small", "mAP_large", "zeroshot"} <= set(report)
    # the captions' own quality against the training split's truth, sizes included
    quality = report["caption_quality"]
    assert {"mAP", "precision", "recall", "recall_small", "recall_large"} <= set(quality)
    assert all(0 <= quality[k] <= 1 for k in ("precision", "recall", "recall_large")) and 0 < quality["mAP"] <= 100
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines) and any(x.get("crops", 0) > 0 for x in lines)
    # a second run reuses the cache
    train.main([f"--data-root={world}", f"--clip-weights={tmp_path / 'clip.safetensors'}", "--epochs=1",
                f"--out={tmp_path / 'run2'}", f"--cache-dir={tmp_path / 'cache'}", "--workers=0", "--use-reso=false"])
    assert "feature cache hit" in capsys.readouterr().out
    result = eval_cli.evaluate_checkpoint(str(out / "ckpt.safetensors"))
    assert result["mAP"] == pytest.approx(report["mAP"], abs=1e-6)
    # a checkpoint pointed at data it was not trained on is a one-line error
    assert eval_cli.main([str(out / "ckpt.safetensors"), "--data-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "world.json" in err


def test_one_pass_subset_readout():
    """last_block reads g^H / g^Hc from the shared encoder pass: with every patch kept it is g
    itself, and its subsets differ from g and from each other, as re-encoding's do."""
    torch.manual_seed(0)
    backbone = frozen_clip.CLIPBackbone(frozen_clip.create_clip(S.TINY_CLIP, S.TINY_CLIP_WEIGHTS))
    x = torch.randn(3, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        enc = backbone._encode(x)
        n = enc["attn"].shape[1]
        every = torch.arange(n).expand(3, n)
        torch.testing.assert_close(backbone.cls_over_subset(enc, every), enc["g"], rtol=0, atol=1e-6)
        one = backbone.features(x, 0.25, "last_block")
        two = backbone.features(x, 0.25, "reencode")
    assert torch.equal(one["patches"], two["patches"]) and torch.equal(one["attn"], two["attn"])
    torch.testing.assert_close(one["g"], two["g"], rtol=0, atol=1e-6)     # [cls] row alone vs the whole block
    assert one["gH"].shape == one["gHc"].shape == one["g"].shape
    assert (one["gH"] - one["g"]).abs().max() > 1e-3 and (one["gH"] - one["gHc"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="subset_readout must be one of"):
        backbone.features(x, 0.25, "twice")
