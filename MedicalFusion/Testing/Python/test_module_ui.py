"""Static checks of the Slicer module, which cannot run outside the Slicer application.

MedicalFusion.py imports qt/ctk/ScriptedLoadableModule, so it is read with ``ast`` instead of being
imported: it must compile; every ``<widget>.ui.<name>`` it, its Slicer-side package (MedicalFusionSlicer:
the self-test) and the panel's Qt-free half (panel.control_states) use must exist in MedicalFusion.ui
with a class that has the attributes the code relies on; every field of the parameter node must be
bound to a widget (SlicerParameterName) of a class the parameter node wrapper can connect to that
field's type; the method combobox must list what the registry offers; the self-test class is where
Slicer looks for it.

Runs under pytest, and also without it (``python test_module_ui.py``, or inside Slicer through the
ctest registered in this folder's CMakeLists.txt), since Slicer's Python has no pytest.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import py_compile
import sys
import tempfile
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2]
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
MODULE_PY = MODULE_DIR / "MedicalFusion.py"
SLICER_SIDE = MODULE_DIR / "MedicalFusionSlicer"      # the module's Slicer-side package (not the core)
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedicalFusion.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "MedicalFusion.png"
PARAMETER_CLASS = "MedicalFusionParameterNode"

# Which widget classes Slicer's parameterNodeWrapper (guiConnectors.py) connects to which field types.
NODE_WIDGETS = {"qMRMLNodeComboBox"}
CONNECTABLE = {
    "node": NODE_WIDGETS,
    "bool": {"QCheckBox", "QPushButton"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "int": {"QSpinBox", "QSlider"},
    "str-choice": {"QComboBox"},
    "str": {"QLineEdit", "QTextEdit"},
}
# Attributes the Python code reads or writes on a widget, per class (to catch a class mix-up).
CLASS_OF_USE = {
    "fuseButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
    "methodComboBox": "QComboBox", "colormapComboBox": "QComboBox",
    "functionalSelector": "qMRMLNodeComboBox", "anatomicalSelector": "qMRMLNodeComboBox",
}


@functools.lru_cache(maxsize=None)
def module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"), filename=str(MODULE_PY))


@functools.lru_cache(maxsize=None)
def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui"
    widgets = {w.get("name"): w for w in root.iter("widget")}
    assert len(widgets) == len(list(root.iter("widget"))), "widget names in the .ui must be unique"
    return widgets


def parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property (stdset=0)"
            return prop.findtext("string")
    return None


def stringlist(widget: ET.Element, name: str) -> list[str]:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return [s.text for s in prop.iter("string")]
    return []


def parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Field name -> kind ('node', 'bool', 'float', 'int', 'str', 'str-choice') of the wrapper class."""
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == PARAMETER_CLASS)
    decorators = [ast.unparse(d) for d in cls.decorator_list]
    assert "parameterNodeWrapper" in decorators
    fields = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            text = ast.unparse(stmt.annotation)
            if "vtkMRML" in text:
                kind = "node"
            elif "Choice(" in text:
                kind = "str-choice"
            else:
                base = text.removeprefix("Annotated[").split(",")[0].strip("]")
                kind = base
            fields[stmt.target.id] = kind
    return fields


def used_ui_names(tree: ast.Module) -> set[str]:
    """The names of ``self.ui.<name>`` (the widget) and ``widget.ui.<name>`` (the self-test)."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id in ("self", "widget")):
            names.add(node.attr)
    return names


def slicer_side_files() -> list[Path]:
    return sorted(SLICER_SIDE.glob("*.py"))


def test_module_file_compiles():
    with tempfile.TemporaryDirectory() as tmp:
        py_compile.compile(str(MODULE_PY), cfile=str(Path(tmp) / "MedicalFusion.pyc"), doraise=True)


def test_only_the_slicer_side_imports_qt():
    """No Qt anywhere in the core; ``slicer`` imported at module level only by scene.py (a lazy
    import inside a function elsewhere keeps the package importable without Slicer); the core never
    imports the module file or its Slicer-side package (MedicalFusionSlicer, which only the module file
    imports, and which the pip package does not ship)."""
    lib = MODULE_DIR / "MedicalFusionLib"
    assert (SLICER_SIDE / "__init__.py").is_file() and slicer_side_files()
    pyproject = (MODULE_DIR.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert "MedicalFusionSlicer" not in pyproject, "the pip package is the core only"
    for path in lib.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                assert top not in ("qt", "ctk", "PythonQt"), f"{path} imports {mod}"
                assert top not in ("MedicalFusion", SLICER_SIDE.name), f"{path} imports {mod}"
                assert mod != "slicer.ScriptedLoadableModule", f"{path} imports {mod}"
                if top in ("slicer", "vtk") and id(node) in top_level:
                    assert path.name == "scene.py", f"{path} imports {mod} at module level: only scene.py may"


def test_ui_parses_and_names_the_module():
    widgets = ui_widgets()
    root = ET.parse(UI_FILE).getroot()
    assert root.findtext("class") == "MedicalFusion"
    assert widgets["MedicalFusion"].get("class") == "qMRMLWidget"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    for cls in used:
        if not cls.startswith("Q"):
            assert cls in custom, f"{cls} is used in the .ui but not declared as a custom widget"


def test_every_ui_widget_the_code_uses_exists_with_the_right_class():
    widgets = ui_widgets()
    used = used_ui_names(module_tree())
    assert used, "the widget code should use self.ui.<name>"
    missing = sorted(used - set(widgets))
    assert not missing, f"MedicalFusion.py uses widgets missing from the .ui: {missing}"
    for path in slicer_side_files():
        missing = sorted(used_ui_names(ast.parse(path.read_text(encoding="utf-8"))) - set(widgets))
        assert not missing, f"{path.name} uses widgets missing from the .ui: {missing}"
    from MedicalFusionLib import panel  # noqa: PLC0415

    states = panel.control_states(types.SimpleNamespace(    # the fields control_states reads
        functionalVolume=None, useDisplayWindow=True, functionalWindowPreset=panel.NO_PRESET, registerFirst=True,
        computeMetrics=True))
    assert states and not sorted(set(states) - set(widgets)), sorted(set(states) - set(widgets))
    for name, cls in CLASS_OF_USE.items():
        if name in used:
            assert widgets[name].get("class") == cls, f"{name} should be a {cls}"


def test_every_parameter_field_is_bound_to_a_connectable_widget():
    fields = parameter_fields(module_tree())
    assert {"anatomicalVolume", "functionalVolume", "method", "device", "axis", "outputVolume", "outputTable",
            "computeMetrics", "colormap"} <= set(fields)
    bound = {}
    for name, widget in ui_widgets().items():
        param = parameter_name(widget)
        if param is not None:
            assert param not in bound, f"parameter {param} bound twice ({bound.get(param)} and {name})"
            bound[param] = widget
    assert set(bound) == set(fields), (f"unbound fields: {sorted(set(fields) - set(bound))}; "
                                       f"bound names without a field: {sorted(set(bound) - set(fields))}")
    for field, kind in fields.items():
        cls = bound[field].get("class")
        assert cls in CONNECTABLE[kind], f"{field} ({kind}) is bound to a {cls}, which the wrapper cannot connect"


def test_parameter_node_annotations_run_on_python_39():
    """Slicer's wrapper evaluates the parameter node's annotations at run time (typing.get_type_hints),
    also under ``from __future__ import annotations``: Slicer 5.4-5.8 (Python 3.9) cannot evaluate
    ``X | Y`` there, and a Union of node types needs ``None`` for the wrapper's default."""
    cls = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == PARAMETER_CLASS)
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign):
            text = ast.unparse(stmt.annotation)
            assert not any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(stmt.annotation)), \
                f"{text}: use typing.Union"
            if text.startswith("Union[") and "vtkMRML" in text:
                assert text.rstrip("]").endswith("None"), f"{stmt.target.id}: {text} needs None"


def test_node_selectors_offer_the_right_node_types():
    widgets = ui_widgets()
    anat = widgets["anatomicalSelector"]
    assert stringlist(anat, "nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    assert "vtkMRMLLabelMapVolumeNode" in stringlist(anat, "hideChildNodeTypes")
    func = widgets["functionalSelector"]
    assert set(stringlist(func, "nodeTypes")) == {"vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"}
    assert "vtkMRMLLabelMapVolumeNode" in stringlist(func, "hideChildNodeTypes")
    assert stringlist(widgets["outputVolumeSelector"], "nodeTypes") == ["vtkMRMLVectorVolumeNode"]
    assert stringlist(widgets["outputTableSelector"], "nodeTypes") == ["vtkMRMLTableNode"]
    root = ET.parse(UI_FILE).getroot()
    wired = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    for name, widget in widgets.items():
        if widget.get("class") == "qMRMLNodeComboBox":
            assert name in wired, f"{name} does not receive the scene (mrmlSceneChanged -> setMRMLScene)"


def test_parameter_node_choices_come_from_the_options_module():
    """The panel keeps no copy of the choices (issue 21): axes, devices, metric sets, the default
    method and the method list come from MedicalFusionLib.options; every panel device is one the
    pipeline accepts."""
    tree = module_tree()
    copies = [node.targets[0].id for node in tree.body
              if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id in ("AXIS_CHOICES", "DEVICE_CHOICES", "DEFAULT_METHOD", "METRIC_SET_CHOICES")
              and isinstance(node.value, (ast.Tuple, ast.List, ast.Constant))]
    assert copies == [], f"the module file keeps its own copies of {copies}"
    imported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                and node.module == "MedicalFusionLib.options" for alias in node.names}
    assert {"AXIS_CHOICES", "DEVICE_CHOICES", "DEFAULT_METHOD"} <= imported
    assert not [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "_MethodNames"]
    from MedicalFusionLib import options  # noqa: PLC0415

    for device in options.PANEL_DEVICES:
        options.check_device_name(device)
    assert options.DEFAULT_METHOD in options.method_names()


def test_the_self_test_class_is_where_slicer_looks_for_it():
    """Slicer's "Reload and Test" (ScriptedLoadableModule.runTest) takes ``<ModuleName>Test`` from the module
    file's namespace; ctest (slicer.testing.runUnitTest: unittest's loadTestsFromName) collects every
    TestCase class there. So MedicalFusionTest is a ScriptedLoadableModuleTest of MedicalFusion.py, and the
    tests it inherits (MedicalFusionSlicer/self_test.py) are in a class that is no TestCase, which the
    loader would collect a second time. (Run both ways on Slicer's layer: slicer_module/.)"""
    cls = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "MedicalFusionTest")
    bases = [ast.unparse(b) for b in cls.bases]
    assert bases[-1] == "ScriptedLoadableModuleTest" and bases[0] == "MedicalFusionSelfTests", bases
    tree = ast.parse((SLICER_SIDE / "self_test.py").read_text(encoding="utf-8"))
    mixin = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedicalFusionSelfTests")
    assert mixin.bases == [], "the tests' class must not be a TestCase"
    tests = [n.name for n in mixin.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert len(tests) >= 6 and "runTest" in [n.name for n in mixin.body if isinstance(n, ast.FunctionDef)]


def test_reload_reads_every_slicer_side_module_after_those_it_imports():
    """Developer mode's Reload reads MedicalFusionSlicer's modules again (SUBMODULES, in that order) before
    the module file: every module of the package, each after the ones it imports from the package."""
    init = ast.parse((SLICER_SIDE / "__init__.py").read_text(encoding="utf-8"))
    listed = next(ast.literal_eval(n.value) for n in init.body if isinstance(n, ast.Assign)
                  and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["SUBMODULES"])
    assert sorted(listed) == sorted(p.stem for p in slicer_side_files() if p.stem != "__init__")
    for position, name in enumerate(listed):
        tree = ast.parse((SLICER_SIDE / f"{name}.py").read_text(encoding="utf-8"))
        own = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
        assert own <= set(listed[:position]), f"{name} imports {own} that Reload reads after it"
    assert "reloadSubmodules()" in MODULE_PY.read_text(encoding="utf-8")


def test_resources_exist_and_icon_is_128px():
    import SimpleITK as sitk  # noqa: PLC0415
    assert ICON.is_file() and UI_FILE.is_file()
    icon = sitk.ReadImage(str(ICON))
    assert icon.GetSize() == (128, 128)


def test_cmake_lists_every_library_script_and_resource():
    """The module CMakeLists globs MedicalFusionLib/**/*.py and names the resources it installs."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "GLOB_RECURSE" in text and "${MODULE_NAME}Lib/*.py" in text and "RELATIVE" in text
    assert "${MODULE_NAME}Slicer/*.py" in text          # the Slicer-side package (self-test, Sample Data)
    for resource in ("Resources/UI/${MODULE_NAME}.ui", "Resources/Icons/${MODULE_NAME}.png",
                     "Resources/Icons/${MODULE_NAME}Sample.png", "colormaps.json"):
        assert resource in text
    assert "slicer_add_python_unittest" in text
    top = (MODULE_DIR.parent / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "find_package(Slicer",
                "${Slicer_USE_FILE}", "add_subdirectory(MedicalFusion)", "${Slicer_EXTENSION_GENERATE_CONFIG}",
                "${Slicer_EXTENSION_CPACK}"):
        assert key in top, f"top-level CMakeLists.txt lacks {key}"


def main() -> int:
    """Run every test without pytest (Slicer's Python); returns the number of failures."""
    failures = 0
    for name, fn in sorted((n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)):
        try:
            fn()
            print(f"PASS {name}")
        except unittest.SkipTest as exc:
            print(f"SKIP {name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - report every failure
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    return failures


if __name__ == "__main__":
    code = 1 if main() else 0
    try:
        import slicer  # noqa: PLC0415

        if hasattr(slicer, "app"):
            slicer.util.exit(code)
    except ImportError:
        pass
    sys.exit(code)
