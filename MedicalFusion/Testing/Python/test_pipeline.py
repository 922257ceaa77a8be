import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image
from MedicalFusionLib.errors import FusionError
from MedicalFusionLib.pipeline import FusionOptions, array_axis, fuse_images


def test_output_keeps_the_anatomical_grid_when_the_functional_is_coarse_and_oblique(small_pair):
    anat, _ = small_pair
    # functional: 3 mm voxels, x axis flipped, covering the anatomical
    f = np.random.default_rng(0).random((4, 16, 18)).astype(np.float32) + 0.1
    func = make_image(f, spacing=(3.0, 3.0, 3.0), origin=(50.0, -2.0, -2.0),
                      direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    r = fuse_images(anat, func, FusionOptions(method="lp", compute_metrics=False))
    assert r.rgb.shape == sitk.GetArrayViewFromImage(anat).shape + (3,)
    assert r.rgb.dtype == np.uint8
    out = r.rgb_image()
    assert out.GetSpacing() == anat.GetSpacing() and out.GetOrigin() == anat.GetOrigin()
    assert out.GetDirection() == anat.GetDirection()
    assert not r.grayscale


def test_grey_colormap_gives_grayscale_fusion(small_pair):
    anat, pet = small_pair
    r = fuse_images(anat, pet, FusionOptions(method="average", colormap="Grey", compute_metrics=False))
    assert r.grayscale
    assert np.array_equal(r.rgb[..., 0], r.rgb[..., 1]) and np.array_equal(r.rgb[..., 1], r.rgb[..., 2])


def test_pet_colour_survives_fusion(small_pair):
    anat, pet = small_pair
    r = fuse_images(anat, pet, FusionOptions(method="max", colormap="PET-Heat", compute_metrics=False))
    hot = r.rgb[:, 20, 34].astype(int)            # half-maximum of the PET: warm colour, red above blue
    assert (hot[:, 0] - hot[:, 2]).min() > 20


def test_metrics_are_reported_over_slices(small_pair):
    anat, pet = small_pair
    r = fuse_images(anat, pet, FusionOptions(method="lp"))
    mean, std, n = r.metrics["SSIM_avg"]
    assert n == 8 and 0.0 < mean <= 1.0 and std >= 0.0
    assert set(r.metrics) >= {"EN", "MI_bits", "MI_nats", "Qabf", "VIF", "PSNR"}


def test_axis_names_follow_the_direction_matrix():
    img = make_image(np.zeros((5, 6, 7), np.float32))            # identity: k is S
    assert array_axis(img, "axial") == 0 and array_axis(img, "coronal") == 1 and array_axis(img, "sagittal") == 2
    # a volume stored sagittal-first: index i runs along S, k along L
    perm = make_image(np.zeros((5, 6, 7), np.float32), direction=(0, 0, 1.0, 0, 1.0, 0, 1.0, 0, 0))
    assert array_axis(perm, "axial") == 2 and array_axis(perm, "sagittal") == 0
    with pytest.raises(FusionError, match="orientation"):
        array_axis(img, "oblique")


@pytest.mark.parametrize("bad,match", [
    (np.full((4, 8, 8), 3.0, np.float32), "constant"),
    (np.where(np.eye(8)[None] > 0, np.nan, 1.0).repeat(4, 0).astype(np.float32), "NaN"),
])
def test_bad_functional_values_are_refused(small_pair, bad, match):
    anat, _ = small_pair
    with pytest.raises(FusionError, match=match):
        fuse_images(anat, make_image(bad), FusionOptions(compute_metrics=False))


def test_unknown_method_fails_before_any_work(small_pair):
    anat, pet = small_pair
    with pytest.raises(FusionError, match="unknown method"):
        fuse_images(anat, pet, FusionOptions(method="magic"))


def test_spm12_pet_on_t1_end_to_end(shared_data):
    t1 = sitk.ReadImage(str(shared_data / "spm12" / "T1.nii"))
    spect = sitk.ReadImage(str(shared_data / "spm12" / "SPECT.nii"))
    r = fuse_images(t1, spect, FusionOptions(method="lp", compute_metrics=False))
    assert r.rgb.shape == (91, 109, 91, 3)
    # SPECT is stored x-flipped: the hottest fused voxel's colour sits where the aligned SPECT peaks
    aligned_y = r.prepared.functional_ycc[..., 0]
    assert np.abs(aligned_y - aligned_y[:, :, ::-1]).mean() < np.abs(aligned_y).mean()  # roughly symmetric brain
    raw = sitk.GetArrayFromImage(spect).astype(np.float32)
    lo, hi = r.prepared.functional_window
    assert np.corrcoef(aligned_y.ravel(), np.clip((raw[:, :, ::-1] - lo) / (hi - lo), 0, 1).ravel())[0, 1] > 0.9


def test_progress_spans_every_phase_and_cancel_works_in_each(small_pair):
    from MedicalFusionLib.errors import FusionCancelled
    from MedicalFusionLib.progress import active_phase

    anat, pet = small_pair
    seen, phases = [], []

    def progress(done, total):
        seen.append((done, total))
        phases.append(active_phase())

    fuse_images(anat, pet, FusionOptions(method="alpha", batch_size=4), progress=progress)
    assert len({t for _, t in seen}) == 1                       # one total for the whole run
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert {"prepare", "fuse", "recombine", "metrics"} <= set(phases)
    for phase in ("prepare", "fuse", "recombine", "metrics"):
        with pytest.raises(FusionCancelled):
            fuse_images(anat, pet, FusionOptions(method="alpha"), cancel=lambda phase=phase: active_phase() == phase)


def test_custom_colour_table_and_grey_rgb_functional(small_pair):
    anat, pet = small_pair
    blue = np.zeros((256, 3), np.float32)
    blue[:, 2] = np.linspace(0, 1, 256)
    r = fuse_images(anat, pet, FusionOptions(method="average", colormap=blue, compute_metrics=False))
    assert r.prepared.colormap.startswith("custom table")
    assert (r.rgb[..., 2].astype(int) - r.rgb[..., 0]).mean() > 10     # blue wins over red
    with pytest.raises(FusionError, match="colour table"):
        fuse_images(anat, pet, FusionOptions(colormap=np.ones((5, 2))))
    # a grayscale image saved as RGB (e.g. a CT PNG) stays grayscale: it is not re-coloured
    g = (sitk.GetArrayFromImage(pet) / 11 * 255).astype(np.uint8)
    grey_rgb = make_image(np.repeat(g[..., None], 3, -1), vector=True)
    r = fuse_images(anat, grey_rgb, FusionOptions(method="average", compute_metrics=False))
    assert r.grayscale and np.array_equal(r.rgb[..., 0], r.rgb[..., 2])
