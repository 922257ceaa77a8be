"""Before/after figures of the colour-keeping recombination (docs/EVALUATION.md, "Colour").

    PYTHONPATH=$PWD/MedicalFusion OMP_NUM_THREADS=1 python scripts/colour_figures.py

writes

- docs/figures/colour-bone-pet-ct.png: a bone lesion on PET/CT (the sts patient and axial slice
  with the most PET-coloured voxels over bone, > 215 HU): the PET's own colour through its map and
  window (the plain resample), then for mrdfn and lp the former recombination (BT.601 luma + Cb/Cr)
  and the shipped one;
- docs/figures/colour-mr.png: PET on MR of the aanlib test split (the case with the most coloured
  voxels over dark sulci and CSF, MRI < 15 % of its range): mrdfn and lp, before | after. Only our
  outputs are shown, never the dataset's images (as the evaluation montages).

The captions of both are printed (patient, slice, case).
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedicalFusion"))
sys.path.insert(0, str(ROOT))   # medicalfusion_tools

from MedicalFusionLib import colour  # noqa: E402
from MedicalFusionLib.engine import fuse_slices  # noqa: E402
from medicalfusion_tools.hotspot import Case  # noqa: E402
from MedicalFusionLib.methods import get_method  # noqa: E402
from MedicalFusionLib.pipeline import recombine  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FIGURES = ROOT / "docs" / "figures"
METHODS = ("mrdfn", "lp")


def coloured(functional_rgb: np.ndarray) -> np.ndarray:
    lab = colour.rgb_to_lab(functional_rgb)
    return np.hypot(lab[..., 1], lab[..., 2]) > 20.0


def row(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    h = max(t.shape[0] for t in tiles)
    parts = []
    for t in tiles:
        parts += [np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0)), constant_values=255),
                  np.full((h, gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], 1)


def before_after(anatomical01, ycc, grayscale, names, table=None) -> list[np.ndarray]:
    tiles = []
    for name in names:
        method = get_method(name)
        fused_y = fuse_slices(anatomical01, ycc[..., 0], method, device=torch.device("cpu"))
        for keep in (False, True):
            tiles.append(recombine(fused_y, ycc, method.chroma_scale, grayscale, keep_colour=keep, table=table)[0])
    return tiles


def crop_box(mask: np.ndarray, margin: int = 12) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    return (slice(max(0, ys.min() - margin), ys.max() + margin + 1),
            slice(max(0, xs.min() - margin), xs.max() + margin + 1))


def bone_figure() -> str:
    best = None
    for patient in ("STS_001", "STS_002", "STS_003"):
        root = DATA / "sts" / patient
        case = Case(root / "CT" / "dicom", root / "PET" / "dicom", root / "CT" / "gtv_mask.nii.gz")
        p = case.prepared
        over_bone = coloured(colour.ycbcr_to_rgb(p.functional_ycc)) & p.bone
        counts = over_bone.sum((1, 2))
        k = int(counts.argmax())
        if best is None or counts[k] > best[0]:
            best = (int(counts[k]), patient, k, case)
    _, patient, k, case = best
    p = case.prepared
    sl = slice(k, k + 1)
    tiles = [case.reference_rgb[k]] + before_after(p.anatomical[sl], p.functional_ycc[sl], p.grayscale, METHODS,
                                                  p.functional_table)
    box = crop_box(np.any(case.reference_rgb[k] > 0, -1) & (p.anatomical[k] > 0.02))
    image = row([np.repeat(np.repeat(t[box], 2, 0), 2, 1) for t in tiles])
    _write(FIGURES / "colour-bone-pet-ct.png", image)
    return (f"colour-bone-pet-ct.png: {patient} PET onto CT, axial slice {k} (z index), soft-tissue window, "
            f"PET-Heat over the PET's default window; columns: PET's own colour, "
            + ", ".join(f"{m} before, {m} after" for m in METHODS))


def mr_figure() -> str:
    from medicalfusion_tools.evaluate import load_modality  # noqa: PLC0415
    from medicalfusion_tools.training.data import read_split  # noqa: PLC0415

    records = read_split(DATA / "aanlib", "test", pairs=("PET-MRI",))
    data = load_modality(records)
    col = coloured(colour.ycbcr_to_rgb(data["ycc"]))
    dark = col & (data["mri"] < 0.15) & (data["mri"] > 0.0)
    i = int(dark.sum((1, 2)).argmax())
    tiles = before_after(data["mri"][i:i + 1], data["ycc"][i:i + 1], data["grayscale"], METHODS)
    image = row([np.repeat(np.repeat(t, 2, 0), 2, 1) for t in tiles])
    _write(FIGURES / "colour-mr.png", image)
    return (f"colour-mr.png: aanlib PET-MRI test case {data['names'][i]} (our outputs only); columns: "
            + ", ".join(f"{m} before, {m} after" for m in METHODS))


def _write(path: pathlib.Path, image: np.ndarray) -> None:
    import SimpleITK as sitk  # noqa: PLC0415

    tmp = path.with_suffix(".tmp.png")
    sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(tmp))
    tmp.replace(path)


def main() -> int:
    torch.set_num_threads(1)
    FIGURES.mkdir(parents=True, exist_ok=True)
    print(bone_figure())
    print(mr_figure())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
