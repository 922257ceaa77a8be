"""Shared fixtures: where ../shared/data is, and small synthetic images."""
from __future__ import annotations

import os
import pathlib
import sys

import numpy as np
import pytest
import SimpleITK as sitk

REPO = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "MedicalFusion"))


def data_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MEDICALFUSION_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> pathlib.Path:
    root = data_root()
    if not (root / "aanlib" / "split.csv").is_file() or not (root / "spm12" / "T1.nii").is_file():
        pytest.skip(f"shared data not found at {root} (set MEDICALFUSION_DATA or put shared/ beside the checkout)")
    return root


def make_image(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None,
               vector: bool = False) -> sitk.Image:
    img = sitk.GetImageFromArray(arr, isVector=vector)
    img.SetSpacing(spacing[: img.GetDimension()])
    img.SetOrigin(origin[: img.GetDimension()])
    if direction is not None:
        img.SetDirection(direction)
    return img


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def small_pair(rng):
    """A 3D anatomical (uint8-like float) and a scalar PET on the same 1 mm grid, 8x40x48."""
    z, y, x = np.mgrid[0:8, 0:40, 0:48].astype(np.float32)
    anat = (100 + 80 * np.sin(x / 5.0) * np.cos(y / 7.0) + rng.normal(0, 5, (8, 40, 48))).astype(np.float32)
    pet = np.exp(-((x - 24) ** 2 + (y - 20) ** 2) / 150.0) * 10.0 + 0.5
    return make_image(anat), make_image(pet.astype(np.float32))


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread, as the trainers do on the shared CPU; restore afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
