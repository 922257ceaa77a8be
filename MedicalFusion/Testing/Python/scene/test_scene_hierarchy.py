"""Outputs go beside the anatomical in the subject hierarchy (the Data module's tree), on a real MRML
scene from the slicer-core wheel (MedicalFusionLib.scene.place_beside / move_to_subject_hierarchy_item)."""
from __future__ import annotations

import pytest

slicer = pytest.importorskip(
    "slicer", reason="slicer-core is not installed (pip install slicer-core): the scene tests need real MRML nodes")
vtk = pytest.importorskip("vtk", reason="vtk is not installed (it comes with slicer-core)")

from MedicalFusionLib.scene import move_to_subject_hierarchy_item, place_beside  # noqa: E402


@pytest.fixture
def scene_and_hierarchy():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()   # what the application sets up
    logic.SetMRMLScene(scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh is not None
    yield scene, sh
    logic.SetMRMLScene(None)


def add_volume(scene, sh, name, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    if parent is not None:
        sh.CreateItem(parent, node)
    return node


def test_outputs_land_in_the_anatomicals_study(scene_and_hierarchy):
    scene, sh = scene_and_hierarchy
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "PET/MR")
    other_study = sh.CreateStudyItem(patient, "CT")
    anatomical = add_volume(scene, sh, "MR T1", study)
    fused_with_item = add_volume(scene, sh, "fused", sh.GetSceneItemID())   # the application made its item
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")         # no item yet (bare scene)
    elsewhere = add_volume(scene, sh, "CT", other_study)

    place_beside(scene, [fused_with_item, table, None], anatomical)

    for node in (fused_with_item, table):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert sh.GetItemParent(sh.GetItemByDataNode(elsewhere)) == other_study     # others untouched
    assert sh.GetItemParent(sh.GetItemByDataNode(anatomical)) == study
    assert sh.GetItemLevel(sh.GetItemParent(sh.GetItemByDataNode(table))) == "Study"


def test_anatomical_at_the_top_level_keeps_outputs_there(scene_and_hierarchy):
    scene, sh = scene_and_hierarchy
    anatomical = add_volume(scene, sh, "MR", sh.GetSceneItemID())
    fused = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "fused")
    place_beside(scene, [fused], anatomical)
    assert sh.GetItemParent(sh.GetItemByDataNode(fused)) == sh.GetSceneItemID()


def test_nothing_moves_when_the_anatomical_has_no_item(scene_and_hierarchy):
    scene, sh = scene_and_hierarchy
    anatomical = add_volume(scene, sh, "MR")                 # no subject hierarchy item
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "results")
    fused = add_volume(scene, sh, "fused", folder)
    place_beside(scene, [fused], anatomical)
    assert sh.GetItemParent(sh.GetItemByDataNode(fused)) == folder
    assert not sh.GetItemByDataNode(anatomical)


def test_move_into_a_new_study(scene_and_hierarchy):
    scene, sh = scene_and_hierarchy
    t1 = add_volume(scene, sh, "T1", sh.GetSceneItemID())
    pet = add_volume(scene, sh, "PET")
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "sample"), "demo")
    move_to_subject_hierarchy_item(scene, [t1, pet], study)
    assert [sh.GetItemParent(sh.GetItemByDataNode(n)) for n in (t1, pet)] == [study, study]
    children = vtk.vtkIdList()
    sh.GetItemChildren(study, children)
    assert children.GetNumberOfIds() == 2
