"""Reading the two inputs: anything SimpleITK reads (NRRD, NIfTI, MHA, a DICOM series folder,
PNG/JPG for 2D), after the checks of their paths and files (files.py): :func:`read_source`.

A DICOM folder must hold one series and nothing else that is DICOM (a damaged slice is otherwise
dropped silently, :func:`dicom_series_files`); the series is read in its units (PET in SUV when the
header allows, dicom.py). What the image holds is checked afterwards, for files and scene nodes
alike, by :func:`MedicalFusionLib.images.as_3d`.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import stat
import sys
import tempfile
from dataclasses import dataclass

import SimpleITK as sitk

from ..errors import FusionError
from .dicom import SeriesFacts, read_series
from .files import (PICTURE_EXTENSIONS, _kind, _os_error_reason, check_image_file, check_input_path, display_path,
                    extension)


@dataclass
class Source:
    """An input image as read (its contents are checked by the pipeline), whether it is 2D, where
    it came from, and whether it is a display-ready 8-bit picture (PNG/JPG/BMP: window 0..255)."""

    image: sitk.Image
    path: str = ""
    display_ready: bool = False
    facts: SeriesFacts | None = None     # what a DICOM series' headers say (modality, units, ...)

    @property
    def was_2d(self) -> bool:
        return self.image.GetDimension() == 2


# --------------------------------------------------------------------------------------------------
# ITK's own printing


@contextlib.contextmanager
def native_quiet():
    """Keep what ITK's C/C++ libraries print on the process's stderr (niftilib's "** ERROR",
    MetaIO's messages, GDCM and ITK warnings) off the user's terminal for the block. Failures are
    found by this package's own checks, which then say what went wrong in one line."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# --------------------------------------------------------------------------------------------------
# reading


def _dicom_files(folder: pathlib.Path, label: str) -> list[pathlib.Path]:
    """The regular files of a folder; anything else in it (FIFO, device, link loop) is refused
    because the DICOM scanner would open it."""
    files = []
    for name in sorted(os.listdir(folder)):
        entry = folder / name
        try:
            st = os.stat(entry)
        except OSError as exc:
            raise FusionError(f"{label} holds {display_path(name)}, which cannot be opened "
                              f"({_os_error_reason(exc)}): remove it from the folder") from None
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise FusionError(f"{label} holds {display_path(name)}, which is {_kind(st.st_mode)}: "
                              "remove it from the folder")
        files.append(entry)
    return files


def _looks_like_dicom(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_series_files(folder: pathlib.Path, label: str = "") -> list[str]:
    """The files of the one DICOM series in ``folder``, in SimpleITK's (GDCM's) slice order; every
    other DICOM file in the folder is refused."""
    label = label or f"input {display_path(folder)}"
    files = _dicom_files(folder, label)
    reader = sitk.ImageSeriesReader()
    with native_quiet():
        ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise FusionError(f"{label} is a folder without a DICOM series: give an image file or a DICOM series folder")
    if len(ids) > 1:
        raise FusionError(f"{label} holds {len(ids)} DICOM series: put the series to fuse in a folder of its own")
    with native_quiet():
        names = reader.GetGDCMSeriesFileNames(str(folder), ids[0])
    in_series = {os.path.normcase(os.path.abspath(n)) for n in names}
    for f in files:
        if f.name.upper() != "DICOMDIR" and os.path.normcase(os.path.abspath(f)) not in in_series \
                and _looks_like_dicom(f):
            raise FusionError(f"{label}: {display_path(f.name)} is a DICOM file that is not part of the series "
                              "(truncated or damaged?): replace or remove it")
    return list(names)


def _read_dicom_series(folder: pathlib.Path, label: str = "") -> tuple[sitk.Image, SeriesFacts]:
    """The series' image in its units (PET in SUV when the header allows) and its header facts."""
    files = dicom_series_files(folder, label)
    with native_quiet():
        return read_series(files)


def read_source(path: str | os.PathLike, role: str) -> Source:
    """Read one input; ``role`` ('anatomical' or 'functional') is named in errors."""
    label = f"{role} input"
    p = check_input_path(path, label)
    shown = f"{label} {display_path(p)}"
    is_dir = p.is_dir()
    if not is_dir:
        check_image_file(p, shown)
    try:
        facts = None
        if is_dir:
            image, facts = _read_dicom_series(p, shown)
        else:
            with native_quiet():
                image = sitk.ReadImage(str(p))
    except RuntimeError:
        raise FusionError(f"{shown} is not an image SimpleITK can read: use NRRD, NIfTI, MHA, DICOM or PNG/JPG") from None
    display_ready = (not is_dir and extension(p) in PICTURE_EXTENSIONS
                     and image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkVectorUInt8))
    return Source(image, path=str(p), display_ready=display_ready, facts=facts)
