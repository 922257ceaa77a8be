import numpy as np
import pytest

from MedicalFusionLib import colour
from MedicalFusionLib.errors import FusionError


def test_ycbcr_round_trip_and_bt601_values():
    rgb = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    back = colour.ycbcr_to_rgb(colour.rgb_to_ycbcr(rgb))
    assert np.abs(back - rgb).max() < 1e-5
    # pure red/green/blue by the BT.601 full-range definition (JFIF)
    ycc = colour.rgb_to_ycbcr(np.eye(3, dtype=np.float32))
    assert np.allclose(ycc[:, 0], [0.299, 0.587, 0.114], atol=1e-6)
    assert np.allclose(ycc[0, 2], 1.0, atol=1e-3)     # red: Cr at its maximum
    assert np.allclose(ycc[2, 1], 1.0, atol=1e-3)     # blue: Cb at its maximum
    grey = colour.rgb_to_ycbcr(np.full((1, 3), 0.4, np.float32))
    assert np.allclose(grey, [[0.4, 0.5, 0.5]], atol=1e-6)


def test_gray8_matches_pil_style_luma():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    expected = np.rint(rgb.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    assert np.array_equal(colour.gray8(rgb), expected)
    assert colour.gray8(rgb).tolist() == [[76, 150, 29, 18]]


def test_colormap_lookup_is_windowed_and_clamped():
    table = colour.colormap_table("Grey")
    assert table.shape == (256, 3)
    unit = colour.window_to_unit(np.array([-10.0, 0.0, 50.0, 100.0, 1e6]), 0.0, 100.0)
    assert unit.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    rgb = colour.apply_colormap(unit, "Grey")
    assert np.allclose(rgb[0], 0) and np.allclose(rgb[-1], 1)
    assert np.allclose(rgb[2], table[128])


def test_unknown_colormap_and_empty_window_are_user_errors():
    with pytest.raises(FusionError, match="unknown colour map 'Nope'"):
        colour.colormap_table("Nope")
    with pytest.raises(FusionError, match="window"):
        colour.window_to_unit(np.zeros(3), 5.0, 5.0)


def test_pet_heat_runs_dark_to_white():
    t = colour.colormap_table("PET-Heat")
    assert np.allclose(t[0], 0) and np.allclose(t[-1], 1)
    assert np.all(np.diff(colour.rgb_to_ycbcr(t)[:, 0]) >= -1e-6)   # luma never decreases


@pytest.mark.parametrize("name", colour.colormap_names())
def test_shipped_tables_equal_slicers_own(name):
    slicer = pytest.importorskip("slicer", reason="slicer-core not installed: cannot compare with Slicer's colour nodes")
    scene = slicer.vtkMRMLScene()
    ours = colour.colormap_table(name)
    theirs = colour.slicer_colormap_table(name, scene)
    assert theirs.shape == ours.shape == (256, 3)
    assert np.abs(theirs - ours).max() < 1e-6
