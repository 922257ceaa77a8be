"""The Slicer panel's Qt-free half (MedicalFusionLib/panel.py, issue 21): the options its parameter node
stands for, its one check (the options module's), and the texts it shows. Runs without Slicer: ``p`` is
a plain object with the parameter node's field names."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from MedicalFusionLib import options, panel
from MedicalFusionLib.networks.weights import WEIGHTS_ENV


class Node:
    """What panel.py reads of an MRML node: its ID, name, class and parent transform."""

    def __init__(self, node_id, cls="vtkMRMLScalarVolumeNode", parent=None, name=""):
        self.node_id, self.cls, self.parent, self.name = node_id, cls, parent, name or node_id

    def GetID(self):
        return self.node_id

    def GetName(self):
        return self.name

    def IsA(self, cls):
        return cls == self.cls

    def GetParentTransformNode(self):
        return self.parent


def params(**changes):
    """The parameter node's defaults (as MedicalFusion.py declares them), with a scalar functional."""
    values = dict(method=options.DEFAULT_METHOD, device="auto", axis="axial", computeMetrics=True,
                  metricSet=options.DEFAULT_METRIC_SET, colormap=panel.AS_DISPLAYED, useDisplayWindow=True,
                  functionalWindowMin=0.0, functionalWindowMax=1.0, anatomicalWindowPreset=panel.NO_PRESET,
                  functionalWindowPreset=panel.NO_PRESET, registerFirst=False, registration="rigid",
                  functionalVolume=Node("vtkMRMLScalarVolumeNode2"))
    values.update(changes)
    return SimpleNamespace(**values)


def test_defaults_are_the_options_defaults():
    assert panel.options_from_panel(params()) == options.FusionOptions()


def test_sentinels_and_an_rgb_functional_give_none():
    p = params(colormap="PET-Rainbow2", useDisplayWindow=False, functionalWindowMin=0.0, functionalWindowMax=9.5,
               anatomicalWindowPreset="ct-bone", method="nsct", axis="coronal", computeMetrics=False)
    o = panel.options_from_panel(p)
    assert (o.colormap, o.functional_window, o.anatomical_preset) == ("PET-Rainbow2", (0.0, 9.5), "ct-bone")
    assert (o.method, o.axis, o.compute_metrics) == ("nsct", "coronal", False)
    # a preset wins over the typed window
    o = panel.options_from_panel(params(useDisplayWindow=False, functionalWindowPreset="pet-suv-0-10"))
    assert (o.functional_window, o.functional_preset) == (None, "pet-suv-0-10")
    # an RGB functional carries its colours: no colour map, window or preset applies to it
    rgb = params(functionalVolume=Node("v", "vtkMRMLVectorVolumeNode"), colormap="PET-Heat", useDisplayWindow=False,
                 functionalWindowPreset="pet-suv-0-10")
    o = panel.options_from_panel(rgb)
    assert (o.colormap, o.functional_window, o.functional_preset) == (None, None, None)
    assert not panel.scalar_functional(rgb) and panel.scalar_functional(params())
    assert not panel.scalar_functional(params(functionalVolume=None))


def test_check_is_the_options_check_with_the_panels_names():
    assert panel.check(params()) == (True, "")
    ok, reason = panel.check(params(useDisplayWindow=False, functionalWindowMin=3.0, functionalWindowMax=3.0))
    assert not ok and reason.startswith("The functional window 3 3 is empty"), reason
    ok, reason = panel.check(params(method="no-such-method"))
    assert not ok and "unknown method 'no-such-method'" in reason
    # an RGB functional's (disabled) window boxes are not checked
    assert panel.check(params(functionalVolume=Node("v", "vtkMRMLVectorVolumeNode"), useDisplayWindow=False,
                              functionalWindowMin=3.0, functionalWindowMax=1.0)) == (True, "")


def test_method_tooltips_come_from_the_catalogue(tmp_path, monkeypatch):
    ok, tip = panel.method_tooltip("lp")
    info = options.method_info("lp")
    assert ok and tip == f"{info.description}\nReference: {info.reference}"
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))          # no weights there: the networks are greyed
    ok, tip = panel.method_tooltip("mrdfn")
    assert not ok and tip.startswith("Not available: ") and options.method_info("mrdfn").reference in tip
    assert not panel.check(params(method="mrdfn"))[0]


def test_run_node_roles_follow_the_parent_transforms():
    outer = Node("T2")
    anatomical = Node("A", parent=Node("T1", parent=outer))
    functional, table = Node("F", parent=outer), Node("Tab", "vtkMRMLTableNode")
    roles = panel.run_node_roles(anatomical, functional, None, table)
    assert roles == {"Tab": "output table", "F": "functional volume", "A": "anatomical volume",
                     "T1": "parent transform of the anatomical volume",
                     "T2": "parent transform of the anatomical volume"}


def test_status_texts():
    assert panel.dependency_notice([]) == []
    (note,) = panel.dependency_notice(["torch", "scikit-image"])
    assert note.startswith("Not installed yet: torch, scikit-image.") and "first Fuse" in note
    assert panel.running_message(params(method="lp")) == "Fusing with 'lp'..."
    assert panel.running_message(params(method="lp", registerFirst=True)) == "Registering (rigid), then fusing with 'lp'..."
    outcome = SimpleNamespace(result=SimpleNamespace(device="cpu", method="lp", seconds=1.25),
                              volume_node=Node("V", name="fused"), table_node=None, transform_node=None, info={})
    assert panel.done_message(outcome, 2.04) == "Done in 2.0 s on cpu ('lp', engine 1.2 s) -> 'fused'."
    outcome.table_node, outcome.transform_node = Node("T", name="metrics"), Node("X", name="reg")
    outcome.info = {"registration_normalized_mutual_information": "0.41", "registration_spread_centre_mm": "0.2",
                    "registration_spread_overlap_mm": "0.5", "registration_warning": "check it"}
    text = panel.done_message(outcome, 2.0)
    assert "-> 'fused' + 'metrics'. Registered: 'reg' is now the functional's parent transform" in text
    assert "information 0.41;" in text and text.endswith(" Warning: check it")


@pytest.mark.parametrize("name", options.method_names())
def test_help_lists_every_method(name):
    assert f"<li><b>{name}</b>: " in panel.methods_help()
