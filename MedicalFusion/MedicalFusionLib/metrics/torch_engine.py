"""The metrics engine, in torch: the 16 metrics of the table (:mod:`MedicalFusionLib.metrics`) for
every slice of a volume at once, and the colour fidelity.

:func:`volume_metrics_torch` returns ``{key: (mean, std, n_slices)}`` over the non-empty slices,
computed on the fusion's device (CUDA, Apple MPS or the CPU, chosen as the engine chooses), for
batches of slices at a time, in one pass over the volume, with a cancel check and a progress
report at least every few tens of milliseconds. The
pipeline, ``medicalfusion evaluate`` (the published tables), training's test-split scores and the
cohort all use it. Its independent reference, in numpy/scipy/scikit-image, is test code
(Testing/Python/reference_metrics.py); the tests compare the two on real and synthetic volumes
within the tolerances that docs/EVALUATION.md states, and docs/BENCHMARKS.md (section 'metrics')
lists the largest difference measured per metric.

:func:`colour_metrics_torch` adds the colour fidelity of a fused volume (CIELAB hue error, chroma
kept and the uptake read back from the colour, against the functional's own colour; metrics.COLOUR_METRICS),
which the grayscale metrics cannot see; its independent reference (scikit-image's rgb2lab) is in
Testing/Python/metrics/test_colour_fidelity.py.

Where the time goes and how it is saved:

- **Exact integer statistics.** Inputs are 8-bit, so EN, MI, ARI (one ``bincount`` of all slices'
  joint gray levels, each slice offset by 65536), SD, SF, PSNR, CC and SCD (per-slice integer sums
  of f, a, b, f^2, a^2, b^2, fa, fb, ab and of the squared first differences) and SSIM's 7x7 window
  sums (int32 additions, 2 + 2 -> 4, 4 + 2 -> 6, 6 + 1 -> 7 along each axis: no rounding at all)
  are exact; only the final formula is floating point (float64 on the CPU and CUDA). Per-slice sums
  add each row in int32 (no overflow possible for 8-bit squares on rows under 33026 pixels) and
  then the rows in int64, rather than widening every product to int64 first.
- **VIF** filters all of a scale's eight maps (F, A, B, F^2, A^2, B^2, AF, BF) as channels of one
  depthwise separable convolution in float32 (float64 convolution is several times slower on the
  CPU); the clamps of the formula are masks, not branches, and it runs in place.
- **Cache-sized chunks.** SSIM and VIF's first scale make many passes over per-pixel maps; they
  run on one 256x256 slice at a time (:data:`CACHE_PIXELS`), so the maps stay in the CPU cache
  between the passes (SSIM's window sums: 6x faster than on batches of four slices on the 2-core
  machine). VIF's scales 2-4 run on the whole batch's decimated images at once (on single slices
  their small convolutions cost mostly per-call overheads).
- **Both cores, no intra-op threads.** On a CPU with several torch threads the groups of metrics
  run on a pool of one-thread workers (:func:`cpu_workers`); the pipeline also gives that pool a
  slab's colour metrics, which then run beside the slices' metrics.
- **Colour fidelity** is computed once per distinct colour, not per voxel: the source's a*, b* and
  C* from the colour bar's entries, the fused colours' a*, b*, C* and nearest bar entry from a
  table of the 2^24 RGB colours filled as colours appear (a fused volume has tens of thousands of
  colours for millions of coloured voxels); per voxel only look-ups, the hue angle and the ratio
  remain; the read-back medians come from counts of the errors.
- **Fewer passes, same arithmetic.** In-place operations and results written into preallocated
  maps; where the values depend on float32 rounding (VIF's variances: a fused multiply-add there
  moves VIF by 5e-4) every rounding step is kept as it was, so the values are those of the
  straightforward formulas to the bit.
- **FMI** (fast-FMI with 3x3 windows, the heaviest metric by far) never builds the 9x9 joint
  distribution of a window pair. The Frechet bound's cells are nonzero only on a monotone
  "staircase" of at most 17 cells (the merge of the two 9-step cdfs), so the joint entropy is the
  closed-form entropy of the independent part, ``(1 - t)(H(p) + H(q)) - (1 - t) log2 |1 - t|``,
  plus a correction on those 17 cells; the staircase is walked for all window pairs at once on
  exact integer keys (cdf numerators cross-multiplied), and the bound's covariance comes from the
  same 17 cells. Windows that are constant or identical are settled without any of this, as in
  the reference.

Memory: slices are processed in batches of at most :data:`BATCH_PIXELS` pixels (about 150 bytes of
working memory per pixel, so ~40 MB), FMI window pairs in chunks of :data:`FMI_CHUNK`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import colour as _colour

from ..device import cpu_workers, pick_device  # noqa: F401  (cpu_workers: callers import it from here too)
from ..errors import FusionError
from . import (
    PSNR_CAP, QABF_ORIENTATION, QABF_STRENGTH, VIF_EPS, VIF_NOISE_VAR, check_keys, summarise, vif_window,
    volume_slices,
)
from ..progress import CancelFn, Progress, ProgressFn

logger = logging.getLogger(__name__)

#: Pixels (slices x height x width) per batch of slices.
BATCH_PIXELS = 1 << 18
#: Pixels per chunk of a batch for the computations that make many passes over per-pixel maps
#: (their working set, a few MB, stays in the CPU cache): one 256x256 slice.
CACHE_PIXELS = 1 << 16
#: FMI window pairs per chunk (keeps the walk's arrays in the CPU cache).
FMI_CHUNK = 4096
#: scikit-image's structural_similarity defaults: 7x7 uniform window, K1, K2, data range 255.
SSIM_WINDOW, SSIM_C1, SSIM_C2 = 7, (0.01 * 255) ** 2, (0.03 * 255) ** 2

_GROUPS = {   # metric key -> the computation that produces it
    "EN": "hist", "MI_bits": "hist", "MI_nats": "hist", "ARI": "hist",
    "SD": "moments", "SF": "moments", "AG": "moments", "PSNR": "moments", "CC": "moments", "SCD": "moments",
    "SSIM_avg": "ssim", "SSIM_sum": "ssim", "VIF": "vif", "Qabf": "qabf",
    "FMI_pixel": "fmi_pixel", "FMI_gradient": "fmi_gradient",
}
# relative cost of each computation (per pixel, CPU), to spread progress over a batch
_COST = {"hist": 1.0, "moments": 1.0, "ssim": 1.5, "vif": 6.0, "qabf": 2.0, "fmi_pixel": 20.0, "fmi_gradient": 20.0}


def _acc_dtype(device: torch.device) -> torch.dtype:
    """Accumulation dtype of per-slice sums (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` for the per-pixel maps of one computation (``name``), kept per thread
    and reused from call to call (its contents are whatever the last call left). The metrics'
    large temporaries are a few MB each; memory freshly obtained for each, which the allocator
    returns to the operating system in between, costs a page fault per 4 kB on every call
    (measured: SSIM's window sums 2.5x slower into new memory than into reused). A thread keeps
    the largest map of each name (SSIM's five: about 10 MB for 256x256 slices, 40 MB for 512x512);
    the pool's worker threads drop theirs when they end."""
    cache = getattr(_SCRATCH, "tensors", None)
    if cache is None:
        cache = _SCRATCH.tensors = {}
    numel = math.prod(shape)
    key = (name, dtype, device, torch.is_inference_mode_enabled())
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def _slice_sum(x: torch.Tensor) -> torch.Tensor:
    """Per-slice sum of a [S, ...] tensor, in float64 where the device has it, on the CPU."""
    return x.reshape(x.shape[0], -1).sum(1, dtype=_acc_dtype(x.device)).cpu().double()


def _int_sum(x: torch.Tensor, bound: int = 255 * 255) -> np.ndarray:
    """Per-slice exact sum of an integer [S, ...] tensor whose values are at most ``bound`` in
    magnitude, as int64 numpy: the rows of the last axis summed in int32 when they cannot overflow
    it, then the row sums in int64 (summing the whole tensor in int64 first widens a copy of it)."""
    if x.dim() > 2 and x.shape[-1] * bound < 2 ** 31:
        x = x.sum(-1, dtype=torch.int32)
    return x.reshape(x.shape[0], -1).sum(1, dtype=torch.int64).cpu().numpy()


# --------------------------------------------------------------------------------------------------
# histograms: EN, MI, ARI

def _joint_keys(f: torch.Tensor) -> torch.Tensor:
    """``slice << 16 | f << 8`` per pixel of a uint8 [S, H, W] tensor (int32 while it fits): made once,
    the key of a pixel's bin in each joint histogram with F once the other image's level is added."""
    s = f.shape[0]
    dtype = torch.int32 if s <= 1 << 14 else torch.int64
    offset = (torch.arange(s, device=f.device, dtype=dtype) << 16).view(s, 1, 1)
    return torch.mul(f.to(dtype), 256).add_(offset)


def _joint_histograms(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[S, 256 (f), 256 (x)] joint gray-level counts of each slice, one bincount for all slices (CPU
    int64); ``keys`` from :func:`_joint_keys` of F."""
    s = keys.shape[0]
    return torch.bincount(torch.add(keys, x).view(-1), minlength=s << 16).view(s, 256, 256).cpu()


class _NLogN:
    """sum of k ln k over integer counts k <= n, from a table (a gather is cheaper than a log)."""

    def __init__(self, n: int):
        k = torch.arange(n + 1, dtype=torch.float64)
        self.table = torch.xlogy(k, k)

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        flat = counts.reshape(counts.shape[0], -1)
        return self.table.index_select(0, flat.reshape(-1)).view(flat.shape).sum(1)


def _mi_nats(joint: torch.Tensor, n: int, nlogn: _NLogN) -> torch.Tensor:
    """MI from counts: (sum n_ij ln n_ij - sum n_i ln n_i - sum n_j ln n_j) / n + ln n, at least 0."""
    mi = (nlogn(joint) - nlogn(joint.sum(2)) - nlogn(joint.sum(1))) / n + math.log(n)
    return mi.clamp_min(0.0)


def _ari(joint: torch.Tensor, n: int) -> torch.Tensor:
    """Adjusted Rand index from contingency tables, scikit-learn's conventions (see metrics.ari);
    the pair counts are exact integers."""
    sum_sq = (joint * joint).sum((1, 2))
    a, b = joint.sum(2), joint.sum(1)
    tp = (sum_sq - n).double()
    fp = ((b * b).sum(1) - sum_sq).double()
    fn = ((a * a).sum(1) - sum_sq).double()
    tn = float(n * n) - fp - fn - sum_sq.double()
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    out = torch.where(den != 0, 2.0 * (tp * tn - fn * fp) / torch.where(den != 0, den, 1.0), torch.zeros_like(den))
    return torch.where((fn == 0) & (fp == 0), torch.ones_like(out), out)


def _hist_metrics(a, b, f) -> dict[str, np.ndarray]:
    n = int(f.shape[1] * f.shape[2])
    nlogn = _NLogN(n)
    keys = _joint_keys(f)
    ja, jb = _joint_histograms(a, keys), _joint_histograms(b, keys)
    del keys
    en = (math.log(n) - nlogn(ja.sum(2)) / n) / math.log(2.0)    # -sum p log2 p, p = counts / n
    mi = _mi_nats(ja, n, nlogn) + _mi_nats(jb, n, nlogn)
    return {"EN": en.numpy(), "MI_nats": mi.numpy(), "MI_bits": (mi / math.log(2.0)).numpy(),
            "ARI": (0.5 * (_ari(ja, n) + _ari(jb, n))).numpy()}


# --------------------------------------------------------------------------------------------------
# moments: SD, SF, AG, PSNR, CC, SCD

def _doubled_gradient(x: torch.Tensor, dim: int) -> torch.Tensor:
    """2 x numpy.gradient(x, axis=dim) of an integer-valued [S, H, W] tensor (int16, int32, or
    float32 holding small integers: exact in each; central differences inside, one-sided
    differences, doubled, on the first and last row/column)."""
    g = torch.empty_like(x)
    n = x.shape[dim]
    torch.sub(x.narrow(dim, 2, n - 2), x.narrow(dim, 0, n - 2), out=g.narrow(dim, 1, n - 2))
    g.narrow(dim, 0, 1).copy_(2 * (x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)))
    g.narrow(dim, n - 1, 1).copy_(2 * (x.narrow(dim, n - 1, 1) - x.narrow(dim, n - 2, 1)))
    return g


def _corr_from_sums(n, sx, sy, sxx, syy, sxy) -> np.ndarray:
    """Pearson correlation from exact integer sums (int64 numerators); 0 where either is constant."""
    vx = (n * sxx - sx * sx).astype(np.float64)
    vy = (n * syy - sy * sy).astype(np.float64)
    cov = (n * sxy - sx * sy).astype(np.float64)
    den = np.sqrt(vx) * np.sqrt(vy)
    return np.where(den > 0, cov / np.where(den > 0, den, 1.0), 0.0)


def _moment_metrics(a, b, f) -> dict[str, np.ndarray]:
    h, w = f.shape[1], f.shape[2]
    n = h * w
    fi, ai, bi = f.to(torch.int32), a.to(torch.int32), b.to(torch.int32)
    prod = torch.empty_like(fi)

    def sum_of_products(x, y) -> np.ndarray:
        return _int_sum(torch.mul(x, y, out=prod))

    sf, sa, sb = _int_sum(fi), _int_sum(ai), _int_sum(bi)
    sff, saa, sbb = sum_of_products(fi, fi), sum_of_products(ai, ai), sum_of_products(bi, bi)
    sfa, sfb, sab = sum_of_products(fi, ai), sum_of_products(fi, bi), sum_of_products(ai, bi)
    out: dict[str, np.ndarray] = {}
    out["SD"] = np.sqrt((n * sff - sf * sf).astype(np.float64)) / n

    def squared_differences(dim: int) -> np.ndarray:
        d = torch.sub(fi.narrow(dim, 1, fi.shape[dim] - 1), fi.narrow(dim, 0, fi.shape[dim] - 1))
        return _int_sum(d.mul_(d))

    rf2 = squared_differences(2) / (h * (w - 1)) if w > 1 else np.zeros(len(sf))
    cf2 = squared_differences(1) / ((h - 1) * w) if h > 1 else np.zeros(len(sf))
    out["SF"] = np.sqrt(rf2 + cf2)
    if min(h, w) < 2:
        out["AG"] = np.zeros(len(sf))
    else:
        # float32 from the start: the doubled gradients and their squares' sums are integers below
        # 2^24, exact, so sqrt sees the same numbers as from int32 (two int32 passes saved)
        ff = f.to(torch.float32)
        gx, gy = _doubled_gradient(ff, 2), _doubled_gradient(ff, 1)
        del ff
        g = gx.mul_(gx).addcmul_(gy, gy).sqrt_()
        out["AG"] = (_slice_sum(g) / math.sqrt(8.0) / n).numpy()
    # PSNR: MSE = (sum (f-a)^2 + sum (f-b)^2) / (2n), peak max(F)
    mse = ((sff - 2 * sfa + saa) + (sff - 2 * sfb + sbb)).astype(np.float64) / (2.0 * n)
    peak = f.reshape(f.shape[0], -1).amax(1).cpu().numpy().astype(np.float64)
    with np.errstate(divide="ignore"):
        psnr = np.minimum(PSNR_CAP, 10.0 * np.log10(peak * peak / np.where(mse > 0, mse, 1.0)))
    out["PSNR"] = np.where(mse == 0, PSNR_CAP, np.where(peak == 0, 0.0, psnr))
    out["CC"] = 0.5 * (_corr_from_sums(n, sf, sa, sff, saa, sfa) + _corr_from_sums(n, sf, sb, sff, sbb, sfb))
    # SCD = r(F - B, A) + r(F - A, B), from the same sums
    r1 = _corr_from_sums(n, sf - sb, sa, sff - 2 * sfb + sbb, saa, sfa - sab)
    r2 = _corr_from_sums(n, sf - sa, sb, sff - 2 * sfa + saa, sbb, sfb - sab)
    out["SCD"] = r1 + r2
    return out


# --------------------------------------------------------------------------------------------------
# SSIM (scikit-image's structural_similarity, data_range 255, 7x7 uniform window, sample covariance)

def _box7(x: torch.Tensor, dim: int, name: str = "box") -> torch.Tensor:
    """'valid' sums of 7 consecutive entries along ``dim`` (exact for integers): 4 additions, 2 + 2 -> 4,
    4 + 2 -> 6, 6 + 1 -> 7, instead of a 7-tap convolution; into scratch maps ``name`` (:func:`_scratch`)."""
    n = x.shape[dim]

    def shape(m: int) -> tuple[int, ...]:
        return x.shape[:dim] + (m,) + x.shape[dim + 1:]

    s2 = torch.add(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1),
                   out=_scratch(name + "2", shape(n - 1), x.dtype, x.device))
    s4 = torch.add(s2.narrow(dim, 0, n - 3), s2.narrow(dim, 2, n - 3),
                   out=_scratch(name + "4", shape(n - 3), x.dtype, x.device))
    s4 = s4.narrow(dim, 0, n - 5).add_(s2.narrow(dim, 4, n - 5))
    return s4.narrow(dim, 0, n - 6).add_(x.narrow(dim, 6, n - 6))


def _in_cache_chunks(fn: Callable) -> Callable:
    """``fn(a, b, f)`` run on chunks of at most :data:`CACHE_PIXELS` pixels of the batch (whole
    slices), the per-slice results put together: for a computation that makes several passes over
    per-pixel maps, the chunk's maps stay in the CPU cache between passes (measured: SSIM's window
    sums 6x faster on single 256x256 slices than on batches of four). The values do not change."""

    def chunked(a, b, f) -> dict[str, np.ndarray]:
        step = max(1, CACHE_PIXELS // max(1, f.shape[1] * f.shape[2]))
        if f.shape[0] <= step:
            return fn(a, b, f)
        parts = [fn(a[i:i + step], b[i:i + step], f[i:i + step]) for i in range(0, f.shape[0], step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    chunked.__doc__ = fn.__doc__
    return chunked


@_in_cache_chunks
def _ssim_metrics(a, b, f) -> dict[str, np.ndarray]:
    k = SSIM_WINDOW
    if min(f.shape[1], f.shape[2]) < k:
        raise FusionError(f"SSIM needs slices of at least {k}x{k} pixels, got {tuple(f.shape[1:])}")
    npix = k * k
    maps = _scratch("ssim", (f.shape[0], 8) + f.shape[1:], torch.int32, f.device)     # F A B, F2 A2 B2, AF BF
    for c, x in enumerate((f, a, b)):
        maps[:, c].copy_(x)
    torch.mul(maps[:, :3], maps[:, :3], out=maps[:, 3:6])
    torch.mul(maps[:, 1:3], maps[:, :1], out=maps[:, 6:8])
    # 7x7 window sums over the valid region, exact in int32 (at most 49 x 255^2)
    sums = _box7(_box7(maps, 3, "ssim-rows"), 2, "ssim-columns")   # rows first: faster (same integers)
    del maps
    s_f, s_ff = sums[:, 0], sums[:, 3]
    u_f = s_f.to(torch.float32).div_(npix)
    norm = 1.0 / (npix * (npix - 1))        # cov_norm NP/(NP-1) over NP^2

    def variance(s_xy, s_x, s_y) -> torch.Tensor:    # from exact integer numerators
        return (npix * s_xy).sub_(s_x * s_y).to(torch.float32).mul_(norm)

    v_f = variance(s_ff, s_f, s_f)
    # the terms of F, used for both sources: 2 u_f and u_f^2 (the same roundings as in the formula)
    u_f2, u_ff = u_f * 2.0, u_f * u_f
    count = float(s_f.shape[1] * s_f.shape[2])
    total = torch.zeros(f.shape[0], dtype=torch.float64)
    for c in (1, 2):
        s_x, s_xx, s_fx = sums[:, c], sums[:, 3 + c], sums[:, 5 + c]
        u_x = s_x.to(torch.float32).div_(npix)
        v_x, v_fx = variance(s_xx, s_x, s_x), variance(s_fx, s_f, s_x)
        # (2 u_f u_x + C1)(2 v_fx + C2) / ((u_f^2 + u_x^2 + C1)(v_f + v_x + C2)), in place
        num = torch.mul(u_f2, u_x).add_(SSIM_C1).mul_(v_fx.mul_(2.0).add_(SSIM_C2))
        den = u_x.mul_(u_x).add_(u_ff).add_(SSIM_C1).mul_(v_x.add_(v_f).add_(SSIM_C2))
        total += _slice_sum(num.div_(den)) / count
    return {"SSIM_sum": total.numpy(), "SSIM_avg": (total / 2.0).numpy()}


# --------------------------------------------------------------------------------------------------
# VIF (multi-scale pixel-domain, as metrics.vif)

def _separable(x: torch.Tensor, g: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """'valid' correlation of every channel of [S, C, H, W] with g g^T (depthwise), optional stride."""
    c, n = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, n, 1).expand(c, 1, n, 1), stride=(stride, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, n).expand(c, 1, 1, n), stride=(1, stride), groups=c)


def _vif_scale(images: torch.Tensor, g: torch.Tensor, sums: torch.Tensor) -> None:
    """Add one scale's per-slice sums of log10(1 + num) and log10(1 + den) terms ([S, 2 (num, den),
    2 (A, B)]) for ``images`` [S, 3 (D, A, B), H, W] (float32) filtered with the window g g^T."""
    s = images.shape[0]
    # the eight maps D A B, D2 A2 B2, AD BD written into one tensor, filtered as its channels
    maps = images.new_empty((s, 8) + images.shape[2:])
    maps[:, :3] = images
    torch.mul(images, images, out=maps[:, 3:6])
    torch.mul(images[:, 1:], images[:, :1], out=maps[:, 6:8])
    mu = _separable(maps, g)
    del maps
    # in place: channels 3..5 become the variances of D, A, B, channels 6..7 the covariances AD, BD
    mu[:, 3:6] -= mu[:, :3] * mu[:, :3]         # rounded product, then the difference (not a fused
    mu[:, 3:6].clamp_min_(0.0)                  # multiply-add: the variances' cancellation shows it)
    mu[:, 6:8] -= mu[:, 1:3] * mu[:, :1]
    var_d, var_r, cov = mu[:, 3:4], mu[:, 4:6], mu[:, 6:8]
    gain = torch.add(var_r, VIF_EPS)
    torch.div(cov, gain, out=gain).clamp_min_(0.0)          # a negative gain is not valid: 0
    valid = var_d >= VIF_EPS
    valid = valid & (var_r >= VIF_EPS)
    gain.mul_(valid)                                         # 0 where not valid (var_r + eps > 0: finite)
    terms = mu.new_empty((s, 2, 2) + mu.shape[2:])          # num, den per source; log10(1 + x) of each
    var_n = torch.addcmul(var_d, gain, cov, value=-1.0).clamp_min_(VIF_EPS)
    var_n += VIF_NOISE_VAR
    torch.mul(gain, gain, out=terms[:, 0])
    terms[:, 0] *= var_r
    terms[:, 0] /= var_n
    # den: var_r / sigma_n^2 where var_r >= eps; below it var_r / 2 < 5e-11 and 1 + that is 1 in
    # float32 (its log 0), as the mask gives: no mask needed
    torch.div(var_r, VIF_NOISE_VAR, out=terms[:, 1])
    terms += 1.0
    terms.log10_()
    sums += terms.sum((3, 4), dtype=_acc_dtype(images.device)).cpu().double()


def _vif_metrics(a, b, f) -> dict[str, np.ndarray]:
    """VIF of a batch: scale 1 (the 17-tap window over full-size maps, most of the work) on one
    cache-sized chunk of slices at a time (:data:`CACHE_PIXELS`), then the decimated images of the
    whole batch through scales 2..4 together (their maps are small: per-call overheads, not the
    cache, dominate there). Each slice's values are those of computing it alone."""
    s = f.shape[0]
    sums = torch.zeros(s, 2, 2, dtype=torch.float64)            # [slice, num/den, A/B]
    g1 = torch.from_numpy(vif_window(1)).to(device=f.device, dtype=torch.float32)
    g2 = torch.from_numpy(vif_window(2)).to(device=f.device, dtype=torch.float32)
    if min(f.shape[1], f.shape[2]) < g1.numel():            # smaller than the first window: no scale
        return {"VIF": np.full(s, 2.0)}
    step = max(1, CACHE_PIXELS // max(1, f.shape[1] * f.shape[2]))
    images = torch.empty((s, 3) + f.shape[1:], dtype=torch.float32, device=f.device)   # D, A, B
    for c, x in enumerate((f, a, b)):
        images[:, c].copy_(x)
    for i in range(0, s, step):
        _vif_scale(images[i:i + step], g1, sums[i:i + step])
    images = _separable(images, g2, 2)                      # scale 2's images, the whole batch at once
    for scale in range(2, 5):
        g = g2 if scale == 2 else torch.from_numpy(vif_window(scale)).to(device=f.device, dtype=torch.float32)
        if scale > 2:
            images = _separable(images, g, 2)
        if min(images.shape[2], images.shape[3]) < g.numel():
            break
        _vif_scale(images, g, sums)
    nums, dens = sums[:, 0], sums[:, 1]
    vif = torch.where(dens > 0, nums / torch.where(dens > 0, dens, torch.ones_like(dens)), torch.ones_like(dens))
    return {"VIF": vif.sum(1).numpy()}


# --------------------------------------------------------------------------------------------------
# Qabf

def _sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strength and orientation of scipy.ndimage.convolve with the Sobel kernels (zero padding),
    as separable integer sums: sx[i, j] = v[i, j-1] - v[i, j+1] with v the [1 2 1] sum down the
    rows, sy[i, j] = h[i+1, j] - h[i-1, j] with h the [1 2 1] sum along the rows (int16: |sx|, |sy|
    <= 4 x 255 x 2), then float32 (exact)."""
    p = F.pad(x.to(torch.int16), (1, 1, 1, 1))
    mid = p[:, 1:-1] * 2
    mid += p[:, :-2]
    mid += p[:, 2:]                                                    # [1 2 1] down the rows
    sx = (mid[..., :-2] - mid[..., 2:]).to(torch.float32)
    mid = p[..., 1:-1] * 2
    mid += p[..., :-2]
    mid += p[..., 2:]                                                  # [1 2 1] along the rows
    sy = (mid[:, 2:] - mid[:, :-2]).to(torch.float32)
    del mid, p
    g = torch.mul(sx, sx).addcmul_(sy, sy).sqrt_()
    # sx = 0: pi / 2, as atan(+inf): sy / 0 is +-inf or nan (sx != 0: |sy / sx| <= 1020, finite),
    # all made +inf (a pass; a mask of sx == 0 and a masked fill cost several)
    alpha = torch.atan_(sy.div_(sx).nan_to_num_(nan=math.inf, posinf=math.inf, neginf=math.inf))
    return g, alpha


def _edge_preservation(g_x, a_x, g_f, a_f) -> torch.Tensor:
    tg, kg, dg = QABF_STRENGTH
    ta, ka, da = QABF_ORIENTATION
    rel_g = torch.minimum(g_x, g_f).div_(torch.maximum(g_x, g_f)).nan_to_num_(nan=1.0)  # both 0 (0 / 0): 1
    # T / (1 + exp(k (x - D))) = T sigmoid(-k (x - D)), one pass each, in place
    q = torch.sigmoid_(rel_g.sub_(dg).mul_(-kg)).mul_(tg)
    rel_a = torch.sub(a_x, a_f).abs_().mul_(-1.0 / (math.pi / 2)).add_(1.0 - da).mul_(-ka)
    return q.mul_(torch.sigmoid_(rel_a)).mul_(ta)


def _qabf_metrics(a, b, f) -> dict[str, np.ndarray]:
    g_f, a_f = _sobel(f)
    num = torch.zeros(f.shape[0], dtype=torch.float64)
    den = torch.zeros(f.shape[0], dtype=torch.float64)
    for x in (a, b):
        g_x, a_x = _sobel(x)
        num += _slice_sum(_edge_preservation(g_x, a_x, g_f, a_f).mul_(g_x))
        den += _slice_sum(g_x)
    return {"Qabf": torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                                torch.zeros_like(den)).numpy()}


# --------------------------------------------------------------------------------------------------
# FMI: fast-FMI with 3x3 windows (see metrics.feature_mutual_information)

# Window pairs are packed into int64 words, one per cdf step, so that the staircase walk moves one
# word per list and step. Little-endian int16 lanes of a word: [value, tag << 8 | weight, key (int32)];
# the key is the cdf numerator cross-multiplied by the other window's sum, so that comparing words
# compares cdf values exactly (equal cdf values: the tag puts Q's step first). The lanes are read
# back as strided int16/int32 views, without shifts or masks.
_TAG = 1 << 8
_LITTLE_ENDIAN = sys.byteorder == "little"
_TINY = 1e-30


def _feature(x: torch.Tensor, feature: str) -> torch.Tensor:
    """FMI feature map as exact integers (int16): the pixels, or 2 x the horizontal numpy.gradient."""
    x = x.to(torch.int16)
    if feature == "pixel":
        return x
    return _doubled_gradient(x, 2)


def _window_rows(v: torch.Tensor) -> torch.Tensor:
    """[L, 9] values of every 3x3 window fully inside each slice, flattened column by column."""
    s, h, w = v.shape
    return torch.stack([v[:, r:r + h - 2, c:c + w - 2] for c in range(3) for r in range(3)], dim=-1).reshape(-1, 9)


def _window_range(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = v.to(torch.float32).unsqueeze(1)
    return F.max_pool2d(x, 3, 1)[:, 0], -F.max_pool2d(-x, 3, 1)[:, 0]


def _lanes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """An int64 [..., n] tensor's 16- or 32-bit lanes, low first: [..., n, 64 // bits] (a view)."""
    dtype = torch.int16 if bits == 16 else torch.int32
    if _LITTLE_ENDIAN:
        return words.view(dtype).view(*words.shape, 64 // bits)
    parts = [(words >> (bits * i)) & ((1 << bits) - 1) for i in range(64 // bits)]
    return torch.stack(parts, -1).to(dtype)


def _cdf_numerators(d: torch.Tensor) -> torch.Tensor:
    """Cumulative sums down the 9 rows of an int32 [9, n] tensor (row by row: torch.cumsum along
    the first axis is several times slower)."""
    out = torch.empty_like(d)
    out[0] = d[0]
    for r in range(1, d.shape[0]):
        torch.add(out[r - 1], d[r], out=out[r])
    return out


def _pack(keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """Pack int32 keys, values (< 2^15) and int16 weights ([9, n] or [9, 1]) into int64 words ``out``."""
    if _LITTLE_ENDIAN:
        lanes16, lanes32 = out.view(torch.int16).view(*out.shape, 4), out.view(torch.int32).view(*out.shape, 2)
        lanes16[..., 0] = values
        lanes16[..., 1] = weights
        lanes32[..., 1] = keys
    else:
        torch.bitwise_left_shift(keys.to(torch.int64), 32, out=out)
        out |= (weights.to(torch.int64) << 16) | values


def _fmi_pairs(vx: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
    """Normalised feature MI of [9, n] window pairs (integer values) that both vary and differ."""
    dev, n = vx.device, vx.shape[1]
    pos16 = torch.arange(1, 10, dtype=torch.int16, device=dev)[:, None]
    moments = torch.stack([torch.arange(1, 10), torch.arange(1, 10) ** 2]).to(device=dev, dtype=torch.float32)
    dx = vx.to(torch.int32)
    dx -= dx.amin(0)
    df = vf.to(torch.int32)
    df -= df.amin(0)
    sx, sf = dx.sum(0, dtype=torch.int32), df.sum(0, dtype=torch.int32)
    num = 9 * (dx * df).sum(0, dtype=torch.int32) - sx * sf          # exact: |num| < 2^31
    var_x = 9 * (dx * dx).sum(0, dtype=torch.int32) - sx * sx
    var_f = 9 * (df * df).sum(0, dtype=torch.int32) - sf * sf
    c = num.double() / torch.sqrt(var_x.double() * var_f.double())  # Pearson r of the windows (= of p, q)
    # c < 0: the lower Frechet bound, i.e. the upper bound of q against the reversed p
    neg = num < 0
    negi = neg.to(torch.int32)
    dxo = dx + negi * (dx.flip(0) - dx)
    table = torch.empty(18, n, dtype=torch.int64, device=dev)
    kq = _cdf_numerators(df)
    kq *= sx                                                         # Q_i x Sx Sf
    d = sx * sf
    kq[8] = d + 1                                                    # sentinel: the walk never passes Q's end
    _pack(kq, df, pos16, table[:9])
    kp = _cdf_numerators(dxo)
    kp *= sf                                                         # P_j x Sx Sf
    # weight: the P cell's position in the original p (reversed for c < 0); the tag puts Q first on ties
    w_p = pos16 + negi.to(torch.int16) * (10 - 2 * pos16) + _TAG
    _pack(kp, dxo, w_p, table[9:])
    # The staircase: 17 cells (i, j), i + j = k; step k ends at min(Q_i, P_j) and moves past the smaller.
    flat = table.view(-1)
    heads_q = torch.empty(17, n, dtype=torch.int64, device=dev)
    heads_p = torch.empty(17, n, dtype=torch.int64, device=dev)
    heads_q[0], heads_p[0] = table[0], table[9]
    col = torch.arange(n, dtype=torch.int64, device=dev)
    at_q = col.clone()                              # flat index of Q_i: i n + col
    at_qp = col * 2 + 10 * n                        # + flat index of P_j (j = k + 1 - i): (10 + k) n + 2 col
    at_p = torch.empty_like(at_q)
    q_first = torch.empty(n, dtype=torch.bool, device=dev)
    for k in range(16):
        torch.lt(heads_q[k], heads_p[k], out=q_first)
        at_q.add_(q_first, alpha=n)
        torch.sub(at_qp, at_q, out=at_p)
        at_qp += n
        torch.index_select(flat, 0, at_q, out=heads_q[k + 1])
        torch.index_select(flat, 0, at_p, out=heads_p[k + 1])
    ends = _lanes(torch.minimum(heads_q, heads_p), 32)[..., 1]         # keys
    inv_d = 1.0 / d.double()
    inv_d32 = inv_d.to(torch.float32)
    cell_l = ends.to(torch.float32)
    cell_l[1:] -= cell_l[:-1].clone()
    cell_l *= inv_d32                                                # cell masses of the bound
    lanes_q, lanes_p = _lanes(heads_q, 16), _lanes(heads_p, 16)
    # Hoeffding: covariance of the positions under the bound = E_H[XY] - E_q[X] E_p[Y]
    weights = (lanes_q[..., 1] * (lanes_p[..., 1] - _TAG)).to(torch.float32)
    fdx, fdf = dx.to(torch.float32), df.to(torch.float32)
    mp, mq = (moments @ fdx).double(), (moments @ fdf).double()       # sum d pos, sum d pos^2 (exact)
    sxd, sfd = sx.double(), sf.double()
    var_p, var_q = sxd * mp[1] - mp[0] * mp[0], sfd * mq[1] - mq[0] * mq[0]   # x Sx^2, x Sf^2 (exact)
    cov = (cell_l * weights).sum(0).double() - mq[0] * mp[0] * inv_d
    ok = (var_p > 0) & (var_q > 0) & (num != 0) & (cov != 0)
    t = c * torch.sqrt(var_p.clamp_min(0) * var_q.clamp_min(0)) * inv_d / torch.where(ok, cov, torch.ones_like(cov))
    t = (t * ok).to(torch.float32)
    # H(p) + H(q) = log2(Sx Sf) - (sum dx log2 dx) / Sx - (sum df log2 df) / Sf
    h_sum = (torch.log2(d.to(torch.float32)) - (fdx * fdx.clamp_min(1.0).log2_()).sum(0) / sx.to(torch.float32)
             - (fdf * fdf.clamp_min(1.0).log2_()).sum(0) / sf.to(torch.float32))
    one_t = 1.0 - t
    # H(J), J = t dH + (1 - t) q p^T: all cells of (1 - t) q p^T in closed form, then the staircase
    independent = one_t * h_sum - one_t * torch.log2(one_t.abs() + _TINY)
    cell_i = lanes_q[..., 0].to(torch.float32)
    cell_i *= lanes_p[..., 0]
    cell_i *= inv_d32 * one_t
    cell_j = torch.addcmul(cell_i, cell_l, t)
    term_i = cell_i.abs()
    term_i += _TINY
    term_i.log2_()
    term_i *= cell_i
    term_j = cell_j.abs()
    term_j += _TINY
    term_j.log2_()
    term_j *= cell_j
    term_i -= term_j                                   # -J log|J| + I log|I| per staircase cell
    h_joint = independent + term_i.sum(0)
    mi = (h_sum - h_joint).double()
    h_sum = h_sum.double()
    return torch.where((mi != 0) & (h_sum > 0), 2.0 * mi / torch.where(h_sum > 0, h_sum, torch.ones_like(h_sum)),
                       torch.zeros_like(mi))


def _fmi_metric(a, b, f, feature: str, tick: Callable[[float], None], pool: ThreadPoolExecutor | None) -> np.ndarray:
    """Per-slice fast-FMI (FMI(A, F) + FMI(B, F)) / 2 with 3x3 windows; tick(fraction) between chunks.
    ``pool``: CPU worker threads that take the chunks (each runs torch ops on one thread)."""
    s, h, w = f.shape
    if min(h, w) < 3:
        raise FusionError(f"FMI needs slices of at least 3x3 pixels, got {(h, w)}")
    fv = _feature(f, feature)
    f_rows = _window_rows(fv)
    f_max, f_min = _window_range(fv)
    f_varies = f_max > f_min
    windows = (h - 2) * (w - 2)
    total = torch.zeros(s, dtype=torch.float64)
    for k, x in enumerate((a, b)):
        xv = _feature(x, feature)
        x_max, x_min = _window_range(xv)
        differ = F.max_pool2d((xv != fv).to(torch.float32).unsqueeze(1), 3, 1)[:, 0] > 0
        values = (~differ).to(_acc_dtype(f.device)).reshape(-1)        # identical windows: 1
        todo = torch.nonzero((differ & f_varies & (x_max > x_min)).reshape(-1))[:, 0]
        x_rows = _window_rows(xv)
        chunks = [todo[start:start + FMI_CHUNK] for start in range(0, todo.numel(), FMI_CHUNK)]

        def run(idx: torch.Tensor, x_rows=x_rows) -> torch.Tensor:
            with torch.inference_mode():
                return _fmi_pairs(x_rows.index_select(0, idx).t().contiguous(),
                                  f_rows.index_select(0, idx).t().contiguous())

        done = 0
        for idx, pairs in zip(chunks, pool.map(run, chunks) if pool is not None else map(run, chunks)):
            values[idx] = pairs.to(values.dtype)
            done += idx.numel()
            tick((k + done / max(1, todo.numel())) / 2)      # in the calling thread: safe for UI callbacks
        total += _slice_sum(values.view(s, windows)) / windows
        tick((k + 1) / 2)
    return (total / 2.0).numpy()


# --------------------------------------------------------------------------------------------------
# the volume

_SIMPLE = {"hist": _hist_metrics, "moments": _moment_metrics, "ssim": _ssim_metrics, "vif": _vif_metrics,
           "qabf": _qabf_metrics}


def _run(fn, *args):
    with torch.inference_mode():
        return fn(*args)


def _batch_metrics(a, b, f, groups: list[str], tick: Callable[[str, float], None],
                   pool: ThreadPoolExecutor | None = None) -> dict[str, np.ndarray]:
    """The metrics of one batch of slices. With a ``pool``, the per-pixel groups run on its workers
    while FMI's chunks follow them; ``tick`` is only ever called from this (the calling) thread."""
    out: dict[str, np.ndarray] = {}
    simple = [g for g in groups if g in _SIMPLE]
    pending = {g: pool.submit(_run, _SIMPLE[g], a, b, f) for g in simple} if pool is not None else {}
    for group in groups:
        if group in _SIMPLE and group not in pending:
            out.update(_SIMPLE[group](a, b, f))
            tick(group, 1.0)
        elif group not in _SIMPLE:
            feature = group.split("_", 1)[1]
            out[f"FMI_{feature}"] = _fmi_metric(a, b, f, feature, lambda frac, g=group: tick(g, frac), pool)
            tick(group, 1.0)
    for group, future in pending.items():
        out.update(future.result())
        tick(group, 1.0)
    return out


def volume_metrics_torch(a8: np.ndarray, b8: np.ndarray, f8: np.ndarray, axis: int = 0, keys: list[str] | None = None,
                         device: str | torch.device = "auto", progress: ProgressFn | None = None,
                         cancel: CancelFn | None = None,
                         batch_pixels: int = BATCH_PIXELS) -> dict[str, tuple[float, float, int]]:
    """Slice-wise metrics of a fused volume, ``{key: (mean, std, n_slices)}``, computed in torch.

    Same inputs, slices and values as ``volume_metrics`` of Testing/Python/reference_metrics.py (the numpy
    reference): a8, b8, f8 uint8 volumes of one shape (f8 may be RGB [..., 3]), slices along
    ``axis``, only the slices where a or b is nonzero. ``device``: 'auto' (CUDA, MPS, CPU) or a
    torch device. ``progress(done, total)`` and ``cancel() -> bool`` are called at least every few
    tens of milliseconds of work (cancel raises FusionCancelled). A device that cannot run an
    operation (an older MPS) falls back to the CPU with a logged warning.
    """
    return summarise(volume_metric_values_torch(a8, b8, f8, axis, keys, device, progress, cancel, batch_pixels))


def volume_metric_values_torch(a8: np.ndarray, b8: np.ndarray, f8: np.ndarray, axis: int = 0,
                               keys: list[str] | None = None, device: str | torch.device = "auto",
                               progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                               batch_pixels: int = BATCH_PIXELS, pool=None) -> dict[str, np.ndarray]:
    """:func:`volume_metrics_torch` before the summary: ``{key: value per non-empty slice}``, the
    slices in order. A slice's values do not depend on the other slices given with it, so the
    pipeline computes them slab by slab and summarises the concatenation. ``pool``: the workers of
    a :func:`cpu_workers` block the caller is in (None: this call sets up its own, on the CPU)."""
    a8, b8, f8, nonempty = volume_slices(a8, b8, f8, axis)
    keys = check_keys(keys)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    groups = [g for g in _COST if any(_GROUPS[k] == g for k in keys)]
    with Progress(progress, cancel, phases=(("metrics", 1.0),)) as tracker:
        tracker.phase("metrics")
        try:
            values = _volume_values(a8, b8, f8, nonempty, groups, dev, tracker, batch_pixels, pool)
        except (RuntimeError, NotImplementedError) as exc:
            if dev.type == "cpu":
                raise
            logger.warning("MedicalFusion: metrics on %s failed (%s); computing them on the CPU", dev, exc)
            values = _volume_values(a8, b8, f8, nonempty, groups, torch.device("cpu"), tracker, batch_pixels)
    return {k: values[k] for k in keys}


def _volume_values(a8, b8, f8, nonempty, groups, dev, tracker: Progress, batch_pixels: int,
                   pool=None) -> dict[str, np.ndarray]:
    h, w = a8.shape[1], a8.shape[2]
    per_batch = max(1, int(batch_pixels // max(1, h * w)))
    cost = sum(_COST[g] for g in groups)
    total = float(len(nonempty)) * cost
    done_before = {g: sum(_COST[x] for x in groups[:i]) for i, g in enumerate(groups)}
    parts: list[dict[str, np.ndarray]] = []
    workers = contextlib.nullcontext(pool) if pool is not None and dev.type == "cpu" else cpu_workers(dev)
    with workers as pool, torch.inference_mode():
        for start in range(0, len(nonempty), per_batch):
            idx = nonempty[start:start + per_batch]
            n = len(idx)
            a, b, f = (torch.from_numpy(np.ascontiguousarray(x[idx])).to(dev) for x in (a8, b8, f8))

            def tick(group: str, fraction: float, start=start, n=n) -> None:
                tracker.advance(start * cost + n * (done_before[group] + fraction * _COST[group]), total)

            parts.append(_batch_metrics(a, b, f, groups, tick, pool))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --------------------------------------------------------------------------------------------------
# colour fidelity (CIELAB): docs/EVALUATION.md, "Colour"

#: sRGB (D65) -> XYZ, the D65 white and BT.601 full-range YCbCr (centred Cb/Cr) -> RGB: the numbers of
#: MedicalFusionLib.colour (one source), as float64 tensors.
_XYZ_FROM_RGB = torch.tensor(_colour._XYZ_FROM_RGB, dtype=torch.float64)
_WHITE = torch.tensor(_colour._WHITE_D65, dtype=torch.float64)
_RGB_FROM_YCC = torch.tensor(_colour._YCC2RGB, dtype=torch.float64)


def rgb_to_lab_torch(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] ([..., 3], float) to CIELAB ([..., 3], float32; float64 in, float64 out)."""
    dtype = rgb.dtype if rgb.dtype == torch.float64 else torch.float32
    x = rgb.to(dtype)
    lin = torch.where(x > 0.04045, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = (lin @ _XYZ_FROM_RGB.to(device=x.device, dtype=dtype).T) / _WHITE.to(device=x.device, dtype=dtype)
    eps, kappa = _colour._LAB_EPS, _colour._LAB_KAPPA
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1.0 / 3.0), kappa * xyz + 16.0 / 116.0)
    return torch.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def _ycc_to_rgb_torch(ycc: torch.Tensor) -> torch.Tensor:
    centred = ycc.to(torch.float32) - torch.tensor([0.0, 0.5, 0.5], device=ycc.device)
    return (centred @ _RGB_FROM_YCC.to(device=ycc.device, dtype=torch.float32).T).clamp(0.0, 1.0)


#: The functional's visibly coloured voxels: CIELAB chroma C* above this.
COLOURED_CHROMA = 20.0
#: A hue error above this many degrees counts.
HUE_ERROR_DEG = 10.0
#: A fused chroma below this has lost its hue: its hue error counts as 180 degrees.
LOST_CHROMA = 0.5


def _colour_keys(fused: torch.Tensor) -> torch.Tensor:
    """One int32 key per uint8 RGB row of ``fused`` [n, 3], below 2^24, read back by :func:`_key_rgb`:
    the three bytes and a zero byte viewed as one int32 (one copy, no arithmetic)."""
    buf = torch.zeros(fused.shape[0], 4, dtype=torch.uint8, device=fused.device)
    (buf[:, :3] if _LITTLE_ENDIAN else buf[:, 1:]).copy_(fused)
    return buf.view(torch.int32).view(-1)


def _key_rgb(keys: torch.Tensor) -> torch.Tensor:
    """The uint8 RGB values [n, 3] (as int32) of keys made by :func:`_colour_keys`."""
    shifts = (0, 8, 16) if _LITTLE_ENDIAN else (16, 8, 0)
    return torch.stack([(keys >> k) & 255 for k in shifts], 1)


class _FusedColours:
    """CIELAB a*, b*, chroma C* of the fused volume's uint8 RGB colours and, with a colour bar, the
    bar entry nearest to each in the (a*, b*) plane (the first of equals), computed once per
    distinct colour; a call gives each voxel's slot in these tables, which the voxels then read. A
    fused volume has far fewer colours than coloured voxels (a 256x256x180 phantom: 39 thousand
    colours for 6.5 million voxels, 310 thousand counted batch by batch), and the search over the
    bar is the costly part. The slots are a table over all 2^24 colours (64 MB of int32), holding
    slot + 1 (0: not seen yet); on the CPU it starts as numpy's zeros, whose pages the operating
    system supplies zeroed on first use: only the pages of colours that occur are ever touched."""

    def __init__(self, device: torch.device, bar_ab: torch.Tensor | None):
        self.slot = (torch.from_numpy(np.zeros(1 << 24, np.int32)) if device.type == "cpu"
                     else torch.zeros(1 << 24, dtype=torch.int32, device=device))
        self.bar_ab = bar_ab
        self.a = self.b = self.chroma = torch.empty(0, device=device)
        self.nearest = torch.empty(0, dtype=torch.int16, device=device)

    def _add(self, colours: torch.Tensor) -> None:
        lab = rgb_to_lab_torch(_key_rgb(colours).to(torch.float32) / 255.0)
        if self.bar_ab is not None:
            best = torch.empty(lab.shape[0], dtype=torch.int16, device=lab.device)
            bar_a, bar_b = self.bar_ab[:, 0], self.bar_ab[:, 1]
            for start in range(0, lab.shape[0], 4096):
                part = lab[start:start + 4096]
                da = part[:, 1:2] - bar_a
                db = part[:, 2:3] - bar_b
                best[start:start + 4096] = (da * da + db * db).argmin(1).to(torch.int16)
            self.nearest = torch.cat([self.nearest, best])
        self.slot[colours.long()] = torch.arange(self.a.shape[0] + 1, self.a.shape[0] + 1 + colours.numel(),
                                          dtype=torch.int32, device=colours.device)
        self.a = torch.cat([self.a, lab[:, 1]])
        self.b = torch.cat([self.b, lab[:, 2]])
        self.chroma = torch.cat([self.chroma, torch.hypot(lab[:, 1], lab[:, 2])])

    def __call__(self, fused: torch.Tensor) -> torch.Tensor:
        """The slots (int32 [n]) of uint8 RGB [n, 3]: index :attr:`a`, :attr:`b`, :attr:`chroma`, :attr:`nearest`."""
        keys = _colour_keys(fused)
        slots = self.slot.index_select(0, keys)
        new = slots == 0
        if bool(new.any()):
            self._add(torch.unique(keys[new]))
            slots = self.slot.index_select(0, keys)
        return slots.sub_(1)


def _median_of_counts(counts: np.ndarray) -> float:
    """numpy.median of the integers 0, 1, ... given by how often each occurs (``counts[i]`` times i)."""
    n = int(counts.sum())
    cum = np.cumsum(counts)
    lo = int(np.searchsorted(cum, (n - 1) // 2, side="right"))      # the sorted values' (n-1)//2-th
    hi = int(np.searchsorted(cum, n // 2, side="right"))            # and n//2-th (0-based)
    return (lo + hi) / 2.0


def _colour_batch(a_s: torch.Tensor, b_s: torch.Tensor, c_s: torch.Tensor, levels: torch.Tensor | None,
                  slots: torch.Tensor, fused_colours: _FusedColours):
    """Per coloured voxel of one batch: (hue error degrees, chroma ratio, read-back error in entries
    or None). ``a_s``, ``b_s``, ``c_s``: the source's CIELAB a*, b* and C* [n]; ``levels`` its bar
    entries; ``slots`` the fused colours' slots in ``fused_colours``."""
    a_f, b_f = fused_colours.a.index_select(0, slots), fused_colours.b.index_select(0, slots)
    c_f = fused_colours.chroma.index_select(0, slots)
    cross = a_s * b_f - b_s * a_f
    dot = a_s * a_f + b_s * b_f
    hue = torch.rad2deg(torch.atan2(cross.abs(), dot))
    hue = torch.where(c_f < LOST_CHROMA, torch.full_like(hue, 180.0), hue)
    read = None
    if levels is not None and fused_colours.bar_ab is not None:
        read = (fused_colours.nearest.index_select(0, slots) - levels.to(torch.int16)).abs()
    return hue, c_f / c_s, read


def _mark_slices(hit: torch.Tensor, at: torch.Tensor, start: int, stride: int, n_axis: int, first_axis: bool) -> None:
    """``hit[slice] = True`` for the slice of each flat voxel index ``start + at`` (``at`` ascending);
    along the first axis by counting the indices between slice boundaries (no per-voxel division)."""
    if at.numel() == 0:
        return
    if not first_axis:
        hit[(((at + start) // stride) % n_axis).cpu()] = True
        return
    lo, hi = (int(at[0]) + start) // stride, (int(at[-1]) + start) // stride
    bounds = torch.arange(lo, hi + 2, dtype=torch.int64, device=at.device) * stride - start
    counts = torch.searchsorted(at, bounds).diff()
    hit[lo:hi + 1] |= (counts > 0).cpu()


def colour_metrics_torch(fused_rgb8: np.ndarray, functional_ycc: np.ndarray, levels: np.ndarray | None = None,
                         table: np.ndarray | None = None, bone: np.ndarray | None = None, axis: int = 0,
                         device: str | torch.device = "auto", progress: ProgressFn | None = None,
                         cancel: CancelFn | None = None,
                         batch_pixels: int = BATCH_PIXELS) -> dict[str, tuple[float, float, int]]:
    """Colour fidelity of a fused volume against the functional's own colour, in CIELAB.

    On the functional's visibly coloured voxels (its colour's C* > :data:`COLOURED_CHROMA`; the
    colour is ``table[levels]`` for a scalar functional through a colour map, else the RGB of
    ``functional_ycc``): ``hue_err10``, the per cent of voxels whose fused hue differs by more
    than 10 degrees; ``chroma_kept``, the median of fused C* / functional C*; and, with a colour
    bar (``levels`` and ``table``), ``readback_err``: the colour-bar entry nearest to the fused
    colour in the (a*, b*) plane (lightness ignored) against the functional's own entry, median
    difference in per cent of the window. With ``bone`` (a mask, on a CT in HU) the same three on
    the coloured voxels in it: ``*_bone``. Values are over all coloured voxels of the volume:
    ``{key: (value, 0.0, slices with coloured voxels)}``; nothing when no voxel is coloured.
    Same progress/cancel contract as :func:`volume_metrics_torch`.
    """
    fused_rgb8 = np.asarray(fused_rgb8)
    acc = ColourMetrics(fused_rgb8.shape[:-1], table if levels is not None else None, bone is not None, device,
                        batch_pixels)
    with Progress(progress, cancel, phases=(("colour", 1.0),)) as tracker:
        tracker.phase("colour")
        acc.add(fused_rgb8, functional_ycc, levels, bone, axis, tick=tracker.advance)
    return acc.result()


def _median(values: np.ndarray) -> float:
    """``np.median(values.astype(float64))`` without a copy: ``values`` is partitioned in place."""
    n = values.size
    if np.issubdtype(values.dtype, np.floating) and np.isnan(values).any():
        return float("nan")
    kth = [n // 2 - 1, n // 2] if n % 2 == 0 else [n // 2]
    values.partition(kth)
    return float(np.mean(values[kth].astype(np.float64)))


class ColourMetrics:
    """:func:`colour_metrics_torch` over a volume given in slabs (whole slices along the slice axis,
    in any order): :meth:`add` each slab, then :meth:`result`; the same values as one call on the
    whole volume. Per coloured voxel it keeps the chroma ratio (float32) and whether it is in bone
    (1 byte), in buffers sized for every voxel of ``shape`` that the operating system only backs as
    they fill; the hue errors, the read-back errors (a histogram over the bar's entries) and the
    slices are counted. The fused colours' CIELAB and nearest bar entry are computed once per
    distinct colour (:class:`_FusedColours`), for the whole volume."""

    def __init__(self, shape: tuple[int, ...], table: np.ndarray | None = None, with_bone: bool = False,
                 device: str | torch.device = "auto", batch_pixels: int = BATCH_PIXELS):
        dev = device if isinstance(device, torch.device) else pick_device(device)
        if dev.type == "mps":                   # no float64 there; these are cheap on the CPU
            dev = torch.device("cpu")
        self.shape, self.device, self.batch_pixels = tuple(shape), dev, batch_pixels
        bar = None if table is None else torch.from_numpy(np.asarray(table, dtype=np.float32)[:, :3])
        self.n_bar = 0 if bar is None else bar.shape[0]
        with torch.inference_mode():
            # a scalar functional's source colours are its bar's entries: CIELAB and C* computed once
            self.bar_lab = None if bar is None else rgb_to_lab_torch(bar.to(dev))
            self.bar_chroma = None if bar is None else torch.hypot(self.bar_lab[:, 1], self.bar_lab[:, 2])
            self.bar_coloured = None if bar is None else self.bar_chroma > COLOURED_CHROMA
            self.bar_a = None if bar is None else self.bar_lab[:, 1].contiguous()
            self.bar_b = None if bar is None else self.bar_lab[:, 2].contiguous()
        self.fused_colours = _FusedColours(dev, None if bar is None else self.bar_lab[:, 1:])
        capacity = int(np.prod(self.shape))
        self.ratio = np.empty(capacity, np.float32)
        self.in_bone = np.empty(capacity, np.bool_) if with_bone else None
        self.reset()

    def reset(self) -> None:
        """Start again on another volume of the same shape (the counts cleared; the fused colours'
        look-up kept: ``evaluate`` scores pair after pair with one accumulator)."""
        self.count = 0
        self.hue_over = {"": 0, "_bone": 0}          # coloured voxels whose hue error is > HUE_ERROR_DEG
        self.slices = {"": 0, "_bone": 0}            # slices with coloured voxels
        self.read = {g: torch.zeros(max(1, self.n_bar), dtype=torch.int64) for g in ("", "_bone")}

    def add(self, fused_rgb8: np.ndarray, functional_ycc: np.ndarray, levels: np.ndarray | None = None,
            bone: np.ndarray | None = None, axis: int = 0, tick: Callable[[float, float], object] | None = None) -> None:
        """One slab: arrays of one shape (RGB/YCbCr [..., 3]), whole slices along ``axis``.
        ``tick(done, total)`` after each batch of voxels (it may raise FusionCancelled)."""
        fused_rgb8 = np.asarray(fused_rgb8)
        shape = fused_rgb8.shape[:-1]
        if fused_rgb8.shape[-1] != 3 or functional_ycc.shape != fused_rgb8.shape:
            raise FusionError(f"colour metrics need two RGB/YCbCr volumes of one shape, got {fused_rgb8.shape}, "
                              f"{functional_ycc.shape}")
        dev, batch_pixels = self.device, self.batch_pixels
        flat_f = fused_rgb8.reshape(-1, 3)
        flat_s = np.asarray(functional_ycc).reshape(-1, 3)
        by_level = levels is not None and self.bar_lab is not None
        flat_l = np.asarray(levels).reshape(-1) if by_level else None
        flat_b = None if bone is None or self.in_bone is None else np.asarray(bone).reshape(-1)
        # slice of a flat voxel index along ``axis``: (index // stride) % shape[axis]
        stride, n_axis = int(np.prod(shape[axis + 1:], dtype=np.int64)), int(shape[axis])
        hit = {g: torch.zeros(n_axis, dtype=torch.bool) for g in ("", "_bone")}
        total = flat_f.shape[0]
        with torch.inference_mode():
            for start in range(0, total, batch_pixels):
                stop = min(total, start + batch_pixels)
                if by_level:                  # coloured: the voxel's bar entry is
                    lv = torch.from_numpy(np.ascontiguousarray(flat_l[start:stop])).to(dev).to(torch.int32)
                    sel = torch.nonzero(self.bar_coloured.index_select(0, lv))[:, 0]
                    lv = lv.index_select(0, sel)
                    a_s, b_s = self.bar_a.index_select(0, lv), self.bar_b.index_select(0, lv)
                    c_s = self.bar_chroma.index_select(0, lv)
                else:                         # coloured: the RGB of the functional's YCbCr has C* > 20
                    ycc = torch.from_numpy(np.ascontiguousarray(flat_s[start:stop])).to(dev)
                    cand = torch.nonzero((ycc[:, 1:] - 0.5).abs().amax(1) > 1.0 / 512)[:, 0]   # neutral: C* = 0
                    lab_s = rgb_to_lab_torch(_ycc_to_rgb_torch(ycc[cand]))
                    c_s = torch.hypot(lab_s[:, 1], lab_s[:, 2])
                    keep = torch.nonzero(c_s > COLOURED_CHROMA)[:, 0]
                    sel, a_s, b_s, c_s, lv = cand[keep], lab_s[keep, 1], lab_s[keep, 2], c_s[keep], None
                if sel.numel():
                    fused = torch.from_numpy(np.ascontiguousarray(flat_f[start:stop])).to(dev).index_select(0, sel)
                    h, r, rb = _colour_batch(a_s, b_s, c_s, lv, self.fused_colours(fused), self.fused_colours)
                    over = h > HUE_ERROR_DEG
                    k, n = self.count, int(sel.numel())
                    self.ratio[k:k + n] = r.cpu().numpy()
                    self.hue_over[""] += int(over.sum())
                    _mark_slices(hit[""], sel, start, stride, n_axis, axis == 0)
                    if rb is not None:
                        self.read[""] += torch.bincount(rb.to(torch.int64).cpu(), minlength=len(self.read[""]))
                    if flat_b is not None:
                        b = torch.from_numpy(np.ascontiguousarray(flat_b[start:stop])).to(dev).index_select(0, sel)
                        self.in_bone[k:k + n] = b.cpu().numpy()
                        self.hue_over["_bone"] += int((over & b).sum())
                        if rb is not None:
                            self.read["_bone"] += torch.bincount(rb[b].to(torch.int64).cpu(),
                                                                 minlength=len(self.read["_bone"]))
                        _mark_slices(hit["_bone"], sel[b], start, stride, n_axis, axis == 0)
                    self.count += n
                if tick is not None:
                    tick(stop, total)
        for g in hit:
            self.slices[g] += int(hit[g].sum())

    def result(self) -> dict[str, tuple[float, float, int]]:
        """``{key: (value, 0.0, slices with coloured voxels)}``; nothing when no voxel was coloured.
        The buffers are used up (partitioned in place): call it once."""
        n = self.count
        if n == 0:
            return {}
        ratio = self.ratio[:n]
        groups = [("", None)]
        if self.in_bone is not None:
            groups.insert(0, ("_bone", self.in_bone[:n]))     # before the in-place partitions of the whole
        out: dict[str, tuple[float, float, int]] = {}
        for suffix, mask in groups:
            count = n if mask is None else int(mask.sum())
            if count == 0:
                continue
            n_sl = self.slices[suffix]
            out["hue_err10" + suffix] = (100.0 * self.hue_over[suffix] / count, 0.0, n_sl)
            out["chroma_kept" + suffix] = (_median(ratio if mask is None else ratio[mask]), 0.0, n_sl)
            if self.n_bar and int(self.read[suffix].sum()):
                out["readback_err" + suffix] = (100.0 * _median_of_counts(self.read[suffix].numpy()) / self.n_bar,
                                                0.0, n_sl)
        return {k: out[k] for k in sorted(out, key=lambda k: k.endswith("_bone"))}
