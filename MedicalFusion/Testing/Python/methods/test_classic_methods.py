"""Classic transform / filter fusion methods: nsst_papcnn, nsct, gff, lrd, jbf_lge."""
from __future__ import annotations

import math

import pytest
import torch

import conftest  # noqa: F401  (puts MedicalFusion/ on sys.path)
from MedicalFusionLib.methods import frequency_bank
from MedicalFusionLib.methods.bilateral import joint_bilateral_filter
from MedicalFusionLib.methods.contourlet import NSCT_DIRECTIONS
from MedicalFusionLib.methods.local_filters import box_mean, box_sum, gaussian_blur, guided_filter
from MedicalFusionLib.methods.registry import get_method
from MedicalFusionLib.methods.shearlet import NSST_DIRECTIONS, otsu_threshold, pa_pcnn_firing_counts

CLASSIC = ("nsst_papcnn", "nsct", "gff", "lrd", "jbf_lge")


def fuse(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return get_method(name).build(torch.device("cpu"))(a, b)


def smooth_random(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, h // 4 + 1, w // 4 + 1, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return (0.7 * x + 0.3 * torch.rand(n, 1, h, w, generator=g)).clamp(0, 1)


def blob(h: int, w: int, cy: float, cx: float, sigma: float) -> torch.Tensor:
    y = torch.arange(h, dtype=torch.float32).view(h, 1)
    x = torch.arange(w, dtype=torch.float32).view(1, w)
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2)).view(1, 1, h, w)


@pytest.mark.parametrize("name", CLASSIC)
def test_registered_as_classic(name):
    m = get_method(name)
    assert m.family == "classic" and m.reference and m.description


@pytest.mark.parametrize("name", CLASSIC)
def test_shape_range_determinism_and_batch_independence(name):
    a, b = smooth_random(3, 29, 37, 1), smooth_random(3, 29, 37, 2)   # odd sizes on purpose
    f = fuse(name, a, b)
    assert f.shape == a.shape and f.dtype == a.dtype
    assert torch.isfinite(f).all() and f.min() >= 0.0 and f.max() <= 1.0
    assert torch.equal(f, fuse(name, a, b))                              # deterministic
    alone = fuse(name, a[1:2], b[1:2])
    assert torch.allclose(alone, f[1:2], atol=1e-5)                       # independent of the batch


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (16, 40)])
def test_tiny_and_odd_sizes(name, size):
    a, b = torch.rand(1, 1, *size), torch.rand(1, 1, *size)
    f = fuse(name, a, b)
    assert f.shape == a.shape and torch.isfinite(f).all()


@pytest.mark.parametrize("name", CLASSIC)
def test_fusing_an_image_with_itself_returns_it(name):
    a = smooth_random(2, 40, 40, 3)
    assert (fuse(name, a, a) - a).abs().max() < 1e-4


@pytest.mark.parametrize("directions,transition", [(NSST_DIRECTIONS, 0.5), (NSCT_DIRECTIONS, 1.0)])
def test_transform_is_perfectly_reconstructed_by_summing_bands(directions, transition):
    x = smooth_random(2, 50, 70, 4)
    bands = frequency_bank.decompose(x, directions, transition)
    assert bands.shape == (2, sum(directions) + 1, 50, 70)
    assert (bands.sum(dim=1, keepdim=True) - x).abs().max() < 1e-5
    # the filters themselves form a partition of unity at every frequency
    hp, wp = frequency_bank.padded_size(50), frequency_bank.padded_size(70)
    bank = frequency_bank._bank(hp, wp, "cpu", torch.float32, tuple(directions), transition)
    assert (bank.sum(dim=0) - 1).abs().max() < 1e-5


def test_directional_bands_are_directional():
    """A vertical grating (variation along x) lands in the bands around the horizontal
    frequency axis, a horizontal one in the bands around the vertical axis."""
    h = w = 64
    x = torch.arange(w, dtype=torch.float32)
    vertical_lines = (0.5 + 0.4 * torch.cos(2 * math.pi * x / 4)).view(1, 1, 1, w).expand(1, 1, h, w)
    n = NSST_DIRECTIONS[0]
    energy_v = frequency_bank.decompose(vertical_lines, NSST_DIRECTIONS, 0.5)[0, :n].pow(2).mean(dim=(1, 2))
    energy_h = frequency_bank.decompose(vertical_lines.transpose(-1, -2), NSST_DIRECTIONS, 0.5)[0, :n].pow(2).mean(
        dim=(1, 2))
    # pseudo-angle 1 (fy = 0) sits between wedges n/4 - 1 and n/4; angle 3 (fx = 0) around 3n/4
    assert energy_v[[n // 4 - 1, n // 4]].sum() > 0.95 * energy_v.sum()
    assert energy_h[[3 * n // 4 - 1, 3 * n // 4]].sum() > 0.95 * energy_h.sum()


def test_sharp_edge_present_only_in_a_survives():
    h, w = 48, 48
    a = torch.full((1, 1, h, w), 0.3)
    a[..., w // 2:] = 0.7                      # a sharp vertical edge of contrast 0.4 (anatomy)
    b = 0.1 + 0.1 * blob(h, w, 10, 10, 8.0)    # dark, smooth functional image, no edge

    def step(img):
        """Contrast across the edge, rows away from b's blob: over the edge pixel pair or over a
        4-pixel span (the bilateral grid of jbf_lge spreads the edge over two pixels)."""
        one = (img[..., 30:, w // 2] - img[..., 30:, w // 2 - 1]).mean()
        four = (img[..., 30:, w // 2 + 1] - img[..., 30:, w // 2 - 2]).mean()
        return max(one, four)

    average = step((a + b) / 2)                # a plain average halves the edge: 0.2
    for name in CLASSIC:
        assert step(fuse(name, a, b)) > 1.2 * average, name


def test_bright_blob_present_only_in_b_survives():
    h, w = 48, 48
    a = 0.2 + 0.2 * torch.linspace(0, 1, h).view(1, 1, h, 1).expand(1, 1, h, w)   # smooth anatomy
    b = 0.1 + 0.8 * blob(h, w, 24, 24, 4.0)                                       # bright functional spot

    def contrast(img):
        return img[..., 23:26, 23:26].mean() - img[..., 20:29, :6].mean()

    average = contrast((a + b) / 2)
    for name in CLASSIC:
        # GFF only guarantees this where the spot is the more salient source: against a strongly
        # textured anatomy its Laplacian saliency picks the texture and the smooth spot fades.
        assert contrast(fuse(name, a, b)) > 1.3 * average, name


def test_pa_pcnn_fires_more_for_stronger_input_and_otsu_splits_two_levels():
    s = torch.zeros(1, 1, 32, 32)
    s[..., :, 16:] = 0.8
    s[..., :, :16] = 0.2
    thr = otsu_threshold(s).item()
    assert 0.2 <= thr <= 0.8
    counts = pa_pcnn_firing_counts(s, iterations=30)
    assert counts[..., 8:24, 20:28].mean() > counts[..., 8:24, 4:12].mean()


def test_bilateral_grid_splats_agree_and_approximate_the_filter():
    x = smooth_random(2, 37, 41, 6)
    guide = gaussian_blur(x, 3.0)
    by_index = joint_bilateral_filter(x, guide, index_add=True)
    by_onehot = joint_bilateral_filter(x, guide, index_add=False)   # the path used on GPUs
    assert (by_index - by_onehot).abs().max() < 1e-5
    # brute-force joint bilateral filter (sigma_s = 3, sigma_r = 0.05, 19x19 window)
    r, (h, w) = 9, x.shape[-2:]
    p, pg = torch.nn.functional.pad(x, (r,) * 4, mode="reflect"), torch.nn.functional.pad(guide, (r,) * 4, mode="reflect")
    num, den = torch.zeros_like(x), torch.zeros_like(x)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            wgt = math.exp(-(dy * dy + dx * dx) / 18.0) * torch.exp(
                -(pg[..., r + dy:r + dy + h, r + dx:r + dx + w] - guide) ** 2 / (2 * 0.05 ** 2))
            num += wgt * p[..., r + dy:r + dy + h, r + dx:r + dx + w]
            den += wgt
    assert (by_index - num / den).abs().mean() < 0.01
    assert (by_index - num / den).abs().mean() < 0.5 * (guide - num / den).abs().mean()   # better than a blur


def test_guided_filter_and_box_mean():
    x = torch.rand(1, 1, 20, 30)
    assert torch.allclose(box_mean(torch.ones(1, 1, 20, 30), 45), torch.ones(1, 1, 20, 30))
    assert torch.allclose(box_mean(x, 0), x)
    for r in (1, 2, 5):   # shift-and-add (r <= 2) and cumulative-sum paths against a direct sum
        direct = torch.stack([torch.stack([x[0, 0, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].sum()
                                           for j in range(30)]) for i in range(20)])
        assert torch.allclose(box_sum(x, r)[0, 0], direct, atol=1e-4)
    # with a tiny eps the guided filter of the guide itself returns the guide (edge preserving)
    assert (guided_filter(x, x, 3, 1e-8) - x).abs().max() < 1e-3
