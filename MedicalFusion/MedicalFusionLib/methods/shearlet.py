"""NSST-PAPCNN: non-subsampled shearlet transform with a parameter-adaptive PCNN.

Yin, Liu, Liu & Chen, "Medical image fusion with parameter-adaptive pulse coupled neural network in
nonsubsampled shearlet transform domain", IEEE Trans. Instrum. Meas. 68(1), 2019.

* Transform: non-subsampled shearlet decomposition built in the frequency domain
  (``frequency_bank.py``: Gaussian non-subsampled pyramid, Meyer shear wedges with equal slope
  steps per cone, partition of unity so the inverse is the sum of the bands).
* Low-pass band: the coefficient whose WLE x WSEML activity is larger (weighted local energy and
  weighted sum of eight-neighbourhood modified Laplacian, 3x3 weights [1 2 1; 2 4 2; 1 2 1]/16).
* High-pass bands: the coefficient whose PA-PCNN fires more often. The PCNN input S is the
  absolute coefficient, scaled by the larger maximum of the two sources' band (so both networks
  see the same scale); each network takes its parameters from its own band S:
  alpha_f = ln(1/sigma(S)), lambda = beta V_L = (S_max/S' - 1)/6 with S' the Otsu threshold of S,
  V_E = e^-alpha_f + 1 + 6 lambda, alpha_e = ln(V_E / (S' (1-e^{-3 alpha_f})/(1-e^{-alpha_f})
  + 6 lambda e^-alpha_f)); linking weights [0.5 1 0.5; 1 0 1; 0.5 1 0.5].
"""
from __future__ import annotations

import math

import torch

from ..progress import heartbeat
from .frequency_bank import decompose
from .local_filters import filter3x3, safe_pad
from .registry import register_function

#: directions per level, finest first. Yin et al. use four levels; we keep four levels with
#: 8, 8, 4, 4 directions, which halves the PCNN cost of a 16, 16, 8, 8 split.
NSST_DIRECTIONS = (8, 8, 4, 4)
#: PCNN iterations. The paper runs 110; 50 gives nearly the same image (mean |difference| 0.1 to
#: 0.4 gray levels on CT-, PET- and SPECT-MRI test pairs) at less than half the cost; see
#: ``docs/evaluation/classic.md``.
PCNN_ITERATIONS = 50
#: Meyer roll-off between neighbouring shear wedges, as a fraction of a wedge.
SHEAR_TRANSITION = 0.5

_WEIGHTS_3x3 = [[1 / 16, 2 / 16, 1 / 16], [2 / 16, 4 / 16, 2 / 16], [1 / 16, 2 / 16, 1 / 16]]
_LINK_3x3 = [[0.5, 1.0, 0.5], [1.0, 0.0, 1.0], [0.5, 1.0, 0.5]]


def _weighted_3x3(x: torch.Tensor) -> torch.Tensor:
    return filter3x3(x, _WEIGHTS_3x3)


def modified_laplacian_8(x: torch.Tensor) -> torch.Tensor:
    """Eight-neighbourhood modified Laplacian (EML) with reflect borders."""
    h, w = x.shape[-2:]
    p = safe_pad(x, 1, 1, 1, 1)
    c2 = 2.0 * x

    def at(dy: int, dx: int) -> torch.Tensor:
        return p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    diag = 1.0 / math.sqrt(2.0)
    return ((c2 - at(-1, 0) - at(1, 0)).abs() + (c2 - at(0, -1) - at(0, 1)).abs()
            + diag * (c2 - at(-1, -1) - at(1, 1)).abs() + diag * (c2 - at(-1, 1) - at(1, -1)).abs())


def wle_wseml(low: torch.Tensor) -> torch.Tensor:
    """Activity of a low-pass band: WLE x WSEML (Yin et al. 2019, eqs. for the low-pass rule)."""
    return _weighted_3x3(low * low) * _weighted_3x3(modified_laplacian_8(low))


def otsu_threshold(s: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu threshold of every [H, W] map of s [N, K, H, W] (values >= 0) -> [N, K, 1, 1]."""
    n, k = s.shape[:2]
    flat = s.reshape(n * k, -1)
    acc = torch.float32 if s.device.type == "mps" else torch.float64  # MPS has no float64
    smax = flat.amax(dim=1, keepdim=True).clamp_min(1e-12)
    # bin of every value, offset by bins * map index, counted in one bincount (exact integers; much
    # cheaper than a scatter_add of float64 ones over int64 indices)
    idx = (flat / smax * (bins - 1)).round_().clamp_(0, bins - 1)
    offsets = torch.arange(0, n * k * bins, bins, device=s.device).view(n * k, 1)
    if n * k * bins <= 2 ** 24:  # offsets are exact in float32: add them before the integer cast
        idx = idx.add_(offsets.to(idx.dtype)).long()
    else:
        idx = idx.long() + offsets
    if s.device.type == "mps":  # keep to the plain scatter_add there
        hist = torch.zeros(n * k * bins, device=s.device, dtype=acc)
        hist = hist.scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), device=s.device, dtype=acc))
    else:
        hist = torch.bincount(idx.reshape(-1), minlength=n * k * bins)
    hist = hist.view(n * k, bins).to(acc)
    p = hist / hist.sum(dim=1, keepdim=True)
    levels = torch.arange(bins, device=s.device, dtype=acc)
    omega = torch.cumsum(p, dim=1)
    mu = torch.cumsum(p * levels, dim=1)
    mu_t = mu[:, -1:]
    between = (mu_t * omega - mu) ** 2 / (omega * (1.0 - omega)).clamp_min(1e-12)
    best = between.argmax(dim=1, keepdim=True).to(acc)
    thr = (best + 0.5) / (bins - 1) * smax.to(acc)
    return thr.to(s.dtype).view(n, k, 1, 1)


def pa_pcnn_parameters(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e^-alpha_f, e^-alpha_e, lambda, V_E) per map of s [N,K,H,W] in [0,1] -> each [N,K,1,1]."""
    # one map at a time: same values as a std over dim 2 of the whole tensor, several times faster
    # on the CPU for a few large maps
    sigma = torch.stack([m.std(correction=0) for m in s.flatten(0, 1)]).view(s.shape[0], s.shape[1], 1, 1)
    sigma = sigma.clamp(1e-4, 0.9)
    smax = s.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    s_otsu = torch.minimum(otsu_threshold(s).clamp_min(1e-6), smax)
    alpha_f = torch.log(1.0 / sigma)
    decay_f = torch.exp(-alpha_f)
    lam = (smax / s_otsu - 1.0) / 6.0
    v_e = decay_f + 1.0 + 6.0 * lam
    denom = s_otsu * (1.0 - torch.exp(-3.0 * alpha_f)) / (1.0 - decay_f) + 6.0 * lam * decay_f
    alpha_e = torch.log(v_e / denom).clamp_min(0.0)
    return decay_f, torch.exp(-alpha_e), lam, v_e


def pa_pcnn_firing_counts(s: torch.Tensor, iterations: int = PCNN_ITERATIONS) -> torch.Tensor:
    """Firing counts of the simplified PCNN with parameters from :func:`pa_pcnn_parameters`:
    U[n] = e^-af U[n-1] + S (1 + lambda sum W Y[n-1]); Y[n] = U[n] > E[n-1];
    E[n] = e^-ae E[n-1] + V_E Y[n]; U, E, Y start at zero; W = [0.5 1 0.5; 1 0 1; 0.5 1 0.5],
    zero outside the image.

    Every [H, W] map runs on its own (its parameters are Python numbers) through all iterations
    on preallocated buffers, so the working set of one map stays in the CPU cache; the linking
    sum is shift-and-add on a zero-bordered copy of Y: sum W Y = 2 ((v v^T) * Y - Y) with
    v = [0.5, 1, 0.5]. The counts are bit-identical to a whole-tensor formulation of the same
    equations (the operations and their rounding are the same), about 2.5x faster on one thread."""
    s = torch.where(s < 1e-12, torch.zeros_like(s), s)  # no denormals in U
    decay_f, decay_e, lam, v_e = pa_pcnn_parameters(s)
    if s.device.type != "cpu":  # on GPUs one launch per map and step would cost more than it saves
        return _firing_counts_all_maps(s, decay_f, decay_e, lam, v_e, iterations)
    n, k, h, w = s.shape
    maps = s.reshape(n * k, h, w)
    lam_s2 = (2.0 * lam * s).reshape(n * k, h, w)  # x2 because the link buffer holds half the sum
    params = torch.cat([decay_f, decay_e, v_e], dim=2).reshape(n * k, 3).tolist()
    counts = torch.zeros(n * k, h, w, dtype=s.dtype, device=s.device)
    y_pad = torch.zeros(h + 2, w + 2, dtype=s.dtype, device=s.device)  # Y with a zero border
    y = y_pad[1:-1, 1:-1]
    rows = torch.empty(h + 2, w, dtype=s.dtype, device=s.device)
    link = torch.empty(h, w, dtype=s.dtype, device=s.device)
    u = torch.empty(h, w, dtype=s.dtype, device=s.device)
    e = torch.empty(h, w, dtype=s.dtype, device=s.device)
    for m in range(n * k):
        heartbeat()                                    # one map: a few ms; a slice: up to a second
        s_m, lam_s2_m, count = maps[m], lam_s2[m], counts[m]
        df, de, ve = params[m]
        u.zero_()
        e.zero_()
        y_pad.zero_()
        for _ in range(iterations):
            # link = (v v^T) * Y - Y = half the weighted sum of the eight neighbours
            torch.add(y_pad[:, 1:-1], torch.add(y_pad[:, :-2], y_pad[:, 2:], out=rows), alpha=0.5, out=rows)
            torch.add(rows[1:-1], torch.add(rows[:-2], rows[2:], out=link), alpha=0.5, out=link)
            link.sub_(y)
            torch.addcmul(s_m, lam_s2_m, link, out=link)  # feeding + linking input S (1 + lambda L)
            u.mul_(df).add_(link)
            torch.gt(u, e, out=y)
            # E only decays where nothing fires; the floor keeps it out of the (slow) denormal range
            e.mul_(de).add_(y, alpha=ve).clamp_min_(1e-30)
            count.add_(y)
    return counts.view(n, k, h, w)


def _firing_counts_all_maps(s, decay_f, decay_e, lam, v_e, iterations: int) -> torch.Tensor:
    """The same PCNN on all maps at once (whole-tensor operations; used on GPUs)."""
    lam_s2 = 2.0 * lam * s
    u = torch.zeros_like(s)
    e = torch.zeros_like(s)
    y_pad = torch.zeros(*s.shape[:2], s.shape[2] + 2, s.shape[3] + 2, dtype=s.dtype, device=s.device)
    y = y_pad[..., 1:-1, 1:-1]
    counts = torch.zeros_like(s)
    v_e = v_e.expand_as(e)
    for _ in range(iterations):
        heartbeat()
        rows = torch.add(y_pad[..., 1:-1], y_pad[..., :-2] + y_pad[..., 2:], alpha=0.5)
        link = torch.add(rows[..., 1:-1, :], rows[..., :-2, :] + rows[..., 2:, :], alpha=0.5).sub_(y)
        u.mul_(decay_f).add_(torch.addcmul(s, lam_s2, link))
        y.copy_(u > e)
        e.mul_(decay_e).addcmul_(v_e, y).clamp_min_(1e-30)
        counts.add_(y)
    return counts


def fuse_nsst_papcnn(a: torch.Tensor, b: torch.Tensor, directions: tuple[int, ...] = NSST_DIRECTIONS,
                     iterations: int = PCNN_ITERATIONS) -> torch.Tensor:
    """NSST-PAPCNN fusion of a, b [B,1,H,W] in [0,1] -> [B,1,H,W].

    Parameters: 4 NSST levels with ``directions`` (finest first, default 8, 8, 4, 4), Meyer
    wedge roll-off of half a wedge, 16-pixel reflect padding; low-pass by WLE x WSEML (3x3 weights); high-pass by
    PA-PCNN firing counts over ``iterations`` steps (default 50; the paper runs 110).
    """
    ba = decompose(a, directions, SHEAR_TRANSITION)
    bb = decompose(b, directions, SHEAR_TRANSITION)
    low_a, low_b = ba[:, -1:], bb[:, -1:]
    low = torch.where(wle_wseml(low_a) >= wle_wseml(low_b), low_a, low_b)
    ha, hb = ba[:, :-1], bb[:, :-1]
    scale = torch.maximum(ha.abs().amax(dim=(2, 3), keepdim=True),
                          hb.abs().amax(dim=(2, 3), keepdim=True)).clamp_min(1e-12)
    counts = pa_pcnn_firing_counts(torch.cat([ha.abs() / scale, hb.abs() / scale], dim=1), iterations)
    nb = ha.shape[1]
    high = torch.where(counts[:, :nb] >= counts[:, nb:], ha, hb)
    return (high.sum(dim=1, keepdim=True) + low).clamp(0.0, 1.0)


register_function("nsst_papcnn", fuse_nsst_papcnn, bytes_per_pixel=4 * 600)   # texts: options.METHODS
