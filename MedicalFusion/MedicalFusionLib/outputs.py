"""Writing results: the fused volume, a preview PNG and the metrics CSV.

Files are written to a temporary name beside the target and renamed into place, so a failure or
a cancel never leaves a partial output; an output path that names an input is refused.
"""
from __future__ import annotations

import csv
import os
import pathlib
import uuid

import numpy as np
import SimpleITK as sitk

from .errors import FusionError


def check_output_path(path: str | os.PathLike, inputs: list[str | os.PathLike], what: str = "output") -> pathlib.Path:
    """Refuse an output that would overwrite an input or cannot be written; returns the path."""
    out = pathlib.Path(path)
    resolved = out.resolve()
    for inp in inputs:
        if inp and resolved == pathlib.Path(inp).resolve():
            raise FusionError(f"{what} {out} is an input file: choose another output path (inputs are never overwritten)")
    if out.is_dir():
        raise FusionError(f"{what} {out} is a folder: give a file name such as fused.nrrd")
    parent = resolved.parent
    if not parent.is_dir():
        raise FusionError(f"the folder of {what} {out} does not exist: create it or choose another path")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise FusionError(f"{what} {out} is not writable: choose a path you can write to")
    return out


def _temp_beside(path: pathlib.Path) -> pathlib.Path:
    # keep the full extension (e.g. .nii.gz) so SimpleITK picks the same writer
    return path.with_name(f".partial-{uuid.uuid4().hex[:8]}-{path.name}")


def write_atomic(path: str | os.PathLike, write, hint: str, what: str = "") -> None:
    """``write(temporary_path)`` beside ``path``, then rename into place; a SimpleITK writer's
    RuntimeError becomes FusionError('cannot write <what> <path>: <hint>')."""
    path = pathlib.Path(path)
    tmp = _temp_beside(path)
    label = f"{what} {path}".strip()
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except RuntimeError:
        tmp.unlink(missing_ok=True)
        raise FusionError(f"cannot write {label}: {hint}") from None
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FusionError(f"cannot write {label}: {exc.strerror or exc}") from None


def write_image_atomic(image: sitk.Image, path: str | os.PathLike) -> None:
    write_atomic(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True),
                 "use an extension SimpleITK writes (.nrrd, .nii.gz, .mha, .png)")


def fused_image_for_file(rgb: np.ndarray, reference: sitk.Image, as_2d: bool) -> sitk.Image:
    """The RGB result as a vector image with the reference geometry (2D when the inputs were 2D)."""
    img = sitk.GetImageFromArray(rgb, isVector=True)
    img.CopyInformation(reference)
    return img[:, :, 0] if as_2d else img


def write_metrics_csv(rows: list[dict], path: str | os.PathLike, extra: dict | None = None) -> None:
    path = pathlib.Path(path)
    tmp = _temp_beside(path)
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "mean", "std", "slices", "description"])
        for r in rows:
            writer.writerow([r["metric"], f"{r['mean']:.6g}", f"{r['std']:.6g}", r["slices"], r["description"]])
        for k, v in (extra or {}).items():
            writer.writerow([k, v, "", "", "run information"])
    os.replace(tmp, path)


def _oriented(array: np.ndarray, reference: sitk.Image) -> np.ndarray:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=array.ndim == 4)
    img.CopyInformation(reference)
    return sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))


def preview_montage(anatomical8: np.ndarray, functional_rgb8: np.ndarray, fused_rgb8: np.ndarray,
                    reference: sitk.Image, orientation: str = "axial") -> np.ndarray:
    """Anatomical | functional | fused side by side (uint8 RGB), at the slice with the most content.

    Volumes are first reoriented to LPS index order, so the picture is in radiological convention
    (anterior or superior up, patient's left on the right) whatever the storage order.
    """
    a = _oriented(np.repeat(anatomical8[..., None], 3, axis=-1), reference)
    f = _oriented(functional_rgb8, reference)
    r = _oriented(fused_rgb8, reference)
    axis = {"axial": 0, "coronal": 1, "sagittal": 2}.get(str(orientation).lower(), 0)
    if reference.GetSize()[2] == 1:
        axis = 0
    content = np.moveaxis(a[..., 0], axis, 0).reshape(a.shape[axis], -1).astype(np.int64).sum(axis=1)
    k = int(np.argmax(content))
    views = [np.take(v, k, axis=axis) for v in (a, f, r)]
    if axis != 0:  # rows run inferior -> superior: put superior at the top
        views = [v[::-1] for v in views]
    gap = np.full((views[0].shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([views[0], gap, views[1], gap, views[2]], axis=1)


def write_preview(montage: np.ndarray, path: str | os.PathLike) -> None:
    write_image_atomic(sitk.GetImageFromArray(np.ascontiguousarray(montage), isVector=True), path)
