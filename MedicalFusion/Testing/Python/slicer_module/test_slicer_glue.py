"""The module file as Slicer's thin glue, on 3D Slicer's own Python layer (slicer_harness.py): what moved
out of MedicalFusion.py still reaches the user the way it did.

- the panel's texts that live in the core (MedicalFusionLib/panel.py: method tooltips, status lines) go
  through Slicer's translation, in the context Slicer's translation tools give them
  (``MedicalFusionLib.panel``), and a translation that loses a placeholder is not used;
- ``MedicalFusion.loadSample()`` (the Python console's way to the demo pair, docs/SLICER.md) loads the
  pair and selects it in the module;
- ctest's loader runs every self-test once (the tests live in MedicalFusionSlicer/self_test.py, in a
  class that is no TestCase, and MedicalFusionTest inherits them); developer mode's Reload reads that
  package again, so Reload and Test runs what is in the files now.

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
def test_ctest_runs_each_self_test_once(harness):
    import test_slicer_module as tsm  # noqa: PLC0415

    result = tsm.run_ctest_style(harness)
    assert result["succeeded"], result["output"]
    for name in tsm.SELF_TESTS:
        runs = [line for line in result["output"].splitlines() if line.startswith(name + " (")]
        assert len(runs) == 1, (name, runs)
    # and one more: ScriptedLoadableModuleTest, imported into the module file as Slicer's template does,
    # is a TestCase the loader collects too (its runTest() finds no test_* of its own and returns)
    assert f"Ran {len(tsm.SELF_TESTS) + 1} tests" in result["output"], result["output"]


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
