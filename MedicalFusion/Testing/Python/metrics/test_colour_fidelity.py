"""Colour fidelity: the CIELAB colour metrics (against an independent numpy/scikit-image computation)
and the colour-keeping recombination (issue #18; docs/EVALUATION.md, "Colour").

Phantoms: a bone lesion on PET/CT (uptake on cortical bone, which the soft-tissue window shows
white) and bright CSF and dark sulci on MR under moderate uptake. The former recombination (fused
BT.601 luma + the functional's Cb/Cr) fails the colour targets on them; the shipped one meets them
and keeps the anatomy's detail in lightness.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.color import rgb2lab

from MedicalFusionLib import colour
from MedicalFusionLib.engine import fuse_volume
from MedicalFusionLib.methods import get_method
from MedicalFusionLib.metrics import COLOUR_METRIC_KEYS, metrics_table_rows
from MedicalFusionLib.metrics.torch_engine import colour_metrics_torch
from MedicalFusionLib.pipeline import FusionOptions, fuse_images, prepare, recombine

HUE_MAX_PCT, CHROMA_MIN, READBACK_MAX_PCT, LIGHTNESS_R_MIN = 5.0, 0.8, 5.0, 0.7


# --------------------------------------------------------------------------------------------------
# the independent reference: scikit-image's rgb2lab, numpy medians, a full distance matrix


def reference_colour_metrics(fused8, functional_rgb, levels=None, table=None, bone=None) -> dict:
    lab_s = rgb2lab(np.asarray(functional_rgb, dtype=np.float64).reshape(-1, 3))
    lab_f = rgb2lab(np.asarray(fused8, dtype=np.float64).reshape(-1, 3) / 255.0)
    c_s = np.hypot(lab_s[:, 1], lab_s[:, 2])
    c_f = np.hypot(lab_f[:, 1], lab_f[:, 2])
    coloured = c_s > 20.0
    h_s = np.arctan2(lab_s[:, 2], lab_s[:, 1])
    h_f = np.arctan2(lab_f[:, 2], lab_f[:, 1])
    hue = np.degrees(np.abs(np.angle(np.exp(1j * (h_f - h_s)))))
    hue[c_f < 0.5] = 180.0
    out = {}
    groups = {"": coloured}
    if bone is not None:
        groups["_bone"] = coloured & np.asarray(bone).reshape(-1)
    for suffix, sel in groups.items():
        if not sel.any():
            continue
        out["hue_err10" + suffix] = 100.0 * np.mean(hue[sel] > 10.0)
        out["chroma_kept" + suffix] = np.median(c_f[sel] / c_s[sel])
        if table is not None:
            bar = rgb2lab(np.asarray(table, dtype=np.float64))[:, 1:]
            d = ((lab_f[sel, None, 1:] - bar[None]) ** 2).sum(-1)
            read = np.abs(d.argmin(1) - np.asarray(levels).reshape(-1)[sel])
            out["readback_err" + suffix] = 100.0 * np.median(read) / len(table)
    return out


def _agree(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    for k, v in ref.items():
        tol = {"hue_err10": 0.2, "chroma_kept": 1e-3, "readback_err": 1e-9}[k.replace("_bone", "")]
        assert abs(ours[k][0] - v) <= tol, (k, ours[k][0], v)


@pytest.mark.parametrize("cmap", ["PET-Heat", "PET-Rainbow2", "Rainbow"])
def test_colour_metrics_agree_with_scikit_image(cmap):
    rng = np.random.default_rng(3)
    shape = (3, 40, 50)
    table = colour.colormap_table(cmap)
    levels = rng.integers(0, 256, shape).astype(np.uint8)
    functional_rgb = table[levels]
    ycc = colour.rgb_to_ycbcr(functional_rgb)
    # a fused image: the functional's colour with its lightness and chroma disturbed, some grey, some clipped
    lab = rgb2lab(functional_rgb.astype(np.float64))
    lab[..., 0] = rng.uniform(0, 100, shape)
    lab[..., 1:] *= rng.uniform(0.3, 1.2, shape)[..., None]
    fused = colour.to_uint8(colour.lab_to_rgb(lab))
    fused[0, :5] = 128                                              # colour lost entirely
    bone = rng.random(shape) < 0.3
    ours = colour_metrics_torch(fused, ycc, levels, table, bone, device="cpu", batch_pixels=1000)
    _agree(ours, reference_colour_metrics(fused, functional_rgb, levels, table, bone))
    assert ours["hue_err10"][0] > 5.0 and ours["readback_err"][0] > 1.0      # it can fail


def test_colour_metrics_rgb_functional_and_identity():
    """An RGB functional (no colour bar: no read-back rows); the functional's own colour scores perfectly."""
    table = colour.colormap_table("PET-Heat")
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    rgb8 = colour.to_uint8(table[levels])
    ycc = colour.rgb_to_ycbcr(rgb8.astype(np.float32) / 255.0)
    ours = colour_metrics_torch(rgb8, ycc, device="cpu")
    assert set(ours) == {"hue_err10", "chroma_kept"}
    _agree(ours, reference_colour_metrics(rgb8, rgb8 / 255.0))
    same = colour_metrics_torch(colour.to_uint8(table[levels]), colour.rgb_to_ycbcr(table[levels]), levels, table,
                                device="cpu")
    assert same["hue_err10"][0] == 0.0 and abs(same["chroma_kept"][0] - 1.0) < 0.01 and same["readback_err"][0] == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_colour_metrics_count_the_slices_with_coloured_voxels_along_any_axis(axis):
    """The slices counted (the third value) are those with a coloured voxel (and with one over bone),
    along the first axis (counted between slice boundaries) as along the others (per voxel), with
    batches that end inside slices."""
    rng = np.random.default_rng(7)
    shape = (6, 9, 11)
    table = colour.colormap_table("PET-Heat")          # entry 0 is black: not coloured
    levels = rng.integers(100, 256, shape).astype(np.uint8)
    levels[1], levels[:, 4], levels[..., 7:] = 0, 0, 0   # uncoloured slices along each axis
    bone = rng.random(shape) < 0.5
    bone[3], bone[:, 2], bone[..., 5] = False, False, False
    fused = colour.to_uint8(table[levels])
    functional_rgb = table[levels]
    lab = rgb2lab(functional_rgb.astype(np.float64))
    coloured = np.hypot(lab[..., 1], lab[..., 2]) > 20.0
    other = tuple(k for k in range(3) if k != axis)
    expected = {"": int(coloured.any(axis=other).sum()), "_bone": int((coloured & bone).any(axis=other).sum())}
    assert 0 < expected["_bone"] < expected[""] < shape[axis]
    ours = colour_metrics_torch(fused, colour.rgb_to_ycbcr(functional_rgb), levels, table, bone, axis=axis,
                                device="cpu", batch_pixels=37)
    for key, value in ours.items():
        assert value[2] == expected["_bone" if key.endswith("_bone") else ""], key
    # the same without a colour bar (an RGB functional): coloured voxels found from its colour
    rgb = colour_metrics_torch(fused, colour.rgb_to_ycbcr(fused.astype(np.float32) / 255.0), bone=bone, axis=axis,
                               device="cpu", batch_pixels=37)
    assert rgb["hue_err10"][2] == expected[""] and rgb["hue_err10_bone"][2] == expected["_bone"]


# --------------------------------------------------------------------------------------------------
# the recombination itself


@pytest.mark.parametrize("cmap", [c for c in colour.colormap_names() if c != "Grey"])
def test_every_colour_map_entry_keeps_its_hue_chroma_and_level_at_any_lightness(cmap):
    """For every entry of every map and fused lumas from black to white: the hue within 3 degrees,
    at least MIN_CHROMA_KEPT of the chroma (less 8-bit rounding), never clipped toward grey; read
    back against the map, the level within READBACK_TOLERANCE of the window (plus rounding); and a
    brighter fused luma never gives a darker output (the anatomy's detail is kept in lightness)."""
    table = colour.colormap_table(cmap)
    y = np.linspace(0.0, 1.0, 21, dtype=np.float32)
    fused_y = np.repeat(y[None], len(table), 0)
    ycc = np.repeat(colour.rgb_to_ycbcr(table)[:, None], len(y), 1)
    out = colour.keep_colour(fused_y, ycc, table)
    lab_s, lab_f = rgb2lab(table.astype(np.float64))[:, None], rgb2lab(out / 255.0)
    c_s, c_f = np.hypot(lab_s[..., 1], lab_s[..., 2]), np.hypot(lab_f[..., 1], lab_f[..., 2])
    coloured = np.broadcast_to(c_s > 20, c_f.shape)
    hue = np.degrees(np.abs(np.angle(np.exp(1j * (np.arctan2(lab_f[..., 2], lab_f[..., 1])
                                                   - np.arctan2(lab_s[..., 2], lab_s[..., 1]))))))
    assert hue[coloured].max() < 3.0
    ratio = (c_f / np.maximum(c_s, 1e-9))[coloured]
    assert ratio.min() >= colour.MIN_CHROMA_KEPT - 0.03 and ratio.max() <= 1.05
    bar = lab_s[:, 0, 1:]
    own = ((bar[:, None] - bar[None]) ** 2).sum(-1).argmin(1)               # duplicates read as the first
    read = ((lab_f[..., None, 1:] - bar[None, None]) ** 2).sum(-1).argmin(-1)
    err = np.abs(read - own[:, None])[coloured]
    assert err.max() <= colour.READBACK_TOLERANCE * len(table) + 2
    assert np.all(np.diff(lab_f[..., 0], axis=1)[coloured[:, 1:]] >= -0.5)


def test_neutral_functional_shows_the_anatomy_as_before_and_grey_fusion_is_unchanged():
    rng = np.random.default_rng(0)
    fused_y = rng.random((4, 30, 30), dtype=np.float32)
    neutral = np.stack([rng.random((4, 30, 30), dtype=np.float32), np.full((4, 30, 30), 0.5, np.float32),
                        np.full((4, 30, 30), 0.5, np.float32)], -1)
    before = recombine(fused_y, neutral, 1.0, False, keep_colour=False)
    np.testing.assert_array_equal(recombine(fused_y, neutral, 1.0, False), before)
    np.testing.assert_array_equal(recombine(fused_y, neutral, 1.0, True),
                                  recombine(fused_y, neutral, 1.0, True, keep_colour=False))
    # CT + MRI with the Grey map through the whole pipeline: the grey of the fused luma, bit for bit
    anat = sitk.GetImageFromArray((rng.random((3, 24, 24)) * 100).astype(np.float32))
    ct = sitk.GetImageFromArray((rng.random((3, 24, 24)) * 100).astype(np.float32))
    r = fuse_images(anat, ct, FusionOptions(method="lp", colormap="Grey", compute_metrics=False))
    assert r.grayscale
    y = fuse_volume(r.prepared.anatomical, r.prepared.functional_ycc[..., 0], get_method("lp"), device="cpu")
    np.testing.assert_array_equal(r.rgb, np.repeat(colour.to_uint8(y)[..., None], 3, -1))


# --------------------------------------------------------------------------------------------------
# phantoms: before (the former recombination) fails, after (shipped) meets the targets


def _image(a: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.SetSpacing(spacing)
    return img


def bone_lesion_phantom():
    """A CT in HU (soft tissue with fine texture, a ring of cortical bone) and a PET (SUV) with a lesion
    in the bone ring."""
    z, y, x = np.mgrid[0:6, 0:96, 0:96]
    r = np.hypot(y - 48, x - 48)
    body = r < 42
    rng = np.random.default_rng(1)
    texture = ndi.gaussian_filter(rng.normal(0, 1, (6, 96, 96)), (0, 1, 1)) * 120
    ct = np.where(body, 40.0 + texture, -1000.0)
    ct = np.where((r > 22) & (r < 32), 700.0 + texture, ct)
    pet = np.where(body, 0.6 + 9.0 * np.exp(-((y - 48) ** 2 + (x - 75) ** 2) / (2 * 7.0 ** 2)), 0.0)
    return _image(ct), _image(pet), FusionOptions(anatomical_units="HU", functional_units="SUVbw")


def csf_phantom():
    """An MR with T2-bright CSF (a wide ring at the top of the window), dark sulci (stripes at the
    bottom) and textured tissue, under a PET with moderate uptake (a fifth of the window, which a
    small hot spot sets) over all of it."""
    z, y, x = np.mgrid[0:6, 0:96, 0:96]
    r = np.hypot(y - 48, x - 48)
    head = r < 44
    rng = np.random.default_rng(2)
    texture = ndi.gaussian_filter(rng.normal(0, 1, (6, 96, 96)), (0, 1, 1)) * 60
    mr = np.where(head, 400.0 + texture, 0.0)
    mr = np.where(head & (r > 14) & (r < 36), 1000.0 + texture, mr)                  # bright CSF
    mr = np.where(head & (np.abs(np.sin(x / 5.0)) < 0.2) & (r < 14), 20.0, mr)       # dark sulci
    pet = np.where(head, 2.0, 0.0)
    pet = np.where(np.hypot(y - 48, x - 90) < 3, 10.0, pet)
    return _image(mr), _image(pet), FusionOptions(functional_units="SUVbw")


def _lightness_detail_r(rgb8, anatomical01, region) -> float:
    def dog(v):
        return ndi.gaussian_filter(v, (0, 1, 1)) - ndi.gaussian_filter(v, (0, 3, 3))

    f = dog(rgb2lab(rgb8 / 255.0)[..., 0])[region]
    a = dog(colour.gray_lightness(anatomical01).astype(np.float64))[region]
    return float(np.corrcoef(a, f)[0, 1])


def _failures(metrics: dict) -> list[str]:
    bad = []
    for k, (v, _, _) in metrics.items():
        if (k.startswith("hue") and v > HUE_MAX_PCT) or (k.startswith("chroma") and v < CHROMA_MIN) \
                or (k.startswith("readback") and v > READBACK_MAX_PCT):
            bad.append(f"{k} {v:.2f}")
    return bad


@pytest.mark.parametrize("phantom, method, colormap", [
    (bone_lesion_phantom, "max", None), (bone_lesion_phantom, "mrdfn", None),
    (csf_phantom, "max", None), (csf_phantom, "lp", None), (csf_phantom, "lp", "PET-Rainbow2"),
])
def test_phantom_fails_before_and_meets_the_colour_targets_after(phantom, method, colormap):
    anatomical, functional, options = phantom()
    options.method, options.colormap = method, colormap
    p = prepare(anatomical, functional, options)
    m = get_method(method)
    if not m.available()[0]:
        pytest.skip(m.available()[1])
    fused_y = fuse_volume(p.anatomical, p.functional_ycc[..., 0], m, device="cpu")
    results = {}
    for when, keep in (("before", False), ("after", True)):
        rgb = recombine(fused_y, p.functional_ycc, m.chroma_scale, p.grayscale, keep_colour=keep,
                        table=p.functional_table)
        results[when] = (rgb, colour_metrics_torch(rgb, p.functional_ycc, p.functional_level, p.functional_table,
                                                   p.bone, device="cpu"))
    if phantom is bone_lesion_phantom:
        assert "chroma_kept_bone" in results["after"][1]
    assert _failures(results["before"][1]), results["before"][1]
    assert not _failures(results["after"][1]), results["after"][1]
    lab = rgb2lab(colour.ycbcr_to_rgb(p.functional_ycc).astype(np.float64))
    region = (np.hypot(lab[..., 1], lab[..., 2]) > 20) & (p.anatomical > 0.02)
    assert _lightness_detail_r(results["after"][0], p.anatomical, region) >= LIGHTNESS_R_MIN


def test_pipeline_reports_the_colour_metrics_it_computes():
    """fuse_images puts the colour rows (here with bone) in the metrics table, with the values of the
    colour metrics of its own output."""
    anatomical, functional, options = bone_lesion_phantom()
    options.method, options.metric_set = "lp", "quick"
    r = fuse_images(anatomical, functional, options)
    p = r.prepared
    expected = colour_metrics_torch(r.rgb, p.functional_ycc, p.functional_level, p.functional_table, p.bone,
                                    device="cpu")
    assert set(COLOUR_METRIC_KEYS) <= set(r.metrics)
    for k in COLOUR_METRIC_KEYS:
        assert r.metrics[k] == expected[k]
    rows = [row["metric"] for row in metrics_table_rows(r.metrics)]
    assert rows[-len(COLOUR_METRIC_KEYS):] == COLOUR_METRIC_KEYS
