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


def _window_sum_1d(x: torch.Tensor, r: int, dim: int, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over [i-r, i+r] clipped to the image along ``dim`` (-1 or -2) and the number of terms.

    ``exact``: zero padding + one cumulative sum in float64 (so that guided-filter variances stay
    accurate for eps = 1e-6) + one difference of two shifted views; the cumulative sum always runs
    along the last, contiguous axis (along rows it is many times slower on CPU).
    Otherwise (input precision): for r <= 24 by "doubling" shift-and-add (sums of 1, 2, 4, ...
    neighbours, then the binary digits of 2r+1: about 2 log2(2r+1) additions along either axis,
    no transposes, and no rounding drift since every partial sum covers at most 2r+1 terms);
    for larger r by a cumulative sum in the input precision."""
    n = x.shape[dim]
    if exact or r > 24:
        if dim == -2:
            s, count = _window_sum_1d(x.transpose(-1, -2), r, -1, exact)
            return s.transpose(-1, -2), count.view(-1, 1)
        x_acc = x.double() if exact and x.device.type != "mps" else x  # MPS has no float64
        c = torch.cumsum(F.pad(x_acc, (r + 1, r)), dim=-1)
        s = (c[..., 2 * r + 1:] - c[..., :n]).to(x.dtype)
    else:
        s = _doubling_sum_1d(x, r, dim)
    count = _window_count(n, r, x.device, x.dtype)
    return s, (count.view(-1, 1) if dim == -2 else count)


def _doubling_sum_1d(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Zero-padded window sum over [i-r, i+r] along ``dim``: partial sums of 2^k neighbours by
    repeated doubling, then the window length 2r+1 written in binary."""
    n = x.shape[dim]
    length = 2 * r + 1
    partial = {1: F.pad(x, (r, r) if dim == -1 else (0, 0, r, r))}
    k = 1
    while 2 * k <= length:
        prev = partial[k]
        m = prev.shape[dim] - k
        partial[2 * k] = prev.narrow(dim, 0, m) + prev.narrow(dim, k, m)
        k *= 2
    out, offset = None, 0
    while k >= 1:
        if length & k:
            term = partial[k].narrow(dim, offset, n)
            out = term.clone() if out is None else out.add_(term)
            offset += k
        k //= 2
    return out


def _shift_sum_1d(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Zero-padded window sum over [i-r, i+r] by shift-and-add (cheaper than a cumsum for r <= 2)."""
    n = x.shape[dim]
    p = F.pad(x, (r, r) if dim == -1 else (0, 0, r, r))
    out = p.narrow(dim, 0, n).clone()
    for k in range(1, 2 * r + 1):
        out.add_(p.narrow(dim, k, n))
    return out


def box_sum(x: torch.Tensor, r: int, exact: bool = True) -> torch.Tensor:
    """Sum over the (2r+1)x(2r+1) window, clipped at the borders (O(1) per pixel, any r)."""
    if r <= 2:
        return _shift_sum_1d(_shift_sum_1d(x, r, -2), r, -1)
    s, _ = _window_sum_1d(x, r, -2, exact)
    s, _ = _window_sum_1d(s, r, -1, exact)
    return s


def _window_count(n: int, r: int, device, dtype) -> torch.Tensor:
    idx = torch.arange(n, device=device)
    return ((idx + r).clamp(max=n - 1) - (idx - r).clamp(min=0) + 1).to(dtype)


def box_mean(x: torch.Tensor, r: int, exact: bool = True) -> torch.Tensor:
    """Mean over the (2r+1)x(2r+1) window, divided by the count of pixels inside the image.
    ``exact=False`` accumulates in the input's precision (faster; fine unless tiny differences of
    window means matter, as in a guided filter with a tiny eps)."""
    h, w = x.shape[-2:]
    if r <= 2:
        count = _window_count(h, r, x.device, x.dtype).view(h, 1) * _window_count(w, r, x.device, x.dtype)
        return box_sum(x, r) / count
    s, ch = _window_sum_1d(x, r, -2, exact)
    s, cw = _window_sum_1d(s, r, -1, exact)
    return s / (ch * cw)


def majority_filter(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Consistency verification of a binary decision map: the majority of the (2r+1)^2 window
    (Li, Manjunath & Mitra 1995). Returns a bool tensor. Window sums of 0/1 values are exact
    integers in float32, so no float64 accumulation is needed."""
    return box_mean(mask.to(torch.float32), r, exact=False) > 0.5


def gaussian_kernel1d(sigma: float, radius: int, device, dtype=torch.float32) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)  # built on the CPU (MPS: no float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def separable_filter(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Filter every channel with the 2-D separable kernel k k^T, reflect borders. Shift-and-add
    (one multiply-add per tap): 1-channel convolutions are slow on CPU."""
    r = k.numel() // 2
    h, w = x.shape[-2:]
    taps = k.tolist()
    p = safe_pad(x, r, r, r, r)
    rows = p[..., :, 0:w] * taps[0]
    for i in range(1, 2 * r + 1):
        rows.add_(p[..., :, i:i + w], alpha=taps[i])
    out = rows[..., 0:h, :] * taps[0]
    for i in range(1, 2 * r + 1):
        out.add_(rows[..., i:i + h, :], alpha=taps[i])
    return out


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    radius = int(math.ceil(3 * sigma)) if radius is None else radius
    return separable_filter(x, gaussian_kernel1d(sigma, radius, x.device, x.dtype))


def filter3x3(x: torch.Tensor, kernel: list[list[float]]) -> torch.Tensor:
    """Correlate every channel with a 3x3 kernel, reflect borders (shift-and-add)."""
    h, w = x.shape[-2:]
    p = safe_pad(x, 1, 1, 1, 1)
    out = torch.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            if kernel[dy][dx] != 0.0:
                out.add_(p[..., dy:dy + h, dx:dx + w], alpha=kernel[dy][dx])
    return out


def guided_filter(guide: torch.Tensor, src: torch.Tensor, r: int, eps: float, exact: bool | None = None,
                  subsample: int = 1) -> torch.Tensor:
    """Guided filter (He, Sun & Tang, IEEE TPAMI 2013), gray guide, radius r, regulariser eps.
    The four window means are taken in one box-filter call (and the two of a, b in another).

    ``exact``: window sums in float64 (default: when eps < 1e-3, since variances are differences
    of window means); ``False`` keeps the input precision.
    ``subsample`` = s > 1: the fast guided filter (He & Sun, arXiv:1505.00996, 2015): the linear
    coefficients a, b are computed on guide and input area-averaged by s, with radius r / s, and
    their window means are upsampled bilinearly; the output a I + b uses the full-size guide. Only
    applied when both sides of the image are at least 16 s pixels (smaller images: s = 1)."""
    c = guide.shape[1]
    if exact is None:
        exact = eps < 1e-3
    h, w = guide.shape[-2:]
    if subsample > 1 and min(h, w) >= 16 * subsample:
        small = (-(-h // subsample), -(-w // subsample))
        lo = F.adaptive_avg_pool2d(torch.cat([guide, src], dim=1), small)
        g, p = lo[:, :c], lo[:, c:]
        r = max(1, int(round(r / subsample)))
    else:
        g, p, small = guide, src, None
    means = box_mean(torch.cat([g, p, g * g, g * p], dim=1), r, exact)
    mean_i, mean_p, corr_ii, corr_ip = means.split(c, dim=1)
    a = (corr_ip - mean_i * mean_p) / (corr_ii - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    mean_ab = box_mean(torch.cat([a, b], dim=1), r, exact)
    if small is not None:
        mean_ab = F.interpolate(mean_ab, size=(h, w), mode="bilinear", align_corners=False)
    return mean_ab[:, :c] * guide + mean_ab[:, c:]
