"""The tiny CLIP of the proving ground: the gate of its vision tower and its contrastive
pretraining on the world's web captions (synthetic.py makes the world; assets/README.md records
the run that produced assets/synthclip.safetensors).

  python tinyclip.py gate     [--minutes 5]                  # vision tower, cross-entropy gate
  python tinyclip.py pretrain --out FILE [--steps 3000] [--seed S]     # stage 1: whole renders at 64 px
  python tinyclip.py pretrain --out FILE --init STAGE1 --crop-min-side 0.25 ...   # stage 2 (assets/README.md)

The model is an ordinary open_clip CLIP (config assets/synthclip-vit-t8.json), so the trainer
reads it through the same code path as OpenAI's ViT-B/16.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from data import atomic_write, write_json
from pipeline import warmup_cosine
from synthetic import (
    CLASS_NAMES,
    CLASSES,
    HORIZON_WAVE,
    RENDER_SIZE,
    TINY_CLIP,
    TINY_CLIP_WEIGHTS,
    Scene,
    SceneObject,
    WorldConfig,
    render_scene,
    web_caption,
)

if TYPE_CHECKING:
    import torch

# ============================================================================================
# Gate and pretraining
# ============================================================================================

def render_pool(seed: int, count: int, cfg: WorldConfig, single: bool, size: int,
                desc: str) -> tuple["torch.Tensor", list[Scene]]:
    """`count` scenes at `size` px (uint8 [count, 3, size, size]) and their metadata.
    `single`: one dominant object (4-40% of the image) per scene: the curriculum's start."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    rng = np.random.default_rng([seed, 7, int(single)])
    images = torch.empty((count, 3, size, size), dtype=torch.uint8)
    scenes = []
    for k in tqdm(range(count), desc=desc, unit="img", file=sys.stderr, mininterval=5):
        if single:
            area = float(np.exp(rng.uniform(math.log(0.04), math.log(0.4))))
            scene = render_scene(rng, cfg, n_objects=1, areas=[area])
        else:
            scene = render_scene(rng, cfg)
        img = torch.from_numpy(scene.image).permute(2, 0, 1)
        if img.shape[-1] != size:
            img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        images[k] = img
        scene.image = None  # keep the metadata only
        scenes.append(scene)
    return images, scenes


# --------------------------------------------------------------------------------------------
# Scale augmentation: random resized crops of the renders
# --------------------------------------------------------------------------------------------

@dataclass
class CropConfig:
    """Random square crops of the renders, resized to the model's input size (64 px). A crop of
    side s (a fraction of the 128-px render) shows the fill patterns at 1/s times the period of
    the 64-px read of the whole render: s = 1 is that read, s = 0.5 the 128-px read-out train.py
    makes (2x, as ViT-B/16 reads at 448), s = 0.25 a ReSO crop of a small object (4x)."""
    min_side: float = 0.25      # log-uniform side in [min_side, max_side]: 1x .. 4x the 64-px period
    max_side: float = 1.0
    on_object: float = 0.8      # share of crops centred (with jitter) on a random object, not anywhere
    min_visible: float = 0.3    # an object cut by the crop still counts when this share of its box is in


def crop_view(rng: np.random.Generator, scene: Scene, render: int, cfg: CropConfig) -> tuple[tuple[int, int, int],
                                                                                             Scene]:
    """A random crop (x0, y0, side) in render pixels and the scene as the crop shows it: the
    objects it keeps (area now a fraction of the crop, so the caption's prominence follows the
    crop) and the backgrounds it still contains."""
    side = int(round(render * math.exp(rng.uniform(math.log(cfg.min_side), math.log(cfg.max_side)))))
    side = min(render, max(8, side))
    if scene.objects and rng.random() < cfg.on_object:
        o = scene.objects[rng.integers(len(scene.objects))]
        cx = (o.box[0] + o.box[2]) / 2 + rng.uniform(-0.25, 0.25) * side
        cy = (o.box[1] + o.box[3]) / 2 + rng.uniform(-0.25, 0.25) * side
    else:
        cx, cy = rng.uniform(0, render, 2)
    x0 = int(np.clip(round(cx - side / 2), 0, render - side))
    y0 = int(np.clip(round(cy - side / 2), 0, render - side))
    objects = []
    for o in scene.objects:
        ix0, iy0 = max(o.box[0], x0), max(o.box[1], y0)
        ix1, iy1 = min(o.box[2], x0 + side), min(o.box[3], y0 + side)
        inside = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0)
        box_area = max((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]), 1e-9)
        if inside >= cfg.min_visible * box_area:
            objects.append(SceneObject(o.cls, (ix0 - x0, iy0 - y0, ix1 - x0, iy1 - y0), inside / side ** 2))
    backgrounds = list(scene.backgrounds)
    if len(backgrounds) == 2:   # the horizon wobbles around its mean height
        horizon, wave = scene.bg_fraction[0] * render, HORIZON_WAVE * render
        backgrounds = ([backgrounds[0]] if y0 < horizon + wave else []) + \
                      ([backgrounds[1]] if y0 + side > horizon - wave else [])
    return (x0, y0, side), Scene(None, objects, backgrounds)


def crop_batch(rng: np.random.Generator, images: "torch.Tensor", scenes: Sequence[Scene], cfg: CropConfig,
               size: int) -> tuple["torch.Tensor", list[Scene]]:
    """Crops of `images` (uint8 renders [B, 3, R, R]) resized to `size` as the read-out resizes
    (bilinear, antialiased), and the scenes they show."""
    import torch
    import torch.nn.functional as F

    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    shown = []
    for k, (img, scene) in enumerate(zip(images, scenes)):
        (x0, y0, side), view = crop_view(rng, scene, img.shape[-1], cfg)
        crop = img[None, :, y0:y0 + side, x0:x0 + side].float()
        if side != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[k] = crop[0].round().clamp(0, 255).to(torch.uint8)
        shown.append(view)
    return out, shown


def _preprocess(images: "torch.Tensor", size: int | None = None) -> "torch.Tensor":
    """uint8 images -> the model's normalised input at `size` px (default: their own size)."""
    from frozen_clip import preprocess
    return preprocess(images, size or images.shape[-1])


# --------------------------------------------------------------------------------------------
# Gate and pretraining
# --------------------------------------------------------------------------------------------

def _gate_accuracy(visual, head, images: "torch.Tensor", labels: "torch.Tensor", size: int) -> float:
    """Held-out top-1 (%) of the full images read at `size` px (position embeddings
    interpolated when `size` is not native, as the read-out does)."""
    import torch

    with evaluating_at(visual, visual, size):
        logits = torch.cat([head(visual(_preprocess(images[i:i + 256], size))) for i in range(0, len(images), 256)])
    return (logits.argmax(1) == labels).float().mean().item() * 100


def gate(minutes: float = 5.0, seed: int = 0, batch: int = 128, out: str | None = None,
         crops: CropConfig | None = CropConfig()) -> dict:
    """Can the tiny CLIP's vision tower learn the classes at all, at every scale the read-out
    shows them? Plain cross-entropy on random crops of single objects, held-out top-1 of whole
    images read at the native size and at twice it, every 50 steps, for `minutes` of wall time
    (target: >= 80% at both)."""
    import torch

    import frozen_clip

    torch.manual_seed(seed)
    cfg = WorldConfig()
    size = frozen_clip.model_config(TINY_CLIP)["vision_cfg"]["image_size"]
    train_x, train_s = render_pool(seed, 8000, cfg, True, RENDER_SIZE, "gate pool")
    test_x, test_s = render_pool(seed + 1000, 600, cfg, True, RENDER_SIZE, "gate held-out")
    test_y = torch.tensor([s.objects[0].cls for s in test_s])
    visual = frozen_clip.create_clip(TINY_CLIP).visual.train()
    head = torch.nn.Linear(visual.output_dim, len(CLASSES))
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    rng = np.random.default_rng([seed, 13])
    curve, start, step = [], time.time(), 0
    while time.time() - start < minutes * 60:
        idx = rng.integers(len(train_x), size=batch)
        if crops is None:
            x = _preprocess(train_x[idx], size)
        else:
            x = _preprocess(crop_batch(rng, train_x[idx], [train_s[i] for i in idx], crops, size)[0])
        y = torch.tensor([train_s[i].objects[0].cls for i in idx])
        loss = torch.nn.functional.cross_entropy(head(visual(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            acc = {f"top1_{s}px": round(_gate_accuracy(visual, head, test_x, test_y, s), 1) for s in (size, 2 * size)}
            curve.append({"step": step, "seconds": round(time.time() - start, 1), "loss": round(loss.item(), 4), **acc})
            print(f"gate step {step}: loss {loss.item():.3f}, held-out top-1 " +
                  ", ".join(f"{v:.1f}% at {k[5:]}" for k, v in acc.items()) +
                  f" ({time.time() - start:.0f} s)", flush=True)
    result = {"steps": step, "minutes": minutes, "final": curve[-1] if curve else None, "curve": curve}
    if out:
        write_json(out, result)
    return result


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 3000            # stage 1: 45 min on 2 CPU cores (assets/README.md)
    batch: int = 128
    lr: float = 1e-3             # vision tower (and the projections)
    text_lr_mult: float = 0.3    # the text tower learns slower: guards against prompt collapse
    weight_decay: float = 0.05
    warmup: int = 100
    logit_scale: float = 25.0    # fixed (not learned): a learned scale let the pilot collapse
    patch_loss: float = 0.5      # weight of the patch-level (max over patches) contrastive term
    single_frac: float = 0.25    # first fraction of steps: single dominant objects only
    single_mix: float = 0.3      # afterwards: share of single-object scenes in a batch
    pool_single: int = 8000      # renders kept in memory (128 px uint8: 1.6 GB for both pools)
    pool_mixed: int = 24000
    # The global term counts a caption as true of an image only when it names the image's most
    # prominent caption_objects objects (or its backgrounds), as a web caption would; the patch
    # term counts every visible object, so the patches learn every object while the global
    # embedding keeps real CLIP's prominent-object bias. 0 = every object for both (stage 1).
    # The image's own caption is always a positive.
    caption_objects: int = 0
    eval_every: int = 250
    init: str = ""               # continue from these weights ('' = random init)
    # Every hires_every-th step reads at twice the native size (position embeddings
    # interpolated in the forward, as set_image_size does for the read-out); 0 = never. Those
    # batches hold hires_batch crops of side hires_min_side .. 1.
    hires_every: int = 0
    hires_batch: int = 48
    hires_min_side: float = 0.5
    # Scale augmentation (CropConfig). The defaults (side 1: whole renders, read at 64 px) are
    # stage 1, the shipped weights' first run; assets/README.md gives stage 2's overrides.
    crop_min_side: float = 1.0
    crop_max_side: float = 1.0
    crop_on_object: float = CropConfig.on_object
    crop_min_visible: float = CropConfig.min_visible

    def crops(self) -> CropConfig:
        return CropConfig(self.crop_min_side, self.crop_max_side, self.crop_on_object, self.crop_min_visible)


def _multi_positive_loss(logits: "torch.Tensor", positive: "torch.Tensor") -> "torch.Tensor":
    """Cross-entropy against the uniform distribution over every positive (both directions
    when `logits` is square): a caption true of several images in the batch is true of all."""
    import torch

    pos = positive.float()
    i2t = -(torch.log_softmax(logits, 1) * pos).sum(1) / pos.sum(1).clamp_min(1)
    loss = i2t.mean()
    if logits.shape[0] == logits.shape[1]:
        t2i = -(torch.log_softmax(logits, 0) * pos).sum(0) / pos.sum(0).clamp_min(1)
        loss = (loss + t2i.mean()) / 2
    return loss


@dataclass
class HeldOut:
    """Renders the pretraining never sees: single objects (top-1) and world scenes (mAP)."""
    single_x: "torch.Tensor"
    single_y: "torch.Tensor"
    scene_x: "torch.Tensor"
    scene_labels: np.ndarray     # [n, C] in {1, -1}
    scene_areas: np.ndarray      # [n, C] largest instance area, 0 where absent


def held_out(seed: int, world: WorldConfig, singles: int = 400, scenes: int = 600) -> HeldOut:
    import torch

    sx, ss = render_pool(seed + 1000, singles, world, True, RENDER_SIZE, "held-out singles")
    mx, ms = render_pool(seed + 1000, scenes, world, False, RENDER_SIZE, "held-out scenes")
    labels = -np.ones((scenes, len(CLASSES)), dtype=np.int8)
    areas = np.zeros((scenes, len(CLASSES)))
    for i, s in enumerate(ms):
        for o in s.objects:
            labels[i, o.cls] = 1
            areas[i, o.cls] = max(areas[i, o.cls], o.area)
    return HeldOut(sx, torch.tensor([s.objects[0].cls for s in ss]), mx, labels, areas)


def evaluate_clip(clip, tokenizer, held: HeldOut, sizes: Sequence[int]) -> dict:
    """Zero-shot with the global embedding at each read-out size: top-1 on single objects, mAP
    (and mAP_small / mAP_large) on scenes; and the max cosine between two class prompts (near 1:
    the text tower collapsed)."""
    import torch

    import frozen_clip
    from metrics import LARGE_AREA, SMALL_AREA, mean_ap, size_split_map

    out = {}
    with torch.no_grad():
        text = frozen_clip.CLIPBackbone(clip).class_embeddings(CLASS_NAMES, tokenizer)
        cos = text @ text.t()
        out["max_prompt_cosine"] = round(cos.fill_diagonal_(-1).max().item(), 4)
        backbone = frozen_clip.CLIPBackbone(clip)

        def embed(x, size):
            return torch.cat([backbone.encode_image(_preprocess(x[i:i + 200], size))["g"]
                              for i in range(0, len(x), 200)])
        for size in sizes:
            with evaluating_at(clip, clip.visual, size):
                single, scenes = embed(held.single_x, size), embed(held.scene_x, size)
            top1 = (single @ text.t()).argmax(1).eq(held.single_y).float().mean().item() * 100
            scores = (scenes @ text.t()).numpy()
            bands = size_split_map(scores, held.scene_labels, held.scene_areas, SMALL_AREA, LARGE_AREA)
            out.update({f"top1_{size}": round(top1, 1), f"mAP_{size}": round(mean_ap(scores, held.scene_labels), 2),
                        f"small_{size}": round(bands["mAP_small"], 2), f"large_{size}": round(bands["mAP_large"], 2)})
    return out


def _pretrain_batch(step: int, cfg: PretrainConfig, rng, pools, size: int) -> tuple["torch.Tensor", list]:
    """One batch of (uint8 images, scenes shown): the single-object curriculum, then world
    scenes with single objects mixed in; scale-augmented crops at `size` px, or at twice it on
    the steps that train the 2x read-out."""
    import torch

    (single_x, single_s), (mixed_x, mixed_s) = pools
    hires = cfg.hires_every > 0 and step % cfg.hires_every == 0
    batch = cfg.hires_batch if hires else cfg.batch
    n_single = batch if step <= cfg.single_frac * cfg.steps else int(batch * cfg.single_mix)
    idx_s = rng.integers(len(single_x), size=n_single)
    idx_m = rng.integers(len(mixed_x), size=batch - n_single)
    images = torch.cat([single_x[idx_s], mixed_x[idx_m]])
    scenes = [single_s[i] for i in idx_s] + [mixed_s[i] for i in idx_m]
    crops = cfg.crops()
    if hires:
        crops = CropConfig(cfg.hires_min_side, 1.0, crops.on_object, crops.min_visible)
    return crop_batch(rng, images, scenes, crops, 2 * size if hires else size)


@contextmanager
def evaluating_at(model, visual, size: int):
    """`model` in eval mode without gradients, its vision tower `visual` reading `size` px; the
    training mode comes back after (no copy of the model per evaluation)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reading_at(visual, size):
            yield
    finally:
        model.train(was_training)


@contextmanager
def reading_at(visual, size: int):
    """The vision tower reads `size` px inside the block: its position embeddings are
    interpolated in the forward (differentiably: gradients reach the native table)."""
    import frozen_clip

    old, new = frozen_clip.grid_for(visual, size)
    if new == old:
        yield
        return
    native = visual._parameters["positional_embedding"]
    visual._parameters["positional_embedding"] = frozen_clip.resize_position_embedding(native, old, new)
    try:
        yield
    finally:
        visual._parameters["positional_embedding"] = native


def _contrastive_loss(backbone, tokenizer, images, scenes, rng, cfg: PretrainConfig) -> "torch.Tensor":
    """Multi-positive loss of a batch against web captions of what each image shows, on the
    global embedding and (weight patch_loss) on the max over patches."""
    import torch

    caps = [web_caption(rng, s) for s in scenes]
    visible = [{o.name for o in s.objects} | set(s.backgrounds) for s in scenes]
    named = [{o.name for o in s.by_prominence()[:cfg.caption_objects or None]} | set(s.backgrounds)
             for s in scenes]
    own = torch.eye(len(scenes), dtype=torch.bool)
    pos_global = torch.tensor([[c[1] <= have for c in caps] for have in named]) | own
    pos_patch = torch.tensor([[c[1] <= have for c in caps] for have in visible])
    with reading_at(backbone.visual, images.shape[-1]):
        feats = backbone.encode_image(_preprocess(images))
    text = backbone.encode_text(tokenizer([c[0] for c in caps]))
    loss = _multi_positive_loss(cfg.logit_scale * feats["g"] @ text.t(), pos_global)
    if cfg.patch_loss > 0:
        patch_sim = torch.einsum("bnd,td->btn", feats["patches"], text).amax(-1)
        loss = loss + cfg.patch_loss * _multi_positive_loss(cfg.logit_scale * patch_sim, pos_patch)
    return loss


def pretrain(out: str | os.PathLike, cfg: PretrainConfig, log=print) -> dict:
    """Contrastive pretraining of the tiny CLIP on web captions of the world."""
    import torch

    import frozen_clip

    torch.manual_seed(cfg.seed)
    world = WorldConfig()
    size = frozen_clip.model_config(TINY_CLIP)["vision_cfg"]["image_size"]
    pools = (render_pool(cfg.seed, cfg.pool_single, world, True, RENDER_SIZE, "single-object pool"),
             render_pool(cfg.seed, cfg.pool_mixed, world, False, RENDER_SIZE, "scene pool"))
    held = held_out(cfg.seed, world)
    clip = frozen_clip.create_clip(TINY_CLIP, cfg.init or None).train()
    clip.logit_scale.requires_grad_(False)
    backbone = frozen_clip.CLIPBackbone(clip)
    tokenizer = frozen_clip.tokenizer_for(TINY_CLIP)
    text_params = [p for n, p in clip.named_parameters() if not n.startswith("visual.") and p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": list(clip.visual.parameters()), "lr": cfg.lr},
        {"params": text_params, "lr": cfg.lr * cfg.text_lr_mult},
    ], weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    rng = np.random.default_rng([cfg.seed, 11])
    history, start, loss_avg = [], time.time(), None
    for step in range(1, cfg.steps + 1):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * warmup_cosine(step - 1, cfg.warmup, cfg.steps)
        images, scenes = _pretrain_batch(step, cfg, rng, pools, size)
        loss = _contrastive_loss(backbone, tokenizer, images, scenes, rng, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 25 == 0:
            log(f"pretrain step {step}: loss {loss_avg:.3f} ({time.time() - start:.0f} s)")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = {"step": step, "seconds": round(time.time() - start), "loss": round(loss_avg, 4),
                   **evaluate_clip(clip, tokenizer, held, (size, 2 * size))}
            history.append(row)
            log("pretrain " + "  ".join(f"{k} {v}" for k, v in row.items()))
            # saved at every evaluation: a run stopped early still leaves its last weights
            save_clip(clip, out, {"pretrain": json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__}),
                                  "history": json.dumps(history)})
    return {"history": history, "seconds": round(time.time() - start)}


def save_clip(clip, out: str | os.PathLike, metadata: dict[str, str]) -> None:
    """fp16 safetensors (the file is loaded into fp32 with strict=True by frozen_clip.create_clip)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").half().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in clip.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"model": TINY_CLIP, **metadata}))


# ============================================================================================
# CLI
# ============================================================================================

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyclip.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gate", help="cross-entropy gate of the tiny CLIP's vision tower")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the curve here")
    p = sub.add_parser("pretrain", help="contrastive pretraining of the tiny CLIP on web captions")
    p.add_argument("--out", default=str(TINY_CLIP_WEIGHTS))
    for f in PretrainConfig.__dataclass_fields__.values():
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--json", help="write the training history here")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.command == "gate":
        result = gate(args.minutes, args.seed, out=args.json)
        final = result["final"] or {}
        print(f"gate: held-out top-1 {final.get('top1_64px')}% at 64 px, {final.get('top1_128px')}% at 128 px "
              f"after {result['steps']} steps")
    elif args.command == "pretrain":
        cfg = PretrainConfig(**{k: getattr(args, k) for k in PretrainConfig.__dataclass_fields__})
        result = pretrain(args.out, cfg, log=lambda m: print(m, flush=True))
        if args.json:
            write_json(args.json, result)
        print(f"wrote {args.out} after {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
