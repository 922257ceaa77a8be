"""MedicalFusion.py run on 3D Slicer's own Python layer (stable 5.8.1 and main), see slicer_harness.py.

Each test loads the module as Slicer does, on a real slicer-core MRML scene, with Slicer's unmodified
``ScriptedLoadableModule``, ``parameterNodeWrapper`` (serializers, GUI connectors), ``util`` and
``testing``; only the Qt application is stood in. What the user does is done the way Slicer does
it: the Fuse button is clicked (its clicked() signal calls the handler), Cancel is a second click
delivered while the fusion processes events, the module is entered and left, the scene is closed,
saved and read back, the self-test runs as "Reload and Test" and as ctest loads it.

The checks that need a Slicer without torch (scikit-image, scikit-learn and nilearn hidden too, as
in a fresh Slicer) run in a subprocess per Slicer version: ``python test_slicer_module.py
--without-torch VERSION SCENE`` prints one JSON object that the tests below read.

Skipped, with the reason, when ../shared/slicer-python (or $MEDICALFUSION_SLICER_PYTHON) or
slicer-core is missing.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]          # Testing/Python: the harness beside conftest
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

import slicer_harness as sh  # noqa: E402
from MedicalFusionLib.sample import SAMPLE_NAME, SAMPLE_NODE_NAMES  # noqa: E402

HIDDEN_WITHOUT_TORCH = ("torch", "skimage", "sklearn", "nilearn")
SELF_TESTS = ("test_WidgetValidation", "test_SampleData", "test_FuseNodeToNode",
              "test_CancelAndBadInputLeaveSceneUnchanged", "test_FuseSampleFromPanel", "test_SceneCloseCancelsFusion")
NEEDS_TORCH = {"test_FuseNodeToNode", "test_CancelAndBadInputLeaveSceneUnchanged", "test_FuseSampleFromPanel",
               "test_SceneCloseCancelsFusion"}


# --------------------------------------------------------------------------------------------------
# shared between the pytest process and the subprocess


def run_ctest_style(h) -> dict:
    """MedicalFusionTest as Slicer's ctest runs it: slicer.testing.runUnitTest (unittest's loader, test
    by test, no runTest()). Returns {test name: 'ok' | 'skipped: reason' | 'ERROR' | 'FAIL'} and
    whether runUnitTest succeeded."""
    import slicer.testing  # noqa: PLC0415  (the harness's: Slicer's own package; ctest's --python-code imports it)

    stream = io.StringIO()
    succeeded = True
    with contextlib.redirect_stderr(stream), contextlib.redirect_stdout(io.StringIO()):
        try:
            slicer.testing.runUnitTest([str(sh.MODULE_DIR)], sh.MODULE_NAME)
        except Exception as exc:  # noqa: BLE001 - exitFailure raises on any failure
            succeeded = False
            stream.write(f"\nrunUnitTest raised {type(exc).__name__}: {exc}\n")
    outcomes = {}
    for match in re.finditer(r"^(test_\w+) \(.*?\)(?:\n.*?)? \.\.\. (ok|skipped ['\"](.*)['\"]|ERROR|FAIL)$",
                             stream.getvalue(), flags=re.M):
        outcomes[match.group(1)] = "skipped: " + match.group(3) if match.group(3) is not None else match.group(2)
    return {"succeeded": succeeded, "outcomes": outcomes, "output": stream.getvalue()[-4000:]}


def run_reload_and_test(h) -> dict:
    """The module panel's "Reload and Test" (developer mode): reload the source, then runTest()."""
    import qt_standins as qts  # noqa: PLC0415

    widget = h.widget()
    before = len(qts.QMessageBox.shown)
    raised = None
    try:
        widget.onReloadAndTest()
    except Exception as exc:  # noqa: BLE001
        raised = f"{type(exc).__name__}: {exc}"
    skipped = [m for m in h.messages() if m.startswith("Skipped test_")]
    return {"raised": raised, "dialogs": qts.QMessageBox.shown[before:], "skipped": skipped,
            "callback_errors": list(h.callback_errors)}


def _without_torch_scenarios(version: str, scene_path: str) -> dict:
    """Everything checked in a Slicer without torch; runs in a fresh interpreter (see __main__)."""
    import qt_standins as qts  # noqa: PLC0415

    results: dict = {"find_spec_torch": __import__("importlib.util").util.find_spec("torch") is not None}
    work = Path(tempfile.mkdtemp(prefix="mf-notorch-"))
    os.environ["PATH"] = str(sh.fake_python_slicer(work / "bin")) + os.pathsep + os.environ.get("PATH", "")
    cache = work / "cache"

    # "Reload and Test" by a user who declines the installation
    with sh.SlicerHarness(version, testing=False, main_window=True, cache_dir=cache) as h:
        qts.QMessageBox.answer = qts.QMessageBox.Cancel
        results["reload_and_test"] = run_reload_and_test(h)
    # ctest (testing mode: installation is attempted without asking, and fails: no network here)
    with sh.SlicerHarness(version, testing=True, cache_dir=cache) as h:
        results["ctest"] = run_ctest_style(h)
        results["ctest"]["callback_errors"] = list(h.callback_errors)

    # the panel opened in a Slicer without torch says why the methods and networks are missing:
    # when it opens (setup() then enter()), with the inputs selected, and after a scene close
    with sh.SlicerHarness(version, cache_dir=cache) as h:
        widget = h.widget()
        status = {"opened": widget.ui.statusLabel.text}
        from MedicalFusionLib.scene import add_phantom_pair  # noqa: PLC0415

        anatomical, functional = add_phantom_pair(h.scene)
        widget.ui.anatomicalSelector.setCurrentNode(anatomical)
        widget.ui.functionalSelector.setCurrentNode(functional)
        status["selected"] = widget.ui.statusLabel.text
        status["fuse_enabled"] = widget.ui.fuseButton.enabled
        h.scene.Clear(0)
        status["closed"] = widget.ui.statusLabel.text
        status["callback_errors"] = list(h.callback_errors)
        results["status"] = status

    # a scene saved with method 'mrdfn', opened with the module already shown, and before it is shown
    for order in ("module_first", "scene_first"):
        with sh.SlicerHarness(version, cache_dir=cache) as h:
            if order == "module_first":
                widget = h.widget()
                imported = h.import_scene(scene_path)
            else:
                imported = h.import_scene(scene_path)
                widget = h.widget()
            p = widget._parameterNode
            results["scene_" + order] = {
                "imported": imported, "method": p.method, "combo": widget.ui.methodComboBox.currentText,
                "anatomical": p.anatomicalVolume.GetName() if p.anatomicalVolume else None,
                "status": widget.ui.statusLabel.text, "callback_errors": list(h.callback_errors)}

    # Fuse clicked, the user agrees, pip fails (no network): one message, the panel stays usable
    with sh.SlicerHarness(version, testing=False, main_window=True, cache_dir=cache) as h:
        qts.QMessageBox.answer = qts.QMessageBox.Ok
        widget = h.widget()
        from MedicalFusionLib.scene import add_phantom_pair  # noqa: PLC0415

        anatomical, functional = add_phantom_pair(h.scene)
        widget.ui.anatomicalSelector.setCurrentNode(anatomical)
        widget.ui.functionalSelector.setCurrentNode(functional)
        enabled_before = widget.ui.fuseButton.enabled
        nodes_before = h.node_ids()
        widget.ui.fuseButton.click()
        results["pip_failure"] = {
            "enabled_before": enabled_before, "enabled_after": widget.ui.fuseButton.enabled,
            "button_text": widget.ui.fuseButton.text, "status": widget.ui.statusLabel.text,
            "dialogs": qts.QMessageBox.shown, "scene_unchanged": nodes_before == h.node_ids(),
            "callback_errors": list(h.callback_errors)}

    # with the PyTorch extension (EXTENSION_DEPENDS): one confirmation, not two
    with sh.SlicerHarness(version, testing=False, main_window=True, cache_dir=cache) as h:
        qts.QMessageBox.answer = qts.QMessageBox.Ok
        torch_utils = sh.pytorch_utils_standin(installed=False, install_result=None)
        sys.modules["PyTorchUtils"] = torch_utils
        ok = h.module.ensureDependencies(askConfirmation=True)
        results["pytorch_extension"] = {"ok": ok, "calls": torch_utils.calls, "dialogs": qts.QMessageBox.shown,
                                        "callback_errors": list(h.callback_errors)}
    return results


# --------------------------------------------------------------------------------------------------
# pytest


if __name__ != "__main__":
    import pytest

    VERSIONS = sh.version_params()
    parametrize_versions = sh.parametrize_versions      # the harness fixture is conftest's

    def select_pair(widget, anatomical, functional) -> None:
        """What the user does: pick the two volumes in the panel's selectors."""
        widget.ui.anatomicalSelector.setCurrentNode(anatomical)
        widget.ui.functionalSelector.setCurrentNode(functional)

    def phantom(h):
        from MedicalFusionLib.scene import add_phantom_pair  # noqa: PLC0415

        return add_phantom_pair(h.scene)

    # ---- the parameter node

    @parametrize_versions
    def test_parameter_node_defaults_saved_with_the_scene_and_read_back(harness, tmp_path):
        h = harness
        logic = h.module.MedicalFusionLogic()
        p = logic.getParameterNode()
        assert (p.method, p.device, p.axis, p.colormap) == ("lp", "auto", "axial", h.module.AS_DISPLAYED)
        assert (p.useDisplayWindow, p.computeMetrics, p.showAsForeground, p.switchToTableLayout) == (True, True, False, False)
        assert p.anatomicalVolume is None and p.functionalVolume is None and p.outputVolume is None
        anatomical, functional = phantom(h)
        rgb = h.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "RGB PET")
        p.anatomicalVolume, p.functionalVolume = anatomical, rgb
        assert p.functionalVolume is rgb            # the Union keeps a vector volume as such
        p.functionalVolume = functional
        p.method, p.colormap, p.axis, p.useDisplayWindow = "nsct", "PET-Rainbow2", "coronal", False
        p.functionalWindowMin, p.functionalWindowMax = 0.5, 9.25
        h.save_scene(tmp_path / "scene.mrml")

        h.scene.Clear(0)                           # File > Close scene
        assert h.import_scene(tmp_path / "scene.mrml")
        q = logic.getParameterNode()
        assert (q.method, q.colormap, q.axis, q.useDisplayWindow) == ("nsct", "PET-Rainbow2", "coronal", False)
        assert (q.functionalWindowMin, q.functionalWindowMax) == (0.5, 9.25)
        assert q.anatomicalVolume.GetName() == anatomical.GetName()
        assert q.functionalVolume.GetName() == functional.GetName()
        assert q.outputVolume is None

    @parametrize_versions
    def test_scene_with_an_unknown_method_connects_with_the_default(harness, tmp_path):
        h = harness
        p = h.module.MedicalFusionLogic().getParameterNode()
        p.parameterNode.SetParameter("method", "no_such_method")   # e.g. saved by another version
        widget = h.widget()
        assert widget._parameterNode.method == "lp"
        assert widget.ui.methodComboBox.currentText == "lp"
        assert "no_such_method" in widget.ui.statusLabel.text

    # ---- the panel

    @parametrize_versions
    def test_setup_binds_every_parameter_to_its_widget(harness):
        h = harness
        widget = h.widget()
        p = widget._parameterNode
        from MedicalFusionLib.methods import method_names  # noqa: PLC0415

        ui = widget.ui
        assert [ui.methodComboBox.itemText(i) for i in range(ui.methodComboBox.count)] == method_names()
        assert ui.methodComboBox.currentText == "lp"
        assert ui.colormapComboBox.currentText == h.module.AS_DISPLAYED
        assert tuple(ui.functionalSelector.nodeTypes) == ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")
        # GUI -> parameter node, one widget of each kind
        ui.methodComboBox.currentIndex = ui.methodComboBox.findText("gff")
        ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText("cpu")
        ui.axisComboBox.currentIndex = ui.axisComboBox.findText("sagittal")
        ui.colormapComboBox.currentIndex = ui.colormapComboBox.findText("Grey")
        ui.computeMetricsCheckBox.click()
        ui.switchToTableLayoutCheckBox.click()
        ui.useDisplayWindowCheckBox.click()
        ui.functionalWindowMaxSpinBox.value = 7.5
        assert (p.method, p.device, p.axis, p.colormap) == ("gff", "cpu", "sagittal", "Grey")
        assert (p.computeMetrics, p.switchToTableLayout, p.useDisplayWindow, p.functionalWindowMax) == (False, True, False, 7.5)
        # parameter node -> GUI
        p.method = "dwt"
        assert ui.methodComboBox.currentText == "dwt"
        tips = [ui.methodComboBox.itemData(i, 3) for i in range(ui.methodComboBox.count)]
        assert all(tips) and "Reference" in tips[0]

    @parametrize_versions
    def test_selecting_inputs_enables_fuse(harness):
        h = harness
        widget = h.widget()
        anatomical, functional = phantom(h)
        widget.ui.functionalSelector.setCurrentNode(None)
        assert not widget.ui.fuseButton.enabled
        assert "functional" in widget.ui.fuseButton.toolTip
        select_pair(widget, anatomical, functional)
        assert widget._parameterNode.functionalVolume is functional
        assert widget.ui.fuseButton.enabled, widget.ui.fuseButton.toolTip
        widget.ui.functionalSelector.setCurrentNode(anatomical)
        assert not widget.ui.fuseButton.enabled and "same node" in widget.ui.fuseButton.toolTip

    @parametrize_versions
    def test_fuse_button_writes_the_fused_volume_and_metrics_beside_the_anatomical(harness):
        h = harness
        widget = h.widget()
        anatomical, functional = phantom(h)
        shn = h.slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(h.scene)
        study = shn.CreateStudyItem(shn.CreateSubjectItem(shn.GetSceneItemID(), "Patient"), "PET/MR study")
        shn.SetItemParent(shn.GetItemByDataNode(anatomical), study)
        select_pair(widget, anatomical, functional)
        widget._parameterNode.method = "average"
        layout_before = h.layout_manager.layout
        calls_before = h.app.process_events_calls

        widget.ui.fuseButton.click()

        fused = [n for n in h.nodes("vtkMRMLVectorVolumeNode")]
        tables = h.nodes("vtkMRMLTableNode")
        assert len(fused) == 1 and len(tables) == 1, widget.ui.statusLabel.text
        fused, table = fused[0], tables[0]
        from MedicalFusionLib.metrics import COLOUR_METRIC_KEYS, metric_set_keys  # noqa: PLC0415

        assert fused.GetImageData().GetNumberOfScalarComponents() == 3
        assert h.slicer.util.arrayFromVolume(fused).shape[:3] == h.slicer.util.arrayFromVolume(anatomical).shape
        names = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
        quick = metric_set_keys("quick")                                # the default set (issue 21)
        assert names[:len(quick)] == quick and set(names[len(quick):]) <= set(COLOUR_METRIC_KEYS)
        assert fused.GetAttribute("MedicalFusion.method") == "average"
        assert widget.ui.statusLabel.text.startswith("Done")
        assert widget.ui.fuseButton.text == "Fuse" and widget.ui.fuseButton.enabled
        assert not widget.ui.progressBar.visible
        assert h.app.process_events_calls > calls_before          # the run let the UI breathe
        # beside the anatomical in the Data module, shown in the views, the user's layout kept
        assert shn.GetItemParent(shn.GetItemByDataNode(fused)) == study
        assert shn.GetItemParent(shn.GetItemByDataNode(table)) == study
        assert all(c.GetBackgroundVolumeID() == fused.GetID() for c in h.layout_manager.slice_composite_nodes())
        assert h.layout_manager.layout == layout_before
        assert h.app_logic.GetSelectionNode().GetActiveTableID() == table.GetID()

    @parametrize_versions
    def test_switching_to_the_table_layout_is_an_option(harness):
        h = harness
        widget = h.widget()
        select_pair(widget, *phantom(h))
        widget._parameterNode.method, widget._parameterNode.switchToTableLayout = "max", True
        widget.ui.fuseButton.click()
        assert h.nodes("vtkMRMLTableNode"), widget.ui.statusLabel.text
        assert h.layout_manager.layout == h.slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView

    @parametrize_versions
    def test_cancel_clicked_during_a_run_leaves_the_scene_unchanged(harness):
        h = harness
        widget = h.widget()
        select_pair(widget, *phantom(h))
        widget._parameterNode.method = "lp"
        before = h.node_ids()
        seen = {}

        def click_cancel():
            seen["text"] = widget.ui.fuseButton.text
            widget.ui.fuseButton.click()

        h.app.after_process_events(2, click_cancel)   # the user clicks while the fusion runs
        widget.ui.fuseButton.click()
        assert seen["text"] == "Cancel"
        assert h.node_ids() == before
        assert widget.ui.statusLabel.text.startswith("Cancelled")
        assert widget.ui.fuseButton.text == "Fuse" and widget.ui.fuseButton.enabled
        assert widget.ui.inputsCollapsibleButton.enabled

    @parametrize_versions
    def test_parameter_node_after_a_scene_close_while_the_module_is_not_shown(harness):
        h = harness
        widget = h.widget()
        h.widget_representation().exit()          # the user went to another module
        h.scene.Clear(0)                          # File > Close scene
        assert widget._parameterNode is not None
        anatomical, functional = phantom(h)
        select_pair(widget, anatomical, functional)
        assert widget._parameterNode.anatomicalVolume is anatomical
        assert widget.ui.fuseButton.enabled, widget.ui.fuseButton.toolTip

    @parametrize_versions
    def test_leaving_and_entering_the_module_keeps_the_choices(harness):
        h = harness
        widget = h.widget()
        representation = h.widget_representation()
        widget.ui.methodComboBox.currentIndex = widget.ui.methodComboBox.findText("nsct")
        widget.ui.colormapComboBox.currentIndex = widget.ui.colormapComboBox.findText("Rainbow")
        for _ in range(2):
            representation.exit()
            representation.enter()
        p = widget._parameterNode
        assert (p.method, p.colormap) == ("nsct", "Rainbow")
        assert widget.ui.methodComboBox.currentText == "nsct"
        widget.ui.methodComboBox.currentIndex = widget.ui.methodComboBox.findText("dwt")
        assert p.method == "dwt"

    # ---- module metadata, translations, sample data

    @parametrize_versions
    def test_module_metadata_and_strings_go_through_translation(harness):
        h = harness
        module = h.module_object()
        assert module.title == "Medical Image Fusion"
        assert module.categories == ["Nuclear Medicine"]
        assert module.contributors and "developers" not in module.contributors[0]
        assert module.icon is not None and Path(module.icon.path).is_file()
        translated = set(h.app.translations)
        assert ("MedicalFusion", "Medical Image Fusion") in translated
        assert ("qSlicerAbstractCoreModule", "Nuclear Medicine") in translated
        assert any(ctx == "MedicalFusion" and text.lstrip().startswith("Fuses a functional") for ctx, text in translated)
        widget = h.widget()
        select_pair(widget, *phantom(h))
        widget.ui.functionalSelector.setCurrentNode(None)
        assert (("MedicalFusion", "Fuse the functional volume into the anatomical one.") in set(h.app.translations))

    @parametrize_versions
    def test_sample_is_registered_with_sample_data_and_loads_in_one_click(harness):
        h = harness
        import SampleData  # noqa: PLC0415  (the harness's: Slicer's registration API)

        sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory("Medical Image Fusion")
        assert [s.sampleName for s in sources] == [SAMPLE_NAME]
        assert Path(sources[0].thumbnailFileName).is_file()
        (anatomical,) = h.click_sample(SAMPLE_NAME)     # Sample Data returns the first node
        widget = h.widget()
        assert widget._parameterNode.anatomicalVolume is anatomical
        functional = widget._parameterNode.functionalVolume
        assert (anatomical.GetName(), functional.GetName()) == SAMPLE_NODE_NAMES
        assert h.slicer.util.arrayFromVolume(anatomical).shape == (189, 233, 197)   # the MNI152 template
        assert widget.ui.fuseButton.enabled, widget.ui.fuseButton.toolTip

    # ---- the self-test, as Slicer runs it

    @parametrize_versions
    def test_self_test_reload_and_test_passes(harness):
        h = harness
        h.app._testing = False                          # an interactive "Reload and Test"
        h.app._main_window = sh.qts.QMainWindow()
        h.app._main_window.objectName = "qSlicerMainWindow"
        result = run_reload_and_test(h)
        assert result["raised"] is None, result
        assert result["dialogs"] == [], result          # no "Reload and Test failed" box
        assert result["skipped"] == [], result          # torch is here: every test ran

    @parametrize_versions
    def test_self_test_loaded_test_by_test_as_ctest_does(harness):
        result = run_ctest_style(harness)
        assert result["succeeded"], result["output"]
        assert result["outcomes"] == {name: "ok" for name in SELF_TESTS}, result["output"]
        # each once: MedicalFusionTest inherits them (MedicalFusionSlicer/self_test.py) from a class that is
        # no TestCase; the one more is ScriptedLoadableModuleTest, imported into the module file as in
        # Slicer's template, a TestCase the loader collects too (its runTest() finds no test and returns)
        for name in SELF_TESTS:
            assert len(re.findall(rf"^{name} \(", result["output"], flags=re.M)) == 1, result["output"]
        assert f"Ran {len(SELF_TESTS) + 1} tests" in result["output"], result["output"]

    # ---- a Slicer without torch (subprocess)

    _WITHOUT_TORCH: dict = {}     # version -> the subprocess's JSON, or the running subprocess

    def _start_without_torch(version: str, folder: Path) -> dict:
        """Save a scene with method 'mrdfn' where torch is installed, then start the subprocess."""
        scene = folder / f"mrdfn-{version}.mrml"
        with sh.SlicerHarness(version) as h:
            widget = h.widget()
            anatomical, functional = phantom(h)
            select_pair(widget, anatomical, functional)
            widget.ui.methodComboBox.currentIndex = widget.ui.methodComboBox.findText("mrdfn")
            assert widget._parameterNode.method == "mrdfn"
            h.save_scene(scene)
        out = open(folder / f"{version}.out", "w+")   # files, not pipes: nothing blocks while it runs
        err = open(folder / f"{version}.err", "w+")
        proc = subprocess.Popen([sys.executable, str(Path(__file__)), "--without-torch", version, str(scene)],
                                stdout=out, stderr=err, text=True, cwd=str(sh.REPO))
        return {"proc": proc, "out": out, "err": err}

    @pytest.fixture(scope="module", autouse=True)
    def without_torch_runs(request, tmp_path_factory):
        """Start the Slicer-without-torch subprocesses when the module starts, for the versions whose
        without_torch tests are selected: they run beside the in-process tests (second core). Under
        pytest-xdist (make test) both cores are busy already and a worker runs only some of the
        module's tests: each version's subprocess starts when its first test asks (the tests of one
        version are one xdist group, conftest.py)."""
        versions = sorted({item.callspec.params["version"] for item in request.session.items
                           if item.module is request.module and "without_torch" in item.name
                           and hasattr(item, "callspec")})
        if os.environ.get("PYTEST_XDIST_WORKER"):
            versions = []
        folder = tmp_path_factory.mktemp("without-torch")
        for version in versions:
            if sh.missing_reason(version) is None and version not in _WITHOUT_TORCH:
                _WITHOUT_TORCH[version] = _start_without_torch(version, folder)
        yield
        for run in list(_WITHOUT_TORCH.values()):
            if isinstance(run, dict) and "proc" in run and run["proc"].poll() is None:
                run["proc"].kill()
                run["proc"].wait()

    def without_torch(version: str) -> dict:
        reason = sh.missing_reason(version)
        if reason:
            pytest.skip(reason)
        run = _WITHOUT_TORCH.get(version)
        if run is None and os.environ.get("PYTEST_XDIST_WORKER"):
            run = _WITHOUT_TORCH[version] = _start_without_torch(version, Path(tempfile.mkdtemp(prefix="mf-wt-")))
        assert run is not None, "the subprocess was not started (see without_torch_runs)"
        if "proc" in run:
            code = run["proc"].wait(timeout=600)
            run["out"].seek(0)
            run["err"].seek(0)
            stdout, stderr = run["out"].read(), run["err"].read()
            run["out"].close()
            run["err"].close()
            assert code == 0, stderr[-4000:]
            _WITHOUT_TORCH[version] = run = json.loads(stdout.strip().splitlines()[-1])
        return run

    @pytest.mark.parametrize("version", VERSIONS)
    def test_without_torch_reload_and_test_skips_with_reasons(version):
        r = without_torch(version)
        assert r["find_spec_torch"] is False
        result = r["reload_and_test"]
        assert result["raised"] is None and result["callback_errors"] == [], result
        # asked for the dependencies and for the sample's template (nilearn), declined both: no failure box
        titles = [d["title"] for d in result["dialogs"]]
        assert titles == ["MedicalFusion: install dependencies", "MedicalFusion: sample data"], result
        skipped = {m.split(":")[0].split()[-1] for m in result["skipped"]}
        assert skipped == NEEDS_TORCH, result
        assert all("torch" in m for m in result["skipped"])

    @pytest.mark.parametrize("version", VERSIONS)
    def test_without_torch_ctest_passes_or_skips_each_test_with_a_reason(version):
        result = without_torch(version)["ctest"]
        assert result["succeeded"] and result["callback_errors"] == [], result["output"]
        outcomes = result["outcomes"]
        assert set(outcomes) == set(SELF_TESTS), result["output"]
        for name, outcome in outcomes.items():
            if name in NEEDS_TORCH:
                assert outcome.startswith("skipped: needs torch"), (name, outcome)
            else:
                assert outcome == "ok", (name, outcome, result["output"])

    @pytest.mark.parametrize("version", VERSIONS)
    def test_without_torch_the_status_line_says_why_the_networks_are_missing(version):
        result = without_torch(version)["status"]
        assert result["callback_errors"] == [], result
        assert result["fuse_enabled"], result          # Fuse stays clickable: it offers the installation
        for moment in ("opened", "selected", "closed"):
            text = result[moment]
            assert "Not installed yet: torch" in text and "networks" in text and "first Fuse" in text, (moment, text)
        assert "Select an anatomical volume" in result["opened"] and "Select" not in result["selected"], result

    @pytest.mark.parametrize("version", VERSIONS)
    def test_without_torch_a_scene_saved_with_a_network_method_opens(version):
        r = without_torch(version)
        for order in ("module_first", "scene_first"):
            result = r["scene_" + order]
            assert result["callback_errors"] == [], (order, result["callback_errors"])
            assert result["imported"] and result["method"] == "mrdfn" and result["combo"] == "mrdfn", (order, result)
            assert result["anatomical"] == "Phantom MRI", (order, result)

    @pytest.mark.parametrize("version", VERSIONS)
    def test_without_torch_a_failed_pip_install_is_one_message_and_the_panel_stays_usable(version):
        result = without_torch(version)["pip_failure"]
        assert result["callback_errors"] == [], result["callback_errors"]
        assert result["enabled_before"] and result["enabled_after"] and result["button_text"] == "Fuse", result
        assert result["scene_unchanged"], result
        assert [d["title"] for d in result["dialogs"]] == ["MedicalFusion: install dependencies",
                                                           "MedicalFusion: installation failed"], result
        failure = result["dialogs"][1]["text"]
        assert "pip exit status 1" in failure and "\n" not in failure.strip(), failure
        assert "Click Fuse to try again" in result["status"], result

    @pytest.mark.parametrize("version", VERSIONS)
    def test_without_torch_the_pytorch_extension_installs_after_one_confirmation(version):
        result = without_torch(version)["pytorch_extension"]
        assert result["calls"] == [{"askConfirmation": False}], result
        assert [d["title"] for d in result["dialogs"]] == ["MedicalFusion: install dependencies",
                                                           "MedicalFusion: installation failed"], result
        assert result["ok"] is False and result["callback_errors"] == [], result


# --------------------------------------------------------------------------------------------------
# the subprocess


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--without-torch":
        sh.hide_modules(HIDDEN_WITHOUT_TORCH)
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        print(json.dumps(_without_torch_scenarios(sys.argv[2], sys.argv[3]), default=str))
    else:
        sys.exit("usage: test_slicer_module.py --without-torch VERSION SCENE.mrml")
