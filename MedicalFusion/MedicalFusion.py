"""MedicalFusion: the 3D Slicer module, on Slicer's scripted-module template (Module, parameter node,
Widget, Logic, self-test) plus the file reader of the sample.

Slicer glue only, and the only file that imports Qt/CTK/ScriptedLoadableModule. The work lives in the
Qt-free package ``MedicalFusionLib``: ``panel.py`` (what the panel offers, checks and says),
``install.py`` (the dependencies), ``scene.py`` (MRML nodes), ``sample.py`` (the demo pair), the
pipeline. Heavy dependencies (torch, scikit-image, scikit-learn, nilearn) are imported only when used,
after the user agreed to install them, so the module loads in a fresh Slicer.

It runs on Slicer 5.4 and newer, i.e. on Python 3.9 (CI checks this file with vermin). The tests run it
on Slicer's own Python layer (MedicalFusion/Testing/Python/slicer_harness.py).
"""
from __future__ import annotations

import importlib
import logging
import os
import pathlib
import time
import unittest
from typing import Annotated, Union

import ctk  # noqa: F401  (Slicer's CTK widgets, used by the .ui)
import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, findFirstAnnotation, parameterNodeWrapper, splitAnnotations
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedicalFusionLib import colour, install, panel
from MedicalFusionLib import options as choices
from MedicalFusionLib.options import AXES as AXIS_CHOICES
from MedicalFusionLib.options import DEFAULT_METHOD
from MedicalFusionLib.options import PANEL_DEVICES as DEVICE_CHOICES
from MedicalFusionLib.panel import ANATOMICAL_PRESETS, AS_DISPLAYED, FUNCTIONAL_PRESETS, NO_PRESET
from MedicalFusionLib.registration import KINDS as REGISTRATION_CHOICES
from MedicalFusionLib.sample import SAMPLE_FILE_TYPE, SAMPLE_NAME, SAMPLE_NODE_NAMES, SAMPLE_RECIPE_FILE

METRIC_SET_CHOICES = tuple(choices.METRIC_SETS)


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Install torch (through the PyTorch extension when present), scikit-image, scikit-learn and scipy,
    asking once (not when ``askConfirmation`` is False: an unattended self-test). True when everything
    is importable afterwards; a failure is one message and False, never an exception."""
    missing = install.missing_dependencies()
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("MedicalFusion needs these Python packages, which are not installed yet:\n\n  {packages}\n\n"
              "Install them now? PyTorch is a large download (up to a few GB with GPU support) and may take "
              "several minutes; Slicer may need a restart afterwards.").format(packages=", ".join(missing)),
            _("MedicalFusion: install dependencies")):
        return False
    torchUtils = None
    if "torch" in missing:
        try:
            import PyTorchUtils  # noqa: PLC0415  (the PyTorch extension picks the right CUDA build)
            torchUtils = PyTorchUtils.PyTorchUtilsLogic()
        except ImportError:
            pass
    try:
        with slicer.util.WaitCursor():
            still = install.install_dependencies(slicer.util.pip_install, torchUtils)
    except install.InstallFailed as exc:
        logging.error("MedicalFusion: %s", exc)
        slicer.util.errorDisplay(
            _("Installing {packages} failed ({detail}). Check the internet connection (and a proxy, if any), "
              "read pip's messages in the Python console, then click Fuse again.").format(
                packages=exc.packages, detail=exc.detail), windowTitle=_("MedicalFusion: installation failed"))
        return False
    if still:
        slicer.util.errorDisplay(_("MedicalFusion could not install: {packages}. See the Python console for pip's "
                                   "messages.").format(packages=", ".join(still)))
        return False
    logging.info("MedicalFusion: %s", install.version_report())
    return True


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


#
# Sample data
#


def _sampleRecipePath() -> str:
    return os.path.join(os.path.dirname(__file__), "Resources", SAMPLE_RECIPE_FILE)


def registerSampleData() -> None:
    """Add the demo pair to the Sample Data module (category "Medical Image Fusion"). The pair is generated,
    not downloaded: the source names the recipe file the extension ships by a file:// URI, with the file
    type of :class:`MedicalFusionFileReader`. Sample Data's button (no custom downloader) and
    ``SampleData.downloadSample`` both copy it to the cache and load it through the IO manager, i.e. the
    reader, which runs :func:`loadSample` (a custom downloader would serve the button only)."""
    import SampleData  # noqa: PLC0415

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=_("Medical Image Fusion"), sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "MedicalFusionSample.png"),
        uris=pathlib.Path(_sampleRecipePath()).resolve().as_uri(), fileNames=SAMPLE_RECIPE_FILE,
        nodeNames=SAMPLE_NODE_NAMES[0], loadFileType=SAMPLE_FILE_TYPE)   # the keyword Slicer 5.4 to main accept


class MedicalFusionFileReader:
    """The module's scripted file reader (found by its name and registered with the IO manager when the
    module loads): reads a ``*.mfsample`` recipe by generating and loading the demo pair. Sample Data
    loads the sample through it; dropping the file on Slicer does the same."""

    def __init__(self, parent):
        self.parent = parent

    def description(self) -> str:
        return _("MedicalFusion sample")

    def fileType(self) -> str:
        return SAMPLE_FILE_TYPE

    def extensions(self) -> list:
        return [_("MedicalFusion sample") + " (*.mfsample)"]

    def canLoadFile(self, filePath: str) -> bool:
        from MedicalFusionLib.sample import is_sample_recipe  # noqa: PLC0415

        return is_sample_recipe(filePath)

    def canLoadFileConfidence(self, filePath: str) -> float:
        return 0.6 if self.canLoadFile(filePath) else 0.0

    def load(self, properties) -> bool:
        try:
            nodes = loadSample()
        except Exception:  # noqa: BLE001 - a reader reports failure with False; the details go to the log
            logging.exception("MedicalFusion: loading the sample failed")
            return False
        self.parent.loadedNodes = [node.GetID() for node in nodes]
        return True


def _ensureSampleTemplate(askConfirmation: bool = True) -> bool:
    """The MNI152 template comes with the nilearn package: offer to install it on first use."""
    from MedicalFusionLib.sample import template_folder  # noqa: PLC0415

    if template_folder() is not None:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("The MedicalFusion sample is made from the MNI152 brain template that the nilearn Python package "
              "ships. Install nilearn now (a few tens of MB)?\n\nCancel loads a procedural head phantom instead."),
            _("MedicalFusion: sample data")):
        return False
    try:
        with slicer.util.WaitCursor():
            install.pip_install_quietly(slicer.util.pip_install, "nilearn")
    except install.INSTALL_ERRORS as exc:
        logging.warning("MedicalFusion: installing nilearn failed (%s); the sample is a procedural phantom", exc)
        return False
    importlib.invalidate_caches()
    return template_folder() is not None


def loadSample(source=None) -> list:
    """Load the demo pair (MNI152 T1 + simulated FDG PET, or the phantom pair without the template), generated
    once into Slicer's cache, as one study shown PET over MRI, and select it in the module. Returns
    [anatomical, functional]. ``source``: unused (what a custom downloader gets)."""
    from MedicalFusionLib.sample import write_sample  # noqa: PLC0415
    from MedicalFusionLib.scene import move_to_subject_hierarchy_item  # noqa: PLC0415

    haveTemplate = _ensureSampleTemplate(askConfirmation=not slicer.app.testingEnabled())
    folder = os.path.join(slicer.app.cachePath, "MedicalFusion", "sample-mni152" if haveTemplate else "sample-phantom")
    with slicer.util.WaitCursor():
        anatomicalPath, functionalPath = write_sample(folder)
    names = SAMPLE_NODE_NAMES if haveTemplate else (_("Phantom T1"), _("Phantom PET"))
    anatomical = slicer.util.loadVolume(str(anatomicalPath), {"name": names[0], "show": False})
    functional = slicer.util.loadVolume(str(functionalPath), {"name": names[1], "show": False,
                                                              "colorNodeID": colour.SLICER_COLOR_NODE_IDS["PET-Heat"]})
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), _("MedicalFusion sample")), _("PET/MRI demo"))
    move_to_subject_hierarchy_item(slicer.mrmlScene, [anatomical, functional], study)
    slicer.util.setSliceViewerLayers(background=anatomical, foreground=functional, foregroundOpacity=0.5, fit=True)
    parameterNode = MedicalFusionLogic().getParameterNode()
    parameterNode.anatomicalVolume, parameterNode.functionalVolume = anatomical, functional
    return [anatomical, functional]


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
        self._notices += self._acceptSavedChoices(p)
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

    def _acceptSavedChoices(self, p) -> list:
        """A value its combo box cannot show (a scene saved by a version with other methods) would make the
        GUI connection raise: reset it to its default. Returns the notices for the status line."""
        notices = []
        for name in p.allParameters:
            choice = findFirstAnnotation(splitAnnotations(p.dataType(name))[1], Choice)
            if choice is None or p.getValue(name) in choice.choices:
                continue
            message = _("The scene's {parameter} '{value}' is not available here: using '{default}'.").format(
                parameter=name, value=p.getValue(name), default=p.default(name).value)
            logging.warning("MedicalFusion: %s", message)
            p.setValue(name, p.default(name).value)
            notices.append(message)
        return notices

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
        scalar = panel.scalar_functional(p)
        self.ui.colormapComboBox.enabled = self.ui.functionalWindowPresetComboBox.enabled = scalar
        typed = scalar and not p.useDisplayWindow and p.functionalWindowPreset == NO_PRESET
        self.ui.functionalWindowMinSpinBox.enabled = self.ui.functionalWindowMaxSpinBox.enabled = typed
        self.ui.registrationComboBox.enabled = self.ui.registerWithSelector.enabled = p.registerFirst
        self.ui.metricSetComboBox.enabled = p.computeMetrics
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
            self._runNotice = (_("Cancelled: {reason}; nothing was written.").format(reason=self._abortReason)
                               if self._abortReason is not None else
                               _("Cancelled: nothing was written, the scene is unchanged."))
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
        """Export the selected fused volume as a DICOM series (MedicalFusionLib.scene_dicom); one status line."""
        from MedicalFusionLib.errors import FusionError  # noqa: PLC0415
        from MedicalFusionLib.scene_dicom import export_fused_node_dicom  # noqa: PLC0415

        self._statusIsReason = False
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            done = export_fused_node_dicom(slicer.mrmlScene, self.ui.exportVolumeSelector.currentNode(),
                                           self.ui.exportFolderPathLineEdit.currentPath.strip())
        except FusionError as exc:
            self.ui.statusLabel.text = str(exc)
            return
        except Exception as exc:  # noqa: BLE001 - show any failure to the user, details in the log
            logging.exception("MedicalFusion DICOM export failed")
            self.ui.statusLabel.text = _("DICOM export failed: {error}").format(error=exc)
            return
        finally:
            slicer.app.restoreOverrideCursor()
        self.ui.statusLabel.text = done.message
        logging.info("MedicalFusion: %s", done.message)


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

    @staticmethod
    def showResults(outcome, anatomical, foreground: bool = False, switchLayout: bool = False) -> None:
        """Fused volume in the slice views (background, or foreground over the anatomical); the metrics table
        selected, so a table view of the layout shows it. The layout is switched to Four-Up + table only
        when ``switchLayout`` (the panel's option) asks for it."""
        if foreground:
            slicer.util.setSliceViewerLayers(background=anatomical, foreground=outcome.volume_node,
                                             foregroundOpacity=1.0, fit=True)
        else:
            slicer.util.setSliceViewerLayers(background=outcome.volume_node, foreground=None, fit=True)
        if outcome.table_node is None:
            return
        layoutManager = slicer.app.layoutManager()
        if switchLayout and layoutManager is not None:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        appLogic = slicer.app.applicationLogic()
        if appLogic is not None:
            appLogic.GetSelectionNode().SetActiveTableID(outcome.table_node.GetID())
            appLogic.PropagateTableSelection()


class MedicalFusionTest(ScriptedLoadableModuleTest):
    """Inside Slicer, on generated data (no download): "Reload and Test" runs :meth:`runTest`; ctest
    (slicer.testing.runUnitTest) loads the test_* methods one by one. A test that needs PyTorch skips,
    with the reason, when it is not installed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Every test in order; skips are reported (``self.skipped``, a message), never raised: in "Reload
        and Test" an exception shows a failure dialog."""
        self.skipped = {}
        if not ensureDependencies(askConfirmation=not slicer.app.testingEnabled()):
            logging.warning("MedicalFusion self-test: the dependencies are not installed; the tests that need them skip")
        for test in (self.test_WidgetValidation, self.test_SampleData, self.test_FuseNodeToNode,
                     self.test_CancelAndBadInputLeaveSceneUnchanged, self.test_FuseSampleFromPanel,
                     self.test_SceneCloseCancelsFusion):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as exc:
                self.skipped[test.__name__] = str(exc)
                self.delayDisplay(f"Skipped {test.__name__}: {exc}")
            finally:
                self.tearDown()

    def _requireDependencies(self):
        missing = install.missing_dependencies()
        if missing:
            self.skipTest("needs " + ", ".join(missing) + ", not installed (the module's first Fuse installs them)")

    def _widget(self):
        return slicer.modules.medicalfusion.widgetRepresentation().self()

    def _phantom(self):
        from MedicalFusionLib.scene import add_phantom_pair  # noqa: PLC0415

        return add_phantom_pair(slicer.mrmlScene)

    def _loadSampleFromSampleData(self):
        import SampleData  # noqa: PLC0415

        logic = SampleData.SampleDataLogic()
        source = logic.sourceForSampleName(SAMPLE_NAME)
        self.assertIsNotNone(source, "the MedicalFusion sample is not registered with the Sample Data module")
        self.assertIsNone(source.customDownloader)
        loaded = logic.downloadFromSource(source)   # what its button in the Sample Data module does
        self.assertEqual(len(loaded), 1, loaded)
        p = MedicalFusionLogic().getParameterNode()
        self.assertIs(loaded[0], p.anatomicalVolume)
        return p.anatomicalVolume, p.functionalVolume

    def test_WidgetValidation(self):
        self.delayDisplay("Panel refuses bad input with a reason")
        from MedicalFusionLib.scene import validate_inputs  # noqa: PLC0415

        anatomical, functional = self._phantom()
        widget = self._widget()
        p = widget._parameterNode
        self.assertIsNotNone(p, "the panel has no parameter node after the scene was cleared")
        p.anatomicalVolume, p.functionalVolume, p.outputVolume = anatomical, functional, None
        self.assertTrue(widget.ui.fuseButton.enabled, widget.ui.fuseButton.toolTip)
        p.functionalVolume = None
        self.assertFalse(widget.ui.fuseButton.enabled)
        self.assertIn("functional", widget.ui.fuseButton.toolTip)
        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "segmentation")
        slicer.util.updateVolumeFromArray(label, np.ones((4, 4, 4), np.uint8))
        ok, reason = validate_inputs(slicer.mrmlScene, anatomical, label)   # hidden from the selectors, refused too
        self.assertFalse(ok)
        self.assertIn("label map", reason)

    def test_SampleData(self):
        self.delayDisplay("The sample pair from the Sample Data module")
        anatomical, functional = self._loadSampleFromSampleData()
        self.assertTrue(anatomical.IsA("vtkMRMLScalarVolumeNode") and functional.IsA("vtkMRMLScalarVolumeNode"))
        self.assertEqual(functional.GetDisplayNode().GetColorNodeID(), colour.SLICER_COLOR_NODE_IDS["PET-Heat"])
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        study = sh.GetItemParent(sh.GetItemByDataNode(anatomical))
        self.assertEqual(sh.GetItemLevel(study), "Study")
        self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(functional)), study)
        widget = self._widget()
        self.assertEqual((widget._parameterNode.anatomicalVolume, widget._parameterNode.functionalVolume),
                         (anatomical, functional))
        self.assertTrue(widget.ui.fuseButton.enabled, widget.ui.fuseButton.toolTip)

    def test_FuseSampleFromPanel(self):
        self.delayDisplay("Fuse the sample from the panel")
        self._requireDependencies()
        anatomical, functional = self._loadSampleFromSampleData()
        widget = self._widget()
        p = widget._parameterNode
        p.method, p.computeMetrics = "alpha", False
        layoutManager = slicer.app.layoutManager()
        layoutBefore = layoutManager.layout if layoutManager is not None else None
        widget.ui.fuseButton.click()
        fused = p.outputVolume or slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLVectorVolumeNode")
        self.assertIsNotNone(fused, widget.ui.statusLabel.text)
        self.assertEqual(fused.GetAttribute("MedicalFusion.method"), "alpha")
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(fused)), sh.GetItemParent(sh.GetItemByDataNode(anatomical)))
        if layoutManager is not None:
            self.assertEqual(layoutManager.layout, layoutBefore)
        self.assertTrue(widget.ui.fuseButton.enabled)

    def test_SceneCloseCancelsFusion(self):
        self.delayDisplay("Closing the scene during a fusion cancels it")
        self._requireDependencies()
        anatomical, functional = self._phantom()
        widget = self._widget()
        p = widget._parameterNode
        p.anatomicalVolume, p.functionalVolume, p.outputVolume, p.outputTable = anatomical, functional, None, None
        p.method, p.computeMetrics = "average", False
        qt.QTimer.singleShot(0, lambda: slicer.mrmlScene.Clear(0))   # File > Close Scene while it runs
        widget.ui.fuseButton.click()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLVectorVolumeNode"), 0,
                         widget.ui.statusLabel.text)
        self.assertEqual(widget._abortReason, _("the scene was closed"), widget.ui.statusLabel.text)
        self.assertTrue(widget.ui.fuseButton.text == _("Fuse") and widget.ui.inputsCollapsibleButton.enabled)

    def test_FuseNodeToNode(self):
        self.delayDisplay("Fusing a generated phantom node to node")
        self._requireDependencies()
        from MedicalFusionLib.metrics import COLOUR_METRIC_KEYS, metric_set_keys  # noqa: PLC0415
        from MedicalFusionLib.scene import fuse_nodes, ijk_to_ras  # noqa: PLC0415

        anatomical, functional = self._phantom()
        before, functionalMatrix = slicer.util.arrayFromVolume(functional).copy(), ijk_to_ras(functional)
        outcome = fuse_nodes(slicer.mrmlScene, anatomical, functional, choices.FusionOptions(method="alpha"))
        fused = outcome.volume_node
        self.assertTrue(fused.IsA("vtkMRMLVectorVolumeNode"))
        self.assertTrue(np.array_equal(ijk_to_ras(fused), ijk_to_ras(anatomical)))
        self.assertEqual(fused.GetImageData().GetScalarType(), vtk.VTK_UNSIGNED_CHAR)
        self.assertEqual(fused.GetImageData().GetNumberOfScalarComponents(), 3)
        names = [outcome.table_node.GetCellText(r, 0) for r in range(outcome.table_node.GetNumberOfRows())]
        defaultKeys = metric_set_keys(choices.DEFAULT_METRIC_SET)       # the quick set (issue 21)
        self.assertEqual(names[:len(defaultKeys)], defaultKeys)
        self.assertTrue(set(names[len(defaultKeys):]) <= set(COLOUR_METRIC_KEYS))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(functional), before))   # input untouched
        self.assertTrue(np.array_equal(ijk_to_ras(functional), functionalMatrix))
        self.assertIsNotNone(functional.GetParentTransformNode())
        MedicalFusionLogic.showResults(outcome, anatomical, foreground=True)

    def test_CancelAndBadInputLeaveSceneUnchanged(self):
        self.delayDisplay("Cancel and bad input")
        self._requireDependencies()
        from MedicalFusionLib.errors import FusionCancelled, FusionError  # noqa: PLC0415
        from MedicalFusionLib.scene import fuse_nodes  # noqa: PLC0415

        anatomical, functional = self._phantom()
        scene = slicer.mrmlScene
        ids = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
        with self.assertRaises(FusionCancelled):
            fuse_nodes(scene, anatomical, functional, choices.FusionOptions(method="average"), cancel=lambda: True)
        with self.assertRaises(FusionError):
            fuse_nodes(scene, anatomical, functional, choices.FusionOptions(method="average"), output_volume=None,
                       output_table=anatomical)
        self.assertEqual(ids, [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())])
