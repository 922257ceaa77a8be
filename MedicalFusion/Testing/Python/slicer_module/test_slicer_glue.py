"""The module file as Slicer's thin glue, on 3D Slicer's own Python layer (slicer_harness.py): what moved
out of MedicalFusion.py still reaches the user the way it did.

- the panel's texts that live in the core (MedicalFusionLib/panel.py: method tooltips, status lines) go
  through Slicer's translation, in the context Slicer's translation tools give them
  (``MedicalFusionLib.panel``), and a translation that loses a placeholder is not used;
- ``MedicalFusion.loadSample()`` (the Python console's way to the demo pair, docs/SLICER.md) loads the
  pair and selects it in the module;
- developer mode's Reload reads MedicalFusionSlicer again (the self-test's tests live there), so Reload
  and Test runs what is in the files now. (That ctest's loader runs each self-test once, inherited by
  MedicalFusionTest from a class that is no TestCase: test_slicer_module.py.)

Skipped, with the reason, where the harness is (see test_slicer_module.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]          # Testing/Python: the harness beside conftest
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import slicer_harness as sh  # noqa: E402
from MedicalFusionLib.sample import SAMPLE_NODE_NAMES  # noqa: E402

PANEL_CONTEXT = "MedicalFusionLib.panel"


def _translating(h, translations: dict) -> None:
    """Slicer's application translating ``(context, text)`` pairs as ``translations`` says (others as is),
    and recording every request as the harness does."""
    def translate(context, text):
        h.app.translations.append((context, text))
        return translations.get((context, text), text)

    h.app.translate = translate


@sh.parametrize_versions
def test_core_panel_texts_are_translated_in_their_context(harness):
    h = harness
    tooltip = "{description}\nReference: {reference}"
    _translating(h, {(PANEL_CONTEXT, tooltip): "{description}\nRéférence : {reference}",
                     (PANEL_CONTEXT, "Fusing with '{method}'..."): "Fusion avec '{methode}'..."})  # broken
    widget = h.widget()
    box = widget.ui.methodComboBox
    tips = [box.itemData(i, 3) for i in range(box.count)]
    assert tips and all("\nRéférence : " in tip for tip in tips), tips[:2]
    assert (PANEL_CONTEXT, tooltip) in h.app.translations
    # a translation whose placeholders differ from the text's is not used: the English status line
    from MedicalFusionLib import panel  # noqa: PLC0415

    p = widget._parameterNode
    p.registerFirst, p.method = False, "lp"
    assert panel.running_message(p) == "Fusing with 'lp'..."
    assert (PANEL_CONTEXT, "Fusing with '{method}'...") in h.app.translations


@sh.parametrize_versions
def test_load_sample_from_the_python_console_selects_the_pair(harness):
    h = harness
    anatomical, functional = h.module.loadSample()
    assert (anatomical.GetName(), functional.GetName()) == SAMPLE_NODE_NAMES
    p = h.module.MedicalFusionLogic().getParameterNode()
    assert (p.anatomicalVolume, p.functionalVolume) == (anatomical, functional)
    assert functional.GetDisplayNode().GetColorNodeID().endswith("PET-Heat")
    assert h.callback_errors == [], h.callback_errors


@sh.parametrize_versions
def test_reload_reads_the_slicer_side_package_again(harness):
    h = harness
    old_tests = h.module.MedicalFusionTest.__mro__[1]
    old_reader = h.module.MedicalFusionFileReader.__mro__[1]
    h.widget().onReload()
    module = sys.modules["MedicalFusion"]                  # read again (5.8: same object, main: a new one)
    tests = sys.modules["MedicalFusionSlicer.self_test"].MedicalFusionSelfTests
    assert module.MedicalFusionTest.__mro__[1] is tests and tests is not old_tests
    reader = sys.modules["MedicalFusionSlicer.sample_data"].SampleFileReader
    assert module.MedicalFusionFileReader.__mro__[1] is reader and reader is not old_reader
    assert h.callback_errors == [], h.callback_errors
