"""Train BAC-GCN.

  python train.py                                   # the proving ground, end to end, on the CPU
  python train.py --dataset voc07 --download        # real data (also voc12, coco, nus), fetched and checked first
  python train.py --dataset=folder --data-root=DIR --classes=cat,dog   # your own photos, tagged
  python train.py --key=value ...                   # any field of config.BACGCNConfig (the last of a repeat wins)
  python train.py --resume runs/X                   # continue a stopped run exactly (--overwrite: replace one)
  python train.py --config runs/X/config.json       # start run X again (options after it override it)
  python train.py --tracker=mlflow                  # also log to mlflow (pip install -r requirements-tracking.txt)
  python train.py --dataset voc07 --help            # every option, its type, that preset's value and meaning

Real data is looked for where the paper's release puts it (--data-folder, default data_folder/, in
the current folder, else in the repo; --data-root=DIR for one dataset elsewhere):
  data_folder/voc2007/VOCtrainval_06-Nov-2007/VOCdevkit/VOC2007, VOCtest_06-Nov-2007/VOCdevkit/VOC2007
  data_folder/voc2012/VOC2012_train_val/VOCdevkit/VOC2012
  data_folder/coco2014/train2014, val2014, annotations/instances_{train,val}2014.json
  data_folder/nuswide/Flickr, ImageList, Groundtruth/TrainTestLabels, Concepts81.txt
  captions: data_folder/<dataset>/captions.json (+ re_captions.json), or --captions=DIR (also the
    authors' caption/ folder or a clone of their repository)
  CLIP weights: --clip-weights=openai (the ViT-B/16 presets' default, fetched once) or a file
Each missing piece is one line saying what to put where (docs/datasets.md).

Stages: (1) captions -> pseudo labels and the co-occurrence graph; (2) frozen CLIP features,
cached once per image; (3) the model, which starts at CLIP zero-shot; (4) the Similarity Kernel
and CLIP-GCN trained on the soft pseudo labels, ReSO inline from epoch `reso_epoch`; (5)
evaluation on the test split against CLIP zero-shot. The run folder (under the output root)
gets ckpt.safetensors, report.json, metrics.jsonl, config.json and train.log.

This file is the command line and the training loop, read top to bottom; what it shares with
eval.py and the benches is pipeline.py, the run folder's bookkeeping runs.py, ReSO reso.py.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import random
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import bacgcn
import checkpoints
import cli
import config
import data
import frozen_clip
import losses
import metrics
import pipeline
import registry
import reso
import runs
import tracking
from pipeline import Split, log

ROOT = Path(__file__).resolve().parent
REPORT_KEYS = ("mAP", "mAP_small", "mAP_large", "CF1", "OF1")   # the zero-shot summary of report.json


# --------------------------------------------------------------------------------------------
# The loss and the optimiser
# --------------------------------------------------------------------------------------------

def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, cfg, weight: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, missing_rate: float = 0.0,
                    epoch: int | None = None) -> torch.Tensor:
    """`cfg.loss` (losses.py) against soft targets; `mask` 0 drops an entry, `weight` scales rows;
    `missing_rate` > 0 treats that share of the unmentioned entries as missing labels (cfg.large_loss);
    `epoch` tells hill and splc whether their BCE warm-up is over."""
    loss, kept = losses.large_loss(logits, targets, cfg, missing_rate, epoch)
    mask = kept if mask is None else mask * kept
    loss = loss * mask
    if weight is not None:
        loss = loss * weight[:, None]
    return loss.sum() / mask.sum().clamp_min(1)


def make_optimizer(cfg, model) -> torch.optim.Optimizer:
    """AdamW; the prompts start at CLIP's text embeddings and move `prompt_lr_mult` slower."""
    prompt_params = [model.kernel.prompts]
    other = [p for name, p in model.named_parameters() if name != "kernel.prompts"]
    return torch.optim.AdamW([{"params": other, "lr": cfg.lr},
                              {"params": prompt_params, "lr": cfg.lr * cfg.prompt_lr_mult}],
                             weight_decay=cfg.weight_decay)


def epoch_batches(cfg, num_images: int, crops: reso.ResoCrops | None, gen: torch.Generator,
                  epoch: int) -> list[tuple[str, torch.Tensor]]:
    """This epoch's ("image" | "crop", row indices) batches in a seeded random order."""
    order = torch.randperm(num_images, generator=gen)
    batches = [("image", order[i:i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
    if crops is not None and len(crops):
        corder = torch.randperm(len(crops), generator=gen)
        batches += [("crop", corder[i:i + cfg.batch_size]) for i in range(0, len(corder), cfg.batch_size)]
        random.Random(cfg.seed + epoch).shuffle(batches)
    return batches


def batch_loss(cfg, step_fn, kind: str, idx: torch.Tensor, x: dict[str, torch.Tensor], targets: torch.Tensor,
               crops: reso.ResoCrops | None, dtype, epoch: int = 0) -> torch.Tensor:
    """Loss of one batch (`x`: its features, rows `idx` of the images or crops; `idx`, `targets`
    and the crops' tensors on the device already). Missing labels are looked for on images only:
    a crop's unmentioned entries are masked already."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = step_fn(x)
        if kind == "image":
            return multilabel_loss(out["logits"], targets[idx], cfg, missing_rate=losses.large_loss_rate(cfg, epoch),
                                   epoch=epoch)
        logits = out["logits"].float()
        cls = crops.classes[idx]
        p_own = torch.sigmoid(logits.gather(1, cls[:, None]))[:, 0].detach()
        weight = 1 + (1 - p_own).pow(cfg.reso_gamma)   # harder crops weigh more
        return multilabel_loss(logits, crops.targets[idx], cfg, weight, crops.masks[idx], epoch=epoch)


def wrap_for_training(cfg, model, device: str):
    """The module the steps call: DDP across the processes of a torchrun job (gradients
    averaged, so each process's share of a global batch counts as in one process), compiled
    on CUDA when asked."""
    step_fn = model
    if pipeline.rank_and_world()[1] > 1:
        from torch.nn.parallel import DistributedDataParallel
        step_fn = DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda")
                                          else None)
    return torch.compile(step_fn) if cfg.compile and device.startswith("cuda") else step_fn


def planned_steps(cfg, num_images: int, loop: runs.Loop) -> int:
    """The steps the run will take: those taken, plus the rest of the epochs with this epoch's
    image and crop batches. The cosine must end on the last step actually taken: counting image
    batches only, the crop batches of ReSO pushed the step past the end and the last epochs
    trained at learning rate 0."""
    per_epoch = math.ceil(num_images / cfg.batch_size)
    if loop.crops is not None:
        per_epoch += math.ceil(len(loop.crops) / cfg.batch_size)
    return loop.step + (cfg.epochs - loop.epoch) * per_epoch


@dataclass
class TrainSet:
    """What the loop trains on: the cached training images, their soft targets and hard pseudo
    labels over the O categories (classes first), and how many of the O are classes."""
    split: Split
    targets: torch.Tensor            # [n, O] soft targets, rows in the cache's order
    hard: torch.Tensor               # [n, O] bool, hard pseudo labels (>= min_votes captions)
    num_classes: int
    text: torch.Tensor | None = None  # [O, E] CLIP's own class embeddings, frozen: they verify ReSO's proposals


def start_reso(cfg, model, backbone, trainset: TrainSet, targets: torch.Tensor, loop: runs.Loop, device: str,
               metrics_log: runs.MetricsLog) -> dict:
    """ReSO's turn (epoch `reso_epoch`): find the small regions (and, with `reso_propose`, the
    verified crops beyond the captions, whose evidence raises `targets` in place), encode their
    crops once, and from now on train on them too. Returns what it did, for the report."""
    dtype = pipeline.compute_dtype(device, cfg.amp)
    found, proposals = reso.find_small_regions(cfg, model, trainset.split, trainset.hard, trainset.num_classes,
                                               device, dtype)
    t_encode = time.time()
    text = trainset.text if cfg.reso_verify_backgrounds else trainset.text[:trainset.num_classes]
    verified = (reso.verify_proposals(cfg, backbone, trainset.split, proposals, text, device, model)
                if proposals else [])
    loop.crops = reso.build_reso_crops(cfg, backbone, trainset.split, found + verified, targets, device)
    reso.add_evidence(targets, verified, cfg)
    done = {"crops": len(found), "crop_precision": reso.crop_precision(cfg, trainset.split, found),
            "proposed": len(proposals), "proposal_precision": reso.crop_precision(cfg, trainset.split, proposals),
            "verified": len(verified),
            "verified_precision": reso.crop_precision(cfg, trainset.split, verified),
            "crop_encode_seconds": round(time.time() - t_encode, 2)}
    loop.total = planned_steps(cfg, len(trainset.split.ids), loop)
    precision = done["crop_precision"]
    log(f"epoch {loop.epoch + 1}: ReSO found {len(found)} small regions to crop"
        + ("" if precision is None else f", crop precision {precision:.1f}% (true boxes)")
        + (f"; {len(verified)} of {len(proposals)} proposals beyond the captions verified" if proposals else "")
        + f"; crops encoded in {done['crop_encode_seconds']:.1f} s")
    metrics_log.record({"epoch": loop.epoch, **{f"reso_{k}": v for k, v in done.items()}}, loop.epoch)
    return done


def train_epochs(cfg, model, backbone, trainset: TrainSet, device: str, metrics_log: runs.MetricsLog,
                 on_epoch_end=None, resume: dict | None = None) -> dict:
    """The training loop: every epoch over the cached images, plus the ReSO crops from
    `reso_epoch` on; loss lines every `log_every` steps and per epoch in `metrics_log`;
    `on_epoch_end(loop)` after every epoch (the run saves its state there), and `resume` (read
    by `runs.read_state`) continues a saved run exactly. In a torchrun job every process takes
    its slice of each global batch. Returns what ReSO did ({} without ReSO or after a resume
    past its epoch)."""
    dtype, (rank, world) = pipeline.compute_dtype(device, cfg.amp), pipeline.rank_and_world()
    opt = make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(trainset.split.ids) / cfg.batch_size)
    loop = runs.Loop(opt, [g["lr"] for g in opt.param_groups], torch.Generator().manual_seed(cfg.seed),
                     warmup=max(1, int(cfg.warmup_epochs * steps_per_epoch)), total=cfg.epochs * steps_per_epoch)
    targets, reso_done = trainset.targets.to(device), {}       # once: batches index it on the device
    if resume is not None:
        found = runs.restore_state(resume, model, loop, len(trainset.split.ids), targets.shape[1])
        loop.crops = reso.build_reso_crops(cfg, backbone, trainset.split, found, targets, device) if found else None
        reso.add_evidence(targets, found or [], cfg)
    step_fn = wrap_for_training(cfg, model, device)
    epoch_seconds: list[float] = []
    while loop.epoch < cfg.epochs:
        t_epoch = time.time()
        if cfg.use_reso and loop.epoch == cfg.reso_epoch:
            reso_done = start_reso(cfg, model, backbone, trainset, targets, loop, device, metrics_log)
        batches = [(kind, idx[rank::world]) for kind, idx in
                   epoch_batches(cfg, len(trainset.split.ids), loop.crops, loop.gen, loop.epoch)]
        sources = [(trainset.split.feats if kind == "image" else loop.crops.feats, idx) for kind, idx in batches]
        # The epoch's row indices reach the device in one copy, not one small blocking copy per step.
        on_device = pipeline.to_device_once([idx for _, idx in batches], device)
        running, first_bad = torch.zeros((), device=device), torch.full((), -1, device=device)
        # closing(): an exception (Ctrl-C) must stop the reader thread here, not when the traceback
        # lets go of the generator at interpreter exit, where a thread inside torch aborts the process.
        with closing(pipeline.prefetched(sources, device, dtype)) as stream:
            for count, (kind, _) in enumerate(batches, 1):
                x = next(stream)        # not zip(): its tuple would hold the last batch while the next is decoded
                for g, lr in zip(opt.param_groups, loop.base_lr):
                    g["lr"] = lr * pipeline.warmup_cosine(loop.step, loop.warmup, loop.total)
                loss = batch_loss(cfg, step_fn, kind, on_device[count - 1], x, targets, loop.crops, dtype, loop.epoch)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), loop.step + 1, first_bad)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += loss.detach()
                del x                   # one fp32 batch held at a time, not two
                loop.step += 1
                if loop.step % cfg.log_every == 0 or count == len(batches):
                    # A sync only at log intervals, and every process stops together: a rank that
                    # raised alone left the others waiting in the next all-reduce until NCCL's timeout.
                    first_bad = pipeline.max_over_processes(first_bad)
                    if int(first_bad) >= 0:
                        raise runs.NonFiniteLoss(f"the loss became NaN or infinite at step {int(first_bad)} (epoch "
                                                 f"{loop.epoch + 1}); lower --lr or check the inputs")
                    if loop.step % cfg.log_every == 0:
                        value = pipeline.mean_over_processes(running / count).item()   # .item() only here
                        metrics_log.record({"step": loop.step, "epoch": loop.epoch, "loss": value,
                                            "lr": opt.param_groups[0]["lr"]}, loop.step)
        epoch_loss = pipeline.mean_over_processes(running / max(len(batches), 1)).item()
        crops = 0 if loop.crops is None else len(loop.crops)
        metrics_log.record({"epoch": loop.epoch, "epoch_loss": epoch_loss, "crops": crops}, loop.epoch)
        epoch_seconds.append(time.time() - t_epoch)
        left = (cfg.epochs - loop.epoch - 1) * sum(epoch_seconds[-3:]) / len(epoch_seconds[-3:])
        log(f"epoch {loop.epoch + 1}/{cfg.epochs}: loss {epoch_loss:.4f}, {len(batches)} steps"
            + (f", {crops} ReSO crops" if cfg.use_reso and loop.epoch >= cfg.reso_epoch else "")
            + f", {epoch_seconds[-1]:.1f} s" + (f", ETA {cli.duration_words(left)}" if left else ""))
        loop.epoch += 1
        if on_epoch_end is not None:
            on_epoch_end(loop)
    return reso_done


# --------------------------------------------------------------------------------------------
# The run: stages 1-5
# --------------------------------------------------------------------------------------------

def start_run(cfg: config.BACGCNConfig, preset: str, resume: bool = False, overwrite: bool = False,
              download: bool = False) -> tuple[config.BACGCNConfig, str, int | None]:
    """Process group, paths, device, seeds, threads and the run folder: (completed config,
    device, the run folder's lock to close at the end). In a torchrun job rank 0 builds the
    world or downloads what is missing (--download), names the run folder for all and holds
    its lock; the others wait for it."""
    device = pipeline.init_distributed(cfg.device)
    _, world = pipeline.rank_and_world()
    if cfg.batch_size < world:
        raise ValueError(f"--batch-size={cfg.batch_size} is smaller than the {world} processes sharing each batch")
    if pipeline.is_main_process():
        cfg = pipeline.resolve_paths(cfg, download)
    pipeline.barrier()
    cfg = pipeline.resolve_paths(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    out_dir = Path(cfg.out or config.default_run_folder(cfg, preset))
    out_dir = Path(pipeline.broadcast_object(str(out_dir.resolve())))
    lock = runs.prepare_run_folder(out_dir, resume, overwrite) if pipeline.is_main_process() else None
    pipeline.barrier()
    return cfg.replace(out=str(out_dir)), device, lock


def run(cfg: config.BACGCNConfig, preset: str = "", resume: dict | None = None,
        options: runs.RunOptions | None = None) -> dict:
    """The run, tracked (with --tracker) from its start to its end, failed or not; the console
    also goes to the run folder's train.log, its config to config.json."""
    options = options or runs.RunOptions()
    t_start = time.time()
    cfg, device, lock = start_run(cfg, preset, resume is not None, options.overwrite, options.download)
    out_dir, main_process = Path(cfg.out), pipeline.is_main_process()
    try:
        with runs.console_logged(out_dir, enabled=main_process):
            if main_process:
                runs.write_config(out_dir, cfg, preset)
            return tracked_run(cfg, preset, resume, device, t_start)
    finally:
        runs.release_run_folder(out_dir, lock)


def tracked_run(cfg: config.BACGCNConfig, preset: str, resume: dict | None, device: str, t_start: float) -> dict:
    tracker = tracking.open_tracker(cfg, preset, Path(cfg.out), resume is not None, pipeline.is_main_process())
    status = "FAILED"
    try:
        report = train_and_evaluate(cfg, preset, resume, device, tracker, t_start)
        status = "FINISHED"
        return report
    except runs.RunStopped as e:
        status = "KILLED" if e.code > 128 else "FAILED"
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


def train_and_evaluate(cfg: config.BACGCNConfig, preset: str, resume: dict | None, device: str,
                       tracker: tracking.Tracker, t_start: float) -> dict:
    entry = registry.get(cfg.dataset)
    if cfg.train_split in entry.split_notes:
        log(f"{entry.name}: {entry.split_notes[cfg.train_split]}")
    if cfg.use_reso and cfg.reso_epoch >= cfg.epochs:
        log(f"WARNING: ReSO starts at epoch {cfg.reso_epoch + 1} of {cfg.epochs}: it will not run "
            "(lower --reso-epoch, or --use-reso=false to say so)")
    out_dir, main_process = Path(cfg.out), pipeline.is_main_process()
    train_ds, test_ds = pipeline.load_split(cfg, cfg.train_split), pipeline.load_split(cfg, cfg.test_split)
    runs.start_block(cfg, preset, device, train_ds, test_ds)
    pipeline.caption_photos(cfg, train_ds, device)
    labels = pipeline.caption_labels(cfg, train_ds)                                 # 1
    num_classes = len(labels.classes)

    backbone = pipeline.build_backbone(cfg, device)                                 # 2
    pipeline.check_against_backbone(cfg, backbone)
    prompts = backbone.class_embeddings(labels.prompt_names, frozen_clip.tokenizer_for(cfg.clip_model),
                                        device=device, desc="class prompts").cpu()
    train = pipeline.cached_features(cfg, backbone, train_ds, device)
    test = pipeline.cached_features(cfg, backbone, test_ds, device)
    for split, dataset in ((train, train_ds), (test, test_ds)):
        pipeline.check_features(split, dataset, cfg.data_root)
    targets, hard = labels.targets_for(train.ids, cfg.min_votes)
    unnamed = pipeline.classes_no_caption_names(labels.classes, hard, cfg.min_votes)

    logit_scale = float(backbone.clip.logit_scale.exp().item())                    # 3
    model = bacgcn.build_model(cfg, prompts, num_classes, labels.m, labels.n, logit_scale).to(device)
    dtype = pipeline.compute_dtype(device, cfg.amp)
    labelled = pipeline.has_labels(test_ds)
    zeroshot = zero_shot(cfg, model, test, device, num_classes) if labelled else runs.no_labels(test_ds.name, entry)

    # Only rank 0 writes files; the others log into the void. A resumed run appends.
    metrics_path = out_dir / "metrics.jsonl" if main_process else Path(os.devnull)

    def save_after_epoch(loop: runs.Loop) -> None:
        runs.save_state(out_dir / runs.STATE_FILE, model, loop, cfg, preset)

    try:
        with open(metrics_path, "a" if resume else "w") as metrics_file:
            metrics_log = runs.MetricsLog(metrics_file, tracker)
            t_train = time.time()                                                   # 4
            reso_done = train_epochs(cfg, model, backbone, TrainSet(train, targets, hard, num_classes, prompts), device,
                                     metrics_log, save_after_epoch if main_process else None, resume)
            train_s = time.time() - t_train
            logits = pipeline.predict(model, test.feats, device, dtype)             # 5
            logits, test_pass = reso.small_object_pass(cfg, model, backbone, test, logits, device)
            result = pipeline.evaluate_split(cfg, logits, test, num_classes) if labelled else \
                {"mAP": None, "CF1": None, "OF1": None, "AP": {}}
            metrics_log.record({"test": {k: v for k, v in result.items() if k != "AP"}}, None)
            thresholds = pipeline.tag_thresholds(model, train, hard, num_classes, device, dtype)
    except KeyboardInterrupt as e:             # Ctrl-C, or SIGTERM (cli.Interrupted)
        note = runs.stopped_note(out_dir)
        raise runs.RunStopped(cli.interrupt_code(e), f"{cli.interrupt_words(e)}; {note}") from None
    except runs.NonFiniteLoss as e:
        raise runs.RunStopped(2, f"{e}; {runs.stopped_note(out_dir)}") from None
    except OSError as e:     # a full disk or a file-size limit under the unnamed writes of metrics.jsonl
        if e.filename is not None or e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise data.DataError(metrics_path, f"cannot be written ({e.strerror})") from None
    report = {k: result[k] for k in ("mAP", "mAP_small", "mAP_large") if k in result}
    report.update({"CF1": result["CF1"], "OF1": result["OF1"], "AP": result["AP"],
                   "zeroshot": {k: zeroshot[k] for k in REPORT_KEYS if k in zeroshot},
                   "caption_quality": labels.quality, "classes_no_caption_names": unnamed,
                   "unused_annotations": {d.name: d.unused_annotations for d in (train_ds, test_ds)},
                   "reso": reso_done, "test_pass": test_pass, "train_seconds": round(train_s, 3),
                   "total_seconds": round(time.time() - t_start, 1),
                   "world_size": pipeline.rank_and_world()[1], "resumed": resume is not None,
                   "preset": preset, "dataset": cfg.dataset, "split": cfg.test_split, "out": str(out_dir),
                   "config": dataclasses.asdict(cfg), **tagging(labels.classes, thresholds, logits, test, labelled)})
    if main_process and entry.own_photos:
        report["tags"] = pipeline.write_tags(out_dir / runs.TAGS_FILE, test.ids, logits, labels.classes, thresholds)
        log(f"tagged {len(test.ids)} photos of {test_ds.name}: {report['tags']['file']}")
    if main_process:
        checkpoints.save_checkpoint(out_dir / "ckpt.safetensors", model, cfg, labels.classes, labels.categories,
                                    labels.m, labels.n, report, preset, checkpoints.clip_weights_record(cfg))
        data.write_json(out_dir / "report.json", report)
        tracker.log_report(report, out_dir / "report.json")
    return report


def tagging(classes: list[str], thresholds: np.ndarray, logits: np.ndarray, test: Split, labelled: bool) -> dict:
    """The per-class tag thresholds (the checkpoint's decision rule for tags) and, on a labelled
    test split, how they tag it beside a fixed 0.5 and the best single threshold."""
    out = {"tag_thresholds": dict(zip(classes, map(float, thresholds)))}
    if labelled:
        probs = metrics.sigmoid(logits[:, :len(classes)])
        out["tagging"] = metrics.tagging_rules(probs, test.dataset.labels_for(test.ids), thresholds,
                                                        pipeline.TAG_THRESHOLD)
    return out


def zero_shot(cfg, model, test: Split, device: str, num_classes: int) -> dict:
    """CLIP zero-shot on the test split: the untrained model (it starts there)."""
    logits = pipeline.predict(model, test.feats, device, pipeline.compute_dtype(device, cfg.amp))
    result = pipeline.evaluate_split(cfg, logits, test, num_classes)
    log(f"CLIP zero-shot on {test.dataset.name}: mAP {result['mAP']:.2f}")
    return result


def start(args: list[str]) -> tuple[config.BACGCNConfig, str, dict | None, runs.RunOptions]:
    """(config, preset, saved state or None, run options) of a command line, every choice checked
    before any work (a world build, caption labels): a device that is not there (or the CPU for a
    preset made for a GPU, unless asked for), a tracker that is not installed, a run folder or
    cache that cannot be written."""
    options, pairs = runs.split_run_options(args)
    state = None
    if options.resume is not None:
        if (Path(options.resume) / "ckpt.safetensors").is_file():
            raise data.DataError(options.resume, "this run has finished (its ckpt.safetensors is written): nothing "
                                                 "to resume; train a new one with another --out")
        state = runs.read_state(options.resume)
        cfg, preset = state["config"].replace(out=str(Path(options.resume).resolve())), state["meta"].get("preset", "")
    elif options.config is not None:
        base, preset = runs.read_config(options.config)
        cfg, _ = config.from_pairs(pairs, base)
    else:
        cfg, preset = config.from_pairs(pairs)
    pipeline.check_device_for_preset(cfg.device, preset)
    tracking.check_available(cfg.tracker, cfg.tracker_uri)
    if options.resume is not None and cfg.tracker == "mlflow":
        tracking.read_run_record(options.resume)
    if cfg.out:
        data.check_writable(cfg.out, "--out", folder=True)
    data.check_writable(cfg.cache_dir, "--cache-dir", folder=True)
    cli.check_outputs_apart([("--out", cfg.out), ("--cache-dir", cfg.cache_dir)],
                            [("--data-root", cfg.data_root), ("--captions", cfg.captions),
                             ("--clip-weights", cfg.clip_weights), ("--synonyms", cfg.synonyms)])
    return cfg, preset, state, options


def help_text(args: Sequence[str]) -> str:
    """--help: the usage, the run options and every config option with the values of the preset
    the rest of the command line chooses (--preset, or the --dataset's)."""
    try:
        pairs = cli.split_options([a for a in args if a not in ("--help", "-h")])
        preset = cli.last_value(pairs, "preset") or config.preset_for(cli.last_value(pairs, "dataset"))
    except ValueError:
        preset = None
    return "\n\n".join((__doc__.strip(), runs.RUN_OPTIONS_HELP, config.options_help(preset)))


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--help" in args or "-h" in args:
        print(help_text(args))
        return 0

    def body() -> int:
        try:
            chosen = start(args)
        except ValueError:
            # Every process of a torchrun job reads the same command line and fails alike: rank 0
            # says why, the others leave quietly, all before any process group is made.
            if not pipeline.launched_as_main_process():
                return pipeline.leave_after_rank_0()
            raise
        try:
            report = run(*chosen)
        except runs.RunStopped as e:
            if pipeline.is_main_process():
                print(f"stopped: {e}", file=sys.stderr)
            return e.code
        if pipeline.is_main_process():
            with runs.console_logged(Path(report["out"])):      # the result ends train.log too
                runs.print_table(report)
                print(f"\n{report['total_seconds']:.0f} s in all; run folder {report['out']}")
        return 0
    try:
        return cli.run_command(body)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
