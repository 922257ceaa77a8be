"""Intensity windows, 3D Slicer's colour maps and full-range BT.601 YCbCr.

Colour conventions (ITU-R BT.601, full range, as JPEG/JFIF uses them), all on floats in [0, 1]:

    Y  =  0.299 R + 0.587 G + 0.114 B
    Cb =  0.5 + (B - Y) / 1.772
    Cr =  0.5 + (R - Y) / 1.402

Colour maps reproduce 3D Slicer's lookup tables (PET-Heat, PET-Rainbow2, Rainbow, Grey, ...): the
shipped ``colormaps.json`` was exported from Slicer's own colour nodes by
``scripts/export_colormaps.py`` and a test checks it still equals them when slicer-core is
installed. A scalar maps to a table entry the way Slicer's vtkImageMapToWindowLevelColors does:
the window [lo, hi] is stretched linearly over the 256 entries and clamped at both ends.
"""
from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

from .errors import FusionError

# Slicer colour node IDs of the maps we ship (the ID is stable across Slicer versions).
SLICER_COLOR_NODE_IDS = {
    "PET-Heat": "vtkMRMLPETProceduralColorNodePET-Heat",
    "PET-Rainbow2": "vtkMRMLPETProceduralColorNodePET-Rainbow2",
    "PET-Rainbow": "vtkMRMLPETProceduralColorNodePET-Rainbow",
    "PET-DICOM": "vtkMRMLPETProceduralColorNodePET-DICOM",
    "PET-HotMetalBlue": "vtkMRMLPETProceduralColorNodePET-HotMetalBlue",
    "Rainbow": "vtkMRMLColorTableNodeRainbow",
    "Grey": "vtkMRMLColorTableNodeGrey",
}
DEFAULT_COLORMAP = "PET-Heat"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


@functools.lru_cache(maxsize=None)
def _shipped_tables() -> dict:
    path = pathlib.Path(__file__).with_name("colormaps.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: np.asarray(v, dtype=np.float32) for k, v in data["tables"].items()}


def colormap_names() -> list[str]:
    return list(SLICER_COLOR_NODE_IDS)


def colormap_table(name: str) -> np.ndarray:
    """The 256x3 RGB table in [0, 1] of a Slicer colour map, by its Slicer name."""
    tables = _shipped_tables()
    if name not in tables:
        raise FusionError(f"unknown colour map '{name}': choose one of {', '.join(tables)}")
    return tables[name]


def check_table(table) -> np.ndarray:
    """A user-given colour table as float32 N x 3 in [0, 1] (N >= 2), or a FusionError."""
    t = np.asarray(table, dtype=np.float32)
    if t.ndim != 2 or t.shape[1] < 3 or t.shape[0] < 2 or not np.all(np.isfinite(t)) or t.min() < 0 or t.max() > 1:
        raise FusionError("a colour table must be N x 3 (or N x 4) RGB values in [0, 1]: check the colour node")
    return t[:, :3]


def slicer_colormap_table(name: str, scene=None) -> np.ndarray:
    """Read the 256x3 table from Slicer's own colour node (needs the `slicer` module)."""
    import slicer  # noqa: PLC0415  (optional dependency)

    if scene is None:
        scene = slicer.vtkMRMLScene()
    if scene.GetNodeByID(SLICER_COLOR_NODE_IDS[name]) is None:
        logic = slicer.vtkSlicerColorLogic()
        logic.SetMRMLScene(scene)
    node = scene.GetNodeByID(SLICER_COLOR_NODE_IDS[name])
    lut = node.GetLookupTable()
    return np.array([lut.GetTableValue(i)[:3] for i in range(lut.GetNumberOfTableValues())], dtype=np.float64)


def window_to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] to [0, 1], clamped (float32)."""
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        raise FusionError(f"window [{lo}, {hi}] is empty: give LO < HI")
    out = (np.asarray(values, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def robust_window(values: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[float, float]:
    """A window from percentiles of the non-background voxels (what auto window/level does)."""
    v = np.asarray(values)
    lo_all, hi_all = float(v.min()), float(v.max())
    fg = v[v > lo_all]
    if fg.size < 16:
        fg = v.ravel()
    lo, hi = np.percentile(fg, [low_pct, high_pct])
    lo = min(float(lo), lo_all) if low_pct <= 0 else float(lo)
    if hi <= lo:
        lo, hi = lo_all, hi_all
    if hi <= lo:
        raise FusionError("the image is constant: there is nothing to fuse (check the input file)")
    return float(lo), float(hi)


def apply_colormap(unit: np.ndarray, name_or_table) -> np.ndarray:
    """Map values in [0, 1] through a 256-entry table to RGB floats in [0, 1] (shape ... x 3)."""
    table = colormap_table(name_or_table) if isinstance(name_or_table, str) else np.asarray(name_or_table)
    return table[colormap_index(unit, table.shape[0])].astype(np.float32)


def colormap_index(unit: np.ndarray, n: int) -> np.ndarray:
    """The entry of an ``n``-entry table that values in [0, 1] map to (uint8 for up to 256 entries)."""
    idx = np.clip(np.floor(np.asarray(unit, dtype=np.float32) * n), 0, n - 1)
    return idx.astype(np.uint8 if n <= 256 else np.int32)


# RGB -> YCbCr (rows Y, Cb, Cr; the +0.5 offsets of Cb/Cr are added separately) and its inverse
_RGB2YCC = np.array([[0.299, 0.587, 0.114],
                     [-0.299 / 1.772, -0.587 / 1.772, (1 - 0.114) / 1.772],
                     [(1 - 0.299) / 1.402, -0.587 / 1.402, -0.114 / 1.402]])
_YCC2RGB = np.linalg.inv(_RGB2YCC)


def _apply_3x3(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``matrix @ x[..., :]`` per pixel, channel by channel (several times faster than a BLAS
    matmul with an inner dimension of 3 on large volumes)."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty_like(x)
    for i in range(3):
        o = out[..., i]
        np.multiply(x[..., 0], np.float32(matrix[i, 0]), out=o)
        o += np.float32(matrix[i, 1]) * x[..., 1]
        o += np.float32(matrix[i, 2]) * x[..., 2]
    return out


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """Full-range BT.601: RGB floats in [0, 1] (... x 3) to YCbCr in [0, 1]."""
    out = _apply_3x3(rgb, _RGB2YCC)
    out[..., 1:] += 0.5
    return out


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr`; the result is clipped to [0, 1]."""
    centred = np.array(ycc, dtype=np.float32, copy=True)
    centred[..., 1:] -= 0.5
    out = _apply_3x3(centred, _YCC2RGB)
    return np.clip(out, 0.0, 1.0, out=out)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 with rounding."""
    return np.clip(np.rint(np.asarray(unit, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def gray8(image: np.ndarray) -> np.ndarray:
    """8-bit grayscale as the fusion papers' evaluators read images: BT.601 luma for RGB, rounded.

    ``image`` is uint8, either ``[..., H, W]`` grayscale or ``[..., H, W, 3]`` RGB (the trailing
    axis of length 3 marks RGB). Matches PIL's ``convert('L')`` up to rounding of .5 cases.
    """
    a = np.asarray(image)
    if a.ndim >= 3 and a.shape[-1] == 3:
        y = a.astype(np.float64) @ _LUMA
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)
    if a.dtype != np.uint8:
        raise TypeError("gray8 expects uint8 images")
    return a


# --------------------------------------------------------------------------------------------------
# CIELAB (sRGB, D65) and the colour-keeping recombination
#
# Constants: IEC 61966-2-1 sRGB transfer curve and primaries (RGB -> XYZ matrix of the D65 sRGB
# primaries, as scikit-image's rgb2lab uses them), CIE 1976 L*a*b* with the D65 white of the 2-degree
# observer. Our own vectorised float code; scikit-image's rgb2lab is the independent reference in the tests.

_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_LAB_EPS = 0.008856            # (6/29)^3 as CIE rounds it
_LAB_KAPPA = 7.787             # 1/3 (29/6)^2


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    return np.where(v > 0.04045, ((np.maximum(v, 0.04045) + 0.055) / 1.055) ** 2.4, v / 12.92)


def linear_to_srgb(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    return np.where(v > 0.0031308, 1.055 * np.maximum(v, 0.0031308) ** (1 / 2.4) - 0.055, 12.92 * v)


def _lab_f(t: np.ndarray) -> np.ndarray:
    return np.where(t > _LAB_EPS, np.cbrt(t), _LAB_KAPPA * t + 16.0 / 116.0)


def _lab_f_inv(f: np.ndarray) -> np.ndarray:
    return np.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / _LAB_KAPPA)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB floats in [0, 1] (... x 3) to CIELAB (L* in [0, 100]), D65."""
    lin = srgb_to_linear(np.asarray(rgb, dtype=np.float64))
    xyz = lin @ _XYZ_FROM_RGB.T / _WHITE_D65
    f = _lab_f(xyz)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def lab_to_linear_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (... x 3) to linear-light sRGB, not clipped (outside [0, 1] = outside the sRGB gamut)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], -1)
    return (_lab_f_inv(f) * _WHITE_D65) @ _RGB_FROM_XYZ.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (... x 3) to sRGB floats, clipped to [0, 1]."""
    return np.clip(linear_to_srgb(np.clip(lab_to_linear_rgb(lab), 0.0, 1.0)), 0.0, 1.0)


def gray_lightness(y: np.ndarray) -> np.ndarray:
    """L* of the neutral grey whose sRGB value (and hence BT.601 luma) is ``y`` in [0, 1]."""
    return 116.0 * _lab_f(srgb_to_linear(np.clip(np.asarray(y, dtype=np.float32), 0.0, 1.0))) - 16.0


#: The colour-keeping recombination's parameters (docs/EVALUATION.md, "Colour"). The output's luma
#: is DETAIL_WEIGHT x (the fused luma clamped to the range of lumas the colour has inside its gamut
#: interval of lightness) + (1 - DETAIL_WEIGHT) x (the fused luma mapped linearly onto that range).
#: 1 (shipped) keeps the fused luma wherever the colour allows it; less mixes the linear map in
#: everywhere, which was measured to lower the lightness detail r (0.85: -0.03 on aanlib PET-MRI).
DETAIL_WEIGHT = 1.0
#: Where a colour's full chroma leaves a lightness interval narrower than MIN_LIGHTNESS_RANGE (L*
#: units: saturated colours near their gamut cusp), its chroma is lowered just enough to open it,
#: but never below MIN_CHROMA_KEPT of the functional's, and, for a scalar functional (it has a
#: colour bar), never so far that the colour reads back more than READBACK_TOLERANCE of the window
#: away from its own entry (nearest bar entry in a*, b*: PET-Heat's yellow-to-white half encodes
#: the uptake in chroma alone, so there the chroma stays whole).
MIN_LIGHTNESS_RANGE = 60.0
MIN_CHROMA_KEPT = 0.81
READBACK_TOLERANCE = 0.04
_GAMUT_TOL = 1e-6
_L_GRID = np.linspace(0.0, 100.0, 201)


def _in_gamut(lab: np.ndarray) -> np.ndarray:
    lin = lab_to_linear_rgb(lab)
    return np.all((lin >= -_GAMUT_TOL) & (lin <= 1.0 + _GAMUT_TOL), axis=-1)


def lightness_interval(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each chromaticity (a*, b*) (1-D arrays), the [L_min, L_max] where it fits the sRGB gamut
    (a grid of 0.5 L* units, then 12 bisection steps at each end); NaN where it fits nowhere."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = a.size
    grid = np.empty((n, _L_GRID.size, 3))
    grid[..., 0] = _L_GRID
    grid[..., 1] = a[:, None]
    grid[..., 2] = b[:, None]
    ok = _in_gamut(grid)
    any_ok = ok.any(1)
    first = np.argmax(ok, 1)
    last = _L_GRID.size - 1 - np.argmax(ok[:, ::-1], 1)
    step = _L_GRID[1] - _L_GRID[0]

    def refine(inside: np.ndarray, outside: np.ndarray) -> np.ndarray:
        for _ in range(12):
            mid = 0.5 * (inside + outside)
            good = _in_gamut(np.stack([mid, a, b], -1))
            inside = np.where(good, mid, inside)
            outside = np.where(good, outside, mid)
        return inside

    lo_in = _L_GRID[first]
    hi_in = _L_GRID[last]
    lo = refine(lo_in, np.maximum(lo_in - step, 0.0))
    hi = refine(hi_in, np.minimum(hi_in + step, 100.0))
    lo = np.where(first == 0, 0.0, lo)
    hi = np.where(last == _L_GRID.size - 1, 100.0, hi)
    return np.where(any_ok, lo, np.nan), np.where(any_ok, hi, np.nan)


def _nearest_entry(ab: np.ndarray, bar_ab: np.ndarray) -> np.ndarray:
    d = (ab * ab).sum(-1)[..., None] - 2.0 * ab @ bar_ab.T + (bar_ab * bar_ab).sum(-1)
    return d.argmin(-1)


def colour_plan(rgb: np.ndarray, bar: np.ndarray | None = None) -> np.ndarray:
    """How the recombination shows each functional colour (``rgb``: n x 3 in [0, 1]): n x 4 float64
    rows (a*, b*, L_min, L_max): the chromaticity it keeps (the colour's own hue; its chroma, or
    less where it leaves no lightness range: see :data:`MIN_LIGHTNESS_RANGE`; ``bar``: the scalar
    functional's N x 3 colour table, for the read-back bound) and the lightness interval where that
    fits the sRGB gamut (always containing the colour's own L* at full chroma)."""
    lab = rgb_to_lab(np.asarray(rgb, dtype=np.float64).reshape(-1, 3))
    n = lab.shape[0]
    bar_ab = None if bar is None else rgb_to_lab(np.asarray(bar, dtype=np.float64)[:, :3])[:, 1:]
    own = None if bar_ab is None else _nearest_entry(lab[:, 1:], bar_ab)
    tolerance = 0 if bar_ab is None else READBACK_TOLERANCE * len(bar_ab)
    chosen = np.zeros(n, dtype=bool)
    allowed = np.ones(n, dtype=bool)          # every step so far reads back within the tolerance
    k_out, lo_out, hi_out = np.ones(n), np.full(n, np.nan), np.full(n, np.nan)
    for k in np.linspace(1.0, MIN_CHROMA_KEPT, 10):
        ab = k * lab[:, 1:]
        if bar_ab is not None:    # this chroma and a little less (8-bit rounding) read back the same level
            for margin in (0.0, 0.03):
                allowed &= np.abs(_nearest_entry((k - margin) * lab[:, 1:], bar_ab) - own) <= tolerance
        lo, hi = lightness_interval(ab[:, 0], ab[:, 1])
        ok = allowed & ~chosen & np.isfinite(lo)
        take = ok & ((hi - lo) >= MIN_LIGHTNESS_RANGE)
        # keep the least reduction that opens the range; else the most reduction allowed so far
        better = ok & (~np.isfinite(lo_out) | ((hi - lo) > (hi_out - lo_out)))
        k_out[better], lo_out[better], hi_out[better] = k, lo[better], hi[better]
        chosen |= take
    full = lab[:, 0]
    lo_out = np.where(np.isfinite(lo_out), np.minimum(lo_out, np.where(k_out == 1.0, full, lo_out)), full)
    hi_out = np.where(np.isfinite(hi_out), np.maximum(hi_out, np.where(k_out == 1.0, full, hi_out)), full)
    return np.stack([k_out * lab[:, 1], k_out * lab[:, 2], lo_out, hi_out], -1)


#: Fused luma levels of the per-colour tables of :func:`keep_colour` (the luma is rounded to
#: 1/1023 before the table look-up: at most one 8-bit step from computing every voxel).
LUMA_LEVELS = 1024


def _colour_rows(plan: np.ndarray, weight: float) -> np.ndarray:
    """For each row (a*, b*, L_min, L_max) of ``plan``, the RGB uint8 output at every fused luma level.

    Along L* in [L_min, L_max] at the row's (a*, b*) the output's BT.601 luma rises monotonically
    from Y_min to Y_max; the fused luma y is brought into that range (``weight`` clamp(y) +
    (1 - weight) linear map of [0, 1] onto it) and the L* whose colour has that luma is taken
    (interpolated on 256 steps): where the colour allows it, the output's luma is the fused luma,
    as with the YCbCr recombination (so a reader, and the evaluators that read the luma, see the
    same anatomy), and the colour is the functional's."""
    n = plan.shape[0]
    y = np.linspace(0.0, 1.0, LUMA_LEVELS)
    t = np.linspace(0.0, 1.0, 256)
    lo, hi = plan[:, 2:3], plan[:, 3:4]
    grid = np.empty((n, t.size, 3))
    grid[..., 0] = lo + (hi - lo) * t
    grid[..., 1] = plan[:, 0:1]
    grid[..., 2] = plan[:, 1:2]
    luma = linear_to_srgb(np.clip(lab_to_linear_rgb(grid), 0.0, 1.0)) @ _LUMA
    luma = np.maximum.accumulate(luma, axis=1)                 # monotone (rounding at the ends)
    y_lo, y_hi = luma[:, :1], luma[:, -1:]
    linear = y_lo + (y_hi - y_lo) * y[None]
    target = linear + weight * (np.clip(y[None], y_lo, y_hi) - linear)
    lab = np.empty((n, LUMA_LEVELS, 3))
    for i in range(n):
        if y_hi[i, 0] > y_lo[i, 0]:
            lab[i, :, 0] = np.interp(target[i], luma[i], grid[i, :, 0])
        else:
            lab[i, :, 0] = lo[i, 0]
    lab[..., 1] = plan[:, 0:1]
    lab[..., 2] = plan[:, 1:2]
    return to_uint8(lab_to_rgb(lab))


class _ColourTables:
    """The output of each 8-bit functional colour at every fused luma level (LUMA_LEVELS x 3 uint8),
    kept by 24-bit key: the same functional colours recur in every slab and for every method (a
    scalar functional has at most its map's 256; an RGB picture a few thousand)."""

    LIMIT = 1 << 15          # colours kept (3 KB each)

    def __init__(self):
        self.rows: dict[tuple, np.ndarray] = {}
        self.settings = None

    def get(self, keys: np.ndarray, bar: np.ndarray | None = None) -> np.ndarray:
        settings = (DETAIL_WEIGHT, MIN_LIGHTNESS_RANGE, MIN_CHROMA_KEPT, READBACK_TOLERANCE)
        if self.settings != settings:             # a parameter changed (an experiment): start again
            self.rows.clear()
            self.settings = settings
        bar_key = None if bar is None else hash(np.ascontiguousarray(bar, dtype=np.float32).tobytes())
        missing = [int(k) for k in keys if (bar_key, int(k)) not in self.rows]
        if missing:
            if len(self.rows) + len(missing) > self.LIMIT:
                self.rows.clear()
            mk = np.asarray(missing, dtype=np.int64)
            rgb = np.stack([(mk >> 16) & 255, (mk >> 8) & 255, mk & 255], -1) / 255.0
            for start in range(0, len(missing), 512):
                rows = _colour_rows(colour_plan(rgb[start:start + 512], bar), DETAIL_WEIGHT)
                for k, row in zip(missing[start:start + 512], rows):
                    self.rows[(bar_key, k)] = row
        return np.stack([self.rows[(bar_key, int(k))] for k in keys])


_TABLES = _ColourTables()
#: A functional colour counts as neutral (shown as today: a grey of the fused luma) when its Cb and
#: Cr are both within this of 0.5 (half an 8-bit step).
NEUTRAL_TOL = 1.0 / 512


def keep_colour(fused_y: np.ndarray, functional_ycc: np.ndarray, bar: np.ndarray | None = None) -> np.ndarray:
    """The colour-keeping recombination: fused luma + the functional's colour -> RGB uint8 (... x 3).

    Where the functional is neutral the output is the grey of the fused luma (as the YCbCr
    recombination gives it). Elsewhere, in CIELAB: the functional's chromaticity (a*, b*) is kept
    (its hue; its chroma, or at least MIN_CHROMA_KEPT of it where the full chroma leaves less than
    MIN_LIGHTNESS_RANGE of lightness and the colour bar ``bar`` of a scalar functional still reads
    the same level, see :func:`colour_plan`), and the lightness is chosen along the interval
    [L_min, L_max] where that chromaticity fits the sRGB gamut, so that the colour is never clipped
    away: the lightness whose colour has the fused luma, where there is one (the fused luma clamped
    to the colour's range of lumas, with :data:`DETAIL_WEIGHT`; see :func:`_colour_rows`). A neutral
    colour's interval is [0, 100]: the grey of the fused luma.
    Fast: each functional colour's output at :data:`LUMA_LEVELS` fused lumas is computed once (and
    kept), so a voxel is a table look-up.
    """
    fused_y = np.asarray(fused_y, dtype=np.float32)
    out = np.repeat(to_uint8(fused_y)[..., None], 3, axis=-1)
    ycc = np.asarray(functional_ycc).reshape(-1, 3)
    idx = np.flatnonzero((np.abs(ycc[:, 1] - 0.5) > NEUTRAL_TOL) | (np.abs(ycc[:, 2] - 0.5) > NEUTRAL_TOL))
    if idx.size == 0:
        return out
    rgb8 = to_uint8(ycbcr_to_rgb(ycc[idx])).astype(np.int32)
    keys = (rgb8[:, 0] << 16) | (rgb8[:, 1] << 8) | rgb8[:, 2]
    uniq, inverse = np.unique(keys, return_inverse=True)
    tables = _TABLES.get(uniq, bar).reshape(-1, 3)
    level = np.rint(np.clip(fused_y.reshape(-1)[idx], 0.0, 1.0) * np.float32(LUMA_LEVELS - 1)).astype(np.intp)
    level += inverse.reshape(-1) * LUMA_LEVELS
    out.reshape(-1, 3)[idx] = np.take(tables, level, axis=0)
    return out
