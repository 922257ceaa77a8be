"""Non-subsampled multiscale-directional filter banks built in the frequency domain.

Used by the NSST (``shearlet.py``) and NSCT (``contourlet.py``) fusion methods; no method is
registered here. A non-subsampled transform filters the image with every band filter at full
resolution, so in the frequency domain a band is ``irfft2(rfft2(x) * H_k)``. We build real,
zero-phase (even) frequency responses H_k ourselves:

* scale: nested Gaussian low-passes P_j(r) = exp(-r^2 / 2 s_j^2) on the Euclidean frequency radius
  r, s_1 = 0.15 cycle/pixel halving at each level; the band of level j is P_{j-1} - P_j (P_0 = 1)
  and the low-pass residual is P_J. This stands in for the non-subsampled (a-trous) pyramid that
  both the NSCT (da Cunha, Zhou & Do, IEEE TIP 2006) and the NSST of Easley, Labate & Lim (ACHA
  2008) use for the scales; its bands are differences of Gaussians, like those of a binomial/maxflat
  pyramid, with little ringing.
* direction: the frequency plane is split into a horizontal cone |fy| <= |fx| and a vertical cone;
  in each cone the slope (fy/fx or fx/fy, in [-1, 1]) is cut into n/2 equal intervals, which is
  both the shearlet tiling (one shear per interval) and the wedge tiling of a 2^l-band directional
  filter bank. Neighbouring wedges overlap through a Meyer transition whose width is a parameter
  (the NSST uses half a wedge, like the Meyer shearing windows; the NSCT a smoother roll-off,
  closer to the DFB's fan filters).

All windows form a partition of unity (sum_k H_k = 1 at every frequency), so the transform is
undone exactly by summing the bands: the fused image is the sum of the fused bands and no inverse
FFT is needed for synthesis. Filters are built once per (size, device, layout) and cached.
Images are reflect-padded by ``PAD`` pixels before the FFT (to keep circular wrap-around away
from the image) and the bands are cropped back, which commutes with the summation.
"""
from __future__ import annotations

import functools
import math

import torch

from .local_filters import safe_pad

PAD = 16
#: frequency spread (cycles/pixel) of the finest Gaussian low-pass; 0.15 matches the 5-tap
#: binomial kernel's response (1/4 at 1/4 cycle/pixel); it halves at every coarser level.
SIGMA_FINEST = 0.15


def _meyer_nu(x: torch.Tensor) -> torch.Tensor:
    """Meyer's auxiliary polynomial: 0 below 0, 1 above 1, nu(x) + nu(1-x) = 1."""
    x = x.clamp(0.0, 1.0)
    return x ** 4 * (35 - 84 * x + 70 * x ** 2 - 20 * x ** 3)


def _frequency_grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(h, 1).expand(h, w // 2 + 1)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64).view(1, w // 2 + 1).expand(h, w // 2 + 1)
    return fy, fx


def scale_windows(fy: torch.Tensor, fx: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[band_1 (finest), ..., band_levels, low-pass]; they sum to one. Nested Gaussian low-passes
    P_j = exp(-r^2 / (2 s_j^2)), s_j = SIGMA_FINEST / 2^(j-1), band_j = P_{j-1} - P_j (P_0 = 1):
    differences of Gaussians, like the bands of an a-trous pyramid with maxflat/binomial filters,
    which ring far less than sharper (e.g. Meyer) radial windows when coefficients are mixed."""
    r2 = fy ** 2 + fx ** 2
    lows = [torch.ones_like(r2)]
    for j in range(levels):
        s = SIGMA_FINEST / 2 ** j
        lows.append(torch.exp(-r2 / (2 * s * s)))
    return [lows[j] - lows[j + 1] for j in range(levels)] + [lows[-1]]


def pseudo_angle(fy: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """Direction of each frequency as a number in [0, 4), linear in slope inside each cone:
    0 -> fy = -fx, 1 -> fy = 0, 2 -> fy = fx, 3 -> fx = 0. Even: t(-f) = t(f)."""
    ax, ay = fx.abs(), fy.abs()
    horizontal = ay <= ax
    safe_fx = torch.where(fx == 0, torch.ones_like(fx), fx)
    safe_fy = torch.where(fy == 0, torch.ones_like(fy), fy)
    t = torch.where(horizontal, 1.0 + fy / safe_fx, 3.0 - fx / safe_fy)
    return torch.remainder(t, 4.0)


def directional_windows(fy: torch.Tensor, fx: torch.Tensor, n_dirs: int, transition: float) -> torch.Tensor:
    """[n_dirs, H, W//2+1] smooth wedges with equal slope steps in each cone; they sum to one.
    ``transition``: width of the Meyer roll-off between neighbouring wedges, as a fraction of a
    wedge (0 < transition < 2)."""
    if n_dirs < 2 or n_dirs % 2:
        raise ValueError("the number of directions must be even and >= 2")
    t = pseudo_angle(fy, fx)
    half = 2.0 / n_dirs
    delta = transition * 2 * half
    out = []
    for k in range(n_dirs):
        centre = (k + 0.5) * 2 * half
        u = torch.remainder(t - centre + 2.0, 4.0) - 2.0
        out.append(_meyer_nu((u + half) / delta + 0.5) - _meyer_nu((u - half) / delta + 0.5))
    return torch.stack(out)


@functools.lru_cache(maxsize=16)
def _bank(h: int, w: int, device: str, dtype: torch.dtype, directions: tuple[int, ...], transition: float) -> torch.Tensor:
    fy, fx = _frequency_grid(h, w)
    scales = scale_windows(fy, fx, len(directions))
    filters = []
    for band, n_dirs in zip(scales[:-1], directions):
        filters.append(band.unsqueeze(0) * directional_windows(fy, fx, n_dirs, transition))
    filters.append(scales[-1].unsqueeze(0))
    return torch.cat(filters).to(device=device, dtype=dtype).contiguous()


def padded_size(n: int) -> int:
    """Image size plus 2*PAD, rounded up to a multiple of 16 (FFT-friendly)."""
    return int(math.ceil((n + 2 * PAD) / 16.0) * 16)


def decompose(x: torch.Tensor, directions: tuple[int, ...], transition: float) -> torch.Tensor:
    """Non-subsampled decomposition of x [B,1,H,W] -> bands [B, K, H, W]: level by level from the
    finest, each level's directions in order, the low-pass residual last; ``bands.sum(1)`` gives x
    back (up to float rounding)."""
    h, w = x.shape[-2:]
    hp, wp = padded_size(h), padded_size(w)
    top, left = (hp - h) // 2, (wp - w) // 2
    xp = safe_pad(x, left, wp - w - left, top, hp - h - top)
    filters = _bank(hp, wp, str(x.device), x.dtype, tuple(directions), float(transition))
    spectrum = torch.fft.rfft2(xp)  # [B,1,hp,wp//2+1]
    bands = torch.fft.irfft2(spectrum * filters, s=(hp, wp))  # [B,K,hp,wp]
    return bands[..., top:top + h, left:left + w]
