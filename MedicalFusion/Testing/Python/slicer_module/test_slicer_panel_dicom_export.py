"""The panel's DICOM export (issue 22, the Slicer side), on 3D Slicer's own Python layer (slicer_harness.py).

The user loads the sts STS_001 CT and PET, clicks Fuse, then, in the 'DICOM export' section, picks a
folder and clicks 'Export as DICOM series'. Checked: the button is disabled until a fused volume is
selected and while a fusion runs (after a fusion the new result is selected), the folder holds the
fused node's voxels on the CT's IJK-to-RAS grid as a series of the CT's patient and study
(SimpleITK's series reader), a non-empty or missing folder is one status line with nothing written,
and the inputs are unchanged.
Skipped, with the reason, when ../shared/slicer-python, slicer-core or the sts data are missing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parents[1]          # Testing/Python: the harness beside conftest
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import slicer_harness as sh  # noqa: E402
from conftest import data_root  # noqa: E402

VERSIONS = sh.version_params()
STS = data_root() / "sts" / "STS_001"


@pytest.fixture
def harness(request, tmp_path):
    if not (STS / "CT" / "dicom").is_dir():
        pytest.skip(f"the sts patients are not at {STS.parent} (set MEDICALFUSION_DATA)")
    with sh.opened(request.param, tmp_path / "cache") as h:
        yield h


@pytest.mark.parametrize("harness", VERSIONS, indirect=True)
def test_export_button_writes_the_fused_volume_as_a_series_of_the_ct_study(harness, tmp_path):
    import pydicom
    import SimpleITK as sitk
    import slicer
    from MedicalFusionLib.scene import ijk_to_ras, load_dicom_volume

    h = harness
    widget = h.widget()
    ct = load_dicom_volume(h.scene, STS / "CT" / "dicom")
    pet = load_dicom_volume(h.scene, STS / "PET" / "dicom")
    before = {n.GetID(): (slicer.util.arrayFromVolume(n).copy(), ijk_to_ras(n),
                          {a: n.GetAttribute(a) for a in n.GetAttributeNames()}) for n in (ct, pet)}
    ui = widget.ui
    # no fused volume yet: the export is disabled and says why
    assert ui.exportVolumeSelector.currentNode() is None
    assert not ui.exportDicomButton.enabled and "fuse first" in ui.exportDicomButton.toolTip
    other = h.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "some RGB volume")
    slicer.util.updateVolumeFromArray(other, np.zeros((2, 3, 4, 3), np.uint8))
    ui.exportVolumeSelector.setCurrentNode(other)
    assert not ui.exportDicomButton.enabled and "not a MedicalFusion result" in ui.exportDicomButton.toolTip

    ui.anatomicalSelector.setCurrentNode(ct)
    ui.functionalSelector.setCurrentNode(pet)
    widget._parameterNode.method, widget._parameterNode.computeMetrics = "average", False
    ui.fuseButton.click()
    assert ui.statusLabel.text.startswith("Done"), ui.statusLabel.text
    fused = ui.exportVolumeSelector.currentNode()
    assert fused is not None and fused is not other and fused.GetAttribute("MedicalFusion.method") == "average"
    assert ui.exportDicomButton.enabled, ui.exportDicomButton.toolTip

    # a folder that is not empty: one line, nothing written
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    for folder, said in ((full, "is not empty"), (tmp_path / "no" / "such", "does not exist"), ("", "empty path")):
        ui.exportFolderPathLineEdit.currentPath = str(folder)
        ui.exportDicomButton.click()
        assert said in ui.statusLabel.text and "\n" not in ui.statusLabel.text, ui.statusLabel.text
    assert sorted(os.listdir(full)) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["cache", "full"]

    ui.exportFolderPathLineEdit.currentPath = str(tmp_path / "fused-dicom")
    ui.exportDicomButton.click()
    status = ui.statusLabel.text
    assert status.startswith(f"Exported '{fused.GetName()}' as a DICOM series of ") and "\n" not in status, status

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "fused-dicom")))
    back = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), slicer.util.arrayFromVolume(fused))
    flip = np.diag([-1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = flip @ np.asarray(back.GetDirection()).reshape(3, 3) @ np.diag(back.GetSpacing())
    m[:3, 3] = flip @ np.asarray(back.GetOrigin())
    np.testing.assert_allclose(m, ijk_to_ras(ct), atol=1e-4)
    ct_header = pydicom.dcmread(next(iter(sorted((STS / "CT" / "dicom").iterdir()))), stop_before_pixels=True)
    for f in sorted((tmp_path / "fused-dicom").iterdir()):
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        assert (ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == \
            (ct_header.PatientID, ct_header.StudyInstanceUID, ct_header.FrameOfReferenceUID)
    assert ct_header.PatientID in status
    for n in (ct, pet):
        voxels, matrix, attributes = before[n.GetID()]
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(n), voxels)
        np.testing.assert_array_equal(ijk_to_ras(n), matrix)
        assert {a: n.GetAttribute(a) for a in n.GetAttributeNames()} == attributes

    # while a fusion runs (a fused volume selected), the export is disabled; afterwards the new one is selected
    seen = {}

    def during_fusion():
        seen.update(export=ui.exportDicomButton.enabled, section=ui.exportCollapsibleButton.enabled,
                    selected=ui.exportVolumeSelector.currentNode())

    h.app.after_process_events(2, during_fusion)
    ui.fuseButton.click()
    assert ui.statusLabel.text.startswith("Done"), ui.statusLabel.text
    assert seen == {"export": False, "section": False, "selected": fused}
    assert ui.exportVolumeSelector.currentNode() not in (None, fused) and ui.exportDicomButton.enabled
