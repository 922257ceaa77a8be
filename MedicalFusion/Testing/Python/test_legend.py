"""The colour bar (MedicalFusionLib.legend) and the CLI's --preview that draws it.

The bar's colours are checked against an independent computation from the shipped colour table
(value at each column's centre -> entry floor((v - lo) / (hi - lo) * N), clamped), the labels by the
ink they leave, and the fused volume for being the same with or without a preview.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image
from MedicalFusionLib import legend
from MedicalFusionLib.cli import main
from MedicalFusionLib.pipeline import FusionOptions, prepare

TABLES = json.loads((pathlib.Path(legend.__file__).with_name("colormaps.json")).read_text(encoding="utf-8"))["tables"]


def expected_colours(table_name: str, lo: float, hi: float, n: int) -> np.ndarray:
    """uint8 RGB of n columns spanning lo..hi, computed here from the JSON table (not through colour.py)."""
    table = np.asarray(TABLES[table_name], dtype=np.float64)
    values = lo + (np.arange(n) + 0.5) / n * (hi - lo)
    idx = np.clip(np.floor((values - lo) / (hi - lo) * len(table)), 0, len(table) - 1).astype(int)
    return np.clip(np.rint(table[idx] * 255.0), 0, 255).astype(np.uint8)


def pet_legend(units="SUVbw", window=(0.0, 20.0), name="PET-Heat"):
    return legend.Legend(table=np.asarray(TABLES[name], np.float32), window=window, units=units, colormap=name,
                         name="FDG PET")


# ------------------------------------------------------------------------------------------------
# what the bar shows


def test_legend_of_a_run_has_its_window_map_and_units(small_pair):
    anat, pet = small_pair
    prepared = prepare(anat, pet, FusionOptions(colormap="Rainbow", functional_window=(0.5, 10.5),
                                                functional_units="SUVbw"))
    bar = legend.legend_for(prepared, name="PET")
    assert bar.window == (0.5, 10.5) and bar.units == "SUVbw" and bar.colormap == "Rainbow"
    np.testing.assert_array_equal(bar.table, np.asarray(TABLES["Rainbow"], np.float32))
    assert bar.title == "PET [SUVbw]"
    assert bar.tick_labels() == ["0.5", "3.0", "5.5", "8.0", "10.5"]
    assert bar.label_format == "%.1f"


def test_no_legend_for_grayscale_fusion_or_an_rgb_functional(small_pair, rng):
    anat, pet = small_pair
    assert legend.legend_for(prepare(anat, pet, FusionOptions(colormap="Grey"))) is None
    rgb = make_image(rng.integers(0, 255, (8, 40, 48, 3)).astype(np.uint8), vector=True)
    assert legend.legend_for(prepare(anat, rgb, FusionOptions())) is None
    unknown = legend.legend_for(prepare(anat, pet, FusionOptions()))
    assert unknown is not None and unknown.units == "" and "units unknown" in unknown.title


@pytest.mark.parametrize("window, labels", [
    ((0.0, 20.0), ["0", "5", "10", "15", "20"]),
    ((0.0, 10.0), ["0.0", "2.5", "5.0", "7.5", "10.0"]),
    ((-135.0, 215.0), ["-135", "-48", "40", "128", "215"]),
    ((0.0, 0.5), ["0.00", "0.12", "0.25", "0.38", "0.50"]),
])
def test_tick_labels_are_the_window_split_in_four(window, labels):
    assert pet_legend(window=window).tick_labels() == labels


# ------------------------------------------------------------------------------------------------
# drawing


def test_bar_colours_follow_the_map_from_lo_to_hi_and_labels_are_drawn():
    picture = np.random.default_rng(0).integers(0, 255, (60, 300, 3)).astype(np.uint8)
    bar = pet_legend(window=(2.0, 12.0), name="PET-Heat")
    out, layout = legend.draw_colour_bar(picture, bar, return_layout=True)
    (p0, p1), (c0, c1) = layout.picture_rows, layout.picture_cols
    np.testing.assert_array_equal(out[p0:p1, c0:c1], picture)            # the picture is not drawn over
    assert layout.bar_rows[0] >= p1 and layout.text_rows[0] >= layout.bar_rows[1]
    (r0, r1), (x0, x1) = layout.bar_rows, layout.bar_cols
    assert x1 - x0 > 0.8 * out.shape[1]
    strip = out[r0:r1, x0:x1]
    expected = expected_colours("PET-Heat", 2.0, 12.0, x1 - x0)
    for row in strip:
        np.testing.assert_array_equal(row, expected)
    text = out[layout.text_rows[0]:layout.text_rows[1]]
    ink = (text.min(axis=2) < 128)
    assert ink.sum() > 200                                                   # labels and title are there
    # ink under both ends of the bar: the lo and hi labels
    assert ink[:, x0 - 6:x0 + 6].any() and ink[:, x1 - 6:x1 + 6].any()


def test_the_units_are_written_in_the_title():
    picture = np.zeros((40, 300, 3), np.uint8)
    with_units, layout = legend.draw_colour_bar(picture, pet_legend(units="SUVbw"), return_layout=True)
    without = legend.draw_colour_bar(picture, pet_legend(units=""))
    assert with_units.shape[0] == without.shape[0]
    r0 = layout.text_rows[0]
    differ = np.any(with_units[r0:] != without[r0:], axis=2)
    assert differ.any()
    rows = np.nonzero(differ.any(axis=1))[0] + r0
    labels_end = r0 + (layout.text_rows[1] - r0) // 2
    assert rows.min() >= labels_end - 2        # only the title line changed, not the tick labels


def test_narrow_pictures_get_margins_so_the_labels_fit():
    out, layout = legend.draw_colour_bar(np.zeros((20, 50, 3), np.uint8), pet_legend(), return_layout=True)
    assert out.shape[1] == legend.MIN_WIDTH and layout.picture_cols[1] - layout.picture_cols[0] == 50


# ------------------------------------------------------------------------------------------------
# the CLI's --preview


def bar_row(preview: np.ndarray, start: int, table_name: str):
    """(row, first column, last column + 1) of the longest run of colours of the table in a row
    below ``start`` whose colours are neither black nor white (the bar without its outline)."""
    table = np.clip(np.rint(np.asarray(TABLES[table_name]) * 255.0), 0, 255).astype(np.uint8)
    codes = {tuple(c) for c in table if 0 < int(c.sum()) < 765}
    best = (0, 0, 0, 0)
    for r in range(start, preview.shape[0]):
        inside = np.array([tuple(p) in codes for p in preview[r]])
        run, c0 = 0, 0
        for c, flag in enumerate(np.append(inside, False)):
            if flag:
                run += 1
            else:
                if run > best[0]:
                    best = (run, r, c0, c)
                run, c0 = 0, c + 1
    return best[1:]


def test_preview_draws_the_colour_bar_and_the_volume_is_unchanged(tmp_path, small_pair):
    anat, pet = small_pair
    a, f = tmp_path / "mri.nrrd", tmp_path / "pet.nii.gz"
    sitk.WriteImage(anat, str(a))
    sitk.WriteImage(pet, str(f))
    common = ["fuse", "-a", str(a), "-f", str(f), "-m", "average", "--colormap", "Rainbow",
              "--functional-window", "1", "9", "-q"]
    assert main(common + ["-o", str(tmp_path / "with.nrrd"), "--preview", str(tmp_path / "p.png")]) == 0
    assert main(common + ["-o", str(tmp_path / "without.nrrd")]) == 0
    with_preview = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "with.nrrd")))
    np.testing.assert_array_equal(with_preview, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "without.nrrd"))))

    preview = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.png")))
    montage_rows = 40                                         # the small pair's axial slice: 40 x 48
    assert preview.shape[0] > montage_rows + 20
    row, x0, x1 = bar_row(preview, montage_rows, "Rainbow")
    assert x1 - x0 > 0.8 * preview.shape[1]
    np.testing.assert_array_equal(preview[row, x0:x1], expected_colours("Rainbow", 1.0, 9.0, x1 - x0))
    below = preview[row + 1:]
    assert (below.min(axis=2) < 128).sum() > 100              # tick labels and title


def test_preview_of_a_grayscale_fusion_has_no_bar(tmp_path, small_pair):
    anat, pet = small_pair
    a, f = tmp_path / "mri.nrrd", tmp_path / "pet.nii.gz"
    sitk.WriteImage(anat, str(a))
    sitk.WriteImage(pet, str(f))
    assert main(["fuse", "-a", str(a), "-f", str(f), "-m", "average", "--colormap", "Grey", "-q",
                 "-o", str(tmp_path / "o.nrrd"), "--preview", str(tmp_path / "p.png")]) == 0
    assert sitk.ReadImage(str(tmp_path / "p.png")).GetSize()[1] == 40
