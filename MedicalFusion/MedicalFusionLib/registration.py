"""Registration on demand: align the functional volume to the anatomical one before fusion.

The functional (moving) image is aligned to the anatomical (fixed) image by maximising Mattes
mutual information (Mattes et al., IEEE TMI 22(1):120-128, 2003) with SimpleITK's registration
framework: a rigid (Euler, 6 parameters) or affine (12 parameters) transform, a multi-resolution
shrink/smooth pyramid, metric sampling with a fixed seed and the metric on one thread (the same
inputs give the same result, bit for bit: :func:`itk_threads`), image gradients from the
interpolator, regular-step gradient descent with parameter scales estimated from physical shifts.
A CT in Hounsfield units is seen by the metric with its bone saturated (:func:`bone_saturated`), so
that bone and metal do not take most of the histogram's bins from the soft tissues.

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

How sure: the same registration also runs from :attr:`RegistrationSettings.restarts` perturbed
starts (turned 5 degrees and shifted 10 mm) over the coarse levels; how far their answers lie from
the main one (mm, at the anatomical's centre and over the overlap) is the result's spread, and
more than one voxel of the coarser image makes :attr:`Registration.warning` (the caller shows it;
the command line's --strict-registration refuses it).

Progress and cancel: ``progress(done, total)`` is called on every optimizer iteration of every
start (done counts iterations over all levels and starts; total is their maximum), and between
every two steps of work and inside SimpleITK's filters (their progress events) the last report is
repeated at most every 0.1 s (the heartbeat); ``cancel()`` is asked at the same moments and stops
the registration there (the optimizer at that iteration, a filter aborted: :class:`FusionCancelled`).
The pyramid levels are made here (:func:`_level_images`), not by SimpleITK's framework, and the
match score is taken on a sub-grid (:func:`score_grid`), so no stretch is a whole volume's work
without a report (docs/REGISTRATION.md, "Progress and Cancel").
"""
from __future__ import annotations

import contextlib
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
from .progress import HEARTBEAT_SECONDS

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
    iterations: int = 200                # at most, per level ...
    coarsest_iterations: int = 400       # ... but the coarsest rigid level (it covers the whole misalignment)
    learning_rate: float = 2.0           # first step, in mm of the largest point shift
    min_step: float = 1e-3
    relaxation: float = 0.7              # step shrink when the gradient turns back
    start: str = "auto"                  # auto | placement | moments
    sampling: str = "regular"            # regular (a jittered grid) | random
    seed: int = 7
    finest_samples: int = 100_000        # the finest level, once settled: a short pass with more samples (0: none)
    refine_step: float = 0.25            # ... its first step (mm) ...
    refine_iterations: int = 50          # ... and its iterations at most
    first_pass_voxels: int = 0           # the finest level's first pass (when a second follows): its anatomical
                                         # grid subsampled to at most this many voxels (0: the whole grid)
    restarts: int = 2                    # perturbed starts run besides the main one, for the spread (0: none)
    restart_shift_mm: float = 10.0       # each perturbed start: shifted this far ...
    restart_turn_deg: float = 5.0        # ... and turned this much about the anatomical's centre
    restart_levels: int = 2              # the restarts run the first this many (coarsest) levels ...
    restart_budget: float = 0.5          # ... with this fraction of the main run's iterations at each
    uncertain_budget: float = 0.5        # the finest level of an answer the restarts already flag: this fraction
                                         # of its iterations (1: all; docs/REGISTRATION.md, "Time")
    level_voxels: int = 3_000_000        # a level's anatomical grid is subsampled to at most this many voxels
    gradient_filter: bool = False        # rigid: ITK's smoothed gradient images (True) or the interpolator's gradients
    ct_bone_hu: float = 300.0            # a CT (in HU) is saturated above this for the metric (bone one class; inf: off)
    threads: int = 1                     # ITK threads while registering (1: the same answer bit for bit; 0: ITK's default)


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
    level_budgets: list = field(default_factory=list)    # the main run's iterations allowed at each level
    refine_iterations: int = 0           # the finest level's last pass with more samples (0: not run)
    moved_mm: float = 0.0                # how far the result is from the start at the anatomical's centre
    restarts: int = 0                    # perturbed starts run besides the main one
    restarts_failed: int = 0             # ... of which SimpleITK gave up (the spread is then infinite)
    spread_centre_mm: float = float("nan")   # largest distance of a restart's answer from the main one, at the anatomical's centre
    spread_overlap_mm: float = float("nan")  # ... the largest over the overlap of the two images
    spread_limit_mm: float = float("nan")    # one voxel of the coarser image: a larger spread is a warning

    @property
    def warning(self) -> str | None:
        """One line when the answer is uncertain (the restarts disagree by more than a voxel), else None."""
        if self.restarts < 1 or self.spread_overlap_mm <= self.spread_limit_mm:
            return None
        if self.restarts_failed:
            what = f"{self.restarts_failed} of {self.restarts} restarts from perturbed starts failed"
        else:
            what = (f"restarted from {self.restarts} perturbed starts it ends up to {self.spread_overlap_mm:.1f} mm "
                    f"apart over the overlap ({self.spread_centre_mm:.1f} mm at the anatomical's centre), more than "
                    f"one voxel of the coarser image ({self.spread_limit_mm:.1f} mm)")
        return (f"the {self.kind} registration is uncertain: {what}: check the alignment before using the fusion, "
                "or place the volumes roughly first")

    def spread_text(self) -> str:
        if self.restarts < 1:
            return "no restarts"
        return (f"spread {self.spread_centre_mm:.2f} mm at the centre, {self.spread_overlap_mm:.2f} mm over the "
                f"overlap (limit {self.spread_limit_mm:.1f} mm)")

    def summary(self) -> str:
        return (f"{self.kind} registration: normalised mutual information {self.metric_before:.3f} -> "
                f"{self.metric_after:.3f}, {self.spread_text()}, "
                f"{self.iterations} iterations, {self.seconds:.1f} s")

    def metadata(self) -> dict:
        """Key/value pairs for the transform node's attributes, the metrics CSV and file headers."""
        return {"registration": self.kind, "registration_start": self.start,
                "registration_normalized_mutual_information": f"{self.metric_before:.3f} -> {self.metric_after:.3f}",
                "registration_iterations": self.iterations,
                "registration_seconds": round(self.seconds, 3),
                "registration_restarts": self.restarts,
                "registration_spread_centre_mm": round(self.spread_centre_mm, 3),
                "registration_spread_overlap_mm": round(self.spread_overlap_mm, 3),
                "registration_spread_limit_mm": round(self.spread_limit_mm, 3),
                "registration_uncertain": self.warning is not None,
                "registration_warning": self.warning or ""}


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
    """Write an ITK transform file through ``out``, the run's :class:`~MedicalFusionLib.io.outputs.OutputSet`
    (put in place with the run's other outputs), or on its own, all or nothing."""
    from .io.outputs import OutputSet  # noqa: PLC0415

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
    from .images import as_3d  # noqa: PLC0415

    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(image.GetSize()) < 4):
        raise FusionError(f"the {role} image is 2D or has fewer than 4 slices: registration needs two 3D volumes")
    image, _ = as_3d(image, role)
    if image.GetNumberOfComponentsPerPixel() == 3:
        rgb = sitk.GetArrayViewFromImage(image).astype(np.float32) / 255.0
        luma = sitk.GetImageFromArray(rgb_to_ycbcr(rgb)[..., 0])
        luma.CopyInformation(image)
        return luma
    return sitk.Cast(image, sitk.sitkFloat32)


#: The match score (:func:`normalized_mutual_information`) is taken on a regular sub-grid of the
#: anatomical with at least this many points (all voxels when it has fewer).
SCORE_POINTS = 250_000


def score_grid(image: sitk.Image, points: int = SCORE_POINTS) -> sitk.Image:
    """Every k-th voxel of ``image`` along each axis, k the smallest giving at most ``points``
    voxels: voxel values and positions exactly the image's own."""
    k = max(1, int(np.ceil((float(np.prod(image.GetSize())) / points) ** (1.0 / 3.0))))
    return _subsampled(image, (k, k, k))


def normalized_mutual_information(fixed: sitk.Image, moving: sitk.Image, transforms: list,
                                  bins: int = 32, points: int = SCORE_POINTS) -> list[float]:
    """How well the pair matches under each of ``transforms``, measured alike: normalised mutual
    information in [0, 1] (2 MI / (H(A) + H(B)), as scikit-learn's normalized_mutual_info_score) of
    the fixed image's voxels that lie inside the moved image under *every* transform (one common
    overlap, so a placement is not rewarded for seeing less), each image quantised to ``bins``
    levels over its own 0.5-99.5th percentiles (one outlier voxel does not squash the rest into a
    bin). The fixed voxels are those of :func:`score_grid` (a regular sub-grid of at most ``points``
    voxels: the score of a 1 mm MR took 12-20 s at full resolution, and a regular sub-grid of a
    quarter of a million voxels gives the same value within ~1e-3). NaN for all when fewer than 1000
    voxels are shared."""
    grid = score_grid(fixed, points)
    moved = [sitk.GetArrayFromImage(sitk.Resample(moving, grid, t, sitk.sitkLinear, float("nan"), sitk.sitkFloat32))
             for t in transforms]
    inside = np.logical_and.reduce([np.isfinite(m) for m in moved])
    if inside.sum() < 1000:
        return [float("nan")] * len(transforms)
    a = _levels(sitk.GetArrayViewFromImage(grid)[inside], sitk.GetArrayViewFromImage(grid), bins)
    reference = sitk.GetArrayFromImage(score_grid(moving, points))   # a copy: the sub-grid is a temporary
    return [_nmi(a, _levels(m[inside], reference, bins), bins) for m in moved]


#: A CT in Hounsfield units is recognised by its lowest percentile: air, in this range (HU).
CT_AIR_HU = (-1100.0, -900.0)


def bone_saturated(image: sitk.Image, bone_hu: float, tracker: "_Tracker | None" = None) -> sitk.Image:
    """The image the metric sees: a CT in Hounsfield units (its 1st percentile, on a sub-grid, is
    air: :data:`CT_AIR_HU`) saturated above ``bone_hu``; any other image (MR, PET, SPECT, a CT
    padded far below air) as it is. Mattes mutual information spreads its bins over each image's
    whole range (ITK: minimum to maximum), so on a CT with cortical bone or metal (up to +1400 to
    +3000 HU) a bin is 75-125 HU wide and fat, water, muscle and tumour (-100 to +60 HU) share two
    or three of 32 bins; saturated at +300 HU, bone and metal stay one bright class and the soft
    tissues get 2-3 times finer bins (docs/REGISTRATION.md, "Issue #20, last round")."""
    if not np.isfinite(bone_hu):
        return image
    values = sitk.GetArrayViewFromImage(score_grid(image, 20_000))
    if not CT_AIR_HU[0] <= float(np.percentile(values, 1)) <= CT_AIR_HU[1]:
        return image
    clamp = sitk.ClampImageFilter()
    clamp.SetLowerBound(float(np.finfo(np.float32).min))
    clamp.SetUpperBound(float(bone_hu))
    return _observed(clamp, image, tracker) if tracker is not None else clamp.Execute(image)


def _levels(values: np.ndarray, reference: np.ndarray, bins: int) -> np.ndarray:
    lo, hi = np.percentile(reference, [0.5, 99.5])
    return np.clip(((values - lo) / max(hi - lo, 1e-12) * bins).astype(np.int64), 0, bins - 1)


def _nmi(a: np.ndarray, b: np.ndarray, bins: int) -> float:
    """2 MI(a, b) / (H(a) + H(b)) of two label arrays in [0, bins) (1 when both are constant)."""
    joint = np.bincount(a * bins + b, minlength=bins * bins).reshape(bins, bins) / float(len(a))
    pa, pb = joint.sum(1), joint.sum(0)

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())
    ha, hb = entropy(pa), entropy(pb)
    if ha + hb <= 0.0:
        return 1.0
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return float(max(0.0, 2.0 * mi / (ha + hb)))


def _subsampled(image: sitk.Image, factors) -> sitk.Image:
    """Every ``factors[i]``-th voxel along axis i, from the first: the kept voxels keep their
    physical positions (origin and direction unchanged, spacing times the factor)."""
    factors = [int(f) for f in factors]
    if all(f == 1 for f in factors):
        return image
    arr = sitk.GetArrayViewFromImage(image)[::factors[2], ::factors[1], ::factors[0]]
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    out.SetSpacing([s * f for s, f in zip(image.GetSpacing(), factors)])
    return out


def _first_pass_grid(image: sitk.Image, max_voxels: int) -> sitk.Image:
    """``image`` subsampled (:func:`_subsampled`, the same factor on every axis) to at most
    ``max_voxels`` voxels (0: unchanged)."""
    voxels = float(np.prod(image.GetSize()))
    if max_voxels <= 0 or voxels <= max_voxels:
        return image
    k = int(np.ceil((voxels / max_voxels) ** (1.0 / 3.0)))
    return _subsampled(image, (k, k, k))


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
    An affine registration first runs the rigid one and continues from its result. The same
    registration also runs from ``settings.restarts`` perturbed starts: how far their answers lie
    from the main one is the result's spread (:attr:`Registration.warning` when over a voxel).
    Raises FusionError (bad input, failed or not converged), FusionCancelled (cancel() said so).
    """
    if kind not in KINDS:
        raise FusionError(f"unknown registration '{kind}': use rigid or affine")
    settings = settings or RegistrationSettings()
    if initial is not None and not initial.IsLinear():
        raise FusionError("the transform to start the registration from is not linear: "
                          "start from a rigid or affine transform (or none)")
    t0 = time.perf_counter()
    levels = len(settings.shrink_factors)
    plan = [("rigid", level) for level in range(levels)]
    if kind == "affine":
        plan += [("affine", level) for level in range(max(0, levels - AFFINE_LEVELS), levels)]
    runs = 1 + max(0, int(settings.restarts))
    restart_levels = min(levels, max(1, int(settings.restart_levels)))
    budgets = [_budget(settings, stage, level) + _refine_budget(settings, level) for stage, level in plan]
    restart_budgets = [_budget(settings, stage, level, restart=True) for stage, level in plan[:restart_levels]]
    tracker = _Tracker(progress, cancel, sum(budgets) + (runs - 1) * sum(restart_budgets))
    tracker.check_cancel()
    fixed = registration_image(anatomical, "anatomical")
    tracker.beat()
    moving = registration_image(functional, "functional")
    tracker.beat()
    fixed_grid, moving_grid = score_grid(fixed), score_grid(moving)
    matrix, start = _start_transform(fixed_grid, moving_grid, initial, settings.start)
    tracker.beat()
    centre = _centre(fixed)
    starts = [matrix] + [matrix @ _perturbation(i, centre, settings) for i in range(runs - 1)]
    try:
        limit = coarser_voxel_mm(anatomical, functional)

        def sure(answers: list, failed: list) -> bool:     # the restarts agree within a voxel (or none ran)
            return not _spread(fixed_grid, moving_grid, answers, failed)[1] > limit
        answers, failed, stop_condition = _optimise(bone_saturated(fixed, settings.ct_bone_hu, tracker),
                                                    bone_saturated(moving, settings.ct_bone_hu, tracker),
                                                    starts, plan, restart_levels, settings, tracker, sure)
        final = affine_transform(answers[0])
        tracker.beat()
        metric_before, metric_after = normalized_mutual_information(fixed, moving, [affine_transform(matrix), final],
                                                                    settings.histogram_bins)
    except FusionCancelled:
        raise
    except RuntimeError as exc:
        if tracker.cancelled:
            raise FusionCancelled("registration cancelled") from None
        text = str(exc).strip()
        reason = text.splitlines()[-1].strip() if text else "unknown reason"
        if "samples" in text.lower() or "outside" in text.lower():
            reason = "the images overlap too little"
        raise FusionError(f"the {kind} registration failed ({reason}): check that both volumes show the same "
                          "region, or place them roughly first (e.g. with a transform to start from)") from None
    tracker.check_cancel()
    values = tracker.values
    still_improving = (values[0] - values[-1]) / max(abs(values[-1]), 1e-12) if len(values) > 1 else 0.0
    spread_centre, spread_overlap = _spread(fixed_grid, moving_grid, answers[1:], failed)
    outcome = Registration(
        transform=final, kind=kind, start=start, metric_before=metric_before, metric_after=metric_after,
        overlap=mutual_overlap(fixed_grid, moving_grid, final), iterations=tracker.iterations,
        stop_condition=stop_condition, still_improving=float(still_improving), seconds=time.perf_counter() - t0,
        level_iterations=list(tracker.level_iterations), level_budgets=list(tracker.level_budgets),
        refine_iterations=tracker.refine_iterations,
        moved_mm=_moved(fixed, matrix, answers[0]),
        restarts=runs - 1, restarts_failed=sum(f is not None for f in failed[1:]),
        spread_centre_mm=spread_centre, spread_overlap_mm=spread_overlap,
        spread_limit_mm=limit)
    check_converged(outcome, settings)
    return outcome


def _budget(settings: RegistrationSettings, stage: str, level: int, restart: bool = False) -> int:
    """Iterations allowed at one (stage, level) of the plan. The coarsest rigid level gets
    ``coarsest_iterations``: it covers the whole misalignment, and once the noise of the gradient's
    translation part has shrunk the step (regular-step gradient descent never grows it), rotations
    of several degrees are covered ~0.02 mm a step (the test head, 8 degrees off, used all 200 and
    ended 4.0 mm off at its box's corners; 1.5 mm with 400). 250 was tried (on a plateau, STS_001
    MR -> CT, the main run wanders for 376-400 iterations): the panel's CT-through test head uses
    all 400 and ended 3.3 mm off with 250; the restarts at 125 flagged STS_003 MR -> CT trial 0
    (docs/REGISTRATION.md, "Time"). The finer levels start near the answer."""
    budget = int(settings.coarsest_iterations) if stage == "rigid" and level == 0 else int(settings.iterations)
    return max(1, int(budget * settings.restart_budget)) if restart else budget


def _refine_budget(settings: RegistrationSettings, level: int) -> int:
    """Iterations of the finest level's second pass (:func:`_optimise`; 0 at the other levels or
    when there is none)."""
    finest = level == len(settings.shrink_factors) - 1
    return int(settings.refine_iterations) if finest and settings.finest_samples > settings.samples else 0


def _centre(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()]))


def _moved(fixed: sitk.Image, start: np.ndarray, end: np.ndarray) -> float:
    """How far apart ``start`` and ``end`` (4x4, anatomical -> functional) put the anatomical's centre (mm)."""
    centre = np.append(_centre(fixed), 1.0)
    return float(np.linalg.norm((end @ centre - start @ centre)[:3]))


# --------------------------------------------------------------------------------------------------
# how sure: restarts from perturbed starts

#: Directions of the restarts' shifts and axes of their turns (the i-th restart uses row i, cycled).
_RESTART_SHIFTS = np.array([(1.0, 1.0, -1.0), (-1.0, 1.0, 1.0), (1.0, -1.0, 1.0), (-1.0, -1.0, -1.0)]) / np.sqrt(3.0)
_RESTART_AXES = np.array([(1.0, 0.0, 1.0), (0.0, 1.0, -1.0), (-1.0, 1.0, 0.0), (1.0, 1.0, 0.0)]) / np.sqrt(2.0)


def _perturbation(i: int, centre: np.ndarray, settings: RegistrationSettings) -> np.ndarray:
    """The i-th restart's change of the start (4x4, anatomical points): a turn of
    ``restart_turn_deg`` about an axis through the anatomical's centre, then a shift of
    ``restart_shift_mm``; alternating signs, a different direction each."""
    sign = 1.0 if i % 2 == 0 else -1.0
    rotation = sitk.VersorTransform(tuple(_RESTART_AXES[i % 4]), sign * np.deg2rad(settings.restart_turn_deg))
    rotation.SetCenter(tuple(float(c) for c in centre))
    m = affine_matrix(rotation)
    m[:3, 3] += settings.restart_shift_mm * _RESTART_SHIFTS[i % 4]
    return m


def coarser_voxel_mm(anatomical: sitk.Image, functional: sitk.Image) -> float:
    """One voxel of the coarser image (the larger voxel volume): its largest spacing (mm)."""
    spacings = [np.array(anatomical.GetSpacing(), float), np.array(functional.GetSpacing(), float)]
    return float(max(spacings, key=lambda s: float(np.prod(s))).max())


def _spread(fixed: sitk.Image, moving: sitk.Image, answers: list, failed: list) -> tuple[float, float]:
    """How far the restarts' answers (``answers[1:]``) lie from the main one after the same levels
    (``answers[0]``), in mm: at the anatomical's centre, and the largest over the overlap (the
    voxels of ``fixed``, a sub-grid of the anatomical, that the main answer places inside the
    functional). NaN without restarts; inf when a restart failed."""
    if len(answers) < 2:
        return float("nan"), float("nan")
    if any(f is not None for f in failed[1:]):
        return float("inf"), float("inf")
    idx = np.argwhere(np.ones(fixed.GetSize()[::-1], bool))[:, ::-1].astype(float)
    direction = np.array(fixed.GetDirection()).reshape(3, 3)
    points = np.array(fixed.GetOrigin()) + (idx * np.array(fixed.GetSpacing())) @ direction.T
    main = answers[0]
    mapped = points @ main[:3, :3].T + main[:3, 3]
    m_dir = np.array(moving.GetDirection()).reshape(3, 3)
    cidx = ((mapped - np.array(moving.GetOrigin())) @ m_dir) / np.array(moving.GetSpacing())
    inside = np.all((cidx >= -0.5) & (cidx <= np.array(moving.GetSize()) - 0.5), axis=1)
    points = points[inside] if inside.any() else points
    points = np.vstack([points, _centre(fixed)[None]])
    centre_spread, overlap_spread = 0.0, 0.0
    for other in answers[1:]:
        diff = points @ (other - main)[:3, :3].T + (other - main)[:3, 3]
        distance = np.linalg.norm(diff, axis=1)
        centre_spread = max(centre_spread, float(distance[-1]))
        overlap_spread = max(overlap_spread, float(distance.max()))
    return centre_spread, overlap_spread


# --------------------------------------------------------------------------------------------------
# the optimisation: a pyramid, one level at a time, every start in turn at each level


#: The heartbeat's clock (seconds; tests replace it with a fake one).
_clock = time.perf_counter


class _Tracker:
    """Progress over all runs, stages and levels, the heartbeat, cancel, and the main run's last
    metric values. ``clock``: seconds (default :data:`_clock`)."""

    def __init__(self, progress: ProgressFn | None, cancel: CancelFn | None, total: int,
                 clock: Callable[[], float] | None = None, every: float = HEARTBEAT_SECONDS):
        self.progress, self.cancel, self.total = progress, cancel, max(1, total)
        self.clock, self.every = clock or _clock, every
        self.offset, self.count, self.slot, self.start_of_next = 0, 0, -1, 0
        self.iterations, self.cancelled, self.main, self.refining, self.refine_iterations = 0, False, True, False, 0
        self.values: list[float] = []
        self.level_iterations: list[int] = []
        self.level_budgets: list[int] = []
        self.last = self.clock()

    def _report(self) -> bool:
        self.last = self.clock()
        if self.progress is not None:
            self.progress(min(self.offset + self.count, self.total), self.total)
        if self.cancel is not None and self.cancel():
            self.cancelled = True
        return self.cancelled

    def check_cancel(self) -> None:
        if not self.cancelled and self.cancel is not None and self.cancel():
            self.cancelled = True
        if self.cancelled:
            raise FusionCancelled("registration cancelled")

    def due(self) -> bool:
        """Inside work that cannot stop at once (a SimpleITK filter's progress event): the last
        report again and a cancel check, at most every ``every`` s. True when cancelled."""
        if self.cancelled:
            return True
        if self.clock() - self.last >= self.every:
            return self._report()
        return False

    def beat(self) -> None:
        """Between steps of work: as :meth:`due`; raises FusionCancelled when cancelled."""
        if self.due():
            raise FusionCancelled("registration cancelled")

    def new_run(self, per_level: int, main: bool, refine: bool = False) -> None:
        """One start's optimisation of one level begins (it has ``per_level`` iterations at most).
        ``refine``: the finest level's second pass (:func:`_optimise`): its iterations are counted
        apart (``refine_iterations``), and the level's own (the last metric values, judged by the
        convergence criteria) are left as the first pass ended."""
        self.slot += 1
        self.offset, self.count, self.main, self.refining = self.start_of_next, 0, main, refine
        self.start_of_next += per_level
        if main and not refine:
            self.level_iterations.append(0)
            self.values = []

    def level_budget(self, iterations: int) -> None:
        """The iterations the optimizer is given for the run just begun (:meth:`new_run`; at most
        its ``per_level``: the bar jumps ahead when it stops earlier), kept for the main run."""
        if self.main and not self.refining:
            self.level_budgets.append(int(iterations))

    def iteration(self, value: float) -> bool:
        """Record one iteration; True when the user asked to cancel."""
        self.count += 1
        if self.main and self.refining:
            self.refine_iterations += 1
            self.iterations += 1
        elif self.main:
            self.level_iterations[-1] += 1
            self.iterations += 1
            self.values = (self.values + [value])[-MOTION_WINDOW - 1:]
        return self._report()


def _observed(image_filter, image: sitk.Image, tracker: _Tracker) -> sitk.Image:
    """Run a SimpleITK filter with the tracker's heartbeat on its progress events (ITK reports
    them from the calling thread); a cancel aborts the filter and raises FusionCancelled."""
    def on_progress() -> None:
        if tracker.due():
            image_filter.Abort()

    image_filter.AddCommand(sitk.sitkProgressEvent, on_progress)
    try:
        return image_filter.Execute(image)
    except RuntimeError:
        if tracker.cancelled:
            raise FusionCancelled("registration cancelled") from None
        raise
    finally:
        image_filter.RemoveAllCommands()


def _reduced(image: sitk.Image, sigma_mm: float, factors, tracker: _Tracker) -> sitk.Image:
    """``image`` as a pyramid level sees it: smoothed by a Gaussian of ``sigma_mm`` (physical) on a
    grid ``factors`` times coarser. Cheap first: blocks of voxels no wider than sigma are averaged
    (BinShrink, whose output voxels sit at the blocks' centres), the rest of the smoothing is done
    on that smaller grid (a block of b voxels already has a variance of (b^2 - 1) / 12 voxels^2), and
    what is left of ``factors`` is taken by keeping every k-th voxel. Each SimpleITK filter runs
    with the heartbeat."""
    spacing = np.array(image.GetSpacing(), float)
    factors = np.array([int(f) for f in factors])
    blocks = np.ones(3, int)
    if sigma_mm > 0:
        blocks = np.clip(np.floor(sigma_mm / spacing).astype(int), 1, factors)
    if (blocks > 1).any():
        binner = sitk.BinShrinkImageFilter()
        binner.SetShrinkFactors([int(b) for b in blocks])
        image = _observed(binner, image, tracker)
    rest = np.sqrt(np.maximum(sigma_mm ** 2 - (blocks ** 2 - 1) / 12.0 * spacing ** 2, 0.0)) if sigma_mm > 0 else np.zeros(3)
    if (rest > 0).any():
        if (rest >= np.array(image.GetSpacing())).all():
            smoother = sitk.SmoothingRecursiveGaussianImageFilter()
            smoother.SetSigma([float(r) for r in rest])
        else:                                   # under a voxel: ITK's discrete kernel, as the framework's pyramid
            smoother = sitk.DiscreteGaussianImageFilter()
            smoother.SetVariance([float(r) ** 2 for r in rest])
            smoother.SetMaximumError(0.01)
            smoother.SetUseImageSpacing(True)
        image = _observed(smoother, image, tracker)
    tracker.beat()
    return _subsampled(image, np.maximum(factors // blocks, 1))


def _level_images(fixed: sitk.Image, moving: sitk.Image, shrink: int, sigma: float, max_voxels: int,
                  tracker: _Tracker) -> tuple[sitk.Image, sitk.Image]:
    """The pyramid level (:func:`_reduced`): both images smoothed by ``sigma`` mm; the fixed one on
    a grid ``shrink`` times coarser, or more to keep at most ``max_voxels`` (its voxels are where the
    metric samples: 20,000 of them, and 100,000 in the finest level's second pass), the moving one
    as coarse as the smoothing allows (a voxel no larger than sigma, at most ``shrink`` times its
    own). Done here rather than by SimpleITK's
    registration framework, which smooths both at full resolution and sets up the metric over every
    fixed voxel with no progress report (0.8-2 s on a 1 mm MR, each level and start)."""
    shrink = max(int(shrink), int(np.ceil((float(np.prod(fixed.GetSize())) / max_voxels) ** (1.0 / 3.0))))
    f = _reduced(fixed, sigma, (shrink,) * 3, tracker)
    factors = [max(1, min(shrink, int(sigma // s))) if sigma > 0 else 1 for s in moving.GetSpacing()]
    m = _reduced(moving, sigma, factors, tracker)
    return f, m


def _optimise(fixed: sitk.Image, moving: sitk.Image, starts: list, plan: list, restart_levels: int,
              settings: RegistrationSettings, tracker: _Tracker,
              sure: Callable[[list, list], bool] | None = None) -> tuple[list, list, str]:
    """Every start (4x4, LPS; the first is the main one) through the ``plan`` of (stage, level),
    one level at a time: each level's images are made once and every start runs on them from where
    its previous level ended; the restarts (starts after the first) run the first
    ``restart_levels`` rigid levels only. Returns [the main answer, the main answer after those
    levels, each restart's answer] (4x4), each start's failure (None: fine) and the main run's
    last stop condition. The main run's failure raises (RuntimeError). ``sure(answers, failed)``
    (the main answer and the restarts' after those levels, as returned) is asked once they are
    done: False (the answer will be flagged uncertain) skips the finest level's second pass."""
    # Rotations must turn about the anatomy, whatever the start: x -> start(optimised(x)) with the
    # optimised transform centred on the anatomical's centre c. SimpleITK (2.5) drops the centre of
    # the optimised transform when a moving initial transform is set (it then turns about the world
    # origin: on volumes hundreds of mm from it, as CT/PET of the legs, the rotation scales grow
    # ~40x, rotation and translation couple, and the optimizer creeps for all its iterations). So
    # the images are shifted by -c (geometry only) and the problem is solved where c is the origin.
    centre = _centre(fixed)
    shift = np.eye(4)
    shift[:3, 3] = -centre
    fixed, moving = _shifted(fixed, -centre), _shifted(moving, -centre)
    tracker.beat()
    current = [shift @ s @ np.linalg.inv(shift) for s in starts]
    failed: list = [None] * len(starts)
    stop_condition = ""
    images, key = None, None
    compared = current[0]
    precise = True
    for step, (stage, level) in enumerate(plan):
        shrink, sigma = settings.shrink_factors[level], settings.smoothing_sigmas_mm[level]
        if key != (shrink, sigma):
            images, key = None, None     # the previous level's images go before the next ones are made
            images, key = _level_images(fixed, moving, shrink, sigma, settings.level_voxels, tracker), (shrink, sigma)
        for i in range(len(starts)):
            if i > 0 and step >= restart_levels:
                break
            budget, refine = _budget(settings, stage, level, restart=i > 0), _refine_budget(settings, level)
            tracker.new_run(budget, main=(i == 0))
            if refine and not precise:
                # An answer the restarts already say is uncertain by more than a voxel gets no
                # second pass, and a shorter first pass: sub-voxel precision is no use to it, and
                # on a plateau (a crop that never settles) the finest level is the costliest part
                # of the run (docs/REGISTRATION.md, "Time"). Convergence is judged against the
                # budget it had (check_converged).
                budget = max(1, int(round(budget * settings.uncertain_budget)))
            tracker.level_budget(budget)
            if failed[i] is not None:
                tracker.new_run(refine, main=(i == 0), refine=True)
                continue
            try:
                # With ``first_pass_voxels`` set, the finest level's first pass draws its samples
                # from a grid of at most that many voxels (the second pass uses the whole grid). Off
                # by default: its gain was within the load's noise (docs/REGISTRATION.md, "Time").
                first = (_first_pass_grid(images[0], settings.first_pass_voxels), images[1]) if refine else images
                current[i], stop, settled = _run_level(*first, current[i], stage, settings, tracker, budget,
                                                    settings.samples, settings.learning_rate)
                # The finest level, once it has settled (stopped before its budget), takes a short
                # second pass with more samples from where it stopped: where the optimum lies then
                # depends less on which voxels were drawn (docs/REGISTRATION.md, "A more precise
                # finest level"). A level that did not settle gets none: its cost would be the
                # larger sample count times the whole budget; nor does an answer that will be
                # flagged uncertain (the restarts disagree): precision is no use to it.
                tracker.new_run(refine, main=(i == 0), refine=True)
                if refine and settled and precise:
                    current[i], stop, _ = _run_level(*images, current[i], stage, settings, tracker, refine,
                                                     settings.finest_samples, settings.refine_step)
            except FusionCancelled:
                raise
            except RuntimeError as exc:
                if i == 0 or tracker.cancelled:
                    raise
                failed[i] = str(exc).strip().splitlines()[-1] if str(exc).strip() else "failed"
                continue
            if i == 0:
                stop_condition = stop
        if step == restart_levels - 1:
            compared = current[0]
            if sure is not None and len(starts) > 1:
                back = np.linalg.inv(shift)
                precise = sure([back @ c @ shift for c in [compared] + current[1:]], failed)
    back = np.linalg.inv(shift)
    return [back @ c @ shift for c in [current[0], compared] + current[1:]], failed, stop_condition


def _run_level(fixed: sitk.Image, moving: sitk.Image, start: np.ndarray, kind: str,
               settings: RegistrationSettings, tracker: _Tracker, iterations: int, samples: int,
               first_step: float) -> tuple[np.ndarray, str, bool]:
    """One pyramid level (images already smoothed and subsampled: :func:`_level_images`) from
    ``start`` (4x4, centred frame), at most ``iterations``, the metric on ``samples`` points, the
    optimizer's first step ``first_step`` mm; returns the result, the optimizer's stop condition
    and whether it settled (stopped by itself, before its budget)."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM if settings.sampling == "random" else method.REGULAR)
    method.SetMetricSamplingPercentagePerLevel([_sampling_fraction(fixed, samples)], settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    # Image gradients from the interpolator, consistent with the values the metric measures: ITK's
    # default gradient filter (a smoothed gradient image) pulls affine scales away (test phantoms)
    # and moves the rigid optimum (CT -> synthetic MR 0.21 / 0.11 mm from the truth with it, 0.10 /
    # 0.01 without; docs/REGISTRATION.md), and it costs ~0.25 s of set-up a level.
    method.SetMetricUseFixedImageGradientFilter(kind == "rigid" and settings.gradient_filter)
    method.SetMetricUseMovingImageGradientFilter(kind == "rigid" and settings.gradient_filter)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=first_step, minStep=settings.min_step, numberOfIterations=iterations,
        relaxationFactor=settings.relaxation, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([1])
    method.SetSmoothingSigmasPerLevel([0.0])
    # The start goes in as the moving initial transform (its centre, the origin here, is where the
    # anatomical's centre is: see _optimise).
    method.SetMovingInitialTransform(affine_transform(start))
    method.SetInitialTransform(sitk.Euler3DTransform() if kind == "rigid" else sitk.AffineTransform(3), inPlace=False)

    def on_iteration() -> None:
        if tracker.iteration(method.GetMetricValue()):
            method.StopRegistration()

    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    with itk_threads(settings.threads):
        result = method.Execute(fixed, moving)
    tracker.check_cancel()
    settled = tracker.count < iterations
    # SimpleITK returns the optimised transform alone: compose it with the start (start after it).
    return start @ affine_matrix(result), method.GetOptimizerStopConditionDescription(), settled


@contextlib.contextmanager
def itk_threads(threads: int):
    """ITK's global default number of threads set to ``threads`` (0: left as it is) inside the
    block, restored after it. SimpleITK's registration framework builds its metric when it runs,
    with that default. With more than one thread its sums are not reproducible bit for bit, and
    the optimizer carries the last bits into different answers (three runs on the test phantom
    ended 0.59-0.78 mm from the truth; exactly equal with one thread). The method's own
    ``SetNumberOfThreads`` does not reach the metric (measured: the runs still differ)."""
    if not threads:
        yield
        return
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


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
    finest = len(settings.shrink_factors) - 1
    budget = outcome.level_budgets[-1] if outcome.level_budgets else \
        _budget(settings, "affine" if outcome.kind == "affine" else "rigid", finest)
    if last >= budget and outcome.still_improving > MAX_FINAL_GAIN:
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
# registering through another volume of the functional's study (--register-with)

#: Two volumes without a FrameOfReferenceUID count as sharing a placement when the smaller one lies
#: at least this much inside the other (one PET/CT session: the PET's box inside the CT's).
MIN_SHARED_PLACEMENT = 0.5


def check_same_frame(functional: sitk.Image, other: sitk.Image, functional_uid: str | None = None,
                     other_uid: str | None = None, what: str = "the volume to register with") -> str:
    """Refuse (one-line FusionError) to register through ``other`` unless it shares the
    functional's frame: the same DICOM FrameOfReferenceUID when both have one (a PET and its CT of
    one hybrid session), else a placement (the smaller volume at least :data:`MIN_SHARED_PLACEMENT`
    inside the other, as stored). Returns how they were matched ('frame of reference' or 'placement')."""
    if functional_uid and other_uid:
        if functional_uid != other_uid:
            raise FusionError(f"{what} does not share the functional's DICOM FrameOfReferenceUID ({other_uid} vs "
                              f"{functional_uid}): its registration would not place the functional; give the "
                              "functional's own CT from the same session (or register the functional itself)")
        return "frame of reference"
    shared = mutual_overlap(score_grid(registration_image(functional, "functional"), 20_000),
                            score_grid(registration_image(other, what), 20_000), sitk.Transform())
    if shared < MIN_SHARED_PLACEMENT:
        raise FusionError(f"{what} and the functional do not share a placement (only {100 * shared:.0f}% of the "
                          "smaller lies inside the other) nor a DICOM FrameOfReferenceUID: give the functional's own "
                          "CT from the same session (or register the functional itself)")
    return "placement"


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
