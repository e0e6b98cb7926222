"""The checkpoint format: a trained head's weights, its caption graph (M, N), its config,
classes and categories and the run's figures in one safetensors file, with a digest of all of
it. Reading one checks everything before any of it is used (a checkpoint is untrusted input:
nothing in it is unpickled or run) and rebuilds the model from the recorded config alone.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

import bacgcn
import config
import data
import frozen_clip
from cache import file_digest

ROOT = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = "bacgcn-1"


def git_commit() -> str:
    """Short hash of the checkout, recorded in checkpoints and benchmark rows."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------------------------
# Checkpoint: model weights, caption graph and config in one safetensors file
# --------------------------------------------------------------------------------------------

# Paths the checkpoint records as absolute, so that eval.py run from another folder finds (and
# reports) the same files, never whatever its own working directory holds under those names.
RECORDED_PATHS = ("clip_weights", "data_root", "cache_dir")


DIGEST_KEY = "sha256"   # metadata key of the digest of a file's tensors and other metadata


def content_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and every metadata entry but the
    digest itself: written with a checkpoint or run state, checked when it is read, so a byte
    changed on disk is refused instead of training or scoring with other weights."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    for key in sorted(k for k in meta if k != DIGEST_KEY):
        digest.update(f"{key}\0{meta[key]}\0".encode())
    return digest.hexdigest()


def with_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    return {**meta, DIGEST_KEY: content_digest(tensors, meta)}


def check_digest(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    if meta.get(DIGEST_KEY) != content_digest(tensors, meta):
        raise data.DataError(path, "its content does not match the digest written with it (changed or damaged "
                                   "on disk since)" if DIGEST_KEY in meta else "holds no digest of its content")


def check_finite(path, tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise data.DataError(path, f"tensor {key} holds NaN or infinite values")


def save_checkpoint(path: Path, model, cfg, classes, categories, m, n, report, preset,
                    clip_weights: dict | None = None) -> None:
    """`clip_weights`: what pipeline.clip_weights_record says of the CLIP weights (name, sha256,
    file), so that another machine finds them by name or by digest."""
    from safetensors.torch import save_file

    cfg = cfg.replace(**{k: os.path.abspath(getattr(cfg, k)) for k in RECORDED_PATHS
                         if getattr(cfg, k) and not (k == "clip_weights" and clip_weights and clip_weights.get("name")
                                                     == cfg.clip_weights)})   # a name stays a name
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["graph.M"] = torch.from_numpy(np.asarray(m, dtype=np.float32))
    tensors["graph.N"] = torch.from_numpy(np.asarray(n, dtype=np.float32))
    meta = {"format": CHECKPOINT_FORMAT, "config": cfg.to_json(), "classes": json.dumps(list(classes)),
            "categories": json.dumps(list(categories)), "metrics": json.dumps(data.json_safe(report)),
            "commit": git_commit(), "preset": preset}
    if clip_weights:
        meta["clip_weights"] = json.dumps(clip_weights)
    data.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=with_digest(tensors, meta)))


def _recorded_json(path: str, meta: dict, key: str):
    if key not in meta:
        raise data.DataError(path, f"checkpoint metadata lacks {key!r}")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise data.DataError(path, f"checkpoint metadata {key!r} is not JSON ({e})") from None


def _recorded_names(path: str, meta: dict, key: str) -> list[str]:
    names = _recorded_json(path, meta, key)
    if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
        raise data.DataError(path, f"checkpoint metadata {key!r} is not a list of names")
    return names


def _recorded_weights(path: str, meta: dict) -> dict:
    record = _recorded_json(path, meta, "clip_weights")
    if not (isinstance(record, dict) and isinstance(record.get("sha256"), str) and isinstance(record.get("path"), str)
            and isinstance(record.get("name"), (str, type(None)))):
        raise data.DataError(path, "checkpoint metadata 'clip_weights' is not {name, sha256, path}")
    return record


def recorded_weights(meta: dict) -> dict | None:
    """The CLIP weights a checkpoint (read by read_checkpoint) records: {name, sha256, path};
    None for a checkpoint written before they were recorded."""
    return json.loads(meta["clip_weights"]) if "clip_weights" in meta else None


def read_checkpoint(path: str):
    """(config, classes, categories, tensors, metadata) of a train.py checkpoint; a file that is
    not one, or whose parts disagree, is a one-line DataError naming it."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise data.DataError(path, "checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise data.DataError(path, f"not a safetensors checkpoint ({str(e).splitlines()[0][:160]})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise data.DataError(path, "not a checkpoint written by train.py (no bacgcn metadata)")
    check_digest(path, tensors, meta)
    if "config" not in meta:
        raise data.DataError(path, "checkpoint metadata lacks 'config'")
    try:
        cfg = config.BACGCNConfig.from_json(meta["config"])
        config.validate(cfg)
    except json.JSONDecodeError as e:
        raise data.DataError(path, f"recorded config is not JSON ({e})") from None
    except (ValueError, TypeError) as e:
        raise data.DataError(path, f"recorded config: {e}") from None
    classes, categories = _recorded_names(path, meta, "classes"), _recorded_names(path, meta, "categories")
    if categories[:len(classes)] != classes:
        raise data.DataError(path, "recorded categories do not start with the recorded classes")
    meta = {**meta, "metrics": json.dumps(_recorded_json(path, meta, "metrics") if "metrics" in meta else {})}
    if "clip_weights" in meta:
        _recorded_weights(path, meta)
    check_checkpoint_tensors(path, tensors, len(categories))
    return cfg, classes, categories, tensors, meta


def shape_text(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def check_checkpoint_tensors(path: str, tensors: dict[str, torch.Tensor], num_categories: int) -> None:
    """The graph and the prompts fit the recorded categories, and no weight is NaN or infinite."""
    o = num_categories
    expected = {"graph.M": (o, o), "graph.N": (o,), "model.logit_scale": ()}
    for key in (*expected, "model.kernel.prompts"):
        if key not in tensors:
            raise data.DataError(path, f"checkpoint lacks the tensor {key}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise data.DataError(path, f"tensor {key} has shape {shape_text(tensors[key])}, expected "
                                       f"[{', '.join(map(str, shape))}] for {o} categories")
    prompts = tensors["model.kernel.prompts"]
    if prompts.dim() != 2 or prompts.shape[0] != o or prompts.shape[1] == 0:
        raise data.DataError(path, f"tensor model.kernel.prompts has shape {shape_text(prompts)}, expected "
                                   f"[{o}, embedding size] for {o} categories")
    for key in (*expected, "model.kernel.prompts"):      # integer prompts or counts would load, rounded, unseen
        if tensors[key].dtype != torch.float32:
            raise data.DataError(path, f"tensor {key} is {tensors[key].dtype}, train.py writes torch.float32")
    check_finite(path, tensors)


def check_fits(path, saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor], prefix: str) -> None:
    """The saved tensors are those of the model the recorded config builds (`own`), shape for
    shape and dtype for dtype; else one line naming the tensor and both (load_state_dict's is a
    traceback for a shape, and a silent conversion for a dtype)."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        what = f"lacks the tensor {prefix}{missing[0]}" if missing else \
            f"has an unexpected tensor {prefix}{unexpected[0]}"
        raise data.DataError(path, f"{what} for the recorded config")
    for k, v in own.items():
        if saved[k].shape != v.shape:
            raise data.DataError(path, f"tensor {prefix}{k} has shape {shape_text(saved[k])}, the recorded config "
                                       f"gives {shape_text(v)}")
        if saved[k].dtype != v.dtype:        # load_state_dict would convert it silently
            raise data.DataError(path, f"tensor {prefix}{k} is {saved[k].dtype}, the recorded config gives {v.dtype}")


# The GCN's sparse graph is rebuilt from graph.M, graph.N and the config; the stored copy must
# match it (its indices address node rows: a forged one could read out of bounds in a kernel).
GRAPH_BUFFERS = ("gcn.indptr", "gcn.indices", "gcn.values")


def model_from_checkpoint(path: str, cfg, classes, tensors) -> bacgcn.BACGCN:
    """The trained head rebuilt from a checkpoint's tensors and recorded config."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    prompts = torch.zeros_like(state["kernel.prompts"], dtype=torch.float32)
    model = bacgcn.build_model(cfg, prompts, len(classes), tensors["graph.M"], tensors["graph.N"],
                        float(state["logit_scale"]))
    own = model.state_dict()
    check_fits(path, state, own, "model.")
    for k, v in own.items():
        if k in GRAPH_BUFFERS and not torch.allclose(state[k].to(v.dtype), v, rtol=1e-5, atol=1e-6):
            raise data.DataError(path, f"tensor model.{k} does not match the graph rebuilt from graph.M, graph.N "
                                       "and the recorded config")
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------------------------
# The CLIP weights a checkpoint records, and finding them on another machine
# --------------------------------------------------------------------------------------------

def clip_weights_record(cfg: config.BACGCNConfig) -> dict:
    """What a checkpoint records of its CLIP weights: the name (where they have one), the
    sha256 and the file, so that another machine finds them by name or by digest."""
    path = frozen_clip.weights_file(cfg.clip_weights, cfg.clip_model)
    digest = file_digest(path)
    return {"name": cfg.clip_weights if frozen_clip.is_named(cfg.clip_weights) else frozen_clip.name_of_digest(digest),
            "sha256": digest, "path": os.path.abspath(path)}


def clip_weights_here(path: str, cfg: config.BACGCNConfig, record: dict | None,
                      given: bool) -> config.BACGCNConfig:
    """The CLIP weights to rebuild a checkpoint with on this machine. Recorded by name, they
    come from the Hugging Face cache (fetched once); recorded as a file that is not here, by
    the name the checkpoint records for its digest; else one line saying which --clip-weights to
    pass. A file given by the user that is not the recorded one is said in a warning."""
    if frozen_clip.is_named(cfg.clip_weights) or record is None:
        return cfg
    if given:
        if Path(cfg.clip_weights).is_file() and file_digest(cfg.clip_weights) != record["sha256"]:
            print(f"WARNING: {data.shown_path(cfg.clip_weights)} holds other CLIP weights than {data.shown_path(path)} "
                  f"was trained with (sha256 {record['sha256'][:16]}...): its scores will not be the trained ones",
                  flush=True)
        return cfg
    if Path(cfg.clip_weights).is_file():
        return cfg
    if record.get("name"):
        print(f"{data.shown_path(cfg.clip_weights)} is not here: the CLIP weights by their name, "
              f"--clip-weights={record['name']}", flush=True)
        return cfg.replace(clip_weights=record["name"])
    raise data.DataError(path, f"its CLIP weights {data.shown_path(cfg.clip_weights)} are not on this machine: pass "
                               f"--clip-weights=FILE, the file with sha256 {record['sha256']}")
