"""MedicalFusionLib.i18n: the core's texts through Slicer's translation inside the application, as they are
everywhere else, without importing slicer. (On Slicer's own layer: slicer_module/test_slicer_glue.py.)"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import conftest  # noqa: F401  (puts MedicalFusion/ on sys.path)
from MedicalFusionLib import i18n, install, panel

LIB = Path(panel.__file__).resolve().parent


class _App:
    def __init__(self, translations: dict):
        self.translations, self.asked = translations, []

    def translate(self, context, text):
        self.asked.append((context, text))
        return self.translations.get((context, text), text)


def test_context_is_the_one_slicers_tools_give_the_file():
    """slicer.i18n.getContext: '<package folder>.<file>' in a package, else the file name."""
    assert i18n.context_of(str(LIB / "panel.py")) == "MedicalFusionLib.panel"
    assert i18n.context_of(str(LIB / "io" / "read.py")) == "io.read"
    assert i18n.context_of(str(LIB.parent / "MedicalFusion.py")) == "MedicalFusion"   # no __init__.py there


def test_translated_inside_slicer_in_the_callers_context(monkeypatch):
    app = _App({("MedicalFusionLib.panel", "Fusing with '{method}'..."): "Fusion avec '{method}'...",
                ("MedicalFusionLib.panel", "output table"): "table de sortie"})
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=app))
    p = types.SimpleNamespace(registerFirst=False, method="lp", registration="rigid")
    assert panel.running_message(p) == "Fusion avec 'lp'..."
    table = types.SimpleNamespace(GetID=lambda: "vtkMRMLTableNode1")
    assert panel.run_node_roles(None, None, None, table) == {"vtkMRMLTableNode1": "table de sortie"}
    assert ("MedicalFusionLib.panel", "Fusing with '{method}'...") in app.asked
    assert i18n.context_of(install.__file__) == "MedicalFusionLib.install"


def test_a_translation_that_loses_a_placeholder_is_not_used(monkeypatch):
    """As slicer.i18n.tr: ``.format()`` on it would raise (or drop a value)."""
    app = _App({})
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=app))
    for broken in ("Fusion avec '{methode}'...", "Fusion avec '{method}' {extra}", "Fusion {", "Fusion sans"):
        app.translations = {("test_i18n", "Fusing with '{method}'..."): broken}
        assert i18n.tr("Fusing with '{method}'...") == "Fusing with '{method}'...", broken
    app.translations = {("test_i18n", "Done in {seconds:.1f} s"): "Fini en {seconds:.1f} s"}
    assert i18n.tr("Done in {seconds:.1f} s") == "Fini en {seconds:.1f} s"


def test_unchanged_outside_slicer_and_slicer_never_imported(monkeypatch):
    """No slicer (the command line), or slicer-core's package (no ``app``): the text as it is; the core's
    texts do not import slicer (it would pull VTK and MRML into `medicalfusion` start-up)."""
    code = ("import sys; from MedicalFusionLib import panel, i18n; "
            "assert panel.cancelled_message(None).startswith('Cancelled'); "
            "assert i18n.tr('a {b}') == 'a {b}'; "
            "assert 'slicer' not in sys.modules, 'slicer imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(LIB.parent))
    monkeypatch.setitem(sys.modules, "slicer", types.ModuleType("slicer"))    # slicer-core: MRML, no application
    assert i18n.tr("a {b}") == "a {b}"
