"""What an input image holds, checked for files and scene nodes alike before it is fused (the
pipeline calls these): 2D or 3D, scalar or RGB, finite, not constant, values that fit 32-bit floats,
slices large enough, a 2D picture never paired with a 3D volume. (The checks of the files an image
comes from are in io/files.py.)

After :func:`as_3d` an image is 3D (a 2D image becomes a one-slice volume) with either one
component (scalar) or three (RGB pseudo-colour, uint8).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import FusionError

#: Smallest slice (pixels on each side) the methods and the metrics work on (SSIM's 7x7 window).
MIN_SLICE = 7
_FLOAT32_SAFE = 1e38      # beyond this, differences of values overflow 32-bit floats


def _rgb_to_uint8(image: sitk.Image, label: str) -> sitk.Image:
    """A 3-component image that is not uint8 as 8-bit RGB: floats in [0, 1] are scaled by 255,
    values in [0, 255] are rounded; anything else is refused."""
    arr = sitk.GetArrayFromImage(image)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise FusionError(f"{label} contains NaN or infinite values: fix or mask them before fusing")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 255:
        raise FusionError(f"{label} is a 3-component image with values {lo:g}..{hi:g}, not RGB colour: "
                          "give 8-bit RGB (0..255), float RGB in 0..1, or scalar values")
    if arr.dtype.kind == "f" and hi <= 1.0:
        arr = arr * 255.0
    new = sitk.GetImageFromArray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), isVector=True)
    new.CopyInformation(image)
    return new


def as_3d(image: sitk.Image, role: str, name: str = "") -> tuple[sitk.Image, bool]:
    """Check an image and return it as 3D (2D becomes one slice); raises FusionError on bad input."""
    label = f"{role} input {name}".strip()
    dim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    if dim == 4:
        raise FusionError(f"{label} is 4D (a time series or multi-frame volume): extract one 3D frame first")
    if dim not in (2, 3):
        raise FusionError(f"{label} has {dim} dimensions: give a 2D image or a 3D volume")
    if ncomp == 4:  # RGBA (PNG): drop alpha
        image = sitk.Compose([sitk.VectorIndexSelectionCast(image, i) for i in range(3)])
        ncomp = 3
    if ncomp not in (1, 3):
        raise FusionError(f"{label} has {ncomp} values per voxel (a multi-frame or multi-channel volume): "
                          "give a scalar or an RGB image, e.g. extract one frame")
    if ncomp == 3 and image.GetPixelID() != sitk.sitkVectorUInt8:
        image = _rgb_to_uint8(image, label)
    arr = sitk.GetArrayViewFromImage(image)
    if arr.size == 0:
        raise FusionError(f"{label} is empty: check the file")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise FusionError(f"{label} contains NaN or infinite values: fix or mask them before fusing")
    lo, hi = arr.min(), arr.max()
    if np.issubdtype(arr.dtype, np.floating):
        big = max(abs(float(lo)), abs(float(hi)))
        if big > _FLOAT32_SAFE:
            raise FusionError(f"{label} has values up to {big:.3g}, too large to window in 32-bit floats: "
                              "rescale it (e.g. to its physical units) before fusing")
        # rounding to float32 keeps the order of values: the extremes tell whether any two differ
        with np.errstate(under="ignore"):
            same32 = np.float32(lo) == np.float32(hi)
        if same32 and lo != hi:
            raise FusionError(f"{label} has values that differ only beyond 32-bit float precision "
                              f"({float(lo):.3g}..{float(hi):.3g}): rescale it before fusing")
    if lo == hi:
        raise FusionError(f"{label} is constant (every voxel {arr.flat[0]}): there is nothing to fuse, check the file")
    was_2d = dim == 2
    if was_2d:
        image = sitk.JoinSeries(image)
    return image, was_2d


def check_same_dimension(anatomical_2d: bool, functional_2d: bool) -> None:
    """A 2D picture never pairs with a 3D volume (its one plane would be fused with whatever lies
    there)."""
    if anatomical_2d != functional_2d:
        two, three = ("anatomical", "functional") if anatomical_2d else ("functional", "anatomical")
        raise FusionError(f"the {two} input is a 2D image and the {three} input a 3D volume: "
                          "give two 2D images or two 3D volumes")


def check_slice_size(image: sitk.Image, axis: int, axis_name: str = "") -> None:
    """Slices along numpy ``axis`` of ``image`` must be at least :data:`MIN_SLICE` pixels a side."""
    shape = list(reversed(image.GetSize()))           # [Z, Y, X]
    plane = [n for i, n in enumerate(shape) if i != axis]
    if min(plane) < MIN_SLICE:
        what = f"{axis_name} slices" if axis_name else "slices"
        raise FusionError(f"the anatomical's {what} are {plane[0]}x{plane[1]} pixels: fusion and its metrics need "
                          f"at least {MIN_SLICE}x{MIN_SLICE} (choose another slice orientation or a larger image)")


def rgb_is_gray(image: sitk.Image) -> bool:
    """True when a 3-component image has equal channels (a grayscale image saved as RGB)."""
    if image.GetNumberOfComponentsPerPixel() != 3:
        return False
    a = sitk.GetArrayViewFromImage(image)
    return bool(np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]))
