import numpy as np
import torch

from MedicalFusionLib import colour
from MedicalFusionLib.methods import get_method
from MedicalFusionLib.methods.pyramids import collapse_laplacian, fuse_dwt, fuse_lp, haar_dwt, haar_idwt, laplacian_pyramid
from MedicalFusionLib.pipeline import recombine


def test_alpha_reproduces_slicers_50_percent_foreground_blend():
    """Slicer composites RGB = 0.5 * grey(anatomical) + 0.5 * colourmap(functional)."""
    rng = np.random.default_rng(3)
    anat = rng.random((1, 16, 16), dtype=np.float32)
    pet_unit = rng.random((1, 16, 16), dtype=np.float32)
    pet_rgb = colour.apply_colormap(pet_unit, "PET-Heat")
    slicer_view = 0.5 * np.repeat(anat[..., None], 3, -1) + 0.5 * pet_rgb
    ycc = colour.rgb_to_ycbcr(pet_rgb)
    m = get_method("alpha")
    fused_y = m.build(torch.device("cpu"))(torch.from_numpy(anat)[:, None], torch.from_numpy(ycc[..., 0])[:, None])
    ours = recombine(fused_y[:, 0].numpy(), ycc, m.chroma_scale, grayscale=False)
    assert np.abs(ours.astype(int) - colour.to_uint8(slicer_view).astype(int)).max() <= 1


def test_average_and_max_keep_functional_colour():
    assert get_method("average").chroma_scale == 1.0 and get_method("max").chroma_scale == 1.0


def test_pyramids_reconstruct_perfectly():
    x = torch.rand(2, 1, 32, 48)
    assert torch.allclose(collapse_laplacian(laplacian_pyramid(x, 3)), x, atol=1e-5)
    ll, d = haar_dwt(x)
    assert torch.allclose(haar_idwt(ll, d), x, atol=1e-5)


def test_transform_fusion_of_an_image_with_itself_is_the_image():
    x = torch.rand(1, 1, 50, 61)
    assert torch.allclose(fuse_lp(x, x), x, atol=1e-5)
    assert torch.allclose(fuse_dwt(x, x), x, atol=1e-5)


def test_transform_fusion_keeps_edges_of_both_sources():
    a = torch.zeros(1, 1, 64, 64)
    b = torch.zeros(1, 1, 64, 64)
    a[..., :, 20:24] = 1.0       # a vertical bar only in A
    b[..., 40:44, :] = 1.0       # a horizontal bar only in B
    for fuse in (fuse_lp, fuse_dwt):
        f = fuse(a, b)
        avg = (a + b) / 2
        # the bars keep more contrast than plain averaging would give them
        assert f[..., 5:15, 20:24].mean() > avg[..., 5:15, 20:24].mean() + 0.2
        assert f[..., 40:44, 50:60].mean() > avg[..., 40:44, 50:60].mean() + 0.2
