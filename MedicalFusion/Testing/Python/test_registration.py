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


def _blobs(points: np.ndarray) -> dict:
    """Membership of physical points (N x 3, mm) in the phantom's structures (asymmetric on purpose)."""
    def ellipsoid(centre, radii):
        return np.sum(((points - np.array(centre)) / np.array(radii)) ** 2, axis=1) < 1.0
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
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    points = np.stack([i.ravel(), j.ravel(), k.ravel()], 1) * spacing + origin
    b = _blobs(points)
    values = {"mr": {"head": 100, "skull": 300, "ventricle": -70, "lesion": 30, "nucleus": 60},
              "t2": {"head": 60, "skull": -40, "ventricle": 120, "lesion": 150, "nucleus": -20},
              "pet": {"head": 40, "skull": -25, "ventricle": -30, "lesion": 300, "nucleus": 90}}[kind]
    arr = np.zeros(len(points), np.float32)
    for name, v in values.items():
        arr[b[name]] += v
    image = sitk.GetImageFromArray(arr.reshape(size[::-1]))
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


FAST = reg.RegistrationSettings(iterations=60)


@pytest.fixture(scope="module")
def pair():
    """(anatomical 'MR' on a 3 mm grid, functional 'PET' on a 4 mm grid), aligned."""
    return phantom("mr"), phantom("pet", spacing=4.0, seed=1)


# ------------------------------------------------------------------------------------------------
# registration


def test_rigid_recovers_a_known_misalignment_and_maps_anatomical_to_functional_points(pair):
    anat, pet = pair
    truth = rigid()
    moved = reg.moved_geometry(pet, truth)
    before = tre(reg.affine_transform(np.eye(4)), truth, anat)
    out = reg.register(anat, moved, "rigid", settings=FAST)
    assert before > 15.0
    assert tre(out.transform, truth, anat) < 2.0           # half the PET's 4 mm voxel
    assert out.metric_after > out.metric_before + 0.1        # normalised MI: higher is better
    assert out.start == "placement" and out.overlap > 0.9
    # the convention: resampling the moved PET with the result puts it back where it was
    back = sitk.Resample(moved, anat, out.transform, sitk.sitkLinear, 0.0)
    ref = sitk.Resample(pet, anat, sitk.Transform(), sitk.sitkLinear, 0.0)
    r = np.corrcoef(sitk.GetArrayViewFromImage(back).ravel(), sitk.GetArrayViewFromImage(ref).ravel())[0, 1]
    assert r > 0.97


def test_inputs_are_not_modified(pair):
    anat, pet = pair
    moved = reg.moved_geometry(pet, rigid())
    before = [(sitk.GetArrayFromImage(i).copy(), i.GetOrigin(), i.GetDirection(), i.GetSpacing())
              for i in (anat, moved)]
    reg.register(anat, moved, "rigid", settings=FAST)
    for img, (arr, origin, direction, spacing) in zip((anat, moved), before):
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


def test_volumes_far_from_the_world_origin_converge_as_near_it(pair):
    """CT/PET of the legs lie ~600 mm below the scanner's origin. SimpleITK drops the optimised
    transform's centre when a start is given, so rotations turned about the world origin: the
    optimizer crept for all its iterations and ended mm away even on identical images. The same
    pair placed near and far from the origin must now converge alike, and well before the limit."""
    anat, pet = pair
    far = np.eye(4)
    far[:3, 3] = (150.0, 80.0, -650.0)
    results = []
    for place in (np.eye(4), far):
        a, f = reg.moved_geometry(anat, place), reg.moved_geometry(pet, place)
        truth = place @ rigid() @ np.linalg.inv(place)          # the same misalignment, about the head
        out = reg.register(a, reg.moved_geometry(f, truth), "rigid", settings=FAST)
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


def test_progress_every_iteration_and_cancel_stops_at_once(pair):
    anat, pet = pair
    moved = reg.moved_geometry(pet, rigid())
    calls = []
    out = reg.register(anat, moved, "rigid", progress=lambda d, t: calls.append((d, t)), settings=FAST)
    assert len(calls) == out.iterations                 # one report per optimizer iteration
    assert all(t == FAST.iterations * 3 for _, t in calls)
    assert all(0 < d <= t for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    asked, after = [], []

    def cancel():
        asked.append(1)
        return len(asked) >= 5

    with pytest.raises(FusionCancelled):
        reg.register(anat, moved, "rigid", progress=lambda d, t: after.append(d) if len(asked) >= 5 else None,
                     cancel=cancel, settings=FAST)
    assert len(after) <= 3            # at most a level change's first iteration per remaining level


def test_not_converging_is_a_one_line_error(pair):
    anat, pet = pair
    moved = reg.moved_geometry(pet, rigid())
    with pytest.raises(FusionError) as err:
        reg.register(anat, moved, "rigid", settings=reg.RegistrationSettings(iterations=3, learning_rate=0.5))
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
    squash = np.diag([4.0, 1.0, 1.0, 1.0])
    with pytest.raises(FusionError, match="scaled"):
        reg.check_converged(outcome(transform=reg.affine_transform(squash)), s)
    with pytest.raises(FusionError, match="mirrored"):
        reg.check_converged(outcome(transform=reg.affine_transform(np.diag([-1.0, 1.0, 1.0, 1.0]))), s)
    reg.check_converged(outcome(moved_mm=reg.MAX_MOVE_MM - 1.0), s)               # a refinement
    with pytest.raises(FusionError, match="wrong structures"):
        reg.check_converged(outcome(moved_mm=reg.MAX_MOVE_MM + 1.0), s)          # a jump elsewhere


def test_real_pet_mr_pair_matched_far_away_is_refused_not_fused(shared_data):
    """STS_001's PET -> MR (a 5 cm crop around a thigh tumour): after a 20 mm / 10 degree class
    misalignment, mutual information pulls the PET 47-74 mm away, to a match it scores higher than
    the true alignment. That must be a one-line error, never a silently misplaced tracer."""
    from bench_registration import load_pairs, random_rigid, centre_of

    [(_, anat, pet, *_)] = list(load_pairs(shared_data, ["sts/STS_001/PET-MR"]))
    misaligned = reg.moved_geometry(pet, random_rigid(np.random.default_rng(1000), centre_of(pet)))
    with pytest.raises(FusionError) as err:
        reg.register(anat, misaligned, "rigid")
    # refused by the move it made (or, as ITK's threaded sums run, by its not settling there)
    assert "mm from where it started" in str(err.value) or "did not converge" in str(err.value)
    assert "place the volumes roughly first" in str(err.value) and "\n" not in str(err.value)


def test_bad_inputs_are_refused(pair):
    anat, pet = pair
    with pytest.raises(FusionError, match="rigid or affine"):
        reg.register(anat, pet, "bspline")
    with pytest.raises(FusionError, match="3D volumes"):
        reg.register(anat[:, :, 10], pet[:, :, 10])
    with pytest.raises(FusionError, match="not linear"):
        reg.register(anat, pet, initial=sitk.DisplacementFieldTransform(3))


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


def test_cli_register_saves_a_transform_and_reuses_it(tmp_path, files, capsys, pair):
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
    monkeypatch.setattr(reg, "RegistrationSettings", lambda: settings(iterations=3, learning_rate=0.5))
    out, tfm = tmp_path / "fused.nrrd", tmp_path / "t.tfm"
    code, err = run(capsys, "-a", a, "-f", f, "-o", out, "--register", "rigid", "--save-transform", tfm)
    assert code == cli.EXIT_USER_ERROR
    assert "did not converge" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mr.nrrd", "pet.nii.gz"]     # no output, no temporary


def test_dicom_frame_of_reference(shared_data, tmp_path):
    sts = shared_data / "sts" / "STS_001"
    if not (sts / "CT" / "dicom").is_dir():
        pytest.skip(f"sts data not found in {sts.parent}")
    from MedicalFusionLib.sources import read_source

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
