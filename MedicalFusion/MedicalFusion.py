"""MedicalFusion: the 3D Slicer module, on Slicer's scripted-module template (Module, parameter node,
Widget, Logic, self-test) plus the sample's file reader. Slicer glue only: the Qt-free core
``MedicalFusionLib`` does the work (``panel.py``: what the panel offers, checks and says; ``install.py``;
``scene.py``: MRML nodes; the pipeline); ``MedicalFusionSlicer`` holds what needs the running application
besides the panel (install dialogs, the Sample Data entry, the self-test's tests). Heavy dependencies
(torch, scikit-image, scikit-learn, nilearn) are imported only when used, after the user agreed to
install them, so the module loads in a fresh Slicer. Python 3.9 (Slicer 5.4+; vermin checks it); the
tests run it on Slicer's own Python layer (Testing/Python/slicer_harness.py).
"""
from __future__ import annotations

import logging
import time
from typing import Annotated, Union

import ctk  # noqa: F401  (Slicer's CTK widgets, used by the .ui)
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from MedicalFusionLib import colour, install, panel
from MedicalFusionLib import options as choices
from MedicalFusionLib.options import AXES as AXIS_CHOICES
from MedicalFusionLib.options import DEFAULT_METHOD
from MedicalFusionLib.options import PANEL_DEVICES as DEVICE_CHOICES
from MedicalFusionLib.panel import ANATOMICAL_PRESETS, AS_DISPLAYED, FUNCTIONAL_PRESETS, NO_PRESET
from MedicalFusionLib.registration import KINDS as REGISTRATION_CHOICES
from MedicalFusionSlicer import reloadSubmodules
from MedicalFusionSlicer.dependencies import ensureDependencies
from MedicalFusionSlicer.parameters import acceptSavedChoices
from MedicalFusionSlicer.results import exportFusedVolume, showResults
from MedicalFusionSlicer.sample_data import SampleFileReader, loadSamplePair, registerSampleData
from MedicalFusionSlicer.self_test import MedicalFusionSelfTests

METRIC_SET_CHOICES = tuple(choices.METRIC_SETS)


class MedicalFusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Medical Image Fusion")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Nuclear Medicine")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedicalFusion maintainers (github.com/medicalfusion/SlicerMedicalFusion)"]
        self.parent.helpText = _("""
Fuses a functional volume (PET, SPECT, or an RGB pseudo-colour image) into an anatomical one (MRI or CT):
one RGB volume on the anatomical grid, fused slice by slice, plus a table of fusion quality metrics.
The functional is resampled with its parent transform; its colour map and window are the ones it is shown with.
<b>Register first</b> aligns a functional that is not registered yet (mutual information, rigid or affine): the result is a
new linear transform set as the functional's parent, which you can inspect, edit or remove (Transforms module).
Inputs are never modified; each run writes a new fused volume and metrics table (beside the anatomical in the
Data module) unless you pick existing ones. A demo pair is in the Sample Data module (Medical Image Fusion).
<br><br>Methods (<b>alpha</b> is what Slicer shows today: the functional as foreground at opacity 0.5):""") + \
            panel.methods_help() + _("""
Metrics (EN, SD, SF, AG, MI, FMI, SCD, VIF, Q<sup>AB/F</sup>, SSIM, PSNR, CC, ARI) are computed on 8-bit grayscale
slices as the fusion literature's evaluators do.
See <a href="https://github.com/medicalfusion/SlicerMedicalFusion/blob/main/docs/SLICER.md">the user guide</a>.""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer's scripted module template and parameter node wrapper, SimpleITK and PyTorch.
Fusion methods follow the cited papers; colour maps are Slicer's own (PET-Heat and others).
Sample: the MNI152 2009a symmetric T1 template (Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging
Centre, Montreal Neurological Institute, McGill University), shipped in the nilearn package, and a PET simulated
from it. Test data: the Harvard Whole Brain Atlas (Johnson &amp; Becker) and the SPM12 templates.
""")
        # The Sample Data module lists the demo pair once the application has started
        slicer.app.connect("startupCompleted()", registerSampleData)


def loadSample(source=None) -> list:
    """Load the demo pair (MedicalFusionSlicer/sample_data.py) and select it in the module. Returns
    [anatomical, functional]. ``source``: unused (what a custom downloader gets)."""
    nodes = loadSamplePair()
    parameterNode = MedicalFusionLogic().getParameterNode()
    parameterNode.anatomicalVolume, parameterNode.functionalVolume = nodes
    return nodes


class MedicalFusionFileReader(SampleFileReader):
    """The module's scripted file reader (Slicer registers it with the IO manager by this name): a
    ``*.mfsample`` recipe loads the demo pair, selected in the module."""

    def loadPair(self) -> list:
        return loadSample()


@parameterNodeWrapper
class MedicalFusionParameterNode:
    """What the panel shows; saved with the scene. What each field means for a run:
    MedicalFusionLib.panel.options_from_panel (the 'As displayed' / 'No preset' sentinels are None there).
    registerFirst/registration/registerWith: align the functional first, or the volume placed like it
    (MedicalFusionLib.scene.place_registration). outputVolume/outputTable: None = new nodes each run."""

    anatomicalVolume: vtkMRMLScalarVolumeNode
    functionalVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
    colormap: Annotated[str, Choice([AS_DISPLAYED] + colour.colormap_names()), Default(AS_DISPLAYED)]
    useDisplayWindow: Annotated[bool, Default(True)]
    functionalWindowMin: float = 0.0
    functionalWindowMax: float = 1.0
    anatomicalWindowPreset: Annotated[str, Choice([NO_PRESET] + ANATOMICAL_PRESETS), Default(NO_PRESET)]
    functionalWindowPreset: Annotated[str, Choice([NO_PRESET] + FUNCTIONAL_PRESETS), Default(NO_PRESET)]
    registerFirst: Annotated[bool, Default(False)]
    registration: Annotated[str, Choice(REGISTRATION_CHOICES), Default("rigid")]
    registerWith: Union[vtkMRMLScalarVolumeNode, None]
    method: Annotated[str, Choice(choices.method_names()), Default(DEFAULT_METHOD)]
    device: Annotated[str, Choice(DEVICE_CHOICES), Default("auto")]
    axis: Annotated[str, Choice(AXIS_CHOICES), Default("axial")]
    computeMetrics: Annotated[bool, Default(True)]
    metricSet: Annotated[str, Choice(METRIC_SET_CHOICES), Default(choices.DEFAULT_METRIC_SET)]
    showAsForeground: Annotated[bool, Default(False)]
    switchToTableLayout: Annotated[bool, Default(False)]
    outputVolume: vtkMRMLVectorVolumeNode
    outputTable: vtkMRMLTableNode


class MedicalFusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin panel: binds the .ui to the parameter node, validates, runs the logic, shows results."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = self._lastFunctional = None
        self._running = self._cancelRequested = False
        self._notices = []              # what the panel changed in a loaded scene, kept in the status line
        self._missingDependencies = []  # pip names not importable yet (said in the status line)
        self._abortReason = None        # why the running fusion must stop (scene closed, input removed)
        self._runNodes = {}             # node ID -> its role, for the nodes the running fusion reads or writes
        self._runNotice = ""            # how the last run ended when it did not finish (kept in the status line)
        self._statusIsReason = False    # the status line shows why Fuse is disabled

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedicalFusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedicalFusionLogic()
        scene = slicer.mrmlScene
        self.addObserver(scene, scene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(scene, scene.EndCloseEvent, self.onSceneEndClose)
        # A scene added to this one (File > Add Data of a .mrml) replaces the parameter node's content:
        # let go of the GUI while it loads, connect again (checking the loaded values) afterwards.
        self.addObserver(scene, scene.StartImportEvent, self.onSceneStartImport)
        self.addObserver(scene, scene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(scene, scene.NodeAboutToBeRemovedEvent, self.onNodeAboutToBeRemoved)
        self.ui.fuseButton.connect("clicked(bool)", self.onFuseButton)
        self.ui.exportVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._checkCanExport)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicomButton)
        self.ui.progressBar.setVisible(False)
        self._missingDependencies = install.missing_dependencies()   # said whenever the status line is written
        self.initializeParameterNode()
        self._checkCanExport()

    def onReload(self) -> None:
        reloadSubmodules()   # MedicalFusionSlicer too: the self-test's tests live there
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        self._disconnectParameterNode()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._disconnectParameterNode()   # entering connects the GUI again

    def _abort(self, reason: str) -> None:
        """A fusion running now (the event came while it processed events) stops at its next cancel
        check and writes nothing."""
        if self._running and self._abortReason is None:
            self._abortReason = reason

    def onSceneStartClose(self, caller, event) -> None:
        self._abort(_("the scene was closed"))
        self.setParameterNode(None)

    def onSceneStartImport(self, caller, event) -> None:
        self._abort(_("a scene was added to this one"))
        self.onSceneStartClose(caller, event)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAboutToBeRemoved(self, caller, event, node) -> None:
        role = self._runNodes.get(node.GetID()) if node is not None and not slicer.mrmlScene.IsClosing() else None
        if role:
            self._abort(_("the {role} '{name}' was removed").format(role=role, name=node.GetName()))

    def onSceneEndImport(self, caller, event) -> None:
        """A scene read from a file: its fused volumes' colour legends go with them (scene.watch_legends)."""
        from MedicalFusionLib.scene import watch_legends  # noqa: PLC0415

        watch_legends(slicer.mrmlScene)
        self.onSceneEndClose(caller, event)

    def onSceneEndClose(self, caller, event) -> None:
        self.initializeParameterNode()   # also when hidden: the logic and self-test use this parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.anatomicalVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode") and not first.IsA("vtkMRMLVectorVolumeNode"):
                self._parameterNode.anatomicalVolume = first

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode is None:
            return
        if self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def setParameterNode(self, inputParameterNode) -> None:
        self._disconnectParameterNode()
        self._parameterNode = p = inputParameterNode
        if not p:
            return
        self._notices += acceptSavedChoices(p)
        # connectParametersToGui returns the tag on every Slicer version (5.8's connectGui returns None:
        # the GUI could never be disconnected and each entry stacked one more connection).
        mapping = {w.property("SlicerParameterName"): w for w in vars(self.ui).values() if hasattr(w, "property")}
        self._parameterNodeGuiTag = p.connectParametersToGui({k: w for k, w in mapping.items() if k})
        box, model = self.ui.methodComboBox, self.ui.methodComboBox.model()
        for index in range(box.count):   # tooltips; unavailable methods greyed, with the reason
            ok, tip = panel.method_tooltip(box.itemText(index))
            box.setItemData(index, tip, qt.Qt.ToolTipRole)
            if hasattr(model, "item") and model.item(index) is not None:
                model.item(index).setEnabled(ok)
        self._lastFunctional = p.functionalVolume
        self.addObserver(p, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._checkCanApply()
        notes = self._notices + panel.dependency_notice(self._missingDependencies)
        if notes and self.ui.fuseButton.enabled and not self._running:
            self.ui.statusLabel.text = " ".join(notes)
            self._statusIsReason = False

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is not None and p.functionalVolume is not self._lastFunctional:
            # Follow the parameter node, not the selector's signal: a write from that signal's slot would
            # refresh the GUI before the selection reached it, and the selector would jump back.
            self._lastFunctional = p.functionalVolume
            self.onFunctionalChanged(p.functionalVolume)
        self._checkCanApply()

    def onFunctionalChanged(self, node) -> None:
        """Show the functional's current display window in the (disabled) window boxes."""
        if not self._parameterNode or node is None or not node.GetDisplayNode():
            return
        from MedicalFusionLib.scene import display_settings  # noqa: PLC0415

        settings = display_settings(node)
        if settings.window is not None and self._parameterNode.useDisplayWindow:
            self._parameterNode.functionalWindowMin, self._parameterNode.functionalWindowMax = map(float, settings.window)

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if self._running:
            return
        if p is None:
            self.ui.fuseButton.enabled = False
            return
        for name, enabled in panel.control_states(p).items():
            getattr(self.ui, name).enabled = enabled
        ok, reason = self.logic.validate(p)
        self.ui.fuseButton.enabled = ok
        self.ui.fuseButton.toolTip = _("Fuse the functional volume into the anatomical one.") if ok else reason
        notes = self._notices + panel.dependency_notice(self._missingDependencies)
        if not ok:
            self.ui.statusLabel.text = " ".join(part for part in [self._runNotice, reason] + notes if part)
            self._statusIsReason = True
            return
        self._runNotice = ""   # shown until something else is said
        if self._statusIsReason:   # the reason no longer holds
            self.ui.statusLabel.text = " ".join(notes)
            self._statusIsReason = False

    def onFuseButton(self) -> None:
        """Fuse, or Cancel while a fusion runs."""
        if self._running:
            self._cancelRequested = True
            self.ui.fuseButton.text = _("Cancelling...")
            return
        if install.missing_dependencies():
            installed = ensureDependencies(askConfirmation=True)
            self._missingDependencies = install.missing_dependencies()
            if not installed:
                self.ui.statusLabel.text = _("Dependencies not installed: fusion needs PyTorch and scikit-image. "
                                             "Click Fuse to try again.")
                self._checkCanApply()
                return
            self.setParameterNode(self._parameterNode)   # re-fill the method list from the registry
            if not self.ui.fuseButton.enabled:
                return
        self._run()

    def _progress(self, done: int, total: int) -> None:
        self.ui.progressBar.maximum, self.ui.progressBar.value = max(1, total), done
        # Repaint only: clicks are taken in _cancel, which the logic calls before every progress report
        # until it starts writing; from then on user input waits, so nothing comes between the nodes it writes.
        slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)

    def _cancel(self) -> bool:
        slicer.app.processEvents()   # keeps Cancel clickable while the logic runs
        return self._cancelRequested or self._abortReason is not None

    def _setRunning(self, running: bool) -> None:
        self._running, self._cancelRequested = running, False
        self.ui.fuseButton.text = _("Cancel") if running else _("Fuse")
        self.ui.fuseButton.toolTip = _("Stop the fusion; nothing is written.") if running else ""
        self.ui.fuseButton.enabled = True
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        for box in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputsCollapsibleButton,
                    self.ui.exportCollapsibleButton):
            box.enabled = not running
        self._checkCanExport()
        if not running:
            self._checkCanApply()

    def _run(self) -> None:
        from MedicalFusionLib.errors import FusionCancelled, FusionError  # noqa: PLC0415

        p = self._parameterNode
        self._notices, self._abortReason, self._runNotice = [], None, ""
        self.ui.statusLabel.text = panel.running_message(p)
        self._setRunning(True)
        self._runNodes = panel.run_node_roles(p.anatomicalVolume, p.functionalVolume, p.outputVolume, p.outputTable)
        start = time.perf_counter()
        try:
            outcome = self.logic.process(p, progress=self._progress, cancel=self._cancel)
        except FusionCancelled:
            self._runNotice = panel.cancelled_message(self._abortReason)
            self.ui.statusLabel.text, self._statusIsReason = self._runNotice, False
            return
        except FusionError as exc:
            self.ui.statusLabel.text = str(exc)
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedicalFusion"))
            return
        except Exception as exc:  # noqa: BLE001 - show any failure to the user, details in the log
            logging.exception("MedicalFusion failed")
            self.ui.statusLabel.text = _("Failed: {error}").format(error=exc)
            slicer.util.errorDisplay(_("Fusion failed: {error}").format(error=exc), windowTitle=_("MedicalFusion"),
                                     detailedText=f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._setRunning(False)
        self.ui.statusLabel.text = panel.done_message(outcome, time.perf_counter() - start)
        if outcome.transform_node is not None and outcome.info.get("registration_warning"):
            slicer.util.warningDisplay(outcome.info["registration_warning"], windowTitle=_("MedicalFusion"))
        logging.info("MedicalFusion: %s | %s", self.ui.statusLabel.text, install.version_report(p.device))
        self.logic.showResults(outcome, p.anatomicalVolume, foreground=p.showAsForeground,
                               switchLayout=p.switchToTableLayout)
        self.ui.exportVolumeSelector.setCurrentNode(outcome.volume_node)   # ready to export

    def _checkCanExport(self, node=None) -> None:
        """The DICOM export button: enabled for a fused volume (a MedicalFusion result) while no fusion runs."""
        from MedicalFusionLib.scene_dicom import can_export  # noqa: PLC0415

        ok, reason = can_export(self.ui.exportVolumeSelector.currentNode())
        self.ui.exportDicomButton.enabled = ok and not self._running
        self.ui.exportDicomButton.toolTip = (_("Write the fused volume into the folder as a DICOM series of the "
                                               "anatomical's patient and study.") if ok else reason)

    def onExportDicomButton(self) -> None:
        """Export the selected fused volume as a DICOM series (MedicalFusionSlicer.results); one status line."""
        self._statusIsReason = False
        self.ui.statusLabel.text = exportFusedVolume(self.ui.exportVolumeSelector.currentNode(),
                                                     self.ui.exportFolderPathLineEdit.currentPath.strip())


class MedicalFusionLogic(ScriptedLoadableModuleLogic):
    """Runs on ``slicer.mrmlScene`` through the Qt-free ``MedicalFusionLib.scene`` (usable from the Python
    console or other modules without the widget)."""

    def getParameterNode(self):
        return MedicalFusionParameterNode(super().getParameterNode())

    def validate(self, p) -> tuple[bool, str]:
        """(ok, reason) for the panel: the scene's checks of the nodes, then the options' (panel.check)."""
        from MedicalFusionLib.scene import validate_inputs  # noqa: PLC0415

        ok, reason = validate_inputs(slicer.mrmlScene, p.anatomicalVolume, p.functionalVolume,
                                     p.outputVolume, p.outputTable)
        return panel.check(p) if ok else (ok, reason)

    def options(self, p) -> choices.FusionOptions:
        """The run's options (MedicalFusionLib.options.FusionOptions), as the CLI builds them."""
        return panel.options_from_panel(p)

    def process(self, p, progress=None, cancel=None):
        """Fuse as the parameter node says; returns ``MedicalFusionLib.scene.SceneFusionResult``. New nodes
        (and the registration's transform) go into the subject hierarchy beside the anatomical."""
        from MedicalFusionLib.scene import fuse_nodes, place_beside  # noqa: PLC0415

        outcome = fuse_nodes(slicer.mrmlScene, p.anatomicalVolume, p.functionalVolume, self.options(p),
                             output_volume=p.outputVolume, output_table=p.outputTable,
                             use_display_windows=p.useDisplayWindow, progress=progress, cancel=cancel,
                             register=p.registration if p.registerFirst else None,
                             register_with=p.registerWith if p.registerFirst else None)
        created = [slicer.mrmlScene.GetNodeByID(nodeID) for nodeID in outcome.created_node_ids]
        place_beside(slicer.mrmlScene, [n for n in created if n is not None], p.anatomicalVolume)
        return outcome

    showResults = staticmethod(showResults)   # MedicalFusionSlicer/results.py


class MedicalFusionTest(MedicalFusionSelfTests, ScriptedLoadableModuleTest):
    """The self-test where Slicer looks for it (``<ModuleName>Test``: Reload and Test runs ``runTest``, ctest
    the test_* methods one by one); its tests, on generated data, are in MedicalFusionSlicer/self_test.py."""

    logicClass = MedicalFusionLogic
