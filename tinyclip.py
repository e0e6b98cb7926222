"""The tiny CLIP of the proving ground: the gate of its vision tower and its contrastive
pretraining on the world's web captions (synthetic.py makes the world; assets/README.md records
the run that produced assets/synthclip.safetensors).

  python tinyclip.py gate     [--minutes 5]                  # vision tower, cross-entropy gate
  python tinyclip.py pretrain --out assets/synthclip.safetensors [--steps 3000] [--seed S]

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from data import atomic_write, write_json
from pipeline import warmup_cosine
from synthetic import CLASS_NAMES, CLASSES, TINY_CLIP, TINY_CLIP_WEIGHTS, Scene, WorldConfig, render_scene, web_caption

if TYPE_CHECKING:
    import torch

# ============================================================================================
# Gate and pretraining
# ============================================================================================

def render_pool(seed: int, count: int, cfg: WorldConfig, single: bool, size: int,
                desc: str) -> tuple["torch.Tensor", list[Scene]]:
    """`count` scenes at model resolution (uint8 [count, 3, size, size]) and their metadata.
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
        img = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float()
        images[k] = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        scene.image = None  # keep the metadata only
        scenes.append(scene)
    return images, scenes


def _normalise(images: "torch.Tensor") -> "torch.Tensor":
    from bacgcn import preprocess
    return preprocess(images, images.shape[-1])


def gate(minutes: float = 5.0, seed: int = 0, batch: int = 128, out: str | None = None) -> dict:
    """Can the tiny CLIP's vision tower learn the classes at all? Plain cross-entropy on single
    objects, held-out top-1 every 50 steps, for `minutes` of wall time (target: >= 80%)."""
    import torch

    import bacgcn

    torch.manual_seed(seed)
    cfg = WorldConfig()
    size = bacgcn.model_config(TINY_CLIP)["vision_cfg"]["image_size"]
    train_x, train_s = render_pool(seed, 8000, cfg, True, size, "gate pool")
    test_x, test_s = render_pool(seed + 1000, 600, cfg, True, size, "gate held-out")
    train_y = torch.tensor([s.objects[0].cls for s in train_s])
    test_y = torch.tensor([s.objects[0].cls for s in test_s])
    visual = bacgcn.create_clip(TINY_CLIP).visual.train()
    head = torch.nn.Linear(visual.output_dim, len(CLASSES))
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    curve, start, step = [], time.time(), 0
    test_in = _normalise(test_x)
    while time.time() - start < minutes * 60:
        idx = torch.randint(len(train_x), (batch,))
        loss = torch.nn.functional.cross_entropy(head(visual(_normalise(train_x[idx]))), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            with torch.no_grad():
                visual.eval()
                acc = (head(visual(test_in)).argmax(1) == test_y).float().mean().item() * 100
                visual.train()
            curve.append({"step": step, "seconds": round(time.time() - start, 1), "loss": round(loss.item(), 4),
                          "top1": round(acc, 1)})
            print(f"gate step {step}: loss {loss.item():.3f}, held-out top-1 {acc:.1f}% "
                  f"({time.time() - start:.0f} s)", flush=True)
    result = {"steps": step, "minutes": minutes, "final_top1": curve[-1]["top1"] if curve else None, "curve": curve}
    if out:
        write_json(out, result)
    return result


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 3000            # ~55 min on 2 CPU cores
    batch: int = 128
    lr: float = 1e-3             # vision tower (and the projections)
    text_lr_mult: float = 0.3    # the text tower learns slower: guards against prompt collapse
    weight_decay: float = 0.05
    warmup: int = 100
    logit_scale: float = 25.0    # fixed (not learned): a learned scale let the pilot collapse
    patch_loss: float = 0.5      # weight of the patch-level (max over patches) contrastive term
    single_frac: float = 0.25    # first fraction of steps: single dominant objects only
    single_mix: float = 0.3      # afterwards: share of single-object scenes in a batch
    pool_single: int = 8000
    pool_mixed: int = 24000
    eval_every: int = 250


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


def zero_shot_single(backbone, tokenizer, images: "torch.Tensor", labels: "torch.Tensor") -> tuple[float, float]:
    """(top-1 % on single-object images with the global embedding, max cosine between two
    different class prompt embeddings: near 1 means the text tower collapsed)."""
    import torch

    with torch.no_grad():
        text = backbone.class_embeddings(CLASS_NAMES, tokenizer)
        feats = torch.cat([backbone.encode_image(_normalise(images[i:i + 256]))["g"]
                           for i in range(0, len(images), 256)])
        top1 = ((feats @ text.t()).argmax(1) == labels).float().mean().item() * 100
        cos = text @ text.t()
        cos.fill_diagonal_(-1)
    return top1, cos.max().item()


def pretrain(out: str | os.PathLike, cfg: PretrainConfig, log=print) -> dict:
    """Contrastive pretraining of the tiny CLIP on web captions of the world."""
    import torch

    import bacgcn

    torch.manual_seed(cfg.seed)
    world = WorldConfig()
    size = bacgcn.model_config(TINY_CLIP)["vision_cfg"]["image_size"]
    single_x, single_s = render_pool(cfg.seed, cfg.pool_single, world, True, size, "single-object pool")
    mixed_x, mixed_s = render_pool(cfg.seed, cfg.pool_mixed, world, False, size, "scene pool")
    eval_x, eval_s = render_pool(cfg.seed + 1000, 600, world, True, size, "held-out")
    eval_y = torch.tensor([s.objects[0].cls for s in eval_s])
    clip = bacgcn.create_clip(TINY_CLIP).train()
    clip.logit_scale.requires_grad_(False)
    backbone = bacgcn.CLIPBackbone(clip)
    tokenizer = bacgcn.tokenizer_for(TINY_CLIP)
    text_params = [p for n, p in clip.named_parameters() if not n.startswith("visual.") and p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": list(clip.visual.parameters()), "lr": cfg.lr},
        {"params": text_params, "lr": cfg.lr * cfg.text_lr_mult},
    ], weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    rng = np.random.default_rng([cfg.seed, 11])
    history, start = [], time.time()
    loss_avg = None
    for step in range(1, cfg.steps + 1):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * warmup_cosine(step - 1, cfg.warmup, cfg.steps)
        n_single = cfg.batch if step <= cfg.single_frac * cfg.steps else int(cfg.batch * cfg.single_mix)
        idx_s = rng.integers(len(single_x), size=n_single)
        idx_m = rng.integers(len(mixed_x), size=cfg.batch - n_single)
        images = torch.cat([single_x[idx_s], mixed_x[idx_m]])
        scenes = [single_s[i] for i in idx_s] + [mixed_s[i] for i in idx_m]
        caps = [web_caption(rng, s) for s in scenes]
        concepts = [{o.name for o in s.objects} | set(s.backgrounds) for s in scenes]
        positive = torch.tensor([[c[1] <= have for c in caps] for have in concepts])
        feats = backbone.encode_image(_normalise(images))
        text = backbone.encode_text(tokenizer([c[0] for c in caps]))
        loss = _multi_positive_loss(cfg.logit_scale * feats["g"] @ text.t(), positive)
        if cfg.patch_loss > 0:
            patch_sim = torch.einsum("bnd,td->btn", feats["patches"], text).amax(-1)
            loss = loss + cfg.patch_loss * _multi_positive_loss(cfg.logit_scale * patch_sim, positive)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        value = loss.item()
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        if step % cfg.eval_every == 0 or step == cfg.steps:
            clip.eval()
            top1, cos = zero_shot_single(backbone, tokenizer, eval_x, eval_y)
            clip.train()
            row = {"step": step, "seconds": round(time.time() - start), "loss": round(loss_avg, 4),
                   "zeroshot_top1_single": round(top1, 1), "max_prompt_cosine": round(cos, 4)}
            history.append(row)
            log(f"pretrain step {step}/{cfg.steps}: loss {loss_avg:.3f}, zero-shot top-1 {top1:.1f}%, "
                f"max prompt cosine {cos:.3f} ({row['seconds']} s)")
    save_clip(clip, out, {"pretrain": json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__}),
                          "history": json.dumps(history)})
    return {"history": history, "seconds": round(time.time() - start)}


def save_clip(clip, out: str | os.PathLike, metadata: dict[str, str]) -> None:
    """fp16 safetensors (the file is loaded into fp32 with strict=True by bacgcn.create_clip)."""
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
        print(f"gate: held-out top-1 {result['final_top1']}% after {result['steps']} steps")
    elif args.command == "pretrain":
        cfg = PretrainConfig(**{k: getattr(args, k) for k in PretrainConfig.__dataclass_fields__})
        result = pretrain(args.out, cfg, log=lambda m: print(m, flush=True))
        if args.json:
            write_json(args.json, result)
        print(f"wrote {args.out} after {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
