"""Fault injection: hostile inputs, colliding outputs, full disks, signals (issue 12).

Every case ends either with ONE line on stderr (``medicalfusion: error: ...``, exit 2; never
"internal error") and nothing written or changed, or with everything written and nothing lost.
Organised as the issue's classes:

A. an input or the result destroyed, or a wrong image written with exit 0;
B. files left behind, or "nothing was written" when something was;
C. crashes, hangs, silently wrong counts;
D. "internal error" or unclear messages for a user's mistake.

Real faults wherever possible: a full disk is RLIMIT_FSIZE in a subprocess (and a small tmpfs when
one can be mounted), signals are sent to a subprocess paused at a named point of the writing
($MEDICALFUSION_TEST_PAUSE_AT, see io/outputs.py), permission denied drops root's file capabilities
(CAP_DAC_OVERRIDE/READ_SEARCH) in the subprocess when the suite runs as root (as CI does), FIFOs and devices are real ones.
The subprocesses are children of a fork server that has imported the package once (cli_process.py:
a real process each, without a fresh interpreter's 2 s of imports); the test of a Ctrl-C while the
command starts runs a fresh interpreter.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import cli_process

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, make_image
from test_cli import write_dicom_series
from MedicalFusionLib.cli import main
from MedicalFusionLib.errors import FusionError
from MedicalFusionLib.io.outputs import PAUSE_ENV, PAUSE_FILE_ENV

MODULE_DIR = REPO / "MedicalFusion"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
posix_only = pytest.mark.skipif(os.name != "posix", reason="signals, FIFOs and RLIMIT are POSIX")


# ------------------------------------------------------------------------------------------------
# helpers


def _volumes():
    z, y, x = np.mgrid[0:8, 0:40, 0:48].astype(np.float32)
    rng = np.random.default_rng(7)
    anat = (100 + 80 * np.sin(x / 5.0) * np.cos(y / 7.0) + rng.normal(0, 5, x.shape)).astype(np.float32)
    pet = (np.exp(-((x - 24) ** 2 + (y - 20) ** 2) / 150.0) * 10.0 + 0.5).astype(np.float32)
    return anat, pet


@pytest.fixture
def pair(tmp_path):
    """mri.nrrd + pet.nrrd in a fresh folder (tests may put outputs beside them)."""
    anat, pet = _volumes()
    a, f = tmp_path / "mri.nrrd", tmp_path / "pet.nrrd"
    sitk.WriteImage(make_image(anat), str(a))
    sitk.WriteImage(make_image(pet), str(f))
    return tmp_path, a, f


def snapshot(folder: pathlib.Path) -> dict:
    """Every entry under ``folder`` (hidden ones too) -> sha256 of its bytes (None for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = None if p.is_dir() or not p.is_file() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: pathlib.Path) -> list:
    return [p.name for p in folder.rglob(".mf-*")]


def cli(capfd, *args):
    """Run the command in-process; (exit status, non-empty stderr lines). capfd sees fd 2 too, so
    anything ITK's libraries print would show here."""
    rc = main([str(a) for a in args])
    _out, err = capfd.readouterr()
    return rc, [line for line in err.splitlines() if line.strip()]


def assert_one_line(rc, lines, *expected, status=2):
    assert rc == status, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("medicalfusion: error:"), lines
    assert "internal error" not in lines[0] and "Traceback" not in lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])


def run_cli(args, cwd, env=None, timeout=300, preexec_fn=None) -> subprocess.CompletedProcess:
    """The command in a subprocess (for RLIMIT, signals, another user, hangs): a child of the fork
    server (cli_process.py); ``preexec_fn``: a :class:`cli_process.Setup`."""
    return cli_process.run(args, cwd, env=env, setup=[preexec_fn] if preexec_fn else [], timeout=timeout)


def err_lines(proc) -> list:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def limit_file_size(nbytes: int) -> cli_process.Setup:
    """preexec_fn: the process may not write a file larger than ``nbytes`` (a full disk, per file)."""
    return cli_process.Setup("fsize", nbytes)


@contextlib.contextmanager
def mounted_tmpfs(where: pathlib.Path, options: str):
    """A tmpfs at ``where`` (root only); skips when the system does not allow mounting."""
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root: the RLIMIT_FSIZE cases cover a full disk")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the RLIMIT_FSIZE cases cover a full disk")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def open_tmp():
    """A folder outside pytest's private tree (for the permission cases); removed afterwards."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="mf-faults-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


#: preexec_fn (Linux, root): drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
#: the command (still uid 0, owner of the test files) is subject to file permissions.
_drop_file_capabilities = cli_process.Setup("drop_file_capabilities")


def unprivileged_kwargs(folder: pathlib.Path) -> dict:
    """subprocess arguments under which file permissions apply (root bypasses them): as root, the
    file capabilities are dropped; skips where that is impossible."""
    if not IS_ROOT:
        return {}
    locked = folder / "probe_locked"
    locked.write_text("x", encoding="utf-8")
    locked.chmod(0o000)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(locked)!r}).read()"], capture_output=True,
                               preexec_fn=_drop_file_capabilities)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"running as root and file capabilities cannot be dropped here ({exc})")
    finally:
        locked.unlink()
    if b"PermissionError" not in probe.stderr:
        pytest.skip("running as root and file permissions cannot be made to apply to a child process")
    return {"preexec_fn": _drop_file_capabilities}


#: In the child: SIGINT at its default, as a command typed at a terminal has it. A background job
#: of a non-interactive shell (``make test &``) inherits SIGINT ignored, and the CLI keeps an
#: ignored SIGINT ignored (as nohup users expect), so Ctrl-C tests would see a finished run.
_as_from_a_terminal = cli_process.Setup("sigint_default")


def start_paused(args, cwd: pathlib.Path, point: str, marker: pathlib.Path, fresh: bool = False) -> cli_process.Process:
    """Start the command so that it pauses at ``point`` (io.outputs.pause_point); wait until it is
    there. A child of the fork server, or (``fresh``) a new interpreter."""
    proc = cli_process.Process(args, cwd, env={PAUSE_ENV: point, PAUSE_FILE_ENV: str(marker)},
                               setup=[_as_from_a_terminal], fresh=fresh)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the command ended before reaching {point}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the command never reached {point}")
        time.sleep(0.05)
    return proc


# ================================================================================================
# A. an input or the result destroyed, or a wrong image written with exit 0


@pytest.mark.parametrize("given, output", [("t1.hdr", "t1.img"), ("t1.img", "t1.img"), ("t1.img", "t1.hdr"),
                                           ("m1.mhd", "m1.raw"), ("n1.nhdr", "n1.raw")],
                         ids=["hdr-input_img-output", "img-input_img-output", "img-input_hdr-output",
                              "mhd-input_its-raw-output", "nhdr-input_its-raw-output"])
def test_A_output_naming_a_file_of_a_multi_file_input_is_refused(tmp_path, capfd, given, output):
    anat, pet = _volumes()
    sitk.WriteImage(make_image(anat), str(tmp_path / "t1.hdr"))        # t1.hdr + t1.img
    sitk.WriteImage(make_image(anat), str(tmp_path / "m1.mhd"))        # m1.mhd + m1.raw
    sitk.WriteImage(make_image(anat), str(tmp_path / "n1.nhdr"))       # n1.nhdr + n1.raw
    sitk.WriteImage(make_image(pet), str(tmp_path / "pet.nrrd"))
    before = snapshot(tmp_path)
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / given, "-f", tmp_path / "pet.nrrd", "-o", tmp_path / output, "-q")
    assert_one_line(rc, lines, "would overwrite the anatomical input")
    assert snapshot(tmp_path) == before


def test_A_output_naming_the_data_file_of_an_mhd_input_is_refused(tmp_path, capfd):
    anat, pet = _volumes()
    sitk.WriteImage(make_image(anat), str(tmp_path / "t1.mhd"), useCompression=True)   # t1.mhd + t1.zraw
    sitk.WriteImage(make_image(pet), str(tmp_path / "pet.nrrd"))
    before = snapshot(tmp_path)
    # the output t1.mhd would write t1.mhd + t1.zraw: both belong to the input
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "pet.nrrd", "-f", tmp_path / "t1.mhd",
                    "-o", tmp_path / "t1.mhd", "-q")
    assert_one_line(rc, lines, "would overwrite the functional input")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["slice002.dcm", "new.nrrd"], ids=["a-slice", "a-new-file-in-the-folder"])
def test_A_output_inside_a_dicom_folder_input_is_refused(tmp_path, capfd, target):
    anat, pet = _volumes()
    vol = sitk.Cast(make_image(anat), sitk.sitkInt16)
    write_dicom_series(vol, tmp_path / "series")
    sitk.WriteImage(make_image(pet), str(tmp_path / "pet.nrrd"))
    before = snapshot(tmp_path)
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "series", "-f", tmp_path / "pet.nrrd",
                    "-o", tmp_path / "series" / target, "-q")
    assert_one_line(rc, lines, "anatomical input")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_A_output_that_is_an_input_under_another_name_is_refused(pair, capfd, link):
    tmp, a, f = pair
    other = tmp / "other_name.nrrd"
    (os.link if link == "hard" else os.symlink)(a, other)
    before = snapshot(tmp)
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", other, "-q")
    assert_one_line(rc, lines, "would overwrite the anatomical input")
    assert snapshot(tmp) == before


@pytest.mark.parametrize("outputs", [
    ("-o", "x.nrrd", "--metrics", "x.nrrd"),
    ("-o", "x.png", "--preview", "x.png"),
    ("-o", "x.nrrd", "--metrics", "p.png", "--preview", "p.png"),
    ("-o", "X.nrrd", "--metrics", "x.NRRD"),
    ("-o", "x.hdr", "--metrics", "x.img"),
    ("-o", "x.mhd", "--metrics", "x.zraw"),
], ids=["metrics=output", "preview=output", "metrics=preview", "differ-only-in-case", "hdr-vs-img", "mhd-vs-its-data"])
def test_A_outputs_colliding_with_each_other_are_refused(pair, capfd, outputs):
    tmp, a, f = pair
    args = [tmp / v if not v.startswith("-") else v for v in outputs]
    before = snapshot(tmp)
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, *args, "-q")
    assert_one_line(rc, lines, "name the same file")
    assert snapshot(tmp) == before


@posix_only
@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".hdr", ".nhdr"])
def test_A_disk_full_while_writing_the_volume_is_an_error(pair, ext):
    tmp, a, f = pair
    before = snapshot(tmp)
    proc = run_cli(["fuse", "-a", a, "-f", f, "-o", tmp / f"fused{ext}", "--metrics", tmp / "m.csv", "-q"], cwd=tmp,
                   preexec_fn=limit_file_size(12_000))
    lines = err_lines(proc)
    assert_one_line(proc.returncode, lines, "cannot write output", "file size limit", "nothing was written")
    assert snapshot(tmp) == before


@posix_only
def test_A_a_full_tmpfs_is_an_error_naming_the_full_disk(pair, tmp_path):
    tmp, a, f = pair
    with mounted_tmpfs(tmp_path / "small", "size=16k") as small:
        proc = run_cli(["fuse", "-a", a, "-f", f, "-o", small / "fused.nii", "-q"], cwd=tmp)
        assert_one_line(proc.returncode, err_lines(proc), "cannot write output", "disk is full")
        assert os.listdir(small) == []


def _truncate(path: pathlib.Path, keep: float = 0.6) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))


@pytest.mark.parametrize("ext, data", [(".nii", None), (".nii.gz", None), (".hdr", ".img"), (".nrrd", None),
                                       (".nhdr", ".raw.gz"), (".mha", None), (".mhd", ".zraw"), (".png", None),
                                       (".jpg", None), (".bmp", None)])
def test_A_truncated_input_is_refused(tmp_path, capfd, ext, data):
    anat, pet = _volumes()
    sitk.WriteImage(make_image(anat), str(tmp_path / "mri.nrrd"))
    if ext in (".png", ".jpg", ".bmp"):
        pic = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
        image = make_image(pic, vector=True)
        sitk.WriteImage(make_image((pic[..., 0]).astype(np.uint8)), str(tmp_path / f"mri{ext}"))
        anat_path = tmp_path / f"mri{ext}"
    else:
        image = make_image(pet)
        anat_path = tmp_path / "mri.nrrd"
    src = tmp_path / f"func{ext}"
    sitk.WriteImage(image, str(src), useCompression=True)
    _truncate(src.with_name("func" + data) if data else src)
    before = snapshot(tmp_path)
    rc, lines = cli(capfd, "fuse", "-a", anat_path, "-f", src, "-o", tmp_path / "out.nrrd", "-q")
    assert_one_line(rc, lines, "functional input", "truncated")
    assert snapshot(tmp_path) == before


def test_A_dicom_folder_with_a_truncated_slice_is_refused(tmp_path, capfd):
    anat, pet = _volumes()
    write_dicom_series(sitk.Cast(make_image(anat), sitk.sitkInt16), tmp_path / "series")
    sitk.WriteImage(make_image(pet), str(tmp_path / "pet.nrrd"))
    _truncate(tmp_path / "series" / "slice003.dcm", 0.8)
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "series", "-f", tmp_path / "pet.nrrd", "-o", tmp_path / "o.nrrd", "-q")
    assert_one_line(rc, lines, "slice003.dcm", "not part of the series")
    assert not (tmp_path / "o.nrrd").exists()


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".hdr", ".nrrd", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_A_nan_or_inf_inside_the_file_is_refused(tmp_path, capfd, ext, bad):
    import nibabel as nib

    anat, pet = _volumes()
    pet[2, 10, 10] = bad
    sitk.WriteImage(make_image(anat), str(tmp_path / "mri.nrrd"))
    path = tmp_path / f"pet{ext}"
    if ext in (".nii", ".nii.gz"):
        nib.save(nib.Nifti1Image(np.ascontiguousarray(pet.transpose(2, 1, 0)), np.eye(4)), str(path))
    else:
        sitk.WriteImage(make_image(pet), str(path))
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "mri.nrrd", "-f", path, "-o", tmp_path / "o.nrrd", "-q")
    assert_one_line(rc, lines, "NaN or infinite")
    assert not (tmp_path / "o.nrrd").exists()


@pytest.mark.parametrize("two_d_role", ["anatomical", "functional"])
def test_A_a_2d_picture_never_pairs_with_a_3d_volume(pair, capfd, two_d_role):
    tmp, a, f = pair
    pic = tmp / "slice.png"
    sitk.WriteImage(make_image((np.random.default_rng(1).random((40, 48)) * 255).astype(np.uint8)), str(pic))
    args = ["-a", pic, "-f", f] if two_d_role == "anatomical" else ["-a", a, "-f", pic]
    rc, lines = cli(capfd, "fuse", *args, "-o", tmp / "o.nrrd", "-q")
    assert_one_line(rc, lines, "2D image", "3D volume")
    assert not (tmp / "o.nrrd").exists()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_A_a_3d_result_is_not_written_as_a_2d_picture(pair, capfd, ext):
    tmp, a, f = pair
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", tmp / f"o{ext}", "-q")
    assert_one_line(rc, lines, "one 2D picture", "8 slices")
    assert not (tmp / f"o{ext}").exists()


@pytest.mark.parametrize("ext", [".hdr", ".img", ".img.gz", ".mhd", ".nhdr", ".nii", ".nii.gz", ".mha", ".tif"])
def test_A_every_written_format_reads_back_whole_with_its_final_names(pair, capfd, ext):
    tmp, a, f = pair
    rc, _ = cli(capfd, "fuse", "-a", a, "-f", f, "-m", "average", "-o", tmp / "ref.nrrd", "-q")
    assert rc == 0
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-m", "average", "-o", tmp / f"fused{ext}", "-q")
    assert rc == 0 and lines == []
    assert leftovers(tmp) == []
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / f"fused{ext}")))
    np.testing.assert_array_equal(back, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "ref.nrrd"))))
    if ext in (".mhd", ".nhdr"):
        header = (tmp / f"fused{ext}").read_text(encoding="latin-1")
        assert ".mf-" not in header and ("fused.zraw" in header or "fused.raw.gz" in header)


@pytest.mark.parametrize("value", ["-1", "0"])
def test_A_batch_size_out_of_range_is_refused(pair, capfd, value):
    tmp, a, f = pair
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", tmp / "o.nrrd", "--batch-size", value, "-q")
    assert_one_line(rc, lines, "--batch-size", "out of range")
    assert not (tmp / "o.nrrd").exists()


def test_A_batch_size_out_of_range_is_refused_by_the_library_too(small_pair):
    from MedicalFusionLib.pipeline import FusionOptions, fuse_images

    with pytest.raises(FusionError, match="batch size"):
        fuse_images(*small_pair, FusionOptions(method="average", batch_size=-1, compute_metrics=False))


def test_A_float_rgb_in_0_1_keeps_its_colour(pair, capfd):
    tmp, a, f = pair
    _z, y, x = np.mgrid[0:8, 0:40, 0:48].astype(np.float32)
    rgb01 = np.stack([x / 47.0, y / 39.0, np.full_like(x, 0.25)], axis=-1).astype(np.float32)
    sitk.WriteImage(make_image(rgb01, vector=True), str(tmp / "rgb01.nrrd"))
    sitk.WriteImage(make_image(np.rint(rgb01 * 255).astype(np.uint8), vector=True), str(tmp / "rgb8.nrrd"))
    for name in ("rgb01", "rgb8"):
        rc, lines = cli(capfd, "fuse", "-a", a, "-f", tmp / f"{name}.nrrd", "-m", "average", "-o", tmp / f"o_{name}.nrrd", "-q")
        assert rc == 0, lines
    o01 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "o_rgb01.nrrd")))
    o8 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "o_rgb8.nrrd")))
    np.testing.assert_array_equal(o01, o8)
    assert np.abs(o8[..., 0].astype(int) - o8[..., 2]).mean() > 20        # colour, not a grey 0/1 image


@pytest.mark.parametrize("scale, expected", [(1e300, "too large"), (1e-300, "precision")])
def test_A_float64_values_beyond_float32_are_refused(pair, capfd, scale, expected):
    tmp, a, f = pair
    anat, _ = _volumes()
    sitk.WriteImage(make_image(anat.astype(np.float64) * scale), str(tmp / "scaled.nrrd"))
    rc, lines = cli(capfd, "fuse", "-a", tmp / "scaled.nrrd", "-f", f, "-o", tmp / "o.nrrd", "-q")
    assert_one_line(rc, lines, expected)


def test_A_uint8_volume_is_windowed_from_its_values_like_the_same_floats(pair, capfd):
    tmp, a, f = pair
    _, pet = _volumes()
    low = np.rint(pet * 2).astype(np.uint8)            # values 1..20 of 255: a low range
    sitk.WriteImage(make_image(low), str(tmp / "low_u8.nrrd"))
    sitk.WriteImage(make_image(low.astype(np.float32)), str(tmp / "low_f32.nrrd"))
    for name in ("low_u8", "low_f32"):
        assert cli(capfd, "fuse", "-a", a, "-f", tmp / f"{name}.nrrd", "-m", "average", "-o", tmp / f"o_{name}.nrrd", "-q")[0] == 0
    u8 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "o_low_u8.nrrd")))
    np.testing.assert_array_equal(u8, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "o_low_f32.nrrd"))))


def test_A_display_ready_png_keeps_0_255_and_the_help_says_so(tmp_path, capfd):
    rng = np.random.default_rng(3)
    mri = (rng.random((40, 48)) * 255).astype(np.uint8)
    pet = (np.exp(-((np.arange(48)[None] - 24.0) ** 2) / 100.0) * 20 + rng.random((40, 48))).astype(np.uint8)
    sitk.WriteImage(make_image(mri), str(tmp_path / "a.png"))
    sitk.WriteImage(make_image(pet), str(tmp_path / "b.png"))
    base = ["fuse", "-a", tmp_path / "a.png", "-f", tmp_path / "b.png", "-m", "average", "-q"]
    assert cli(capfd, *base, "-o", tmp_path / "default.png")[0] == 0
    assert cli(capfd, *base, "-o", tmp_path / "full.png", "--window", "0", "255",
               "--functional-window", "0", "255")[0] == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "default.png"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "full.png"))))
    from MedicalFusionLib.cli import build_parser

    fuse_help = build_parser()._subparsers._group_actions[0].choices["fuse"].format_help()
    assert "whatever the voxel" in " ".join(fuse_help.split()) and "PNG/JPG" in fuse_help


@pytest.fixture
def weights_copy(tmp_path, monkeypatch):
    from MedicalFusionLib.networks import weights as W

    shipped = W.shipped_weights_dir()
    if not (shipped / "manifest.json").is_file() or not (shipped / "mrdfn.pt").is_file():
        pytest.skip(f"shipped weights not found in {shipped}")
    d = tmp_path / "weights"
    shutil.copytree(shipped, d)
    monkeypatch.setenv("MEDICALFUSION_WEIGHTS", str(d))
    monkeypatch.delenv("MEDICALFUSION_OWN_WEIGHTS", raising=False)
    return d


def _alter_weights(d: pathlib.Path, name: str = "mrdfn", update_manifest: bool = True) -> None:
    import torch

    state = torch.load(d / f"{name}.pt", weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 0.01
    torch.save(state, d / f"{name}.pt")
    if update_manifest:
        manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
        manifest[name]["sha256"] = hashlib.sha256((d / f"{name}.pt").read_bytes()).hexdigest()
        (d / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def test_A_weights_altered_with_their_manifest_are_refused(pair, capfd, weights_copy, monkeypatch):
    tmp, a, f = pair
    args = ["fuse", "-a", a, "-f", f, "-m", "mrdfn", "-o", tmp / "o.nrrd", "-q"]
    rc, lines = cli(capfd, *args)               # an untouched copy: checked against the package's list
    assert rc == 0 and lines == []
    (tmp / "o.nrrd").unlink()
    _alter_weights(weights_copy)
    rc, lines = cli(capfd, *args)
    assert_one_line(rc, lines, "not the one shipped with MedicalFusion", "MEDICALFUSION_OWN_WEIGHTS=1")
    assert not (tmp / "o.nrrd").exists()
    monkeypatch.setenv("MEDICALFUSION_OWN_WEIGHTS", "1")      # the user says they are theirs
    rc, lines = cli(capfd, *args)
    assert rc == 0 and len(lines) == 1 and "note: using your own weights" in lines[0]


def test_A_trusted_checksums_live_in_the_package_not_beside_the_weights(weights_copy, monkeypatch):
    from MedicalFusionLib.networks import weights as W

    assert W.TRUSTED_FILE.parent == pathlib.Path(W.__file__).parent
    assert set(W.trusted_checksums()) >= {"mrdfn", "lywnet", "dmfnet"}
    # the shipped folder itself altered (manifest too): refused without the user's word
    monkeypatch.delenv("MEDICALFUSION_WEIGHTS")
    monkeypatch.setattr(W, "shipped_weights_dir", lambda: weights_copy)
    _alter_weights(weights_copy)
    with pytest.raises(FusionError, match="does not match the checksum shipped with MedicalFusion"):
        W.load_state_dict("mrdfn")


def test_A_trainer_updates_the_package_trusted_list_with_new_shipped_weights(tmp_path, monkeypatch):
    from MedicalFusionLib.networks import weights as W
    from MedicalFusionLib.networks.mrdfn import MRDFN

    shipped, trusted = tmp_path / "weights", tmp_path / "trusted_weights.json"
    trusted.write_text("{}", encoding="utf-8")
    monkeypatch.delenv("MEDICALFUSION_WEIGHTS", raising=False)
    monkeypatch.delenv("MEDICALFUSION_OWN_WEIGHTS", raising=False)
    monkeypatch.setattr(W, "shipped_weights_dir", lambda: shipped)
    monkeypatch.setattr(W, "TRUSTED_FILE", trusted)
    model = MRDFN()
    W.save_state_dict(model, "mrdfn", {"settings": dict(model.settings)})
    listed = json.loads(trusted.read_text(encoding="utf-8"))["mrdfn"]
    assert listed["sha256"] == W.sha256_of(shipped / "mrdfn.pt")
    state, _ = W.load_state_dict("mrdfn")                     # trusted without MEDICALFUSION_OWN_WEIGHTS
    assert set(state) == set(model.state_dict())
    assert leftovers(tmp_path) == []


def test_A_scene_output_nodes_change_only_when_every_output_is_ready(monkeypatch):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed: the scene case needs real MRML nodes")
    from MedicalFusionLib import scene as fscene
    from MedicalFusionLib.pipeline import FusionOptions

    s = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(s)
    try:
        anatomical, functional = fscene.add_phantom_pair(s)
        first = fscene.fuse_nodes(s, anatomical, functional, FusionOptions(method="alpha"))
        volume, table = first.volume_node, first.table_node
        voxels = slicer.util.arrayFromVolume(volume).copy()
        attributes = {n: volume.GetAttribute(n) for n in volume.GetAttributeNames()}
        rows = [table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())]
        nodes = s.GetNumberOfNodes()
        original = fscene.write_table

        def write_then_fail(node, rows_or_table):
            original(node, rows_or_table)        # the table node has been changed when it fails
            raise RuntimeError("table storage failed")

        monkeypatch.setattr(fscene, "write_table", write_then_fail)
        with pytest.raises(RuntimeError, match="table storage failed"):
            fscene.fuse_nodes(s, anatomical, functional, FusionOptions(method="max"),
                              output_volume=volume, output_table=table)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), voxels)
        assert {n: volume.GetAttribute(n) for n in volume.GetAttributeNames()} == attributes
        assert [table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())] == rows
        assert s.GetNumberOfNodes() == nodes
    finally:
        colors.SetMRMLScene(None)
        s.Clear(1)


# ================================================================================================
# B. files left behind, or "nothing was written" when something was


@posix_only
@pytest.mark.parametrize("point", ["write:output", "write:preview", "write:metrics file", "commit"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_B_a_signal_during_the_writing_leaves_nothing_and_says_so(pair, point, signame):
    tmp, a, f = pair
    out = tmp / "out"
    out.mkdir()
    proc = start_paused(["fuse", "-a", a, "-f", f, "-o", out / "fused.nrrd", "--metrics", out / "m.csv",
                         "--preview", out / "p.png", "-q"], tmp, point, tmp / "paused.pid")
    assert any(n.startswith(".mf-tmp-") for n in os.listdir(out))      # paused with temporaries written
    proc.send_signal(getattr(signal, signame))
    _stdout, stderr = proc.communicate(timeout=120)
    sig = getattr(signal, signame)
    assert proc.returncode == 128 + sig
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nothing was written" in lines[0], lines
    assert os.listdir(out) == []


@posix_only
def test_B_a_signal_held_back_during_commit_comes_after_everything_is_written(pair):
    tmp, a, f = pair
    out = tmp / "out"
    out.mkdir()
    proc = start_paused(["fuse", "-a", a, "-f", f, "-o", out / "fused.nrrd", "--metrics", out / "m.csv", "-q"],
                        tmp, "commit:held", tmp / "paused.pid")
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "after every output was written" in stderr and len(stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == ["fused.nrrd", "m.csv"]
    assert sitk.ReadImage(str(out / "fused.nrrd")).GetSize() == (48, 40, 8)


def _wait_for_point(proc, marker: pathlib.Path, point: str) -> None:
    deadline = time.monotonic() + 120
    while not (marker.exists() and marker.read_text(encoding="utf-8").endswith(f" {point}")):
        assert proc.poll() is None, f"ended before reaching {point}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.05)


def _no_traceback(stderr: str) -> list:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert not [line for line in lines if "Traceback" in line or "Exception ignored" in line], stderr
    return lines


@posix_only
@pytest.mark.parametrize("signals", [["SIGINT"], ["SIGINT", "SIGINT", "SIGTERM"]], ids=["once", "thrice"])
def test_B_a_signal_after_every_output_was_written_changes_nothing(pair, signals):
    """Issue 21: Ctrl-C once the run is over (in Python's shutdown, where torch's atexit handlers
    run) printed a KeyboardInterrupt traceback and ended with -2: now exit 0, no message."""
    tmp, a, f = pair
    out = tmp / "out"
    out.mkdir()
    marker = tmp / "paused.pid"
    proc = start_paused(["fuse", "-a", a, "-f", f, "-m", "mrdfn", "-o", out / "fused.nrrd", "--metrics",
                         out / "m.csv", "--preview", out / "p.png", "-q"], tmp, "exit", marker)
    for name in signals:
        proc.send_signal(getattr(signal, name))
        time.sleep(0.1)
    marker.unlink()
    _stdout, stderr = proc.communicate(timeout=120)
    assert _no_traceback(stderr) == [] and proc.returncode == 0
    assert sorted(os.listdir(out)) == ["fused.nrrd", "m.csv", "p.png"]


@posix_only
@pytest.mark.parametrize("point", ["write:preview", "commit"])
def test_B_ctrl_c_twice_while_writing_is_one_line_and_exit_130(pair, point):
    """Issue 21: the second Ctrl-C (after the first one's message, while Python shuts down) gave a
    traceback and exit -2."""
    tmp, a, f = pair
    out = tmp / "out"
    out.mkdir()
    marker = tmp / "paused.pid"
    proc = start_paused(["fuse", "-a", a, "-f", f, "-m", "mrdfn", "-o", out / "fused.nrrd",
                         "--preview", out / "p.png", "-q"], tmp, f"{point},exit", marker)
    proc.send_signal(signal.SIGINT)
    _wait_for_point(proc, marker, "exit")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    marker.unlink()
    _stdout, stderr = proc.communicate(timeout=120)
    lines = _no_traceback(stderr)
    assert proc.returncode == 130 and lines == ["medicalfusion: interrupted; nothing was written"], lines
    assert os.listdir(out) == []


@posix_only
def test_B_ctrl_c_while_the_command_starts_is_one_line(pair):
    tmp, a, f = pair
    proc = start_paused(["fuse", "-a", a, "-f", f, "-o", tmp / "o.nrrd", "-q"], tmp, "start", tmp / "paused.pid",
                        fresh=True)    # a new interpreter: the start of the program itself
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=120)
    assert _no_traceback(stderr) == ["medicalfusion: interrupted; nothing was written"]
    assert proc.returncode == 130 and not (tmp / "o.nrrd").exists()


def test_B_unwritable_preview_extension_is_refused_before_any_work(pair, capfd):
    tmp, a, f = pair
    before = snapshot(tmp)
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", tmp / "fused.nrrd", "--preview", tmp / "p.xyz", "-q")
    assert_one_line(rc, lines, "preview", ".xyz")
    assert snapshot(tmp) == before


@posix_only
def test_B_disk_full_while_writing_the_metrics_leaves_nothing(tmp_path):
    z, y, x = np.mgrid[0:8, 0:16, 0:16].astype(np.float32)
    src = tmp_path / "in"
    src.mkdir()
    sitk.WriteImage(make_image(100 + 50 * np.sin(x / 4.0) * np.cos(y / 5.0) + z), str(src / "mri.nrrd"))
    sitk.WriteImage(make_image(np.exp(-((x - 8) ** 2 + (y - 8) ** 2) / 20.0) * 10 + 0.5), str(src / "pet.nrrd"))
    args = ["fuse", "-a", src / "mri.nrrd", "-f", src / "pet.nrrd", "-m", "average", "-q"]
    probe = run_cli(args + ["-o", tmp_path / "probe.nrrd"], cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    pages = -(-(tmp_path / "probe.nrrd").stat().st_size // 4096)
    with mounted_tmpfs(tmp_path / "just_room", f"size={4 * pages}k") as small:   # the volume fits, not the CSV
        proc = run_cli(args + ["-o", small / "fused.nrrd", "--metrics", small / "metrics.csv"], cwd=tmp_path)
        assert_one_line(proc.returncode, err_lines(proc), "cannot write metrics file", "nothing was written")
        assert os.listdir(small) == []


def test_B_demo_with_an_unknown_method_writes_nothing(tmp_path, capfd):
    rc, lines = cli(capfd, "demo", "--method", "nope", "--output", tmp_path / "demo", "-q")
    assert_one_line(rc, lines, "unknown method")
    assert not (tmp_path / "demo").exists()


@posix_only
def test_B_demo_interrupted_leaves_no_sample_files(tmp_path):
    pytest.importorskip("nilearn", reason="nilearn (the MNI152 template) not installed")
    proc = start_paused(["demo", "--output", tmp_path / "demo", "--method", "alpha", "-q"], tmp_path,
                        "write:sample functional", tmp_path / "paused.pid")
    assert len([n for n in os.listdir(tmp_path / "demo" / "sample") if n.startswith(".mf-tmp-")]) == 2
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "nothing was written" in stderr
    assert not (tmp_path / "demo").exists()


def _tiny_aanlib(root: pathlib.Path, corrupt_last: bool = False) -> None:
    """CT-MRI and PET-MRI pairs (3 each, 32x32) with a split.csv; ``corrupt_last`` truncates the last
    PET picture (so the CT-MRI tables would be ready before it is hit)."""
    rng = np.random.default_rng(5)
    rows = ["pair,modality,mri,image,case,split"]
    for pair, mod in (("CT-MRI", "CT"), ("PET-MRI", "PET")):
        (root / pair / "MRI").mkdir(parents=True)
        (root / pair / mod).mkdir(parents=True)
        for i in range(3):
            sitk.WriteImage(make_image((rng.random((32, 32)) * 255).astype(np.uint8)), str(root / pair / "MRI" / f"{i}.png"))
            func = (rng.random((32, 32, 3) if mod == "PET" else (32, 32)) * 255).astype(np.uint8)
            sitk.WriteImage(make_image(func, vector=mod == "PET"), str(root / pair / mod / f"{i}.png"))
            rows.append(f"{pair},{mod},{pair}/MRI/{i}.png,{pair}/{mod}/{i}.png,{i},test")
    (root / "split.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if corrupt_last:
        _truncate(root / "PET-MRI" / "PET" / "2.png", 0.5)


@pytest.mark.parametrize("case", ["missing-dataset", "corrupt-png", "existing-folder-kept"])
def test_B_evaluate_failing_writes_nothing(tmp_path, capfd, case):
    data = tmp_path / "aanlib"
    out = tmp_path / "evaluation"
    if case == "missing-dataset":
        rc, lines = cli(capfd, "evaluate", "--dataset", tmp_path / "nowhere", "--methods", "alpha", "--output", out, "-q")
        assert_one_line(rc, lines, "split.csv not found")
        assert not out.exists()
        return
    _tiny_aanlib(data, corrupt_last=True)
    if case == "existing-folder-kept":
        out.mkdir()
        (out / "CT-MRI.md").write_text("an earlier table\n", encoding="utf-8")
    before = snapshot(tmp_path)
    rc, lines = cli(capfd, "evaluate", "--dataset", data, "--methods", "alpha", "--output", out, "-q")
    assert_one_line(rc, lines, "2.png", "truncated")
    assert snapshot(tmp_path) == before


def test_B_evaluate_succeeding_writes_every_table_together(tmp_path, capfd):
    _tiny_aanlib(tmp_path / "aanlib")
    rc, lines = cli(capfd, "evaluate", "--dataset", tmp_path / "aanlib", "--methods", "alpha", "max",
                    "--output", tmp_path / "ev", "-q")
    assert rc == 0, lines
    assert sorted(os.listdir(tmp_path / "ev")) == sorted(
        [f"{p}{s}" for p in ("CT-MRI", "PET-MRI") for s in (".csv", ".md", "_montage.png", "_montage.txt")]
        + ["summary.md"])


# ================================================================================================
# C. crashes, hangs, silently wrong counts


@pytest.mark.parametrize("value", ["100000", "0", "-3", "two"])
def test_C_threads_out_of_range_is_one_line_not_a_crash(pair, value):
    tmp, a, f = pair
    proc = run_cli(["fuse", "-a", a, "-f", f, "-o", tmp / "o.nrrd", "--threads", value, "-q"], cwd=tmp)
    assert_one_line(proc.returncode, err_lines(proc), "--threads")
    assert not (tmp / "o.nrrd").exists()


@posix_only
@pytest.mark.parametrize("where", ["anatomical", "functional", "inside-a-dicom-folder", "data-file-of-a-header"])
def test_C_a_fifo_is_refused_without_hanging(pair, where):
    tmp, a, f = pair
    fifo = tmp / "pipe.nrrd"
    args = ["-a", a, "-f", f]
    if where == "inside-a-dicom-folder":
        anat, _ = _volumes()
        write_dicom_series(sitk.Cast(make_image(anat), sitk.sitkInt16), tmp / "series")
        fifo = tmp / "series" / "zz.dcm"
        args = ["-a", tmp / "series", "-f", f]
    elif where == "data-file-of-a-header":
        sitk.WriteImage(sitk.ReadImage(str(f)), str(tmp / "pet.mhd"))
        (tmp / "pet.raw").unlink()
        fifo = tmp / "pet.raw"
        args = ["-a", a, "-f", tmp / "pet.mhd"]
    else:
        args = ["-a", fifo, "-f", f] if where == "anatomical" else ["-a", a, "-f", fifo]
    os.mkfifo(fifo)
    proc = run_cli(["fuse", *args, "-o", tmp / "o.nrrd", "-q"], cwd=tmp, timeout=120)
    assert_one_line(proc.returncode, err_lines(proc), "FIFO")


def test_C_a_device_is_refused(pair, capfd):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero on this system")
    tmp, a, f = pair
    rc, lines = cli(capfd, "fuse", "-a", "/dev/zero", "-f", f, "-o", tmp / "o.nrrd", "-q")
    assert_one_line(rc, lines, "device")
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", "/dev/null", "-q")
    assert_one_line(rc, lines, "output /dev/null")


@pytest.mark.parametrize("value", ["-1", "0"])
def test_C_evaluate_limit_out_of_range_is_refused(tmp_path, capfd, value):
    _tiny_aanlib(tmp_path / "aanlib")
    rc, lines = cli(capfd, "evaluate", "--dataset", tmp_path / "aanlib", "--methods", "alpha", "--limit", value,
                    "--output", tmp_path / "ev", "-q")
    assert_one_line(rc, lines, "--limit", "out of range")
    assert not (tmp_path / "ev").exists()


def test_C_evaluate_limit_is_honoured(tmp_path, capfd):
    _tiny_aanlib(tmp_path / "aanlib")
    assert cli(capfd, "evaluate", "--dataset", tmp_path / "aanlib", "--methods", "alpha", "--limit", "2",
               "--output", tmp_path / "ev", "-q")[0] == 0
    rows = (tmp_path / "ev" / "CT-MRI.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert rows and all(r.split(",")[4] == "2" for r in rows)


# ================================================================================================
# D. "internal error" or unclear messages for a user's mistake


@pytest.mark.parametrize("size", [(2, 2, 2), (8, 3, 40)], ids=["2x2x2", "3-pixel-rows"])
def test_D_images_too_small_to_fuse_are_one_line(tmp_path, capfd, size):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        sitk.WriteImage(make_image(rng.random(size).astype(np.float32)), str(tmp_path / f"{name}.nrrd"))
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "a.nrrd", "-f", tmp_path / "b.nrrd", "-o", tmp_path / "o.nrrd", "-q")
    assert_one_line(rc, lines, "at least 7x7")


@posix_only
def test_D_a_symlink_loop_is_one_line(pair, capfd):
    tmp, a, f = pair
    os.symlink(tmp / "loop_b", tmp / "loop_a")
    os.symlink(tmp / "loop_a", tmp / "loop_b")
    rc, lines = cli(capfd, "fuse", "-a", tmp / "loop_a", "-f", f, "-o", tmp / "o.nrrd", "-q")
    assert_one_line(rc, lines, "symbolic link that loops")


def test_D_a_249_character_output_name_works_and_a_too_long_one_is_one_line(pair, capfd):
    tmp, a, f = pair
    name = "f" * 244 + ".nrrd"
    assert len(name) == 249
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", tmp / name, "-q")
    assert rc == 0 and lines == [] and (tmp / name).is_file() and leftovers(tmp) == []
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", tmp / ("g" * 251 + ".nrrd"), "-q")
    assert_one_line(rc, lines, "longer than this file system allows")
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", tmp / ("h" * 250 + ".nhdr"), "-q")    # its .raw.gz is too long
    assert_one_line(rc, lines, ".raw.gz")


def test_D_a_path_longer_than_path_max_is_one_line(pair, capfd):
    tmp, a, f = pair
    deep = tmp.joinpath(*["d" * 200] * 25)
    rc, lines = cli(capfd, "fuse", "-a", deep / "x.nrrd", "-f", f, "-o", tmp / "o.nrrd", "-q")
    assert_one_line(rc, lines, "too long")
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", deep / "x.nrrd", "-q")
    assert_one_line(rc, lines, "longer than this system allows")


@pytest.mark.parametrize("damage, expected", [
    ("invalid-json", "not valid JSON"),
    ("no-sha256", "no valid sha256"),
    ("unknown-settings-key", "do not build the network"),
    ("wrong-tensor-shapes", "does not fit the network"),
])
def test_D_bad_manifest_or_weights_are_one_line(pair, capfd, weights_copy, monkeypatch, damage, expected):
    import torch

    tmp, a, f = pair
    monkeypatch.setenv("MEDICALFUSION_OWN_WEIGHTS", "1")       # past the trusted list: the manifest is read
    manifest_path = weights_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if damage == "invalid-json":
        manifest_path.write_text("{ not json", encoding="utf-8")
    elif damage == "no-sha256":
        del manifest["mrdfn"]["sha256"]
    elif damage == "unknown-settings-key":
        manifest["mrdfn"]["settings"]["bogus"] = 1
    else:
        state = torch.load(weights_copy / "mrdfn.pt", weights_only=True)
        state[next(iter(state))] = torch.zeros(3, 3)
        torch.save(state, weights_copy / "mrdfn.pt")
        manifest["mrdfn"]["sha256"] = hashlib.sha256((weights_copy / "mrdfn.pt").read_bytes()).hexdigest()
    if damage != "invalid-json":
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-m", "mrdfn", "-o", tmp / "o.nrrd", "-q")
    assert_one_line(rc, lines, expected)
    assert not (tmp / "o.nrrd").exists()
    assert main(["methods"]) == 0                                # listing never fails on a bad manifest
    capfd.readouterr()


@pytest.mark.parametrize("command", ["evaluate", "demo"])
def test_D_output_folder_naming_a_file_is_one_line(tmp_path, capfd, command):
    target = tmp_path / "a_file"
    target.write_text("keep me\n", encoding="utf-8")
    _tiny_aanlib(tmp_path / "aanlib")
    args = ["evaluate", "--dataset", tmp_path / "aanlib", "--methods", "alpha"] if command == "evaluate" else ["demo"]
    rc, lines = cli(capfd, *args, "--output", target, "-q")
    assert_one_line(rc, lines, "is a file, not a folder")
    assert target.read_text(encoding="utf-8") == "keep me\n"


def test_D_split_csv_missing_columns_is_one_line(tmp_path, capfd):
    (tmp_path / "split.csv").write_text("pair,mri\nPET-MRI,x.png\n", encoding="utf-8")
    rc, lines = cli(capfd, "evaluate", "--dataset", tmp_path, "--methods", "alpha", "--output", tmp_path / "ev", "-q")
    assert_one_line(rc, lines, "lacks the column", "image")
    assert not (tmp_path / "ev").exists()


@posix_only
def test_D_writing_into_a_read_only_folder_is_one_line(pair, tmp_path, open_tmp):
    tmp, a, f = pair
    if IS_ROOT:     # root writes anywhere on a writable file system: use a read-only one
        with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
            for args in (["demo", "--output", ro / "demo", "-q"], ["fuse", "-a", a, "-f", f, "-o", ro / "o.nrrd", "-q"]):
                proc = run_cli(args, cwd=tmp)
                assert_one_line(proc.returncode, err_lines(proc), "not writable")
        return
    ro = open_tmp / "ro"
    ro.mkdir(mode=0o555)
    for args in (["demo", "--output", ro / "demo", "-q"], ["fuse", "-a", a, "-f", f, "-o", ro / "o.nrrd", "-q"]):
        proc = run_cli(args, cwd=tmp)
        assert_one_line(proc.returncode, err_lines(proc), "not writable")


@posix_only
def test_D_demo_into_a_folder_the_user_cannot_write_is_one_line(open_tmp):
    kwargs = unprivileged_kwargs(open_tmp)
    ro = open_tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    proc = run_cli(["demo", "--output", ro / "demo", "-q"], cwd=open_tmp, **kwargs)
    assert_one_line(proc.returncode, err_lines(proc), "not writable")
    assert os.listdir(ro) == []


@posix_only
def test_D_permission_denied_input_says_so(open_tmp):
    kwargs = unprivileged_kwargs(open_tmp)
    anat, pet = _volumes()
    sitk.WriteImage(make_image(anat), str(open_tmp / "mri.nrrd"))
    sitk.WriteImage(make_image(pet), str(open_tmp / "pet.nrrd"))
    for p in (open_tmp / "mri.nrrd", open_tmp / "pet.nrrd"):
        p.chmod(0o644)
    (open_tmp / "mri.nrrd").chmod(0o000)
    out = open_tmp / "out"
    out.mkdir()
    out.chmod(0o777)
    proc = run_cli(["fuse", "-a", open_tmp / "mri.nrrd", "-f", open_tmp / "pet.nrrd", "-o", out / "o.nrrd", "-q"],
                   cwd=open_tmp, **kwargs)
    assert_one_line(proc.returncode, err_lines(proc), "permission denied")
    assert os.listdir(out) == []


@pytest.mark.parametrize("case", ["empty-folder", "truncated-mha", "junk-file"])
def test_D_no_itk_warning_reaches_the_terminal(pair, case):
    """In a subprocess: nothing but the error line on the real stderr (fd 2)."""
    tmp, a, f = pair
    if case == "empty-folder":
        (tmp / "empty").mkdir()
        bad = tmp / "empty"
    elif case == "truncated-mha":
        sitk.WriteImage(sitk.ReadImage(str(f)), str(tmp / "pet.mha"))
        _truncate(tmp / "pet.mha")
        bad = tmp / "pet.mha"
    else:
        bad = tmp / "junk.nii"
        bad.write_bytes(b"\x00" * 400)
    proc = run_cli(["fuse", "-a", a, "-f", bad, "-o", tmp / "o.nrrd", "-q"], cwd=tmp)
    assert_one_line(proc.returncode, err_lines(proc), "functional input")
    assert proc.stdout == ""


@pytest.mark.parametrize("args, expected", [
    (["--functional-window", "abc", "def"], "'abc' is not a number"),
    (["--functional-window", "-inf", "inf"], "'-inf' is not a finite number"),
    (["--window", "nan", "3"], "'nan' is not a finite number"),
    (["--window", "-1e3", "-2e3"], "is empty"),
    (["--axis", "diagonal"], "not a slice orientation"),
    (["--device", "tpu"], "invalid choice"),
    (["--no-such-option"], "unrecognized arguments"),
], ids=["window-abc", "window--inf", "window-nan", "window-reversed", "axis", "device", "unknown-option"])
def test_D_argument_mistakes_are_one_line(pair, capfd, args, expected):
    tmp, a, f = pair
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-o", tmp / "o.nrrd", *args, "-q")
    assert_one_line(rc, lines, expected)
    assert not (tmp / "o.nrrd").exists()


@pytest.mark.parametrize("flag", ["-o", "--metrics", "--preview", "-a", "-f", "--transform", "--save-transform"])
def test_D_an_empty_path_is_one_line(pair, capfd, flag):
    """Issue 21: ``-o ''`` ended in "internal error: KeyError: 'output'" (exit 1)."""
    tmp, a, f = pair
    paths = {"-a": a, "-f": f, "-o": tmp / "o.nrrd"}
    paths[flag] = ""
    args = [x for k, v in paths.items() for x in (k, v)]
    if flag not in paths:
        args += [flag, ""]
    before = snapshot(tmp)
    rc, lines = cli(capfd, "fuse", *args, "-m", "average", "-q")
    assert_one_line(rc, lines, "an empty path")
    assert snapshot(tmp) == before


@pytest.mark.parametrize("args", [["demo", "--output", ""], ["evaluate", "--dataset", ""],
                                  ["train", "--method", "mrdfn", "--data", ""]])
def test_D_an_empty_folder_argument_is_one_line(capfd, args):
    rc, lines = cli(capfd, *args)
    assert_one_line(rc, lines, "an empty path")


def test_D_missing_required_arguments_are_one_line(capfd):
    rc, lines = cli(capfd, "fuse", "-a", "x.nrrd")
    assert_one_line(rc, lines, "required")
    rc, lines = cli(capfd, "nosuchcommand")
    assert_one_line(rc, lines, "invalid choice")


def test_D_negative_window_values_are_read_as_numbers(pair, capfd):
    tmp, a, f = pair
    rc, lines = cli(capfd, "fuse", "-a", a, "-f", f, "-m", "average", "-o", tmp / "o.nrrd",
                    "--window", "-1e3", "2e2", "--functional-window", "-.5", "12", "-q")
    assert rc == 0, lines


@posix_only
def test_D_no_progress_bar_fragment_before_the_error_line(pair):
    """On a terminal the bar is drawn, then cleared before the error line; in a pipe it is never drawn."""
    import pty

    tmp, a, f = pair
    args = ["fuse", "-a", str(a), "-f", str(f), "-m", "lp", "-o", str(tmp / "fused.nii"), "--metrics", str(tmp / "m.csv")]
    master, slave = pty.openpty()
    proc = cli_process.Process(args, tmp, stdout=subprocess.PIPE, stderr=slave, setup=[limit_file_size(12_000)])
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    rendered = []
    for line in text.replace("\r\n", "\n").split("\n"):
        screen = ""
        for part in line.split("\r"):          # a carriage return overwrites the line from its start
            screen = part + screen[len(part):]
        if screen.strip():
            rendered.append(screen.rstrip())
    assert proc.returncode == 2
    assert len(rendered) == 1 and rendered[0].startswith("medicalfusion: error: cannot write output"), rendered
    piped = run_cli(args, cwd=tmp, preexec_fn=limit_file_size(12_000))
    assert_one_line(piped.returncode, err_lines(piped), "cannot write output")
    assert "\r" not in piped.stderr
