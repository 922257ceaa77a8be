"""The panel while the scene changes under it, on 3D Slicer's own Python layer (see slicer_harness.py).

What a user does in the real application while the module is open: closes the scene or deletes a
volume during a fusion, deletes the selected volume afterwards (the node selectors then pick another
node, as qMRMLNodeComboBox does), saves the scene with its data as a .mrb and opens it again.
Skipped, with the reason, when ../shared/slicer-python or slicer-core is missing.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parents[1]          # Testing/Python: the harness beside conftest
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import slicer_harness as sh  # noqa: E402

VERSIONS = sh.version_params()
parametrize_versions = sh.parametrize_versions          # the harness fixture is conftest's


def phantom(h):
    from MedicalFusionLib.scene import add_phantom_pair  # noqa: PLC0415

    return add_phantom_pair(h.scene)


def ready_panel(h, method: str = "lp", metrics: bool = False):
    """The module shown, the phantom pair selected in its selectors, Fuse enabled."""
    widget = h.widget()
    anatomical, functional = phantom(h)
    widget.ui.anatomicalSelector.setCurrentNode(anatomical)
    widget.ui.functionalSelector.setCurrentNode(functional)
    widget._parameterNode.method = method
    widget._parameterNode.computeMetrics = metrics
    assert widget.ui.fuseButton.enabled, widget.ui.fuseButton.toolTip
    return widget, anatomical, functional


def fuse(widget) -> None:
    """Click Fuse and check the run ended with its "Done" line."""
    widget.ui.fuseButton.click()
    assert widget.ui.statusLabel.text.startswith("Done"), widget.ui.statusLabel.text


def same_voxels_in_space(array1, ijk_to_ras1, array2, ijk_to_ras2) -> bool:
    """Whether two volumes ([K, J, I, ...] arrays and their IJK-to-RAS matrices) hold the same value
    at every voxel centre in world space: a reader may store the grid in another axis order or
    direction (Slicer's archetype reader flips K of a left-handed grid) without changing the image."""
    if array1.shape != array2.shape and array1.shape != array2.shape[:3][::-1] + array2.shape[3:]:
        return False
    k, j, i = np.indices(array1.shape[:3]).reshape(3, -1)
    ras = ijk_to_ras1 @ np.vstack([i, j, k, np.ones_like(i)])
    ijk2 = np.linalg.inv(ijk_to_ras2) @ ras
    index = np.rint(ijk2[:3]).astype(int)
    if not np.allclose(ijk2[:3], index, atol=1e-3):
        return False
    if (index < 0).any() or (index.T >= array2.shape[:3][::-1]).any():
        return False
    return bool(np.array_equal(array1[k, j, i], array2[index[2], index[1], index[0]]))


def outputs(h) -> list:
    return [n.GetName() for n in h.nodes("vtkMRMLVectorVolumeNode") + h.nodes("vtkMRMLTableNode")]


# --------------------------------------------------------------------------------------------------
# the scene changes during a fusion


@parametrize_versions
def test_closing_the_scene_during_a_fusion_cancels_it_and_writes_nothing_into_the_next_scene(harness):
    h = harness
    widget, anatomical, functional = ready_panel(h, metrics=True)
    seen = {}

    def close_scene():                        # File > Close Scene while the fusion processes events
        seen["running"] = widget.ui.fuseButton.text
        h.scene.Clear(0)

    h.app.after_process_events(2, close_scene)
    widget.ui.fuseButton.click()
    assert seen["running"] == "Cancel"
    assert outputs(h) == [], widget.ui.statusLabel.text          # nothing in the new scene
    status = widget.ui.statusLabel.text
    assert status.startswith("Cancelled: the scene was closed"), status
    assert "nothing was written" in status
    assert widget.ui.fuseButton.text == "Fuse" and widget.ui.inputsCollapsibleButton.enabled
    # the panel works in the next scene
    widget2_anatomical, widget2_functional = phantom(h)
    widget.ui.anatomicalSelector.setCurrentNode(widget2_anatomical)
    widget.ui.functionalSelector.setCurrentNode(widget2_functional)
    widget._parameterNode.method, widget._parameterNode.computeMetrics = "average", False
    widget.ui.fuseButton.click()
    assert len(h.nodes("vtkMRMLVectorVolumeNode")) == 1, widget.ui.statusLabel.text
    assert widget.ui.statusLabel.text.startswith("Done")


@pytest.mark.parametrize("role", ["functional", "anatomical"])
@parametrize_versions
def test_deleting_an_input_during_a_fusion_cancels_it(harness, role):
    h = harness
    widget, anatomical, functional = ready_panel(h)
    node = functional if role == "functional" else anatomical
    name = node.GetName()
    before = [n for n in h.node_ids() if n != node.GetID()]
    h.app.after_process_events(2, lambda: h.scene.RemoveNode(node))   # Data module: Delete
    widget.ui.fuseButton.click()
    assert outputs(h) == [], widget.ui.statusLabel.text
    assert all(i in before for i in h.node_ids())                     # nothing created
    status = widget.ui.statusLabel.text
    assert status.startswith(f"Cancelled: the {role} volume '{name}' was removed; nothing was written."), status
    assert widget.ui.fuseButton.text == "Fuse"


@parametrize_versions
def test_deleting_the_functionals_parent_transform_during_a_fusion_cancels_it(harness):
    h = harness
    widget, anatomical, functional = ready_panel(h)
    transform = functional.GetParentTransformNode()
    assert transform is not None                        # the phantom PET sits under a transform
    h.app.after_process_events(2, lambda: h.scene.RemoveNode(transform))
    widget.ui.fuseButton.click()
    assert outputs(h) == []
    assert "parent transform of the functional volume" in widget.ui.statusLabel.text


@parametrize_versions
def test_user_input_waits_while_the_result_is_written(harness):
    """After its last cancel check the run only repaints (qt.QEventLoop.ExcludeUserInputEvents), so
    a scene close or a deletion clicked then comes after the run, never between the nodes it writes."""
    h = harness
    widget, anatomical, functional = ready_panel(h, method="average")
    import qt  # noqa: PLC0415  (the harness's)

    calls = []
    original = h.app.processEvents

    def spy(*args):
        if widget._running:
            calls.append(bool(args and int(args[0]) & qt.QEventLoop.ExcludeUserInputEvents))
        original(*args)

    h.app.processEvents = spy
    fuse(widget)
    assert False in calls                                   # clicks are taken in the cancel checks
    last_user_input = len(calls) - 1 - calls[::-1].index(False)
    assert calls[last_user_input + 1:] and all(calls[last_user_input + 1:])   # writing: repaint only


# --------------------------------------------------------------------------------------------------
# deleting the selected node (qMRMLNodeComboBox)


@parametrize_versions
def test_the_node_selector_selects_the_next_node_when_the_current_one_is_deleted(harness):
    """qMRMLNodeComboBox + QComboBox: the row that took the removed one's place, else the last row
    (see qt_standins.qMRMLNodeComboBox for the source lines); nothing when no node is left."""
    h = harness
    widget = h.widget()
    selector = widget.ui.functionalSelector
    volumes = []
    for name in ("A", "B", "C"):
        node = h.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        h.slicer.util.updateVolumeFromArray(node, np.zeros((2, 2, 2), np.float32))
        volumes.append(node)
    a, b, c = volumes
    selector.setCurrentNode(b)
    h.scene.RemoveNode(b)
    assert selector.currentNode() is c
    h.scene.RemoveNode(c)                   # the last one: the one before it
    assert selector.currentNode() is a
    assert widget._parameterNode.functionalVolume is a        # the GUI connector follows the selector
    h.scene.RemoveNode(a)
    assert selector.currentNode() is None
    # a selector with "None" and action items ("Create new volume")
    out = widget.ui.outputVolumeSelector
    fused = h.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "old result")
    out.setCurrentNode(fused)
    h.scene.RemoveNode(fused)
    assert out.currentNode() is None


@parametrize_versions
def test_after_a_fusion_deleting_the_pet_does_not_leave_the_fused_volume_as_a_fusable_input(harness):
    """Deleting the PET makes the functional selector pick the next volume, here the fused RGB
    result: Fuse is then refused with a reason, as fusing a fused image would add the anatomy twice."""
    h = harness
    widget, anatomical, functional = ready_panel(h, method="average")
    widget.ui.fuseButton.click()
    fused = h.nodes("vtkMRMLVectorVolumeNode")
    assert len(fused) == 1, widget.ui.statusLabel.text
    h.scene.RemoveNode(functional)
    assert widget._parameterNode.functionalVolume is fused[0]       # what the real selector does
    assert not widget.ui.fuseButton.enabled
    assert "MedicalFusion result" in widget.ui.fuseButton.toolTip
    assert "MedicalFusion result" in widget.ui.statusLabel.text
    # the console path refuses it too
    from MedicalFusionLib.errors import FusionError  # noqa: PLC0415
    from MedicalFusionLib.pipeline import FusionOptions  # noqa: PLC0415
    from MedicalFusionLib.scene import fuse_nodes  # noqa: PLC0415

    with pytest.raises(FusionError, match="MedicalFusion result"):
        fuse_nodes(h.scene, anatomical, fused[0], FusionOptions(method="average", compute_metrics=False))


# --------------------------------------------------------------------------------------------------
# saved scenes with their data


@pytest.mark.parametrize("version", VERSIONS)
def test_a_scene_saved_as_mrb_opens_in_a_fresh_slicer_with_the_fused_volume_table_and_settings(version, tmp_path):
    bundle = tmp_path / "fused.mrb"
    with sh.opened(version, tmp_path / "cache1") as h:
        widget, anatomical, functional = ready_panel(h, method="average", metrics=True)
        widget._parameterNode.axis = "coronal"
        fuse(widget)
        fused = h.nodes("vtkMRMLVectorVolumeNode")[0]
        table = h.nodes("vtkMRMLTableNode")[0]
        from MedicalFusionLib.scene import ijk_to_ras  # noqa: PLC0415

        saved = {"rgb": h.slicer.util.arrayFromVolume(fused).copy(), "ijk_to_ras": ijk_to_ras(fused),
                 "pet": h.slicer.util.arrayFromVolume(functional).copy(), "pet_ijk_to_ras": ijk_to_ras(functional),
                 "name": fused.GetName(),
                 "attributes": {k: fused.GetAttribute(k) for k in fused.GetAttributeNames()},
                 "rows": [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())]
                          for r in range(table.GetNumberOfRows())],
                 "pet_transform": functional.GetParentTransformNode().GetName(),
                 "column_types": [table.GetColumnType(table.GetColumnName(c)) for c in range(table.GetNumberOfColumns())],
                 "table_attributes": {k: table.GetAttribute(k) for k in table.GetAttributeNames()}}
        h.save_scene_bundle(bundle)
    assert bundle.is_file()

    with sh.opened(version, tmp_path / "cache2") as h:     # a fresh Slicer
        from MedicalFusionLib.scene import ijk_to_ras  # noqa: PLC0415

        assert h.open_scene_bundle(bundle)
        fused = [n for n in h.nodes("vtkMRMLVectorVolumeNode") if n.GetName() == saved["name"]]
        assert len(fused) == 1
        fused = fused[0]
        storage = fused.GetStorageNode()
        assert storage is not None and storage.GetFileName().endswith(".nrrd"), storage
        assert same_voxels_in_space(saved["rgb"], saved["ijk_to_ras"], h.slicer.util.arrayFromVolume(fused), ijk_to_ras(fused))
        assert {k: fused.GetAttribute(k) for k in fused.GetAttributeNames()} == saved["attributes"]
        table = h.nodes("vtkMRMLTableNode")[0]
        rows = [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())]
                for r in range(table.GetNumberOfRows())]
        assert rows == saved["rows"]
        assert [table.GetColumnType(table.GetColumnName(c)) for c in range(table.GetNumberOfColumns())] == \
            saved["column_types"]                                 # numbers stay numbers (the .schema.tsv)
        assert {k: table.GetAttribute(k) for k in table.GetAttributeNames()} == saved["table_attributes"]
        widget = h.widget()
        p = widget._parameterNode
        assert (p.method, p.axis, p.computeMetrics) == ("average", "coronal", True)
        assert p.functionalVolume is not None and p.functionalVolume.GetParentTransformNode().GetName() == saved["pet_transform"]
        assert same_voxels_in_space(saved["pet"], saved["pet_ijk_to_ras"], h.slicer.util.arrayFromVolume(p.functionalVolume),
                                    ijk_to_ras(p.functionalVolume))
        # the fused volume is still on the anatomical's grid (both read back the same way)
        assert np.allclose(ijk_to_ras(fused), ijk_to_ras(p.anatomicalVolume))
        assert widget.ui.fuseButton.enabled, widget.ui.fuseButton.toolTip
        shn = h.slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(h.scene)
        assert shn.GetItemParent(shn.GetItemByDataNode(fused)) == shn.GetItemParent(shn.GetItemByDataNode(p.anatomicalVolume))
        # and fuses again in the opened scene: the same result
        fuse(widget)
        again = [n for n in h.nodes("vtkMRMLVectorVolumeNode") if n is not fused]
        assert len(again) == 1
        assert same_voxels_in_space(saved["rgb"], saved["ijk_to_ras"], h.slicer.util.arrayFromVolume(again[0]),
                                    ijk_to_ras(again[0]))


@pytest.mark.parametrize("version", VERSIONS)
def test_a_legend_read_from_a_saved_scene_goes_with_its_volume(version, tmp_path):
    """A .mrb opened before any fusion in it: removing the fused volume removes its colour legend
    (the panel watches the scene it imports; scene.watch_legends)."""
    bundle = tmp_path / "fused.mrb"
    with sh.opened(version, tmp_path / "cache1") as h:
        widget, _anatomical, _functional = ready_panel(h, method="average", metrics=False)
        fuse(widget)
        assert len(h.nodes("vtkMRMLColorLegendDisplayNode")) == 1
        h.save_scene_bundle(bundle)
    with sh.opened(version, tmp_path / "cache2") as h:     # a fresh Slicer, panel open
        h.widget()
        assert h.open_scene_bundle(bundle)
        assert len(h.nodes("vtkMRMLColorLegendDisplayNode")) == 1
        h.scene.RemoveNode(h.nodes("vtkMRMLVectorVolumeNode")[0])
        assert h.nodes("vtkMRMLColorLegendDisplayNode") == []
        from MedicalFusionLib.scene import LEGEND_PART  # noqa: PLC0415

        assert not [n for n in h.nodes("vtkMRMLScalarVolumeDisplayNode") if n.GetAttribute(LEGEND_PART)]
