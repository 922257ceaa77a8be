"""MedicalFusion: the 3D Slicer module (Module, parameter node, Widget, Logic, sample data, self-test).

This file is Slicer glue only and the only one that imports Qt/CTK/ScriptedLoadableModule. The work
lives in the Qt-free package ``MedicalFusionLib`` (``scene.py`` reads and writes MRML nodes, the
pipeline fuses); heavy dependencies (torch, scikit-image, scikit-learn, nilearn for the sample) are
imported only when used, after the user agreed to install them, so the module loads in a fresh Slicer.

It runs on Slicer 5.4 and newer, i.e. on Python 3.9: keep it free of 3.10+ syntax and APIs (CI checks
this file and MedicalFusionLib with vermin). The tests run it on Slicer's own Python layer
(MedicalFusion/Testing/Python/slicer_harness.py).
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import pathlib
import subprocess
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

from MedicalFusionLib import colour, windows
from MedicalFusionLib import options as choices
from MedicalFusionLib.options import AXES as AXIS_CHOICES
from MedicalFusionLib.options import DEFAULT_METHOD
from MedicalFusionLib.options import PANEL_DEVICES as DEVICE_CHOICES
from MedicalFusionLib.registration import KINDS as REGISTRATION_CHOICES

AS_DISPLAYED = "As displayed"
#: First entry of the window preset boxes: no preset (the window comes from 'As displayed' or the data).
NO_PRESET = "No preset"
ANATOMICAL_PRESETS = [name for name in windows.preset_names() if name.startswith("ct-")]
FUNCTIONAL_PRESETS = [name for name in windows.preset_names() if name.startswith("pet-")] + ANATOMICAL_PRESETS
#: The metric sets' names (MedicalFusionLib.options: torch- and scipy-free, like the methods catalogue).
METRIC_SET_CHOICES = tuple(choices.METRIC_SETS)
#: Every method of the catalogue (MedicalFusionLib.options.METHODS), listed without importing torch.
METHOD_CHOICES = choices.method_names()
#: Python packages the core needs beyond what Slicer ships: (import name, pip name).
PIP_DEPENDENCIES = (("skimage", "scikit-image"), ("sklearn", "scikit-learn"), ("scipy", "scipy"))
#: The extension that installs torch for Slicer (named in EXTENSION_DEPENDS of the top CMakeLists.txt).
PYTORCH_EXTENSION = "PyTorch"
#: The sample registered with the Sample Data module (see registerSampleData).
SAMPLE_NAME = "MedicalFusionPETMRI"
SAMPLE_NODE_NAMES = ("MNI152 T1", "Simulated FDG PET")
#: What Sample Data downloads for the sample (a file the extension ships) and the file type of the
#: module's reader that loads it (see registerSampleData, MedicalFusionFileReader).
SAMPLE_RECIPE_FILE = "MedicalFusionSample.mfsample"
SAMPLE_RECIPE_MARKER = "MedicalFusion sample"
SAMPLE_FILE_TYPE = "MedicalFusionSample"
#: Errors a failed installation raises: pip's exit status, PythonSlicer not found, disk/network.
INSTALL_ERRORS = (subprocess.CalledProcessError, RuntimeError, OSError)


#
# Dependencies
#


def missingDependencies() -> list[str]:
    """pip names of the packages that are not importable yet (checked without importing them)."""
    missing = [] if importlib.util.find_spec("torch") is not None else ["torch"]
    missing += [pip for name, pip in PIP_DEPENDENCIES if importlib.util.find_spec(name) is None]
    return missing


def _pipInstall(requirements: str) -> None:
    """``slicer.util.pip_install`` under our wait cursor. Where Slicer's pip_install has its own
    progress and failure dialogs (5.10 and newer take keyword arguments), they are turned off: a
    failure gets one message, ours, which says what to do."""
    kwargs = {}
    if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(slicer.util.pip_install).parameters.values()):
        kwargs = {"show_progress": False}
    slicer.util.pip_install(requirements, **kwargs)


def _installFailed(packages: str, exc: Exception) -> None:
    """One message for a failed installation; the panel stays usable (Fuse can be clicked again)."""
    detail = f"pip exit status {exc.returncode}" if isinstance(exc, subprocess.CalledProcessError) else str(exc)
    logging.error("MedicalFusion: installing %s failed: %s", packages, detail)
    slicer.util.errorDisplay(
        _("Installing {packages} failed ({detail}). Check the internet connection (and a proxy, if any), "
          "read pip's messages in the Python console, then click Fuse again.").format(packages=packages, detail=detail),
        windowTitle=_("MedicalFusion: installation failed"))


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Install torch (through the PyTorch extension when present), scikit-image, scikit-learn, scipy.

    Asks once, for everything (unless ``askConfirmation`` is False, e.g. in an unattended self-test):
    the PyTorch extension is then told not to ask again. Returns True when everything is importable
    afterwards; a failed download gives one error message and False, never an exception.
    """
    missing = missingDependencies()
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("MedicalFusion needs these Python packages, which are not installed yet:\n\n  {packages}\n\n"
              "Install them now? PyTorch is a large download (up to a few GB with GPU support) and may take "
              "several minutes; Slicer may need a restart afterwards.").format(packages=", ".join(missing)),
            _("MedicalFusion: install dependencies")):
        return False
    with slicer.util.WaitCursor():
        if "torch" in missing:
            try:
                import PyTorchUtils  # noqa: PLC0415  (the PyTorch extension picks the right CUDA build)
            except ImportError:
                PyTorchUtils = None
            try:
                if PyTorchUtils is not None:
                    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                    if not torchLogic.torchInstalled():
                        logging.info("MedicalFusion: installing PyTorch through the %s extension", PYTORCH_EXTENSION)
                        if torchLogic.installTorch(askConfirmation=False) is None:
                            raise RuntimeError(_("the {extension} extension did not install torch").format(
                                extension=PYTORCH_EXTENSION))
                else:
                    logging.info("MedicalFusion: %s extension not found, installing torch with pip", PYTORCH_EXTENSION)
                    _pipInstall("torch")
            except INSTALL_ERRORS as exc:
                _installFailed("PyTorch", exc)
                return False
        pipNames = [pip for name, pip in PIP_DEPENDENCIES if importlib.util.find_spec(name) is None]
        if pipNames:
            logging.info("MedicalFusion: installing %s", " ".join(pipNames))
            try:
                _pipInstall(" ".join(pipNames))
            except INSTALL_ERRORS as exc:
                _installFailed(", ".join(pipNames), exc)
                return False
    importlib.invalidate_caches()
    still = missingDependencies()
    if still:
        slicer.util.errorDisplay(_("MedicalFusion could not install: {packages}. See the Python console for pip's "
                                   "messages.").format(packages=", ".join(still)))
        return False
    logging.info("MedicalFusion: %s", versionReport())
    return True


def versionReport(device: str = "auto") -> str:
    """One line with the versions in use and the device 'auto' resolves to."""
    import SimpleITK  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from MedicalFusionLib import __version__  # noqa: PLC0415
    from MedicalFusionLib.device import pick_device  # noqa: PLC0415

    try:
        dev = str(pick_device(device))
    except Exception as exc:  # noqa: BLE001 - a report, never an error
        dev = f"unavailable ({exc})"
    cuda = torch.version.cuda or "none"
    return (f"MedicalFusion {__version__}, torch {torch.__version__} (CUDA {cuda}), SimpleITK {SimpleITK.Version_VersionString()}, "
            f"numpy {np.__version__}; device {dev}")




#
# MedicalFusion
#


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
<br><br>Methods (hover one in the panel for its description and paper):
<ul>
<li><b>alpha</b>: what Slicer shows today, the functional as foreground at opacity 0.5; <b>average</b>, <b>max</b>: pixel baselines.</li>
<li><b>lp</b>: Laplacian pyramid (Burt &amp; Adelson, IEEE Trans. Commun. 1983; Burt &amp; Kolczynski, ICCV 1993);
<b>dwt</b>: wavelets (Li, Manjunath &amp; Mitra, Graph. Models Image Process. 1995).</li>
<li><b>gff</b>: guided filtering (Li, Kang &amp; Hu, IEEE TIP 2013); <b>nsct</b> (da Cunha, Zhou &amp; Do, IEEE TIP 2006);
<b>nsst_papcnn</b> (Yin, Liu, Liu &amp; Chen, IEEE TIM 2019); <b>lrd</b> (Li et al., IEEE TIM 2020);
<b>jbf_lge</b> (Li et al., Information Sciences 2021).</li>
<li>Networks: <b>mrdfn</b> (multiscale residual dense fusion network, Intelligent Oncology 2026),
<b>lywnet</b> (multi-scale pyramid residual weight network, Quant. Imaging Med. Surg. 2025),
<b>dmfnet</b> (DM-FNet, diffusion-trained encoder-decoder, He et al.); greyed out when their weights are missing.</li>
</ul>
Metrics (EN, SD, SF, AG, MI, FMI, SCD, VIF, Q<sup>AB/F</sup>, SSIM, PSNR, CC, ARI) are computed on 8-bit grayscale
slices as the fusion literature's evaluators do.
See <a href="https://github.com/medicalfusion/SlicerMedicalFusion/blob/main/docs/SLICER.md">the user guide</a> for a walk-through.
""")
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
    """Add the demo pair to the Sample Data module (category "Medical Image Fusion").

    The pair is generated, not downloaded, so the source names one small file the extension ships,
    ``Resources/MedicalFusionSample.mfsample``, by a file:// URI, with the file type of this module's
    file reader (:class:`MedicalFusionFileReader`). Sample Data then handles it as any sample,
    whichever way it is asked: its button (no custom downloader, so the button calls
    ``SampleDataLogic.downloadFromSource``) and ``SampleData.downloadSample(SAMPLE_NAME)`` both copy
    that file into Slicer's cache and load it through Slicer's IO manager, i.e. through the reader,
    which runs :func:`loadSample`. (A custom downloader would serve the button only:
    ``downloadSample`` ignores it and would fetch the URIs.)
    """
    import SampleData  # noqa: PLC0415

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=_("Medical Image Fusion"),
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(iconsPath, "MedicalFusionSample.png"),
        uris=pathlib.Path(_sampleRecipePath()).resolve().as_uri(),
        fileNames=SAMPLE_RECIPE_FILE,
        nodeNames=SAMPLE_NODE_NAMES[0],
        loadFileType=SAMPLE_FILE_TYPE,   # the keyword Slicer 5.4 to main accept
    )


class MedicalFusionFileReader:
    """Slicer's scripted file reader of this module (found by its name, ``<module>FileReader``, and
    registered with the IO manager when the module loads): reads a ``*.mfsample`` file, the
    sample's recipe, by generating and loading the demo pair (:func:`loadSample`). Sample Data
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
        if not str(filePath).lower().endswith(".mfsample"):
            return False
        try:
            with open(filePath, encoding="utf-8") as f:
                return f.readline().startswith(SAMPLE_RECIPE_MARKER)
        except OSError:
            return False

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
    from MedicalFusionLib import sample  # noqa: PLC0415

    if sample.template_folder() is not None:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("The MedicalFusion sample is made from the MNI152 brain template that the nilearn Python package "
              "ships. Install nilearn now (a few tens of MB)?\n\nCancel loads a procedural head phantom instead."),
            _("MedicalFusion: sample data")):
        return False
    try:
        with slicer.util.WaitCursor():
            _pipInstall("nilearn")
    except INSTALL_ERRORS as exc:
        logging.warning("MedicalFusion: installing nilearn failed (%s); the sample is a procedural phantom", exc)
        return False
    importlib.invalidate_caches()
    return sample.template_folder() is not None


def loadSample(source=None) -> list:
    """Load the demo pair (MNI152 T1 + a simulated FDG PET, or the procedural phantom pair when the
    template is not available) into the scene, in one study of the subject hierarchy, shown as PET
    over MRI, and select it in the module. Returns [anatomical node, functional node].

    The files are generated once into Slicer's cache folder (a few seconds) and reused afterwards.
    ``source``: unused (kept for callers that pass a SampleDataSource, as a custom downloader gets).
    """
    from MedicalFusionLib import sample  # noqa: PLC0415
    from MedicalFusionLib.scene import move_to_subject_hierarchy_item  # noqa: PLC0415

    haveTemplate = _ensureSampleTemplate(askConfirmation=not slicer.app.testingEnabled())
    folder = os.path.join(slicer.app.cachePath, "MedicalFusion", "sample-mni152" if haveTemplate else "sample-phantom")
    with slicer.util.WaitCursor():
        anatomicalPath, functionalPath = sample.write_sample(folder)
    names = SAMPLE_NODE_NAMES if haveTemplate else (_("Phantom T1"), _("Phantom PET"))
    anatomical = slicer.util.loadVolume(str(anatomicalPath), {"name": names[0], "show": False})
    functional = slicer.util.loadVolume(str(functionalPath), {"name": names[1], "show": False,
                                                              "colorNodeID": colour.SLICER_COLOR_NODE_IDS["PET-Heat"]})
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    subject = sh.CreateSubjectItem(sh.GetSceneItemID(), _("MedicalFusion sample"))
    study = sh.CreateStudyItem(subject, _("PET/MRI demo"))
    move_to_subject_hierarchy_item(slicer.mrmlScene, [anatomical, functional], study)
    slicer.util.setSliceViewerLayers(background=anatomical, foreground=functional, foregroundOpacity=0.5, fit=True)
    parameterNode = MedicalFusionLogic().getParameterNode()
    parameterNode.anatomicalVolume = anatomical
    parameterNode.functionalVolume = functional
    return [anatomical, functional]


#
# Parameter node
#


@parameterNodeWrapper
class MedicalFusionParameterNode:
    """What the panel shows; saved with the scene.

    anatomicalVolume - structural volume; the output has its grid.
    functionalVolume - PET/SPECT values or an RGB pseudo-colour volume (None: not selected; Slicer's
        wrapper needs the None in a Union of node types).
    colormap - colour map for a scalar functional; 'As displayed' = its display node's colour node.
    useDisplayWindow - take both windows from the display nodes (what the views show).
    functionalWindowMin/Max - the functional window when useDisplayWindow is off.
    anatomicalWindowPreset / functionalWindowPreset - a named window (MedicalFusionLib.windows: Slicer's
        CT presets, PET SUV 0-N) that wins over 'As displayed' and the typed window for that input;
        'No preset': as displayed, else automatic (a CT in HU gets the soft-tissue window).
    registerFirst, registration - align the functional to the anatomical first ('rigid' or 'affine'):
        the result becomes a new parent transform of the functional (MedicalFusionLib.scene.place_registration).
    registerWith - 'Register using': None registers the functional itself; another scalar volume of its
        study placed like it (the CT of a PET/CT) is registered instead and the transform becomes the
        parent of both (MedicalFusionLib.scene.check_register_with).
    method, device, axis - the fusion method (registry name), torch device, slice orientation.
    computeMetrics - also write the metrics table (on by default; progress and Cancel cover it too).
    metricSet - 'quick' (default): every metric but FMI, which takes most of the metrics' time on a CPU;
        'all' adds FMI.
    showAsForeground - show the result over the anatomical instead of as background.
    switchToTableLayout - switch the view layout to Four-Up + table to show the metrics (off: the
        user's layout is kept; the table still shows in a table view the layout already has).
    outputVolume / outputTable - nodes to overwrite; None = create new ones on each run.
    """

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
    method: Annotated[str, Choice(METHOD_CHOICES), Default(DEFAULT_METHOD)]
    device: Annotated[str, Choice(DEVICE_CHOICES), Default("auto")]
    axis: Annotated[str, Choice(AXIS_CHOICES), Default("axial")]
    computeMetrics: Annotated[bool, Default(True)]
    metricSet: Annotated[str, Choice(METRIC_SET_CHOICES), Default(choices.DEFAULT_METRIC_SET)]
    showAsForeground: Annotated[bool, Default(False)]
    switchToTableLayout: Annotated[bool, Default(False)]
    outputVolume: vtkMRMLVectorVolumeNode
    outputTable: vtkMRMLTableNode


def _choicesOf(parameterNode, name: str):
    """The ``Choice`` list of a parameter, or None."""
    choice = findFirstAnnotation(splitAnnotations(parameterNode.dataType(name))[1], Choice)
    return None if choice is None else choice.choices


#
# MedicalFusionWidget
#


class MedicalFusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin panel: binds the .ui to the parameter node, validates, runs the logic, shows results."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._notices = []   # what the panel changed in a loaded scene, kept in the status line
        self._lastFunctional = None
        self._missingDependencies = []   # pip names not importable yet (said in the status line)
        self._abortReason = None   # why the running fusion must stop (scene closed, input removed)
        self._runNodes = {}        # node ID -> its role, for the nodes the running fusion reads or writes
        self._runNotice = ""       # how the last run ended when it did not finish (kept in the status line)
        self._statusIsReason = False   # the status line shows why Fuse is disabled

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedicalFusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedicalFusionLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # A scene added to this one (File > Add Data of a .mrml) replaces the parameter node's content:
        # let go of the GUI while it loads, connect again (checking the loaded values) afterwards.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartImportEvent, self.onSceneStartImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        # Deleting a node the running fusion reads or writes cancels the run
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAboutToBeRemovedEvent, self.onNodeAboutToBeRemoved)
        self.ui.fuseButton.connect("clicked(bool)", self.onFuseButton)
        self.ui.exportVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._checkCanExport)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicomButton)
        self.ui.progressBar.setVisible(False)
        # Said in the status line whenever the panel shows it (not only here: opening the panel
        # and every validation write the status line afterwards)
        self._missingDependencies = missingDependencies()
        self.initializeParameterNode()
        self._checkCanExport()

    def cleanup(self) -> None:
        self._disconnectParameterNode()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Do not follow parameter node changes while hidden (entering connects the GUI again)
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        # A fusion running now (the close came while it processed events) stops at its next cancel
        # check and writes nothing: its result would land in the next, empty scene.
        if self._running and self._abortReason is None:
            self._abortReason = _("the scene was closed")
        self.setParameterNode(None)

    def onSceneStartImport(self, caller, event) -> None:
        if self._running and self._abortReason is None:
            self._abortReason = _("a scene was added to this one")
        self.onSceneStartClose(caller, event)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAboutToBeRemoved(self, caller, event, node) -> None:
        """A node the running fusion reads or writes is being deleted: the run stops at its next
        cancel check and writes nothing (a scene close is reported by onSceneStartClose)."""
        if not self._running or node is None or self._abortReason is not None or slicer.mrmlScene.IsClosing():
            return
        role = self._runNodes.get(node.GetID())
        if role:
            self._abortReason = _("the {role} '{name}' was removed").format(role=role, name=node.GetName())

    def onSceneEndImport(self, caller, event) -> None:
        """A scene read from a file (.mrml, .mrb): its fused volumes' colour legends go with them when
        they are removed (MedicalFusionLib.scene.watch_legends), then as after a close."""
        from MedicalFusionLib.scene import watch_legends  # noqa: PLC0415

        watch_legends(slicer.mrmlScene)
        self.onSceneEndClose(caller, event)

    def onSceneEndClose(self, caller, event) -> None:
        # Also when the module is not shown: its logic and self-test use the panel's parameter node.
        self.initializeParameterNode()

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
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._notices += self._acceptSavedChoices(self._parameterNode)
            # connectParametersToGui returns the tag on every Slicer version. Slicer 5.8's connectGui
            # returns None: the GUI could never be disconnected, each entry into the module stacked
            # one more connection, and re-filling the combo boxes reset method and colour map to
            # their first entry ('average', 'As displayed').
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._guiMapping())
            self._decorateMethodComboBox()
            self._lastFunctional = self._parameterNode.functionalVolume
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._checkCanApply()
            notes = self._notices + self._dependencyNotice()
            if notes and self.ui.fuseButton.enabled and not self._running:
                self.ui.statusLabel.text = " ".join(notes)
                self._statusIsReason = False

    def _dependencyNotice(self) -> list:
        """Why methods are missing from a Slicer where the dependencies are not installed yet."""
        if not self._missingDependencies:
            return []
        return [_("Not installed yet: {packages}. The fusion methods need them (the networks MRDFN, LYWNet and "
                  "DM-FNet need PyTorch), so they are not listed yet: the first Fuse offers to install them "
                  "(a few minutes).").format(packages=", ".join(self._missingDependencies))]

    def _guiMapping(self) -> dict:
        """Parameter name -> widget, from the widgets' SlicerParameterName (what connectGui collects)."""
        mapping = {}
        for widget in vars(self.ui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name:
                mapping[name] = widget
        return mapping

    def _acceptSavedChoices(self, p) -> list:
        """A value the combo box cannot show would make the GUI connection raise (a scene saved by a
        version with other methods): reset anything unknown to its default. Returns the notices for
        the status line."""
        notices = []
        for name in p.allParameters:
            choices = _choicesOf(p, name)
            if choices is None or p.getValue(name) in choices:
                continue
            default = p.default(name).value
            message = _("The scene's {parameter} '{value}' is not available here: using '{default}'.").format(
                parameter=name, value=p.getValue(name), default=default)
            logging.warning("MedicalFusion: %s", message)
            p.setValue(name, default)
            notices.append(message)
        return notices

    def _decorateMethodComboBox(self) -> None:
        """Tooltips (description + paper) on every method; unavailable ones greyed with the reason (from
        the catalogue: nothing is imported, torch need not be installed yet)."""
        model = self.ui.methodComboBox.model()
        for index in range(self.ui.methodComboBox.count):
            method = choices.method_info(self.ui.methodComboBox.itemText(index))
            ok, reason = method.available()
            tip = _("{description}\nReference: {reference}").format(description=method.description,
                                                                     reference=method.reference)
            if not ok:
                tip = _("Not available: {reason}").format(reason=reason) + "\n\n" + tip
            self.ui.methodComboBox.setItemData(index, tip, qt.Qt.ToolTipRole)
            item = model.item(index) if hasattr(model, "item") else None
            if item is not None:
                item.setEnabled(bool(ok))

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is not None and p.functionalVolume is not self._lastFunctional:
            # Follow the parameter node, not the selector's signal: a write from that signal's slot
            # would refresh the GUI from the parameter node before the selection reached it, and
            # the selector would jump back to the previous volume.
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
            self._parameterNode.functionalWindowMin = float(settings.window[0])
            self._parameterNode.functionalWindowMax = float(settings.window[1])

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._running:
            return
        p = self._parameterNode
        if p is None:
            self.ui.fuseButton.enabled = False
            return
        scalarFunctional = bool(p.functionalVolume) and not p.functionalVolume.IsA("vtkMRMLVectorVolumeNode")
        self.ui.colormapComboBox.enabled = scalarFunctional
        typed = scalarFunctional and not p.useDisplayWindow and p.functionalWindowPreset == NO_PRESET
        self.ui.functionalWindowMinSpinBox.enabled = typed
        self.ui.functionalWindowMaxSpinBox.enabled = typed
        self.ui.functionalWindowPresetComboBox.enabled = scalarFunctional
        self.ui.registrationComboBox.enabled = p.registerFirst
        self.ui.registerWithSelector.enabled = p.registerFirst
        self.ui.metricSetComboBox.enabled = p.computeMetrics
        ok, reason = self.logic.validate(p)
        self.ui.fuseButton.enabled = ok
        self.ui.fuseButton.toolTip = _("Fuse the functional volume into the anatomical one.") if ok else reason
        if not ok:
            parts = [self._runNotice, reason] + self._notices + self._dependencyNotice()
            self.ui.statusLabel.text = " ".join(part for part in parts if part)
            self._statusIsReason = True
        else:
            self._runNotice = ""   # shown until something else is said
            if self._statusIsReason:   # the reason no longer holds
                self.ui.statusLabel.text = " ".join(self._notices + self._dependencyNotice())
                self._statusIsReason = False

    def onFuseButton(self) -> None:
        """The Fuse button's clicked() handler: Fuse, or Cancel while a fusion runs."""
        if self._running:
            self._cancelRequested = True
            self.ui.fuseButton.text = _("Cancelling...")
            return
        if missingDependencies():
            installed = ensureDependencies(askConfirmation=True)
            self._missingDependencies = missingDependencies()
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
        self.ui.progressBar.maximum = max(1, total)
        self.ui.progressBar.value = done
        # Repaint only (as Sample Data's logMessage does): clicks are taken in _cancel, which the
        # logic calls before every progress report until it starts writing. From then on user input
        # waits for the end of the run, so no scene close or node deletion comes between the nodes
        # it writes.
        slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)

    def _cancel(self) -> bool:
        slicer.app.processEvents()   # keeps Cancel clickable while the logic runs
        return self._cancelRequested or self._abortReason is not None

    def _nodesOfRun(self, p) -> dict:
        """Node ID -> role for the nodes the run reads or writes: deleting one of them cancels it."""
        roles = {}
        for node, role in ((p.outputTable, _("output table")), (p.outputVolume, _("output volume")),
                           (p.functionalVolume, _("functional volume")), (p.anatomicalVolume, _("anatomical volume"))):
            if node is None:
                continue
            roles[node.GetID()] = role
            if node in (p.anatomicalVolume, p.functionalVolume):
                transform = node.GetParentTransformNode()
                while transform is not None:
                    roles[transform.GetID()] = _("parent transform of the {role}").format(role=role)
                    transform = transform.GetParentTransformNode()
        return roles

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
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
        self._notices = []
        self.ui.statusLabel.text = (_("Registering ({kind}), then fusing with '{method}'...").format(
            kind=p.registration, method=p.method) if p.registerFirst else
            _("Fusing with '{method}'...").format(method=p.method))
        self._setRunning(True)
        self._abortReason = None
        self._runNotice = ""
        self._runNodes = self._nodesOfRun(p)
        start = time.perf_counter()
        try:
            outcome = self.logic.process(p, progress=self._progress, cancel=self._cancel)
        except FusionCancelled:
            if self._abortReason is not None:
                self._runNotice = _("Cancelled: {reason}; nothing was written.").format(reason=self._abortReason)
            else:
                self._runNotice = _("Cancelled: nothing was written, the scene is unchanged.")
            self.ui.statusLabel.text = self._runNotice
            self._statusIsReason = False
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
        result = outcome.result
        outputs = f"'{outcome.volume_node.GetName()}'" + (f" + '{outcome.table_node.GetName()}'" if outcome.table_node else "")
        self.ui.statusLabel.text = _("Done in {seconds:.1f} s on {device} ('{method}', engine {engine:.1f} s) -> "
                                     "{outputs}.").format(seconds=time.perf_counter() - start, device=result.device,
                                                          method=result.method, engine=result.seconds, outputs=outputs)
        if outcome.transform_node is not None:
            info = outcome.info
            self.ui.statusLabel.text += " " + _("Registered: '{node}' is now the functional's parent transform "
                                                "(normalised mutual information {nmi}; restarts from perturbed "
                                                "starts end {centre} mm apart at the centre, {overlap} mm over the "
                                                "overlap).").format(
                node=outcome.transform_node.GetName(),
                nmi=info.get("registration_normalized_mutual_information", ""),
                centre=info.get("registration_spread_centre_mm", ""),
                overlap=info.get("registration_spread_overlap_mm", ""))
            if info.get("registration_warning"):
                self.ui.statusLabel.text += " " + _("Warning: {warning}").format(warning=info["registration_warning"])
                slicer.util.warningDisplay(info["registration_warning"], windowTitle=_("MedicalFusion"))
        logging.info("MedicalFusion: %s | %s", self.ui.statusLabel.text, versionReport(p.device))
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


#
# MedicalFusionLogic
#


class MedicalFusionLogic(ScriptedLoadableModuleLogic):
    """Runs on ``slicer.mrmlScene`` through the Qt-free ``MedicalFusionLib.scene`` (usable from the
    Python console or other modules without the widget)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return MedicalFusionParameterNode(super().getParameterNode())

    def validate(self, p) -> tuple[bool, str]:
        """(ok, reason) for the panel, from the scene checks plus the method and window settings."""
        from MedicalFusionLib.scene import validate_inputs  # noqa: PLC0415

        ok, reason = validate_inputs(slicer.mrmlScene, p.anatomicalVolume, p.functionalVolume,
                                     p.outputVolume, p.outputTable)
        if not ok:
            return ok, reason
        if (not p.useDisplayWindow and p.functionalWindowPreset == NO_PRESET
                and p.functionalWindowMax <= p.functionalWindowMin):
            return False, _("The functional window is empty: make its maximum larger than its minimum.")
        from MedicalFusionLib.errors import FusionError  # noqa: PLC0415

        try:
            available, why = choices.method_info(p.method).available()
        except FusionError as exc:
            return False, str(exc)
        if not available:
            return False, _("Method '{method}' is not available: {reason}").format(method=p.method, reason=why)
        try:
            choices.validate(self.options(p))
        except FusionError as exc:
            return False, str(exc)
        return True, ""

    def options(self, p) -> choices.FusionOptions:
        """The run's options (MedicalFusionLib.options.FusionOptions), as the CLI builds them."""
        scalar = p.functionalVolume is not None and not p.functionalVolume.IsA("vtkMRMLVectorVolumeNode")
        functional_preset = None if p.functionalWindowPreset == NO_PRESET or not scalar else p.functionalWindowPreset
        return choices.FusionOptions(
            method=p.method, device=p.device, axis=p.axis, compute_metrics=p.computeMetrics,
            metric_set=p.metricSet,
            colormap=None if p.colormap == AS_DISPLAYED or not scalar else p.colormap,
            functional_window=None if p.useDisplayWindow or not scalar or functional_preset
            else (p.functionalWindowMin, p.functionalWindowMax),
            anatomical_preset=None if p.anatomicalWindowPreset == NO_PRESET else p.anatomicalWindowPreset,
            functional_preset=functional_preset)

    def process(self, p, progress=None, cancel=None):
        """Fuse as the parameter node says; returns ``MedicalFusionLib.scene.SceneFusionResult``.

        New output nodes go into the subject hierarchy beside the anatomical (its study), so the
        Data module shows them with the images they came from; so does the registration's transform
        node when ``registerFirst`` is on.
        """
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
        """Fused volume in the slice views (background, or foreground over the anatomical); the metrics
        table selected, so a table view of the current layout shows it. The layout is the user's: it
        is switched to Four-Up + table only when ``switchLayout`` (the panel's option) asks for it."""
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


#
# MedicalFusionTest
#


class MedicalFusionTest(ScriptedLoadableModuleTest):
    """Inside Slicer, on generated data (no download): "Reload and Test" runs :meth:`runTest`; ctest
    (slicer.testing.runUnitTest) loads the test_* methods one by one. Either way each test sets up
    what it needs and a test that needs PyTorch skips, with the reason, when it is not installed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Every test in order. Skips are reported (``self.skipped``, a message) but never raised: in
        "Reload and Test" an exception shows a failure dialog."""
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
        missing = missingDependencies()
        if missing:
            self.skipTest("needs " + ", ".join(missing) + ", not installed (the module's first Fuse installs them)")

    def _widget(self):
        return slicer.modules.medicalfusion.widgetRepresentation().self()

    def _phantom(self):
        from MedicalFusionLib.scene import add_phantom_pair  # noqa: PLC0415

        return add_phantom_pair(slicer.mrmlScene)

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
        # a label map is hidden from the selectors; the logic refuses it too
        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "segmentation")
        slicer.util.updateVolumeFromArray(label, np.ones((4, 4, 4), np.uint8))
        ok, reason = validate_inputs(slicer.mrmlScene, anatomical, label)
        self.assertFalse(ok)
        self.assertIn("label map", reason)
        self.delayDisplay("Validation works")

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
        p = widget._parameterNode
        self.assertEqual((p.anatomicalVolume, p.functionalVolume), (anatomical, functional))
        self.assertTrue(widget.ui.fuseButton.enabled, widget.ui.fuseButton.toolTip)
        self.delayDisplay("Sample loaded and selected")

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
        self.delayDisplay("Sample fused")

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
        self.delayDisplay("Cancelled, nothing written")

    def test_FuseNodeToNode(self):
        self.delayDisplay("Fusing a generated phantom node to node")
        self._requireDependencies()
        from MedicalFusionLib.metrics import COLOUR_METRIC_KEYS, metric_set_keys  # noqa: PLC0415
        from MedicalFusionLib.scene import fuse_nodes, ijk_to_ras  # noqa: PLC0415

        anatomical, functional = self._phantom()
        before = slicer.util.arrayFromVolume(functional).copy()
        functionalMatrix = ijk_to_ras(functional)
        outcome = fuse_nodes(slicer.mrmlScene, anatomical, functional, choices.FusionOptions(method="alpha"))
        fused = outcome.volume_node
        self.assertTrue(fused.IsA("vtkMRMLVectorVolumeNode"))
        self.assertTrue(np.array_equal(ijk_to_ras(fused), ijk_to_ras(anatomical)))
        self.assertEqual(fused.GetImageData().GetScalarType(), vtk.VTK_UNSIGNED_CHAR)
        self.assertEqual(fused.GetImageData().GetNumberOfScalarComponents(), 3)
        table = outcome.table_node
        names = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
        default_keys = metric_set_keys(choices.DEFAULT_METRIC_SET)       # the quick set (issue 21)
        self.assertEqual(names[:len(default_keys)], default_keys)
        self.assertTrue(set(names[len(default_keys):]) <= set(COLOUR_METRIC_KEYS))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(functional), before))
        self.assertTrue(np.array_equal(ijk_to_ras(functional), functionalMatrix))
        self.assertIsNotNone(functional.GetParentTransformNode())
        MedicalFusionLogic.showResults(outcome, anatomical, foreground=True)
        self.delayDisplay("Phantom fused")

    def test_CancelAndBadInputLeaveSceneUnchanged(self):
        self.delayDisplay("Cancel and bad input")
        self._requireDependencies()
        from MedicalFusionLib.errors import FusionCancelled, FusionError  # noqa: PLC0415
        from MedicalFusionLib.scene import fuse_nodes  # noqa: PLC0415

        anatomical, functional = self._phantom()
        ids = [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())]
        with self.assertRaises(FusionCancelled):
            fuse_nodes(slicer.mrmlScene, anatomical, functional, choices.FusionOptions(method="average"),
                       cancel=lambda: True)
        with self.assertRaises(FusionError):
            fuse_nodes(slicer.mrmlScene, anatomical, functional, choices.FusionOptions(method="average"),
                       output_volume=None, output_table=anatomical)
        self.assertEqual(ids, [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())])
        self.delayDisplay("Scene unchanged")
