"""The aanlib fusion pairs as training / evaluation data.

``split.csv`` (columns pair, modality, mri, image, case, split) lists co-registered 256x256 PNG
pairs; the split is case-disjoint. The functional image (PET/SPECT pseudo-colour RGB) enters the
networks as its BT.601 luma, CT as it is, both as floats in [0, 1].
"""
from __future__ import annotations

import csv
import os
import pathlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from MedicalFusionLib.colour import rgb_to_ycbcr
from MedicalFusionLib.errors import FusionError

PAIRS = ("CT-MRI", "PET-MRI", "SPECT-MRI")


def default_data_root() -> pathlib.Path:
    """``$MEDICALFUSION_DATA`` or ``../shared/data`` beside the repository checkout."""
    env = os.environ.get("MEDICALFUSION_DATA")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class PairRecord:
    pair: str
    modality: str
    mri: pathlib.Path
    image: pathlib.Path
    case: str
    split: str

    @property
    def stem(self) -> str:
        return self.mri.stem


def dataset_root(root) -> pathlib.Path:
    """The aanlib folder: ``root`` itself or ``root/aanlib`` when that holds split.csv."""
    root = pathlib.Path(root)
    return root / "aanlib" if (root / "aanlib" / "split.csv").is_file() else root


SPLIT_COLUMNS = ("pair", "modality", "mri", "image", "case", "split")


def read_split(root: pathlib.Path, split: str | None = None, pairs: tuple[str, ...] = PAIRS) -> list[PairRecord]:
    """Records of ``aanlib/split.csv`` under ``root`` (the aanlib folder or its parent)."""
    root = dataset_root(root)
    csv_path = root / "split.csv"
    if not csv_path.is_file():
        raise FusionError(f"{csv_path} not found: pass the aanlib folder (with split.csv) as --data/--dataset")
    out = []
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in SPLIT_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise FusionError(f"{csv_path} lacks the column(s) {', '.join(missing)}: it needs "
                                  f"{', '.join(SPLIT_COLUMNS)}")
            for row in reader:
                if (split is None or row["split"] == split) and row["pair"] in pairs:
                    out.append(PairRecord(row["pair"], row["modality"], root / row["mri"], root / row["image"],
                                          row["case"], row["split"]))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FusionError(f"{csv_path} cannot be read ({' '.join(str(exc).split())[:120]}): check the file") from None
    return out


def read_png(path: pathlib.Path) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] of one dataset picture (checked: complete, readable, 8-bit)."""
    from MedicalFusionLib.io.files import check_image_file, check_input_path, display_path  # noqa: PLC0415
    from MedicalFusionLib.io.read import native_quiet  # noqa: PLC0415

    label = f"dataset image {display_path(path)}"
    check_input_path(path, "dataset image")
    check_image_file(path, label)
    try:
        with native_quiet():
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError:
        raise FusionError(f"{label} is not an image SimpleITK can read: replace it") from None
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise FusionError(f"{label} is not an 8-bit grayscale or RGB picture: replace it")
    return arr


def unit_y(img8: np.ndarray) -> np.ndarray:
    """float32 [H, W] in [0, 1]: the image itself if grayscale, its BT.601 luma if RGB."""
    x = img8.astype(np.float32) / 255.0
    return rgb_to_ycbcr(x)[..., 0] if x.ndim == 3 else x


def load_pair(rec: PairRecord) -> tuple[np.ndarray, np.ndarray]:
    """(MRI, functional luma) as float32 [H, W] in [0, 1]."""
    return unit_y(read_png(rec.mri)), unit_y(read_png(rec.image))


def load_stack(records: list[PairRecord]) -> np.ndarray:
    """float32 [N, 2, H, W]: channel 0 the MRI, channel 1 the functional luma."""
    return np.stack([np.stack(load_pair(r)) for r in records]).astype(np.float32)
