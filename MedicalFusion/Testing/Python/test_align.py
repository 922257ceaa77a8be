import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image
from MedicalFusionLib.align import overlap_fraction, resample_to_reference
from MedicalFusionLib.errors import FusionError


def test_spect_template_with_flipped_x_matches_voxel_by_voxel_after_alignment(shared_data):
    t1 = sitk.ReadImage(str(shared_data / "spm12" / "T1.nii"))
    spect = sitk.ReadImage(str(shared_data / "spm12" / "SPECT.nii"))
    assert spect.GetDirection()[0] == -1.0 and t1.GetDirection()[0] == 1.0   # stored flipped
    aligned = sitk.GetArrayFromImage(resample_to_reference(spect, t1))
    raw = sitk.GetArrayFromImage(spect).astype(np.float32)
    assert np.abs(aligned - raw[:, :, ::-1]).max() < 1e-6    # flipped back, voxel by voxel
    assert np.abs(aligned - raw).max() > 100


def test_flipped_copy_of_pet_template_aligns_to_the_original(shared_data):
    pet = sitk.ReadImage(str(shared_data / "spm12" / "PET.nii"))
    arr = sitk.GetArrayFromImage(pet)
    flipped = sitk.GetImageFromArray(arr[::-1, :, ::-1].copy())     # flip x and z in storage...
    flipped.SetSpacing(pet.GetSpacing())
    d = np.array(pet.GetDirection()).reshape(3, 3) @ np.diag([-1.0, 1.0, -1.0])   # ...and in the affine
    flipped.SetDirection(d.ravel().tolist())
    far_corner = pet.TransformIndexToPhysicalPoint([s - 1 if i != 1 else 0 for i, s in enumerate(pet.GetSize())])
    flipped.SetOrigin(far_corner)
    back = sitk.GetArrayFromImage(resample_to_reference(flipped, pet))
    assert np.allclose(back, arr, atol=1e-4)


def test_coarse_functional_is_resampled_onto_the_fine_grid_in_physical_space():
    # functional: 4 mm voxels, a bright cube at physical x,y,z in [8, 16) mm
    f = np.zeros((8, 8, 8), np.float32)
    f[2:4, 2:4, 2:4] = 1.0
    func = make_image(f, spacing=(4.0, 4.0, 4.0), origin=(2.0, 2.0, 2.0))  # voxel centres at 2, 6, 10 ...
    anat = make_image(np.zeros((32, 32, 32), np.float32), spacing=(1.0, 1.0, 1.0))
    out = sitk.GetArrayFromImage(resample_to_reference(func, anat, interpolator=sitk.sitkNearestNeighbor))
    assert out.shape == (32, 32, 32)
    assert out[12, 12, 12] == 1.0 and out[4, 4, 4] == 0.0
    assert out[9:16, 9:16, 9:16].min() == 1.0


def test_non_overlapping_images_are_refused():
    anat = make_image(np.ones((4, 4, 4), np.float32))
    func = make_image(np.ones((4, 4, 4), np.float32), origin=(500.0, 0.0, 0.0))
    assert overlap_fraction(anat, func) == 0.0
    with pytest.raises(FusionError, match="does not overlap"):
        resample_to_reference(func, anat)


def test_rgb_functional_is_resampled_as_colour():
    rgb = np.zeros((1, 4, 4, 3), np.uint8)
    rgb[..., 0] = 200
    func = make_image(rgb, spacing=(2.0, 2.0, 1.0), vector=True)
    anat = make_image(np.zeros((1, 8, 8), np.float32))
    out = sitk.GetArrayFromImage(resample_to_reference(func, anat))
    assert out.shape == (1, 8, 8, 3) and out.dtype == np.uint8
    assert out[0, 2, 2, 0] == 200 and out[0, 2, 2, 1] == 0


def test_resampling_onto_slabs_gives_the_same_voxels_every_time():
    """The pipeline streams slabs: each slab's resampling (a sub-grid along any axis) must give
    exactly the voxels of the whole grid's, in every call."""
    from MedicalFusionLib.align import resample_onto, sub_grid

    rng = np.random.default_rng(11)
    moving = sitk.GetImageFromArray(rng.random((9, 13, 12)).astype(np.float32))
    moving.SetSpacing((3.0, 3.0, 4.0))
    moving.SetOrigin((-1.0, -1.5, -2.0))
    grid = sitk.Image(30, 36, 14, sitk.sitkUInt8)
    grid.SetSpacing((1.0, 1.0, 2.0))
    tr = sitk.Euler3DTransform()
    tr.SetRotation(0.04, -0.03, 0.08)
    tr.SetTranslation((1.0, -0.5, 1.5))
    whole = sitk.GetArrayFromImage(resample_onto(moving, grid, tr))
    assert whole.any()
    for _ in range(5):
        assert np.array_equal(sitk.GetArrayFromImage(resample_onto(moving, grid, tr)), whole)
    for axis in range(3):
        n = whole.shape[axis]
        for start in range(0, n, 3):
            stop = min(n, start + 3)
            part = sitk.GetArrayFromImage(resample_onto(moving, sub_grid(grid, axis, start, stop), tr))
            assert np.array_equal(part, np.take(whole, range(start, stop), axis=axis)), (axis, start)
