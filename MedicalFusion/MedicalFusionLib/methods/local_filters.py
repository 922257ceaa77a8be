"""Local image filters shared by the classic fusion methods (no method is registered here).

Everything works on float tensors [N, C, H, W] of any size and on any device, and treats every
slice on its own (no statistics across the batch), so a slice gives the same answer alone or in a
batch. Borders: window means are normalised by the number of pixels that fall inside the image
(as He et al.'s ``boxfilter`` / N), so no padding rule is needed and tiny images work.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def safe_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Reflect-pad when the image is large enough, otherwise replicate."""
    h, w = x.shape[-2:]
    mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
    return F.pad(x, (left, right, top, bottom), mode=mode)


def _window_sum_1d(x: torch.Tensor, r: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over [i-r, i+r] clipped to the image along ``dim`` (-1 or -2) and the number of terms.
    Zero padding + one cumulative sum in float64 (so guided-filter variances stay exact enough
    for eps = 1e-6) + one difference of two shifted views. The sum always runs along the last,
    contiguous axis: a cumulative sum along rows is many times slower on CPU."""
    if dim == -2:
        s, count = _window_sum_1d(x.transpose(-1, -2), r, -1)
        return s.transpose(-1, -2), count.view(-1, 1)
    n = x.shape[-1]
    c = torch.cumsum(F.pad(x.double(), (r + 1, r)), dim=-1)
    s = (c[..., 2 * r + 1:] - c[..., :n]).to(x.dtype)
    idx = torch.arange(n, device=x.device)
    count = ((idx + r).clamp(max=n - 1) - (idx - r).clamp(min=0) + 1).to(x.dtype)
    return s, count


def box_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sum over the (2r+1)x(2r+1) window, clipped at the borders (O(1) per pixel, any r)."""
    s, _ = _window_sum_1d(x, r, -2)
    s, _ = _window_sum_1d(s, r, -1)
    return s


def box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over the (2r+1)x(2r+1) window, divided by the count of pixels inside the image."""
    s, ch = _window_sum_1d(x, r, -2)
    s, cw = _window_sum_1d(s, r, -1)
    return s / (ch * cw)


def majority_filter(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Consistency verification of a binary decision map: the majority of the (2r+1)^2 window
    (Li, Manjunath & Mitra 1995). Returns a bool tensor."""
    return box_mean(mask.to(torch.float32), r) > 0.5


def gaussian_kernel1d(sigma: float, radius: int, device, dtype=torch.float32) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def separable_filter(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Filter every channel with the 2-D separable kernel k k^T, reflect borders."""
    r = k.numel() // 2
    n, c, h, w = x.shape
    y = safe_pad(x.reshape(n * c, 1, h, w), r, r, r, r)
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    radius = int(math.ceil(3 * sigma)) if radius is None else radius
    return separable_filter(x, gaussian_kernel1d(sigma, radius, x.device, x.dtype))


def filter3x3(x: torch.Tensor, kernel: list[list[float]]) -> torch.Tensor:
    """Correlate every channel with a 3x3 kernel, reflect borders."""
    n, c, h, w = x.shape
    k = torch.tensor(kernel, device=x.device, dtype=x.dtype).view(1, 1, 3, 3)
    return F.conv2d(safe_pad(x.reshape(n * c, 1, h, w), 1, 1, 1, 1), k).reshape(n, c, h, w)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, r: int, eps: float) -> torch.Tensor:
    """Guided filter (He, Sun & Tang, IEEE TPAMI 2013), gray guide, radius r, regulariser eps.
    The four window means are taken in one box-filter call (and the two of a, b in another)."""
    c = guide.shape[1]
    means = box_mean(torch.cat([guide, src, guide * guide, guide * src], dim=1), r)
    mean_i, mean_p, corr_ii, corr_ip = means.split(c, dim=1)
    a = (corr_ip - mean_i * mean_p) / (corr_ii - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    mean_ab = box_mean(torch.cat([a, b], dim=1), r)
    return mean_ab[:, :c] * guide + mean_ab[:, c:]
