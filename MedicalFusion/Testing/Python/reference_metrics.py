"""Fusion quality metrics on 8-bit grayscale slices, as the fusion literature computes them.

Notation: ``A`` is the anatomical source (MRI), ``B`` the functional source (CT/PET/SPECT), ``F``
the fused image, all ``uint8`` arrays of shape [H, W]. RGB inputs ([H, W, 3]) are first reduced to
their rounded BT.601 luma with :func:`MedicalFusionLib.colour.gray8`, which is how the papers'
evaluators read colour images.

Most formulas follow the evaluator that the majority of recent fusion papers run, CDDFuse's
``utils/Evaluator.py`` (Zhao et al., CVPR 2023, github.com/Zhaozixiang1228/MMIF-CDDFuse); the
implementation here is our own, vectorised with numpy/scipy, and every function's docstring says
where it agrees with or departs from that evaluator. The two papers' conventions that differ are
both reported: SSIM as a sum over the two sources (``SSIM_sum``, in [0, 2], the evaluator) and as
their average (``SSIM_avg``, in [0, 1]); MI in nats (``MI_nats``, the evaluator) and in bits.

Naming caution: the LYWNet paper's "FMI" column is the Fowlkes-Mallows index (its ref. 53, Fowlkes &
Mallows 1983), a clustering score like its ARI, not the feature mutual information reported here
as ``FMI_pixel`` / ``FMI_gradient`` (Haghighat et al.); the two are not comparable.

Degenerate inputs never produce NaN: a correlation with a constant image is 0, and each function
states what it returns when its formula is 0/0.

The independent reference of the metrics engine (MedicalFusionLib.metrics.torch_engine), kept
with the tests: every metric of one slice at a time, in numpy/scipy/scikit-image, with nothing
shared with the engine but the metrics table and the formulas' constants (MedicalFusionLib.metrics).
test_metrics.py checks each function against known values and the reference evaluator's
conventions, then the engine against these functions within the tolerances of docs/EVALUATION.md.

    slice_metrics(a, b, f, keys=None)    -> {key: float}
    volume_metrics(a8, b8, f8, axis=0, keys=None, progress=None)
                                         -> {key: (mean, std, n_slices)} over non-empty slices
                                            (what torch_engine.volume_metrics_torch returns)
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from MedicalFusionLib.colour import gray8
from MedicalFusionLib.errors import FusionError
# the table (keys, names, directions, sets) and the formulas' constants: what is computed, not how
from MedicalFusionLib.metrics import (  # noqa: F401  (the table re-exported for the tests)
    COLOUR_METRIC_KEYS, COLOUR_METRICS, METRIC_KEYS, METRIC_SETS, METRICS, PSNR_CAP, QABF_ORIENTATION,
    QABF_STRENGTH, VIF_EPS, VIF_NOISE_VAR, MetricInfo, check_keys, metric_set_keys, metrics_table_rows,
    summarise, vif_window, volume_slices,
)

__all__ = [
    "slice_metrics", "volume_metrics",
    "entropy", "standard_deviation", "spatial_frequency", "average_gradient", "mutual_information",
    "feature_mutual_information", "scd", "vif", "vif_pair", "qabf", "ssim_sum", "psnr", "cc", "ari",
]


# --------------------------------------------------------------------------------------------
# helpers

def _as_gray(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] == 3:
        x = gray8(x.astype(np.uint8) if x.dtype != np.uint8 else x)
    if x.ndim != 2:
        raise FusionError(f"metric input {name} has shape {x.shape}: give a 2D 8-bit slice [H, W]")
    if x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise FusionError(f"metric input {name} has values outside 0..255: convert it to 8-bit first")
        x = np.rint(x).astype(np.uint8)
    return x


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two arrays; 0.0 when either is constant (0/0)."""
    # einsum rather than np.dot: a BLAS call on a shared, busy CPU can cost milliseconds
    dx = (x - x.mean()).ravel()
    dy = (y - y.mean()).ravel()
    den = math.sqrt(float(np.einsum("i,i->", dx, dx)) * float(np.einsum("i,i->", dy, dy)))
    if den == 0.0:
        return 0.0
    return float(np.einsum("i,i->", dx, dy) / den)


def _joint_hist(x8: np.ndarray, y8: np.ndarray) -> np.ndarray:
    """256x256 joint histogram (counts) of two uint8 images."""
    idx = x8.ravel().astype(np.intp) * 256 + y8.ravel()
    return np.bincount(idx, minlength=65536).reshape(256, 256).astype(np.float64)


def _mi_nats_from_joint(joint: np.ndarray) -> float:
    n = joint.sum()
    px = joint.sum(axis=1)
    py = joint.sum(axis=0)
    i, j = np.nonzero(joint)
    nij = joint[i, j]
    # sum p_ij log(p_ij / (p_i p_j)) with p = counts / n
    return float(max(0.0, np.sum(nij / n * (np.log(nij) + math.log(n) - np.log(px[i]) - np.log(py[j])))))


def _ari_from_joint(joint: np.ndarray) -> float:
    """Adjusted Rand index from a contingency table, with scikit-learn's conventions.

    Pair counts (Hubert & Arabie 1985): tp pairs together in both labelings, fp/fn together in one
    only, tn apart in both; ARI = 2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn)),
    and 1.0 when fn = fp = 0 (identical partitions, including two single-cluster labelings).
    """
    n = joint.sum()
    sum_sq = float(np.sum(joint * joint))
    a = joint.sum(axis=1)
    b = joint.sum(axis=0)
    tp = sum_sq - n
    fp = float(np.sum(b * b)) - sum_sq
    fn = float(np.sum(a * a)) - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    return float(2.0 * (tp * tn - fn * fp) / den) if den else 0.0


# --------------------------------------------------------------------------------------------
# no-reference metrics on F alone

def entropy(f: np.ndarray) -> float:
    """EN = -sum_k p_k log2 p_k over F's 256-bin gray-level histogram (bits).

    Source: Roberts, van Aardt & Ahmed, J. Appl. Remote Sens. 2008; the CDDFuse evaluator's EN.
    Equals ``skimage.measure.shannon_entropy(F)`` for uint8 F.
    """
    f = _as_gray(f, "F")
    p = np.bincount(f.ravel(), minlength=256) / f.size
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p)))


def standard_deviation(f: np.ndarray) -> float:
    """SD = sqrt(mean((F - mean F)^2)), the population standard deviation of F's gray levels."""
    return float(np.std(_as_gray(f, "F").astype(np.float64)))


def spatial_frequency(f: np.ndarray) -> float:
    """SF = sqrt(RF^2 + CF^2) (Eskicioglu & Fisher, IEEE Trans. Commun. 1995).

    RF^2 = mean over the H x (W-1) horizontal first differences F[i, j] - F[i, j-1], squared;
    CF^2 = mean over the (H-1) x W vertical differences, squared. Each mean is over the differences
    that exist (not over H*W), as in the CDDFuse evaluator.
    """
    x = _as_gray(f, "F").astype(np.float64)
    rf2 = np.mean(np.diff(x, axis=1) ** 2) if x.shape[1] > 1 else 0.0
    cf2 = np.mean(np.diff(x, axis=0) ** 2) if x.shape[0] > 1 else 0.0
    return float(math.sqrt(rf2 + cf2))


def average_gradient(f: np.ndarray) -> float:
    """AG = mean over all pixels of sqrt((Gx^2 + Gy^2) / 2) (the CDDFuse evaluator's definition).

    Gx, Gy are central differences (F[i, j+1] - F[i, j-1]) / 2 inside the image and one-sided
    differences on the border rows/columns, i.e. ``numpy.gradient``.
    """
    x = _as_gray(f, "F").astype(np.float64)
    if min(x.shape) < 2:
        return 0.0
    gy, gx = np.gradient(x)
    return float(np.mean(np.sqrt((gx * gx + gy * gy) / 2.0)))


# --------------------------------------------------------------------------------------------
# metrics against the sources

def mutual_information(a: np.ndarray, b: np.ndarray, f: np.ndarray, base: float = math.e) -> float:
    """MI = MI(F, A) + MI(F, B) from 256x256 joint gray-level histograms (Qu, Zhang & Yan 2002).

    MI(F, X) = sum_ij p_ij log(p_ij / (p_i p_j)). With ``base=e`` (nats) it equals
    ``sklearn.metrics.mutual_info_score(F.ravel(), X.ravel())`` summed over A and B, which is what
    the CDDFuse evaluator reports; ``base=2`` gives bits (nats / ln 2). A constant image shares no
    information: MI 0.
    """
    a, b, f = _as_gray(a, "A"), _as_gray(b, "B"), _as_gray(f, "F")
    nats = _mi_nats_from_joint(_joint_hist(f, a)) + _mi_nats_from_joint(_joint_hist(f, b))
    return nats / math.log(base)


def cc(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """CC = (r(F, A) + r(F, B)) / 2 with r the Pearson correlation (0 if an image is constant)."""
    a, b, f = (_as_gray(x, n).astype(np.float64) for x, n in ((a, "A"), (b, "B"), (f, "F")))
    return 0.5 * (_corr(f, a) + _corr(f, b))


def scd(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """SCD = r(F - B, A) + r(F - A, B) (Aslantas & Bendes, AEU Int. J. Electron. Commun. 2015).

    F - B estimates what F took from A, and vice versa; r is the Pearson correlation, 0 when either
    argument is constant. Range [-2, 2].
    """
    a, b, f = (_as_gray(x, n).astype(np.float64) for x, n in ((a, "A"), (b, "B"), (f, "F")))
    return _corr(f - b, a) + _corr(f - a, b)


def psnr(a: np.ndarray, b: np.ndarray, f: np.ndarray, peak: str = "max_f") -> float:
    """PSNR = 10 log10(P^2 / MSE) dB with MSE = (MSE(F, A) + MSE(F, B)) / 2.

    ``peak="max_f"`` (default): P = max(F), as the CDDFuse evaluator computes it and as the LYWNet
    paper defines it ("the maximum value of the pixels in image F"); this is the convention that
    reproduces the reference numbers in ``shared/ANCHORS.md``. ``peak="255"``: P = 255, the
    textbook 8-bit peak (higher by 20 log10(255 / max F) dB when F does not reach 255).
    Returns :data:`PSNR_CAP` (100 dB) when MSE = 0 and 0.0 when P = 0 (F black, MSE > 0).
    """
    a, b, f = (_as_gray(x, n).astype(np.float64) for x, n in ((a, "A"), (b, "B"), (f, "F")))
    mse = 0.5 * (np.mean((f - a) ** 2) + np.mean((f - b) ** 2))
    if peak == "max_f":
        p = float(f.max())
    elif peak == "255":
        p = 255.0
    else:
        raise ValueError("peak must be 'max_f' or '255'")
    if mse == 0:
        return PSNR_CAP
    if p == 0:
        return 0.0
    return float(min(PSNR_CAP, 10.0 * math.log10(p * p / mse)))


def ssim_sum(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """SSIM(F, A) + SSIM(F, B) with scikit-image's ``structural_similarity(F, X, data_range=255)``.

    Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004: 7x7 uniform window, K1 = 0.01, K2 = 0.03,
    mean of the SSIM map over windows fully inside the image. The sum (range [-2, 2], 2 for F = A = B)
    is what the CDDFuse evaluator reports; ``SSIM_avg`` is half of it.
    """
    from skimage.metrics import structural_similarity  # noqa: PLC0415 (import cost paid only when used)

    a, b, f = _as_gray(a, "A"), _as_gray(b, "B"), _as_gray(f, "F")
    if min(f.shape) < 7:
        raise FusionError(f"SSIM needs slices of at least 7x7 pixels, got {f.shape}")
    return float(structural_similarity(f, a, data_range=255) + structural_similarity(f, b, data_range=255))


def ari(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """ARI = (ARI(A, F) + ARI(B, F)) / 2, each pixel's 8-bit gray level taken as its cluster label.

    The LYWNet paper ("A multi-scale pyramid residual weight network for medical image fusion",
    Quant. Imaging Med. Surg., doi:10.21037/qims-24-851) lists the adjusted Rand index among its
    metrics, "comparing real and fused images", without saying how images become clusterings. We
    read it as scikit-learn's ``adjusted_rand_score(X.ravel(), F.ravel())`` applied to the 8-bit
    images directly, i.e. a quantisation into the 256 gray levels (each level one cluster), which
    is what a clustering score called on the flattened images computes; averaged over the sources.
    The index (Hubert & Arabie, J. Classif. 1985) counts pixel pairs that share a level in both
    images, corrected for chance: 1 for identical partitions (any relabelling of the levels, e.g.
    F = X + constant without clipping, also scores 1), about 0 for independent ones. A constant F
    and a constant X give 1, scikit-learn's convention. Computed from the 256x256 contingency
    table, equal to scikit-learn's result.

    Caveat: with 256 levels, "same cluster" means "same gray level", and the pairs inside the
    shared black background dominate the count. On aanlib yavg fusions ARI(MRI, F) is about 0.92
    over the whole slice but 0.15-0.55 over the head alone. Read it as a coarse agreement score.
    """
    a, b, f = _as_gray(a, "A"), _as_gray(b, "B"), _as_gray(f, "F")
    return 0.5 * (_ari_from_joint(_joint_hist(a, f)) + _ari_from_joint(_joint_hist(b, f)))


# --------------------------------------------------------------------------------------------
# VIF


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """'valid' 2D correlation of x with the separable window g g^T (output shrinks by len(g)-1)."""
    from scipy import ndimage  # noqa: PLC0415 (scipy.ndimage costs ~0.3 s to import; the torch metrics never need it)

    r = len(g) // 2
    y = ndimage.correlate1d(x, g, axis=0, mode="constant")[r:x.shape[0] - r]
    return ndimage.correlate1d(y, g, axis=1, mode="constant")[:, r:x.shape[1] - r]


def _vif_terms(ref: np.ndarray, dist: np.ndarray, mu2, sigma2_sq, win) -> tuple[float, float]:
    sigma_nsq, eps = VIF_NOISE_VAR, VIF_EPS
    mu1 = _filter_valid(ref, win)
    sigma1_sq = _filter_valid(ref * ref, win) - mu1 * mu1
    sigma12 = _filter_valid(ref * dist, win) - mu1 * mu2
    sigma1_sq = np.maximum(sigma1_sq, 0.0)
    g = sigma12 / (sigma1_sq + eps)
    sv_sq = sigma2_sq - g * sigma12
    low1 = sigma1_sq < eps
    g[low1] = 0.0
    sv_sq[low1] = sigma2_sq[low1]
    sigma1_sq[low1] = 0.0
    low2 = sigma2_sq < eps
    g[low2] = 0.0
    sv_sq[low2] = 0.0
    neg = g < 0
    sv_sq[neg] = sigma2_sq[neg]
    g[neg] = 0.0
    sv_sq = np.maximum(sv_sq, eps)
    num = float(np.sum(np.log10(1.0 + g * g * sigma1_sq / (sv_sq + sigma_nsq))))
    den = float(np.sum(np.log10(1.0 + sigma1_sq / sigma_nsq)))
    return num, den


def _vif_sources(sources: list[np.ndarray], f: np.ndarray) -> list[float]:
    refs = [s.astype(np.float64) for s in sources]
    dist = f.astype(np.float64)
    nums = [0.0] * len(refs)
    dens = [0.0] * len(refs)
    for scale in range(1, 5):
        win = vif_window(scale)
        n = len(win)  # 17, 9, 5, 3
        if scale > 1:
            refs = [_filter_valid(r, win)[::2, ::2] for r in refs]
            dist = _filter_valid(dist, win)[::2, ::2]
        if min(dist.shape) < n:
            break  # too small for this scale: the remaining scales contribute nothing
        mu2 = _filter_valid(dist, win)
        sigma2_sq = np.maximum(_filter_valid(dist * dist, win) - mu2 * mu2, 0.0)
        for k, r in enumerate(refs):
            num, den = _vif_terms(r, dist, mu2, sigma2_sq, win)
            nums[k] += num
            dens[k] += den
    # 0/0 happens only when the reference has no variance anywhere; the evaluator returns 1 then.
    return [nu / de if de > 0 else 1.0 for nu, de in zip(nums, dens)]


def vif_pair(ref: np.ndarray, dist: np.ndarray) -> float:
    """Multi-scale pixel-domain VIF of ``dist`` against ``ref`` (Sheikh & Bovik, IEEE TIP 2006).

    Four scales; at scale s the window is the N x N Gaussian with N = 2^(5-s) + 1 (17, 9, 5, 3)
    and sigma = N / 5; from scale 2 on both images are filtered with that scale's window and
    decimated by 2. Local statistics use 'valid' filtering. With sigma_n^2 = 2 (HVS noise),
    eps = 1e-10 and the gain g = sigma_12 / sigma_1^2, the distortion variance
    sv^2 = sigma_2^2 - g sigma_12, and the usual clamps (g = 0 and sv^2 = sigma_2^2 where
    sigma_1^2 < eps or g < 0; sv^2 = 0 where sigma_2^2 < eps; sv^2 >= eps):

        VIF = sum log10(1 + g^2 sigma_1^2 / (sv^2 + sigma_n^2)) / sum log10(1 + sigma_1^2 / sigma_n^2)

    summed over all scales and positions; as in the CDDFuse evaluator (its ``compare_viff``).
    1.0 for identical images; 1.0 too when ``ref`` is constant (0/0, the evaluator's convention).
    """
    r, d = _as_gray(ref, "ref"), _as_gray(dist, "dist")
    return _vif_sources([r], d)[0]


def vif(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """VIF = VIF(A, F) + VIF(B, F), see :func:`vif_pair` (the CDDFuse evaluator's VIFF)."""
    a, b, f = _as_gray(a, "A"), _as_gray(b, "B"), _as_gray(f, "F")
    return float(sum(_vif_sources([a, b], f)))


# --------------------------------------------------------------------------------------------
# Qabf

_SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)


def _sobel_strength_angle(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage  # noqa: PLC0415

    x = x.astype(np.float64)
    sx = ndimage.convolve(x, _SOBEL_X, mode="constant", cval=0.0)
    sy = ndimage.convolve(x, _SOBEL_Y, mode="constant", cval=0.0)
    g = np.sqrt(sx * sx + sy * sy)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(sx == 0, math.pi / 2, np.arctan(sy / np.where(sx == 0, 1.0, sx)))
    return g, alpha


def _edge_preservation(g_x, a_x, g_f, a_f) -> np.ndarray:
    tg, kg, dg = QABF_STRENGTH
    ta, ka, da = QABF_ORIENTATION
    hi = np.maximum(g_x, g_f)
    lo = np.minimum(g_x, g_f)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_g = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), 1.0)
    rel_a = 1.0 - np.abs(a_x - a_f) / (math.pi / 2)
    return tg / (1.0 + np.exp(kg * (rel_g - dg))) * (ta / (1.0 + np.exp(ka * (rel_a - da))))


def qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Q^AB/F edge-information preservation (Xydeas & Petrovic, Electron. Lett. 36(4), 2000).

    Sobel responses sx, sy (zero padding) give strength g = sqrt(sx^2 + sy^2) and orientation
    alpha = arctan(sy / sx) (pi/2 where sx = 0). For source X: relative strength
    G = min(gX, gF) / max(gX, gF) (1 where both are 0) and orientation A = 1 - |aX - aF| / (pi/2);
    Q^XF = Tg / (1 + exp(kg (G - Dg))) * Ta / (1 + exp(ka (A - Da))) with Tg = 0.9994, kg = -15,
    Dg = 0.5, Ta = 0.9879, ka = -22, Da = 0.8; weights w = g^L with L = 1:

        Qabf = sum(Q^AF gA + Q^BF gB) / sum(gA + gB)

    The constants cap Q at Qg(1) Qa(1) = 0.97481 for a perfect transfer (F = A = B). Same as the
    CDDFuse evaluator except where gX = gF > 0 exactly (it uses G = gF there, we use the ratio 1;
    the difference is below 6e-4 per such pixel). Returns 0.0 when neither source has an edge.
    """
    a, b, f = _as_gray(a, "A"), _as_gray(b, "B"), _as_gray(f, "F")
    ga, aa = _sobel_strength_angle(a)
    gb, ab = _sobel_strength_angle(b)
    gf, af = _sobel_strength_angle(f)
    den = float(np.sum(ga) + np.sum(gb))
    if den == 0:
        return 0.0
    num = float(np.sum(_edge_preservation(ga, aa, gf, af) * ga) + np.sum(_edge_preservation(gb, ab, gf, af) * gb))
    return num / den


# --------------------------------------------------------------------------------------------
# Feature mutual information (fast-FMI)

_FMI_CHUNK = 1024  # windows per block: keeps the [9, 9, block] work arrays in the CPU cache
_FMI_SUFFIX: dict[int, np.ndarray] = {}


def _suffix_weights(l: int) -> np.ndarray:
    """[l, l] weights (l - a)(l - b): sum_ij H_ij = sum_ab dH_ab * #{(i, j): i >= a, j >= b}."""
    if l not in _FMI_SUFFIX:
        r = np.arange(l, 0, -1, dtype=np.float64)
        _FMI_SUFFIX[l] = np.outer(r, r)
    return _FMI_SUFFIX[l]


def _window_stack(x: np.ndarray, w: int) -> np.ndarray:
    """[w*w, N] the values of all N w x w windows fully inside x, window positions in rows.

    Position m = col * w + row: each window is flattened column by column, as MATLAB's ``sub(:)``
    (the order matters: the "cdf" of a window is accumulated in that order).
    """
    h, wd = x.shape[0] - w + 1, x.shape[1] - w + 1
    return np.stack([x[r:r + h, c:c + wd].ravel() for c in range(w) for r in range(w)])


def _xlog2x_sum(p: np.ndarray) -> np.ndarray:
    """sum over all but the last axis of -p log2|p| (0 log 0 = 0; a negative cell enters with the
    real part MATLAB keeps, -p log2|p|)."""
    p = np.ascontiguousarray(p).reshape(-1, p.shape[-1])
    v = np.abs(p)
    v += v == 0  # log2(1) = 0: cells equal to 0 contribute 0
    np.log2(v, out=v)
    v *= p
    return -v.sum(axis=0)


def _cumsum_rows(x: np.ndarray) -> np.ndarray:
    """np.cumsum(x, axis=0) for a short first axis (row by row is ~10x faster than numpy's)."""
    y = np.empty_like(x)
    y[0] = x[0]
    for i in range(1, x.shape[0]):
        np.add(y[i - 1], x[i], out=y[i])
    return y


def _unit_pdf(x: np.ndarray) -> np.ndarray:
    """Min-max normalise each column of a [l, k] block to [0, 1], then divide by its sum."""
    y = x - x.min(axis=0)
    y /= y.max(axis=0)
    y /= y.sum(axis=0)
    return y


def _fmi_block(xw: np.ndarray, fw: np.ndarray) -> np.ndarray:
    """FMI of [l, k] window columns where both the source (xw) and the fused (fw) window vary."""
    l = xw.shape[0]
    p, q = _unit_pdf(xw), _unit_pdf(fw)
    pc, qc = _cumsum_rows(p), _cumsum_rows(q)
    pt, qt = p - p.mean(axis=0), q - q.mean(axis=0)
    num = (pt * qt).sum(axis=0)
    den = np.sqrt((pt * pt).sum(axis=0) * (qt * qt).sum(axis=0))
    c = np.where((num != 0) & (den > 0), num / np.where(den > 0, den, 1.0), 0.0)
    pos = np.arange(1, l + 1, dtype=np.float64)[:, None]
    p_sd = np.sqrt(np.maximum((p * pos * pos).sum(axis=0) - (p * pos).sum(axis=0) ** 2, 0.0))
    q_sd = np.sqrt(np.maximum((q * pos * pos).sum(axis=0) - (q * pos).sum(axis=0) ** 2, 0.0))
    zero = np.zeros((1, p.shape[1]))
    pc0 = np.concatenate([zero, pc[:-1]])  # cdf before each position
    qc0 = np.concatenate([zero, qc[:-1]])
    # Cells of the Frechet bound copula over the grid (F's positions i on axis 0, the source's j on
    # axis 1). Upper bound min(Q_i, P_j), the comonotone coupling: cell mass = overlap of
    # [Q_{i-1}, Q_i] and [P_{j-1}, P_j]. Lower bound max(Q_i + P_j - 1, 0), the countermonotone one:
    # overlap of [Q_{i-1}, Q_i] and [1 - P_j, 1 - P_{j-1}]. These equal the 2D differences of H.
    up = c >= 0
    lo_p = np.where(up, pc0, 1.0 - pc)[None]
    hi_p = np.where(up, pc, 1.0 - pc0)[None]
    cell = np.empty((l, l, p.shape[1]))
    np.minimum(qc[:, None], hi_p, out=cell)
    cell -= np.maximum(qc0[:, None], lo_p)
    np.maximum(cell, 0.0, out=cell)
    # Hoeffding: the covariance of the positions under H is sum_ij (H_ij - Q_i P_j)
    cov = np.einsum("abk,ab->k", cell, _suffix_weights(l)) - qc.sum(axis=0) * pc.sum(axis=0)
    sd_ok = (p_sd > 0) & (q_sd > 0) & (c != 0)
    corr_bound = cov / np.where(sd_ok, p_sd * q_sd, 1.0)
    t = np.where(sd_ok & (corr_bound != 0), c / np.where(corr_bound != 0, corr_bound, 1.0), 0.0)
    # Nelsen's mixture: J = t * dH + (1 - t) * q p^T
    indep = np.empty_like(cell)
    np.multiply(q[:, None], p[None], out=indep)
    cell -= indep
    cell *= t
    cell += indep
    h_joint = _xlog2x_sum(cell)
    h_p, h_q = _xlog2x_sum(p), _xlog2x_sum(q)
    mi = h_p + h_q - h_joint
    hs = h_p + h_q
    return np.where((mi != 0) & (hs > 0), 2.0 * mi / np.where(hs > 0, hs, 1.0), 0.0)


def _fmi_windows(xw: np.ndarray, fw: np.ndarray) -> np.ndarray:
    """Normalised feature MI of corresponding [l, N] window columns (see feature_mutual_information)."""
    same = (xw == fw).all(axis=0)
    out = same.astype(np.float64)
    # A constant window has a uniform "pdf" and no correlation with anything: the joint pdf is the
    # product of the marginals and MI = 0, so only windows where both vary need the computation.
    varies = (xw.max(axis=0) > xw.min(axis=0)) & (fw.max(axis=0) > fw.min(axis=0))
    idx = np.flatnonzero(~same & varies)
    for s in range(0, idx.size, _FMI_CHUNK):
        k = idx[s:s + _FMI_CHUNK]
        out[k] = _fmi_block(xw[:, k], fw[:, k])
    return out


def _fmi_feature(x: np.ndarray, feature: str) -> np.ndarray:
    x = x.astype(np.float64)
    if feature == "pixel":
        return x
    if feature == "gradient":
        return np.gradient(x, axis=1) if x.shape[1] > 1 else np.zeros_like(x)
    raise ValueError("feature must be 'pixel' or 'gradient'")


def feature_mutual_information(a: np.ndarray, b: np.ndarray, f: np.ndarray, feature: str = "pixel",
                               window: int = 3) -> float:
    """Fast-FMI: (FMI(A, F) + FMI(B, F)) / 2, in [0, 1] (higher: more features carried into F).

    Haghighat, Aghagolzadeh & Seyedarabi, "A non-reference image fusion metric based on mutual
    information of image features", Comput. Electr. Eng. 37(5), 2011; the sliding-window "fast"
    form of Haghighat & Razian, AICT 2014, as in Haghighat's reference MATLAB ``fmi.m``.

    Feature maps: ``"pixel"`` the gray levels themselves; ``"gradient"`` what ``fmi.m`` computes for
    its 'gradient' option, MATLAB's single-output ``gradient(im)``, i.e. the horizontal derivative
    (central differences, one-sided on the first/last column) -- not the gradient magnitude.

    For every ``window`` x ``window`` (default 3x3) window position fully inside the image, with X
    the source and F the fused window, each flattened column-major into l = 9 values:
      - if X and F are identical, FMI_XF = 1;
      - each is min-max normalised to [0, 1] (a constant window becomes all ones) and divided by its
        sum: the marginal "pdfs" p (of X) and q (of F), with cdfs P, Q over positions 1..l;
      - c = Pearson correlation of p and q (0 if undefined); the joint pdf is Nelsen's mixture
        J = t * dH + (1 - t) * q p^T, with H the Frechet upper bound min(Q_i, P_j) if c >= 0 or the
        lower bound max(Q_i + P_j - 1, 0) if c < 0, dH its 2D cell differences, and
        t = c / corr(H) where corr(H) = sum_ij (H_ij - Q_i P_j) / (sd_q sd_p) (the Hoeffding
        covariance of the positions under H over their standard deviations under q and p);
      - MI = H(p) + H(q) - H(J) in bits (cells with J < 0, possible when |t| > 1, enter as
        -J log2|J|, the real part MATLAB keeps), and FMI_XF = 2 MI / (H(p) + H(q)).
    The map (FMI_AF + FMI_BF) / 2 is averaged over all window positions. Windows where X or F is
    constant (and they differ) get 0, the value the formula tends to (J is then the product of the
    marginals); the MATLAB code gets the same up to rounding noise.
    """
    a, b, f = _as_gray(a, "A"), _as_gray(b, "B"), _as_gray(f, "F")
    if window < 2 or min(f.shape) < window:
        raise FusionError(f"FMI needs slices of at least {window}x{window} pixels, got {f.shape}")
    ff = _window_stack(_fmi_feature(f, feature), window)
    total = 0.0
    for src in (a, b):
        total += float(np.mean(_fmi_windows(_window_stack(_fmi_feature(src, feature), window), ff)))
    return total / 2.0


# --------------------------------------------------------------------------------------------
# per slice / per volume

def slice_metrics(a: np.ndarray, b: np.ndarray, f: np.ndarray, keys: list[str] | None = None) -> dict[str, float]:
    """Metrics of one fused slice: ``{key: value}`` for ``keys`` (default: all, in METRICS order).

    a (anatomical), b (functional), f (fused): uint8 [H, W] (RGB [H, W, 3] is reduced to luma).
    """
    keys = check_keys(keys)
    a, b, f = _as_gray(a, "A"), _as_gray(b, "B"), _as_gray(f, "F")
    if not (a.shape == b.shape == f.shape):
        raise FusionError(f"metric inputs differ in shape (A {a.shape}, B {b.shape}, F {f.shape}): resample first")
    out: dict[str, float] = {}
    cache: dict[str, float] = {}

    def mi_nats() -> float:
        if "mi" not in cache:
            cache["mi"] = mutual_information(a, b, f)
        return cache["mi"]

    def ssim_s() -> float:
        if "ssim" not in cache:
            cache["ssim"] = ssim_sum(a, b, f)
        return cache["ssim"]

    compute: dict[str, Callable[[], float]] = {
        "EN": lambda: entropy(f),
        "SD": lambda: standard_deviation(f),
        "SF": lambda: spatial_frequency(f),
        "AG": lambda: average_gradient(f),
        "MI_bits": lambda: mi_nats() / math.log(2.0),
        "MI_nats": mi_nats,
        "FMI_pixel": lambda: feature_mutual_information(a, b, f, "pixel"),
        "FMI_gradient": lambda: feature_mutual_information(a, b, f, "gradient"),
        "SCD": lambda: scd(a, b, f),
        "VIF": lambda: vif(a, b, f),
        "Qabf": lambda: qabf(a, b, f),
        "SSIM_avg": lambda: ssim_s() / 2.0,
        "SSIM_sum": ssim_s,
        "PSNR": lambda: psnr(a, b, f),
        "CC": lambda: cc(a, b, f),
        "ARI": lambda: ari(a, b, f),
    }
    for k in keys:
        out[k] = float(compute[k]())
    return out


def volume_metrics(a8: np.ndarray, b8: np.ndarray, f8: np.ndarray, axis: int = 0, keys: list[str] | None = None,
                   progress: Callable[[int, int], object] | None = None) -> dict[str, tuple[float, float, int]]:
    """Slice-wise metrics of a fused volume: ``{key: (mean, std, n_slices)}``, slice by slice in numpy.

    This is the reference implementation (:func:`slice_metrics` on every slice); the pipeline uses
    :func:`MedicalFusionLib.metrics.torch_engine.volume_metrics_torch`, which computes the same values for
    all slices at once in torch (docs/EVALUATION.md states the tolerances, docs/BENCHMARKS.md the
    largest differences measured).

    a8, b8, f8: uint8 volumes of one shape (f8 may also be RGB [..., 3]: reduced to luma). Slices
    are taken along ``axis``; only non-empty slices count (a or b has a nonzero voxel there), so the
    air around the head does not inflate the averages. std is the population standard deviation
    over those slices. ``progress(done, total)`` is called after each counted slice.
    Raises FusionError if no slice is non-empty.
    """
    a8, b8, f8, nonempty = volume_slices(a8, b8, f8, axis)
    keys = check_keys(keys)
    values: dict[str, list[float]] = {k: [] for k in keys}
    for done, i in enumerate(nonempty, start=1):
        m = slice_metrics(a8[i], b8[i], f8[i], keys)
        for k in keys:
            values[k].append(m[k])
        if progress is not None:
            progress(done, int(nonempty.size))
    return summarise(values)


