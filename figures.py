"""Pictures of what a trained model does: similarity maps beside the image, per-class AP bars.

Pillow and numpy only: shapes from ImageDraw, text in ImageFont.load_default(), so a figure
needs no plotting library and renders the same on a headless machine. Nothing here reads
files or knows the model: eval.py hands in arrays and writes the PNG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 224                      # longest side of an image panel, px
GAP = 8                          # space around and between panels, px
COLUMNS = 6                      # panels per row of a similarity figure
BACKGROUND = (250, 250, 250)
INK = (20, 20, 20)
MARK = (0, 255, 255)             # cyan: absent from the heat colours, so the pooled patches stand out
HEAT_ALPHA = 0.6                 # share of the heat colour in an overlaid pixel
# Anchors of an inferno-like scale (dark = least similar, light yellow = most), evenly spaced.
HEAT_ANCHORS = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)
REPORT_COLOURS = ((70, 130, 180), (230, 140, 40))
BAR_LENGTH = 400                 # px for AP 100


def font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def text_size(text: str, fnt=None) -> tuple[int, int]:
    left, top, right, bottom = (fnt or font()).getbbox(text)
    return right - left, bottom - top


def line_height(fnt=None) -> int:
    """Height of one text line (ascenders and descenders) plus a little air."""
    return text_size("Ag|", fnt)[1] + 4


def fit_text(text: str, width: int, fnt=None) -> str:
    """`text`, cut and ended with '..' when it is wider than `width` px."""
    if text_size(text, fnt)[0] <= width:
        return text
    while text and text_size(text + "..", fnt)[0] > width:
        text = text[:-1]
    return text + ".."


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + [3]) on the heat scale."""
    x = np.clip(values, 0.0, 1.0) * (len(HEAT_ANCHORS) - 1)
    stops = np.arange(len(HEAT_ANCHORS))
    rgb = [np.interp(x, stops, HEAT_ANCHORS[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def panel_size(width: int, height: int) -> tuple[int, int]:
    """The image's aspect ratio with its longest side PANEL."""
    scale = PANEL / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# --------------------------------------------------------------------------------------------
# Similarity maps
# --------------------------------------------------------------------------------------------

@dataclass
class MapPanel:
    title: str                       # e.g. "dog 0.93"
    sim: np.ndarray                  # [grid, grid] similarity of each patch to the category
    pooled: Sequence[int]            # patch indices (row-major) the Similarity Kernel pooled


def overlay(image: Image.Image, panel: MapPanel) -> Image.Image:
    """The image under its similarity map (min-max normalised, as ReSO reads it), upsampled
    bilinearly, with the pooled patches outlined."""
    grid = panel.sim.shape[0]
    lo, hi = float(panel.sim.min()), float(panel.sim.max())
    normal = ((panel.sim - lo) / max(hi - lo, 1e-12)).astype(np.float32)
    up = np.asarray(Image.fromarray(normal, mode="F").resize(image.size, Image.BILINEAR))
    mixed = (1 - HEAT_ALPHA) * np.asarray(image, dtype=np.float64) + HEAT_ALPHA * heat_colours(up)
    out = Image.fromarray(mixed.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    # The model squashes the image to a square, so patch cells stretch with the image's aspect.
    cell_w, cell_h = image.width / grid, image.height / grid
    for index in panel.pooled:
        r, c = divmod(int(index), grid)
        box = (round(c * cell_w) + 1, round(r * cell_h) + 1, round((c + 1) * cell_w) - 2, round((r + 1) * cell_h) - 2)
        if box[2] > box[0] and box[3] > box[1]:
            draw.rectangle(box, outline=MARK, width=2 if min(cell_w, cell_h) >= 16 else 1)
    return out


def similarity_figure(image: np.ndarray, name: str, panels: Sequence[MapPanel], note: str = "") -> Image.Image:
    """The image (titled `name`) beside one overlaid panel per category, COLUMNS panels a row,
    with `note` (e.g. what the marks mean) under them. `image`: uint8 [H, W, 3]."""
    fnt = font()
    w, h = panel_size(image.shape[1], image.shape[0])
    base = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BICUBIC)
    tiles = [(name, base)] + [(p.title, overlay(base, p)) for p in panels]
    title_h = line_height(fnt)
    cols = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // cols)
    note_h = line_height(fnt) if note else 0
    fig = Image.new("RGB", (GAP + cols * (w + GAP), GAP + rows * (title_h + h + GAP) + note_h), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    for k, (title, tile) in enumerate(tiles):
        x = GAP + (k % cols) * (w + GAP)
        y = GAP + (k // cols) * (title_h + h + GAP)
        draw.text((x, y), fit_text(title, w, fnt), fill=INK, font=fnt)
        fig.paste(tile, (x, y + title_h))
    if note:
        draw.text((GAP, fig.height - note_h), fit_text(note, fig.width - 2 * GAP, fnt), fill=INK, font=fnt)
    return fig


# --------------------------------------------------------------------------------------------
# Per-class AP bars
# --------------------------------------------------------------------------------------------

@dataclass
class APSeries:
    label: str                       # legend entry (the report's file name)
    ap: dict                         # class -> AP in [0, 100], or None (no positive)
    mean: float | None               # mAP


def _ap_value(value) -> float:
    return -1.0 if value is None else float(value)


def _legend(draw: ImageDraw.ImageDraw, series: Sequence[APSeries], x: int, y: int, fnt) -> None:
    for colour, s in zip(REPORT_COLOURS, series):
        size = text_size("A", fnt)[1]
        draw.rectangle((x, y + 2, x + size + 2, y + size + 4), fill=colour)
        label = f"{s.label} (mAP {'n/a' if s.mean is None else f'{s.mean:.2f}'})"
        draw.text((x + size + 8, y), label, fill=INK, font=fnt)
        x += size + 24 + text_size(label, fnt)[0]


def ap_figure(series: Sequence[APSeries]) -> Image.Image:
    """Horizontal AP bars, one row per class sorted by the first series' AP (best first; classes
    without a positive last, as n/a), the mAP in the title; two series: paired bars, a legend."""
    fnt = font()
    classes = sorted(series[0].ap, key=lambda c: -_ap_value(series[0].ap[c]))
    text_h = line_height(fnt)
    bar_h = text_h - 2
    row_h = len(series) * bar_h + 6
    name_w = max(text_size(c, fnt)[0] for c in classes) + GAP
    value_w = text_size("100.00", fnt)[0] + GAP
    top = GAP + text_h * (2 if len(series) > 1 else 1) + GAP
    width = GAP + name_w + BAR_LENGTH + value_w + GAP
    height = top + len(classes) * row_h + text_h + GAP
    fig = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    x0 = GAP + name_w
    if len(series) == 1:
        m = series[0].mean
        draw.text((GAP, GAP), f"per-class AP, mAP {'n/a' if m is None else f'{m:.2f}'} ({series[0].label})",
                  fill=INK, font=fnt)
    else:
        draw.text((GAP, GAP), "per-class AP", fill=INK, font=fnt)
        _legend(draw, series, GAP, GAP + text_h, fnt)
    axis_y = top + len(classes) * row_h
    for tick in (0, 25, 50, 75, 100):       # light gridlines behind the bars, labelled under them
        x = x0 + tick * BAR_LENGTH // 100
        draw.line((x, top - 2, x, axis_y), fill=(215, 215, 215))
        draw.text((x - text_size(str(tick), fnt)[0] // 2, axis_y + 2), str(tick), fill=INK, font=fnt)
    for r, c in enumerate(classes):
        y = top + r * row_h + 3
        draw.text((x0 - GAP - text_size(c, fnt)[0], y), c, fill=INK, font=fnt)
        for k, (s, colour) in enumerate(zip(series, REPORT_COLOURS)):
            value, yk = s.ap.get(c), y + k * bar_h
            end = x0 if value is None else x0 + max(1, round(float(value) * BAR_LENGTH / 100))
            if value is not None:
                draw.rectangle((x0, yk, end, yk + bar_h - 2), fill=colour)
            draw.text((end + 4, yk), "n/a" if value is None else f"{float(value):.2f}", fill=INK, font=fnt)
    return fig
