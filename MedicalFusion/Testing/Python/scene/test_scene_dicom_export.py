"""The fused volume node exported as DICOM from the scene (MedicalFusionLib/scene_dicom.py): the
Slicer side of issue 22, on slicer-core's real vtkMRMLScene.

The sts patients' CT and PET are loaded into the scene as the panel's tests load them
(scene.load_dicom_volume; and, for Slicer's own DICOM loading, through vtkSlicerVolumesLogic with the
files and the ``DICOM.instanceUIDs`` attribute Slicer's DICOM scalar volume plugin sets), fused with
fuse_nodes, exported with export_fused_node_dicom, and the folder is checked: dciodvfy reports no
error, SimpleITK's series reader gives the fused node's voxels on the CT's IJK-to-RAS grid, patient,
study and frame of reference are the CT's, every slice names its CT and PET sources; bad folders are
one line with nothing written; the inputs and the scene are unchanged.

Slicer's DICOM database (ctkDICOMDatabase) is Qt and not in slicer-core: the one test of that path
gives export_fused_node_dicom a stand-in with the only method it calls (``fileForInstance``).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import data_root
from MedicalFusionLib.io import dicom_export
from MedicalFusionLib.errors import FusionError

slicer = pytest.importorskip("slicer")
pydicom = pytest.importorskip("pydicom")

from MedicalFusionLib import scene as sc  # noqa: E402
from MedicalFusionLib import scene_dicom as sd  # noqa: E402

STS = data_root() / "sts"
PATIENTS = ("STS_001", "STS_003")
METHOD = "average"        # the cheapest method: this is about the export, not the fusion
REQUIRE = os.environ.get("MEDICALFUSION_REQUIRE_PACS") == "1"


def need_sts() -> None:
    if not (STS / "STS_001" / "CT" / "dicom").is_dir():
        pytest.skip(f"the sts patients are not at {STS} (set MEDICALFUSION_DATA)")


def options():
    from MedicalFusionLib.pipeline import FusionOptions

    return FusionOptions(method=METHOD, compute_metrics=False)


def new_scene():
    s = slicer.vtkMRMLScene()
    colours = slicer.vtkSlicerColorLogic()
    colours.SetMRMLScene(s)
    s._colours = colours
    return s


def node_state(node) -> dict:
    """Everything about an input node an export could change."""
    return {"voxels": slicer.util.arrayFromVolume(node).copy(), "matrix": sc.ijk_to_ras(node),
            "attributes": {n: node.GetAttribute(n) for n in node.GetAttributeNames() or ()},
            "transform": node.GetTransformNodeID(), "mtime": node.GetMTime(),
            "display": node.GetDisplayNode().GetMTime() if node.GetDisplayNode() else None}


def assert_same_state(node, state) -> None:
    now = node_state(node)
    np.testing.assert_array_equal(now.pop("voxels"), state["voxels"])
    np.testing.assert_array_equal(now.pop("matrix"), state["matrix"])
    assert now == {k: v for k, v in state.items() if k not in ("voxels", "matrix")}


def read_series(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def ras_matrix(image: sitk.Image) -> np.ndarray:
    """IJK-to-RAS of a SimpleITK image (LPS), as Slicer builds a node's from it."""
    flip = np.diag([-1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = flip @ np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = flip @ np.asarray(image.GetOrigin())
    return m


def headers(folder) -> list:
    return [pydicom.dcmread(str(f), stop_before_pixels=True) for f in sorted(pathlib.Path(folder).glob("*"))
            if f.is_file()]


@pytest.fixture(scope="module")
def fused_sts():
    """patient -> (scene, CT node, PET node, fused node): loaded and fused once."""
    need_sts()
    out = {}
    for patient in PATIENTS:
        s = new_scene()
        ct = sc.load_dicom_volume(s, STS / patient / "CT" / "dicom")
        pet = sc.load_dicom_volume(s, STS / patient / "PET" / "dicom")
        fused = sc.fuse_nodes(s, ct, pet, options()).volume_node
        out[patient] = (s, ct, pet, fused)
    return out


@pytest.mark.parametrize("patient", PATIENTS)
def test_export_is_the_fused_node_on_the_ct_grid_of_the_ct_patient_and_study(fused_sts, tmp_path, patient):
    s, ct, pet, fused = fused_sts[patient]
    states = {n.GetID(): node_state(n) for n in (ct, pet, fused)}
    count = s.GetNumberOfNodes()
    done = sd.export_fused_node_dicom(s, fused, tmp_path / "dicom")

    back = read_series(tmp_path / "dicom")
    assert back.GetPixelID() == sitk.sitkVectorUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), slicer.util.arrayFromVolume(fused))
    np.testing.assert_allclose(ras_matrix(back), sc.ijk_to_ras(ct), atol=1e-4)
    np.testing.assert_allclose(ras_matrix(back), sc.ijk_to_ras(fused), atol=1e-4)

    ct_headers = {h.SOPInstanceUID: h for h in headers(STS / patient / "CT" / "dicom")}
    pet_uids = {h.SOPInstanceUID for h in headers(STS / patient / "PET" / "dicom")}
    first_ct = next(iter(ct_headers.values()))
    written = headers(tmp_path / "dicom")
    assert len(written) == len(ct_headers) == len(done.files)
    for ds in written:
        assert ds.SOPClassUID == dicom_export.SC_IMAGE_STORAGE
        assert (ds.PatientID, ds.PatientName, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == \
            (first_ct.PatientID, first_ct.PatientName, first_ct.StudyInstanceUID, first_ct.FrameOfReferenceUID)
        assert ds.SeriesInstanceUID == done.series_instance_uid != first_ct.SeriesInstanceUID
        assert ds.SeriesDescription.startswith(f"Fused PET/CT {METHOD} PET-Heat SUVbw ")
        sources = [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence]
        ct_source = ct_headers[sources[0]]       # the CT slice at this slice's position
        np.testing.assert_allclose([float(v) for v in ct_source.ImagePositionPatient],
                                   [float(v) for v in ds.ImagePositionPatient], atol=1e-3)
        assert set(sources[1:]) <= pet_uids
    assert any(len(ds.SourceImageSequence) > 1 for ds in written)     # PET slices referenced
    assert not done.synthetic and done.study_instance_uid == first_ct.StudyInstanceUID
    assert f"{len(written)} files" in done.message and first_ct.PatientID in done.message
    assert "\n" not in done.message

    # the inputs, the fused node and the scene are as they were
    for node in (ct, pet, fused):
        assert_same_state(node, states[node.GetID()])
    assert s.GetNumberOfNodes() == count


def test_export_passes_dciodvfy(fused_sts, tmp_path):
    if shutil.which("dciodvfy") is None:
        (pytest.fail if REQUIRE else pytest.skip)("dciodvfy: install dicom3tools (make test does it as root)")
    s, _ct, _pet, fused = fused_sts["STS_001"]
    done = sd.export_fused_node_dicom(s, fused, tmp_path / "dicom")
    for f in done.files:
        proc = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        report = proc.stdout + proc.stderr
        assert not [line for line in report.splitlines() if line.startswith("Error")], (f, report)
        assert "SCImage" in report


def _assert_nothing_written(parent: pathlib.Path, before: set) -> None:
    assert {p.name for p in parent.iterdir()} == before      # no temporary left, no folder made


def test_a_bad_folder_is_one_line_and_nothing_is_written(fused_sts, tmp_path):
    s, ct, pet, fused = fused_sts["STS_001"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {full: "is not empty", a_file: "is not a folder", tmp_path / "missing" / "dicom": "does not exist",
             STS / "STS_001" / "CT" / "dicom": "is not empty", STS / "STS_001" / "CT" / "dicom" / "fused": "input folder",
             "": "empty path"}
    before = {p.name for p in tmp_path.iterdir()}
    ct_before = sorted(os.listdir(STS / "STS_001" / "CT" / "dicom"))
    for folder, said in cases.items():
        with pytest.raises(FusionError) as info:
            sd.export_fused_node_dicom(s, fused, folder)
        message = str(info.value)
        assert said in message and "\n" not in message, message
        _assert_nothing_written(tmp_path, before)
    assert (full / "keep.txt").read_text() == "mine" and os.listdir(full) == ["keep.txt"]
    assert sorted(os.listdir(STS / "STS_001" / "CT" / "dicom")) == ct_before


def test_only_a_fused_result_is_exported(fused_sts, tmp_path):
    s, ct, pet, fused = fused_sts["STS_001"]
    assert sd.can_export(fused) == (True, "")
    for node, said in ((None, "fuse first"), (ct, "not a MedicalFusion result"), (pet, "not a MedicalFusion result")):
        ok, reason = sd.can_export(node)
        assert not ok and said in reason
        if node is not None:
            with pytest.raises(FusionError, match="not a MedicalFusion result"):
                sd.export_fused_node_dicom(s, node, tmp_path / "dicom")
    other = s.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "not ours")
    try:
        slicer.util.updateVolumeFromArray(other, np.zeros((2, 3, 4, 3), np.uint8))
        assert not sd.can_export(other)[0]
    finally:
        s.RemoveNode(other)
    with pytest.raises(FusionError, match="was fused from the anatomical volume"):
        sd.export_fused_node_dicom(s, fused, tmp_path / "dicom", anatomical=pet)
    assert not (tmp_path / "dicom").exists()


def test_inputs_gone_or_changed_are_refused(tmp_path):
    need_sts()
    s = new_scene()
    ct = sc.load_dicom_volume(s, STS / "STS_001" / "CT" / "dicom")
    pet = sc.load_dicom_volume(s, STS / "STS_001" / "PET" / "dicom")
    fused = sc.fuse_nodes(s, ct, pet, options()).volume_node
    # the CT's series folder moved away: refused, not exported under a synthetic patient
    ct.SetAttribute(sd.DICOM_FOLDER_ATTRIBUTE, str(tmp_path / "moved"))
    with pytest.raises(FusionError, match="no longer there"):
        sd.export_fused_node_dicom(s, fused, tmp_path / "a")
    ct.SetAttribute(sd.DICOM_FOLDER_ATTRIBUTE, str(STS / "STS_001" / "CT" / "dicom"))
    # the fused volume was moved off the CT's grid
    m = sc.ijk_to_ras(fused)
    origin = fused.GetOrigin()
    fused.SetOrigin(origin[0] + 5, origin[1], origin[2])
    with pytest.raises(FusionError, match="no longer on the grid"):
        sd.export_fused_node_dicom(s, fused, tmp_path / "b")
    # the CT moved after loading (and the fused volume with it): no longer on its series' grid
    ct_origin = ct.GetOrigin()
    ct.SetOrigin(ct_origin[0] + 5, ct_origin[1], ct_origin[2])
    with pytest.raises(FusionError, match="no longer on the grid of the DICOM series"):
        sd.export_fused_node_dicom(s, fused, tmp_path / "b")
    ct.SetOrigin(*ct_origin)
    fused.SetOrigin(*origin)
    np.testing.assert_array_equal(sc.ijk_to_ras(fused), m)
    # the PET was deleted
    s.RemoveNode(pet)
    with pytest.raises(FusionError, match="is not in the scene"):
        sd.export_fused_node_dicom(s, fused, tmp_path / "c")
    assert not any(tmp_path.iterdir())


class DatabaseStandIn:
    """What export_fused_node_dicom calls on Slicer's DICOM database (ctkDICOMDatabase, Qt: not in
    slicer-core): ``fileForInstance(SOPInstanceUID) -> path`` ('' when it does not hold it)."""

    def __init__(self, folders):
        self.files = {}
        for folder in folders:
            for f in sorted(pathlib.Path(folder).iterdir()):
                self.files[pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID] = str(f)

    def fileForInstance(self, uid: str) -> str:
        return self.files.get(uid, "")


def load_as_slicer_dicom(s, folder, name):
    """As Slicer's DICOM scalar volume plugin loads a series: the files given to the volumes logic's
    archetype reader, the instance UIDs in the node's ``DICOM.instanceUIDs`` attribute (in file order;
    the files are given here in reverse name order, so the export cannot rely on the order)."""
    import vtk

    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(s)
    files = sorted((str(f) for f in pathlib.Path(folder).iterdir()), reverse=True)
    names = vtk.vtkStringArray()
    for f in files:
        names.InsertNextValue(f)
    node = logic.AddArchetypeVolume(files[0], name, 0, names)
    node.SetAttribute("DICOM.instanceUIDs",
                      " ".join(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files))
    return node


def test_volumes_loaded_from_slicers_dicom_database_give_patient_study_and_sources(tmp_path):
    need_sts()
    s = new_scene()
    ct = load_as_slicer_dicom(s, STS / "STS_001" / "CT" / "dicom", "CT")
    pet = load_as_slicer_dicom(s, STS / "STS_001" / "PET" / "dicom", "PET")
    pet.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLPETProceduralColorNodePET-Heat")
    fused = sc.fuse_nodes(s, ct, pet, options()).volume_node
    database = DatabaseStandIn([STS / "STS_001" / "CT" / "dicom", STS / "STS_001" / "PET" / "dicom"])
    done = sd.export_fused_node_dicom(s, fused, tmp_path / "dicom", database=database)
    ct_headers = {h.SOPInstanceUID: h for h in headers(STS / "STS_001" / "CT" / "dicom")}
    first_ct = next(iter(ct_headers.values()))
    assert not done.synthetic and done.study_instance_uid == first_ct.StudyInstanceUID
    for ds in headers(tmp_path / "dicom"):
        assert (ds.PatientID, ds.FrameOfReferenceUID) == (first_ct.PatientID, first_ct.FrameOfReferenceUID)
        source = ct_headers[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose([float(v) for v in source.ImagePositionPatient],
                                   [float(v) for v in ds.ImagePositionPatient], atol=1e-3)
    back = read_series(tmp_path / "dicom")
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), slicer.util.arrayFromVolume(fused))
    np.testing.assert_allclose(ras_matrix(back), sc.ijk_to_ras(ct), atol=1e-4)
    # an instance the database does not hold, or no database at all: one line, nothing written
    del database.files[next(iter(ct_headers))]
    with pytest.raises(FusionError, match="not in Slicer's DICOM database"):
        sd.export_fused_node_dicom(s, fused, tmp_path / "again", database=database)
    with pytest.raises(FusionError, match="database, which is not open"):
        sd.export_fused_node_dicom(s, fused, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_volumes_not_from_dicom_get_a_synthetic_patient_and_say_so(tmp_path):
    s = new_scene()
    anatomical, functional = sc.add_phantom_pair(s)
    fused = sc.fuse_nodes(s, anatomical, functional, options()).volume_node
    done = sd.export_fused_node_dicom(s, fused, tmp_path / "dicom")
    assert done.synthetic and done.patient_name == dicom_export.SYNTHETIC_PATIENT_NAME
    assert "synthetic patient" in done.message and done.patient_id in done.message
    # the phantom's third axis is left-handed (flipped): the series runs along row x column, so its
    # slices come in the other order; on the fused node's grid (nearest voxel) it is the same volume
    back = read_series(tmp_path / "dicom")
    grid = sc.image_from_node(fused)
    np.testing.assert_allclose(np.asarray(back.GetDirection()).reshape(3, 3)[:, 2],
                               -np.asarray(grid.GetDirection()).reshape(3, 3)[:, 2], atol=1e-6)
    on_grid = sitk.Resample(back, grid, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(on_grid), slicer.util.arrayFromVolume(fused))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), slicer.util.arrayFromVolume(fused)[::-1])
    for ds in headers(tmp_path / "dicom"):
        assert "SourceImageSequence" not in ds       # a synthetic patient names no real instances


def test_the_inputs_are_found_after_the_scene_is_saved_and_imported_into_another():
    """The fused volume's references to its inputs are MRML node references: importing the saved
    scene into a scene that already holds volumes renames the node IDs, and they follow."""
    s = new_scene()
    anatomical, functional = sc.add_phantom_pair(s)
    fused = sc.fuse_nodes(s, anatomical, functional, options()).volume_node
    assert sd._inputs(s, fused, None, None) == [anatomical, functional]
    s.SetSaveToXMLString(1)
    s.Commit()
    xml = s.GetSceneXMLString()

    other = new_scene()
    for node in sc.add_phantom_pair(other):     # takes the IDs the saved nodes had
        node.SetName("already here " + node.GetName())
    count = other.GetNumberOfNodes()
    other.SetLoadFromXMLString(1)
    other.SetSceneXMLString(xml)
    other.Import()
    assert other.GetNumberOfNodes() > count
    imported = [n for n in (other.GetNthNodeByClass(i, "vtkMRMLVectorVolumeNode")
                            for i in range(other.GetNumberOfNodesByClass("vtkMRMLVectorVolumeNode")))
                if n.GetName() == fused.GetName()]
    assert len(imported) == 1
    a, f = sd._inputs(other, imported[0], None, None)
    assert (a.GetName(), f.GetName()) == (anatomical.GetName(), functional.GetName())
    assert a.GetID() != anatomical.GetID() and a.GetScene() is other
