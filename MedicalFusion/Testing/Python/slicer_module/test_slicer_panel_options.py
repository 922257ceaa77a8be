"""The panel's choices beyond the inputs, run on 3D Slicer's own Python layer through the headless
harness (slicer_harness.py; skipped with its reason when ../shared/slicer-python or slicer-core is
missing): the window presets next to 'As displayed' (bound to the parameter node, saved with the
scene, what they choose reaches the fusion and wins over the display window) and the 'Metric set'
(quick, the default: every metric but FMI, or all; enabled only with 'Compute metrics'; what it chooses is what
the metrics table holds)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]          # Testing/Python: the harness beside conftest
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import slicer_harness as sh  # noqa: E402

VERSIONS = sh.version_params()


@pytest.fixture
def harness(request, tmp_path_factory):
    with sh.opened(request.param, tmp_path_factory.mktemp("slicer-cache")) as h:
        yield h


def _panel_with_ct_pair(h):
    """The panel with the phantom pair selected (method 'average', no metrics), the anatomical
    marked as a CT the way Slicer's DICOM module marks one. Returns (ui, parameter node, anatomical)."""
    from MedicalFusionLib.scene import add_phantom_pair

    widget = h.widget()
    ui, p = widget.ui, widget._parameterNode
    anatomical, functional = add_phantom_pair(h.scene)
    shn = h.slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(h.scene)
    shn.SetItemAttribute(shn.GetItemByDataNode(anatomical), "DICOM.Modality", "CT")
    ui.anatomicalSelector.setCurrentNode(anatomical)
    ui.functionalSelector.setCurrentNode(functional)
    p.method, p.computeMetrics = "average", False
    return ui, p, anatomical


@pytest.mark.parametrize("harness", VERSIONS, indirect=True)
def test_preset_boxes_list_the_presets_and_are_saved_with_the_scene(harness, tmp_path):
    h = harness
    widget = h.widget()
    ui, p = widget.ui, widget._parameterNode
    from MedicalFusionLib import windows

    anatomical = [ui.anatomicalWindowPresetComboBox.itemText(i) for i in range(ui.anatomicalWindowPresetComboBox.count)]
    functional = [ui.functionalWindowPresetComboBox.itemText(i) for i in range(ui.functionalWindowPresetComboBox.count)]
    assert anatomical[0] == functional[0] == h.module.NO_PRESET
    assert set(anatomical[1:]) == {n for n in windows.preset_names() if n.startswith("ct-")}
    assert set(functional[1:]) == set(windows.preset_names())
    assert (p.anatomicalWindowPreset, p.functionalWindowPreset) == (h.module.NO_PRESET, h.module.NO_PRESET)
    ui.anatomicalWindowPresetComboBox.currentIndex = ui.anatomicalWindowPresetComboBox.findText("ct-bone")
    ui.functionalWindowPresetComboBox.currentIndex = ui.functionalWindowPresetComboBox.findText("pet-suv-0-20")
    assert (p.anatomicalWindowPreset, p.functionalWindowPreset) == ("ct-bone", "pet-suv-0-20")
    h.save_scene(tmp_path / "scene.mrml")
    h.scene.Clear(0)
    assert h.import_scene(tmp_path / "scene.mrml")
    q = h.module.MedicalFusionLogic().getParameterNode()
    assert (q.anatomicalWindowPreset, q.functionalWindowPreset) == ("ct-bone", "pet-suv-0-20")


@pytest.mark.parametrize("harness", VERSIONS, indirect=True)
def test_presets_win_over_as_displayed_and_reach_the_fusion(harness):
    h = harness
    ui, p, _ = _panel_with_ct_pair(h)
    assert p.useDisplayWindow and ui.functionalWindowPresetComboBox.enabled
    ui.anatomicalWindowPresetComboBox.currentIndex = ui.anatomicalWindowPresetComboBox.findText("ct-bone")
    ui.functionalWindowPresetComboBox.currentIndex = ui.functionalWindowPresetComboBox.findText("pet-suv-0-5")
    ui.useDisplayWindowCheckBox.click()                 # typing is off while a functional preset is chosen
    assert not ui.functionalWindowMinSpinBox.enabled and not ui.functionalWindowMaxSpinBox.enabled
    ui.useDisplayWindowCheckBox.click()                 # 'As displayed' back on: the presets still win

    ui.fuseButton.click()

    fused = h.nodes("vtkMRMLVectorVolumeNode")
    assert len(fused) == 1, ui.statusLabel.text
    attr = fused[0].GetAttribute
    assert attr("MedicalFusion.anatomical_window") == str((-100.0, 900.0))
    assert "ct-bone" in attr("MedicalFusion.anatomical_window_source")
    assert attr("MedicalFusion.functional_window") == str((0.0, 5.0))
    assert attr("MedicalFusion.anatomical_units") == "HU"       # DICOM.Modality CT on its subject hierarchy item


@pytest.mark.parametrize("harness", VERSIONS, indirect=True)
def test_no_preset_keeps_as_displayed_and_the_ct_default_without_it(harness):
    h = harness
    ui, p, anatomical = _panel_with_ct_pair(h)
    display = anatomical.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1600.0)
    ui.fuseButton.click()
    first = h.nodes("vtkMRMLVectorVolumeNode")[-1]
    assert first.GetAttribute("MedicalFusion.anatomical_window_source").startswith("as displayed")
    ui.useDisplayWindowCheckBox.click()                 # windows not as displayed: the CT default
    p.functionalWindowMin, p.functionalWindowMax = 0.0, 12.0
    ui.fuseButton.click()
    second = [n for n in h.nodes("vtkMRMLVectorVolumeNode") if n is not first]
    assert len(second) == 1, ui.statusLabel.text
    assert second[0].GetAttribute("MedicalFusion.anatomical_window") == str((-135.0, 215.0))
    assert "ct-soft-tissue" in second[0].GetAttribute("MedicalFusion.anatomical_window_source")


# the metric set


def _table(node) -> dict[str, float]:
    """metric -> mean, from the metrics table node's first two columns."""
    table = node.GetTable()
    return {table.GetValue(r, 0).ToString(): float(table.GetValue(r, 1).ToString())
            for r in range(table.GetNumberOfRows())}


@pytest.mark.parametrize("harness", VERSIONS, indirect=True)
def test_metric_set_box_is_bound_saved_and_follows_compute_metrics(harness, tmp_path):
    h = harness
    from MedicalFusionLib.metrics import METRIC_SETS

    widget = h.widget()
    ui, p = widget.ui, widget._parameterNode
    assert tuple(METRIC_SETS) == h.module.METRIC_SET_CHOICES          # the options module's names agree
    box = ui.metricSetComboBox
    # issue 21: the quick set (every metric but FMI) is the default; 'all' adds FMI
    assert [box.itemText(i) for i in range(box.count)] == list(METRIC_SETS) and p.metricSet == "quick"
    assert box.currentText == "quick"
    box.currentIndex = box.findText("all")
    assert p.metricSet == "all"
    from MedicalFusionLib.scene import add_phantom_pair

    anatomical, functional = add_phantom_pair(h.scene)
    ui.anatomicalSelector.setCurrentNode(anatomical)
    ui.functionalSelector.setCurrentNode(functional)
    assert box.enabled
    ui.computeMetricsCheckBox.click()                                   # no metrics: nothing to choose
    assert not p.computeMetrics and not box.enabled
    ui.computeMetricsCheckBox.click()
    assert box.enabled
    h.save_scene(tmp_path / "scene.mrml")
    h.scene.Clear(0)
    assert h.import_scene(tmp_path / "scene.mrml")
    assert h.module.MedicalFusionLogic().getParameterNode().metricSet == "all"


@pytest.mark.parametrize("harness", VERSIONS, indirect=True)
def test_quick_set_leaves_out_fmi_and_keeps_the_other_values(harness):
    h = harness
    from MedicalFusionLib.metrics import METRIC_SETS
    from MedicalFusionLib.scene import add_phantom_pair

    widget = h.widget()
    ui, p = widget.ui, widget._parameterNode
    anatomical, functional = add_phantom_pair(h.scene)
    ui.anatomicalSelector.setCurrentNode(anatomical)
    ui.functionalSelector.setCurrentNode(functional)
    p.method = "average"
    tables = []
    for name in ("all", "quick"):
        p.metricSet = name
        ui.fuseButton.click()
        new = [t for t in h.nodes("vtkMRMLTableNode") if t not in tables]
        assert len(new) == 1, ui.statusLabel.text
        tables += new
    full, quick = (_table(t) for t in tables)
    # each set's luma metrics in order, then the same colour-fidelity rows (issue 18)
    n_all, n_quick = len(METRIC_SETS["all"]), len(METRIC_SETS["quick"])
    assert list(full)[:n_all] == METRIC_SETS["all"] and list(quick)[:n_quick] == METRIC_SETS["quick"]
    assert list(full)[n_all:] == list(quick)[n_quick:]
    assert not [k for k in quick if k.startswith("FMI")] and "FMI_pixel" in full
    assert all(quick[k] == pytest.approx(full[k], rel=1e-9, abs=1e-12) for k in quick)
