"""The fusion quality metrics: one engine (torch, batched) and the table that describes them.

- This module (torch-free, imported by the panel and the CLI at start-up): the metrics table
  (:data:`METRICS`, :data:`COLOUR_METRICS`: key, name, description, direction), the named sets
  (:data:`METRIC_SETS`), the formulas' constants, and the helpers every consumer shares
  (:func:`check_keys`, :func:`volume_slices`, :func:`summarise`, :func:`metrics_table_rows`).
- :mod:`.torch_engine`: the engine. :func:`~.torch_engine.volume_metrics_torch` computes the 16
  luma metrics of every slice of a volume in torch, batched, on the fusion's device;
  :func:`~.torch_engine.colour_metrics_torch` the colour fidelity (CIELAB). The pipeline, the
  evaluation tables (``medicalfusion evaluate``), training's test-split scores and the cohort all
  use it.

Notation: ``A`` is the anatomical source (MRI), ``B`` the functional source (CT/PET/SPECT), ``F``
the fused image, read as 8-bit grayscale (BT.601 luma of RGB, :func:`MedicalFusionLib.colour.gray8`),
which is how the papers' evaluators read colour images. Most formulas follow the evaluator that the
majority of recent fusion papers run, CDDFuse's ``utils/Evaluator.py`` (Zhao et al., CVPR 2023,
github.com/Zhaozixiang1228/MMIF-CDDFuse). Where the two conventions of the literature differ both
are reported: SSIM as a sum over the two sources (``SSIM_sum``, in [0, 2], the evaluator) and as
their average (``SSIM_avg``, in [0, 1]); MI in nats (``MI_nats``, the evaluator) and in bits.

Naming caution: the LYWNet paper's "FMI" column is the Fowlkes-Mallows index (its ref. 53, Fowlkes &
Mallows 1983), a clustering score like its ARI, not the feature mutual information reported here
as ``FMI_pixel`` / ``FMI_gradient`` (Haghighat et al.); the two are not comparable.

The independent reference the engine is checked against (numpy/scipy/scikit-image, slice by
slice, each function saying where it agrees with or departs from the CDDFuse evaluator) is test
code: MedicalFusion/Testing/Python/reference_metrics.py (test_metrics.py compares the two within
the tolerances docs/EVALUATION.md states).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..colour import gray8
from ..errors import FusionError

__all__ = [
    "MetricInfo", "METRICS", "METRIC_KEYS", "COLOUR_METRICS", "COLOUR_METRIC_KEYS", "METRIC_SETS",
    "metric_set_keys", "check_keys", "volume_slices", "summarise", "metrics_table_rows",
    "PSNR_CAP", "VIF_NOISE_VAR", "VIF_EPS", "vif_window", "QABF_STRENGTH", "QABF_ORIENTATION",
]


@dataclass(frozen=True)
class MetricInfo:
    """One metric: its table key, display name, one-line description and its direction."""

    key: str
    name: str
    description: str
    higher_is_better: bool = True


METRICS: list[MetricInfo] = [
    MetricInfo("EN", "Entropy", "Shannon entropy of F's 256-bin histogram, bits"),
    MetricInfo("SD", "Standard deviation", "Standard deviation of F's gray levels (contrast)"),
    MetricInfo("SF", "Spatial frequency", "sqrt(RF^2 + CF^2) of F's row/column first differences"),
    MetricInfo("AG", "Average gradient", "Mean of sqrt((Gx^2 + Gy^2) / 2) over F (central differences)"),
    MetricInfo("MI_bits", "Mutual information (bits)", "MI(F,A) + MI(F,B) from 256-bin joint histograms, bits"),
    MetricInfo("MI_nats", "Mutual information (nats)",
               "MI(F,A) + MI(F,B), natural log (scikit-learn mutual_info_score, the CDDFuse evaluator)"),
    MetricInfo("FMI_pixel", "Feature MI, pixels",
               "Fast-FMI (Haghighat 2014) on raw pixels, 3x3 windows, (FMI(A,F) + FMI(B,F)) / 2, in [0,1]"),
    MetricInfo("FMI_gradient", "Feature MI, gradient",
               "Fast-FMI on the horizontal gradient (as Haghighat's code), 3x3 windows, average over A and B"),
    MetricInfo("SCD", "Sum of correlations of differences", "corr(F-B, A) + corr(F-A, B) (Aslantas & Bendes 2015)"),
    MetricInfo("VIF", "Visual information fidelity",
               "Multi-scale pixel-domain VIF (Sheikh & Bovik 2006), VIF(A,F) + VIF(B,F)"),
    MetricInfo("Qabf", "Edge transfer Q^AB/F", "Xydeas & Petrovic 2000 gradient-information preservation"),
    MetricInfo("SSIM_avg", "SSIM (average)", "(SSIM(F,A) + SSIM(F,B)) / 2, scikit-image, data_range 255, in [0,1]"),
    MetricInfo("SSIM_sum", "SSIM (sum)", "SSIM(F,A) + SSIM(F,B) as the CDDFuse evaluator reports it, in [0,2]"),
    MetricInfo("PSNR", "Peak signal-to-noise ratio",
               "10 log10(max(F)^2 / ((MSE(F,A) + MSE(F,B)) / 2)) dB, the CDDFuse evaluator's peak"),
    MetricInfo("CC", "Correlation coefficient", "(corr(F,A) + corr(F,B)) / 2, Pearson"),
    MetricInfo("ARI", "Adjusted Rand index",
               "Adjusted Rand index between F's and each source's gray levels as pixel labels, averaged"),
]
METRIC_KEYS: list[str] = [m.key for m in METRICS]
_INFO = {m.key: m for m in METRICS}

#: Colour fidelity, in CIELAB on the functional's visibly coloured voxels (C* > 20 of its own colour
#: through its map and window), over the whole volume (torch_engine.colour_metrics_torch; the table's
#: std is 0 and its 'slices' the slices with coloured voxels). Computed with the other metrics
#: whenever the functional is coloured; the '_bone' rows on a CT in HU, over bone (> 215 HU);
#: the read-back rows for a scalar functional (it has a colour bar). docs/EVALUATION.md, "Colour".
COLOUR_METRICS: list[MetricInfo] = [
    MetricInfo("hue_err10", "Hue error > 10 deg (%)",
               "Per cent of the functional's coloured voxels whose fused CIELAB hue is more than 10 degrees off",
               higher_is_better=False),
    MetricInfo("chroma_kept", "Chroma kept", "Median of fused C* / functional C* on the coloured voxels"),
    MetricInfo("readback_err", "Read-back error (% window)",
               "Median |level read from the fused colour - true level|, % of the window: nearest colour-bar "
               "entry in (a*, b*), lightness ignored", higher_is_better=False),
    MetricInfo("hue_err10_bone", "Hue error > 10 deg over bone (%)", "hue_err10 on coloured voxels over bone (CT > 215 HU)",
               higher_is_better=False),
    MetricInfo("chroma_kept_bone", "Chroma kept over bone", "chroma_kept on coloured voxels over bone (CT > 215 HU)"),
    MetricInfo("readback_err_bone", "Read-back error over bone (% window)",
               "readback_err on coloured voxels over bone (CT > 215 HU)", higher_is_better=False),
]
COLOUR_METRIC_KEYS: list[str] = [m.key for m in COLOUR_METRICS]

#: PSNR returned when the mean squared error is 0 (F equals both sources), instead of +inf.
PSNR_CAP = 100.0


# --------------------------------------------------------------------------------------------
# the formulas' constants (the engine and the reference use the same)

def _gauss_1d(n: int) -> np.ndarray:
    """1D factor of the MATLAB-style n x n Gaussian window with sigma = n / 5 (separable exactly:
    none of the 2D weights falls below eps * max for n <= 17, so the 2D window is an outer product)."""
    sd = n / 5.0
    r = (n - 1) / 2.0
    x = np.arange(-r, r + 1)
    g = np.exp(-(x * x) / (2.0 * sd * sd))
    return g / g.sum()


#: VIF's HVS noise variance sigma_n^2 and its eps (both as in the CDDFuse evaluator's compare_viff).
VIF_NOISE_VAR = 2.0
VIF_EPS = 1e-10


def vif_window(scale: int) -> np.ndarray:
    """1D Gaussian factor of VIF's window at ``scale`` 1..4: N = 2^(5-scale) + 1 taps (17, 9, 5, 3)."""
    return _gauss_1d(2 ** (4 - scale + 1) + 1)


#: Q^AB/F sigmoid constants (T, k, D) of the strength and the orientation terms (Xydeas & Petrovic 2000).
QABF_STRENGTH = (0.9994, -15.0, 0.5)
QABF_ORIENTATION = (0.9879, -22.0, 0.8)


# --------------------------------------------------------------------------------------------
# sets, keys, slices, summaries, table rows

#: Named sets of metrics: the CLI's --metric-set and the panel's "Metric set". 'quick' is every
#: metric but the two FMI variants, which take ~85 % of the metrics' time on a CPU (docs/BENCHMARKS.md,
#: section 'metrics'); 'all' is the full table, as the papers report it.
METRIC_SETS: dict[str, list[str]] = {
    "all": list(METRIC_KEYS),
    "quick": [k for k in METRIC_KEYS if not k.startswith("FMI_")],
}


def metric_set_keys(name: str) -> list[str]:
    """The metric keys of the named set (:data:`METRIC_SETS`); FusionError for an unknown name."""
    if name not in METRIC_SETS:
        raise FusionError(f"unknown metric set '{name}': choose {' or '.join(METRIC_SETS)}")
    return list(METRIC_SETS[name])


def check_keys(keys: list[str] | None) -> list[str]:
    """``keys`` as a list (default: all, in METRICS order); FusionError naming any unknown key."""
    keys = METRIC_KEYS if keys is None else list(keys)
    unknown = [k for k in keys if k not in _INFO]
    if unknown:
        raise FusionError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRIC_KEYS)}")
    return keys


def volume_slices(a8: np.ndarray, b8: np.ndarray, f8: np.ndarray, axis: int = 0):
    """The three volumes with the slice ``axis`` first and the indices of the non-empty slices.

    a8, b8, f8: uint8 volumes of one shape (f8 may also be RGB [..., 3]: reduced to luma). A slice
    is non-empty when a or b has a nonzero voxel there. Raises FusionError on mismatched shapes,
    a bad axis, or when no slice is non-empty.
    """
    f8 = np.asarray(f8)
    if f8.ndim == 4 and f8.shape[-1] == 3:
        f8 = gray8(f8.astype(np.uint8))
    a8, b8 = np.asarray(a8), np.asarray(b8)
    if a8.ndim != 3 or not (a8.shape == b8.shape == f8.shape):
        raise FusionError(f"volume metrics need three 3D volumes of one shape, got {a8.shape}, {b8.shape}, {f8.shape}")
    if not -3 <= axis < 3:
        raise FusionError(f"slice axis {axis} is not one of 0, 1, 2")
    a8, b8, f8 = (np.moveaxis(x, axis, 0) for x in (a8, b8, f8))
    other = tuple(range(1, 3))
    nonempty = np.flatnonzero(np.any(a8 != 0, axis=other) | np.any(b8 != 0, axis=other))
    if nonempty.size == 0:
        raise FusionError("no slice has anatomical or functional content: check the inputs are not empty")
    return a8, b8, f8, nonempty


def summarise(values: dict[str, list[float] | np.ndarray]) -> dict[str, tuple[float, float, int]]:
    """Per-slice values -> ``{key: (mean, population std, n_slices)}``."""
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in values.items()}


def metrics_table_rows(result: dict) -> list[dict]:
    """Rows ``{"metric", "mean", "std", "slices", "description"}`` in METRICS order, then the
    colour metrics present (COLOUR_METRICS).

    ``result`` is what :func:`.torch_engine.volume_metrics_torch` returns ({key: (mean, std, n)}) or
    per-slice values ({key: value}; std 0 and 1 slice then).
    """
    rows = []
    for info in METRICS + COLOUR_METRICS:
        if info.key not in result:
            continue
        v = result[info.key]
        if isinstance(v, (tuple, list)):
            mean, std, n = float(v[0]), float(v[1]), int(v[2])
        else:
            mean, std, n = float(v), 0.0, 1
        rows.append({"metric": info.key, "mean": mean, "std": std, "slices": n, "description": info.description})
    return rows
