"""Registration on demand: align the functional volume to the anatomical one before fusion.

The functional (moving) image is aligned to the anatomical (fixed) image by maximising Mattes
mutual information (Mattes et al., IEEE TMI 22(1):120-128, 2003) with SimpleITK's registration
framework: a rigid (Euler, 6 parameters) or affine (12 parameters) transform, a multi-resolution
shrink/smooth pyramid, random metric sampling with a fixed seed (the same inputs give the same
result), regular-step gradient descent with parameter scales estimated from physical shifts.

The start is the placement the images already have (their scanner coordinates, or a transform the
user gives) when the two overlap; otherwise the centres of intensity mass are matched
(SimpleITK's CenteredTransformInitializer, MOMENTS).

The result is a transform, never a resampled image. Its convention is ITK's: it maps a physical
point (LPS, mm) of the anatomical to the physical point of the functional that lands there, which is
what :func:`MedicalFusionLib.pipeline.fuse_images` takes as ``transform`` and what an ITK transform
file (.tfm) holds. 3D Slicer reads such a file as the transform *from parent*: set as the
functional's parent transform, it shows the functional aligned to the anatomical. In a scene the
same transform becomes a linear transform node (see :func:`ras_matrix`).

A registration that fails or does not converge raises a one-line :class:`FusionError`, never a
silently bad fusion. The criteria (:func:`check_converged`):

- SimpleITK raised (e.g. too few samples inside both images);
- the match got worse: the normalised mutual information of the full images over the voxels both
  placements share (:func:`normalized_mutual_information`) is lower at the end than at the start
  by more than :data:`MAX_METRIC_LOSS`;
- the images overlap little after registration (less than :data:`MIN_OVERLAP` of the smaller image
  inside the other);
- the optimizer used all iterations of the finest level while the mutual information was still
  improving by more than :data:`MAX_FINAL_GAIN` over the last :data:`MOTION_WINDOW` iterations;
- affine only: a scale outside 1/3..3 (the singular values of the matrix) or a mirroring;
- it moved the functional by more than :data:`MAX_MOVE_MM` from where it started (measured at the
  anatomical's centre): registration refines a rough placement, and on cropped studies mutual
  information can prefer a match of the wrong structures far away (a real PET->MR pair ended 47-74
  mm off after 20 mm misalignments, with a higher mutual information than the true alignment).

Progress and cancel: ``progress(done, total)`` is called on every optimizer iteration (done counts
iterations over all levels; total is their maximum); ``cancel()`` is asked at the same moments and
stops the registration at that iteration (:class:`FusionCancelled`).
"""
from __future__ import annotations

import logging
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .align import overlap_fraction
from .errors import FusionCancelled, FusionError

KINDS = ("rigid", "affine")
#: File names ITK writes transforms to (.tfm/.txt: text, which Slicer reads; .h5/.hdf5: HDF5; .mat: Matlab).
TRANSFORM_EXTENSIONS = (".tfm", ".txt", ".h5", ".hdf5", ".mat")
#: Smallest fraction of the smaller image that must lie inside the other after registration.
MIN_OVERLAP = 0.25
#: The normalised mutual information at the end may be below the start's by at most this much.
MAX_METRIC_LOSS = 0.005
#: When the optimizer ran out of iterations at the finest level, the mutual information may have
#: improved by at most this fraction over its last :data:`MOTION_WINDOW` iterations.
MAX_FINAL_GAIN = 1e-3
MOTION_WINDOW = 10
#: The affine stage runs the last this many levels of the pyramid, from the rigid result.
AFFINE_LEVELS = 2
#: Singular values of an affine registration's matrix must lie in [1/MAX_SCALE, MAX_SCALE].
MAX_SCALE = 3.0
#: The largest move (mm, at the anatomical's centre) from the start that is taken as a refinement:
#: the issue's misalignments (20 mm and 10 degrees about each axis) need at most ~35 mm.
MAX_MOVE_MM = 40.0

logger = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


@dataclass
class RegistrationSettings:
    """How the optimisation runs (defaults chosen with scripts/bench_registration.py)."""

    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (4.0, 2.0, 0.0)
    histogram_bins: int = 32
    samples: int = 20000                 # metric samples per level (a fraction of the level's voxels)
    iterations: int = 200                # at most, per level
    learning_rate: float = 2.0           # first step, in mm of the largest point shift
    min_step: float = 1e-3
    relaxation: float = 0.7              # step shrink when the gradient turns back
    start: str = "auto"                  # auto | placement | moments
    sampling: str = "regular"            # regular (a jittered grid) | random
    seed: int = 7


@dataclass
class Registration:
    """What :func:`register` found."""

    transform: sitk.AffineTransform      # anatomical physical point (LPS) -> functional physical point
    kind: str
    start: str                           # 'placement', 'given transform' or 'moments'
    metric_before: float                 # normalised mutual information (higher: better) at the start
    metric_after: float                  # ... and at the end
    overlap: float                       # fraction of the smaller image inside the other, after
    iterations: int                      # optimizer iterations over all levels
    stop_condition: str                  # the optimizer's own words, finest level
    still_improving: float               # relative metric gain over the last iterations of the finest level
    seconds: float
    level_iterations: list = field(default_factory=list)
    moved_mm: float = 0.0                # how far the result is from the start at the anatomical's centre

    def summary(self) -> str:
        return (f"{self.kind} registration: normalised mutual information {self.metric_before:.3f} -> "
                f"{self.metric_after:.3f}, "
                f"{self.iterations} iterations, {self.seconds:.1f} s")


# --------------------------------------------------------------------------------------------------
# transforms: LPS <-> 4x4, files


def affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 homogeneous matrix (LPS) of a linear SimpleITK transform, from its action on points."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    m = np.eye(4)
    for i in range(3):
        e = [0.0, 0.0, 0.0]
        e[i] = 1.0
        m[:3, i] = np.array(transform.TransformPoint(tuple(e))) - origin
    m[:3, 3] = origin
    return m


def affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    """A SimpleITK affine transform from a 4x4 homogeneous matrix (LPS)."""
    t = sitk.AffineTransform(3)
    t.SetMatrix(np.asarray(matrix[:3, :3], dtype=float).ravel().tolist())
    t.SetTranslation(np.asarray(matrix[:3, 3], dtype=float).tolist())
    return t


_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_matrix(transform: sitk.Transform) -> np.ndarray:
    """The transform as a 4x4 matrix in RAS: Slicer's 'transform from parent' of the functional."""
    return _FLIP @ affine_matrix(transform) @ _FLIP


def moved_geometry(image: sitk.Image, matrix: np.ndarray) -> sitk.Image:
    """``image`` placed elsewhere by the 4x4 ``matrix`` (LPS), voxels untouched: physical point p of
    the input is point matrix(p) of the output. Simulates a misregistration (benchmark, tests).
    Scaling must be along the image's axes (ITK direction cosines stay orthonormal; the scale goes
    into the spacing)."""
    linear = matrix[:3, :3] @ np.array(image.GetDirection()).reshape(3, 3)
    scale = np.linalg.norm(linear, axis=0)
    direction = linear / scale
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-9):
        raise ValueError("moved_geometry: the matrix shears the image's axes (not representable by a geometry)")
    out = sitk.Image(image)
    out.SetDirection(direction.ravel().tolist())
    out.SetSpacing((np.array(image.GetSpacing()) * scale).tolist())
    out.SetOrigin((matrix[:3, :3] @ np.array(image.GetOrigin()) + matrix[:3, 3]).tolist())
    return out


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read an ITK transform file (.tfm, .txt, .h5, .mat as Slicer and ITK write them)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FusionError(f"transform file {p} does not exist: check the path "
                          "(an ITK .tfm/.h5 file, e.g. saved by Slicer)")
    try:
        transform = sitk.ReadTransform(str(p))
    except RuntimeError:
        raise FusionError(f"transform file {p} is not an ITK transform SimpleITK can read: "
                          "give a .tfm/.h5 file written by ITK, SimpleITK or Slicer") from None
    if transform.GetDimension() != 3:
        raise FusionError(f"transform file {p} holds a {transform.GetDimension()}D transform: give a 3D transform")
    if transform.IsLinear():
        m = affine_matrix(transform)
        if not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-6:
            raise FusionError(f"transform file {p} holds a singular or non-finite matrix: give an invertible transform")
        return affine_transform(m)
    return transform


def check_transform_path(path: str | os.PathLike, what: str = "transform file") -> None:
    """Refuse a transform file name ITK cannot write (before any work)."""
    name = pathlib.Path(path).name.lower()
    if not name.endswith(TRANSFORM_EXTENSIONS):
        raise FusionError(f"{what} {path}: not a transform file name: use the extension .tfm (ITK text, which "
                          "Slicer reads) or .h5")


def write_transform(transform: sitk.Transform, path: str | os.PathLike, out=None) -> None:
    """Write an ITK transform file through ``out``, the run's :class:`~MedicalFusionLib.outputs.OutputSet`
    (put in place with the run's other outputs), or on its own, all or nothing."""
    from .outputs import OutputSet  # noqa: PLC0415

    check_transform_path(path)

    def write(tmp):
        sitk.WriteTransform(transform, str(tmp))
    if out is not None:
        out.add_file(path, write, "transform file")
        return
    with OutputSet() as own:
        own.add_file(path, write, "transform file")
        own.commit()


# --------------------------------------------------------------------------------------------------
# registration


def registration_image(image: sitk.Image, role: str) -> sitk.Image:
    """A scalar float32 3D image for the metric: RGB becomes its BT.601 luma. 2D is refused."""
    from .colour import rgb_to_ycbcr  # noqa: PLC0415
    from .sources import as_3d  # noqa: PLC0415

    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(image.GetSize()) < 4):
        raise FusionError(f"the {role} image is 2D or has fewer than 4 slices: registration needs two 3D volumes")
    image, _ = as_3d(image, role)
    if image.GetNumberOfComponentsPerPixel() == 3:
        rgb = sitk.GetArrayViewFromImage(image).astype(np.float32) / 255.0
        luma = sitk.GetImageFromArray(rgb_to_ycbcr(rgb)[..., 0])
        luma.CopyInformation(image)
        return luma
    return sitk.Cast(image, sitk.sitkFloat32)


def normalized_mutual_information(fixed: sitk.Image, moving: sitk.Image, transforms: list,
                                  bins: int = 32) -> list[float]:
    """How well the pair matches under each of ``transforms``, measured alike: normalised mutual
    information in [0, 1] (2 MI / (H(A) + H(B)): scikit-learn's normalized_mutual_info_score) of the
    fixed image's voxels that lie inside the moved image under *every* transform (one common
    overlap, so a placement is not rewarded for seeing less), each image quantised to ``bins``
    levels over its own 0.5-99.5th percentiles (one outlier voxel does not squash the rest into a
    bin). NaN for all when fewer than 1000 voxels are shared."""
    from sklearn.metrics import normalized_mutual_info_score  # noqa: PLC0415

    def levels(values: np.ndarray, image: sitk.Image) -> np.ndarray:
        lo, hi = np.percentile(sitk.GetArrayViewFromImage(image), [0.5, 99.5])
        return np.clip(((values - lo) / max(hi - lo, 1e-12) * bins).astype(np.int64), 0, bins - 1)

    moved = [sitk.GetArrayFromImage(sitk.Resample(moving, fixed, t, sitk.sitkLinear, float("nan"), sitk.sitkFloat32))
             for t in transforms]
    inside = np.logical_and.reduce([np.isfinite(m) for m in moved])
    if inside.sum() < 1000:
        return [float("nan")] * len(transforms)
    a = levels(sitk.GetArrayViewFromImage(fixed)[inside], fixed)
    return [float(normalized_mutual_info_score(a, levels(m[inside], moving))) for m in moved]


def _sampling_fraction(fixed: sitk.Image, samples: int, shrink: int = 1) -> float:
    voxels = float(np.prod(fixed.GetSize())) / float(shrink) ** 3
    return float(min(1.0, max(samples / max(voxels, 1.0), 1e-4)))


def mutual_overlap(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Fraction of the smaller image (in physical volume) that lies inside the other one."""
    inside_moving = overlap_fraction(fixed, moving, transform)
    inverse = affine_transform(np.linalg.inv(affine_matrix(transform)))
    inside_fixed = overlap_fraction(moving, fixed, inverse)
    fixed_volume = np.prod(fixed.GetSize()) * np.prod(fixed.GetSpacing())
    moving_volume = np.prod(moving.GetSize()) * np.prod(moving.GetSpacing())
    return float(inside_fixed if moving_volume <= fixed_volume else inside_moving)


def _start_transform(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform | None,
                     start: str) -> tuple[np.ndarray, str]:
    """The 4x4 (LPS) start: the given transform, the stored placement, or the moments' match."""
    if start not in ("auto", "placement", "moments"):
        raise FusionError(f"unknown registration start '{start}': use auto, placement or moments")
    placement = affine_matrix(initial) if initial is not None else np.eye(4)
    label = "given transform" if initial is not None else "placement"
    if start == "placement":
        return placement, label
    if start == "auto" and mutual_overlap(fixed, moving, affine_transform(placement)) >= 0.5:
        return placement, label
    # Centres of intensity mass (intensities shifted to be non-negative: CT is in HU).
    def positive(img):
        return sitk.Cast(img - float(sitk.GetArrayViewFromImage(img).min()), sitk.sitkFloat32)
    moments = sitk.CenteredTransformInitializer(positive(fixed), positive(moving), sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    m = placement.copy()
    m[:3, 3] = affine_matrix(moments)[:3, 3] + (placement[:3, :3] - np.eye(3)) @ np.array(moments.GetCenter())
    return m, "moments"


def register(anatomical: sitk.Image, functional: sitk.Image, kind: str = "rigid",
             initial: sitk.Transform | None = None, progress: ProgressFn | None = None,
             cancel: CancelFn | None = None, settings: RegistrationSettings | None = None) -> Registration:
    """Align ``functional`` to ``anatomical``; returns the transform (anatomical -> functional points).

    ``initial``: a linear transform to start from (e.g. one read with :func:`read_transform`, or the
    functional's present parent transform in Slicer); None starts from the images' placement.
    An affine registration first runs the rigid one and continues from its result.
    Raises FusionError (bad input, failed or not converged), FusionCancelled (cancel() said so).
    """
    if kind not in KINDS:
        raise FusionError(f"unknown registration '{kind}': use rigid or affine")
    settings = settings or RegistrationSettings()
    if initial is not None and not initial.IsLinear():
        raise FusionError("the transform to start the registration from is not linear: "
                          "start from a rigid or affine transform (or none)")
    t0 = time.perf_counter()
    fixed = registration_image(anatomical, "anatomical")
    moving = registration_image(functional, "functional")
    matrix, start = _start_transform(fixed, moving, initial, settings.start)
    stages = ("rigid",) if kind == "rigid" else ("rigid", "affine")
    levels = len(settings.shrink_factors)
    levels += min(AFFINE_LEVELS, levels) if kind == "affine" else 0
    tracker = _Tracker(progress, cancel, settings.iterations * levels)
    tracker.check_cancel()
    try:
        start_matrix, start_tx = matrix, affine_transform(matrix)
        for stage in stages:
            matrix, stop_condition = _run_stage(fixed, moving, matrix, stage, settings, tracker)
        final = affine_transform(matrix)
        metric_before, metric_after = normalized_mutual_information(fixed, moving, [start_tx, final],
                                                                    settings.histogram_bins)
    except RuntimeError as exc:
        if tracker.cancelled:
            raise FusionCancelled("registration cancelled") from None
        text = str(exc).strip()
        reason = text.splitlines()[-1].strip() if text else "unknown reason"
        if "samples" in text.lower() or "outside" in text.lower():
            reason = "the images overlap too little"
        raise FusionError(f"the {kind} registration failed ({reason}): check that both volumes show the same "
                          "region, or place them roughly first (e.g. with a transform to start from)") from None
    values = tracker.values
    still_improving = (values[0] - values[-1]) / max(abs(values[-1]), 1e-12) if len(values) > 1 else 0.0
    outcome = Registration(
        transform=final, kind=kind, start=start, metric_before=metric_before, metric_after=metric_after,
        overlap=mutual_overlap(fixed, moving, final), iterations=tracker.iterations, stop_condition=stop_condition,
        still_improving=float(still_improving), seconds=time.perf_counter() - t0,
        level_iterations=list(tracker.level_iterations), moved_mm=_moved(fixed, start_matrix, matrix))
    check_converged(outcome, settings)
    return outcome


def _moved(fixed: sitk.Image, start: np.ndarray, end: np.ndarray) -> float:
    """How far apart ``start`` and ``end`` (4x4, anatomical -> functional) put the anatomical's centre (mm)."""
    centre = np.append(fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()]), 1.0)
    return float(np.linalg.norm((end @ centre - start @ centre)[:3]))


class _Tracker:
    """Progress over all stages and levels, cancel, and the finest level's last metric values."""

    def __init__(self, progress: ProgressFn | None, cancel: CancelFn | None, total: int):
        self.progress, self.cancel, self.total = progress, cancel, total
        self.offset, self.iterations, self.cancelled = 0, 0, False
        self.values: list[float] = []
        self.level_iterations: list[int] = []

    def check_cancel(self) -> bool:
        if self.cancel is not None and self.cancel():
            self.cancelled = True
        if self.cancelled:
            raise FusionCancelled("registration cancelled")
        return False

    def new_level(self, per_level: int) -> None:
        if self.level_iterations:
            self.offset += per_level
        self.level_iterations.append(0)
        self.values = []

    def iteration(self, value: float) -> bool:
        """Record one iteration; True when the user asked to cancel."""
        self.level_iterations[-1] += 1
        self.iterations += 1
        self.values = (self.values + [value])[-MOTION_WINDOW - 1:]
        if self.progress is not None:
            self.progress(min(self.offset + self.level_iterations[-1], self.total), self.total)
        if self.cancel is not None and self.cancel():
            self.cancelled = True
        return self.cancelled


def _run_stage(fixed: sitk.Image, moving: sitk.Image, start: np.ndarray, kind: str, settings: RegistrationSettings,
               tracker: _Tracker) -> tuple[np.ndarray, str]:
    """One multi-resolution optimisation of a rigid or affine transform from ``start`` (4x4, LPS),
    one level at a time (each level starts where the previous one ended)."""
    # Rotations must turn about the anatomy, whatever the start: x -> start(optimised(x)) with the
    # optimised transform centred on the anatomical's centre c. SimpleITK (2.5) drops the centre of
    # the optimised transform when a moving initial transform is set (it then turns about the world
    # origin: on volumes hundreds of mm from it, as CT/PET of the legs, the rotation scales grow
    # ~40x, rotation and translation couple, and the optimizer creeps for all its iterations). So
    # the images are shifted by -c (geometry only) and the problem is solved where c is the origin.
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()]))
    shift = np.eye(4)
    shift[:3, 3] = -centre
    fixed, moving = _shifted(fixed, -centre), _shifted(moving, -centre)
    current = shift @ start @ np.linalg.inv(shift)
    # The affine stage refines the rigid result: the finer levels only (from the coarsest, MI's
    # landscape on heavily smoothed images pulls scales away and the fine levels do not recover).
    levels = slice(None) if kind == "rigid" else slice(-AFFINE_LEVELS, None)
    shrink, sigmas = settings.shrink_factors[levels], settings.smoothing_sigmas_mm[levels]
    stop_condition = ""
    for factor, sigma in zip(shrink, sigmas):
        tracker.new_level(settings.iterations)
        current, stop_condition = _run_level(fixed, moving, current, kind, factor, sigma, settings, tracker)
    return np.linalg.inv(shift) @ current @ shift, stop_condition


def _run_level(fixed: sitk.Image, moving: sitk.Image, start: np.ndarray, kind: str, shrink: int, sigma: float,
               settings: RegistrationSettings, tracker: _Tracker) -> tuple[np.ndarray, str]:
    """One pyramid level from ``start`` (4x4, centred frame); returns the result and the
    optimizer's stop condition."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM if settings.sampling == "random" else method.REGULAR)
    method.SetMetricSamplingPercentagePerLevel([_sampling_fraction(fixed, settings.samples, shrink)], settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    # The affine stage takes image gradients from the interpolator, consistent with the values the
    # metric measures: ITK's default gradient filter (a smoothed gradient image) pulls scales away
    # (measured on the test phantoms). For rigid, the default was as good or better.
    method.SetMetricUseFixedImageGradientFilter(kind == "rigid")
    method.SetMetricUseMovingImageGradientFilter(kind == "rigid")
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate, minStep=settings.min_step, numberOfIterations=settings.iterations,
        relaxationFactor=settings.relaxation, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([int(shrink)])
    method.SetSmoothingSigmasPerLevel([float(sigma)])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    # The start goes in as the moving initial transform (its centre, the origin here, is where the
    # anatomical's centre is: see _run_stage).
    method.SetMovingInitialTransform(affine_transform(start))
    method.SetInitialTransform(sitk.Euler3DTransform() if kind == "rigid" else sitk.AffineTransform(3), inPlace=False)

    def on_iteration() -> None:
        if tracker.iteration(method.GetMetricValue()):
            method.StopRegistration()

    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    result = method.Execute(fixed, moving)
    tracker.check_cancel()
    # SimpleITK returns the optimised transform alone: compose it with the start (start after it).
    return start @ affine_matrix(result), method.GetOptimizerStopConditionDescription()


def _shifted(image: sitk.Image, offset: np.ndarray) -> sitk.Image:
    """The image moved by ``offset`` (mm), voxels untouched (a copy: the input keeps its origin).
    Not :func:`moved_geometry`, whose orthonormality check refuses directions read from files at
    float precision."""
    out = sitk.Image(image)
    out.SetOrigin((np.array(image.GetOrigin()) + offset).tolist())
    return out


def check_converged(outcome: Registration, settings: RegistrationSettings) -> None:
    """Raise a one-line FusionError when the registration did not do its job (criteria: module doc)."""
    what = f"the {outcome.kind} registration"
    if outcome.metric_after < outcome.metric_before - MAX_METRIC_LOSS:      # (NaN: no common overlap, no verdict)
        raise FusionError(f"{what} made the match worse (normalised mutual information {outcome.metric_before:.3f} "
                          f"at the start, {outcome.metric_after:.3f} at the end): place the volumes roughly first or "
                          "check the inputs")
    if outcome.overlap < MIN_OVERLAP:
        raise FusionError(f"{what} failed: only {100 * outcome.overlap:.0f}% of the smaller volume overlaps the other "
                          "afterwards: place the volumes roughly first or check the inputs")
    last = outcome.level_iterations[-1] if outcome.level_iterations else 0
    if last >= settings.iterations and outcome.still_improving > MAX_FINAL_GAIN:
        raise FusionError(f"{what} did not converge: after {last} iterations at full resolution the mutual information "
                          f"still improved by {100 * outcome.still_improving:.2f}% over the last {MOTION_WINDOW}: "
                          "place the volumes roughly first or check the inputs")
    if outcome.kind == "affine":
        singular = np.linalg.svd(affine_matrix(outcome.transform)[:3, :3], compute_uv=False)
        det = np.linalg.det(affine_matrix(outcome.transform)[:3, :3])
        if det <= 0 or singular.max() > MAX_SCALE or singular.min() < 1.0 / MAX_SCALE:
            raise FusionError(f"{what} failed: it scaled the volume by {singular.min():.2f}..{singular.max():.2f}"
                              f"{' and mirrored it' if det <= 0 else ''}: try rigid, or check the inputs")
    if outcome.moved_mm > MAX_MOVE_MM:
        raise FusionError(f"{what} moved the functional {outcome.moved_mm:.0f} mm from where it started (more than "
                          f"{MAX_MOVE_MM:.0f} mm), so it may have matched the wrong structures: place the volumes "
                          "roughly first (within 2-3 cm) or check the inputs")


# --------------------------------------------------------------------------------------------------
# DICOM: already registered?


def note_if_already_registered(anatomical_uid: str | None, functional_uid: str | None) -> str | None:
    """Log (warning) that two DICOM series share a FrameOfReferenceUID (as their headers were read:
    ``dicom.SeriesFacts.frame_of_reference_uid``); returns it, or None."""
    uid = anatomical_uid if anatomical_uid and anatomical_uid == functional_uid else None
    if uid:
        logger.warning("both DICOM series share the FrameOfReferenceUID %s: they are already registered (one "
                       "scanner session, or registered and resampled before export); --register is not needed", uid)
    return uid
