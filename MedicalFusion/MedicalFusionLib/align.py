"""Put the functional image on the anatomical grid with SimpleITK, honouring the full
index-to-physical geometry (origin, spacing, direction cosines, flipped axes). The anatomical is
never resampled: the fused output has exactly its grid.
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import FusionError


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box of the voxel extents (corners at index -0.5, size-0.5)."""
    size = image.GetSize()
    corners = []
    for c in itertools.product(*[(-0.5, s - 0.5) for s in size]):
        corners.append(image.TransformContinuousIndexToPhysicalPoint(c))
    pts = np.array(corners)
    return pts.min(axis=0), pts.max(axis=0)


def overlap_fraction(reference: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None) -> float:
    """Fraction of the reference's voxel centres that fall inside the moving image (physically)."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8)
    ones.CopyInformation(moving)
    ones += 1
    mask = sitk.Resample(ones, reference, transform or sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return float(sitk.GetArrayViewFromImage(mask).mean())


def sub_grid(reference: sitk.Image, axis: int, start: int, stop: int) -> sitk.Image:
    """An empty image on the slices ``start:stop`` of ``reference``'s grid along numpy ``axis`` of its
    [Z, Y, X] array (ITK index axis ``2 - axis``): the reference's spacing and direction, the origin of
    its first voxel. Resampling onto it gives exactly those voxels of resampling onto the whole grid."""
    size = list(reference.GetSize())
    dim = 2 - axis
    index = [0, 0, 0]
    index[dim] = start
    size[dim] = stop - start
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(reference.GetSpacing())
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(reference.TransformIndexToPhysicalPoint(index))
    return grid


def reference_slabs(reference: sitk.Image, voxels: int) -> list[sitk.Image]:
    """The reference grid cut along its last index axis (ITK z) into slabs of about ``voxels`` voxels
    (:func:`sub_grid`: resampling onto the slabs gives exactly the voxels of resampling onto the
    whole grid)."""
    size = list(reference.GetSize())
    if reference.GetDimension() != 3:
        return [reference]
    per_slab = max(1, voxels // max(1, size[0] * size[1]))
    return [sub_grid(reference, 0, z0, min(size[2], z0 + per_slab)) for z0 in range(0, size[2], per_slab)]


#: Voxels per slab when resampling with a ``tick`` callback (about 0.03 s of work on a 2-core CPU).
SLAB_VOXELS = 1 << 18


def resample_to_reference(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
                          interpolator: int = sitk.sitkLinear,
                          tick: Callable[[float], None] | None = None) -> sitk.Image:
    """Resample ``moving`` (scalar or RGB) onto ``reference``'s grid; outside the moving image is 0.

    ``transform`` maps reference physical points to moving physical points (ITK's convention; in
    Slicer it is the functional's parent transform relative to the anatomical's). Raises
    FusionError when the two images do not overlap in physical space. ``tick(fraction)``, when
    given, is called between slabs of :data:`SLAB_VOXELS` voxels (the result is the same).
    """
    moving, same_grid = check_overlap(moving, reference, transform, tick)
    if same_grid:
        return moving
    slabs = reference_slabs(reference, SLAB_VOXELS) if tick is not None else [reference]
    if len(slabs) == 1:
        return resample_onto(moving, reference, transform, interpolator)
    parts = []
    for k, slab in enumerate(slabs):
        parts.append(sitk.GetArrayFromImage(resample_onto(moving, slab, transform, interpolator)))
        tick(0.25 + 0.75 * (k + 1) / len(slabs))
    out = sitk.GetImageFromArray(np.concatenate(parts, axis=0), isVector=moving.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(reference)
    return out


def check_overlap(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
                  tick: Callable[[float], None] | None = None) -> tuple[sitk.Image, bool]:
    """The checks of :func:`resample_to_reference` before any resampling: same dimension, some
    physical overlap (FusionError otherwise). Returns (``moving`` ready for :func:`resample_onto`:
    a scalar as float32, or ``moving`` itself when it already is on the reference grid; whether it
    is). The overlap is looked for slab by slab (uint8 masks of :data:`SLAB_VOXELS` voxels), up to
    the first slab that overlaps; ``tick(fraction)`` between slabs (fractions up to 0.25)."""
    if moving.GetDimension() != reference.GetDimension():
        raise FusionError("the anatomical and functional images have different dimensions: give two 2D images or two 3D volumes")
    slabs = reference_slabs(reference, SLAB_VOXELS)
    for k, slab in enumerate(slabs):
        overlaps = overlap_fraction(slab, moving, transform) > 0.0
        if tick is not None:
            tick(0.25 * (k + 1) / len(slabs))
        if overlaps:
            break
    else:
        lo_r, hi_r = physical_bounds(reference)
        lo_m, hi_m = physical_bounds(moving)
        raise FusionError(
            "the functional image does not overlap the anatomical one in physical space "
            f"(anatomical {np.round(lo_r, 1).tolist()}..{np.round(hi_r, 1).tolist()} mm, functional "
            f"{np.round(lo_m, 1).tolist()}..{np.round(hi_m, 1).tolist()} mm): register them first")
    same_grid = (transform is None and moving.GetSize() == reference.GetSize()
                 and np.allclose(moving.GetSpacing(), reference.GetSpacing())
                 and np.allclose(moving.GetOrigin(), reference.GetOrigin())
                 and np.allclose(moving.GetDirection(), reference.GetDirection()))
    if not same_grid and moving.GetNumberOfComponentsPerPixel() == 1:
        moving = sitk.Cast(moving, sitk.sitkFloat32)
    return moving, same_grid


def resample_onto(moving: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None,
                  interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """``moving`` (as :func:`check_overlap` returns it) resampled onto ``grid``; outside it is 0."""
    return sitk.Resample(moving, grid, transform or sitk.Transform(), interpolator, 0.0, moving.GetPixelID())
