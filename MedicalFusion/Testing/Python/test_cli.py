"""The command line: success writes everything; every bad input is one line, exit 2, nothing written."""
import io
import os
import pathlib
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image
from MedicalFusionLib.cli import main


@pytest.fixture
def files(tmp_path, small_pair):
    anat, pet = small_pair
    a, f = tmp_path / "mri.nrrd", tmp_path / "pet.nii.gz"
    sitk.WriteImage(anat, str(a))
    sitk.WriteImage(pet, str(f))
    return tmp_path, a, f


def _hash(p: pathlib.Path) -> bytes:
    return p.read_bytes()


def test_fuse_writes_volume_metrics_and_preview(files, capsys):
    tmp, a, f = files
    before = (_hash(a), _hash(f))
    rc = main(["fuse", "-a", str(a), "-f", str(f), "-m", "lp", "-o", str(tmp / "fused.nrrd"),
               "--metrics", str(tmp / "m.csv"), "--preview", str(tmp / "p.png"), "-q"])
    assert rc == 0
    out = sitk.ReadImage(str(tmp / "fused.nrrd"))
    assert out.GetNumberOfComponentsPerPixel() == 3 and out.GetPixelID() == sitk.sitkVectorUInt8
    assert out.GetSize() == (48, 40, 8)
    lines = (tmp / "m.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("metric,mean,std") and any(l.startswith("Qabf,") for l in lines)
    assert sitk.ReadImage(str(tmp / "p.png")).GetNumberOfComponentsPerPixel() == 3
    assert (_hash(a), _hash(f)) == before
    assert not [p for p in tmp.iterdir() if p.name.startswith(".mf-")]


def test_quick_metric_set_writes_every_metric_but_fmi_with_the_same_values(files):
    from MedicalFusionLib.metrics import METRIC_SETS

    tmp, a, f = files
    tables = {}
    for name in ("all", "quick"):
        csv = tmp / f"{name}.csv"
        assert main(["fuse", "-a", str(a), "-f", str(f), "-m", "average", "-o", str(tmp / f"{name}.nrrd"),
                     "--metrics", str(csv), "--metric-set", name, "-q"]) == 0
        rows = [line.split(",") for line in csv.read_text(encoding="utf-8").splitlines()[1:]]
        tables[name] = {r[0]: float(r[1]) for r in rows if r[0] in METRIC_SETS["all"]}
    assert list(tables["all"]) == METRIC_SETS["all"] and list(tables["quick"]) == METRIC_SETS["quick"]
    assert "FMI_pixel" not in tables["quick"] and "FMI_gradient" not in tables["quick"]
    assert all(tables["quick"][k] == tables["all"][k] for k in tables["quick"])


class _Terminal(io.StringIO):
    """stderr as a terminal: the CLI draws its progress bar only there."""

    def isatty(self) -> bool:
        return True


def test_fuse_progress_bar_counts_per_cent_of_the_run(files, monkeypatch):
    """The fusion reports fractions of a fixed total over its phases (prepare, fuse, recombine,
    metrics): the bar shows per cent, never that internal total as if it were slices."""
    import re

    from MedicalFusionLib.progress import RESOLUTION

    tmp, a, f = files
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    rc = main(["fuse", "-a", str(a), "-f", str(f), "-m", "average", "-o", str(tmp / "fused.nrrd"),
               "--metrics", str(tmp / "m.csv")])
    assert rc == 0
    drawn = term.getvalue()
    shown = [int(p) for p in re.findall(r"fusing \(average\): +(\d+)%", drawn)]
    assert shown and max(shown) <= 100 and shown == sorted(shown)
    assert f"/{RESOLUTION}" not in drawn and "slice" not in drawn


def test_2d_png_pair_gives_a_2d_png(tmp_path):
    rng = np.random.default_rng(0)
    mri = (rng.random((32, 32)) * 255).astype(np.uint8)
    pet = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(mri), str(tmp_path / "a.png"))
    sitk.WriteImage(sitk.GetImageFromArray(pet, isVector=True), str(tmp_path / "b.png"))
    assert main(["fuse", "-a", str(tmp_path / "a.png"), "-f", str(tmp_path / "b.png"), "-m", "dwt",
                 "-o", str(tmp_path / "f.png"), "-q"]) == 0
    out = sitk.ReadImage(str(tmp_path / "f.png"))
    assert out.GetDimension() == 2 and out.GetSize() == (32, 32)


def _bad_cases(tmp: pathlib.Path, a: pathlib.Path, f: pathlib.Path):
    (tmp / "junk.nrrd").write_text("not an image", encoding="utf-8")
    four = sitk.JoinSeries([sitk.ReadImage(str(a))] * 2)
    sitk.WriteImage(four, str(tmp / "four_d.nrrd"))
    sitk.WriteImage(make_image(np.full((4, 8, 8), 7.0, np.float32)), str(tmp / "const.nrrd"))
    nan = np.ones((4, 8, 8), np.float32)
    nan[0, 0, 0] = np.inf
    sitk.WriteImage(make_image(nan), str(tmp / "nan.nrrd"))
    sitk.WriteImage(make_image(np.random.default_rng(0).random((4, 8, 8)).astype(np.float32), origin=(900.0, 0, 0)),
                    str(tmp / "far.nrrd"))
    o = str(tmp / "out.nrrd")
    return [
        (["-a", str(tmp / "missing.nrrd"), "-f", str(f), "-o", o], "does not exist"),
        (["-a", str(tmp / "junk.nrrd"), "-f", str(f), "-o", o], "not an image"),
        (["-a", str(a), "-f", str(tmp / "four_d.nrrd"), "-o", o], "4D"),
        (["-a", str(a), "-f", str(tmp / "const.nrrd"), "-o", o], "constant"),
        (["-a", str(a), "-f", str(tmp / "nan.nrrd"), "-o", o], "NaN or infinite"),
        (["-a", str(a), "-f", str(tmp / "far.nrrd"), "-o", o], "does not overlap"),
        (["-a", str(a), "-f", str(f), "-m", "nope", "-o", o], "unknown method"),
        (["-a", str(a), "-f", str(f), "--colormap", "Nope", "-o", o], "unknown colour map"),
        (["-a", str(a), "-f", str(f), "-o", str(tmp / "no_such_dir" / "x.nrrd")], "does not exist"),
        (["-a", str(a), "-f", str(f), "-o", str(a)], "would overwrite the"),
        (["-a", str(a), "-f", str(f), "-o", o, "--metrics", str(f)], "would overwrite the"),
        (["-a", str(a), "-f", str(f), "-o", str(tmp / "out.xyz")], "cannot write"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, capsys):
    tmp, a, f = files
    before = {p.name: _hash(p) for p in tmp.iterdir()}
    for args, expected in _bad_cases(tmp, a, f):
        made_before = set(os.listdir(tmp))
        rc = main(["fuse", *args, "-q"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, (args, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("medicalfusion: error:") and expected in err, (expected, err)
        assert set(os.listdir(tmp)) == made_before, f"{args} left files behind"
    assert {p: _hash(tmp / p) for p in before} == before


def test_a_study_too_big_for_the_memory_is_refused_in_one_line(files, capsys, monkeypatch):
    tmp, a, f = files
    made_before = set(os.listdir(tmp))
    monkeypatch.setenv("MEDICALFUSION_MEMORY_AVAILABLE", "64M")
    rc = main(["fuse", "-a", str(a), "-f", str(f), "-o", str(tmp / "out.nrrd"), "--metrics", str(tmp / "m.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("medicalfusion: error: this study needs about") and "but 64 MB is available" in err, err
    assert set(os.listdir(tmp)) == made_before


def test_methods_lists_every_registered_method(capsys):
    from MedicalFusionLib.methods import method_names

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in method_names():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def test_evaluate_writes_tables_and_montage(shared_data, tmp_path):
    rc = main(["evaluate", "--dataset", str(shared_data / "aanlib"), "--methods", "alpha", "max",
               "--pairs", "PET-MRI", "--limit", "3", "--output", str(tmp_path), "-q"])
    assert rc == 0
    md = (tmp_path / "PET-MRI.md").read_text(encoding="utf-8")
    assert "| alpha |" in md and "| max |" in md and "±" in md
    rows = (tmp_path / "PET-MRI.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "method,metric,mean,std,pairs,seconds_per_pair" and len(rows) > 10
    # the colour metrics of a coloured functional, per pair, next to the others
    assert any(r.startswith("max,hue_err10,") for r in rows) and any(r.startswith("alpha,chroma_kept,") for r in rows)
    assert "hue_err10" in md and "chroma_kept" in md
    assert (tmp_path / "PET-MRI_montage.png").is_file()


def test_evaluate_reports_what_fuse_gives_users(shared_data, tmp_path):
    """Issue 21, one way through: evaluate's table for a pair is what the pipeline gives a user who
    fuses the same two PNGs (8-bit pictures: window 0..255, as the CLI reads them): the same RGB and
    the same metrics, from the same metrics engine (no second implementation behind the tables)."""
    import torch
    from medicalfusion_tools.evaluate import evaluate, fuse_modality, load_modality
    from medicalfusion_tools.training.data import read_split
    from MedicalFusionLib.pipeline import FusionOptions, fuse_images

    record = read_split(shared_data / "aanlib", "test", pairs=("PET-MRI",))[0]
    user = fuse_images(sitk.ReadImage(str(record.mri)), sitk.ReadImage(str(record.image)),
                       FusionOptions(method="lp", anatomical_window=(0.0, 255.0), metric_set="all", device="cpu"))
    rgb, _ = fuse_modality(load_modality([record]), "lp", torch.device("cpu"))
    assert np.array_equal(rgb[0], user.rgb[0])
    table = evaluate(shared_data / "aanlib", methods=["lp"], pairs=["PET-MRI"], limit=1, device="cpu",
                     output=tmp_path / "ev", quiet=True)["PET-MRI"]["lp"]
    assert set(user.metrics) <= set(table) and {"hue_err10", "chroma_kept", "VIF", "FMI_pixel"} <= set(table)
    for key, (mean, _std, n) in user.metrics.items():
        assert n == 1 and table[key][2] == 1
        assert table[key][0] == pytest.approx(mean, rel=1e-9, abs=1e-12), key


def test_demo_runs_on_the_embedded_sample(tmp_path):
    pytest.importorskip("nilearn", reason="nilearn (the MNI152 template) not installed: pip install '.[demo]'")
    assert main(["demo", "--output", str(tmp_path), "--method", "alpha", "-q"]) == 0
    fused = sitk.ReadImage(str(tmp_path / "fused.nrrd"))
    anat = sitk.ReadImage(str(tmp_path / "sample" / "anatomical_t1.nrrd"))
    assert fused.GetSize() == anat.GetSize() and fused.GetNumberOfComponentsPerPixel() == 3
    assert (tmp_path / "preview.png").is_file() and (tmp_path / "metrics.csv").is_file()


def write_dicom_series(volume: sitk.Image, folder: pathlib.Path) -> None:
    """Write an int16 volume as a DICOM series (one file a slice, shared series UID)."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    direction = volume.GetDirection()
    for k in range(volume.GetDepth()):
        s = volume[:, :, k]
        pos = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR", "0020|000e": series_uid, "0020|000d": series_uid + ".1",
            "0008|0018": f"{series_uid}.{k + 10}", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in pos),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                           direction[1], direction[4], direction[7])),
            "0018|0050": str(volume.GetSpacing()[2]),
        }
        for key, value in tags.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)


def test_dicom_series_folder_is_read_with_its_geometry(tmp_path, small_pair):
    anat, pet = small_pair
    vol = sitk.Cast(anat, sitk.sitkInt16)
    vol.SetSpacing((0.9, 0.9, 2.5))
    vol.SetOrigin((-20.0, -18.0, -10.0))
    write_dicom_series(vol, tmp_path / "mri_series")
    pet.SetSpacing((0.9, 0.9, 2.5))
    pet.SetOrigin((-20.0, -18.0, -10.0))
    sitk.WriteImage(pet, str(tmp_path / "pet.nrrd"))
    assert main(["fuse", "-a", str(tmp_path / "mri_series"), "-f", str(tmp_path / "pet.nrrd"),
                 "-o", str(tmp_path / "fused.nrrd"), "-q"]) == 0
    fused = sitk.ReadImage(str(tmp_path / "fused.nrrd"))
    assert fused.GetSize() == vol.GetSize()
    assert np.allclose(fused.GetSpacing(), vol.GetSpacing(), atol=1e-3)
    assert np.allclose(fused.GetOrigin(), vol.GetOrigin(), atol=1e-3)
    (tmp_path / "empty").mkdir()
    assert main(["fuse", "-a", str(tmp_path / "empty"), "-f", str(tmp_path / "pet.nrrd"),
                 "-o", str(tmp_path / "f2.nrrd"), "-q"]) == 2


def test_threads_option_sets_torch_threads_and_rejects_zero(files, capsys):
    import torch

    tmp, a, f = files
    before = torch.get_num_threads()
    try:
        assert main(["fuse", "-a", str(a), "-f", str(f), "-o", str(tmp / "t.nrrd"), "--threads", "1", "-q"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["fuse", "-a", str(a), "-f", str(f), "-o", str(tmp / "t0.nrrd"), "--threads", "0", "-q"]) == 2
        assert "--threads" in capsys.readouterr().err and not (tmp / "t0.nrrd").exists()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("args", [["evaluate", "--dataset", "x"], ["train", "--method", "mrdfn", "--data", "d"],
                                  ["batch", "manifest.csv", "--output", "out"]])
def test_tools_commands_without_the_tools_package_say_so_in_one_line(args, monkeypatch, capsys, tmp_path):
    """The Slicer extension ships MedicalFusionLib without medicalfusion_tools: its commands (evaluate,
    train, batch) then end in one line that says what is missing and how to get it, exit 2."""
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "medicalfusion_tools" or m.startswith("medicalfusion_tools.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "medicalfusion_tools", None)     # import of it fails as when absent
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medicalfusion: error: '{args[0]}' needs the medicalfusion_tools")
    assert "pip install -e ." in err[0]
    assert list(tmp_path.iterdir()) == []


def test_evaluate_prepares_the_pairs_as_the_pipeline_does():
    """evaluate's stack of pairs is pipeline.prepare's (same arrays, grey kept grey), except that a
    CT's grey luma is exactly k / 255 as the reference evaluator reads it (prepare's float32
    RGB-to-YCbCr is off by < 1e-7, which turns exact .5 ties of 'average' the other way)."""
    from medicalfusion_tools.evaluate import evaluation_options, prepare_modality
    from MedicalFusionLib.pipeline import prepare

    rng = np.random.default_rng(3)
    a8 = rng.integers(0, 256, (2, 12, 14), dtype=np.uint8)
    f8 = rng.integers(0, 256, (2, 12, 14), dtype=np.uint8)
    y = f8.astype(np.float32) / 255.0
    data = {"a8": a8, "func_rgb8": np.repeat(f8[..., None], 3, axis=-1),
            "ycc": np.stack([y, np.full_like(y, 0.5), np.full_like(y, 0.5)], axis=-1)}
    ours = prepare_modality(data)
    theirs = prepare(sitk.GetImageFromArray(a8), sitk.GetImageFromArray(data["func_rgb8"], isVector=True),
                     evaluation_options("alpha"))
    assert ours.grayscale and theirs.grayscale
    assert np.array_equal(ours.anatomical, theirs.anatomical) and np.array_equal(ours.anatomical, a8 / np.float32(255))
    assert np.allclose(ours.functional_ycc, theirs.functional_ycc, atol=1e-6, rtol=0)
    assert np.array_equal(ours.functional_ycc[..., 0], y)
    assert prepare_modality(data, first=1).anatomical.shape == (1, 12, 14)


def test_evaluate_builds_each_method_once_per_pair():
    """The warm-up and the timed run go through the pipeline (fuse_prepared) and share one built
    function (networks verify their weights once); the registry is left as it was."""
    import torch
    from medicalfusion_tools.evaluate import fuse_modality
    from MedicalFusionLib.methods import registry

    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    f8 = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    data = {"a8": a8, "func_rgb8": np.repeat(f8[..., None], 3, axis=-1)}
    before = registry.build_counts.get("max", 0)
    rgb, seconds = fuse_modality(data, "max", torch.device("cpu"))
    assert registry.build_counts.get("max", 0) - before == 1
    assert registry._kept is None                     # keep_built is off again, as the CLI has it
    assert rgb.shape == (3, 16, 16, 3) and rgb.dtype == np.uint8 and seconds >= 0
    # the fused grey is the pipeline's max of the two sources (a CT's grey stays grey)
    assert np.array_equal(rgb[..., 0], np.maximum(a8, f8)) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_two_identical_mrdfn_runs_write_the_same_bytes(tmp_path, capsys):
    """Issue 21: same inputs, same bytes, whatever batch sizes the run picks from its timing (a 3D
    pair on the MNI 2 mm slice size, where MRDFN's result depended on the batch)."""
    from MedicalFusionLib.methods import get_method

    ok, reason = get_method("mrdfn").available()
    if not ok:
        pytest.skip(reason)
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[0:6, 0:109, 0:91].astype(np.float32)
    anat = 100 + 80 * np.sin(x / 5.0) * np.cos(y / 7.0) + rng.normal(0, 5, x.shape)
    pet = np.exp(-((x - 45) ** 2 + (y - 50) ** 2) / 300.0) * 10.0 + rng.random(x.shape)
    a, f = tmp_path / "mri.nrrd", tmp_path / "pet.nrrd"
    sitk.WriteImage(make_image(anat.astype(np.float32)), str(a))
    sitk.WriteImage(make_image(pet.astype(np.float32)), str(f))
    runs = []
    for run, extra in enumerate(([], [], ["--batch-size", "1"], ["--batch-size", "5"])):
        out = tmp_path / f"run{run}"
        out.mkdir()
        assert main(["fuse", "-a", str(a), "-f", str(f), "-m", "mrdfn", "-o", str(out / "fused.nrrd"),
                     "--metrics", str(out / "m.csv"), "-q", *extra]) == 0
        rows = [line for line in (out / "m.csv").read_text(encoding="utf-8").splitlines()
                if not line.startswith("seconds,")]
        runs.append(((out / "fused.nrrd").read_bytes(), rows))
    assert all(r == runs[0] for r in runs[1:])


def test_the_preview_orients_views_as_dicomorient_does_without_copying_the_volumes():
    """The preview takes its slice from views (issue 21: no whole-volume copies for a picture); they
    must be DICOMOrient's LPS order for every storage order, permuted, flipped or oblique."""
    import itertools

    from MedicalFusionLib.io import outputs

    rng = np.random.default_rng(3)
    tilt = sitk.Euler3DTransform()
    tilt.SetRotation(0.2, -0.1, 0.15)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            d = np.zeros((3, 3))
            for i, p in enumerate(perm):
                d[i, p] = signs[i]
            for direction in (d, np.array(tilt.GetMatrix()).reshape(3, 3) @ d):
                ref = sitk.Image(7, 5, 6, sitk.sitkUInt8)
                ref.SetDirection(direction.ravel().tolist())
                rgb = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
                view = outputs.oriented_view(rgb, ref)
                assert np.shares_memory(view, rgb)
                expected = sitk.GetArrayFromImage(sitk.DICOMOrient(_with_geometry(rgb, ref), "LPS"))
                assert np.array_equal(view, expected), (perm, signs)


def _with_geometry(arr, ref):
    img = sitk.GetImageFromArray(arr, isVector=arr.ndim == 4)
    img.CopyInformation(ref)
    return img


def test_the_read_back_check_compares_slab_by_slab_and_finds_one_changed_voxel_anywhere():
    from MedicalFusionLib.io.outputs import _same_voxels

    a = np.random.default_rng(5).integers(0, 256, (20, 9, 7, 3), dtype=np.uint8)
    assert _same_voxels(a, a.copy(), voxels=50)                  # slabs of one slice
    for where in ((0, 0, 0, 0), (19, 8, 6, 2), (11, 4, 3, 1)):
        b = a.copy()
        b[where] ^= 1
        assert not _same_voxels(a, b, voxels=50), where
    assert not _same_voxels(a, a[:19], voxels=50)
