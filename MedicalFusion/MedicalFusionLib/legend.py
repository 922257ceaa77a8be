"""The colour bar a reader reads the uptake from: what it shows, and how a picture gets one.

A fused voxel's colour says the functional's value through the colour map and the window the run
used: the pipeline stretches the window [lo, hi] linearly over the map's entries and clamps at both
ends (:mod:`MedicalFusionLib.colour`). A colour bar is true when it maps lo..hi the same way, with
the same entries, in the functional's own units. :func:`legend_for` collects that from a run
(:class:`~MedicalFusionLib.pipeline.Prepared`): the map's table and name, the window, the units, a
title and the five tick labels with one number format. Two consumers use it:

- :func:`draw_colour_bar` adds a horizontal bar with the ticks and the title under a picture (the
  CLI's ``--preview``, the docs' figures); the fused voxels themselves never carry text;
- :func:`MedicalFusionLib.scene.add_colour_legend` gives the fused volume node Slicer's own colour
  legend (the same window, map, title and label format).

No bar is made when the fused picture cannot be read against one: a grayscale fusion (the map has no
colour, e.g. ``Grey``: the result is a grey image) or an RGB functional (its colours came as they
are, there is no map nor window to show).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import colour

#: Number of tick labels (both ends included), as Slicer's colour legend shows by default.
TICKS = 5


@dataclass(frozen=True)
class Legend:
    """What a colour bar shows: ``table`` (N x 3 RGB in [0, 1]) over ``window`` (lo, hi) in ``units``."""

    table: np.ndarray
    window: tuple[float, float]
    units: str                      # 'SUVbw', 'HU', ... or '' when nothing said what the values are
    colormap: str                   # the map's name (a shipped name, or 'custom table (N colours)')
    name: str = "functional"        # what the values are of (the functional's node or file name)

    @property
    def title(self) -> str:
        """'<name> [<units>]', or '<name> (units unknown)'."""
        return f"{self.name} [{self.units}]" if self.units else f"{self.name} (units unknown)"

    @property
    def decimals(self) -> int:
        return label_decimals(self.window)

    @property
    def label_format(self) -> str:
        """printf format of the tick labels (Slicer's colour legend takes it as it is)."""
        return f"%.{self.decimals}f"

    def ticks(self) -> list[float]:
        lo, hi = self.window
        return [lo + (hi - lo) * k / (TICKS - 1) for k in range(TICKS)]

    def tick_labels(self) -> list[str]:
        return [self.label_format % t for t in self.ticks()]

    def colours_at(self, values) -> np.ndarray:
        """uint8 RGB of values as the pipeline colours them (window stretched over the table)."""
        lo, hi = self.window
        return colour.to_uint8(colour.apply_colormap(colour.window_to_unit(values, lo, hi), self.table))


def label_decimals(window: tuple[float, float]) -> int:
    """Decimals of the tick labels: the fewest that write every tick exactly, and never more than
    two significant digits of the tick step (0..20 -> 0; 0..10 -> 1 (2.5); -135..215 -> 0: -48 for -47.5)."""
    lo, hi = float(window[0]), float(window[1])
    step = (hi - lo) / (TICKS - 1)
    most = max(0, min(6, 1 - math.floor(math.log10(step)))) if step > 0 else 0
    ticks = [lo + step * k for k in range(TICKS)]
    scale = max(abs(lo), abs(hi), step)
    for d in range(most + 1):
        if all(abs(round(t, d) - t) <= 1e-9 * scale for t in ticks):
            return d
    return most


def legend_for(prepared, table=None, name: str = "functional") -> Legend | None:
    """The colour bar of a run, or None when the fused picture has none (see the module docstring).

    ``prepared``: the run's :class:`~MedicalFusionLib.pipeline.Prepared` (window, units, map name,
    grayscale). ``table``: the map's N x 3 table when it is not one of the shipped maps (a colour
    node's own table in Slicer); a shipped map is looked up by its name.
    """
    if prepared is None or prepared.grayscale or prepared.functional_window is None:
        return None
    if table is None or isinstance(table, str):
        name_used = table if isinstance(table, str) else prepared.colormap
        if name_used not in colour.colormap_names():
            return None
        table = colour.colormap_table(name_used)
    table = colour.check_table(table)
    lo, hi = (float(v) for v in prepared.functional_window)
    return Legend(table=table, window=(lo, hi), units=prepared.functional_units or "",
                  colormap=str(prepared.colormap), name=name or "functional")


# --------------------------------------------------------------------------------------------------
# drawing (Pillow)

#: Pictures narrower than this get white margins so the labels fit.
MIN_WIDTH = 240
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class BarLayout:
    """Where :func:`draw_colour_bar` put things (pixel rows/columns of the returned picture)."""

    picture_rows: tuple[int, int]     # the input picture (after the margins)
    picture_cols: tuple[int, int]
    bar_rows: tuple[int, int]         # the colour strip
    bar_cols: tuple[int, int]
    text_rows: tuple[int, int]        # tick labels and title


def _font(size: int):
    from PIL import ImageFont  # noqa: PLC0415

    try:
        return ImageFont.load_default(size=size)       # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def draw_colour_bar(picture: np.ndarray, legend: Legend, return_layout: bool = False):
    """``picture`` (uint8 RGB [H, W, 3]) with the legend's colour bar under it.

    The bar spans the picture's width less a margin; column x shows the colour of the value at its
    centre (lo at the left edge, hi at the right), through the same window-to-table rule as the
    fused voxels. Under it: tick marks and labels at lo, hi and three values between, then the title
    with the units. Returns the new picture (and a :class:`BarLayout` when ``return_layout``).
    """
    from PIL import Image, ImageDraw  # noqa: PLC0415

    picture = np.asarray(picture, dtype=np.uint8)
    h, w = picture.shape[:2]
    width = max(w, MIN_WIDTH)
    font_px = int(np.clip(round(width / 45), 11, 28))
    font = _font(font_px)
    margin = max(8, font_px)                         # room for half a label at each end
    bar_h = max(8, font_px)
    tick_h = max(3, bar_h // 3)
    gap = max(4, font_px // 3)
    line = font_px + gap
    top = h + gap
    total_h = top + bar_h + tick_h + 2 * line + gap
    canvas = np.full((total_h, width, 3), BACKGROUND, np.uint8)
    c0 = (width - w) // 2
    canvas[:h, c0:c0 + w] = picture

    x0, x1 = margin, width - margin
    n = x1 - x0
    lo, hi = legend.window
    values = lo + (np.arange(n) + 0.5) / n * (hi - lo)
    canvas[top:top + bar_h, x0:x1] = legend.colours_at(values)[None, :, :]

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.rectangle([x0 - 1, top - 1, x1, top + bar_h], outline=INK)
    label_top = top + bar_h + tick_h + 1
    for k, (t, text) in enumerate(zip(legend.ticks(), legend.tick_labels())):
        x = x0 + round(k / (TICKS - 1) * n) - (1 if k == TICKS - 1 else 0)
        draw.line([x, top + bar_h, x, top + bar_h + tick_h], fill=INK)
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        tx = int(np.clip(x - (right - left) / 2, 0, width - (right - left)))
        draw.text((tx, label_top), text, fill=INK, font=font)
    title = f"{legend.title}, {legend.colormap}"
    left, _, right, _ = draw.textbbox((0, 0), title, font=font)
    draw.text((max(0, (width - (right - left)) // 2), label_top + line), title, fill=INK, font=font)
    out = np.asarray(image, dtype=np.uint8).copy()
    if not return_layout:
        return out
    return out, BarLayout((0, h), (c0, c0 + w), (top, top + bar_h), (x0, x1), (label_top, total_h))
