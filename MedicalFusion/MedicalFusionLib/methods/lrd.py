"""LRD: Laplacian redecomposition fusion (our reading of the paper).

Li, Guo, Han, Wang, Li & Luo, "Laplacian redecomposition for multimodal medical image fusion",
IEEE Trans. Instrum. Meas. 69(9), 2020.

The paper splits each Laplacian detail level into the information both sources carry (their
*overlapping domain*, redundant information) and the information only one carries (the
*non-overlapping domain*, complementary information), fuses the two domains with different rules,
and rebuilds each detail level with the help of a global decision graph and local means. The
authors' code is released only as obfuscated MATLAB p-files, so the rules below are our own
implementation of that scheme, not a port:

* 4-level Laplacian pyramid (binomial 5-tap kernel, ``pyramids.py``).
* Significance of a detail coefficient: |L| above the mean |L| of its level in that image.
* Non-overlapping domain (exactly one source significant): that source's coefficient is kept.
* Overlapping domain (both significant): the source with the larger 3x3 local mean of |L| wins,
  so redundant edges are taken whole from one source.
* Neither significant: the global decision graph |L_A| >= |L_B| decides.
* Low-pass residual: the source with the larger 3x3 local mean (brighter base) is kept, which
  keeps the functional intensity of PET/SPECT regions instead of halving it.
The gradient-domain enhancement step of the paper is not implemented.
"""
from __future__ import annotations

import torch

from .local_filters import box_mean
from .pyramids import collapse_laplacian, laplacian_pyramid, pad_to_multiple
from .registry import register_function

LEVELS = 4
LOCAL_RADIUS = 1  # 3x3 local means


def fuse_detail_level(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Redecomposition rule for one detail level (see the module docstring)."""
    a, b = la.abs(), lb.abs()
    sig_a = a > a.mean(dim=(2, 3), keepdim=True)
    sig_b = b > b.mean(dim=(2, 3), keepdim=True)
    overlap = sig_a & sig_b
    only_one = sig_a ^ sig_b
    by_local_mean = box_mean(a, LOCAL_RADIUS) >= box_mean(b, LOCAL_RADIUS)
    take_a = torch.where(overlap, by_local_mean, torch.where(only_one, sig_a, a >= b))
    return torch.where(take_a, la, lb)


def fuse_lrd(a: torch.Tensor, b: torch.Tensor, levels: int = LEVELS) -> torch.Tensor:
    """LRD fusion of a, b [B,1,H,W] in [0,1] -> [B,1,H,W]; 4 Laplacian levels, 3x3 local means.
    Images smaller than 32 pixels get fewer levels (the 5-tap pyramid needs >= 4 pixels a level)."""
    small = min(a.shape[-2:])
    levels = min(levels, small.bit_length() - 2)
    if levels < 1:
        return torch.where(box_mean(a, LOCAL_RADIUS) >= box_mean(b, LOCAL_RADIUS), a, b)
    a, size = pad_to_multiple(a, 2 ** levels)
    b, _ = pad_to_multiple(b, 2 ** levels)
    pa, pb = laplacian_pyramid(a, levels), laplacian_pyramid(b, levels)
    fused = [fuse_detail_level(x, y) for x, y in zip(pa[:-1], pb[:-1])]
    base_a, base_b = pa[-1], pb[-1]
    fused.append(torch.where(box_mean(base_a, LOCAL_RADIUS) >= box_mean(base_b, LOCAL_RADIUS), base_a, base_b))
    return collapse_laplacian(fused)[..., : size[0], : size[1]].clamp(0.0, 1.0)


register_function("lrd", fuse_lrd, bytes_per_pixel=4 * 40)   # texts: options.METHODS
