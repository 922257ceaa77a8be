"""Multiscale transform fusion: Laplacian pyramid and discrete wavelet transform, batched in torch.

Both follow the classic rule set: approximation (low-pass) coefficients averaged, detail
coefficients chosen by absolute maximum (Burt & Adelson, IEEE Trans. Commun. 1983; Burt &
Kolczynski, ICCV 1993; Li, Manjunath & Mitra, Graph. Models Image Process. 1995).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import register_function



def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad H and W up to a multiple; returns the padded tensor and the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if (ph < h and pw < w) else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


_TAPS = (1.0 / 16, 4.0 / 16, 6.0 / 16, 4.0 / 16, 1.0 / 16)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap binomial blur [1 4 6 4 1]/16, reflecting at the borders.

    Written as weighted sums of shifted views: on the CPU this is several times faster than
    a depthwise convolution for these small kernels.
    """
    h, w = x.shape[-2:]
    xp = F.pad(x, (2, 2, 2, 2), mode="reflect")
    rows = (xp[..., :, 0:w] + xp[..., :, 4:w + 4]) * _TAPS[0]
    rows += (xp[..., :, 1:w + 1] + xp[..., :, 3:w + 3]) * _TAPS[1]
    rows += xp[..., :, 2:w + 2] * _TAPS[2]
    out = (rows[..., 0:h, :] + rows[..., 4:h + 4, :]) * _TAPS[0]
    out += (rows[..., 1:h + 1, :] + rows[..., 3:h + 3, :]) * _TAPS[1]
    out += rows[..., 2:h + 2, :] * _TAPS[2]
    return out


def _down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[..., ::2, ::2]


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Expand: zero-insertion upsampling, then the binomial blur scaled by 4."""
    up = x.new_zeros(x.shape[:-2] + size)
    up[..., ::2, ::2] = x * 4.0
    return _blur(up)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Details of ``levels`` scales followed by the low-pass residual (Burt & Adelson 1983)."""
    pyr = []
    cur = x
    for _ in range(levels):
        low = _down(cur)
        pyr.append(cur - _up(low, cur.shape[-2:]))
        cur = low
    pyr.append(cur)
    return pyr


def collapse_laplacian(pyr: list[torch.Tensor]) -> torch.Tensor:
    cur = pyr[-1]
    for detail in reversed(pyr[:-1]):
        cur = _up(cur, detail.shape[-2:]) + detail
    return cur


def choose_abs_max(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() >= y.abs(), x, y)


def usable_levels(x: torch.Tensor, levels: int, coarsest: int = 4) -> int:
    """At most ``levels`` halvings that leave the coarsest band at least ``coarsest`` pixels wide."""
    smallest = min(x.shape[-2:])
    return max(1, min(levels, int(math.log2(max(smallest, 1))) - int(math.log2(coarsest)) + 1))


def fuse_lp(a: torch.Tensor, b: torch.Tensor, levels: int = 4) -> torch.Tensor:
    """Laplacian pyramid, 4 levels, binomial 5-tap kernel; base averaged, details by |max|.
    Small images use fewer levels (the coarsest band stays at least 4 pixels wide)."""
    levels = usable_levels(a, levels)
    a, size = pad_to_multiple(a, 2 ** levels)
    b, _ = pad_to_multiple(b, 2 ** levels)
    pyr = laplacian_pyramid(torch.cat([a, b], dim=1), levels)   # both sources in one pass
    fused = [choose_abs_max(d[:, :1], d[:, 1:]) for d in pyr[:-1]] + [pyr[-1].mean(dim=1, keepdim=True)]
    return collapse_laplacian(fused)[..., : size[0], : size[1]].clamp(0.0, 1.0)


def haar_dwt(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the orthonormal 2D Haar DWT: (LL [B,1,h,w], details [B,3,h,w])."""
    p00, p01 = x[..., ::2, ::2], x[..., ::2, 1::2]
    p10, p11 = x[..., 1::2, ::2], x[..., 1::2, 1::2]
    ll = (p00 + p01 + p10 + p11) * 0.5
    lh = (p00 - p01 + p10 - p11) * 0.5
    hl = (p00 + p01 - p10 - p11) * 0.5
    hh = (p00 - p01 - p10 + p11) * 0.5
    return ll, torch.cat([lh, hl, hh], dim=1)


def haar_idwt(ll: torch.Tensor, details: torch.Tensor) -> torch.Tensor:
    lh, hl, hh = details[:, 0:1], details[:, 1:2], details[:, 2:3]
    out = torch.empty(ll.shape[:-2] + (ll.shape[-2] * 2, ll.shape[-1] * 2), device=ll.device, dtype=ll.dtype)
    out[..., ::2, ::2] = (ll + lh + hl + hh) * 0.5
    out[..., ::2, 1::2] = (ll - lh + hl - hh) * 0.5
    out[..., 1::2, ::2] = (ll + lh - hl - hh) * 0.5
    out[..., 1::2, 1::2] = (ll - lh - hl + hh) * 0.5
    return out


def fuse_dwt(a: torch.Tensor, b: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Haar DWT, 3 levels; approximation averaged, detail coefficients by |max|."""
    levels = usable_levels(a, levels, coarsest=2)
    a, size = pad_to_multiple(a, 2 ** levels)
    b, _ = pad_to_multiple(b, 2 ** levels)
    details = []
    for _ in range(levels):
        a, da = haar_dwt(a)
        b, db = haar_dwt(b)
        details.append(choose_abs_max(da, db))
    cur = (a + b) * 0.5
    for d in reversed(details):
        cur = haar_idwt(cur, d)
    return cur[..., : size[0], : size[1]].clamp(0.0, 1.0)


# family, description and paper: options.METHODS
register_function("lp", fuse_lp, bytes_per_pixel=96)
register_function("dwt", fuse_dwt, bytes_per_pixel=96)
