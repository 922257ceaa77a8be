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
    n = table.shape[0]
    idx = np.clip(np.floor(np.asarray(unit, dtype=np.float32) * n), 0, n - 1).astype(np.intp)
    return table[idx].astype(np.float32)


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
