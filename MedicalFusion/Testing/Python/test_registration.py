"""Registration on demand (MedicalFusionLib.registration) and its command line (--register,
--transform, --save-transform): known misalignments recovered, the transform's convention, progress
and cancel, one-line errors for bad transform files and for registrations that fail or do not
converge, outputs written all-or-nothing.

The pairs are small synthetic phantoms sampled from one analytic head on two different grids with
different contrasts (an "MR" and a blurred "PET"), so mutual information is needed and every test
runs in a second or two; one test uses the spm12 templates and two the sts DICOM series (skipped
without the shared data).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))

from bench_registration import brain_mask, region_points  # noqa: E402
from MedicalFusionLib import cli  # noqa: E402
from MedicalFusionLib import registration as reg  # noqa: E402
from MedicalFusionLib.errors import FusionCancelled, FusionError  # noqa: E402

# ------------------------------------------------------------------------------------------------
# phantoms


def _blobs(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict:
    """Membership in the phantom's structures (asymmetric on purpose) of the grid of physical points
    (x, y, z in mm along the three axes): boolean [z, y, x] arrays. (Axis by axis: a sum over the
    last axis of an N x 3 array of points took 10 s for the 8 M voxels of a 0.75 mm grid.)"""
    def ellipsoid(centre, radii):
        tx, ty, tz = (((v - c) / r) ** 2 for v, c, r in zip((x, y, z), centre, radii))
        return tx[None, None, :] + (ty[None, :, None] + tz[:, None, None]) < 1.0
    head = ellipsoid((0, 0, 0), (50, 60, 45))
    inner = ellipsoid((0, 0, 0), (44, 54, 39))
    return {"head": head, "skull": head & ~inner, "ventricle": ellipsoid((-12, 8, 5), (8, 16, 10)),
            "lesion": ellipsoid((20, -18, -10), (9, 9, 9)), "nucleus": ellipsoid((10, 20, 12), (6, 6, 14))}


FIELD_OF_VIEW_MM = (144.0, 168.0, 132.0)     # the head (100 x 120 x 90 mm) with a margin


def phantom(kind: str, spacing: float = 3.0, seed: int = 0) -> sitk.Image:
    """The analytic head sampled on a grid: 'mr' (sharp, skull bright), 't2' (sharp, fluid bright) or
    'pet' (blurred, lesion hot)."""
    size = np.round(np.array(FIELD_OF_VIEW_MM) / spacing).astype(int)
    spacing = np.full(3, float(spacing))
    origin = -(size - 1) * spacing / 2.0
    b = _blobs(*(np.arange(n) * d + o for n, d, o in zip(size, spacing, origin)))
    values = {"mr": {"head": 100, "skull": 300, "ventricle": -70, "lesion": 30, "nucleus": 60},
              "t2": {"head": 60, "skull": -40, "ventricle": 120, "lesion": 150, "nucleus": -20},
              "pet": {"head": 40, "skull": -25, "ventricle": -30, "lesion": 300, "nucleus": 90}}[kind]
    arr = np.zeros(size[::-1], np.float32)
    for name, v in values.items():
        arr[b[name]] += v
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    if kind == "pet":
        image = sitk.SmoothingRecursiveGaussian(image, 4.0)
    rng = np.random.default_rng(seed)
    noisy = sitk.GetArrayFromImage(image) + rng.normal(0, 1.0, size[::-1]).astype(np.float32)
    out = sitk.GetImageFromArray(np.clip(noisy, 0, None).astype(np.float32))
    out.CopyInformation(image)
    return out


def rigid(angles_deg=(6.0, -4.0, 8.0), translation=(9.0, -12.0, 6.0), centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    e = sitk.Euler3DTransform()
    e.SetCenter(centre)
    e.SetRotation(*np.deg2rad(angles_deg))
    e.SetTranslation(translation)
    return reg.affine_matrix(e)


def tre(found: sitk.Transform, truth: np.ndarray, image: sitk.Image, percentile: float = 100.0,
        points: np.ndarray | None = None) -> float:
    """Distance (mm) between the found and the true transform over the image's bright voxels (or
    ``points``, N x 3 mm): the largest, or the given percentile."""
    if points is None:
        arr = sitk.GetArrayViewFromImage(image)
        idx = np.argwhere(arr > 0.5 * arr.max())[:, ::-1].astype(float)
        points = np.array(image.GetOrigin()) + idx * np.array(image.GetSpacing())
    pts = points
    m = reg.affine_matrix(found)
    distances = np.linalg.norm((pts @ m[:3, :3].T + m[:3, 3]) - (pts @ truth[:3, :3].T + truth[:3, 3]), axis=1)
    return float(np.percentile(distances, percentile))


# The defaults (200 iterations a level): with gradients from the interpolator the finest level of
# the head phantom takes ~115 iterations, so the 60 the tests once used ran out on it.
FAST = reg.RegistrationSettings()


@pytest.fixture(scope="module")
def pair():
    """(anatomical 'MR' on a 3 mm grid, functional 'PET' on a 4 mm grid), aligned."""
    return phantom("mr"), phantom("pet", spacing=4.0, seed=1)


@dataclass
class HeadRun:
    """The head pair's rigid registration with the defaults, made once and shared by the tests that
    check its outcome, its progress reports, its cancel checks, its inputs and its sameness
    (conftest.py keeps these tests in one worker). Recorded as :func:`_recorded_run` records: on a
    fake clock on which every heartbeat is due, the steps of work wrapped (the answer is the same)."""
    anat: sitk.Image
    moved: sitk.Image               # the PET misplaced by ``truth``
    truth: np.ndarray
    inputs_before: list             # (voxels, origin, direction, spacing) of anat and moved, before
    progress: list                  # every (done, total) reported
    events: list                    # 'P', 'C' and the steps of work, in order (_recorded_run)
    out: reg.Registration


@pytest.fixture(scope="module")
def head_run(pair) -> HeadRun:
    anat, pet = pair
    truth = rigid()
    moved = reg.moved_geometry(pet, truth)
    before = [(sitk.GetArrayFromImage(i).copy(), i.GetOrigin(), i.GetDirection(), i.GetSpacing())
              for i in (anat, moved)]
    progress: list = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        events, exc, out = _recorded_run(monkeypatch, anat, moved, FAST, progress_log=progress)
    if exc is not None:
        raise exc
    return HeadRun(anat, moved, truth, before, progress, events, out)


# ------------------------------------------------------------------------------------------------
# registration


def test_rigid_recovers_a_known_misalignment_and_maps_anatomical_to_functional_points(pair, head_run):
    anat, pet = pair
    truth, moved, out = head_run.truth, head_run.moved, head_run.out
    before = tre(reg.affine_transform(np.eye(4)), truth, anat)
    assert before > 15.0
    assert tre(out.transform, truth, anat) < 2.0           # half the PET's 4 mm voxel
    assert out.metric_after > out.metric_before + 0.1        # normalised MI: higher is better
    assert out.start == "placement" and out.overlap > 0.9
    # the convention: resampling the moved PET with the result puts it back where it was
    back = sitk.Resample(moved, anat, out.transform, sitk.sitkLinear, 0.0)
    ref = sitk.Resample(pet, anat, sitk.Transform(), sitk.sitkLinear, 0.0)
    r = np.corrcoef(sitk.GetArrayViewFromImage(back).ravel(), sitk.GetArrayViewFromImage(ref).ravel())[0, 1]
    assert r > 0.97


def test_the_same_inputs_give_the_same_answer_bit_for_bit(head_run):
    """ITK's threaded metric sums made runs on the same pair end 0.59-0.78 mm from the truth; the
    registration runs its metric on one thread (``settings.threads``) and leaves ITK's global
    default as it found it. The shared run (made with ITK's default number of threads) and a run
    with another number of threads (threaded sums would then add in another order) give the same
    transform to the bit."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    other = 3 if before == 2 else 2
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(other)
    try:
        again = reg.register(head_run.anat, head_run.moved, "rigid", settings=FAST)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == other
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert np.array_equal(reg.affine_matrix(again.transform), reg.affine_matrix(head_run.out.transform))


def test_inputs_are_not_modified(head_run):
    for img, (arr, origin, direction, spacing) in zip((head_run.anat, head_run.moved), head_run.inputs_before):
        assert np.array_equal(sitk.GetArrayViewFromImage(img), arr)
        assert (img.GetOrigin(), img.GetDirection(), img.GetSpacing()) == (origin, direction, spacing)


def test_affine_recovers_a_scaled_misalignment(pair):
    """On a sharp second contrast. Mutual information's affine optimum on these voxelised phantoms
    lies a few percent of scale from the truth (a few mm at the edge of the head), so the test asks
    that affine gets much closer than the best rigid, with scales that moved the right way."""
    anat = pair[0]
    t2 = phantom("t2", spacing=3.5, seed=2)
    truth = rigid(translation=(5.0, 4.0, -6.0))
    truth[:3, :3] = truth[:3, :3] @ np.diag([1.10, 0.92, 1.0])     # scaled along the T2's axes
    moved = reg.moved_geometry(t2, truth)
    affine = reg.register(anat, moved, "affine", settings=FAST)
    rigid_tre = tre(reg.register(anat, moved, "rigid", settings=FAST).transform, truth, anat)
    assert tre(affine.transform, truth, anat) < 0.6 * rigid_tre
    found = np.sort(np.linalg.svd(reg.affine_matrix(affine.transform)[:3, :3], compute_uv=False))
    assert found[0] < 0.97 and found[-1] > 1.04                      # truth: 0.92 and 1.10
    assert len(affine.level_iterations) == 3 + reg.AFFINE_LEVELS      # the rigid stage, then the affine one


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()


def test_volumes_far_from_the_world_origin_converge_as_near_it(pair, head_run):
    """CT/PET of the legs lie ~600 mm below the scanner's origin. SimpleITK drops the optimised
    transform's centre when a start is given, so rotations turned about the world origin: the
    optimizer crept for all its iterations and ended mm away even on identical images. The same
    pair placed near and far from the origin must now converge alike, and well before the limit.
    (Near: the shared run, the head pair where the phantom put it, about the world origin.)"""
    anat, pet = pair
    far = np.eye(4)
    far[:3, 3] = (150.0, 80.0, -650.0)
    results = []
    for place in (np.eye(4), far):
        a, f = reg.moved_geometry(anat, place), reg.moved_geometry(pet, place)
        truth = place @ rigid() @ np.linalg.inv(place)          # the same misalignment, about the head
        moved = reg.moved_geometry(f, truth)
        if place is far:
            out = reg.register(a, moved, "rigid", settings=FAST)
        else:                                                   # the very inputs of the shared run
            assert all(geometry(x) == geometry(y) for x, y in ((a, head_run.anat), (moved, head_run.moved)))
            out = head_run.out
        points = np.argwhere(sitk.GetArrayViewFromImage(anat) > 50)[:, ::-1] * np.array(anat.GetSpacing())
        points = points + np.array(a.GetOrigin())
        results.append((tre(out.transform, truth, a, 100, points), out.level_iterations))
    (near_tre, _), (far_tre, far_iterations) = results
    assert far_tre < 2.0 and abs(far_tre - near_tre) < 0.5
    assert far_iterations[-1] < FAST.iterations                   # the finest level stopped by itself


def test_start_from_a_given_transform_and_from_moments_when_far_apart(pair):
    anat, pet = pair
    truth = rigid(translation=(120.0, -90.0, 60.0))       # no overlap left: the placement is useless
    moved = reg.moved_geometry(pet, truth)
    out = reg.register(anat, moved, "rigid", settings=FAST)
    assert out.start == "moments"
    assert tre(out.transform, truth, anat) < 2.0
    rough = reg.affine_transform(rigid(angles_deg=(0, 0, 0), translation=(118.0, -93.0, 57.0)))
    out = reg.register(anat, moved, "rigid", initial=rough, settings=FAST)
    assert out.start == "given transform"
    assert tre(out.transform, truth, anat) < 2.0


def test_progress_every_iteration_of_every_start(head_run):
    calls, out = head_run.progress, head_run.out
    # main run (the coarsest level's budget, then two of the usual and the finest level's second
    # pass), then the restarts' two levels (a fraction of the main run's budgets)
    total = FAST.coarsest_iterations + 2 * FAST.iterations + FAST.refine_iterations \
        + FAST.restarts * (int(FAST.coarsest_iterations * FAST.restart_budget) + int(FAST.iterations * FAST.restart_budget))
    assert out.restarts == FAST.restarts == 2
    assert len(calls) >= out.iterations                  # every iteration reports (and the heartbeat between)
    assert all(t == total for _, t in calls)
    assert all(0 <= d <= t for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


class _Clock:
    """A fake clock for the heartbeat: every reading is ``step`` seconds after the last one (0:
    it stands still until the test moves ``now``)."""

    def __init__(self, step: float = 0.0):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_heartbeat_spacing_on_a_fake_clock():
    """beat() reports (progress again, then cancel) once ``every`` seconds have passed since the
    last report, and not before; iterations always report."""
    clock = _Clock()
    stamps = []
    tracker = reg._Tracker(lambda d, t: stamps.append(clock.now), lambda: False, 100, clock=clock, every=0.1)
    for _ in range(40):
        clock.now += 0.03
        tracker.beat()
    gaps = np.diff(stamps)
    assert len(stamps) >= 8 and gaps.min() >= 0.1 - 1e-9 and gaps.max() <= 0.1 + 0.03 + 1e-9
    tracker.new_run(10, main=True)
    before = len(stamps)
    tracker.iteration(-0.5)
    tracker.iteration(-0.6)
    assert len(stamps) == before + 2


def _recorded_run(monkeypatch, anat, func, settings, cancel_at=None, progress_log=None):
    """Register with a fake clock on which every heartbeat is due (so every beat reports) and
    record, in order: 'P' / 'C' for each progress / cancel call and ('start'|'end', step, voxels) around
    each step of work that runs without Python in between (SimpleITK filters, the optimiser's
    levels, the score); each (done, total) reported is appended to ``progress_log`` too. Returns
    (events, raised exception or None, outcome)."""
    monkeypatch.setattr(reg, "_clock", _Clock(1.0))
    events: list = []

    def wrap(name, fn, image_arg=0):
        def run(*args, **kwargs):
            image = args[image_arg] if len(args) > image_arg else None
            voxels = int(np.prod(image.GetSize())) if isinstance(image, sitk.Image) else 0
            events.append(("start", name, voxels))
            try:
                return fn(*args, **kwargs)
            finally:
                events.append(("end", name, voxels))
        return run

    monkeypatch.setattr(reg, "_observed", wrap("filter", reg._observed, 1))
    monkeypatch.setattr(reg, "_run_level", wrap("level", reg._run_level, 0))
    monkeypatch.setattr(reg, "normalized_mutual_information", wrap("score", reg.normalized_mutual_information, 0))
    monkeypatch.setattr(reg, "registration_image", wrap("convert", reg.registration_image, 0))
    monkeypatch.setattr(reg, "_start_transform", wrap("start", reg._start_transform, 0))
    asked = []

    def cancel():
        events.append("C")
        asked.append(1)
        return cancel_at is not None and len(asked) >= cancel_at

    try:
        def progress(done, total):
            events.append("P")
            if progress_log is not None:
                progress_log.append((done, total))

        out = reg.register(anat, func, "rigid", progress=progress, cancel=cancel, settings=settings)
        return events, None, out
    except Exception as exc:      # noqa: BLE001 (the test inspects it)
        return events, exc, None


def _big_pair():
    """A 1 mm anatomical of the MNI demo's size class (8 M voxels: its smoothing and the metric's
    set-up at full resolution were the 12-18 s freeze) and a 4 mm PET."""
    anat = phantom("mr", spacing=0.75)
    return anat, reg.moved_geometry(phantom("pet", spacing=4.0, seed=1), rigid())


def test_a_report_between_any_two_steps_and_inside_every_long_filter(monkeypatch):
    """The panel runs its events (and Cancel) only inside the callbacks: between two steps of work
    that cannot be interrupted there is always a report, and the smoothing of a large image reports
    from inside (ITK's progress events), so no single stretch is a whole volume's worth of work."""
    anat, func = _big_pair()
    assert np.prod(anat.GetSize()) > 7_000_000
    events, exc, out = _recorded_run(monkeypatch, anat, func, FAST)
    assert exc is None and out is not None
    steps = [e for e in events if e not in ("P", "C")]
    assert {e[1] for e in steps} >= {"filter", "level", "score", "convert", "start"}
    # between the end of one step and the end of the next, at least one report
    since, open_step, inside = 1, None, {}
    for e in events:
        if e in ("P", "C"):
            since += 1
            if open_step is not None:
                inside[open_step] = inside.get(open_step, 0) + 1
            continue
        kind, name, voxels = e
        if kind == "start":
            open_step = (len(inside), name, voxels)
            inside[open_step] = 0
        else:
            assert since > 0, f"two steps without a report between them (the second: {name})"
            since, open_step = 0, None
    big_filters = [k for k in inside if k[1] == "filter" and k[2] > 1_000_000]
    assert big_filters and all(inside[k] > 0 for k in big_filters)
    assert all(inside[k] > 0 for k in inside if k[1] == "level")      # every optimiser level reports

    # Cancel inside the first large filter aborts it: FusionCancelled, nothing after it.
    asked, in_big = 0, None
    for e in events:
        if e == "C":
            asked += 1
        elif e not in ("P",):
            in_big = e[0] == "start" and e[1] == "filter" and e[2] > 1_000_000
        if e == "C" and in_big:
            break
    events, exc, out = _recorded_run(monkeypatch, anat, func, FAST, cancel_at=asked)
    assert isinstance(exc, FusionCancelled) and out is None
    assert events[-1][:2] == ("end", "filter") and events.count("C") == asked


def test_cancel_at_any_point_stops_at_once_and_leaves_nothing(monkeypatch, head_run):
    """Cancel is honoured wherever it is asked (while converting, smoothing, optimising any start,
    scoring): FusionCancelled, no report and no work after it, nothing returned."""
    anat, moved = head_run.anat, head_run.moved
    asks = head_run.events.count("C")            # cancel checks of a whole run (the shared one)
    assert asks > 50
    for at in (1, 2, 3, 5, asks // 8, asks // 3, asks // 2, (3 * asks) // 4, asks - 2):
        events, exc, out = _recorded_run(monkeypatch, anat, moved, FAST, cancel_at=at)
        assert isinstance(exc, FusionCancelled) and out is None, at
        assert events.count("C") == at, at                    # not asked again
        after = events[events.index("C") if at == 1 else [i for i, e in enumerate(events) if e == "C"][at - 1]:][1:]
        # after the cancel: no progress report, no step of work started (steps running end at once)
        assert all(e not in ("P", "C") and e[0] == "end" for e in after), (at, after)


def tube(kind: str, spacing: float, half_length_mm: float, seed: int = 0) -> sitk.Image:
    """A limb-like tube along z (skin, an off-centre bone, a muscle band), the same in every slice:
    nothing fixes a shift along its axis (the sts crops of a leg are nearly this)."""
    size = np.array([int(150 / spacing), int(150 / spacing), int(2 * half_length_mm / spacing)])
    origin = -(size - 1) * spacing / 2.0
    j, i = np.meshgrid(np.arange(size[1]), np.arange(size[0]), indexing="ij")
    x, y = i * spacing + origin[0], j * spacing + origin[1]
    limb = x ** 2 / 55.0 ** 2 + y ** 2 / 45.0 ** 2 < 1
    bone = (x - 12) ** 2 + (y + 8) ** 2 < 12.0 ** 2
    band = limb & (np.abs(x + 0.6 * y + 20) < 8)
    values = {"mr": (100, -80, 60), "pet": (40, -20, 120)}[kind]
    plane = values[0] * limb + values[1] * bone + values[2] * band
    arr = np.repeat(plane[None].astype(np.float32), size[2], axis=0)
    arr += np.random.default_rng(seed).normal(0, 1.0, arr.shape).astype(np.float32)
    image = sitk.GetImageFromArray(np.clip(arr, 0, None))
    image.SetSpacing([spacing] * 3)
    image.SetOrigin(origin.tolist())
    return sitk.SmoothingRecursiveGaussian(image, 4.0) if kind == "pet" else image


@pytest.fixture(scope="module")
def tube_pair():
    """An anatomical tube 240 mm long, a functional crop of it 60 mm long, moved 4 mm / 3 degrees."""
    moved = reg.moved_geometry(tube("pet", 4.0, 30.0, seed=1), rigid(angles_deg=(3, 0, 2), translation=(4, -3, 2)))
    return tube("mr", 3.0, 120.0), moved


def test_every_registration_says_how_sure_it_is(head_run, tube_pair):
    """Restarts from perturbed starts: on the head they end where the main run ends (well within a
    voxel); along a tube nothing fixes the shift on its axis, so they end where they start along
    it: the spread is over a voxel of the coarser image and the result carries a warning."""
    assert FAST == reg.RegistrationSettings()            # the shared run: the defaults
    head = head_run.out
    assert head.restarts == 2 and head.spread_limit_mm == 4.0          # the PET's 4 mm voxel
    assert head.spread_centre_mm < 0.5 and head.spread_overlap_mm < head.spread_limit_mm
    assert head.warning is None and "spread" in head.summary()
    assert head.metadata()["registration_uncertain"] is False
    assert head.refine_iterations > 0                # sure: the finest level's second pass ran ...
    assert head.level_budgets == [FAST.coarsest_iterations, FAST.iterations, FAST.iterations]   # ... after a full first

    limb = reg.register(*tube_pair, "rigid", settings=FAST)
    assert limb.spread_centre_mm > limb.spread_limit_mm
    assert limb.warning is not None and "uncertain" in limb.warning and "\n" not in limb.warning
    assert limb.metadata()["registration_uncertain"] is True
    assert limb.metadata()["registration_spread_centre_mm"] == round(limb.spread_centre_mm, 3)

    assert limb.refine_iterations == 0       # uncertain: no second pass at the finest level (no use to it) ...
    finest = int(round(FAST.iterations * FAST.uncertain_budget))
    assert finest < FAST.iterations and limb.level_budgets[-1] == finest       # ... and a shorter first pass
    assert limb.level_iterations[-1] <= finest

    # without restarts: no verdict, and the same answer as with them (the finest level as the uncertain one had it)
    alone = reg.register(*tube_pair, "rigid", settings=reg.RegistrationSettings(restarts=0, finest_samples=0))
    assert alone.warning is None and alone.restarts == 0 and alone.refine_iterations == 0
    assert alone.level_budgets[-1] == FAST.iterations                       # never flagged: the full budget
    full = reg.register(*tube_pair, "rigid", settings=reg.RegistrationSettings(uncertain_budget=1.0))
    assert full.warning is not None and full.level_budgets[-1] == FAST.iterations
    assert np.allclose(reg.affine_matrix(alone.transform), reg.affine_matrix(full.transform))
    if limb.level_iterations[-1] < finest:   # it stopped by itself within the shorter budget: the same path
        assert np.allclose(reg.affine_matrix(limb.transform), reg.affine_matrix(full.transform))


def test_a_failed_restart_is_a_warning():
    outcome = reg.Registration(transform=reg.affine_transform(np.eye(4)), kind="rigid", start="placement",
                               metric_before=0.2, metric_after=0.5, overlap=0.9, iterations=30, stop_condition="",
                               still_improving=0.0, seconds=1.0, restarts=2, restarts_failed=1,
                               spread_centre_mm=float("inf"), spread_overlap_mm=float("inf"), spread_limit_mm=2.0)
    assert "1 of 2 restarts from perturbed starts failed" in outcome.warning


def test_not_converging_is_a_one_line_error(pair):
    anat, pet = pair
    moved = reg.moved_geometry(pet, rigid())
    with pytest.raises(FusionError) as err:
        reg.register(anat, moved, "rigid", settings=reg.RegistrationSettings(iterations=3, coarsest_iterations=3, learning_rate=0.5))
    msg = str(err.value)
    assert "did not converge" in msg and "\n" not in msg


def test_no_overlap_without_moments_is_a_one_line_failure(pair):
    anat, pet = pair
    far = reg.moved_geometry(pet, rigid(angles_deg=(0, 0, 0), translation=(400.0, 0.0, 0.0)))
    with pytest.raises(FusionError) as err:
        reg.register(anat, far, "rigid", settings=reg.RegistrationSettings(start="placement", iterations=5))
    assert "registration failed" in str(err.value) and "\n" not in str(err.value)


def test_convergence_criteria_on_outcomes():
    def outcome(**kw):
        base = dict(transform=reg.affine_transform(np.eye(4)), kind="affine", start="placement", metric_before=0.2,
                    metric_after=0.5, overlap=0.9, iterations=30, stop_condition="", still_improving=0.0,
                    seconds=1.0, level_iterations=[10, 10, 10])
        base.update(kw)
        return reg.Registration(**base)

    s = reg.RegistrationSettings(iterations=10)
    reg.check_converged(outcome(), s)                                            # fine
    with pytest.raises(FusionError, match="made the match worse"):
        reg.check_converged(outcome(metric_after=0.19), s)                        # worse than the start
    reg.check_converged(outcome(metric_after=0.197), s)                            # within the tolerance
    with pytest.raises(FusionError, match="overlaps"):
        reg.check_converged(outcome(overlap=0.1), s)
    with pytest.raises(FusionError, match="still improved"):
        reg.check_converged(outcome(still_improving=0.01), s)
    reg.check_converged(outcome(still_improving=0.01, level_iterations=[10, 10, 4]), s)   # stopped by itself
    # judged against the budget the finest level had (shorter for an answer already flagged uncertain)
    with pytest.raises(FusionError, match="after 4 iterations"):
        reg.check_converged(outcome(still_improving=0.01, level_iterations=[10, 10, 4], level_budgets=[10, 10, 4]), s)
    reg.check_converged(outcome(still_improving=0.01, level_iterations=[10, 10, 4], level_budgets=[10, 10, 5]), s)
    squash = np.diag([4.0, 1.0, 1.0, 1.0])
    with pytest.raises(FusionError, match="scaled"):
        reg.check_converged(outcome(transform=reg.affine_transform(squash)), s)
    with pytest.raises(FusionError, match="mirrored"):
        reg.check_converged(outcome(transform=reg.affine_transform(np.diag([-1.0, 1.0, 1.0, 1.0]))), s)
    reg.check_converged(outcome(moved_mm=reg.MAX_MOVE_MM - 1.0), s)               # a refinement
    with pytest.raises(FusionError, match="wrong structures"):
        reg.check_converged(outcome(moved_mm=reg.MAX_MOVE_MM + 1.0), s)          # a jump elsewhere


def test_real_pet_mr_pair_matched_far_away_is_refused_or_flagged_never_silent(shared_data):
    """STS_001's PET -> MR (a 5 cm crop around a thigh tumour): after a 20 mm / 10 degree class
    misalignment, mutual information pulls the PET away from the truth (47-74 mm with the earlier
    pyramid, ~10 mm over the tumour with this one), to a match it scores higher than the true
    alignment. That must be a one-line error or a registration flagged as uncertain (restarts
    ending tens of mm apart), never a silently misplaced tracer."""
    from bench_registration import load_pairs, random_rigid, centre_of

    [(_, anat, pet, tumour, *_)] = list(load_pairs(shared_data, ["sts/STS_001/PET-MR"]))
    truth = random_rigid(np.random.default_rng(1000), centre_of(pet))
    misaligned = reg.moved_geometry(pet, truth)
    try:
        out = reg.register(anat, misaligned, "rigid")
    except FusionError as err:
        # refused by the move it made (or, as ITK's threaded sums run, by its not settling there)
        assert "mm from where it started" in str(err) or "did not converge" in str(err)
        assert "place the volumes roughly first" in str(err) and "\n" not in str(err)
        return
    off = tre(out.transform, truth, anat, 50, tumour)
    assert off > 5.0                                          # it is wrong ...
    assert out.warning is not None and out.spread_centre_mm > 3 * out.spread_limit_mm      # ... and says so


def test_bad_inputs_are_refused(pair):
    anat, pet = pair
    with pytest.raises(FusionError, match="rigid or affine"):
        reg.register(anat, pet, "bspline")
    with pytest.raises(FusionError, match="3D volumes"):
        reg.register(anat[:, :, 10], pet[:, :, 10])
    with pytest.raises(FusionError, match="not linear"):
        reg.register(anat, pet, initial=sitk.DisplacementFieldTransform(3))


def test_a_ct_is_seen_with_bone_saturated_and_nothing_else_is(pair, monkeypatch):
    """The metric sees a CT in HU (air at its 1st percentile) saturated at ``ct_bone_hu``, so that
    bone and metal do not take most of Mattes MI's bins from the soft tissues; MR, PET and the
    inputs are untouched, and the match score is taken on the images as they are."""
    anat, pet = pair
    ct = sitk.Cast(anat, sitk.sitkFloat32) * 10.0 - 1000.0          # air -1000 HU, "skull" +2000 HU
    assert np.percentile(sitk.GetArrayViewFromImage(ct), 1) == pytest.approx(-1000.0, abs=30.0)
    before = sitk.GetArrayFromImage(ct)
    seen = reg.bone_saturated(ct, 300.0)
    assert sitk.GetArrayViewFromImage(seen).max() == 300.0
    kept = sitk.GetArrayViewFromImage(ct) < 300.0
    assert np.array_equal(sitk.GetArrayViewFromImage(seen)[kept], before[kept])
    assert np.array_equal(sitk.GetArrayViewFromImage(ct), before)                 # the input untouched
    assert reg.bone_saturated(anat, 300.0) is anat and reg.bone_saturated(pet, 300.0) is pet   # not a CT
    assert reg.bone_saturated(ct, float("inf")) is ct                              # off
    padded = sitk.Cast(anat, sitk.sitkFloat32) * 10.0 - 3024.0      # padded far below air: not recognised
    assert reg.bone_saturated(padded, 300.0) is padded

    optimised = []
    real = reg._optimise
    monkeypatch.setattr(reg, "_optimise", lambda f, m, *a, **k: (optimised.append((f, m)), real(f, m, *a, **k))[1])
    scored = []
    real_score = reg.normalized_mutual_information
    monkeypatch.setattr(reg, "normalized_mutual_information",
                        lambda f, m, *a, **k: (scored.append((f, m)), real_score(f, m, *a, **k))[1])
    reg.register(ct, pet, "rigid", settings=reg.RegistrationSettings(restarts=0))
    (f, m), = optimised
    assert sitk.GetArrayViewFromImage(f).max() == 300.0 and m is not None
    assert np.array_equal(sitk.GetArrayViewFromImage(m), sitk.GetArrayViewFromImage(pet))
    assert sitk.GetArrayViewFromImage(scored[0][0]).max() == before.max()        # the score: as it is


def test_rgb_functional_registers_on_its_luma(pair):
    anat, pet = pair
    arr = sitk.GetArrayFromImage(pet)
    u8 = (255 * arr / arr.max()).astype(np.uint8)
    rgb = sitk.GetImageFromArray(np.stack([u8, u8 // 2, 255 - u8], -1), isVector=True)
    rgb.CopyInformation(pet)
    truth = rigid(angles_deg=(3, 0, -5), translation=(6, 8, -4))
    out = reg.register(anat, reg.moved_geometry(rgb, truth), "rigid", settings=FAST)
    assert tre(out.transform, truth, anat) < 2.0


@pytest.mark.usefixtures("shared_data")
def test_spm12_t2_to_t1(shared_data):
    """Real templates (91 x 109 x 91, 2 mm; a few seconds). Shrunk 2x, the MI optimum of this pair
    moves 1.6 mm from the truth, so the test runs on the full grid."""
    t1 = sitk.ReadImage(str(shared_data / "spm12" / "T1.nii"))
    t2 = sitk.ReadImage(str(shared_data / "spm12" / "T2.nii"))
    truth = rigid(angles_deg=(8.0, -6.0, 5.0), translation=(-14.0, 10.0, 12.0), centre=(0.0, -18.0, 18.0))
    out = reg.register(t1, reg.moved_geometry(t2, truth), "rigid")
    brain = region_points(brain_mask(t1))                  # the benchmark's region and targets
    assert tre(out.transform, truth, t1, 50, brain) < 1.0
    assert tre(out.transform, truth, t1, 95, brain) < 2.0


def test_ct_to_synthetic_mr_finest_level_on_the_whole_grid(shared_data):
    """What --register-with CT does, with an exact truth: STS_001's CT (198 x 202 x 59, 1 x 1 x 3.3
    mm, 2.4 million voxels) registered to an MR-like image made from itself (the benchmark's case
    (b)), after the benchmark's first misalignment. The finest level runs on the whole grid with
    100,000 samples: 0.06 mm median over the tumour (0.10 mm when that level took every 2nd voxel
    and 20,000 samples; elastix 0.07, ANTs 0.06)."""
    from bench_registration import centre_of, random_rigid, synthetic_mr  # noqa: PLC0415
    from MedicalFusionLib.io.read import read_source  # noqa: PLC0415

    root = shared_data / "sts" / "STS_001" / "CT"
    if not (root / "dicom").is_dir():
        pytest.skip(f"sts data not found in {root}")
    ct = read_source(root / "dicom", "functional").image
    tumour = region_points(sitk.ReadImage(str(root / "gtv_mask.nii.gz")))
    truth = random_rigid(np.random.default_rng(1000), centre_of(ct))
    out = reg.register(synthetic_mr(ct, seed=7), reg.moved_geometry(ct, truth), "rigid")
    assert tre(out.transform, truth, ct, 50, tumour) < 0.08
    assert tre(out.transform, truth, ct, 95, tumour) < 0.15
    assert out.warning is None


def test_benchmark_cache_keeps_every_tools_trials(tmp_path, pair):
    """scripts/bench_registration.py --cache/--run: each tool's trials are kept per case (one file
    per tool and process, so runs of different tools can fill it at once) and taken from there
    instead of being run again; a tool neither run nor cached is left out (no table is written)."""
    from bench_registration import load_cache, run_case_trials, save_cache  # noqa: PLC0415

    anat, pet = pair
    trial = {"tre": 0.5, "sec": 1.0, "cpu": 1.0, "error": "", "warning": ""}
    cache = {"x|ours|0": dict(trial, tre=0.25), "x|elastix|0": trial}
    save_cache(str(tmp_path), "hybrid", "ours", cache)
    save_cache(str(tmp_path), "hybrid", "elastix", cache)
    save_cache(str(tmp_path), "synthetic-mr", "elastix", {"x|elastix|0": dict(trial, tre=9.0)})
    loaded = load_cache(str(tmp_path), "hybrid")
    assert loaded == cache
    points = np.zeros((3, 3))
    # nothing is run (a peer would fail: no such interpreter): both come from the cache
    got = run_case_trials(anat, pet, points, ["ours", "elastix"], 1, FAST, "/nonexistent/python", 1, False, "x",
                          loaded, run=("elastix",))
    assert got == {"ours": [cache["x|ours|0"]], "elastix": [trial]}
    got = run_case_trials(anat, pet, points, ["ours", "elastix"], 2, FAST, "/nonexistent/python", 1, False, "x",
                          loaded, run=(), peer_trials=2)
    assert [len(got["ours"]), len(got["elastix"])] == [1, 1]


def test_benchmark_cache_takes_the_newest_file_of_a_tool(tmp_path):
    """Two runs of ours left files in the cache: the later run's trials win, whatever the process ids
    in the file names (the older file here has the larger id, as happened when ours was rerun)."""
    import os  # noqa: PLC0415

    from bench_registration import load_cache, save_cache  # noqa: PLC0415

    trial = {"tre": 0.5, "sec": 1.0, "cpu": 1.0, "error": "", "warning": ""}
    save_cache(str(tmp_path), "hybrid", "ours", {"x|ours|0": dict(trial, tre=2.0)})
    old = tmp_path / f"hybrid.ours.{os.getpid()}.json"
    old.rename(tmp_path / "hybrid.ours.99999999.json")
    os.utime(tmp_path / "hybrid.ours.99999999.json", (1_000_000_000, 1_000_000_000))
    save_cache(str(tmp_path), "hybrid", "ours", {"x|ours|0": dict(trial, tre=1.0)})
    os.rename(tmp_path / f"hybrid.ours.{os.getpid()}.json", tmp_path / "hybrid.ours.1.json")
    assert load_cache(str(tmp_path), "hybrid")["x|ours|0"]["tre"] == 1.0


def test_benchmark_text_describes_the_method_as_built():
    """The generated registration section names the settings the code runs with: both passes of
    the finest level, the first pass's grid, the coarsest level's budget and the restarts."""
    from bench_registration import method_text  # noqa: PLC0415

    s = reg.RegistrationSettings(first_pass_voxels=2_000_000)
    text = method_text(s)
    for words in (f"{s.samples} samples", f"{s.finest_samples} samples on the whole grid",
                  f"at most {s.first_pass_voxels} voxels", f"({s.coarsest_iterations} at the coarsest",
                  f"{s.restarts} restarts", "only when it has settled",
                  f"{s.uncertain_budget:g} times the finest level's iterations", f"saturated above {s.ct_bone_hu:g} HU"):
        assert words in text, words
    assert "flag" not in method_text(reg.RegistrationSettings(uncertain_budget=1.0))
    assert "saturated" not in method_text(reg.RegistrationSettings(ct_bone_hu=float("inf")))
    assert "second" not in method_text(reg.RegistrationSettings(finest_samples=0))
    assert "voxels" not in method_text(reg.RegistrationSettings(first_pass_voxels=0))


def test_finest_first_pass_grid_is_every_kth_voxel_in_place():
    """The finest level's first pass samples a grid of at most ``first_pass_voxels``: every k-th
    voxel (k the same on every axis), the kept voxels where they were; smaller grids unchanged."""
    image = sitk.Image([132, 132, 132], sitk.sitkFloat32)         # 2.3 million voxels
    image.SetOrigin((-10.0, 5.0, 3.0))
    image.SetSpacing((0.9, 0.9, 2.0))
    out = reg._first_pass_grid(image, 2_000_000)
    assert out.GetSize() == (66, 66, 66) and out.GetSpacing() == (1.8, 1.8, 4.0)
    assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()
    assert reg._first_pass_grid(image, 3_000_000) is image and reg._first_pass_grid(image, 0) is image


# ------------------------------------------------------------------------------------------------
# transform files


def test_transform_file_round_trip_and_one_line_errors(tmp_path):
    m = rigid()
    path = tmp_path / "t.tfm"
    reg.write_transform(reg.affine_transform(m), path)
    assert np.allclose(reg.affine_matrix(reg.read_transform(path)), m, atol=1e-9)
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, 0.2, 0.3, (4.0, 5.0, 6.0))
    sitk.WriteTransform(euler, str(tmp_path / "euler.tfm"))
    assert np.allclose(reg.affine_matrix(reg.read_transform(tmp_path / "euler.tfm")), reg.affine_matrix(euler))

    (tmp_path / "junk.tfm").write_text("#Insight Transform File V1.0\nTransform: NoSuchTransform\n")
    sitk.WriteTransform(sitk.Euler2DTransform(), str(tmp_path / "flat.tfm"))
    singular = tmp_path / "singular.tfm"
    sitk.WriteTransform(reg.affine_transform(np.diag([0.0, 1.0, 1.0, 1.0])), str(singular))
    for bad, words in ((tmp_path / "missing.tfm", "does not exist"), (tmp_path / "junk.tfm", "not an ITK transform"),
                       (tmp_path / "flat.tfm", "2D transform"), (singular, "singular")):
        with pytest.raises(FusionError, match=words) as err:
            reg.read_transform(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(FusionError, match="not a transform file name"):
        reg.write_transform(reg.affine_transform(m), tmp_path / "t.unknown")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["t.tfm", "euler.tfm", "junk.tfm", "flat.tfm", "singular.tfm"])      # no temporary left


# ------------------------------------------------------------------------------------------------
# command line


@pytest.fixture
def files(tmp_path, pair):
    anat, pet = pair
    truth = rigid()
    a, f = tmp_path / "mr.nrrd", tmp_path / "pet.nii.gz"
    sitk.WriteImage(anat, str(a))
    sitk.WriteImage(reg.moved_geometry(pet, truth), str(f))
    return a, f, truth


def run(capsys, *argv):
    code = cli.main(["fuse", *map(str, argv), "--method", "average", "--quiet"])
    err = capsys.readouterr().err
    return code, err


def test_cli_register_saves_a_transform_and_reuses_it(tmp_path, files, capsys, pair, shared_registrations):
    a, f, truth = files
    out1, tfm = tmp_path / "fused1.nrrd", tmp_path / "pet_to_mr.tfm"
    code, err = run(capsys, "-a", a, "-f", f, "-o", out1, "--register", "rigid", "--save-transform", tfm)
    assert code == 0, err
    saved = reg.read_transform(tfm)
    assert tre(saved, truth, pair[0]) < 2.0

    out2 = tmp_path / "fused2.nrrd"
    code, err = run(capsys, "-a", a, "-f", f, "-o", out2, "--transform", tfm)
    assert code == 0, err
    fused1, fused2 = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (out1, out2))
    assert np.array_equal(fused1, fused2)

    out3 = tmp_path / "fused3.nrrd"      # without the transform the fusion differs (it was misaligned)
    assert run(capsys, "-a", a, "-f", f, "-o", out3)[0] == 0
    assert np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(out3))).astype(int) - fused1).mean() > 1.0


def test_cli_register_from_a_given_transform(tmp_path, files, capsys, pair):
    a, f, truth = files
    rough = tmp_path / "rough.tfm"
    reg.write_transform(reg.affine_transform(rigid(angles_deg=(4, -2, 6), translation=(7, -10, 4))), rough)
    tfm = tmp_path / "refined.tfm"
    code, err = run(capsys, "-a", a, "-f", f, "-o", tmp_path / "o.nrrd", "--register", "rigid",
                    "--transform", rough, "--save-transform", tfm)
    assert code == 0, err
    assert tre(reg.read_transform(tfm), truth, pair[0]) < 2.0


@pytest.mark.parametrize("case", ["junk", "missing", "save-alone", "extension", "over-input"])
def test_cli_bad_transform_is_one_line_and_writes_nothing(tmp_path, files, capsys, case):
    a, f, _ = files
    junk = tmp_path / "junk.tfm"
    junk.write_text("not a transform\n")
    good = tmp_path / "good.tfm"
    reg.write_transform(reg.affine_transform(np.eye(4)), good)
    extra = {"junk": ["--transform", junk], "missing": ["--transform", tmp_path / "none.tfm"],
             "save-alone": ["--save-transform", tmp_path / "t.tfm"],
             "extension": ["--register", "rigid", "--save-transform", tmp_path / "t.nrrd"],
             "over-input": ["--register", "rigid", "--transform", good, "--save-transform", good]}[case]
    before = sorted(tmp_path.iterdir())
    good_bytes = good.read_bytes()
    out = tmp_path / "fused.nrrd"
    code, err = run(capsys, "-a", a, "-f", f, "-o", out, *extra)
    assert code == cli.EXIT_USER_ERROR
    assert err.startswith("medicalfusion: error: ") and err.count("\n") == 1, err
    assert sorted(tmp_path.iterdir()) == before and good.read_bytes() == good_bytes     # nothing written


def test_cli_not_converging_is_one_line_and_writes_nothing(tmp_path, files, capsys, monkeypatch):
    a, f, _ = files
    settings = reg.RegistrationSettings
    monkeypatch.setattr(reg, "RegistrationSettings", lambda: settings(iterations=3, coarsest_iterations=3, learning_rate=0.5))
    out, tfm = tmp_path / "fused.nrrd", tmp_path / "t.tfm"
    code, err = run(capsys, "-a", a, "-f", f, "-o", out, "--register", "rigid", "--save-transform", tfm)
    assert code == cli.EXIT_USER_ERROR
    assert "did not converge" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mr.nrrd", "pet.nii.gz"]     # no output, no temporary


def test_dicom_frame_of_reference(shared_data, tmp_path):
    sts = shared_data / "sts" / "STS_001"
    if not (sts / "CT" / "dicom").is_dir():
        pytest.skip(f"sts data not found in {sts.parent}")
    from MedicalFusionLib.io.read import read_source

    def shared(a, b):          # as the CLI does it: the UIDs the series' headers gave when read
        facts = [read_source(p, "input").facts for p in (a, b)]
        return reg.note_if_already_registered(*(f.frame_of_reference_uid if f else None for f in facts))

    uid = shared(sts / "CT" / "dicom", sts / "PET" / "dicom")
    assert uid and uid.startswith("1.3.6.1.4.1.14519")            # one hybrid PET/CT session
    other = shared_data / "sts" / "STS_002" / "PET" / "dicom"
    assert shared(sts / "CT" / "dicom", other) is None
    assert shared(shared_data / "spm12" / "T1.nii", shared_data / "spm12" / "PET.nii") is None


def test_cli_says_dicom_series_are_already_registered(shared_data, tmp_path, capsys):
    sts = shared_data / "sts" / "STS_001"
    if not (sts / "CT" / "dicom").is_dir():
        pytest.skip(f"sts data not found in {sts.parent}")
    code = cli.main(["fuse", "-a", str(sts / "CT" / "dicom"), "-f", str(sts / "PET" / "dicom"), "--method", "average",
                     "-o", str(tmp_path / "fused.nrrd")])
    err = capsys.readouterr().err
    assert code == 0
    assert err.startswith("medicalfusion: note: both DICOM series share the FrameOfReferenceUID")
    assert "already registered" in err


@pytest.fixture
def tube_files(tmp_path, tube_pair):
    a, f = tmp_path / "limb_mr.nrrd", tmp_path / "limb_pet.nrrd"
    sitk.WriteImage(tube_pair[0], str(a))
    sitk.WriteImage(tube_pair[1], str(f))
    return a, f


def test_cli_uncertain_registration_warns_even_quiet_and_strict_refuses(tmp_path, tube_files, files, capsys,
                                                                        shared_registrations):
    a, f = tube_files
    out, csv = tmp_path / "fused.nrrd", tmp_path / "metrics.csv"
    code, err = run(capsys, "-a", a, "-f", f, "-o", out, "--register", "rigid", "--metrics", csv,
                    "--metric-set", "quick")                         # --quiet (run() adds it)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("medicalfusion: warning: ")]
    assert len(warnings) == 1 and "registration is uncertain" in warnings[0] and "mm apart" in warnings[0]
    rows = {r.split(",")[0]: r.split(",")[1] for r in csv.read_text().splitlines()[1:]}
    assert float(rows["registration_spread_centre_mm"]) > 4.0 and rows["registration_uncertain"] == "True"
    header = sitk.ReadImage(str(out))
    assert header.GetMetaData("MedicalFusion.registration_uncertain") == "True"

    before = sorted(tmp_path.iterdir())
    code, err = run(capsys, "-a", a, "-f", f, "-o", tmp_path / "fused2.nrrd", "--register", "rigid",
                    "--strict-registration")
    assert code == cli.EXIT_USER_ERROR
    assert err.startswith("medicalfusion: error: ") and "uncertain" in err and err.count("\n") == 1, err
    assert sorted(tmp_path.iterdir()) == before                       # nothing written

    code, err = run(capsys, "-a", a, "-f", f, "-o", tmp_path / "fused3.nrrd", "--strict-registration")
    assert code == cli.EXIT_USER_ERROR and "add --register" in err

    # a sure registration: no warning; the note line (without --quiet) gives the spread
    ma, mf, _ = files
    code = cli.main(["fuse", "-a", str(ma), "-f", str(mf), "-o", str(tmp_path / "head.nrrd"), "--method", "average",
                     "--register", "rigid", "--strict-registration"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning" not in captured.err
    assert "spread" in captured.out and "mm at the centre" in captured.out


# ------------------------------------------------------------------------------------------------
# --register-with: register the functional's own CT, apply the result to the functional


@pytest.fixture
def study_files(tmp_path, pair):
    """An MR; a PET and a 'CT' of one session (one frame: both moved by the same ``truth``); a CT
    of another placement."""
    anat, pet = pair
    truth = rigid()
    ct = phantom("t2", spacing=3.5, seed=3)              # a second sharp contrast plays the CT
    paths = {name: tmp_path / f"{name}.nrrd" for name in ("mr", "pet", "ct", "other_ct")}
    sitk.WriteImage(anat, str(paths["mr"]))
    sitk.WriteImage(reg.moved_geometry(pet, truth), str(paths["pet"]))
    sitk.WriteImage(reg.moved_geometry(ct, truth), str(paths["ct"]))
    sitk.WriteImage(reg.moved_geometry(ct, rigid(angles_deg=(0, 0, 0), translation=(0.0, 0.0, 200.0))),
                    str(paths["other_ct"]))
    return paths, truth


def test_cli_register_with_the_functionals_ct(tmp_path, study_files, capsys, pair, shared_registrations):
    paths, truth = study_files
    tfm = tmp_path / "ct_to_mr.tfm"
    code, err = run(capsys, "-a", paths["mr"], "-f", paths["pet"], "-o", tmp_path / "fused.nrrd", "--register", "rigid",
                    "--register-with", paths["ct"], "--save-transform", tfm)
    assert code == 0, err
    found = reg.read_transform(tfm)
    assert tre(found, truth, pair[0]) < 2.0                   # the CT's registration places the PET
    # it is the CT's, not the PET's (shared_registrations gives the answer the command found only when
    # these are the very images it registered)
    direct = reg.register(pair[0], sitk.ReadImage(str(paths["ct"])), "rigid")
    assert np.allclose(reg.affine_matrix(found), reg.affine_matrix(direct.transform), atol=1e-6)

    before = sorted(tmp_path.iterdir())
    for extra, message in ((["--register", "rigid", "--register-with", paths["other_ct"]], "do not share a placement"),
                           (["--register-with", paths["ct"]], "add --register")):
        code, err = run(capsys, "-a", paths["mr"], "-f", paths["pet"], "-o", tmp_path / "fused2.nrrd", *extra)
        assert code == cli.EXIT_USER_ERROR and message in err and err.count("\n") == 1, err
    assert sorted(tmp_path.iterdir()) == before                    # nothing written


def test_same_frame_by_dicom_uid_or_placement(pair):
    anat, pet = pair
    assert reg.check_same_frame(pet, anat, "1.2.3", "1.2.3") == "frame of reference"
    assert reg.check_same_frame(pet, anat) == "placement"
    with pytest.raises(FusionError, match="FrameOfReferenceUID") as err:
        reg.check_same_frame(pet, anat, "1.2.3", "1.2.4")           # even when they overlap
    assert "\n" not in str(err.value)


def test_sts_register_pet_to_mr_through_its_ct(shared_data, tmp_path, capsys):
    """The clinical case on real series: STS_003's PET placed on its MR by registering its CT
    (same hybrid session, one FrameOfReferenceUID); another patient's CT is refused. (On the 5 cm
    crops of STS_001 and STS_002, CT -> MR itself is refused: it moves 95 mm, or makes the match
    worse.)"""
    sts = shared_data / "sts"
    if not (sts / "STS_003" / "CT" / "dicom").is_dir():
        pytest.skip(f"sts data not found in {sts}")
    series = {name: sts / "STS_003" / name / "dicom" for name in ("MR_T1", "PET", "CT")}
    tfm = tmp_path / "ct_to_mr.tfm"
    code = cli.main(["fuse", "-a", str(series["MR_T1"]), "-f", str(series["PET"]), "-o", str(tmp_path / "f.nrrd"),
                     "--method", "average", "--register", "rigid", "--register-with", str(series["CT"]),
                     "--save-transform", str(tfm)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "applied to the functional" in captured.out and "spread" in captured.out
    assert tfm.is_file()
    code = cli.main(["fuse", "-a", str(series["MR_T1"]), "-f", str(series["PET"]), "-o", str(tmp_path / "g.nrrd"),
                     "--method", "average", "--register", "rigid", "-q",
                     "--register-with", str(sts / "STS_001" / "CT" / "dicom")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR and "FrameOfReferenceUID" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct_to_mr.tfm", "f.nrrd"]
