"""Where the tracer's colour lands in a fused volume, and whether the anatomy stays visible under it:
the two measures of the real-case tests (Testing/Python/test_real_cases.py) and docs/CLINICAL.md.

- Colour strength of a voxel: the chroma of its RGB, |(Cb, Cr) - neutral| in full-range BT.601
  YCbCr, i.e. how coloured it looks whatever its brightness. :func:`top_fraction_in` gives, of the
  voxels with the strongest colour (the top ``fraction`` of all voxels, ties at the cut included),
  the share inside a mask (the tumour). :func:`plain_reference_rgb` is what the same rule is
  compared with: a plain SimpleITK resample of the functional, coloured with the same map and window.
  With PET-Heat the chroma peaks at 37 % of the window (yellow) and falls to white at the top: the
  strongest colour is the uptake around the hottest voxels, in the PET as in the fused image.
- Anatomy under the colour: :func:`detail_kept` correlates the fine detail (difference of Gaussians,
  sigma 1 and 3 voxels in plane) of the fused luma with that of the windowed anatomical, inside a
  region (where the functional's colour is visible: :func:`coloured_region`), and gives the
  regression slope (how much of the detail's amplitude is kept; an alpha blend at opacity 0.5
  keeps 0.5).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from MedicalFusionLib import colour

TOP_FRACTION = 0.01
COLOURED_CHROMA = 0.1
DETAIL_SIGMAS = (1.0, 3.0)


def chroma(rgb8: np.ndarray) -> np.ndarray:
    """How coloured each voxel looks: |(Cb, Cr) - neutral| of full-range BT.601 YCbCr (0 .. ~0.5)."""
    ycc = colour.rgb_to_ycbcr(np.asarray(rgb8, dtype=np.float32) / 255.0)
    return np.hypot(ycc[..., 1] - 0.5, ycc[..., 2] - 0.5)


def top_fraction_in(score: np.ndarray, mask: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Of the voxels scoring at least the k-th highest score (k = ``fraction`` of all voxels; ties
    at the cut included), the share inside ``mask``."""
    flat = np.asarray(score).ravel()
    k = max(1, int(fraction * flat.size))
    cut = np.partition(flat, flat.size - k)[flat.size - k]
    top = np.asarray(score) >= cut
    return float(np.asarray(mask)[top].mean())


def plain_reference_rgb(functional: sitk.Image, anatomical: sitk.Image, window: tuple[float, float],
                        colormap: str) -> np.ndarray:
    """The functional resampled onto the anatomical grid with plain SimpleITK (linear, identity),
    coloured through ``colormap`` over ``window``: uint8 RGB [Z, Y, X, 3]."""
    plain = sitk.Resample(sitk.Cast(functional, sitk.sitkFloat32), anatomical, sitk.Transform(), sitk.sitkLinear, 0.0)
    unit = colour.window_to_unit(sitk.GetArrayFromImage(plain), *window)
    return colour.to_uint8(colour.apply_colormap(unit, colormap))


def coloured_region(reference_rgb: np.ndarray, anatomical01: np.ndarray, min_chroma: float = COLOURED_CHROMA) -> np.ndarray:
    """Where the functional's colour is visible (chroma >= ``min_chroma``) over non-background anatomy."""
    return (chroma(reference_rgb) >= min_chroma) & (np.asarray(anatomical01) > 0.02)


def _detail(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    s1, s2 = DETAIL_SIGMAS
    return ndi.gaussian_filter(x, (0, s1, s1)) - ndi.gaussian_filter(x, (0, s2, s2))


def detail_kept(fused_luma8: np.ndarray, anatomical8: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """(correlation, slope) of the fused luma's fine detail against the anatomical's, in ``region``."""
    f, a = _detail(fused_luma8)[region], _detail(anatomical8)[region]
    return float(np.corrcoef(a, f)[0, 1]), float((a * f).sum() / (a * a).sum())


class Case:
    """A functional -> anatomical pair read from files or DICOM folders, prepared once with the
    pipeline's defaults (units from the DICOM headers), with its tumour mask on the anatomical grid,
    the plain-resample reference and the coloured region; fusions made on demand and kept."""

    def __init__(self, anatomical_path, functional_path, mask_path):
        from MedicalFusionLib.pipeline import FusionOptions, prepare  # noqa: PLC0415  (torch only when used)
        from MedicalFusionLib.io.read import read_source  # noqa: PLC0415

        self.anat = read_source(anatomical_path, "anatomical")
        self.functional = read_source(functional_path, "functional")
        units = [(s.facts.units or None) if s.facts else None for s in (self.anat, self.functional)]
        self.options = FusionOptions(compute_metrics=False, anatomical_units=units[0], functional_units=units[1])
        self.prepared = prepare(self.anat.image, self.functional.image, self.options)
        self.mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
        self.reference_rgb = plain_reference_rgb(self.functional.image, self.anat.image,
                                                 self.prepared.functional_window, self.prepared.colormap)
        self.anatomical8 = colour.to_uint8(self.prepared.anatomical)
        self.coloured = coloured_region(self.reference_rgb, self.prepared.anatomical)
        self._fused: dict = {}

    def fused(self, method: str) -> np.ndarray:
        """The fused RGB (uint8 [Z, Y, X, 3]) of ``method``."""
        from MedicalFusionLib.pipeline import fuse_prepared  # noqa: PLC0415

        if method not in self._fused:
            self.options.method = method
            self._fused[method] = fuse_prepared(self.prepared, self.options).rgb
        return self._fused[method]

    def hot_spot(self, method: str | None = None) -> float:
        """Share in the mask of the strongest-coloured voxels: of ``method``'s output, or of the reference."""
        rgb = self.reference_rgb if method is None else self.fused(method)
        return top_fraction_in(chroma(rgb), self.mask)

    def anatomy(self, method: str) -> tuple[float, float]:
        """(detail correlation, detail slope) of ``method``'s fused luma in the coloured region."""
        return detail_kept(colour.gray8(self.fused(method)), self.anatomical8, self.coloured)
