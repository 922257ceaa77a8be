"""Tests of the metrics: the numpy reference (reference_metrics.py, beside this file), then the
metrics engine (MedicalFusionLib.metrics.torch_engine) against it.

Each metric of the reference is checked against an independent computation: scikit-image / scikit-learn / numpy
where one exists, a literal (slow, loop-by-loop) transcription of the published algorithm for
fast-FMI and VIF, and small cases worked out by hand otherwise. A data test recomputes the
`yavg` / `ymax` rows of shared/ANCHORS.md (the field's reference evaluator, CDDFuse's
utils/Evaluator.py, run on the aanlib test split) and compares the means; it reads the data and
ANCHORS.md in place and skips when they are absent.
"""
from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import convolve2d
from skimage.measure import shannon_entropy
from skimage.metrics import structural_similarity
from sklearn.metrics import adjusted_rand_score, mutual_info_score

import reference_metrics as M
from MedicalFusionLib.colour import gray8
from MedicalFusionLib.errors import FusionError

ALL_KEYS = ["EN", "SD", "SF", "AG", "MI_bits", "MI_nats", "FMI_pixel", "FMI_gradient", "SCD", "VIF", "Qabf",
            "SSIM_avg", "SSIM_sum", "PSNR", "CC", "ARI"]

# Qabf's sigmoids at a perfect transfer (relative strength 1, orientation agreement 1)
Q_G1 = 0.9994 / (1 + math.exp(-15 * (1 - 0.5)))
Q_A1 = 0.9879 / (1 + math.exp(-22 * (1 - 0.8)))


def _rng_images(seed=0, shape=(64, 72)):
    """Three smooth-ish random uint8 images with a black border, like brain slices."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        x = rng.normal(size=shape).cumsum(0).cumsum(1)
        x = (x - x.min()) / (x.max() - x.min()) * 230 + rng.normal(scale=8, size=shape)
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        x[:4] = 0
        x[:, -5:] = 0
        out.append(x)
    return out


@pytest.fixture(scope="module")
def imgs():
    return _rng_images()


# ------------------------------------------------------------------------------------------
# API

def test_metric_list_and_keys():
    assert [m.key for m in M.METRICS] == ALL_KEYS
    assert all(m.name and m.description and isinstance(m.higher_is_better, bool) for m in M.METRICS)


def test_slice_metrics_all_keys_finite(imgs):
    a, b, f = imgs
    out = M.slice_metrics(a, b, f)
    assert list(out) == ALL_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    sub = M.slice_metrics(a, b, f, keys=["CC", "EN"])
    assert list(sub) == ["CC", "EN"] and sub["CC"] == out["CC"]


def test_unknown_key_and_shape_mismatch(imgs):
    a, b, f = imgs
    with pytest.raises(FusionError, match="unknown metric"):
        M.slice_metrics(a, b, f, keys=["NOPE"])
    with pytest.raises(FusionError, match="shape"):
        M.slice_metrics(a, b, f[:-1])


def test_rgb_fused_input_is_read_as_luma(imgs):
    a, b, f = imgs
    rgb = np.stack([f, np.roll(f, 3, axis=1), f // 2], axis=-1)
    assert M.slice_metrics(a, b, rgb) == M.slice_metrics(a, b, gray8(rgb))


# ------------------------------------------------------------------------------------------
# single metrics against independent computations

def test_entropy_matches_skimage(imgs):
    for x in imgs:
        assert M.entropy(x) == pytest.approx(shannon_entropy(x, base=2), rel=1e-12)
    assert M.entropy(np.full((8, 8), 7, np.uint8)) == 0.0
    half = np.zeros((8, 8), np.uint8)
    half[:4] = 200
    assert M.entropy(half) == pytest.approx(1.0)


def test_sd(imgs):
    f = imgs[2]
    assert M.standard_deviation(f) == pytest.approx(math.sqrt(((f.astype(float) - f.mean()) ** 2).mean()))


def test_sf_checkerboard_by_hand():
    # every horizontal and vertical neighbour differs by 255: RF = CF = 255, SF = 255 sqrt 2
    cb = (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)
    assert M.spatial_frequency(cb) == pytest.approx(255 * math.sqrt(2))
    # vertical stripes 0/100: RF = 100, CF = 0
    stripes = np.tile(np.array([0, 100], np.uint8), (10, 5))
    assert M.spatial_frequency(stripes) == pytest.approx(100.0)
    assert M.spatial_frequency(np.full((9, 9), 50, np.uint8)) == 0.0


def test_ag_ramp_by_hand():
    i, j = np.indices((20, 30))
    # F = 2i + 3j: Gx = 3 and Gy = 2 everywhere (also one-sided at the border): sqrt((9 + 4) / 2)
    assert M.average_gradient((2 * i + 3 * j).astype(np.uint8)) == pytest.approx(math.sqrt(6.5))
    assert M.average_gradient(np.full((5, 5), 9, np.uint8)) == 0.0


def test_mi_matches_sklearn(imgs):
    a, b, f = imgs
    ref = mutual_info_score(f.ravel(), a.ravel()) + mutual_info_score(f.ravel(), b.ravel())
    out = M.slice_metrics(a, b, f, ["MI_nats", "MI_bits"])
    assert out["MI_nats"] == pytest.approx(ref, rel=1e-10)
    assert out["MI_bits"] == pytest.approx(ref / math.log(2), rel=1e-10)
    # MI(F, F) is F's entropy: with F = A = B, MI_bits = 2 EN
    assert M.mutual_information(a, a, a, base=2) == pytest.approx(2 * M.entropy(a), rel=1e-10)


def test_cc_matches_numpy(imgs):
    a, b, f = imgs
    ref = (np.corrcoef(f.ravel(), a.ravel())[0, 1] + np.corrcoef(f.ravel(), b.ravel())[0, 1]) / 2
    assert M.cc(a, b, f) == pytest.approx(ref, rel=1e-12)


def test_scd_by_hand(imgs):
    a, b, _ = imgs
    a, b = a // 2, b // 2
    # F = A + B: F - B = A and F - A = B, both correlations are 1
    assert M.scd(a, b, a + b) == pytest.approx(2.0)
    # F = A: r(A - B, A) + r(0, B) = r(A - B, A) + 0 (correlation with a constant is 0)
    af, bf = a.astype(float), b.astype(float)
    assert M.scd(a, b, a) == pytest.approx(np.corrcoef((af - bf).ravel(), af.ravel())[0, 1])


def test_ssim_matches_skimage(imgs):
    a, b, f = imgs
    ref = structural_similarity(f, a, data_range=255) + structural_similarity(f, b, data_range=255)
    out = M.slice_metrics(a, b, f, ["SSIM_sum", "SSIM_avg"])
    assert out["SSIM_sum"] == pytest.approx(ref, rel=1e-12)
    assert out["SSIM_avg"] == pytest.approx(ref / 2, rel=1e-12)


def test_psnr_by_hand():
    a = np.full((8, 8), 10, np.uint8)
    b = np.full((8, 8), 30, np.uint8)
    f = np.full((8, 8), 20, np.uint8)
    # MSE(F, A) = MSE(F, B) = 100; peak max(F) = 20: 10 log10(400 / 100)
    assert M.psnr(a, b, f) == pytest.approx(10 * math.log10(4.0))
    assert M.psnr(a, b, f, peak="255") == pytest.approx(10 * math.log10(255 ** 2 / 100))
    assert M.psnr(a, a, a) == M.PSNR_CAP
    assert M.psnr(a, b, np.zeros_like(a)) == 0.0


def test_ari_matches_sklearn(imgs):
    a, b, f = imgs
    ref = (adjusted_rand_score(a.ravel(), f.ravel()) + adjusted_rand_score(b.ravel(), f.ravel())) / 2
    assert M.ari(a, b, f) == pytest.approx(ref, rel=1e-9)
    # a relabelling of the levels is the same partition
    assert M.ari(a // 2, a // 2, (a // 2) + 100) == pytest.approx(1.0)
    const = np.full_like(a, 3)
    assert M.ari(const, const, np.full_like(a, 9)) == adjusted_rand_score(const.ravel(), const.ravel() + 6) == 1.0
    assert M.ari(a, const, const) == pytest.approx(
        (adjusted_rand_score(a.ravel(), const.ravel()) + 1.0) / 2)


# --- VIF: literal transcription of the multi-scale VIFp formula with 2D convolutions

def _vif_literal(ref, dist):
    ref, dist = ref.astype(np.float64), dist.astype(np.float64)
    sigma_nsq, eps, num, den = 2.0, 1e-10, 0.0, 0.0
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        y, x = np.mgrid[:n, :n] - (n - 1) / 2
        win = np.exp(-(x ** 2 + y ** 2) / (2 * (n / 5) ** 2))
        win /= win.sum()
        if scale > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = np.maximum(convolve2d(ref * ref, win, mode="valid") - mu1 ** 2, 0)
        s2 = np.maximum(convolve2d(dist * dist, win, mode="valid") - mu2 ** 2, 0)
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        for (i, j), _ in np.ndenumerate(s1):
            g = s12[i, j] / (s1[i, j] + eps)
            sv = s2[i, j] - g * s12[i, j]
            v1 = s1[i, j]
            if v1 < eps:
                g, sv, v1 = 0.0, s2[i, j], 0.0
            if s2[i, j] < eps:
                g, sv = 0.0, 0.0
            if g < 0:
                sv, g = s2[i, j], 0.0
            sv = max(sv, eps)
            num += math.log10(1 + g * g * v1 / (sv + sigma_nsq))
            den += math.log10(1 + v1 / sigma_nsq)
    return num / den if den > 0 else 1.0


def test_vif_matches_literal_formula():
    a, b, f = _rng_images(seed=3, shape=(80, 84))
    assert M.vif_pair(a, f) == pytest.approx(_vif_literal(a, f), rel=1e-9)
    assert M.vif(a, b, f) == pytest.approx(_vif_literal(a, f) + _vif_literal(b, f), rel=1e-9)


def test_vif_identical_is_one_per_source(imgs):
    a, _, _ = imgs
    assert M.vif_pair(a, a) == pytest.approx(1.0)
    assert M.vif(a, a, a) == pytest.approx(2.0)
    # a constant source carries no information: 0/0, the reference evaluator's convention is 1
    assert M.vif_pair(np.full_like(a, 40), a) == 1.0


# --- Qabf: hand cases from the sigmoid constants

def test_qabf_identical_is_its_maximum(imgs):
    a, _, _ = imgs
    assert M.qabf(a, a, a) == pytest.approx(Q_G1 * Q_A1, rel=1e-12)  # 0.97481


def test_qabf_half_strength_by_hand(imgs):
    a = imgs[0] // 2  # so that 2A fits in 8 bits
    zero = np.zeros_like(a)  # B without edges: all weight on A
    # F = 2A: same orientation everywhere, relative strength exactly 1/2, Qg(1/2) = Tg / 2
    assert M.qabf(a, zero, 2 * a) == pytest.approx(0.9994 / 2 * Q_A1, rel=1e-12)
    assert M.qabf(a, zero, a) == pytest.approx(Q_G1 * Q_A1, rel=1e-12)
    # F without edges keeps almost nothing: Qg(0) = Tg / (1 + e^7.5)
    assert M.qabf(a, zero, zero) < 1e-3
    assert M.qabf(zero, zero, a) == 0.0  # no source edges at all: defined as 0


# --- FMI: literal transcription of fast-FMI (Haghighat & Razian 2014), window by window

def _fmi_literal_pair(x, f, w=3):
    x, f = x.astype(np.float64), f.astype(np.float64)
    r, vals = w // 2, []
    pos = np.arange(1, w * w + 1, dtype=np.float64)
    for i in range(r, x.shape[0] - r):
        for j in range(r, x.shape[1] - r):
            xs = x[i - r:i + r + 1, j - r:j + r + 1].flatten(order="F")
            fs = f[i - r:i + r + 1, j - r:j + r + 1].flatten(order="F")
            if np.array_equal(xs, fs):
                vals.append(1.0)
                continue
            p = np.ones(w * w) if xs.max() == xs.min() else (xs - xs.min()) / (xs.max() - xs.min())
            q = np.ones(w * w) if fs.max() == fs.min() else (fs - fs.min()) / (fs.max() - fs.min())
            p, q = p / p.sum(), q / q.sum()
            P, Q = np.cumsum(p), np.cumsum(q)
            s = np.sum((p - p.mean()) * (q - q.mean()))
            c = 0.0 if s == 0 else s / math.sqrt(np.sum((p - p.mean()) ** 2) * np.sum((q - q.mean()) ** 2))
            sd_p = math.sqrt(max(np.sum(pos ** 2 * p) - np.sum(pos * p) ** 2, 0))
            sd_q = math.sqrt(max(np.sum(pos ** 2 * q) - np.sum(pos * q) ** 2, 0))

            def H(ii, jj):  # bound copula at F's cdf index ii, X's index jj (index -1: cdf 0)
                qi = 0.0 if ii < 0 else Q[ii]
                pj = 0.0 if jj < 0 else P[jj]
                return min(qi, pj) if c >= 0 else max(qi + pj - 1.0, 0.0)

            n = w * w
            cov = sum(H(ii, jj) - Q[ii] * P[jj] for ii in range(n) for jj in range(n))
            if (c >= 0 and c == 0) or sd_p == 0 or sd_q == 0:
                t = 0.0
            else:
                t = c / (cov / (sd_q * sd_p))
            hj = 0.0
            for ii in range(n):
                for jj in range(n):
                    cell = H(ii, jj) - H(ii - 1, jj) - H(ii, jj - 1) + H(ii - 1, jj - 1)
                    jp = t * cell + (1 - t) * q[ii] * p[jj]
                    if jp != 0:
                        hj += -jp * math.log2(abs(jp))
            hp = -sum(v * math.log2(v) for v in p if v > 0)
            hq = -sum(v * math.log2(v) for v in q if v > 0)
            mi = hp + hq - hj
            vals.append(0.0 if mi == 0 else 2 * mi / (hp + hq))
    return np.array(vals)


def test_fmi_matches_literal_algorithm():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, size=(9, 11)).astype(np.uint8)
    b = a.copy()
    b[:, :5] = 255 - b[:, :5]      # anti-correlated windows: the lower Frechet bound
    b[5:, 6:] = 80                  # constant windows
    f = (a // 2 + b // 2).astype(np.uint8)
    f[:3, :3] = a[:3, :3]           # an identical window
    for feature in ("pixel", "gradient"):
        fx = [M._fmi_feature(x, feature) for x in (a, b, f)]
        lit = (_fmi_literal_pair(fx[0], fx[2]).mean() + _fmi_literal_pair(fx[1], fx[2]).mean()) / 2
        assert M.feature_mutual_information(a, b, f, feature) == pytest.approx(lit, abs=1e-9)
    assert np.any(_fmi_literal_pair(b.astype(float), f.astype(float)) < 0.9)


def test_fmi_range_and_identity(imgs):
    a, b, f = imgs
    assert M.feature_mutual_information(a, a, a) == 1.0
    assert M.feature_mutual_information(a, a, a, "gradient") == 1.0
    for feature in ("pixel", "gradient"):
        v = M.feature_mutual_information(a, b, f, feature)
        assert 0.0 <= v < 1.0


# ------------------------------------------------------------------------------------------
# properties

def test_symmetric_in_the_sources(imgs):
    a, b, f = imgs
    ab, ba = M.slice_metrics(a, b, f), M.slice_metrics(b, a, f)
    for k in ALL_KEYS:
        assert ab[k] == pytest.approx(ba[k], rel=1e-12, abs=1e-12), k


def test_identical_inputs_give_the_maximum(imgs):
    a, b, f = imgs
    same = M.slice_metrics(a, a, a)
    other = M.slice_metrics(a, b, f)
    best = {"CC": 1.0, "SSIM_sum": 2.0, "SSIM_avg": 1.0, "FMI_pixel": 1.0, "FMI_gradient": 1.0,
            "VIF": 2.0, "PSNR": M.PSNR_CAP, "ARI": 1.0, "Qabf": Q_G1 * Q_A1}
    for k, v in best.items():
        assert same[k] == pytest.approx(v), k
        assert other[k] < same[k], k


@pytest.mark.parametrize("value", [0, 77, 255])
def test_constant_slices_give_no_nan(value, imgs):
    a = imgs[0]
    c = np.full_like(a, value)
    for args in ((c, c, c), (a, c, c), (c, a, c), (c, c, a)):
        out = M.slice_metrics(*args)
        assert all(math.isfinite(v) for v in out.values()), out


# ------------------------------------------------------------------------------------------
# volumes and tables

def test_volume_metrics_skips_empty_slices(imgs):
    a, b, f = imgs
    z = np.zeros_like(a)
    va, vb, vf = (np.stack([z, x, z, x[::-1], z]) for x in (a, b, f))
    calls = []
    res = M.volume_metrics(va, vb, vf, axis=0, keys=["CC", "SSIM_sum"], progress=lambda d, n: calls.append((d, n)))
    s1 = M.slice_metrics(a, b, f, ["CC", "SSIM_sum"])
    s2 = M.slice_metrics(a[::-1], b[::-1], f[::-1], ["CC", "SSIM_sum"])
    for k in ("CC", "SSIM_sum"):
        mean, std, n = res[k]
        assert n == 2
        assert mean == pytest.approx((s1[k] + s2[k]) / 2)
        assert std == pytest.approx(abs(s1[k] - s2[k]) / 2)
    assert calls == [(1, 2), (2, 2)]
    # the same volume sliced along another axis: axis 1 of the moved volume
    res1 = M.volume_metrics(np.moveaxis(va, 0, 1), np.moveaxis(vb, 0, 1), np.moveaxis(vf, 0, 1), axis=1,
                            keys=["CC"])
    assert res1["CC"] == pytest.approx(res["CC"])


def test_volume_metrics_empty_raises():
    z = np.zeros((3, 16, 16), np.uint8)
    with pytest.raises(FusionError) as e:
        M.volume_metrics(z, z, z)
    assert "\n" not in str(e.value)


def test_metrics_table_rows_order(imgs):
    a, b, f = imgs
    vol = M.volume_metrics(a[None], b[None], f[None], keys=["PSNR", "EN", "VIF"])
    rows = M.metrics_table_rows(vol)
    assert [r["metric"] for r in rows] == ["EN", "VIF", "PSNR"]
    assert set(rows[0]) == {"metric", "mean", "std", "slices", "description"}
    assert rows[0]["slices"] == 1 and rows[0]["std"] == 0.0


# ------------------------------------------------------------------------------------------
# data: the field's evaluator numbers (shared/ANCHORS.md) reproduced on the aanlib test split

# ANCHORS.md column -> our key. FMI and ARI are not in the anchors; SSIM there is the sum, MI nats.
ANCHOR_KEYS = {"EN": "EN", "SD": "SD", "SF": "SF", "AG": "AG", "MI": "MI_nats", "SCD": "SCD", "VIF": "VIF",
               "Qabf": "Qabf", "SSIM": "SSIM_sum", "PSNR": "PSNR", "CC": "CC"}
LUMA = np.array([0.299, 0.587, 0.114])


def _data_root() -> Path:
    env = os.environ.get("MEDICALFUSION_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / ".." / "shared" / "data"


def _anchors(path: Path) -> dict:
    """{(pair, row): {column: value}} from the markdown tables of ANCHORS.md."""
    out, pair, cols = {}, None, None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^##\s+(\S+-MRI)\s*$", line)
        if m:
            pair, cols = m.group(1), None
            continue
        if pair and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == "method":
                cols = cells[1:]
            elif cols and not set(cells[0]) <= {"-"}:
                out[(pair, cells[0])] = dict(zip(cols, map(float, cells[1:])))
    return out


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as im:
        return np.asarray(im)


def _ycbcr_fuse(mri: np.ndarray, func: np.ndarray, mode: str) -> np.ndarray:
    """The anchors' `yavg` / `ymax` rows: Y = mean / max of the two lumas, the functional's Cb/Cr
    kept, back to RGB uint8.

    With full-range BT.601 and Cb/Cr kept, the inverse transform gives RGB_out = RGB_in + (Y' - Y)
    on each channel, then clipped to [0, 255] and rounded (half to even). This is done in float64:
    the anchors were made with exact arithmetic, and float32 (colour.py's rgb_to_ycbcr /
    ycbcr_to_rgb) breaks the many exact .5 ties of (MRI + CT) / 2 differently, which moves e.g.
    CT-MRI yavg MI from 2.380 to 2.427 and EN from 3.677 to 3.711.
    """
    ya = (mri.astype(np.float64) @ LUMA) if mri.ndim == 3 else mri.astype(np.float64)
    if func.ndim == 2:  # grayscale CT: its luma is itself (not v * sum(LUMA), which is 1 + 2e-16)
        yb = func.astype(np.float64)
        y = (ya + yb) / 2 if mode == "yavg" else np.maximum(ya, yb)
        return np.repeat(np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None], 3, -1)
    rgb = func.astype(np.float64)
    yb = rgb @ LUMA
    y = (ya + yb) / 2 if mode == "yavg" else np.maximum(ya, yb)
    return np.clip(np.rint(rgb + (y - yb)[..., None]), 0, 255).astype(np.uint8)


def _close(ours: float, ref: float) -> bool:
    """Within 0.2 % plus the anchors' rounding to 3 decimals."""
    return abs(ours - ref) <= 2e-3 * abs(ref) + 6e-4


SLOW = os.environ.get("MEDICALFUSION_SLOW_TESTS") == "1"


@pytest.mark.parametrize("pair", [
    "CT-MRI",
    "SPECT-MRI",
    pytest.param("PET-MRI", marks=pytest.mark.skipif(
        not SLOW, reason="82 pairs, ~4 s of CPU: set MEDICALFUSION_SLOW_TESTS=1 to include PET-MRI")),
])
def test_reproduces_reference_evaluator_anchors(pair):
    """Means over the whole test split of `pair` (CT-MRI 36 pairs: the gray path; SPECT-MRI 51:
    the colour path; PET-MRI 82 only with MEDICALFUSION_SLOW_TESTS=1) agree with ANCHORS.md's
    `yavg` and `ymax` rows on EN SD SF AG MI_nats SCD VIF Qabf SSIM_sum PSNR CC within 0.2 %
    (plus the anchors' 3-decimal rounding). FMI and ARI have no anchors and are left out for speed.
    The PSNR anchors need the evaluator's peak max(F): with 255 at least one row is missed.
    """
    root = _data_root()
    split = root / "aanlib" / "split.csv"
    anchors_md = root / ".." / "ANCHORS.md"
    if not split.is_file():
        pytest.skip(f"../shared/data/aanlib not found: {split} is missing (set MEDICALFUSION_DATA to the data folder)")
    if not anchors_md.is_file():
        pytest.skip(f"ANCHORS.md not found beside the data folder: {anchors_md}")
    anchors = _anchors(anchors_md)
    with open(split, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test" and r["pair"] == pair]
    assert rows, f"no test pairs of {pair} in {split}"
    keys = list(ANCHOR_KEYS.values())
    sums = {mode: dict.fromkeys(keys, 0.0) for mode in ("yavg", "ymax")}
    psnr255 = dict.fromkeys(sums, 0.0)
    for r in rows:
        mri = _read_png(root / "aanlib" / r["mri"])
        func = _read_png(root / "aanlib" / r["image"])
        a, b = gray8(mri), gray8(func)
        for mode in sums:
            f = gray8(_ycbcr_fuse(mri, func, mode))
            for k, v in M.slice_metrics(a, b, f, keys).items():
                sums[mode][k] += v
            psnr255[mode] += M.psnr(a, b, f, peak="255")
    failures = []
    for mode in sums:
        ref = anchors[(pair, mode)]
        for col, key in ANCHOR_KEYS.items():
            ours = sums[mode][key] / len(rows)
            if not _close(ours, ref[col]):
                failures.append(f"{pair} {mode} {key}: ours {ours:.4f} vs anchor {ref[col]:.3f}")
    assert not failures, "\n".join(failures)
    # 255 as the peak agrees only where F reaches 255 (ymax of CT/PET); it misses the yavg rows
    assert not all(_close(psnr255[m] / len(rows), anchors[(pair, m)]["PSNR"]) for m in sums)


# ------------------------------------------------------------------------------------------
# the metrics engine (metrics.torch_engine) against the numpy reference (reference_metrics.py)

# Largest difference allowed between volume_metrics_torch and volume_metrics, per metric (of the
# mean and of the std over the slices). The integer-based metrics are exact up to float64
# rounding; AG, SSIM, Qabf and FMI carry float32 per-pixel arithmetic; VIF filters in float32.
# docs/EVALUATION.md states the largest differences measured.
TORCH_TOLERANCE = {"EN": 1e-12, "SD": 1e-10, "SF": 1e-10, "AG": 1e-5, "MI_bits": 1e-12, "MI_nats": 1e-12,
                   "FMI_pixel": 2e-6, "FMI_gradient": 2e-6, "SCD": 1e-12, "VIF": 1e-4, "Qabf": 1e-6,
                   "SSIM_avg": 1e-6, "SSIM_sum": 2e-6, "PSNR": 1e-10, "CC": 1e-12, "ARI": 1e-12}


def _assert_torch_matches_numpy(a8, b8, f8, axis=0, keys=None, **kw):
    from MedicalFusionLib.metrics.torch_engine import volume_metrics_torch

    ref = M.volume_metrics(a8, b8, f8, axis=axis, keys=keys)
    ours = volume_metrics_torch(a8, b8, f8, axis=axis, keys=keys, device="cpu", **kw)
    assert list(ours) == list(ref)
    bad = []
    for k, (mean, std, n) in ref.items():
        o_mean, o_std, o_n = ours[k]
        tol = TORCH_TOLERANCE[k] * max(1.0, abs(mean))
        if o_n != n or not (abs(o_mean - mean) <= tol and abs(o_std - std) <= tol):
            bad.append(f"{k}: numpy ({mean:.10g}, {std:.3g}, {n}) torch ({o_mean:.10g}, {o_std:.3g}, {o_n})")
    assert not bad, "\n".join(bad)
    return ours


def _edge_case_volume(shape=(18, 23)):
    """Slices that exercise every degenerate branch: empty, constant, identical, delta windows,
    anti-correlated (lower Frechet bound), saturated, noise."""
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, size=(3,) + shape).astype(np.uint8)
    a0, b0, f0 = noise
    z = np.zeros(shape, np.uint8)
    c77 = np.full(shape, 77, np.uint8)
    delta = z.copy()
    delta[shape[0] // 2, shape[1] // 2] = 200
    smooth = _rng_images(seed=9, shape=shape)
    slices = [
        (z, z, z),                           # empty: not counted
        (c77, c77, c77),                     # constant everywhere
        (a0, z, a0),                         # B empty, F = A
        (a0, a0, a0),                        # F = A = B
        (a0, b0, np.full(shape, 255, np.uint8)),   # F saturated
        (delta, b0, delta),                  # delta windows
        (a0, b0, (255 - a0).astype(np.uint8)),     # F anti-correlated with A
        (a0, b0, (a0 // 2 + b0 // 2).astype(np.uint8)),
        (c77, b0, f0),                       # A constant
        tuple(smooth),                       # smooth, with black borders
        (a0, b0, f0),                        # noise
    ]
    return tuple(np.stack(s) for s in zip(*slices))


def test_torch_volume_metrics_match_numpy_on_edge_cases():
    a8, b8, f8 = _edge_case_volume()
    ours = _assert_torch_matches_numpy(a8, b8, f8)
    assert ours["EN"][2] == 10                          # the empty slice is not counted
    # the same volume sliced along another axis, and with F given as RGB
    _assert_torch_matches_numpy(np.moveaxis(a8, 0, 2), np.moveaxis(b8, 0, 2), np.moveaxis(f8, 0, 2), axis=2)
    rgb = np.stack([f8, np.roll(f8, 1, axis=2), f8 // 3], axis=-1)
    _assert_torch_matches_numpy(a8, b8, rgb)


@pytest.mark.parametrize("shape", [(7, 7), (7, 12), (31, 8)])
def test_torch_volume_metrics_match_numpy_on_tiny_slices(shape):
    a8, b8, f8 = _edge_case_volume(shape)
    _assert_torch_matches_numpy(a8, b8, f8)


def test_torch_volume_metrics_refuse_what_the_reference_refuses():
    from MedicalFusionLib.metrics.torch_engine import volume_metrics_torch

    a8, b8, f8 = _edge_case_volume((5, 9))
    for impl in (M.volume_metrics, volume_metrics_torch):
        with pytest.raises(FusionError, match="SSIM needs slices of at least 7x7"):
            impl(a8, b8, f8)
        with pytest.raises(FusionError, match="unknown metric"):
            impl(a8, b8, f8, keys=["NOPE"])
        with pytest.raises(FusionError) as e:
            impl(np.zeros_like(a8), np.zeros_like(b8), f8)
        assert "\n" not in str(e.value)
    # slices too small for SSIM are fine for the metrics that do not need 7x7 windows
    _assert_torch_matches_numpy(a8, b8, f8, keys=["EN", "MI_bits", "FMI_pixel", "FMI_gradient", "VIF", "Qabf", "CC"])


def test_torch_integer_sums_stay_exact_on_rows_too_long_for_int32():
    """The moments' per-slice sums add each row in int32 first unless a row of squares could pass
    2^31 (33026 pixels of 255^2): rows of 50000 bright pixels take the int64 path and still match."""
    rng = np.random.default_rng(11)
    shape = (2, 2, 50000)
    a8 = rng.integers(220, 256, shape).astype(np.uint8)
    b8 = rng.integers(0, 256, shape).astype(np.uint8)
    f8 = np.maximum(a8, b8)
    assert int((f8[0, 0].astype(np.int64) ** 2).sum()) > 2 ** 31      # a row's sum of F^2 overflows int32
    _assert_torch_matches_numpy(a8, b8, f8, keys=["SD", "SF", "AG", "PSNR", "CC", "SCD"])


def test_torch_qabf_orientation_where_the_horizontal_sobel_is_zero():
    """sx = 0 with sy > 0, sy < 0 and sy = 0 (flat, vertical ramps both ways): orientation pi / 2
    in each case, as the reference (the division by zero's +-inf and nan are not used)."""
    ramp = np.tile(np.arange(0, 240, 12, dtype=np.uint8)[:, None], (1, 20))      # sx = 0, sy > 0 inside
    a8 = np.stack([ramp, ramp[::-1].copy(), np.full_like(ramp, 90)])
    b8 = np.stack([ramp.T.copy(), ramp, ramp[::-1].copy()])
    f8 = np.stack([ramp[::-1].copy(), (ramp // 2 + 60).astype(np.uint8), ramp])
    _assert_torch_matches_numpy(a8, b8, f8, keys=["Qabf"])


def test_torch_volume_metrics_in_small_batches_and_chunks_give_the_same_values(monkeypatch):
    from MedicalFusionLib.metrics import torch_engine as MT

    a8, b8, f8 = _edge_case_volume((40, 37))
    whole = MT.volume_metrics_torch(a8, b8, f8, device="cpu")
    monkeypatch.setattr(MT, "FMI_CHUNK", 97)
    pieces = MT.volume_metrics_torch(a8, b8, f8, device="cpu", batch_pixels=40 * 37 * 2)
    for k in whole:   # float32 sums over other chunk lengths may round differently: 1e-9, not 0
        assert pieces[k] == pytest.approx(whole[k], rel=1e-9, abs=1e-9), k


def test_torch_volume_metrics_report_progress_and_cancel():
    from MedicalFusionLib.errors import FusionCancelled
    from MedicalFusionLib.metrics.torch_engine import volume_metrics_torch

    a8, b8, f8 = _edge_case_volume()
    seen = []
    volume_metrics_torch(a8, b8, f8, device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] <= seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(FusionCancelled):
        volume_metrics_torch(a8, b8, f8, device="cpu", cancel=lambda: True)


def test_torch_volume_metrics_match_numpy_on_spm12_fused_with_lp():
    """The spm12 T1 + PET pair as the pipeline measures it (lp fusion), every 5th slice."""
    import SimpleITK as sitk

    from MedicalFusionLib.pipeline import FusionOptions, fuse_images, source_gray8

    spm12 = _data_root() / "spm12"
    if not (spm12 / "PET.nii").is_file():
        pytest.skip(f"spm12 templates not found in {spm12} (set MEDICALFUSION_DATA to the data folder)")
    r = fuse_images(sitk.ReadImage(str(spm12 / "T1.nii")), sitk.ReadImage(str(spm12 / "PET.nii")),
                    FusionOptions(method="lp", compute_metrics=False))
    a8, b8 = source_gray8(r.prepared)
    f8 = gray8(r.rgb)
    take = slice(10, None, 5)
    _assert_torch_matches_numpy(a8[take], b8[take], f8[take], axis=r.axis)


def test_torch_volume_metrics_match_numpy_on_aanlib_slices():
    """Six aanlib test pairs of each modality (PET, SPECT: colour; CT: gray), fused as `yavg`."""
    root = _data_root()
    split = root / "aanlib" / "split.csv"
    if not split.is_file():
        pytest.skip(f"../shared/data/aanlib not found: {split} is missing (set MEDICALFUSION_DATA to the data folder)")
    with open(split, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    for pair in ("PET-MRI", "SPECT-MRI", "CT-MRI"):
        picked = [r for r in rows if r["pair"] == pair][::7][:6]
        assert picked, f"no test pairs of {pair} in {split}"
        vols = []
        for r in picked:
            mri, func = _read_png(root / "aanlib" / r["mri"]), _read_png(root / "aanlib" / r["image"])
            vols.append((gray8(mri), gray8(func), gray8(_ycbcr_fuse(mri, func, "yavg"))))
        _assert_torch_matches_numpy(*(np.stack(v) for v in zip(*vols)))
