"""The whole fusion of one registered pair, from two SimpleITK images to an RGB result.

sources -> align -> prepare -> engine -> recombine -> (metrics). The CLI reads files into
SimpleITK images; the Slicer logic (scene.py) turns MRML nodes into the same images; both call
:func:`fuse_images` and write what it returns.

Progress and cancel: :func:`fuse_images` reports ``progress(done, total)`` and checks ``cancel()``
through one :class:`~MedicalFusionLib.progress.Progress` over the phases prepare, fuse,
recombine and metrics (:func:`pipeline_phases`). Every step that touches the whole volume works on
slabs of about :data:`SLAB_VOXELS` voxels and reports between them, so no stretch without a
report is longer than one slab, one engine batch or one metrics chunk.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import colour
from .align import SLAB_VOXELS, resample_to_reference
from .device import pick_device
from .engine import CancelFn, ProgressFn, fuse_volume
from .errors import FusionError
from .methods import get_method
from .options import AXES, FusionOptions, validate  # noqa: F401  (FusionOptions: callers import it from here too)
from .progress import Progress
from .images import as_3d, check_same_dimension, check_slice_size, rgb_is_gray
from .windows import choose_window

#: Bone on a CT in HU, for the colour metrics' "over bone" rows: above the top of the soft-tissue window.
BONE_HU = 215.0
logger = logging.getLogger(__name__)

Tick = Callable[[float], None]


def pipeline_phases(compute_metrics: bool) -> tuple[tuple[str, float], ...]:
    """The progress phases of :func:`fuse_images` and their weights (rough shares of the time)."""
    if compute_metrics:
        return ("prepare", 0.15), ("fuse", 0.45), ("recombine", 0.05), ("metrics", 0.35)
    return ("prepare", 0.2), ("fuse", 0.7), ("recombine", 0.1)


def by_slabs(fn: Callable[[np.ndarray], np.ndarray], arr: np.ndarray, tick: Tick | None = None,
             voxels: int = SLAB_VOXELS) -> np.ndarray:
    """``fn`` applied to slabs ``arr[i:j]`` of about ``voxels`` voxels, put together again (for a
    voxel-wise ``fn``: the same result as on the whole array); ``tick(fraction)`` after each slab."""
    n = arr.shape[0]
    step = max(1, voxels // max(1, arr[:1].size))
    out = None
    for start in range(0, n, step):
        part = fn(arr[start:start + step])
        if out is None:
            out = np.empty((n,) + part.shape[1:], dtype=part.dtype)
        out[start:start + step] = part
        if tick is not None:
            tick(min(n, start + step) / n)
    return out


@dataclass
class Prepared:
    """Inputs on the anatomical grid, normalised: anatomical [Z,Y,X] and functional YCbCr [Z,Y,X,3]."""

    reference: sitk.Image
    anatomical: np.ndarray
    functional_ycc: np.ndarray
    grayscale: bool
    anatomical_window: tuple[float, float]
    functional_window: tuple[float, float] | None
    colormap: str | None                 # the map's name, or 'custom table (N colours)'
    anatomical_units: str = ""           # what the inputs' values are ('' = unknown)
    functional_units: str = ""
    window_sources: dict = field(default_factory=dict)   # role -> how its window was chosen
    notices: list = field(default_factory=list)          # one-line notices for the user
    # For the colour metrics: a scalar functional's colour-map entry per voxel (its level: entry i
    # covers [i, i + 1) / N of the window) and the N x 3 table; where a CT in HU shows bone (> 215 HU).
    functional_level: np.ndarray | None = None
    functional_table: np.ndarray | None = None
    bone: np.ndarray | None = None


@dataclass
class FusionResult:
    rgb: np.ndarray                      # uint8 [Z, Y, X, 3] on the anatomical grid
    reference: sitk.Image                # the anatomical image (geometry of the output)
    method: str
    device: str
    seconds: float
    axis: int
    grayscale: bool
    metrics: dict = field(default_factory=dict)   # key -> (mean, std, slices)
    prepared: Prepared | None = None
    seconds_metrics: float = 0.0         # the metrics alone (not in ``seconds``)

    def rgb_image(self) -> sitk.Image:
        """The fused RGB as a 3D vector image with the anatomical's geometry."""
        img = sitk.GetImageFromArray(self.rgb, isVector=True)
        img.CopyInformation(self.reference)
        return img


def array_axis(reference: sitk.Image, axis: str | int) -> int:
    """Numpy axis (of the [Z, Y, X] array) to slice along for 'axial' / 'coronal' / 'sagittal'.

    ITK directions are LPS: axial slices stack along S (row 2), coronal along P (row 1),
    sagittal along L (row 0). The index axis whose direction column is closest to that physical
    axis is chosen, so oblique and permuted volumes slice the way the user sees them.
    """
    if isinstance(axis, (int, np.integer)):
        if axis not in (0, 1, 2):
            raise FusionError(f"axis {axis} does not exist: use 0, 1, 2 or axial/coronal/sagittal")
        return int(axis)
    name = str(axis).lower()
    if name.isdigit():
        return array_axis(reference, int(name))
    if name not in AXES:
        raise FusionError(f"unknown slice orientation '{axis}': use axial, coronal or sagittal")
    if reference.GetSize()[2] == 1:   # a 2D image: its only slice
        return 0
    d = np.array(reference.GetDirection()).reshape(3, 3)
    row = {"axial": 2, "coronal": 1, "sagittal": 0}[name]
    index_axis = int(np.argmax(np.abs(d[row])))
    return 2 - index_axis


def anatomical_unit(image: sitk.Image, window: tuple[float, float] | None,
                    tick: Tick | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Anatomical to [0, 1]: by ``window``; else an RGB image's luma as it is (0..255), else the
    0.5-99.5 % percentiles of the non-background voxels (robust auto window), whatever the voxel
    type (the CLI passes 0..255 for display-ready 8-bit PNG/JPG pictures). ``tick(fraction)``
    between slabs."""
    if image.GetNumberOfComponentsPerPixel() == 3:   # an RGB anatomical: use its luma
        arr = by_slabs(lambda x: colour.rgb_to_ycbcr(x.astype(np.float32) / 255.0)[..., 0] * 255.0,
                       sitk.GetArrayViewFromImage(image), tick)
        rgb = True
    else:
        arr = sitk.GetArrayViewFromImage(image)
        rgb = False
    if window is None:
        window = (0.0, 255.0) if rgb else colour.robust_window(arr)
    lo, hi = float(window[0]), float(window[1])
    return by_slabs(lambda x: colour.window_to_unit(x, lo, hi), arr, tick), (lo, hi)


def functional_window_default(image: sitk.Image) -> tuple[float, float]:
    """Default window of a scalar functional, whatever its voxel type: its minimum to the 99.9th
    percentile of the non-background voxels (PET/SPECT background is the minimum; the high
    percentile keeps hot spots such as lesions from saturating the colour map). The CLI passes
    0..255 for display-ready 8-bit PNG/JPG pictures."""
    arr = sitk.GetArrayViewFromImage(image)
    _, hi = colour.robust_window(arr, 0.0, 99.9)
    return float(arr.min()), hi


def functional_ycc(image: sitk.Image, window: tuple[float, float] | None, colormap: str | None,
                   tick: Tick | None = None):
    """Functional to YCbCr in [0, 1]. RGB pseudo-colour converts directly; a scalar goes through
    the colour map (default PET-Heat) over ``window`` (default :func:`functional_window_default`).
    Returns (ycc, window or None, colormap or None, grayscale, levels or None, table or None):
    ``levels`` is a scalar functional's colour-map entry per voxel, ``table`` the map's N x 3 RGB;
    grayscale is decided on the table or on the integer RGB channels, not on the converted
    volume. ``tick(fraction)`` between slabs."""
    if image.GetNumberOfComponentsPerPixel() == 3:
        ycc = by_slabs(lambda x: colour.rgb_to_ycbcr(x.astype(np.float32) / 255.0),
                       sitk.GetArrayViewFromImage(image), tick)
        return ycc, None, None, rgb_is_gray(image), None, None
    cmap = colour.DEFAULT_COLORMAP if colormap is None else colormap
    table = colour.colormap_table(cmap) if isinstance(cmap, str) else colour.check_table(cmap)
    window = window or functional_window_default(image)
    lo, hi = float(window[0]), float(window[1])
    name = cmap if isinstance(cmap, str) else f"custom table ({len(table)} colours)"
    # look the values up in the table converted to YCbCr: one conversion of 256 entries, not of every voxel
    table_ycc = colour.rgb_to_ycbcr(table)
    grayscale = bool(np.allclose(table_ycc[:, 1:], 0.5, atol=1.0 / 512))
    levels = by_slabs(lambda x: colour.colormap_index(colour.window_to_unit(x, lo, hi), len(table)),
                      sitk.GetArrayViewFromImage(image), tick)
    ycc = by_slabs(lambda x: table_ycc[x].astype(np.float32), levels)
    return ycc, (lo, hi), name, grayscale, levels, table


def _span(tracker: Progress | None, lo: float, hi: float) -> Tick | None:
    """``tick(fraction)`` reporting ``lo + fraction (hi - lo)`` of the tracker's current phase."""
    if tracker is None or not tracker.enabled:
        return None
    return lambda fraction: tracker.advance(lo + (hi - lo) * fraction, 1.0)


def _auto_source(source: str, image: sitk.Image, rule: str) -> str:
    if source != "auto" or image.GetNumberOfComponentsPerPixel() != 1:
        return source
    return f"auto: {rule} of the non-background voxels"


def prepare(anatomical: sitk.Image, functional: sitk.Image, options: FusionOptions,
            transform: sitk.Transform | None = None, tracker: Progress | None = None) -> Prepared:
    """Check both images, put the functional on the anatomical grid and normalise both.

    A scalar functional is resampled as values (linear, as Slicer's reslicing shows it) and then
    coloured; its default window comes from its own voxels, not the resampled ones. Windows not
    given are chosen by :func:`MedicalFusionLib.windows.choose_window` (preset, CT soft tissue for
    a CT in HU) and else computed from the data. With a ``tracker`` (in its 'prepare' phase) the
    volume-wide steps report between slabs.
    """
    anatomical, anatomical_2d = as_3d(anatomical, "anatomical")
    functional, functional_2d = as_3d(functional, "functional")
    check_same_dimension(anatomical_2d, functional_2d)
    if rgb_is_gray(anatomical):
        anatomical = sitk.VectorIndexSelectionCast(anatomical, 0)
    achoice = choose_window(anatomical, "anatomical", options.anatomical_window, options.anatomical_preset,
                            options.anatomical_units)
    a01, awin = anatomical_unit(anatomical, achoice.window, _span(tracker, 0.0, 0.2))
    fchoice = choose_window(functional, "functional", options.functional_window, options.functional_preset,
                            options.functional_units)
    fwin = fchoice.window
    if fwin is None and functional.GetNumberOfComponentsPerPixel() == 1:
        fwin = functional_window_default(functional)
    aligned = resample_to_reference(functional, anatomical, transform, tick=_span(tracker, 0.25, 0.6))
    ycc, fwin, cmap, grayscale, levels, table = functional_ycc(aligned, fwin, options.colormap,
                                                              _span(tracker, 0.6, 1.0))
    bone = None
    if achoice.units == "HU" and anatomical.GetNumberOfComponentsPerPixel() == 1 and not grayscale:
        bone = by_slabs(lambda x: x > BONE_HU, sitk.GetArrayViewFromImage(anatomical))
    notices = [c.notice for c in (achoice, fchoice) if c.notice]
    for text in notices:          # the CLI shows the package's warnings as one 'note:' line each
        logger.warning(text)
    return Prepared(anatomical, a01.astype(np.float32, copy=False), ycc.astype(np.float32, copy=False), grayscale,
                    awin, fwin, cmap, anatomical_units=achoice.units, functional_units=fchoice.units,
                    window_sources={"anatomical": _auto_source(achoice.source, anatomical, "0.5-99.5 % percentiles"),
                                    "functional": _auto_source(fchoice.source, functional, "minimum..99.9th percentile")},
                    notices=notices, functional_level=None if grayscale else levels,
                    functional_table=None if grayscale else table, bone=bone)


def _recombine(fused_y: np.ndarray, functional_ycc: np.ndarray, chroma_scale: float, grayscale: bool) -> np.ndarray:
    if grayscale:
        return np.repeat(colour.to_uint8(fused_y)[..., None], 3, axis=-1)
    ycc = np.empty(fused_y.shape + (3,), dtype=np.float32)
    ycc[..., 0] = fused_y
    ycc[..., 1:] = 0.5 + chroma_scale * (functional_ycc[..., 1:] - 0.5)
    return colour.to_uint8(colour.ycbcr_to_rgb(ycc))


def recombine(fused_y: np.ndarray, functional_ycc: np.ndarray, chroma_scale: float, grayscale: bool,
              tick: Tick | None = None, keep_colour: bool = True, table: np.ndarray | None = None) -> np.ndarray:
    """Fused luma + the functional's colour -> RGB uint8, slab by slab; ``tick(fraction)`` between slabs.

    Every method with ``chroma_scale`` 1 gets the colour-keeping recombination
    (:func:`MedicalFusionLib.colour.keep_colour`: the functional's hue and chroma kept in CIELAB,
    the fused lightness mapped into the range where they fit the display's gamut; the anatomy as a
    grey of the fused luma where the functional is neutral). A grayscale fusion is the fused luma
    as grey, unchanged. ``chroma_scale`` < 1 (``alpha``, Slicer's overlay) and ``keep_colour=False``
    (the former recombination, kept for the before/after measurements) keep the functional's
    BT.601 Cb/Cr, scaled toward neutral by ``chroma_scale``, with the fused luma. ``table``: a
    scalar functional's colour table (its colour bar: :attr:`Prepared.functional_table`)."""
    out = np.empty(fused_y.shape + (3,), dtype=np.uint8)
    step = max(1, SLAB_VOXELS // max(1, fused_y[0].size))
    lab = keep_colour and chroma_scale == 1.0 and not grayscale
    for start in range(0, fused_y.shape[0], step):
        part = slice(start, start + step)
        if lab:
            out[part] = colour.keep_colour(fused_y[part], functional_ycc[part], table)
        else:
            out[part] = _recombine(fused_y[part], functional_ycc[part], chroma_scale, grayscale)
        if tick is not None:
            tick(min(fused_y.shape[0], start + step) / fused_y.shape[0])
    return out


def _source_gray8(anatomical: np.ndarray, functional_ycc: np.ndarray, grayscale: bool) -> np.ndarray:
    a8 = colour.to_uint8(anatomical)
    if grayscale:
        b8 = colour.to_uint8(functional_ycc[..., 0])
    else:
        b8 = colour.gray8(colour.to_uint8(colour.ycbcr_to_rgb(functional_ycc)))
    return np.stack([a8, b8])


def source_gray8(prepared: Prepared, tick: Tick | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two sources as the metrics see them: 8-bit grayscale (BT.601 luma of the functional's RGB)."""
    n = prepared.anatomical.shape[0]
    out = np.empty((2,) + prepared.anatomical.shape, dtype=np.uint8)
    step = max(1, SLAB_VOXELS // max(1, prepared.anatomical[0].size))
    for start in range(0, n, step):
        part = slice(start, start + step)
        out[:, part] = _source_gray8(prepared.anatomical[part], prepared.functional_ycc[part], prepared.grayscale)
        if tick is not None:
            tick(min(n, start + step) / n)
    return out[0], out[1]


def _metric_keys(options: FusionOptions) -> list[str] | None:
    """The metric keys to compute (None: no metrics)."""
    if not options.compute_metrics:
        return None
    from .metrics import metric_set_keys  # noqa: PLC0415

    return metric_set_keys(options.metric_set)


def fuse_prepared(prepared: Prepared, options: FusionOptions, progress: ProgressFn | None = None,
                  cancel: CancelFn | None = None, tracker: Progress | None = None) -> FusionResult:
    """Fuse prepared inputs (and measure, when ``options.compute_metrics``): engine, recombine,
    metrics. ``progress``/``cancel`` cover the three phases; a caller that already tracks the run
    passes its ``tracker`` instead (its phases: :func:`pipeline_phases`)."""
    validate(options)
    if tracker is None:
        phases = [p for p in pipeline_phases(options.compute_metrics) if p[0] != "prepare"]
        with Progress(progress, cancel, phases) as own:
            result = _fuse_prepared(prepared, options, own)
            own.finish()
        return result
    return _fuse_prepared(prepared, options, tracker)


def _fuse_prepared(prepared: Prepared, options: FusionOptions, tracker: Progress) -> FusionResult:
    """:func:`fuse_prepared` with options already validated."""
    method = get_method(options.method)
    metric_keys = _metric_keys(options)
    device = pick_device(options.device)
    axis = array_axis(prepared.reference, options.axis)
    check_slice_size(prepared.reference, axis, str(options.axis) if not str(options.axis).isdigit() else "")

    tracker.phase("fuse")
    t0 = time.perf_counter()
    engine_progress, engine_cancel = tracker.callbacks()
    fused_y = fuse_volume(prepared.anatomical, prepared.functional_ycc[..., 0], method, axis=axis, device=device,
                          batch_size=options.batch_size, progress=engine_progress, cancel=engine_cancel)
    tracker.phase("recombine")
    rgb = recombine(fused_y, prepared.functional_ycc, method.chroma_scale, prepared.grayscale,
                    _span(tracker, 0.0, 1.0), table=prepared.functional_table)
    del fused_y
    seconds = time.perf_counter() - t0
    result = FusionResult(rgb=rgb, reference=prepared.reference, method=method.name, device=str(device),
                          seconds=seconds, axis=axis, grayscale=prepared.grayscale, prepared=prepared)
    if options.compute_metrics:
        from .metrics.torch_engine import volume_metrics_torch  # noqa: PLC0415  (only when asked)

        tracker.phase("metrics")
        a8, b8 = source_gray8(prepared, _span(tracker, 0.0, 0.04))
        f8 = by_slabs(colour.gray8, rgb, _span(tracker, 0.04, 0.08))
        # the metrics space their own reports (their Progress): passed through unthrottled, as
        # Progress.callbacks() does, so the start of their phases always reaches the panel
        progress_m, cancel_m = tracker.callbacks()
        t1 = time.perf_counter()
        result.metrics = volume_metrics_torch(
            a8, b8, f8, axis=axis, keys=metric_keys, device=device,
            progress=(lambda d, t: tracker.advance(0.08 + 0.87 * d / t, 1.0, force=True)) if progress_m else None,
            cancel=cancel_m)
        if not prepared.grayscale:
            from .metrics.torch_engine import colour_metrics_torch  # noqa: PLC0415

            result.metrics.update(colour_metrics_torch(rgb, prepared.functional_ycc, prepared.functional_level,
                                                       prepared.functional_table, prepared.bone, axis=axis,
                                                       device=device, cancel=cancel_m,
                                                       progress=(lambda d, t: tracker.advance(0.95 + 0.05 * d / t, 1.0, force=True))
                                                       if progress_m else None))
        result.seconds_metrics = time.perf_counter() - t1
    return result


def fuse_images(anatomical: sitk.Image, functional: sitk.Image, options: FusionOptions | None = None,
                progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                transform: sitk.Transform | None = None) -> FusionResult:
    """Fuse a registered pair of SimpleITK images (2D or 3D; functional scalar or RGB).

    ``progress(done, total)`` and ``cancel() -> bool`` are called at least every few tenths of a
    second from the start to the end (see :mod:`MedicalFusionLib.progress`); a cancel raises
    FusionCancelled and nothing is returned.
    """
    options = validate(options or FusionOptions())   # every check that needs no image, before any work
    with Progress(progress, cancel, pipeline_phases(options.compute_metrics)) as tracker:
        tracker.phase("prepare")
        prepared = prepare(anatomical, functional, options, transform, tracker)
        result = _fuse_prepared(prepared, options, tracker)
        tracker.finish()
    return result
