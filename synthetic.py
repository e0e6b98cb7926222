"""The proving ground: a procedural multi-label world, its captions, and CLIP zero-shot on it.

  python synthetic.py build    --out DIR [--seed S] [--train N] [--test M]
  python synthetic.py zeroshot --data DIR --json out.json [--scores scores.csv] [--weights FILE]

The world: objects of 12 classes on 8 smooth background textures. A class is its fill pattern
(stripes of one orientation, checks, dots, rings, grid, zigzag, ...), bold enough to be read
inside one 8 x 8 patch; colours, silhouette, rotation and size are random, so nothing else
identifies it. Scenes hold 1-4 objects with log-uniform sizes (from ~0.3% to 40% of the image:
small objects are common), strong but not deterministic object-background and object-object
co-occurrence, and sometimes two backgrounds (sky over grass, wall over floor, ...).

Images are rendered at 128 px and the tiny CLIP reads them at 64 px, as a real CLIP reads a
photo at 224: the pattern of a small object does not survive the downscale, and a crop of the
original (ReSO) recovers it.

Captions come in two kinds. *Web captions* (tiny-CLIP pretraining, made on the fly) mostly name
the most prominent object, which gives the tiny CLIP the prominent-object bias of the real one.
*BLIP-style captions* (the training split, written to captions.json / re_captions.json in the
format of the paper's files) have 6 prompts with slot roles and the errors of one captioner
looking at one image (`CaptionNoise`, fit to the paper's real BLIP-2 captions of VOC2007 by
bench/caption_fit.py): small objects and a few inconspicuous classes missed by all 12 captions,
classes imagined from their usual background or companions and named again and again, one-off
slips, repetition loops, synonyms.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

import registry
from cli import check_outputs_apart, check_own_folder, integer_from, run_command
from data import (
    DataError,
    atomic_write,
    check_writable,
    temp_file_of,
    write_json,
)

if TYPE_CHECKING:  # torch is imported where it is used: `build` needs only numpy and Pillow
    import torch

ROOT = Path(__file__).resolve().parent

# ============================================================================================
# The world
# ============================================================================================

RENDER_SIZE = 128      # pixels of the stored JPEGs
HORIZON_WAVE = 3 / 128 # amplitude of the horizon's wobble, a fraction of the image

BACKGROUNDS = ("sky", "grass", "water", "sand", "snow", "road", "wall", "floor")
# Two-background scenes: (upper, lower).
SPLIT_SCENES = (("sky", "grass"), ("sky", "water"), ("sky", "sand"), ("sky", "snow"), ("sky", "road"),
                ("wall", "floor"))


@dataclass(frozen=True)
class ObjectClass:
    name: str
    pattern: str
    habitats: tuple[str, ...]      # backgrounds it usually lives on
    synonyms: tuple[str, ...]      # other names captions use


CLASSES = (
    ObjectClass("aeroplane", "hstripes", ("sky",), ("airplane", "plane", "jet")),
    ObjectClass("bird", "dots", ("sky", "grass"), ("seagull", "sparrow")),
    ObjectClass("kite", "diamonds", ("sky", "sand"), ()),
    ObjectClass("boat", "vstripes", ("water",), ("ship", "sailboat")),
    ObjectClass("duck", "rings", ("water", "grass"), ("duckling",)),
    ObjectClass("car", "checker", ("road",), ("automobile", "taxi")),
    ObjectClass("bus", "grid", ("road",), ("coach",)),
    ObjectClass("bicycle", "diagonal", ("road", "grass"), ("bike",)),
    ObjectClass("cow", "crosses", ("grass",), ("cattle", "calf")),
    ObjectClass("sheep", "zigzag", ("grass", "snow"), ("lamb",)),
    ObjectClass("chair", "triangles", ("floor",), ("armchair", "stool")),
    ObjectClass("tv", "antidiagonal", ("wall", "floor"), ("television", "monitor")),
)
CLASS_NAMES = tuple(c.name for c in CLASSES)
BACKGROUND_SYNONYMS = {
    "sky": ("clouds", "blue sky"), "grass": ("meadow", "lawn"), "water": ("lake", "sea"),
    "sand": ("beach", "desert"), "snow": ("snowfield",), "road": ("street", "highway"),
    "wall": ("plaster wall",), "floor": ("carpet", "wooden floor"),
}
# Object-object co-occurrence: a second object is drawn from its partners half of the time.
PARTNERS = {
    "aeroplane": ("bird", "kite"), "bird": ("kite", "aeroplane", "duck"), "kite": ("bird",),
    "boat": ("duck",), "duck": ("boat", "bird"), "car": ("bus", "bicycle"), "bus": ("car",),
    "bicycle": ("car",), "cow": ("sheep",), "sheep": ("cow",), "chair": ("tv",), "tv": ("chair",),
}


@dataclass
class WorldConfig:
    seed: int = 0
    train: int = 5000
    test: int = 2000
    min_area: float = 0.003      # object area, fraction of the image (log-uniform between)
    max_area: float = 0.40
    p_split: float = 0.35        # scenes with two backgrounds
    p_habitat: float = 0.8       # an object sits on one of its habitats (else anywhere)
    p_partner: float = 0.5       # a further object is a partner of one already there
    n_objects_p: tuple[float, ...] = (0.35, 0.30, 0.20, 0.15)   # P(1..4 objects)


@dataclass
class SceneObject:
    cls: int
    box: tuple[float, float, float, float]   # xmin, ymin, xmax, ymax in render pixels
    area: float                              # box area / image area

    @property
    def name(self) -> str:
        return CLASS_NAMES[self.cls]


@dataclass
class Scene:
    image: np.ndarray                 # uint8 [H, W, 3]
    objects: list[SceneObject]
    backgrounds: list[str]            # 1 or 2, upper first
    bg_fraction: list[float] = field(default_factory=list)

    @property
    def classes(self) -> set[int]:
        return {o.cls for o in self.objects}

    def by_prominence(self) -> list[SceneObject]:
        return sorted(self.objects, key=lambda o: -o.area)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a cells x cells random grid, bicubic-like upsampled."""
    grid = rng.uniform(-1, 1, (cells + 3, cells + 3))
    t = np.linspace(1, cells + 1, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    # Catmull-Rom weights along each axis
    w = np.stack([((-f + 2) * f - 1) * f / 2, ((3 * f - 5) * f * f + 2) / 2,
                  ((-3 * f + 4) * f + 1) * f / 2, (f - 1) * f * f / 2])      # [4, size]
    rows = sum(w[k][:, None] * grid[i + k - 1] for k in range(4))          # [size, cells+3]
    out = sum(w[k][None, :] * rows[:, i + k - 1] for k in range(4))        # [size, size]
    return np.clip(out, -1, 1)


def render_background(rng: np.random.Generator, kind: str, size: int = RENDER_SIZE) -> np.ndarray:
    """A smooth natural texture [size, size, 3] in [0, 1]; nothing periodic at pattern scale."""
    y = np.linspace(0, 1, size)[:, None, None]
    n1 = _smooth_noise(rng, size, 4)[:, :, None]
    n2 = _smooth_noise(rng, size, 10)[:, :, None]
    jitter = rng.uniform(-0.05, 0.05, 3)
    if kind == "sky":
        top, bottom = np.array([0.25, 0.45, 0.85]), np.array([0.65, 0.8, 0.97])
        img = top + (bottom - top) * y
        cloud = np.clip(n1 * 1.5 - 0.3, 0, 1)
        img = img * (1 - cloud * 0.8) + cloud * 0.8 * np.array([0.97, 0.97, 0.98])
    elif kind == "grass":
        img = np.array([0.25, 0.55, 0.2]) + 0.08 * n1 + 0.06 * n2 * np.array([0.5, 1, 0.3])
    elif kind == "water":
        ripple = np.sin(np.linspace(0, 2 * np.pi * rng.uniform(2, 3.5), size))[:, None, None]
        img = np.array([0.1, 0.35, 0.6]) + 0.07 * n1 + 0.03 * ripple * (1 + n2)
    elif kind == "sand":
        img = np.array([0.85, 0.75, 0.52]) + 0.06 * n1 + 0.03 * n2
    elif kind == "snow":
        img = np.array([0.92, 0.94, 0.98]) + 0.04 * n1 - 0.05 * np.clip(n2, 0, 1) * np.array([1, 0.6, 0])
    elif kind == "road":
        img = np.array([0.33, 0.33, 0.35]) + 0.05 * n1 + 0.02 * n2 + rng.normal(0, 0.015, (size, size, 1))
    elif kind == "wall":
        base = np.array(rng.choice([[0.86, 0.8, 0.7], [0.8, 0.66, 0.62], [0.72, 0.76, 0.8]]))
        img = base + 0.03 * n1 + 0.015 * n2
    elif kind == "floor":
        img = np.array([0.5, 0.33, 0.18]) + 0.06 * n1 + 0.03 * _smooth_noise(rng, size, 3)[:, :, None]
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(img + jitter * 0.5, 0, 1)


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, r: np.ndarray, period: float) -> np.ndarray:
    """Binary fill pattern in object coordinates (u, v), r = distance to the object centre."""
    h = period / 2
    if kind == "hstripes":
        return np.floor(v / h) % 2 == 0
    if kind == "vstripes":
        return np.floor(u / h) % 2 == 0
    if kind == "diagonal":
        return np.floor((u + v) / (h * 1.2)) % 2 == 0
    if kind == "antidiagonal":
        return np.floor((u - v) / (h * 1.2)) % 2 == 0
    if kind == "checker":
        return (np.floor(u / h) + np.floor(v / h)) % 2 == 0
    if kind == "diamonds":
        q = h * 1.1
        return (np.floor((u + v) / q) + np.floor((u - v) / q)) % 2 == 0
    if kind == "dots":
        du, dv = (u % period) - h, (v % period) - h
        return du * du + dv * dv < (0.32 * period) ** 2
    if kind == "rings":
        return np.floor(r / h) % 2 == 0
    if kind == "grid":
        return ((u % period) < 0.34 * period) | ((v % period) < 0.34 * period)
    if kind == "zigzag":
        tri = np.abs((u / period) % 1.0 - 0.5) * period
        return np.floor((v + tri) / h) % 2 == 0
    if kind == "crosses":
        du, dv = np.abs((u % period) - h), np.abs((v % period) - h)
        arm, half = 0.13 * period, 0.42 * period
        return ((du < arm) & (dv < half)) | ((dv < arm) & (du < half))
    if kind == "triangles":
        return (u % period) > (v % period) * 1.0
    raise ValueError(f"unknown pattern {kind!r}")


def _random_colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours with a clear luminance contrast, so the pattern stays visible."""
    lum = np.array([0.299, 0.587, 0.114])
    while True:
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if abs(a @ lum - b @ lum) > 0.35:
            return a, b


def draw_object(rng: np.random.Generator, img: np.ndarray, cls: int, cx: float, cy: float,
                area: float) -> tuple[float, float, float, float]:
    """Paint one object into img (float [H, W, 3]) and return its bounding box."""
    size = img.shape[0]
    aspect = math.exp(rng.uniform(-0.4, 0.4))
    side = math.sqrt(area) * size
    half_w, half_h = side * aspect / 2, side / aspect / 2
    shape = rng.choice(("ellipse", "rectangle", "blob"))
    angle = rng.uniform(0, math.pi)               # silhouette rotation
    tilt = math.radians(rng.uniform(-10, 10))     # pattern rotation: small, orientation is class
    reach = math.hypot(half_w, half_h) + 1
    x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
    y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
    if x1 <= x0 or y1 <= y0:
        return (cx, cy, cx, cy)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    ca, sa = math.cos(angle), math.sin(angle)
    su, sv = (dx * ca + dy * sa) / half_w, (-dx * sa + dy * ca) / half_h
    if shape == "ellipse":
        mask = su * su + sv * sv <= 1
    elif shape == "rectangle":
        mask = (np.abs(su) <= 0.9) & (np.abs(sv) <= 0.9)
    else:
        theta = np.arctan2(sv, su)
        wobble = 1 + 0.18 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.1 * np.sin(5 * theta + rng.uniform(0, 6.3))
        mask = np.hypot(su, sv) <= wobble * 0.95
    if not mask.any():
        mask[min(mask.shape[0] - 1, int(cy) - y0), min(mask.shape[1] - 1, int(cx) - x0)] = True
    ct, st = math.cos(tilt), math.sin(tilt)
    period = rng.uniform(7.0, 9.0) * size / RENDER_SIZE
    off = rng.uniform(0, period, 2)
    u = dx * ct + dy * st + off[0]
    v = -dx * st + dy * ct + off[1]
    fill = _pattern(CLASSES[cls].pattern, u, v, np.hypot(dx, dy), period)
    c1, c2 = _random_colour_pair(rng)
    colour = np.where(fill[..., None], c1, c2)
    region = img[y0:y1, x0:x1]
    region[mask] = colour[mask]
    ys, xs = np.nonzero(mask)
    return (float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1), float(y0 + ys.max() + 1))


def render_scene(rng: np.random.Generator, cfg: WorldConfig, n_objects: int | None = None,
                 classes: Sequence[int] | None = None, areas: Sequence[float] | None = None,
                 size: int = RENDER_SIZE) -> Scene:
    """One scene. `n_objects`, `classes` and `areas` pin what they name (pretraining curricula)."""
    if rng.random() < cfg.p_split:
        upper, lower = SPLIT_SCENES[rng.integers(len(SPLIT_SCENES))]
        horizon = rng.uniform(0.35, 0.65) * size
        wave = horizon + HORIZON_WAVE * size * np.sin(np.linspace(0, rng.uniform(2, 6), size) + rng.uniform(0, 6))
        below = np.arange(size)[:, None] > wave[None, :]
        img = np.where(below[..., None], render_background(rng, lower, size), render_background(rng, upper, size))
        regions = {upper: (0.0, horizon), lower: (horizon, float(size))}
        backgrounds = [upper, lower]
        fractions = [horizon / size, 1 - horizon / size]
    else:
        kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        img = render_background(rng, kind, size)
        regions = {kind: (0.0, float(size))}
        backgrounds, fractions = [kind], [1.0]
    if n_objects is None:
        n_objects = int(rng.choice(len(cfg.n_objects_p), p=cfg.n_objects_p)) + 1
    chosen: list[int] = []
    for k in range(n_objects):
        if classes is not None:
            cls = int(classes[k])
        elif chosen and rng.random() < cfg.p_partner:
            partners = [CLASS_NAMES.index(p) for c in chosen for p in PARTNERS[CLASS_NAMES[c]]]
            cls = int(rng.choice(partners))
        else:
            local = [i for i, c in enumerate(CLASSES) if set(c.habitats) & set(backgrounds)]
            cls = int(rng.choice(local)) if local and rng.random() < cfg.p_habitat else int(rng.integers(len(CLASSES)))
        chosen.append(cls)
    if areas is None:
        areas = np.exp(rng.uniform(math.log(cfg.min_area), math.log(cfg.max_area), n_objects))
    objects = []
    # Large first, so small objects are drawn on top and stay visible.
    for k in np.argsort(-np.asarray(areas)):
        cls, area = chosen[k], float(areas[k])
        homes = [b for b in CLASSES[cls].habitats if b in regions]
        y_lo, y_hi = regions[homes[0]] if homes else (0.0, float(size))
        side = math.sqrt(area) * size
        margin = min(side / 2, size / 2 - 1)
        cx = rng.uniform(margin, size - margin)
        cy = float(np.clip(rng.uniform(y_lo, y_hi), margin, size - margin))
        box = draw_object(rng, img, cls, cx, cy, area)
        box_area = (box[2] - box[0]) * (box[3] - box[1]) / (size * size)
        objects.append(SceneObject(cls, box, box_area))
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Scene(image, objects, backgrounds, fractions)


# ============================================================================================
# Captions
# ============================================================================================

def _name(rng: np.random.Generator, cls: int, p_synonym: float = 0.3) -> str:
    c = CLASSES[cls]
    if c.synonyms and rng.random() < p_synonym:
        return str(rng.choice(c.synonyms))
    return c.name


def _bg_name(rng: np.random.Generator, bg: str, p_synonym: float = 0.3) -> str:
    syn = BACKGROUND_SYNONYMS[bg]
    return str(rng.choice(syn)) if syn and rng.random() < p_synonym else bg


def _plural(word: str) -> str:
    if word in ("sheep", "cattle", "aircraft"):
        return word
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    return word + "s"


def web_caption(rng: np.random.Generator, scene: Scene) -> tuple[str, set[str]]:
    """A caption a web page might carry, and the concepts it names (class and background
    names). It mostly names the most prominent object: the bias real CLIP learns."""
    ranked = scene.by_prominence()
    r = rng.random()
    bg = scene.backgrounds[-1] if len(scene.backgrounds) == 1 or rng.random() < 0.5 else scene.backgrounds[0]
    if ranked and (r < 0.72 or (len(ranked) == 1 and r < 0.9)):
        obj = ranked[0]
        name = _name(rng, obj.cls)
        templates = ("a photo of a {o}.", "a {o}.", "{o}", "a {o} on the {b}.", "a picture of a {o}.",
                     "my {o} in the {b}", "a close-up of a {o}.", "a {o} and the {b}.")
        t = str(rng.choice(templates))
        concepts = {obj.name} | ({bg} if "{b}" in t else set())
        return t.format(o=name, b=_bg_name(rng, bg)), concepts
    if r < 0.9 and len(ranked) > 1:
        a, b = ranked[0], ranked[1]
        t = str(rng.choice(("a {o} and a {p}.", "a {o} next to a {p}", "a photo of a {o} with a {p}.")))
        return t.format(o=_name(rng, a.cls), p=_name(rng, b.cls)), {a.name, b.name}
    t = str(rng.choice(("a photo of the {b}.", "the {b}", "a view of the {b}.")))
    return t.format(b=_bg_name(rng, bg)), {bg}


# How often a BLIP-style captioner perceives, misses and imagines objects. Its errors are those of
# one model looking at one image: an object it does not see is missing from all 12 captions, one it
# imagines is named in several, so the vote fractions keep them (real BLIP-2 on VOC2007 gives 9 %
# of true labels no vote and 20 % of false positives half the votes or more). Fit to the VOC2007
# dev file's statistics by bench/caption_fit.py (real vs world, README "Caption noise").
@dataclass(frozen=True)
class CaptionNoise:
    seen_area: float = 0.013          # area (fraction of the image) an ordinary class is perceived at half the time
    seen_slope: float = 4.5           # logistic slope of perception in ln(area)
    # Classes named only when prominent, as bottle, chair and potted plant are in VOC2007, and
    # how many times the area they need is.
    inconspicuous: tuple[tuple[str, float], ...] = (("chair", 6.0), ("tv", 2.5), ("kite", 2.5))
    name_seen: float = 0.9            # a perceived object is named in an object slot
    name_unseen: float = 0.03         # ... an object not perceived (a glimpse)
    # An absent class is imagined for the whole image with this probability, more when its usual
    # background or a companion is there (real false positives follow context: 3.6x lift).
    imagine_base: float = 0.002
    imagine_habitat: float = 0.02
    imagine_partner: float = 0.08
    # Classes imagined this many times as often, as VOC2007's dining table (precision 0.28 next to
    # chairs), chair (0.52) and sofa (0.57) are: errors a classifier learns as the class itself.
    context_prone: tuple[tuple[str, float], ...] = (("bus", 8.0), ("kite", 6.0), ("duck", 6.0), ("cow", 3.0))
    name_imagined: float = 0.5        # an imagined class is named in an object slot
    slot_noise: float = 0.02          # per caption: one more class named once, partner-biased
    re_pass_slips: float = 2.0        # ... this many times as often in the re-captions ("excluding car?")
    scene_slot_naming: float = 0.8    # the place and background slots name objects this much less
    loop: float = 0.15                # object-list slot caught in a repetition loop


@dataclass
class Perception:
    """What the captioner believes one image holds: class -> probability it is named per object slot."""
    naming: dict[int, float]


def perceive(rng: np.random.Generator, scene: Scene, noise: CaptionNoise = CaptionNoise()) -> Perception:
    """Draw the captioner's beliefs about one scene: each object perceived with a probability
    logistic in ln(area), later for the inconspicuous classes; absent classes imagined by context."""
    naming: dict[int, float] = {}
    for o in scene.by_prominence():
        need = noise.seen_area * dict(noise.inconspicuous).get(o.name, 1.0)
        p_seen = 1.0 / (1.0 + (need / o.area) ** noise.seen_slope)
        p = noise.name_seen if rng.random() < p_seen else noise.name_unseen
        naming[o.cls] = max(naming.get(o.cls, 0.0), p)
    present = set(naming)
    seen = {c for c, p in naming.items() if p == noise.name_seen}
    partners = {CLASS_NAMES.index(p) for c in seen for p in PARTNERS[CLASS_NAMES[c]]}
    for c, spec in enumerate(CLASSES):
        if c in present:
            continue
        p = (noise.imagine_base + noise.imagine_habitat * bool(set(spec.habitats) & set(scene.backgrounds))
             + noise.imagine_partner * (c in partners)) * dict(noise.context_prone).get(spec.name, 1.0)
        if rng.random() < p:
            naming[c] = noise.name_imagined
    return Perception(naming)


def blip_captions(rng: np.random.Generator, scene: Scene, re_pass: bool = False,
                  found: Sequence[str] = (), perception: Perception | None = None,
                  noise: CaptionNoise = CaptionNoise()) -> list[str]:
    """6 captions with the slot roles of the paper's files: 0, 1 object description, 2 place,
    3 object list, 4 "this is a photo of", 5 background. `re_pass` makes the re-captions,
    partly conditioned on classes already found ("excluding car"). Both passes over one image
    share its `perception` (drawn here when not given): one captioner, one set of beliefs."""
    if perception is None:
        perception = perceive(rng, scene, noise)
    present = {o.cls for o in scene.objects}
    slip = noise.slot_noise * (noise.re_pass_slips if re_pass else 1.0)
    caps = []
    for slot in range(6):
        share = noise.scene_slot_naming if slot in (2, 5) else 1.0
        named = [c for c, p in perception.naming.items() if rng.random() < p * share]
        if rng.random() < slip:  # a one-caption slip, biased to partners of what is there
            pool = ([CLASS_NAMES.index(p) for c in present for p in PARTNERS[CLASS_NAMES[c]]]
                    or list(range(len(CLASSES))))
            named.append(int(rng.choice(pool)))
        names = [_name(rng, c) for c in named]
        bg = _bg_name(rng, scene.backgrounds[-1] if rng.random() < 0.6 else scene.backgrounds[0])
        things = " and ".join(f"a {n}" for n in names)
        if slot == 2:
            caps.append(f"the photo shows {things} near the {bg}" if names else str(rng.choice((
                "this photo was taken on a sunny day outside", f"the photo was taken near the {bg}",
                f"this picture was taken at a {bg} in the countryside"))))
            continue
        if slot == 5:
            extra = f", excluding {found[0]}" if re_pass and found and rng.random() < 0.5 else ""
            caps.append(f"the background of this image{extra} is the {bg}" + (f" behind {things}" if names else ""))
            continue
        if not names:
            caps.append(str(rng.choice((f"a view of the {bg}", f"an empty {bg}", "a blurry photo",
                                        f"the {bg} on a bright day"))))
            continue
        if slot == 3:
            items = [f"a {n}" for n in names]
            if rng.random() < noise.loop:  # repetition loop
                items = (items * 6)[:10]
            q = f"Question: what objects are present in this image, excluding {found[0]}? Answer: " \
                if re_pass and found and rng.random() < 0.4 else ""
            caps.append(q + ", ".join(items))
            continue
        if len(names) > 1 and rng.random() < 0.3:
            first = f"two {_plural(names[0])}"
        else:
            first = f"a {names[0]}"
        rest = " and ".join(f"a {n}" for n in names[1:])
        body = first + (f" and {rest}" if rest else "")
        if slot == 4:
            caps.append(f"this is a photo of {body} on the {bg}")
        else:
            caps.append(str(rng.choice((f"{body} on the {bg}", f"{body} in front of the {bg}", body))))
    return caps


# ============================================================================================
# build: the world on disk in the VOC2007 layout
# ============================================================================================

def synonyms_dictionary() -> dict[str, list[str]]:
    """Classes first, then backgrounds: the format of the paper's dictionaries."""
    out = {c.name: [c.name, *c.synonyms] for c in CLASSES}
    out.update({b: [b, *BACKGROUND_SYNONYMS[b]] for b in BACKGROUNDS})
    return out


def _voc_xml(image_id: str, scene: Scene) -> str:
    objs = "".join(
        f"  <object>\n    <name>{o.name}</name>\n    <difficult>0</difficult>\n    <bndbox>\n"
        f"      <xmin>{o.box[0]:.0f}</xmin>\n      <ymin>{o.box[1]:.0f}</ymin>\n"
        f"      <xmax>{o.box[2]:.0f}</xmax>\n      <ymax>{o.box[3]:.0f}</ymax>\n    </bndbox>\n  </object>\n"
        for o in scene.objects)
    h, w = scene.image.shape[:2]
    return (f"<annotation>\n  <folder>VOC2007</folder>\n  <filename>{image_id}.jpg</filename>\n"
            f"  <size>\n    <width>{w}</width>\n    <height>{h}</height>\n    <depth>3</depth>\n  </size>\n"
            f"  <backgrounds>{' '.join(scene.backgrounds)}</backgrounds>\n{objs}</annotation>\n")


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One stream per image: the same seed gives the same bytes whatever the order or workers.
    return np.random.default_rng([seed, {"trainval": 1, "test": 2}[split], index])


def _jpeg_bytes(image: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92, subsampling=0)
    return buf.getvalue()


def _write(path: Path, content: str | bytes) -> None:
    """A file of the world, through atomic_write: a full disk or `ulimit -f` is one line naming it."""
    atomic_write(path, lambda tmp: tmp.write_bytes(content.encode() if isinstance(content, str) else content))


def _render_image(job: tuple[str, WorldConfig, str, int, str]) -> tuple[str, str, set[int], list | None, list | None]:
    """Render and write one image of the world and its annotation; return (image id, split,
    classes, captions, re-captions). Every image has its own RNG stream, so any process can
    render any image and the bytes stay the same."""
    base, cfg, split, k, image_id = job
    rng = _scene_rng(cfg.seed, split, k)
    scene = render_scene(rng, cfg)
    _write(Path(base) / "JPEGImages" / f"{image_id}.jpg", _jpeg_bytes(scene.image))
    _write(Path(base) / "Annotations" / f"{image_id}.xml", _voc_xml(image_id, scene))
    if split != "trainval":
        return image_id, split, scene.classes, None, None
    perception = perceive(rng, scene)
    first = blip_captions(rng, scene, perception=perception)
    found = [CLASS_NAMES[c] for c in sorted(scene.classes) if any(CLASS_NAMES[c] in cap for cap in first)]
    return image_id, split, scene.classes, first, blip_captions(rng, scene, re_pass=True, found=found,
                                                                perception=perception)


# What a world build writes at the top of its folder: a folder holding anything else is a user's,
# never built into; one holding only these (a build that was killed) is built again.
WORLD_FILES = ("JPEGImages", "Annotations", "ImageSets", "captions.json", "re_captions.json", "synonyms.json",
               "world.json", "labels_trainval.csv", "labels_test.csv")


def is_world_file(name: str) -> bool:
    return name in WORLD_FILES or temp_file_of(name) in WORLD_FILES


def build(out: str | os.PathLike, cfg: WorldConfig, progress: bool = True, workers: int = 0) -> Path:
    """Write the world: VOC2007 layout, captions.json / re_captions.json (training split),
    synonyms.json, world.json and labels_{trainval,test}.csv (eval.py --labels format).
    Images are rendered by `workers` processes (0: one per CPU core; 1: in this process).
    Returns the folder."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm import tqdm

    base = Path(out)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    captions, re_captions = {}, {}
    labels = {"trainval": {}, "test": {}}
    jobs = [(str(base), cfg, split, k, f"{offset + k + 1:06d}")
            for split, count, offset in (("trainval", cfg.train, 0), ("test", cfg.test, cfg.train))
            for k in range(count)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 256))
    bar = tqdm(total=len(jobs), desc="rendering", unit="img", disable=not progress, file=sys.stderr)
    # spawn, not fork: the caller may hold torch's thread pools, which a forked child inherits broken
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
    try:
        results = pool.map(_render_image, jobs, chunksize=64) if pool else map(_render_image, jobs)
        for image_id, split, classes, first, again in results:
            labels[split][image_id] = classes
            if first is not None:
                captions[f"{image_id}."] = first
                re_captions[f"{image_id}."] = again
            bar.update()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    bar.close()
    main = base / "ImageSets" / "Main"
    for split, table in labels.items():
        _write(main / f"{split}.txt", "".join(f"{i}\n" for i in table))
        for c, name in enumerate(CLASS_NAMES):
            _write(main / f"{name}_{split}.txt",
                   "".join(f"{i} {1 if c in cl else -1:2d}\n" for i, cl in table.items()))
        # the same labels in the eval.py --labels format
        _write(base / f"labels_{split}.csv",
               "image_id," + ",".join(CLASS_NAMES) + "\n" + "".join(
                   i + "," + ",".join("1" if c in cl else "-1" for c in range(len(CLASSES))) + "\n"
                   for i, cl in table.items()))
    write_json(base / "captions.json", captions, indent=None)
    write_json(base / "re_captions.json", re_captions, indent=None)
    write_json(base / "synonyms.json", synonyms_dictionary())
    world = {"name": "synthetic", "classes": list(CLASS_NAMES), "backgrounds": list(BACKGROUNDS),
             "patterns": {c.name: c.pattern for c in CLASSES}, "render_size": RENDER_SIZE,
             "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    write_json(base / "world.json", world)   # last: its presence marks a complete world
    return base


# The tiny CLIP the proving ground ships (trained by tinyclip.py; assets/README.md).
TINY_CLIP = "synthclip-vit-t8"
TINY_CLIP_WEIGHTS = ROOT / "assets" / "synthclip.safetensors"


# ============================================================================================
# zeroshot: the CLIP baseline BAC-GCN must beat, on the world's test split
# ============================================================================================

def encode_split(backbone, dataset, batch: int = 256, progress: bool = True) -> dict[str, "torch.Tensor"]:
    """Global and patch embeddings of every image of a data.MultiLabelImages split, with the
    dataset index of each row (skipped images are left out)."""
    import torch

    from cache import encode_images
    from frozen_clip import preprocess

    out = {"g": [], "patches": [], "index": []}
    for _, index, feats in encode_images(dataset, lambda x: backbone.encode_image(preprocess(x, backbone.image_size)),
                                         batch, progress=progress):
        out["g"].append(feats["g"])
        out["patches"].append(feats["patches"])
        out["index"].append(index)
    return {k: torch.cat(v) for k, v in out.items()}


def patch_hit_rates(patches: "torch.Tensor", text: "torch.Tensor", boxes: list[list[tuple[int, tuple]]],
                    grid: int, image_size: int) -> tuple[float, float, int]:
    """(% of (image, class) where the patch most similar to the class prompt lies inside that
    class's box, % where it lies inside the other object's box, count). `boxes[i]` holds the
    two (class, box) of image i in render pixels."""
    hits = controls = total = 0
    cell = image_size / grid
    for p, objs in zip(patches, boxes):
        for k, (cls, _) in enumerate(objs):
            best = int((p @ text[cls]).argmax())
            cx, cy = (best % grid + 0.5) * cell, (best // grid + 0.5) * cell
            inside = [b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for _, b in objs]
            hits += inside[k]
            controls += inside[1 - k]
            total += 1
    return 100.0 * hits / max(total, 1), 100.0 * controls / max(total, 1), total


def preset_image_size() -> int:
    """The read-out size of the synthetic-tiny preset (what train.py reads the world at)."""
    import config

    return config.BACGCNConfig(**config.PRESETS["synthetic-tiny"]).image_size


def zeroshot(data_dir: str | os.PathLike, weights: str | os.PathLike = TINY_CLIP_WEIGHTS,
             scores_csv: str | None = None, progress: bool = True, patch_readout: str = "self_attention",
             image_size: int = 0) -> dict:
    """CLIP zero-shot with the global image embedding on the test split (prompt ensemble), read
    at `image_size` px (0: the synthetic-tiny preset's size, the read-out train.py makes)."""

    import data as data_mod
    import frozen_clip
    from metrics import LARGE_AREA, SMALL_AREA, mean_ap, size_split_map

    dataset = registry.load("synthetic", data_dir, "test")
    classes = dataset.class_names
    clip = frozen_clip.create_clip(TINY_CLIP, weights)
    frozen_clip.set_image_size(clip, image_size or preset_image_size())
    backbone = frozen_clip.CLIPBackbone(clip, patch_readout)
    text = backbone.class_embeddings(classes, frozen_clip.tokenizer_for(TINY_CLIP))
    feats = encode_split(backbone, dataset, progress=progress)
    index = feats["index"].numpy()
    scores = (feats["g"] @ text.t()).numpy()
    labels = dataset.label_matrix()[index]
    ids = [dataset.samples[i].id for i in index]
    areas = data_mod.largest_instance_area(data_dir, ids, classes)
    report = {"mAP": mean_ap(scores, labels), **size_split_map(scores, labels, areas, SMALL_AREA, LARGE_AREA)}
    # top-1 on single-object images whose object covers >= 4% of the image
    single = [(i, int(np.argmax(labels[i]))) for i in range(len(ids))
              if (labels[i] == 1).sum() == 1 and areas[i].max() >= 0.04
              and len(data_mod.read_voc_annotation(Path(data_dir) / "Annotations" / f"{ids[i]}.xml").objects) == 1]
    report["top1_single"] = (100.0 * float(np.mean([scores[i].argmax() == c for i, c in single])) if single
                             else float("nan"))
    # patch_hit on images with exactly two objects of different classes, each >= 4%
    pairs, boxes = [], []
    col = {c: k for k, c in enumerate(classes)}
    for i, image_id in enumerate(ids):
        ann = data_mod.read_voc_annotation(Path(data_dir) / "Annotations" / f"{image_id}.xml")
        objs = ann.objects
        area = lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) / (ann.width * ann.height)  # noqa: E731
        if len(objs) == 2 and objs[0].name != objs[1].name and min(area(o) for o in objs) >= 0.04:
            pairs.append(i)
            scale = backbone.image_size / ann.width
            boxes.append([(col[o.name], tuple(v * scale for v in o.box)) for o in objs])
    grid = int(round(feats["patches"].shape[1] ** 0.5))
    hit, control, n_pairs = patch_hit_rates(feats["patches"][pairs], text, boxes, grid, backbone.image_size)
    report.update({"patch_hit": hit, "patch_hit_control": control, "image_size": backbone.image_size,
                   "num_images": len(ids),
                   "num_single": len(single), "num_pair_checks": n_pairs})
    if scores_csv:
        data_mod.write_scores_csv(scores_csv, ids, classes, scores)
    return report


# ============================================================================================
# CLI
# ============================================================================================

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synthetic.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="write the world (VOC2007 layout + captions)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=integer_from(0), default=WorldConfig.seed)
    p.add_argument("--train", type=integer_from(1), default=WorldConfig.train)
    p.add_argument("--test", type=integer_from(1), default=WorldConfig.test)
    p = sub.add_parser("zeroshot", help="CLIP zero-shot baseline on the test split")
    p.add_argument("--data", required=True, help="world folder (synthetic.py build --out)")
    p.add_argument("--json", required=True)
    p.add_argument("--scores", help="also write per-image class scores (eval.py --scores format)")
    p.add_argument("--weights", default=str(TINY_CLIP_WEIGHTS))
    p.add_argument("--patch-readout", default="self_attention", help="self_attention | value (see frozen_clip.py)")
    p.add_argument("--image-size", type=integer_from(0), default=0,
                   help="read-out size in px (0: the synthetic-tiny preset's, 128; 64: the tiny CLIP's native)")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    def body() -> None:
        if args.command == "build":
            check_writable(args.out, "--out", folder=True)
            check_own_folder(args.out, "synthetic.py build", is_world_file,
                             "it builds a world into a new or empty folder: choose another --out")
            cfg = WorldConfig(seed=args.seed, train=args.train, test=args.test)
            t = time.time()
            base = build(args.out, cfg)
            print(f"wrote {cfg.train} train + {cfg.test} test images to {base} in {time.time() - t:.0f} s")
        elif args.command == "zeroshot":
            if not (Path(args.data) / "world.json").is_file():
                raise DataError(args.data, "no proving-ground world here (no world.json); "
                                           f"build one with `python synthetic.py build --out {args.data}`")
            for option, path in (("--json", args.json), ("--scores", args.scores)):
                if path:
                    check_writable(path, option)
            check_outputs_apart([("--json", args.json), ("--scores", args.scores)],
                                [("--weights", args.weights), *(("--data", Path(args.data) / name)
                                                                for name in WORLD_FILES)])
            report = zeroshot(args.data, args.weights, args.scores, patch_readout=args.patch_readout,
                              image_size=args.image_size)
            write_json(args.json, report)
            print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))
    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
