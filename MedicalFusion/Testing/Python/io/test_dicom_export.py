"""``fuse --output-dicom DIR``: the fused volume as an RGB Secondary Capture series of the
anatomical's patient and study, on its grid (MedicalFusionLib/io/dicom_export.py, docs/PACS.md).

Checked on the three real sts patients (CT + PET, ../shared/data/sts) and on synthetic volumes
(oblique, left-handed, not DICOM):
- dciodvfy (dicom3tools, the standard's own validator) reports no error on any file;
- SimpleITK's series reader and pydicom read it back voxel for voxel equal to the fused volume
  written with -o, on the anatomical's grid (origin, spacing, direction);
- 3D Slicer (slicer-core's vtkSlicerVolumesLogic, the reader Slicer's DICOM scalar volume plugin
  hands a series to) puts it on the same IJK-to-RAS grid as the CT. Slicer's DICOM module itself
  (DICOMLib, its database and plugins) is not part of slicer-core, so it cannot run here;
- patient, study and frame of reference are the CT's, the series is new, the description says what
  it is, every slice names its CT slice and PET slices as sources, no burned-in annotation;
- all or nothing: a non-empty folder is refused before any work, an interrupted run leaves no folder.
"""
from __future__ import annotations

import glob
import os
import pathlib
import shutil
import signal
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import data_root, make_image
from test_faults import assert_one_line, cli, leftovers, start_paused
from MedicalFusionLib.io import dicom_export

STS = data_root() / "sts"
PATIENTS = ("STS_001", "STS_002", "STS_003")
REQUIRE = os.environ.get("MEDICALFUSION_REQUIRE_PACS") == "1"    # set by `make test`: fail, never skip


def need(what: str, available: bool, why: str) -> None:
    if not available:
        (pytest.fail if REQUIRE else pytest.skip)(f"{what}: {why}")


def need_sts() -> None:
    if not (STS / "STS_001" / "CT" / "dicom").is_dir():
        pytest.skip(f"the sts patients are not at {STS} (set MEDICALFUSION_DATA)")


def read_series(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def dicom_files(folder) -> list[str]:
    return sorted(glob.glob(str(pathlib.Path(folder) / "*.dcm")))


@pytest.fixture(scope="module")
def sts_fused(tmp_path_factory):
    """patient -> (folder with fused.nrrd and dicom/), fused once per patient (CT + PET, lp)."""
    need_sts()
    out = {}
    from MedicalFusionLib.cli import main

    for patient in PATIENTS:
        folder = tmp_path_factory.mktemp(patient)
        rc = main(["fuse", "-a", str(STS / patient / "CT" / "dicom"), "-f", str(STS / patient / "PET" / "dicom"),
                   "-m", "lp", "--functional-preset", "pet-suv-0-10", "-o", str(folder / "fused.nrrd"),
                   "--output-dicom", str(folder / "dicom"), "-q", "--threads", "1"])
        assert rc == 0
        out[patient] = folder
    return out


@pytest.mark.parametrize("patient", PATIENTS)
def test_sts_series_reads_back_voxel_for_voxel_on_the_ct_grid(sts_fused, patient):
    folder = sts_fused[patient]
    fused = sitk.ReadImage(str(folder / "fused.nrrd"))
    ct = read_series(STS / patient / "CT" / "dicom")
    back = read_series(folder / "dicom")
    assert back.GetNumberOfComponentsPerPixel() == 3 and back.GetPixelID() == sitk.sitkVectorUInt8
    assert back.GetSize() == ct.GetSize() == fused.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), ct.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), ct.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(fused))
    # pydicom: every file's pixels are the fused slice at its Image Position (Patient)
    import pydicom

    arr = sitk.GetArrayViewFromImage(fused)
    for f in dicom_files(folder / "dicom"):
        ds = pydicom.dcmread(f)
        k = round(fused.TransformPhysicalPointToContinuousIndex([float(v) for v in ds.ImagePositionPatient])[2])
        assert np.array_equal(ds.pixel_array, arr[k]), f


@pytest.mark.parametrize("patient", PATIENTS)
def test_sts_series_is_a_new_series_of_the_ct_patient_and_study(sts_fused, patient):
    import pydicom

    ct_files = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f
                for f in dicom_files(STS / patient / "CT" / "dicom")}
    ct = pydicom.dcmread(next(iter(ct_files.values())), stop_before_pixels=True)
    ct_by_z = {round(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]), 2): uid
               for uid, f in ct_files.items()}
    pet_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                for f in dicom_files(STS / patient / "PET" / "dicom")}
    files = dicom_files(sts_fused[patient] / "dicom")
    assert len(files) == len(ct_files)
    series = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.SOPClassUID == dicom_export.SC_IMAGE_STORAGE and ds.Modality == "OT"
        assert (ds.PatientID, ds.PatientName, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == \
            (ct.PatientID, ct.PatientName, ct.StudyInstanceUID, ct.FrameOfReferenceUID)
        assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
        series.add(ds.SeriesInstanceUID)
        assert ds.SeriesDescription == "Fused PET/CT lp PET-Heat SUVbw 0-10"
        assert ds.BurnedInAnnotation == "NO" and list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert list(ds.PatientOrientation) == ["L", "P"]      # rows run to the left, columns to the back
        sources = [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence]
        assert sources[0] == ct_by_z[round(float(ds.ImagePositionPatient[2]), 2)]   # the CT slice there
        assert set(sources[1:]) and set(sources[1:]) <= pet_uids                    # and PET slices
        assert "lp" in ds.DerivationDescription and "SUVbw" in ds.DerivationDescription
    assert len(series) == 1


def test_sts_series_passes_dciodvfy(sts_fused):
    need("dciodvfy", shutil.which("dciodvfy") is not None, "install dicom3tools (make test does it as root)")
    for patient in PATIENTS:
        for f in dicom_files(sts_fused[patient] / "dicom"):
            proc = subprocess.run(["dciodvfy", f], capture_output=True, text=True, timeout=60)
            report = proc.stdout + proc.stderr
            errors = [line for line in report.splitlines() if line.startswith("Error")]
            assert not errors, (f, errors)
            assert "SCImage" in report           # it was checked against the SC Image IOD


def test_sts_series_lands_on_the_ct_grid_in_slicer(sts_fused):
    """slicer-core: the DICOM files through vtkSlicerVolumesLogic (what Slicer's DICOM scalar
    volume plugin calls with a series' files) give the CT's IJK-to-RAS and the fused voxels."""
    slicer = pytest.importorskip("slicer")
    import vtk
    from slicer.util import arrayFromVolume

    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)

    def load(folder, name):
        files = dicom_files(folder)
        names = vtk.vtkStringArray()
        for f in files:
            names.InsertNextValue(f)
        node = logic.AddArchetypeVolume(files[0], name, 0, names)
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        return node, np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])

    for patient in PATIENTS:
        _ct, ct_matrix = load(STS / patient / "CT" / "dicom", "ct")
        fused_node, fused_matrix = load(sts_fused[patient] / "dicom", "fused")
        assert fused_node.IsA("vtkMRMLVectorVolumeNode")
        np.testing.assert_allclose(fused_matrix, ct_matrix, atol=1e-4)
        fused = sitk.GetArrayFromImage(sitk.ReadImage(str(sts_fused[patient] / "fused.nrrd")))
        assert np.array_equal(arrayFromVolume(fused_node), fused)


# --------------------------------------------------------------------------------------------------
# synthetic: not DICOM, oblique, left-handed


def _oblique(left_handed: bool):
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    rot = rot @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    if left_handed:
        rot[:, 2] *= -1
    return tuple(rot.ravel())


@pytest.mark.parametrize("left_handed", [False, True], ids=["oblique", "oblique-left-handed"])
def test_synthetic_volume_gets_a_synthetic_patient_and_its_own_grid(tmp_path, capfd, rng, left_handed):
    z, y, x = np.mgrid[0:9, 0:30, 0:26].astype(np.float32)
    anat = 100 + 60 * np.sin(x / 4.0) * np.cos(y / 5.0) + 10 * z + rng.normal(0, 3, z.shape)
    pet = np.exp(-((x - 13) ** 2 + (y - 15) ** 2 + (z - 4) ** 2 * 4) / 40.0) * 8
    geometry = dict(spacing=(0.8, 0.9, 2.5), origin=(-12.5, 30.25, 7.0), direction=_oblique(left_handed))
    sitk.WriteImage(make_image(anat.astype(np.float32), **geometry), str(tmp_path / "mr.nrrd"))
    sitk.WriteImage(make_image(pet.astype(np.float32), **geometry), str(tmp_path / "pet.nrrd"))
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "mr.nrrd", "-f", tmp_path / "pet.nrrd", "-m", "lp",
                    "-o", tmp_path / "fused.nrrd", "--output-dicom", tmp_path / "dcm", "-q")
    assert rc == 0, lines
    assert any("synthetic patient and study" in line for line in lines), lines
    fused = sitk.ReadImage(str(tmp_path / "fused.nrrd"))
    back = read_series(tmp_path / "dcm")
    a, b = sitk.GetArrayViewFromImage(fused), sitk.GetArrayViewFromImage(back)
    n = fused.GetSize()[2]
    if left_handed:
        # a DICOM series runs along row x column: the same grid, its slices in the opposite order
        assert np.array_equal(b, a[::-1])
        np.testing.assert_allclose(back.GetOrigin(), fused.TransformIndexToPhysicalPoint((0, 0, n - 1)), atol=1e-4)
        d = np.array(fused.GetDirection()).reshape(3, 3)
        d[:, 2] *= -1
        np.testing.assert_allclose(np.array(back.GetDirection()).reshape(3, 3), d, atol=1e-6)
    else:
        assert np.array_equal(b, a)
        np.testing.assert_allclose(back.GetOrigin(), fused.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(back.GetDirection(), fused.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), fused.GetSpacing(), atol=1e-6)
    import pydicom

    ds = pydicom.dcmread(dicom_files(tmp_path / "dcm")[0], stop_before_pixels=True)
    assert ds.PatientName == dicom_export.SYNTHETIC_PATIENT_NAME
    assert ds.PatientID.startswith(dicom_export.SYNTHETIC_PATIENT_PREFIX)
    assert ds.StudyDescription == dicom_export.SYNTHETIC_STUDY_DESCRIPTION
    assert "SourceImageSequence" not in ds and ds.FrameOfReferenceUID
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", dicom_files(tmp_path / "dcm")[0]], capture_output=True, text=True)
        assert not [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]


def test_patient_orientation_letters_follow_lps():
    assert [dicom_export._orientation_letter(np.array(v, float)) for v in
            ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1), (0.8, 0, -0.6))] == \
        ["L", "R", "P", "A", "H", "F", "LF"]


# --------------------------------------------------------------------------------------------------
# all or nothing


def _pair(folder: pathlib.Path):
    z, y, x = np.mgrid[0:6, 0:24, 0:20].astype(np.float32)
    sitk.WriteImage(make_image((100 + 50 * np.sin(x / 3) + z).astype(np.float32)), str(folder / "mr.nrrd"))
    sitk.WriteImage(make_image(np.exp(-((x - 10) ** 2 + (y - 12) ** 2) / 30.0).astype(np.float32)),
                    str(folder / "pet.nrrd"))


def test_a_folder_that_is_not_empty_is_refused_before_any_work(tmp_path, capfd):
    _pair(tmp_path)
    (tmp_path / "dcm").mkdir()
    (tmp_path / "dcm" / "old.dcm").write_bytes(b"x")
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "mr.nrrd", "-f", tmp_path / "pet.nrrd", "-o", tmp_path / "o.nrrd",
                    "--output-dicom", tmp_path / "dcm", "-q")
    assert_one_line(rc, lines, "--output-dicom folder", "is not empty")
    assert not (tmp_path / "o.nrrd").exists() and os.listdir(tmp_path / "dcm") == ["old.dcm"]


def test_an_empty_folder_is_filled_and_output_dicom_alone_is_enough(tmp_path, capfd):
    _pair(tmp_path)
    (tmp_path / "dcm").mkdir()
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "mr.nrrd", "-f", tmp_path / "pet.nrrd",
                    "--output-dicom", tmp_path / "dcm", "-q")
    assert rc == 0, lines
    assert len(dicom_files(tmp_path / "dcm")) == 6 and not leftovers(tmp_path)


def test_no_output_at_all_is_one_line(tmp_path, capfd):
    _pair(tmp_path)
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "mr.nrrd", "-f", tmp_path / "pet.nrrd", "-q")
    assert_one_line(rc, lines, "-o FILE, --output-dicom FOLDER, or --store")


def test_an_interrupted_run_leaves_no_folder_and_no_other_output(tmp_path):
    _pair(tmp_path)
    proc = start_paused(["fuse", "-a", tmp_path / "mr.nrrd", "-f", tmp_path / "pet.nrrd", "-o", tmp_path / "o.nrrd",
                         "--output-dicom", tmp_path / "dcm", "-q"], tmp_path, "write:--output-dicom folder",
                        tmp_path / "paused")
    # the series is complete in its temporary folder, not in place
    temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(".mf-tmp-") and p.is_dir()]
    assert len(temporaries) == 1 and len(dicom_files(temporaries[0])) == 6
    assert not (tmp_path / "dcm").exists()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "nothing was written" in err
    assert not (tmp_path / "dcm").exists() and not (tmp_path / "o.nrrd").exists()
    assert not leftovers(tmp_path)


def test_series_of_two_patients_are_not_fused_into_dicom(tmp_path, capfd):
    """The fused series is filed under the anatomical's patient: another patient's PET is refused."""
    from dicom_series import write_series

    z, y, x = np.mgrid[0:5, 0:20, 0:18]
    write_series(tmp_path / "ct", (40 * np.sin(x / 3.0) + z).astype(np.int16), "CT", fields={"PatientID": "A-1"})
    write_series(tmp_path / "pet", (100 * np.exp(-((x - 9) ** 2 + (y - 10) ** 2) / 20.0)).astype(np.int16), "PT",
                 fields={"PatientID": "B-2", "Units": "GML"})
    rc, lines = cli(capfd, "fuse", "-a", tmp_path / "ct", "-f", tmp_path / "pet", "-o", tmp_path / "o.nrrd",
                    "--output-dicom", tmp_path / "dcm", "-q")
    assert_one_line(rc, lines, "patient ID 'A-1'", "patient ID 'B-2'", "mix two patients")
    assert not (tmp_path / "dcm").exists() and not (tmp_path / "o.nrrd").exists()


def test_source_functional_slices_follow_the_placement():
    """Each fused slice names the functional slices it was resampled from, through the transform."""
    ref = make_image(np.zeros((10, 8, 8), np.float32), spacing=(1.0, 1.0, 2.0))
    func = make_image(np.zeros((20, 4, 4), np.float32), spacing=(2.0, 2.0, 1.0))
    plain = dicom_export._functional_slices(ref, func, None, list(range(10)))
    assert plain[3] == [6]                            # z = 6 mm: functional slice 6 exactly
    shifted = dicom_export._functional_slices(ref, func, sitk.TranslationTransform(3, (0.0, 0.0, 4.5)), list(range(10)))
    assert shifted[3] == [10, 11]                     # placed 4.5 mm higher: between slices 10 and 11
    assert plain[9] == [18] and shifted[9] == []      # beyond the functional: no functional source
