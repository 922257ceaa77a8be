"""The whole fusion of one registered pair, from two SimpleITK images to an RGB result.

sources -> align -> prepare -> engine -> recombine -> (metrics). The CLI reads files into
SimpleITK images; the Slicer logic (scene.py) turns MRML nodes into the same images; both call
:func:`fuse_images` and write what it returns.

Memory: :func:`prepare` checks the inputs and chooses windows and colours without making voxels;
the run then streams slabs of whole slices (about :data:`STREAM_VOXELS` voxels, along the slicing
axis) through the voxels' preparation (:meth:`Prepared.slab`: the functional resampled onto the
slab's sub-grid), the engine, recombination and the metrics (per-slice values in the whole
volume's batches, colour values accumulated), filling one preallocated RGB result. The result is
bit for bit that of the whole volume at once. Before any work, :func:`check_memory` refuses a study
that needs more memory than is available (:func:`memory_needed`).

Progress and cancel: :func:`fuse_images` reports ``progress(done, total)`` and checks ``cancel()``
through one :class:`~MedicalFusionLib.progress.Progress` over the phases prepare, fuse,
recombine and metrics (:func:`pipeline_phases`), which take turns slab by slab
(:meth:`~MedicalFusionLib.progress.Progress.stage`). Every step inside a slab works on pieces of
about :data:`SLAB_VOXELS` voxels and reports between them, so no stretch without a report is
longer than one piece, one engine batch or one metrics chunk.

Cores: on a CPU with more than one torch thread the run holds one
:func:`~MedicalFusionLib.device.cpu_workers` block: every torch operation runs on one thread, a
network's batches run side by side on the workers (:func:`~MedicalFusionLib.engine.fuse_slices`),
the slabs are smaller (:data:`BEHIND_STREAM_VOXELS`), the next slab is made on a worker of its own
while one is fused, and each fused slab is recombined and measured on another while the next is
fused (:class:`_Behind`); the last slab is recombined and measured in this thread, its metrics with
the workers. The result and the metrics are the same
bytes whatever the thread count and the timing: slabs reach the metrics in order, every operation
runs on one thread.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import colour
from .align import SLAB_VOXELS, check_overlap, reference_slabs, resample_onto, sub_grid
from .device import cpu_workers, pick_device
from .engine import CancelFn, ProgressFn, finished, fuse_volume
from .errors import FusionCancelled, FusionError
from .methods import get_method
from .methods.registry import built_once
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
class Slab:
    """The normalised inputs on slices ``start:stop`` of the anatomical grid (along the slicing axis):
    anatomical in [0, 1] and the functional as YCbCr [..., 3] (float32); a scalar functional's
    colour-map entry per voxel and where a CT in HU shows bone (None when not used); a scalar
    functional's 8-bit grey as the metrics read it, looked up from its colour-table entry
    (:func:`_functional_gray8` of the table: the same values as of ``functional_ycc``; None when
    ``functional_ycc`` does not come from a table)."""

    anatomical: np.ndarray
    functional_ycc: np.ndarray
    functional_level: np.ndarray | None = None
    bone: np.ndarray | None = None
    functional_gray8: np.ndarray | None = None


@dataclass
class Prepared:
    """Inputs checked, windows and colour map chosen, the functional placed on the anatomical grid.

    The voxels are made slab by slab (:meth:`slab`): the pipeline streams slabs of slices through
    prepare, engine, recombine and metrics, so a run never holds normalised copies of whole volumes.
    The whole-volume arrays (:attr:`anatomical` [Z,Y,X], :attr:`functional_ycc` [Z,Y,X,3],
    :attr:`functional_level`, :attr:`bone`) are made on first use and kept (the same values as the
    slabs put together); once made, slabs are cut from them.
    """

    reference: sitk.Image
    grayscale: bool
    anatomical_window: tuple[float, float]
    functional_window: tuple[float, float] | None
    colormap: str | None                 # the map's name, or 'custom table (N colours)'
    anatomical_units: str = ""           # what the inputs' values are ('' = unknown)
    functional_units: str = ""
    window_sources: dict = field(default_factory=dict)   # role -> how its window was chosen
    notices: list = field(default_factory=list)          # one-line notices for the user
    # For the colour metrics: a scalar functional's N x 3 colour table (its colour-map entry per
    # voxel is functional_level: entry i covers [i, i + 1) / N of the window); None when grayscale.
    functional_table: np.ndarray | None = None
    # How the voxels are made: the anatomical (scalar, or RGB used by its luma); the functional as
    # align.check_overlap returns it (already on the anatomical grid when same_grid); the transform
    # from anatomical to functional physical points; a scalar functional's colour table in YCbCr;
    # whether the colour metrics want bone masks (a CT in HU).
    anatomical_image: sitk.Image | None = field(default=None, repr=False)
    functional_image: sitk.Image | None = field(default=None, repr=False)
    transform: sitk.Transform | None = field(default=None, repr=False)
    same_grid: bool = False
    table_ycc: np.ndarray | None = field(default=None, repr=False)
    with_bone: bool = False
    _whole: Slab | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The anatomical grid as a numpy [Z, Y, X] shape."""
        return tuple(reversed(self.reference.GetSize()))

    def slab(self, axis: int, start: int, stop: int, tick: Tick | None = None) -> Slab:
        """The normalised voxels of slices ``start:stop`` along numpy ``axis`` of the grid (the
        same values as those slices of the whole volume); ``tick(fraction)`` between steps of
        about :data:`SLAB_VOXELS` voxels."""
        index = tuple(slice(start, stop) if k == axis else slice(None) for k in range(3))
        if self._whole is not None:
            w = self._whole
            return Slab(w.anatomical[index], w.functional_ycc[index],
                        None if w.functional_level is None else w.functional_level[index],
                        None if w.bone is None else w.bone[index],
                        None if w.functional_gray8 is None else w.functional_gray8[index])
        anat = sitk.GetArrayViewFromImage(self.anatomical_image)[index]
        lo, hi = self.anatomical_window
        if self.anatomical_image.GetNumberOfComponentsPerPixel() == 3:    # an RGB anatomical: its luma
            a01 = by_slabs(lambda x: colour.window_to_unit(
                colour.rgb_to_ycbcr(x.astype(np.float32) / 255.0)[..., 0] * 255.0, lo, hi), anat, _part(tick, 0.0, 0.3))
        else:
            a01 = by_slabs(lambda x: colour.window_to_unit(x, lo, hi), anat, _part(tick, 0.0, 0.3))
        if self.same_grid:
            func = sitk.GetArrayViewFromImage(self.functional_image)[index]
        else:
            func = self._resampled(axis, start, stop, _part(tick, 0.3, 0.6))
        levels = gray = None
        if self.table_ycc is None:            # an RGB functional
            ycc = by_slabs(lambda x: colour.rgb_to_ycbcr(x.astype(np.float32) / 255.0), func, _part(tick, 0.6, 1.0))
        else:
            flo, fhi = self.functional_window
            n = len(self.table_ycc)
            levels = by_slabs(lambda x: colour.colormap_index(colour.window_to_unit(x, flo, fhi), n), func,
                              _part(tick, 0.6, 0.8))
            ycc = by_slabs(lambda x: self.table_ycc[x].astype(np.float32), levels, _part(tick, 0.8, 1.0))
            # the metrics' grey of each table entry, once: a look-up per voxel (the values of the voxels' YCbCr)
            gray = _functional_gray8(self.table_ycc.astype(np.float32)[:, None], self.grayscale).reshape(-1)[levels]
        del func
        bone = by_slabs(lambda x: x > BONE_HU, anat) if self.with_bone else None
        return Slab(a01.astype(np.float32, copy=False), ycc.astype(np.float32, copy=False),
                    None if self.grayscale else levels, bone, gray)

    def _resampled(self, axis: int, start: int, stop: int, tick: Tick | None) -> np.ndarray:
        """The functional resampled onto slices ``start:stop`` along ``axis``, in pieces of about
        :data:`SLAB_VOXELS` voxels (sub-grids: the same voxels as one resampling of the whole)."""
        step = slab_slices(self.shape, axis, SLAB_VOXELS)
        out = None
        for s0 in range(start, stop, step):
            s1 = min(stop, s0 + step)
            image = resample_onto(self.functional_image, sub_grid(self.reference, axis, s0, s1), self.transform)
            part = sitk.GetArrayViewFromImage(image)          # a view: `image` is kept until it is copied
            if out is None:
                shape = list(part.shape)
                shape[axis] = stop - start
                out = np.empty(shape, part.dtype)
            out[tuple(slice(s0 - start, s1 - start) if k == axis else slice(None) for k in range(3))] = part
            if tick is not None:
                tick((s1 - start) / (stop - start))
        return out

    def _all(self) -> Slab:
        if self._whole is None:
            self._whole = self.slab(0, 0, self.shape[0])
        return self._whole

    @property
    def anatomical(self) -> np.ndarray:
        """The anatomical in [0, 1], float32 [Z, Y, X] (made on first use and kept)."""
        return self._all().anatomical

    @property
    def functional_ycc(self) -> np.ndarray:
        """The functional on the anatomical grid as YCbCr in [0, 1], float32 [Z, Y, X, 3]."""
        return self._all().functional_ycc

    @functional_ycc.setter
    def functional_ycc(self, value: np.ndarray) -> None:
        """Replace the functional's YCbCr (same shape; e.g. ``evaluate``'s exact k / 255 of a grey
        picture): the whole-volume arrays are made, and later slabs are cut from them."""
        whole = self._all()
        value = np.ascontiguousarray(value, dtype=np.float32)
        if value.shape != whole.functional_ycc.shape:
            raise ValueError(f"functional_ycc must keep its shape {whole.functional_ycc.shape}, got {value.shape}")
        self._whole = Slab(whole.anatomical, value, whole.functional_level, whole.bone)   # its grey: from value

    @property
    def functional_level(self) -> np.ndarray | None:
        """A scalar functional's colour-map entry per voxel (None when grayscale or RGB)."""
        return self._all().functional_level

    @property
    def bone(self) -> np.ndarray | None:
        """Where a CT in HU shows bone (> 215 HU), for the colour metrics' bone rows (else None)."""
        return self._all().bone


def _part(tick: Tick | None, lo: float, hi: float) -> Tick | None:
    return None if tick is None else (lambda f: tick(lo + (hi - lo) * f))


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


def functional_window_default(image: sitk.Image) -> tuple[float, float]:
    """Default window of a scalar functional, whatever its voxel type: its minimum to the 99.9th
    percentile of the non-background voxels (PET/SPECT background is the minimum; the high
    percentile keeps hot spots such as lesions from saturating the colour map). The CLI passes
    0..255 for display-ready 8-bit PNG/JPG pictures."""
    arr = sitk.GetArrayViewFromImage(image)
    _, hi = colour.robust_window(arr, 0.0, 99.9)
    return float(arr.min()), hi


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
    """Check both images, choose the windows and the colour map, place the functional on the
    anatomical grid: everything but making the voxels, which :meth:`Prepared.slab` does slab by slab.

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
    awin = achoice.window
    if awin is None:
        awin = (0.0, 255.0) if anatomical.GetNumberOfComponentsPerPixel() == 3 else \
            colour.robust_window(sitk.GetArrayViewFromImage(anatomical))
    awin = (float(awin[0]), float(awin[1]))
    colour.window_to_unit(np.zeros(1, np.float32), *awin)            # an empty window: its error now
    fchoice = choose_window(functional, "functional", options.functional_window, options.functional_preset,
                            options.functional_units)
    fwin = fchoice.window
    scalar = functional.GetNumberOfComponentsPerPixel() == 1
    if fwin is None and scalar:
        fwin = functional_window_default(functional)
    moving, same_grid = check_overlap(functional, anatomical, transform, tick=_span(tracker, 0.0, HEADER_SHARE))
    cmap = table = table_ycc = None
    if scalar:
        cmap = colour.DEFAULT_COLORMAP if options.colormap is None else options.colormap
        table = colour.colormap_table(cmap) if isinstance(cmap, str) else colour.check_table(cmap)
        cmap = cmap if isinstance(cmap, str) else f"custom table ({len(table)} colours)"
        fwin = (float(fwin[0]), float(fwin[1]))
        # look the values up in the table converted to YCbCr: one conversion of N entries, not of every voxel
        table_ycc = colour.rgb_to_ycbcr(table)
        grayscale = bool(np.allclose(table_ycc[:, 1:], 0.5, atol=1.0 / 512))
    else:
        fwin = None
        grayscale = _aligned_rgb_is_gray(moving, anatomical, transform, same_grid)
    notices = [c.notice for c in (achoice, fchoice) if c.notice]
    for text in notices:          # the CLI shows the package's warnings as one 'note:' line each
        logger.warning(text)
    return Prepared(anatomical, grayscale, awin, fwin, cmap, anatomical_units=achoice.units,
                    functional_units=fchoice.units,
                    window_sources={"anatomical": _auto_source(achoice.source, anatomical, "0.5-99.5 % percentiles"),
                                    "functional": _auto_source(fchoice.source, functional, "minimum..99.9th percentile")},
                    notices=notices, functional_table=None if grayscale else table,
                    anatomical_image=anatomical, functional_image=moving, transform=transform, same_grid=same_grid,
                    table_ycc=table_ycc,
                    with_bone=achoice.units == "HU" and anatomical.GetNumberOfComponentsPerPixel() == 1
                    and not grayscale)


def _aligned_rgb_is_gray(moving: sitk.Image, reference: sitk.Image, transform, same_grid: bool) -> bool:
    """Whether an RGB functional has equal channels where it lands on the anatomical grid
    (:func:`MedicalFusionLib.images.rgb_is_gray` of the resampled image, slab by slab, up to
    the first coloured one)."""
    if same_grid:
        return rgb_is_gray(moving)
    for grid in reference_slabs(reference, 16 * SLAB_VOXELS):
        if not rgb_is_gray(resample_onto(moving, grid, transform)):
            return False
    return True


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


def _functional_gray8(functional_ycc: np.ndarray, grayscale: bool) -> np.ndarray:
    """The functional as the metrics read it: 8-bit grey (its luma when grayscale, else the BT.601
    luma of its RGB)."""
    if grayscale:
        return colour.to_uint8(functional_ycc[..., 0])
    return colour.gray8(colour.to_uint8(colour.ycbcr_to_rgb(functional_ycc)))


def source_gray8(prepared: Prepared, tick: Tick | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two sources as the metrics see them: 8-bit grayscale (BT.601 luma of the functional's RGB)."""
    whole = prepared._all()
    return _gray8_sources(whole.anatomical, whole.functional_ycc, prepared.grayscale, tick, whole.functional_gray8)


def _gray8_sources(anatomical: np.ndarray, functional_ycc: np.ndarray, grayscale: bool,
                   tick: Tick | None = None, functional_gray8: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`source_gray8` of arrays, in steps of about :data:`SLAB_VOXELS` voxels along their first
    axis; ``functional_gray8``: the functional's grey already made (:attr:`Slab.functional_gray8`)."""
    n = anatomical.shape[0]
    a8 = np.empty(anatomical.shape, dtype=np.uint8)
    b8 = np.empty(anatomical.shape, dtype=np.uint8) if functional_gray8 is None else functional_gray8
    step = max(1, SLAB_VOXELS // max(1, anatomical[0].size))
    for start in range(0, n, step):
        part = slice(start, start + step)
        a8[part] = colour.to_uint8(anatomical[part])
        if functional_gray8 is None:
            b8[part] = _functional_gray8(functional_ycc[part], grayscale)
        if tick is not None:
            tick(min(n, start + step) / n)
    return a8, b8


def preview_sources(prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """The two sources as a preview shows them: the anatomical as 8-bit grey [Z, Y, X] and the
    functional's RGB [Z, Y, X, 3] on the anatomical grid, made slab by slab (4 bytes a voxel; the
    normalised whole volumes are never held)."""
    shape = prepared.shape
    a8 = np.empty(shape, np.uint8)
    rgb = np.empty(shape + (3,), np.uint8)
    per = slab_slices(shape, 0)
    for start in range(0, shape[0], per):
        slab = prepared.slab(0, start, min(shape[0], start + per))
        a8[start:start + per] = colour.to_uint8(slab.anatomical)
        rgb[start:start + per] = colour.to_uint8(colour.ycbcr_to_rgb(slab.functional_ycc))
    return a8, rgb


def _metric_keys(options: FusionOptions) -> list[str] | None:
    """The metric keys to compute (None: no metrics)."""
    if not options.compute_metrics:
        return None
    from .metrics import metric_set_keys  # noqa: PLC0415

    return metric_set_keys(options.metric_set)


def fuse_prepared(prepared: Prepared, options: FusionOptions, progress: ProgressFn | None = None,
                  cancel: CancelFn | None = None, tracker: Progress | None = None) -> FusionResult:
    """Fuse prepared inputs (and measure, when ``options.compute_metrics``): slab by slab, the
    voxels (:meth:`Prepared.slab`), engine, recombine, metrics. ``progress``/``cancel`` cover the
    run; a caller that already tracks the run passes its ``tracker`` instead (its phases:
    :func:`pipeline_phases`)."""
    validate(options)
    if tracker is None:
        with Progress(progress, cancel, pipeline_phases(options.compute_metrics)) as own:
            result = _fuse_prepared(prepared, options, own)
            own.finish()
        return result
    return _fuse_prepared(prepared, options, tracker)


def slab_slices(shape: tuple[int, ...], axis: int, voxels: int | None = None) -> int:
    """Slices per streamed slab along ``axis`` of a volume of ``shape``: about ``voxels``
    (default :data:`STREAM_VOXELS`) voxels, at least one slice."""
    per_slice = int(np.prod([n for k, n in enumerate(shape[:3]) if k != axis]))
    return max(1, (STREAM_VOXELS if voxels is None else voxels) // max(1, per_slice))


def _stages(compute_metrics: bool, grayscale: bool, base: float) -> Callable[[int, int, int], dict]:
    """Where each stage of a slab falls in the run (fractions of it): the slabs share what follows
    ``base`` in proportion to their slices, and each slab's share is split like
    :func:`pipeline_phases` (prepare, fuse, recombine, metrics; the colour metrics are the last
    5 % of the metrics). Returns ``windows(start, stop, n) -> {stage: (start, width)}``."""
    phases = dict(pipeline_phases(compute_metrics))
    total = sum(phases.values())

    def windows(start: int, stop: int, n: int) -> dict:
        lo = base + (1.0 - base) * start / n
        size = (1.0 - base) * (stop - start) / n
        out, acc = {}, lo
        for name, weight in phases.items():
            out[name] = (acc, size * weight / total)
            acc += size * weight / total
        if compute_metrics and not grayscale:
            m0, mw = out["metrics"]
            out["metrics"], out["colour"] = (m0, 0.95 * mw), (m0 + 0.95 * mw, 0.05 * mw)
        return out

    return windows


def _fuse_prepared(prepared: Prepared, options: FusionOptions, tracker: Progress, base: float = 0.0) -> FusionResult:
    """:func:`fuse_prepared` with options already validated; the slabs fill the run after ``base``
    (the fraction of it already reported)."""
    method = get_method(options.method)
    metric_keys = _metric_keys(options)
    device = pick_device(options.device)
    axis = array_axis(prepared.reference, options.axis)
    check_slice_size(prepared.reference, axis, str(options.axis) if not str(options.axis).isdigit() else "")
    shape = prepared.shape
    n = shape[axis]
    per = slab_slices(shape, axis)
    windows = _stages(options.compute_metrics, prepared.grayscale, base)
    rgb = np.empty(shape + (3,), dtype=np.uint8)           # the result, filled slab by slab
    slice_metrics = None if metric_keys is None else _SliceMetrics(metric_keys, axis, device)
    colour_acc = None
    if metric_keys is not None and not prepared.grayscale:
        from .metrics.torch_engine import ColourMetrics  # noqa: PLC0415  (only when asked)

        colour_acc = ColourMetrics(shape, prepared.functional_table, prepared.with_bone, device)
    seconds = seconds_metrics = 0.0
    with built_once(), cpu_workers(device) as pool, _Behind(pool is not None) as behind, \
            _Behind(pool is not None, "ahead") as ahead:
        # With a pool (the CPU, more than one torch thread): the next slab is made ahead, on a worker
        # of its own, while this one is fused; each slab but the last is recombined and measured
        # behind the run, on another, while the next is fused (see _Behind); the last slab in this
        # thread, its metrics with the pool.
        if behind.on:
            per = slab_slices(shape, axis, BEHIND_STREAM_VOXELS)
        next_slab = None
        for start in range(0, n, per):
            stop = min(n, start + per)
            index = tuple(slice(start, stop) if k == axis else slice(None) for k in range(3))
            stage = windows(start, stop, n)

            tracker.stage("prepare", *stage["prepare"])
            if next_slab is None:
                slab = prepared.slab(axis, start, stop, tick=lambda f: tracker.advance(f, 1.0))
            else:
                slab = ahead.result(next_slab, tracker)
            if ahead.on and stop < n:
                next_slab = ahead.submit(prepared.slab, axis, stop, min(n, stop + per))
            tracker.stage("fuse", *stage["fuse"])
            t0 = time.perf_counter()
            engine_progress, engine_cancel = tracker.callbacks()
            fused_y = fuse_volume(slab.anatomical, slab.functional_ycc[..., 0], method, axis=axis, device=device,
                                  batch_size=options.batch_size, progress=engine_progress, cancel=engine_cancel,
                                  pool=pool)
            if behind.on and stop < n:
                behind.submit(_slab_behind, fused_y, slab, rgb, index, method.chroma_scale, prepared, axis, stage,
                              slice_metrics, colour_acc, behind.cancelled)
                seconds += time.perf_counter() - t0
                continue
            behind.wait(tracker)
            tracker.stage("recombine", *stage["recombine"])
            rgb[index] = recombine(fused_y, slab.functional_ycc, method.chroma_scale, prepared.grayscale,
                                   lambda f: tracker.advance(f, 1.0), table=prepared.functional_table)
            del fused_y
            seconds += time.perf_counter() - t0
            if metric_keys is not None:
                t1 = time.perf_counter()
                _slab_metrics(tracker, stage, slab, rgb[index], prepared.grayscale, axis, slice_metrics,
                              colour_acc, pool)
                seconds_metrics += time.perf_counter() - t1
            del slab
    result = FusionResult(rgb=rgb, reference=prepared.reference, method=method.name, device=str(device),
                          seconds=seconds, axis=axis, grayscale=prepared.grayscale, prepared=prepared)
    if metric_keys is not None:
        t1 = time.perf_counter()
        if not slice_metrics.any:
            raise FusionError(NO_CONTENT)
        from .metrics import summarise  # noqa: PLC0415

        progress_m, cancel_m = tracker.callbacks()
        result.metrics = summarise(slice_metrics.finish(progress_m, cancel_m))
        if colour_acc is not None:
            result.metrics.update(colour_acc.result())
        result.seconds_metrics = seconds_metrics + time.perf_counter() - t1
    return result


class _SliceMetrics:
    """The per-slice metrics of a volume given slab by slab, computed in the batches of slices a
    whole-volume call of :func:`~MedicalFusionLib.metrics.torch_engine.volume_metrics_torch` would use
    (its non-empty slices, :data:`~MedicalFusionLib.metrics.torch_engine.BATCH_PIXELS` pixels a batch): a
    slice's FMI depends on the chunks its batch is cut into, so the same batches give the same
    bytes. Non-empty slices wait in a small buffer until a batch is full."""

    def __init__(self, keys: list[str], axis: int, device):
        from .metrics.torch_engine import BATCH_PIXELS  # noqa: PLC0415

        self.keys, self.axis, self.device = keys, axis, device
        self.batch_pixels = BATCH_PIXELS
        self.pending: np.ndarray | None = None   # [3, n, h, w] uint8: non-empty slices not measured yet
        self.values: dict[str, list] = {k: [] for k in keys}
        self.any = False

    def add(self, a8: np.ndarray, b8: np.ndarray, f8: np.ndarray, progress=None, cancel=None, pool=None) -> None:
        a, b, f = (np.moveaxis(x, self.axis, 0) for x in (a8, b8, f8))
        keep = np.flatnonzero(a.reshape(a.shape[0], -1).any(axis=1) | b.reshape(b.shape[0], -1).any(axis=1))
        if keep.size == 0:
            return
        self.any = True
        block = np.stack([a[keep], b[keep], f[keep]])
        if self.pending is not None:
            block = np.concatenate([self.pending, block], axis=1)
        per_batch = max(1, self.batch_pixels // max(1, a[0].size))
        done = 0
        while block.shape[1] - done >= per_batch:
            self._measure(block[:, done:done + per_batch], progress, cancel, pool)
            done += per_batch
        self.pending = block[:, done:].copy() if done < block.shape[1] else None

    def finish(self, progress=None, cancel=None) -> dict[str, np.ndarray]:
        if self.pending is not None:
            self._measure(self.pending, progress, cancel)
            self.pending = None
        return {k: np.concatenate(v) for k, v in self.values.items()}

    def _measure(self, batch: np.ndarray, progress, cancel, pool=None) -> None:
        from .metrics.torch_engine import volume_metric_values_torch  # noqa: PLC0415

        out = volume_metric_values_torch(batch[0], batch[1], batch[2], axis=0, keys=self.keys, device=self.device,
                                         progress=progress, cancel=cancel, batch_pixels=self.batch_pixels, pool=pool)
        for k in self.keys:
            self.values[k].append(out[k])


def _slab_behind(fused_y: np.ndarray, slab: Slab, rgb: np.ndarray, index: tuple, chroma_scale: float,
                 prepared: Prepared, axis: int, stage: dict, slice_metrics: _SliceMetrics | None, colour_acc,
                 cancel: CancelFn) -> None:
    """A fused slab finished on a worker while the run goes on: recombined into ``rgb[index]`` and,
    when ``slice_metrics`` is given, measured by :func:`_slab_metrics` (one torch thread: the same
    values) under a tracker of this worker's that reports nothing (the run's thread reports) and
    checks ``cancel()``."""
    if cancel():
        raise FusionCancelled("fusion cancelled")
    rgb[index] = recombine(fused_y, slab.functional_ycc, chroma_scale, prepared.grayscale,
                           table=prepared.functional_table)
    if slice_metrics is not None:
        with Progress(None, cancel, pipeline_phases(True)) as quiet:
            _slab_metrics(quiet, stage, slab, rgb[index], prepared.grayscale, axis, slice_metrics, colour_acc, None)


class _Behind:
    """Work that runs behind the run, in order, on one worker thread of its own (the recombination
    and metrics of the slabs already fused, while the next are made and fused; :func:`_fuse_prepared`). ``on``: whether it is
    used at all. The run's thread :meth:`submit` s jobs and :meth:`wait` s for them, reporting and
    checking cancel meanwhile; an error in a job is raised there. On leaving (done, cancelled or
    failed) the jobs not started are dropped and a running one is told to stop (:meth:`cancelled`);
    after a job's error the next ones do nothing."""

    def __init__(self, on: bool, name: str = "behind"):
        self.on, self.name = on, name
        self._stop = threading.Event()
        self._jobs: list = []
        self._worker = None

    def __enter__(self) -> _Behind:
        if self.on:
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"medicalfusion-cpu-{self.name}")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._worker is not None:
            self._stop.set()
            for job in self._jobs:
                job.cancel()
            self._worker.shutdown(wait=True)

    def cancelled(self) -> bool:
        return self._stop.is_set()

    def submit(self, fn, *args) -> Future:
        for job in self._jobs:
            if job.done():
                job.result()                 # an earlier job's error, here
        self._jobs = [job for job in self._jobs if not job.done()]
        self._jobs.append(self._worker.submit(self._run, fn, *args))
        return self._jobs[-1]

    def _run(self, fn, *args):
        if self._stop.is_set():              # an earlier job failed (its error reaches the run): skip
            return None
        try:
            return fn(*args)
        except BaseException:
            self._stop.set()
            raise

    def wait(self, tracker: Progress) -> None:
        """Every job submitted has ended (reporting and checking cancel every 0.05 s meanwhile)."""
        for job in self._jobs:
            self.result(job, tracker)
        self._jobs = []

    @staticmethod
    def result(job: Future, tracker: Progress):
        """``job``'s result (its error raised here), reporting and checking cancel every 0.05 s meanwhile."""
        while not finished(job, 0.05):
            tracker.tick()
        return job.result()


def _slab_metrics(tracker: Progress, stage: dict, slab: Slab, rgb: np.ndarray, grayscale: bool, axis: int,
                  slice_metrics: _SliceMetrics, colour_acc, pool) -> None:
    """The metrics of one slab: its non-empty slices to ``slice_metrics``, its coloured voxels to ``colour_acc``.

    On a CPU with several torch threads, ``pool`` is the run's
    :func:`~MedicalFusionLib.device.cpu_workers` block: the colour metrics start on one of its
    workers while this thread makes the 8-bit images and hands the slices' metrics to the same
    workers (before, the colour metrics ran alone after them, on one core of two). The values do not
    depend on the timing: the colour accumulator takes the slabs one at a time, in order (this
    slab's colour metrics end before the next slab's start), and every torch operation runs on one
    thread, as before. Progress and cancel stay in this thread (the callbacks may drive a UI); a
    cancel stops the worker at its next batch of voxels, and an error in it is raised here."""
    stop = threading.Event()

    def colour_in_worker() -> None:
        def tick(done, total) -> None:
            if stop.is_set():
                raise FusionCancelled("fusion cancelled")

        colour_acc.add(rgb, slab.functional_ycc, slab.functional_level, slab.bone, axis, tick=tick)

    colour_job = None if colour_acc is None or pool is None else pool.submit(colour_in_worker)
    try:
        _slice_metrics_of_slab(tracker, stage, slab, rgb, grayscale, axis, slice_metrics, pool)
        if colour_acc is not None:
            tracker.stage("metrics", *stage["colour"])
            progress_m, cancel_m = tracker.callbacks()
            with Progress(progress_m, cancel_m, phases=(("colour", 1.0),)) as inner:
                inner.phase("colour")
                if colour_job is None:
                    colour_acc.add(rgb, slab.functional_ycc, slab.functional_level, slab.bone, axis,
                                   tick=inner.advance)
                else:
                    while not finished(colour_job, 0.05):
                        inner.tick()                         # progress and cancel, every 0.05 s at most
                    colour_job.result()                      # the worker's error, if any, here
                    inner.advance(1, 1)
    finally:
        stop.set()                                           # on an error or a cancel: the worker stops


def _slice_metrics_of_slab(tracker: Progress, stage: dict, slab: Slab, rgb: np.ndarray, grayscale: bool, axis: int,
                           slice_metrics: _SliceMetrics, pool) -> None:
    tracker.stage("metrics", *stage["metrics"])
    a8, b8 = _gray8_sources(slab.anatomical, slab.functional_ycc, grayscale, lambda f: tracker.advance(0.06 * f, 1.0),
                            slab.functional_gray8)
    f8 = by_slabs(colour.gray8, rgb, lambda f: tracker.advance(0.06 + 0.02 * f, 1.0))
    # the metrics space their own reports (their Progress): passed through unthrottled, as
    # Progress.callbacks() does, so the start of their phases always reaches the panel
    progress_m, cancel_m = tracker.callbacks()
    slice_metrics.add(a8, b8, f8,
                      progress=(lambda d, t: tracker.advance(0.08 + 0.92 * d / t, 1.0, force=True)) if progress_m else None,
                      cancel=cancel_m, pool=pool)


#: Voxels per streamed slab: :func:`fuse_images` makes the voxels of, fuses, recombines and measures
#: one slab of whole slices at a time, so its working memory is bounded by the slab, not the volume.
STREAM_VOXELS = 1 << 22
#: Voxels per streamed slab when slabs are finished behind the fusion (:class:`_Behind`): smaller
#: slabs, so that the last one's recombination and metrics, which nothing hides, are a small part
#: of the run.
BEHIND_STREAM_VOXELS = 1 << 20
#: Bytes of working memory per voxel of a streamed slab (normalised inputs, YCbCr, fused luma,
#: recombination and metrics temporaries): about 75 measured (lp, quick metrics, 256x256x180: 585 MB
#: beyond the inputs, docs/BENCHMARKS.md), with a margin.
SLAB_BYTES_PER_VOXEL = 100
#: Memory a run needs whatever the volume (torch's and the method's working sets, the metrics'
#: batches): about 200 MB measured on a small volume, with a margin for the larger networks.
FIXED_BYTES = 400 * 2**20
NO_CONTENT = "no slice has anatomical or functional content: check the inputs are not empty"


def memory_needed(size: tuple[int, ...], voxel_bytes: int = 1, functional_voxels: int = 0,
                  options: FusionOptions | None = None) -> int:
    """Bytes a :func:`fuse_images` run (and writing its result) needs beyond its two inputs, for an
    anatomical of ``size`` (ITK x, y[, z]) with ``voxel_bytes`` per voxel and a functional of
    ``functional_voxels`` voxels (all components).

    Per anatomical voxel: the RGB result (3 bytes) and, at the most demanding moment after it
    exists, the larger of the colour metrics' per-voxel values (chroma ratio, read-back error, bone
    flag: 7 bytes, when measuring) and writing the result (a copy to write and one read back: 6
    bytes, counted as 9: the 700x700x700 and 512x512x1000 runs of docs/BENCHMARKS.md peaked while
    writing at about 12 bytes a voxel beyond the inputs, with a whole-volume comparison since
    made slab by slab); before it, an automatic anatomical window (a mask and two copies of the foreground).
    Per functional voxel: its float32 copy for resampling. Plus one streamed slab's working memory
    (:data:`SLAB_BYTES_PER_VOXEL` per voxel of a slab of :func:`slab_slices`, or of three slabs of
    :data:`BEHIND_STREAM_VOXELS` when that is more: with CPU workers) and :data:`FIXED_BYTES`.
    """
    options = options or FusionOptions()
    voxels = int(np.prod(size))
    window = (2 * voxel_bytes + 1) * voxels if options.anatomical_window is None else 0
    after = 3 * voxels + max(7 * voxels if options.compute_metrics else 0, 9 * voxels)
    shape = tuple(reversed(size)) if len(size) == 3 else (1,) + tuple(reversed(size))
    largest_slice = max(shape[1] * shape[2], shape[0] * shape[2], shape[0] * shape[1])
    slab_voxels = max(min(STREAM_VOXELS, voxels), largest_slice)
    # with CPU workers three smaller slabs are alive at once: one made ahead, one fused, one finished behind
    behind_slab = min(voxels, max(BEHIND_STREAM_VOXELS // largest_slice * largest_slice, largest_slice))
    slab_voxels = max(slab_voxels, 3 * behind_slab)
    return FIXED_BYTES + max(window, after) + 4 * functional_voxels + SLAB_BYTES_PER_VOXEL * slab_voxels


def study_memory(anatomical: sitk.Image, functional: sitk.Image, options: FusionOptions | None = None) -> int:
    """:func:`memory_needed` for two images."""
    return memory_needed(anatomical.GetSize(),
                         anatomical.GetSizeOfPixelComponent() * anatomical.GetNumberOfComponentsPerPixel(),
                         functional.GetNumberOfPixels() * functional.GetNumberOfComponentsPerPixel(), options)


def available_memory() -> int | None:
    """Bytes of memory available to this process now: ``MEDICALFUSION_MEMORY_AVAILABLE`` (bytes, or
    with a K/M/G suffix) when set, else the operating system's figure (psutil, /proc/meminfo); None
    when unknown."""
    text = os.environ.get("MEDICALFUSION_MEMORY_AVAILABLE", "").strip()
    if text:
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        try:
            return int(float(text[:-1] if scale > 1 else text) * scale)
        except ValueError:
            raise FusionError(f"MEDICALFUSION_MEMORY_AVAILABLE={text!r} is not a size: give bytes, e.g. 8G") from None
    try:
        import psutil  # noqa: PLC0415

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size_text(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def check_memory(anatomical: sitk.Image, functional: sitk.Image, options: FusionOptions | None = None) -> None:
    """FusionError, before any work, when the run needs more memory than is available."""
    available = available_memory()
    if available is None:
        return
    need = study_memory(anatomical, functional, options)
    if need > available:
        size = "x".join(map(str, anatomical.GetSize()))
        raise FusionError(f"this study needs about {_size_text(need)} of memory beyond its inputs (anatomical {size}) "
                          f"but {_size_text(available)} is available: close other programs, or crop or downsample "
                          "the anatomical volume")


def fuse_images(anatomical: sitk.Image, functional: sitk.Image, options: FusionOptions | None = None,
                progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                transform: sitk.Transform | None = None) -> FusionResult:
    """Fuse a registered pair of SimpleITK images (2D or 3D; functional scalar or RGB).

    ``progress(done, total)`` and ``cancel() -> bool`` are called at least every few tenths of a
    second from the start to the end (see :mod:`MedicalFusionLib.progress`); a cancel raises
    FusionCancelled and nothing is returned. A study that needs more memory than is available
    (:func:`memory_needed`) is refused with FusionError before any work.
    """
    options = validate(options or FusionOptions())   # every check that needs no image, before any work
    check_memory(anatomical, functional, options)
    with Progress(progress, cancel, pipeline_phases(options.compute_metrics)) as tracker:
        tracker.phase("prepare")
        prepared = prepare(anatomical, functional, options, transform, tracker)
        # the header of the run (windows, overlap) takes the first fifth of the prepare phase
        result = _fuse_prepared(prepared, options, tracker, base=HEADER_SHARE * _prepare_share(options.compute_metrics))
        tracker.finish()
    return result


#: The share of the 'prepare' phase taken by :func:`prepare` before the slabs (windows, overlap).
HEADER_SHARE = 0.2


def _prepare_share(compute_metrics: bool) -> float:
    phases = dict(pipeline_phases(compute_metrics))
    return phases["prepare"] / sum(phases.values())
