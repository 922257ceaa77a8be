"""Reading the two inputs: anything SimpleITK reads (NRRD, NIfTI, MHA, a DICOM series folder,
PNG/JPG for 2D), and the one check of their contents (:func:`as_3d`, called by the pipeline for
files and scene nodes alike), so that bad input fails early with one line that says what to do.

After :func:`as_3d` an image is 3D (a 2D image becomes a one-slice volume) with either one
component (scalar) or three (RGB pseudo-colour, uint8).
"""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .dicom import SeriesFacts, read_series
from .errors import FusionError


@dataclass
class Source:
    """An input image as read (its contents are checked by the pipeline), whether it is 2D, and
    where it came from."""

    image: sitk.Image
    path: str = ""
    facts: SeriesFacts | None = None     # what a DICOM series' headers say (modality, units, ...)

    @property
    def was_2d(self) -> bool:
        return self.image.GetDimension() == 2


def _read_dicom_series(folder: pathlib.Path) -> tuple[sitk.Image, SeriesFacts]:
    """The series' image in its units (PET in SUV when the header allows) and its header facts."""
    return read_series(folder)


def read_source(path: str | os.PathLike, role: str) -> Source:
    """Read one input; ``role`` ('anatomical' or 'functional') is named in errors."""
    p = pathlib.Path(path)
    if not p.exists():
        raise FusionError(f"{role} input {p} does not exist: check the path")
    facts = None
    try:
        if p.is_dir():
            image, facts = _read_dicom_series(p)
        else:
            image = sitk.ReadImage(str(p))
    except FusionError:
        raise
    except RuntimeError:
        raise FusionError(f"{role} input {p} is not an image SimpleITK can read: use NRRD, NIfTI, MHA, DICOM or PNG/JPG") from None
    return Source(image, path=str(p), facts=facts)


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
    if ncomp == 3 and image.GetPixelID() not in (sitk.sitkVectorUInt8,):
        arr = sitk.GetArrayFromImage(image)
        if arr.min() < 0 or arr.max() > 255:
            raise FusionError(f"{label} is a 3-component image that is not 8-bit RGB: give scalar values or RGB colour")
        new = sitk.GetImageFromArray(arr.astype(np.uint8), isVector=True)
        new.CopyInformation(image)
        image = new
    arr = sitk.GetArrayViewFromImage(image)
    if arr.size == 0:
        raise FusionError(f"{label} is empty: check the file")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise FusionError(f"{label} contains NaN or infinite values: fix or mask them before fusing")
    if arr.min() == arr.max():
        raise FusionError(f"{label} is constant (every voxel {arr.flat[0]}): there is nothing to fuse, check the file")
    was_2d = dim == 2
    if was_2d:
        image = sitk.JoinSeries(image)
    return image, was_2d


def rgb_is_gray(image: sitk.Image) -> bool:
    """True when a 3-component image has equal channels (a grayscale image saved as RGB)."""
    if image.GetNumberOfComponentsPerPixel() != 3:
        return False
    a = sitk.GetArrayViewFromImage(image)
    return bool(np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]))
