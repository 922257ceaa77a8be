"""The extension's catalog screenshot and its Sample Data thumbnail, made from the module's own output.

    python scripts/figures.py [--method lp]

fuses the embedded sample (MNI152 T1 + simulated FDG PET, MedicalFusionLib/sample.py) with the
core pipeline, as the panel does with its defaults (PET-Heat, windows from the data), and writes

- docs/figures/fused-pet-mri-views.png: the fused volume in three orientations (axial | coronal |
  sagittal, radiological convention, the slice with the most anatomy in each), with the colour bar
  under them (the PET's map over the window the fusion used, as the CLI's --preview draws it:
  MedicalFusionLib.legend.draw_colour_bar);
- MedicalFusion/Resources/Icons/MedicalFusionSample.png: a 128 x 128 thumbnail of the axial fused
  slice, the sample's button in Slicer's Sample Data module.

docs/figures/fused-pet-mri.png (anatomical | functional | fused) comes from ``make demo``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import SimpleITK as sitk

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))

from MedicalFusionLib import colour, legend  # noqa: E402
from MedicalFusionLib.io import outputs  # noqa: E402
from MedicalFusionLib.pipeline import FusionOptions, fuse_images, source_gray8  # noqa: E402
from MedicalFusionLib.sample import sample_pair, template_folder  # noqa: E402

VIEWS = REPO / "docs" / "figures" / "fused-pet-mri-views.png"
THUMBNAIL = REPO / "MedicalFusion" / "Resources" / "Icons" / "MedicalFusionSample.png"


#: The functional's name on the colour bar (the Sample Data node's name in Slicer).
FUNCTIONAL_NAME = "Simulated FDG PET"


def fused_views(method: str) -> tuple[list[np.ndarray], legend.Legend | None]:
    """The fused slice (uint8 RGB) in each orientation, as the preview montage orients it, and the
    run's colour bar."""
    anatomical, functional = sample_pair()
    result = fuse_images(anatomical, functional, FusionOptions(method=method, compute_metrics=False))
    a8, _ = source_gray8(result.prepared)
    functional_rgb = colour.to_uint8(colour.ycbcr_to_rgb(result.prepared.functional_ycc))
    views = []
    for orientation in ("axial", "coronal", "sagittal"):
        montage = outputs.preview_montage(a8, functional_rgb, result.rgb, result.reference, orientation)
        width = (montage.shape[1] - 8) // 3           # three panels with two 4-pixel gaps
        views.append(montage[:, 2 * (width + 4):])
    return views, legend.legend_for(result.prepared, name=FUNCTIONAL_NAME)


def side_by_side(views: list[np.ndarray]) -> np.ndarray:
    height = max(v.shape[0] for v in views)
    padded = [np.pad(v, ((0, height - v.shape[0]), (0, 0), (0, 0))) for v in views]
    gap = np.full((height, 4, 3), 255, np.uint8)
    parts = []
    for v in padded:
        parts += [v, gap]
    return np.concatenate(parts[:-1], axis=1)


def thumbnail(view: np.ndarray, size: int = 128) -> np.ndarray:
    """Square crop around the content, resampled to size x size (linear, SimpleITK)."""
    rows, cols = np.nonzero(view.max(axis=2) > 8)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(r1 - r0, c1 - c0)
    square = np.zeros((side, side, 3), np.uint8)
    square[(side - (r1 - r0)) // 2:][: r1 - r0, (side - (c1 - c0)) // 2:][:, : c1 - c0] = view[r0:r1, c0:c1]
    image = sitk.GetImageFromArray(square, isVector=True)
    reference = sitk.Image([size, size], sitk.sitkVectorUInt8, 3)
    reference.SetSpacing([side / size, side / size])
    reference.SetOrigin([(side / size - 1) / 2] * 2)
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="lp")
    args = parser.parse_args(argv)
    if template_folder() is None:
        sys.exit("figures.py: nilearn (with its MNI152 template) is not installed: run make setup first")
    views, bar = fused_views(args.method)
    picture = side_by_side(views)
    outputs.write_preview(legend.draw_colour_bar(picture, bar) if bar is not None else picture, VIEWS)
    outputs.write_preview(thumbnail(views[0]), THUMBNAIL)
    for path in (VIEWS, THUMBNAIL):
        print(f"{path.relative_to(REPO)}: {path.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
