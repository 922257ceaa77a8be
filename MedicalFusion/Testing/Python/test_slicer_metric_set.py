"""The panel's 'Metric set' (all, or quick: every metric but FMI), run on 3D Slicer's own Python
layer through the headless harness (slicer_harness.py; skipped with its reason when
../shared/slicer-python or slicer-core is missing): bound to the parameter node, saved with the
scene, enabled only with 'Compute metrics', and what it chooses is what the metrics table holds."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import slicer_harness as sh  # noqa: E402

VERSIONS = [pytest.param(v, id=v.split("-")[0]) for v in sh.VERSIONS]


@pytest.fixture
def harness(request, tmp_path_factory):
    reason = sh.missing_reason(request.param)
    if reason:
        pytest.skip(reason)
    with sh.SlicerHarness(request.param, cache_dir=tmp_path_factory.mktemp("slicer-cache")) as h:
        yield h
        assert h.callback_errors == [], "exceptions in Slicer callbacks:\n" + "\n".join(h.callback_errors)


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
    assert tuple(METRIC_SETS) == h.module.METRIC_SET_CHOICES          # the panel's copy of the names agrees
    box = ui.metricSetComboBox
    assert [box.itemText(i) for i in range(box.count)] == list(METRIC_SETS) and p.metricSet == "all"
    box.currentIndex = box.findText("quick")
    assert p.metricSet == "quick"
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
    assert h.module.MedicalFusionLogic().getParameterNode().metricSet == "quick"


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
    assert list(full) == METRIC_SETS["all"] and list(quick) == METRIC_SETS["quick"]
    assert not [k for k in quick if k.startswith("FMI")] and "FMI_pixel" in full
    assert all(quick[k] == pytest.approx(full[k], rel=1e-9, abs=1e-12) for k in quick)
