"""The CLIP side: open_clip model creation (the project's configs registered), CLIP weight
files (safetensors, weights-only state dicts, OpenAI's TorchScript archive by choice) and their
`convert`, and the frozen backbone with its read-outs.

The backbone turns images into what BAC-GCN needs from a frozen CLIP:
  g        [B, E]     the usual image embedding (cls token, ln_post, proj)
  patches  [B, N, E]  text-aligned patch embeddings: the last block with self-only attention
                      (each token attends to itself), then ln_post and proj, L2-normalised
  attn     [B, N]     the [cls] attention of the last block over the patches (head mean)
and class prompt embeddings from the text tower with a prompt ensemble.

It works the same on OpenAI ViT-B/16 (open_clip `ViT-B-16-quickgelu`) and on the project's
tiny CLIP (`synthclip-vit-t8`, assets/), both built by `open_clip.create_model`.

  python frozen_clip.py convert ViT-B-16.pt ViT-B-16.safetensors   # OpenAI's TorchScript archive, once
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import check_outputs_apart, run_command
from config import PATCH_READOUTS, SUBSET_READOUTS, WEIGHT_FORMATS
from data import DataError

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Prompt ensemble for class embeddings (a subset of CLIP's ImageNet templates that reads well
# for multi-label scenes).
PROMPT_TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.",
    "a {} in the scene.", "a photo of a small {}.", "a photo of a large {}.", "there is a {} in the photo.",
)


def register_local_model_configs() -> None:
    """Make the project's open_clip model configs (assets/*.json) known to open_clip."""
    import open_clip

    for cfg in ASSETS.glob("*-vit-*.json"):
        if cfg.stem not in open_clip.list_models():
            open_clip.add_model_config(cfg)


def resize_position_embedding(pos: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """[1 + old*old, W] -> [1 + new*new, W]: the [cls] row kept, the grid resized bicubically.
    Differentiable, so a vision tower can also be trained at a size it is later read at."""
    cls, grid = pos[:1], pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(new * new, -1)])


def grid_for(visual, size: int) -> tuple[int, int]:
    """(native grid side, grid side at `size` px) of an open_clip vision tower."""
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    return visual.grid_size[0], size // patch


def set_image_size(model, size: int) -> None:
    """Run the vision tower at `size` px: bicubic interpolation of the position embeddings
    (e.g. ViT-B/16 at 448: 14x14 -> 28x28 patches)."""
    v = model.visual
    old, new = grid_for(v, size)
    if new == old:
        return
    v.positional_embedding = nn.Parameter(resize_position_embedding(v.positional_embedding.data, old, new))
    v.grid_size = (new, new)
    v.image_size = (size, size)


# open_clip 3.3 logs through the module-level `logging` calls, i.e. the root logger: that is the
# logger its records come from, so the filter sits there (its level stays untouched).
OPEN_CLIP_LOGGER = logging.getLogger()


class _RandomInitWarningFilter(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" record: every
    model here is created empty and loaded (strict) right after. Nothing else is filtered."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_open_clip = f"{os.sep}open_clip{os.sep}" in record.pathname
        return not (from_open_clip and record.getMessage().startswith("No pretrained weights loaded"))


# --------------------------------------------------------------------------------------------
# Weights by name: open_clip's pretrained registry names the Hugging Face repository; the project
# pins the revision and the file's sha256, so a name always means the same bytes.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainedWeights:
    """Weights a user asks for by name (`--clip-weights=openai`): fetched once into the Hugging
    Face hub's cache (safetensors only: nothing pickled, nothing TorchScript) and checked by
    sha256 before they are used."""
    model: str          # the open_clip architecture they load into, strict
    tag: str            # open_clip's pretrained tag: its registry gives the hub repository
    filename: str       # the safetensors file of that repository
    revision: str       # the repository's commit, pinned
    sha256: str         # of the file at that commit
    title: str = ""     # what messages call them


PRETRAINED: dict[str, PretrainedWeights] = {
    # OpenAI's ViT-B/16 as open_clip serves it (QuickGELU), the paper's backbone.
    "openai": PretrainedWeights("ViT-B-16-quickgelu", "openai", "open_clip_model.safetensors",
                                "977e3dd0ec55ab8da155f2fbeb6b5f54948b6e3d",
                                "4b8699299b1e8997753c64b052ba32031449d5d853f55a039148560ee02b820f",
                                "OpenAI's ViT-B/16 weights"),
}


def is_named(weights: str) -> bool:
    """Whether --clip-weights names weights of the registry rather than a file."""
    return weights in PRETRAINED


def hub_repository(entry: PretrainedWeights) -> str:
    """The Hugging Face repository open_clip's pretrained registry names for `entry`."""
    import open_clip

    hub = (open_clip.get_pretrained_cfg(entry.model, entry.tag) or {}).get("hf_hub", "")
    if not hub:
        raise ValueError(f"open_clip names no Hugging Face repository for {entry.model} {entry.tag!r}")
    return hub.rstrip("/")


def hub_url(entry: PretrainedWeights) -> str:
    return f"https://huggingface.co/{hub_repository(entry)}/resolve/{entry.revision}/{entry.filename}"


def pretrained_file(name: str, model_name: str) -> Path:
    """The local file of the weights named `name`: from the hub's cache, downloaded there the
    first time (with a progress bar), its sha256 checked. Offline with nothing cached, or a file
    that is not the pinned one: a one-line DataError saying what to place where."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import logging as hub_logging

    from cache import file_digest

    entry = PRETRAINED[name]
    if model_name != entry.model:
        raise DataError(f"--clip-weights={name}", f"{entry.title or name} load into {entry.model}, not "
                                                  f"{model_name} (pass --clip-model={entry.model})")
    repo = hub_repository(entry)
    if not isinstance(try_to_load_from_cache(repo, entry.filename, revision=entry.revision), str) \
            and not constants.HF_HUB_OFFLINE:
        print(f"{entry.title or name}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) yet: fetching "
              f"{hub_url(entry)} (once)", file=sys.stderr, flush=True)
    # The hub client retries a refused connection five times, with a warning each: the one line below says it all.
    hub_logger = hub_logging.get_logger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        path = Path(hf_hub_download(repo, entry.filename, revision=entry.revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        reason = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else str(e).splitlines()[0][:120]
        raise DataError(f"--clip-weights={name}", f"{entry.title or name} are not in the Hugging Face cache "
                                                  f"({constants.HF_HUB_CACHE}) and cannot be downloaded ({reason}): "
                                                  f"download {hub_url(entry)} and pass --clip-weights=FILE, or run "
                                                  f"`hf download {repo} {entry.filename} --revision {entry.revision}` "
                                                  "where there is a network and copy that cache here") from None
    finally:
        hub_logger.setLevel(level)
    digest = file_digest(path)
    if digest != entry.sha256:
        raise DataError(path, f"not {entry.title or name} as pinned for --clip-weights={name} (sha256 "
                              f"{digest[:16]}..., expected {entry.sha256[:16]}...): delete its cache folder "
                              f"{path.parents[2]} and run again")     # snapshots/<revision>/<file>: the blob too
    return path


def weights_file(weights: str, model_name: str) -> Path:
    """--clip-weights as a local file: a name of the registry (fetched, checked) or a path."""
    return pretrained_file(weights, model_name) if is_named(weights) else Path(weights)


def name_of_digest(sha256: str) -> str | None:
    """The registry's name of the weights with this sha256, if any."""
    return next((name for name, entry in PRETRAINED.items() if entry.sha256 == sha256), None)


def create_clip(model_name: str, weights: str | os.PathLike | None = None, weights_format: str = "auto"):
    """An open_clip CLIP, random-init or loaded with strict=True from a local file.

    Weight files: safetensors or a weights-only torch state dict (.pt/.bin); OpenAI's TorchScript
    archive (for `*-quickgelu` OpenAI models) only with weights_format="openai-torchscript" (see
    `read_state_dict`). A file of another architecture is an error of one line that names the
    expected architecture.
    """
    import open_clip

    register_local_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {model_name!r} (OpenAI ViT-B/16 weights: ViT-B-16-quickgelu)")
    drop = _RandomInitWarningFilter()
    OPEN_CLIP_LOGGER.addFilter(drop)
    try:
        model = open_clip.create_model(model_name, pretrained=None)
    finally:
        OPEN_CLIP_LOGGER.removeFilter(drop)
    if weights is not None:
        load_strict(model, read_state_dict(weights, weights_format), weights, model_name)
    model.eval()
    return model


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source, model_name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise DataError(source, f"not a {model_name} checkpoint ({first[:160]})") from None


def weights_kind(path: str | os.PathLike) -> str:
    """What a weights file holds, judged from its bytes alone (nothing is unpickled or run):
    "safetensors", "torchscript" (a zip with TorchScript's constants.pkl) or "torch" (anything
    else: torch.load with weights_only=True decides)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":              # safetensors: a u64 header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torch"
        return "torchscript" if any(n.endswith("/constants.pkl") for n in names) else "torch"
    return "torch"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DataError(path, f"not a safetensors file ({str(e).splitlines()[0][:160]})") from None


def _load_torch(path: Path):
    import pickle
    import struct

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    # what torch.load raises on junk, truncated files and pickles that hold more than tensors
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError, KeyError, OverflowError,
            struct.error) as e:
        raise DataError(path, f"not a PyTorch state dict (torch.load with weights_only=True: {type(e).__name__})") \
            from None


def _load_torchscript(path: Path) -> dict[str, torch.Tensor]:
    import warnings

    try:
        with warnings.catch_warnings():   # torch's deprecation notice of jit.load: the user chose this format
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except (RuntimeError, ValueError) as e:
        raise DataError(path, f"not a loadable TorchScript archive ({str(e).splitlines()[0][:160]})") from None


def raw_state_dict(path: str | os.PathLike, weights_format: str = "auto") -> dict[str, torch.Tensor]:
    """The tensors of a weights file as stored (dtype kept), keys as open_clip names them.

    "auto" reads safetensors or a torch state dict through torch.load(weights_only=True) and
    refuses a TorchScript archive: torch.jit.load would run the code such an archive carries.
    "openai-torchscript" also reads OpenAI's archive (ViT-B-16.pt) with torch.jit.load."""
    path = Path(path)
    if weights_format not in WEIGHT_FORMATS:
        raise ValueError(f"--clip-weights-format must be one of {', '.join(WEIGHT_FORMATS)}, got {weights_format!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP weights not found")
    kind = weights_kind(path)
    if kind == "safetensors" or path.suffix == ".safetensors":
        return _load_safetensors(path)
    if kind == "torchscript" and weights_format != "openai-torchscript":
        raise DataError(path, "a TorchScript archive, which can carry code: pass "
                              "--clip-weights-format=openai-torchscript to load it, or convert it once with "
                              f"`python frozen_clip.py convert {path} {path.with_suffix('.safetensors')}`")
    obj = _load_torchscript(path) if kind == "torchscript" else _load_torch(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise DataError(path, f"not a PyTorch state dict (it holds {'an empty ' if obj == {} else 'a '}"
                              f"{type(obj).__name__})")
    odd = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise DataError(path, f"not a PyTorch state dict (entry {odd!r} is not a tensor)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    # OpenAI archives carry three metadata entries open_clip does not have.
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return state


def read_state_dict(path: str | os.PathLike, weights_format: str = "auto") -> dict[str, torch.Tensor]:
    """`raw_state_dict` with floating tensors in fp32 (what the models are built in)."""
    state = raw_state_dict(path, weights_format)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def convert(source: str | os.PathLike, dest: str | os.PathLike, model_name: str = "ViT-B-16-quickgelu") -> int:
    """OpenAI's TorchScript archive -> a safetensors state dict (same dtypes) that `model_name`
    loads strict, checked before it is written (atomically). Returns the tensor count."""
    from safetensors.torch import save_file

    from data import atomic_write

    dest = Path(dest)
    if dest.exists():
        raise DataError(dest, "exists; remove it or choose another name")
    state = {k: v.detach().clone().contiguous() for k, v in raw_state_dict(source, "openai-torchscript").items()}
    load_strict(create_clip(model_name), {k: v.float() for k, v in state.items()}, source, model_name)
    atomic_write(dest, lambda tmp: save_file(state, str(tmp), metadata={"model": model_name,
                                                                       "converted_from": Path(source).name}))
    return len(state)


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, size, size], resized (antialiased) and CLIP-normalised."""
    x = images.float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIPBackbone(nn.Module):
    """Frozen-CLIP feature extractor (see the module docstring). Differentiable, so the tiny
    CLIP's pretraining can train its patch read-out too."""

    def __init__(self, clip: nn.Module, patch_readout: str = "self_attention"):
        super().__init__()
        if patch_readout not in PATCH_READOUTS:
            raise ValueError(f"patch_readout must be one of {PATCH_READOUTS}, got {patch_readout!r}")
        self.clip = clip
        self.visual = clip.visual
        self.patch_readout = patch_readout

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else size

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.shape[1]

    def _qkv(self, block, x):
        attn = block.attn
        w, b = attn.in_proj_weight, attn.in_proj_bias
        return F.linear(block.ln_1(x), w, b).chunk(3, dim=-1)

    def encode_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: preprocessed images [B, 3, S, S]. Returns g, patches (both L2-normalised), attn."""
        out = self._encode(x)
        return {k: out[k] for k in ("g", "patches", "attn")}

    def _encode(self, x: torch.Tensor, cls_only_g: bool = False) -> dict[str, torch.Tensor]:
        """encode_image's outputs plus what a one-pass subset read-out reuses: the last block's
        input `h` [B, T, W] and its q, k, v. `cls_only_g` computes g from the [cls] row of the
        last block alone (`cls_over_subset` with every patch), not the whole block: the patch
        read-out already runs the block's MLP on every token, so this saves a second pass
        (equal to the full block within float rounding, ~1e-7)."""
        v = self.visual
        h = v._embeds(x)
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            h = blk(h)
        last = blocks[-1]
        # [cls] attention of the last block, mean over heads.
        q, k, val = self._qkv(last, h)
        heads = last.attn.num_heads
        bsz, n_tok, width = h.shape
        qh = q.view(bsz, n_tok, heads, -1).transpose(1, 2)
        kh = k.view(bsz, n_tok, heads, -1).transpose(1, 2)
        cls_attn = torch.softmax(qh[:, :, :1] @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)
        attn = cls_attn.mean(1)[:, 0, 1:]                                     # [B, N]
        internals = {"h": h, "q": q, "k": k, "v": val}
        if cls_only_g:
            every = torch.arange(n_tok - 1, device=h.device).expand(bsz, -1)
            g = self.cls_over_subset(internals, every)
        else:
            g = F.normalize(v.ln_post(last(h)[:, 0]) @ v.proj, dim=-1)
        # Self-only attention: softmax over one key is 1, so the attention output of each
        # token is out_proj(its own value).
        own = F.linear(val, last.attn.out_proj.weight, last.attn.out_proj.bias)
        if self.patch_readout == "self_attention":
            p = h + last.ls_1(own)
            p = p + last.ls_2(last.mlp(last.ln_2(p)))
        else:  # "value": the attention output alone (MaskCLIP)
            p = own
        patches = v.ln_post(p[:, 1:]) @ v.proj
        return {"g": g, "patches": F.normalize(patches, dim=-1), "attn": attn, **internals}

    def encode_subset(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Global embedding [B, E] of the image seen through a subset of its patches only:
        [cls] + the patch tokens `keep` [B, K] (indices into the N patches), same K per image."""
        v = self.visual
        h = v._embeds(x)
        patches = h[:, 1:].gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
        h = torch.cat([h[:, :1], patches], dim=1)
        for blk in v.transformer.resblocks:
            h = blk(h)
        return F.normalize(v.ln_post(h[:, 0]) @ v.proj, dim=-1)

    def cls_over_subset(self, enc: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """One-pass subset read-out: the [cls] token through the last block when its attention
        sees only itself and the patches `keep` [B, K], from `_encode`'s h, q, k, v; the blocks
        below are shared with the full image. With every patch kept it equals g."""
        last = self.visual.transformer.resblocks[-1]
        h, q = enc["h"], enc["q"]
        bsz, _, width = h.shape
        heads = last.attn.num_heads
        tokens = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)     # [cls] + kept patches
        index = tokens[..., None].expand(-1, -1, width)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, t.shape[1], heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(split_heads(q[:, :1]), split_heads(enc["k"].gather(1, index)),
                                           split_heads(enc["v"].gather(1, index)))
        a = F.linear(a.transpose(1, 2).reshape(bsz, 1, width), last.attn.out_proj.weight, last.attn.out_proj.bias)
        c = h[:, :1] + last.ls_1(a)
        c = c + last.ls_2(last.mlp(last.ln_2(c)))
        return F.normalize(self.visual.ln_post(c[:, 0]) @ self.visual.proj, dim=-1)

    def features(self, x: torch.Tensor, h_fraction: float,
                 subset_readout: str = "last_block") -> dict[str, torch.Tensor]:
        """Everything BAC-GCN caches per image: patches P, g, g^H, g^Hc and the attention map
        (min-max normalised). H is the `h_fraction` most-attended patches, a fixed count so a
        batch stays dense; H^c is the rest. `subset_readout`: "reencode" runs [cls] + each
        subset through every block (2.2x the encoder's cost), "last_block" restricts only the
        last block's [cls] attention to it (one pass)."""
        enc = self._encode(x, cls_only_g=subset_readout == "last_block")
        attn = enc["attn"]
        lo, hi = attn.amin(1, keepdim=True), attn.amax(1, keepdim=True)
        attn = (attn - lo) / (hi - lo).clamp_min(1e-12)
        n = attn.shape[1]
        n_h = min(n - 1, max(1, round(h_fraction * n)))
        order = torch.sort(attn, dim=1, descending=True, stable=True).indices
        if subset_readout == "last_block":
            g_h, g_hc = self.cls_over_subset(enc, order[:, :n_h]), self.cls_over_subset(enc, order[:, n_h:])
        elif subset_readout == "reencode":
            g_h, g_hc = self.encode_subset(x, order[:, :n_h]), self.encode_subset(x, order[:, n_h:])
        else:
            raise ValueError(f"subset_readout must be one of {SUBSET_READOUTS}, got {subset_readout!r}")
        return {"g": enc["g"], "patches": enc["patches"], "attn": attn, "gH": g_h, "gHc": g_hc}

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    @torch.no_grad()
    def class_embeddings(self, names: Sequence[str], tokenizer, templates: Sequence[str] = PROMPT_TEMPLATES,
                         device: torch.device | str = "cpu", desc: str = "") -> torch.Tensor:
        """[C, E] prompt-ensemble embeddings: mean of the normalised template embeddings; with a
        progress bar named `desc` where one is given (ViT-B/16's text tower on a CPU takes a
        couple of seconds a category)."""
        from tqdm import tqdm

        out = []
        bar = tqdm(names, desc=desc, unit="category", file=sys.stderr, mininterval=2, miniters=1, disable=not desc,
                   leave=False, delay=2)     # shown only when slow (ViT-B/16 on a CPU), never for a tiny CLIP
        for name in bar:
            tokens = tokenizer([t.format(name) for t in templates]).to(device)
            out.append(F.normalize(self.encode_text(tokens).mean(0), dim=-1))
        return torch.stack(out)


def tokenizer_for(model_name: str):
    import open_clip

    register_local_model_configs()
    return open_clip.get_tokenizer(model_name)


def model_config(model_name: str) -> dict:
    import open_clip

    register_local_model_configs()
    return json.loads(json.dumps(open_clip.get_model_config(model_name)))


# ============================================================================================
# CLI
# ============================================================================================

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frozen_clip.py", description="CLIP weight files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="OpenAI's TorchScript archive -> a safetensors state dict (once)",
                       description="Read OpenAI's TorchScript archive (torch.jit.load: run it on a file you trust) "
                                   "and write its weights as safetensors, which load without running any code.")
    p.add_argument("source", help="OpenAI's archive, e.g. ViT-B-16.pt")
    p.add_argument("dest", help="the safetensors file to write, e.g. ViT-B-16.safetensors")
    p.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip architecture that must load it strict")
    args = parser.parse_args(argv)

    def body() -> None:
        check_outputs_apart([("dest", args.dest)], [("source", args.source)])
        count = convert(args.source, args.dest, args.model)
        print(f"wrote {args.dest}: {count} tensors; {args.model} loads it strict (--clip-weights={args.dest})")
    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
