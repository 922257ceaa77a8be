"""The fused volume's colour legend (scene.add_colour_legend) on slicer-core's real MRML scene.

Checked on the nodes (the legend is a display node of the fused volume, its primary display node
holds the functional's colour node and the run's window, its title the units) and through the
Colors module's own displayable manager (vtkMRMLColorLegendDisplayableManager) attached to a slice
view: the scalar bar actor Slicer would draw has the map's colours over lo..hi and the units, and it
shows only while the fused volume is in that view. Reruns and removals must not leave legends behind.
"""
from __future__ import annotations

import numpy as np
import pytest

from slicer_core_required import slicer_and_vtk  # noqa: E402

slicer, vtk = slicer_and_vtk()

from dicom_series import BQML_FIELDS, RADIOPHARMACEUTICAL, write_series  # noqa: E402
from MedicalFusionLib import colour  # noqa: E402
from MedicalFusionLib import scene as fscene  # noqa: E402
from MedicalFusionLib.pipeline import FusionOptions  # noqa: E402

PET_HEAT = "vtkMRMLPETProceduralColorNodePET-Heat"
FAST = dict(method="alpha", compute_metrics=False)


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()   # Slicer's colour nodes (PET-Heat, Grey, ...)
    colors.SetMRMLScene(s)
    yield s
    colors.SetMRMLScene(None)
    s.Clear(1)


class SliceView:
    """One slice view ('Red') with the Colors module's legend displayable manager, no rendering."""

    def __init__(self, scene):
        self.app = slicer.vtkMRMLApplicationLogic()
        self.app.SetMRMLScene(scene)
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(self.app)
        self.logic.SetMRMLScene(scene)
        self.node = self.logic.AddSliceNode("Red")
        logics = vtk.vtkCollection()
        logics.AddItem(self.logic)
        self.app.SetSliceLogics(logics)
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(self.app)
        if not factory.IsDisplayableManagerRegistered("vtkMRMLColorLegendDisplayableManager"):
            factory.RegisterDisplayableManager("vtkMRMLColorLegendDisplayableManager")
        self.renderer = vtk.vtkRenderer()
        self.window = vtk.vtkGenericOpenGLRenderWindow()   # never rendered: no OpenGL context needed
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkGenericRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.group = factory.InstantiateDisplayableManagers(self.renderer)
        self.group.SetMRMLDisplayableNode(self.node)
        self.manager = self.group.GetDisplayableManagerByClassName("vtkMRMLColorLegendDisplayableManager")

    def show(self, background, legend):
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(background.GetID() if background else None)
        legend.Modified()                       # what a render request would do in the application
        return self.manager.GetColorLegendActor(legend)


def lut_table(lut) -> np.ndarray:
    return np.array([lut.GetTableValue(i)[:3] for i in range(lut.GetNumberOfTableValues())])


def our_parts(scene) -> dict:
    out = {}
    for cls in ("vtkMRMLColorLegendDisplayNode", "vtkMRMLScalarVolumeDisplayNode", "vtkMRMLColorTableNode"):
        for i in range(scene.GetNumberOfNodesByClass(cls)):
            node = scene.GetNthNodeByClass(i, cls)
            part = node.GetAttribute(fscene.LEGEND_PART)
            if part:
                out.setdefault(part, []).append(node.GetID())
    return out


def phantom(scene, units="SUVbw"):
    anatomical, functional = fscene.add_phantom_pair(scene)
    if units:
        functional.SetAttribute("MedicalFusion.units", units)
    return anatomical, functional


# ------------------------------------------------------------------------------------------------


def test_fused_volume_gets_a_legend_with_the_functional_map_window_and_units(scene):
    view = SliceView(scene)
    anatomical, functional = phantom(scene)
    out = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST))
    volume, legend = out.volume_node, out.legend_node
    lo, hi = out.result.prepared.functional_window
    assert legend is not None and fscene.colour_legend(volume) is legend
    assert legend.IsA("vtkMRMLColorLegendDisplayNode") and legend.GetDisplayableNode() is volume
    assert legend.GetVisibility() and legend.GetVisibility2D()
    assert legend.GetTitleText() == "Phantom PET [SUVbw]"
    # the slice views still draw the RGB voxels through the volume's own (first) display node
    assert volume.GetDisplayNode().IsA("vtkMRMLVectorVolumeDisplayNode")
    primary = legend.GetPrimaryDisplayNode()
    assert primary.IsA("vtkMRMLScalarVolumeDisplayNode") and primary.GetDisplayableNode() is volume
    assert primary.GetColorNodeID() == PET_HEAT == legend.GetColorNodeID()
    assert (primary.GetLevel() - primary.GetWindow() / 2, primary.GetLevel() + primary.GetWindow() / 2) \
        == pytest.approx((lo, hi))
    np.testing.assert_allclose(lut_table(primary.GetColorNode().GetLookupTable()),
                               colour.colormap_table("PET-Heat"), atol=1 / 255)
    assert legend.GetID() not in out.created_node_ids        # display nodes get no subject hierarchy item

    # what Slicer draws in a slice view showing the fused volume
    actor = view.show(volume, legend)
    assert actor.GetVisibility()
    # the slice layer still shows the voxels through the RGB display node, not the legend's range node
    shown_with = view.logic.GetBackgroundLayer().GetVolumeDisplayNode()    # the layer's copy of it
    assert shown_with.IsA("vtkMRMLVectorVolumeDisplayNode") and shown_with.GetColorNodeID() != PET_HEAT
    assert actor.GetTitle() == "Phantom PET [SUVbw]"
    assert actor.GetLookupTable().GetTableRange() == pytest.approx((lo, hi))
    np.testing.assert_allclose(lut_table(actor.GetLookupTable()), colour.colormap_table("PET-Heat"), atol=1 / 255)
    assert actor.GetLabelFormat() == legend.GetLabelFormat() and actor.GetNumberOfLabels() == 5
    # and not in a view that does not show it
    assert not view.show(anatomical, legend).GetVisibility()


def test_rerun_into_the_same_output_replaces_the_legend_and_keeps_its_place(scene):
    anatomical, functional = phantom(scene)
    first = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST))
    first.legend_node.SetPosition(0.1, 0.2)
    first.legend_node.SetOrientation(slicer.vtkMRMLColorLegendDisplayNode.Horizontal)
    for window in ((0.0, 5.0), (1.0, 8.0)):
        again = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST, functional_window=window),
                                  output_volume=first.volume_node)
        parts = our_parts(scene)
        assert [len(parts.get(p, [])) for p in ("legend", "range")] == [1, 1], parts
        assert fscene.colour_legend(first.volume_node) is again.legend_node
        primary = again.legend_node.GetPrimaryDisplayNode()
        assert (primary.GetLevel() - primary.GetWindow() / 2, primary.GetLevel() + primary.GetWindow() / 2) \
            == pytest.approx(window)
        assert again.legend_node.GetPosition()[:2] == pytest.approx((0.1, 0.2))
        assert again.legend_node.GetOrientation() == slicer.vtkMRMLColorLegendDisplayNode.Horizontal
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode") == 1


def test_removing_the_fused_volume_removes_its_legend_and_nothing_else(scene):
    anatomical, functional = phantom(scene)
    slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(functional)      # the user's own legend
    out = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST))
    other = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST))
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode") == 3
    scene.RemoveNode(out.volume_node)
    parts = our_parts(scene)
    assert parts["legend"] == [other.legend_node.GetID()] and len(parts["range"]) == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode") == 2
    assert slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(functional) is not None
    # removing only the legend takes its range node with it
    scene.RemoveNode(other.legend_node)
    assert our_parts(scene) == {}
    assert other.volume_node.GetScene() is scene and other.volume_node.GetNumberOfDisplayNodes() == 1


def test_no_legend_for_grayscale_fusion_and_a_stale_one_is_removed(scene):
    anatomical, functional = phantom(scene)
    out = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST))
    assert out.legend_node is not None
    grey = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST, colormap="Grey"),
                             output_volume=out.volume_node)
    assert grey.legend_node is None and fscene.colour_legend(out.volume_node) is None
    assert our_parts(scene) == {}
    alone = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST, colormap="Grey"))
    assert alone.legend_node is None and alone.volume_node.GetNumberOfDisplayNodes() == 1


def test_no_legend_for_an_rgb_functional(scene):
    anatomical, _ = phantom(scene)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "RGB PET")
    arr = np.zeros((40, 72, 64, 3), np.uint8)
    arr[10:30, 20:50, 20:40] = (255, 128, 0)
    slicer.util.updateVolumeFromArray(rgb, arr)
    rgb.CopyOrientation(anatomical)
    rgb.CreateDefaultDisplayNodes()
    out = fscene.fuse_nodes(scene, anatomical, rgb, FusionOptions(**FAST))
    assert out.legend_node is None and our_parts(scene) == {}


def test_a_colour_node_outside_slicers_list_is_kept_as_the_run_used_it(scene):
    anatomical, functional = phantom(scene, units="")
    own = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "my map")
    own.SetTypeToUser()
    own.SetNumberOfColors(64)
    table = np.stack([np.linspace(0, 1, 64), np.linspace(1, 0, 64), np.full(64, 0.5)], axis=1)
    for i, (r, g, b) in enumerate(table):
        own.SetColor(i, str(i), r, g, b, 1.0)
    functional.GetDisplayNode().SetAndObserveColorNodeID(own.GetID())
    out = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST))
    legend = out.legend_node
    assert legend.GetTitleText() == "Phantom PET (units unknown)"
    copy = legend.GetPrimaryDisplayNode().GetColorNode()
    assert copy.GetID() != own.GetID() and copy.GetAttribute(fscene.LEGEND_PART) == "colours"
    np.testing.assert_allclose(lut_table(copy.GetLookupTable()), table, atol=0.5 / 255)   # 8-bit table
    own.SetColor(0, "0", 0.0, 0.0, 1.0, 1.0)           # editing the user's map later
    np.testing.assert_allclose(lut_table(copy.GetLookupTable())[0], table[0], atol=0.5 / 255)
    scene.RemoveNode(out.volume_node)
    assert our_parts(scene) == {} and scene.GetNodeByID(own.GetID()) is own


def test_suv_from_the_dicom_header_is_the_legend_unit(scene, tmp_path):
    """A PET series in Bq/ml with the SUV fields, loaded as the panel's DICOM path loads it."""
    rng = np.random.default_rng(3)
    ct = rng.integers(-1000, 400, size=(6, 24, 20)).astype(np.int16)
    pet = rng.integers(0, 3000, size=(6, 24, 20)).astype(np.int16)
    write_series(tmp_path / "ct", ct, modality="CT", fields={"RescaleType": "HU"})
    write_series(tmp_path / "pet", pet, fields=BQML_FIELDS, radiopharmaceutical=RADIOPHARMACEUTICAL)
    ct_node = fscene.load_dicom_volume(scene, tmp_path / "ct", "CT")
    pet_node = fscene.load_dicom_volume(scene, tmp_path / "pet", "PET")
    out = fscene.fuse_nodes(scene, ct_node, pet_node, FusionOptions(**FAST))
    legend = out.legend_node
    assert legend.GetTitleText() == "PET [SUVbw]"
    dn = pet_node.GetDisplayNode()
    primary = legend.GetPrimaryDisplayNode()
    assert primary.GetWindow() == pytest.approx(dn.GetWindow()) and primary.GetLevel() == pytest.approx(dn.GetLevel())


def test_a_failure_while_making_the_legend_leaves_the_scene_as_it_was(scene, monkeypatch):
    anatomical, functional = phantom(scene)
    first = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST))
    state = [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetClassName()) for i in range(scene.GetNumberOfNodes())]

    def fail(_scene):              # called once the new legend's nodes exist, before the old go
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fscene, "watch_legends", fail)
    for output in (None, first.volume_node):
        with pytest.raises(RuntimeError, match="out of memory"):
            fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST, colormap="Rainbow"),
                              output_volume=output)
        assert [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetClassName())
                for i in range(scene.GetNumberOfNodes())] == state
        assert fscene.colour_legend(first.volume_node) is first.legend_node


def test_a_scene_without_the_colors_module_still_gets_a_true_legend():
    """A bare scene: the legend node class is not registered and Slicer's colour nodes are absent;
    the legend is made anyway, with the shipped table copied into a colour table node."""
    bare = slicer.vtkMRMLScene()
    try:
        anatomical, functional = phantom(bare)
        out = fscene.fuse_nodes(bare, anatomical, functional, FusionOptions(**FAST, colormap="PET-Heat"))
        copy = out.legend_node.GetPrimaryDisplayNode().GetColorNode()
        assert copy.GetAttribute(fscene.LEGEND_PART) == "colours"
        np.testing.assert_allclose(lut_table(copy.GetLookupTable()), colour.colormap_table("PET-Heat"), atol=0.5 / 255)
        bare.RemoveNode(out.volume_node)
        assert our_parts(bare) == {}
    finally:
        bare.Clear(1)


def test_legends_read_back_from_a_saved_scene_go_with_their_volume(scene, tmp_path):
    """A scene saved with a fused volume and read into a new scene: the legend is read back with its
    window and colour node; once watched, removing the volume removes its legend parts."""
    anatomical, functional = phantom(scene)
    out = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(**FAST))
    lo, hi = out.result.prepared.functional_window
    scene.SetURL(str(tmp_path / "saved.mrml"))
    scene.SetRootDirectory(str(tmp_path))
    assert scene.Commit()                       # the MRML text: node properties and references
    other = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(other)
    try:
        other.SetURL(str(tmp_path / "saved.mrml"))
        assert other.Import()
        volume = other.GetFirstNodeByName(out.volume_node.GetName())
        legend = fscene.colour_legend(volume)
        primary = legend.GetPrimaryDisplayNode()
        assert legend.GetTitleText() == "Phantom PET [SUVbw]" and primary.GetColorNodeID() == PET_HEAT
        assert (primary.GetLevel() - primary.GetWindow() / 2, primary.GetLevel() + primary.GetWindow() / 2) \
            == pytest.approx((lo, hi), abs=1e-4)
        assert volume.GetDisplayNode().IsA("vtkMRMLVectorVolumeDisplayNode")
        fscene.watch_legends(other)
        other.RemoveNode(volume)
        assert our_parts(other) == {}
    finally:
        colors.SetMRMLScene(None)
        other.Clear(1)
