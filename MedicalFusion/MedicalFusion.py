"""MedicalFusion: the 3D Slicer module (Module, parameter node, Widget, Logic, self-test).

This file is Slicer glue only and the only one that imports Qt/CTK/ScriptedLoadableModule. The work
lives in the Qt-free package ``MedicalFusionLib`` (``scene.py`` reads and writes MRML nodes, the
pipeline fuses); heavy dependencies (torch, scikit-image, scikit-learn) are imported only when used,
after the user agreed to install them, so the module loads in a fresh Slicer.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from typing import Annotated, Union

import ctk  # noqa: F401  (Slicer's CTK widgets, used by the .ui)
import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode, vtkMRMLVectorVolumeNode
from slicer.parameterNodeWrapper import Choice, Default, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedicalFusionLib import colour

AS_DISPLAYED = "As displayed"
DEVICE_CHOICES = ("auto", "gpu", "cpu")
AXIS_CHOICES = ("axial", "coronal", "sagittal")
DEFAULT_METHOD = "lp"
#: Python packages the core needs beyond what Slicer ships: (import name, pip name).
PIP_DEPENDENCIES = (("skimage", "scikit-image"), ("sklearn", "scikit-learn"), ("scipy", "scipy"))


#
# Dependencies
#


def missingDependencies() -> list[str]:
    """pip names of the packages that are not importable yet (checked without importing them)."""
    missing = [] if importlib.util.find_spec("torch") is not None else ["torch"]
    missing += [pip for name, pip in PIP_DEPENDENCIES if importlib.util.find_spec(name) is None]
    return missing


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Install torch (through the PyTorch extension when present), scikit-image and scikit-learn.

    Asks first (unless ``askConfirmation`` is False, e.g. in an unattended self-test). Returns True
    when everything is importable afterwards. SimpleITK and numpy ship with Slicer.
    """
    missing = missingDependencies()
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "MedicalFusion needs these Python packages, which are not installed yet:\n\n  "
            + ", ".join(missing)
            + "\n\nInstall them now? PyTorch is a large download (up to a few GB with GPU support) and may "
              "take several minutes; Slicer may need a restart afterwards.",
            "MedicalFusion: install dependencies"):
        return False
    with slicer.util.WaitCursor():
        if "torch" in missing:
            try:
                import PyTorchUtils  # noqa: PLC0415  (the PyTorch extension picks the right CUDA build)

                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if not torchLogic.torchInstalled():
                    logging.info("MedicalFusion: installing PyTorch through the PyTorch extension")
                    if torchLogic.installTorch(askConfirmation=True) is None:
                        return False
            except ImportError:
                logging.info("MedicalFusion: PyTorch extension not found, installing torch with pip")
                slicer.util.pip_install("torch")
        pipNames = [pip for name, pip in PIP_DEPENDENCIES if importlib.util.find_spec(name) is None]
        if pipNames:
            logging.info("MedicalFusion: installing %s", " ".join(pipNames))
            slicer.util.pip_install(" ".join(pipNames))
    importlib.invalidate_caches()
    still = missingDependencies()
    if still:
        slicer.util.errorDisplay("MedicalFusion could not install: " + ", ".join(still)
                                 + ". See the Python console for pip's messages.")
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


class _MethodNames:
    """The registry's method names as a sequence for ``Choice``, read once torch is importable.

    The method registry imports torch, which a fresh Slicer does not have; until the dependencies
    are installed the list is just the default method. The widget re-connects its GUI after
    installing so the combobox and this list never disagree.
    """

    def __init__(self):
        self._names = None

    def _current(self):
        if self._names is None:
            if importlib.util.find_spec("torch") is None:
                return [DEFAULT_METHOD]
            from MedicalFusionLib.methods import method_names  # noqa: PLC0415

            self._names = list(method_names())
        return self._names

    def __iter__(self):
        return iter(self._current())

    def __contains__(self, value):
        # The default is checked when the parameter node class is created, at Slicer start-up:
        # answer it without importing torch and every network.
        if self._names is None and value == DEFAULT_METHOD:
            return True
        return value in self._current()

    def __len__(self):
        return len(self._current())

    def __getitem__(self, index):
        return self._current()[index]

    def __repr__(self):
        return repr(self._current())


METHOD_CHOICES = _MethodNames()


#
# MedicalFusion
#


class MedicalFusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Medical Image Fusion"
        self.parent.categories = ["Multimodal fusion"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedicalFusion developers"]
        self.parent.helpText = """
Fuses a functional volume (PET, SPECT, or an RGB pseudo-colour image) into an anatomical one (MRI or CT):
one RGB volume on the anatomical grid, fused slice by slice, plus a table of fusion quality metrics.
The functional is resampled with its parent transform; its colour map and window are the ones it is shown with.
Inputs are never modified; each run writes a new fused volume and metrics table unless you pick existing ones.
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
See <a href="https://github.com/medicalfusion/MedicalFusion">the project page</a> (docs/SLICER.md) for a walk-through.
"""
        self.parent.acknowledgementText = """
Built on 3D Slicer's scripted module template and parameter node wrapper, SimpleITK and PyTorch.
Fusion methods follow the cited papers; colour maps are Slicer's own (PET-Heat and others).
Test data: the Harvard Whole Brain Atlas (Johnson &amp; Becker) and the SPM12 templates.
"""


#
# Parameter node
#


@parameterNodeWrapper
class MedicalFusionParameterNode:
    """What the panel shows; saved with the scene.

    anatomicalVolume - structural volume; the output has its grid.
    functionalVolume - PET/SPECT values or an RGB pseudo-colour volume.
    colormap - colour map for a scalar functional; 'As displayed' = its display node's colour node.
    useDisplayWindow - take both windows from the display nodes (what the views show).
    functionalWindowMin/Max - the functional window when useDisplayWindow is off.
    method, device, axis - the fusion method (registry name), torch device, slice orientation.
    computeMetrics - also write the metrics table (on by default; progress and Cancel cover it too).
    showAsForeground - show the result over the anatomical instead of as background.
    outputVolume / outputTable - nodes to overwrite; None = create new ones on each run.
    """

    anatomicalVolume: vtkMRMLScalarVolumeNode
    functionalVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]
    colormap: Annotated[str, Choice([AS_DISPLAYED] + colour.colormap_names()), Default(AS_DISPLAYED)]
    useDisplayWindow: Annotated[bool, Default(True)]
    functionalWindowMin: float = 0.0
    functionalWindowMax: float = 1.0
    method: Annotated[str, Choice(METHOD_CHOICES), Default(DEFAULT_METHOD)]
    device: Annotated[str, Choice(DEVICE_CHOICES), Default("auto")]
    axis: Annotated[str, Choice(AXIS_CHOICES), Default("axial")]
    computeMetrics: Annotated[bool, Default(True)]
    showAsForeground: Annotated[bool, Default(False)]
    outputVolume: vtkMRMLVectorVolumeNode
    outputTable: vtkMRMLTableNode


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

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedicalFusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedicalFusionLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.fuseButton.connect("clicked(bool)", self.onFuseButton)
        self.ui.functionalSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onFunctionalChanged)
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()
        if missingDependencies():
            self.ui.statusLabel.text = ("PyTorch / scikit-image are not installed yet: the first Fuse offers to "
                                        "install them (about a few minutes).")

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.anatomicalVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode") and not first.IsA("vtkMRMLVectorVolumeNode"):
                self._parameterNode.anatomicalVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._decorateMethodComboBox()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _decorateMethodComboBox(self) -> None:
        """Tooltips (description + paper) on every method; unavailable ones greyed with the reason."""
        if importlib.util.find_spec("torch") is None:
            self.ui.methodComboBox.setItemData(0, "Install the dependencies (first Fuse) to list every method.",
                                               qt.Qt.ToolTipRole)
            return
        from MedicalFusionLib.methods import all_methods  # noqa: PLC0415

        model = self.ui.methodComboBox.model()
        for index, method in enumerate(all_methods()):
            if index >= self.ui.methodComboBox.count:
                break
            ok, reason = method.available()
            tip = f"{method.description}\nReference: {method.reference}"
            if not ok:
                tip = f"Not available: {reason}\n\n{tip}"
            self.ui.methodComboBox.setItemData(index, tip, qt.Qt.ToolTipRole)
            item = model.item(index) if hasattr(model, "item") else None
            if item is not None:
                item.setEnabled(bool(ok))

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
        self.ui.functionalWindowMinSpinBox.enabled = scalarFunctional and not p.useDisplayWindow
        self.ui.functionalWindowMaxSpinBox.enabled = scalarFunctional and not p.useDisplayWindow
        ok, reason = self.logic.validate(p)
        self.ui.fuseButton.enabled = ok
        self.ui.fuseButton.toolTip = "Fuse the functional volume into the anatomical one." if ok else reason
        if not ok:
            self.ui.statusLabel.text = reason

    def onFuseButton(self) -> None:
        if self._running:
            self._cancelRequested = True
            self.ui.fuseButton.text = "Cancelling..."
            return
        if missingDependencies():
            if not ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = "Dependencies not installed: fusion needs PyTorch and scikit-image."
                return
            self.setParameterNode(self._parameterNode)   # re-fill the method list from the registry
        self._run()

    def _progress(self, done: int, total: int) -> None:
        self.ui.progressBar.maximum = max(1, total)
        self.ui.progressBar.value = done
        slicer.app.processEvents()   # keeps Cancel clickable while the logic runs

    def _cancel(self) -> bool:
        slicer.app.processEvents()
        return self._cancelRequested

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
        self.ui.fuseButton.text = "Cancel" if running else "Fuse"
        self.ui.fuseButton.toolTip = "Stop the fusion; nothing is written." if running else ""
        self.ui.fuseButton.enabled = True
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        for box in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputsCollapsibleButton):
            box.enabled = not running
        if not running:
            self._checkCanApply()

    def _run(self) -> None:
        from MedicalFusionLib.errors import FusionCancelled, FusionError  # noqa: PLC0415

        p = self._parameterNode
        self.ui.statusLabel.text = f"Fusing with '{p.method}'..."
        self._setRunning(True)
        start = time.perf_counter()
        try:
            outcome = self.logic.process(p, progress=self._progress, cancel=self._cancel)
        except FusionCancelled:
            self.ui.statusLabel.text = "Cancelled: nothing was written, the scene is unchanged."
            return
        except FusionError as exc:
            self.ui.statusLabel.text = str(exc)
            slicer.util.errorDisplay(str(exc), windowTitle="MedicalFusion")
            return
        except Exception as exc:  # noqa: BLE001 - show any failure to the user, details in the log
            logging.exception("MedicalFusion failed")
            self.ui.statusLabel.text = f"Failed: {exc}"
            slicer.util.errorDisplay(f"Fusion failed: {exc}", windowTitle="MedicalFusion",
                                     detailedText=f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._setRunning(False)
        result = outcome.result
        self.ui.statusLabel.text = (
            f"Done in {time.perf_counter() - start:.1f} s on {result.device} ('{result.method}', engine "
            f"{result.seconds:.1f} s) -> '{outcome.volume_node.GetName()}'"
            + (f" and '{outcome.table_node.GetName()}'" if outcome.table_node else "") + ".")
        logging.info("MedicalFusion: %s | %s", self.ui.statusLabel.text, versionReport(p.device))
        self.logic.showResults(outcome, p.anatomicalVolume, foreground=p.showAsForeground)


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
        if not p.useDisplayWindow and p.functionalWindowMax <= p.functionalWindowMin:
            return False, "The functional window is empty: make its maximum larger than its minimum."
        if importlib.util.find_spec("torch") is not None:
            from MedicalFusionLib.methods import get_method  # noqa: PLC0415

            available, why = get_method(p.method).available()
            if not available:
                return False, f"Method '{p.method}' is not available: {why}"
        return True, ""

    def options(self, p):
        from MedicalFusionLib.pipeline import FusionOptions  # noqa: PLC0415

        scalar = p.functionalVolume is not None and not p.functionalVolume.IsA("vtkMRMLVectorVolumeNode")
        return FusionOptions(
            method=p.method, device=p.device, axis=p.axis, compute_metrics=p.computeMetrics,
            colormap=None if p.colormap == AS_DISPLAYED or not scalar else p.colormap,
            functional_window=None if p.useDisplayWindow or not scalar else (p.functionalWindowMin, p.functionalWindowMax))

    def process(self, p, progress=None, cancel=None):
        """Fuse as the parameter node says; returns ``MedicalFusionLib.scene.SceneFusionResult``."""
        from MedicalFusionLib.scene import fuse_nodes  # noqa: PLC0415

        return fuse_nodes(slicer.mrmlScene, p.anatomicalVolume, p.functionalVolume, self.options(p),
                          output_volume=p.outputVolume, output_table=p.outputTable,
                          use_display_windows=p.useDisplayWindow, progress=progress, cancel=cancel)

    @staticmethod
    def showResults(outcome, anatomical, foreground: bool = False) -> None:
        """Fused volume in the slice views (background, or foreground over the anatomical) and the
        metrics table in a table view."""
        if not slicer.app.layoutManager():
            return
        if foreground:
            slicer.util.setSliceViewerLayers(background=anatomical, foreground=outcome.volume_node,
                                             foregroundOpacity=1.0, fit=True)
        else:
            slicer.util.setSliceViewerLayers(background=outcome.volume_node, foreground=None, fit=True)
        if outcome.table_node is not None:
            layoutManager = slicer.app.layoutManager()
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            selection = slicer.app.applicationLogic().GetSelectionNode()
            selection.SetActiveTableID(outcome.table_node.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()


#
# MedicalFusionTest
#


class MedicalFusionTest(ScriptedLoadableModuleTest):
    """Inside Slicer, on a generated phantom (no download): the same checks as the pytest suite."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        if not ensureDependencies(askConfirmation=not slicer.app.testingEnabled()):
            self.skipTest("MedicalFusion dependencies (torch, scikit-image) are not installed")
        self.test_FuseNodeToNode()
        self.setUp()
        self.test_CancelAndBadInputLeaveSceneUnchanged()
        self.setUp()
        self.test_WidgetValidation()

    def _phantom(self):
        from MedicalFusionLib.scene import add_phantom_pair  # noqa: PLC0415

        return add_phantom_pair(slicer.mrmlScene)

    def test_FuseNodeToNode(self):
        self.delayDisplay("Fusing a generated phantom node to node")
        from MedicalFusionLib.pipeline import FusionOptions  # noqa: PLC0415
        from MedicalFusionLib.scene import fuse_nodes, ijk_to_ras  # noqa: PLC0415

        anatomical, functional = self._phantom()
        before = slicer.util.arrayFromVolume(functional).copy()
        functionalMatrix = ijk_to_ras(functional)
        outcome = fuse_nodes(slicer.mrmlScene, anatomical, functional, FusionOptions(method="alpha"))
        fused = outcome.volume_node
        self.assertTrue(fused.IsA("vtkMRMLVectorVolumeNode"))
        self.assertTrue(np.array_equal(ijk_to_ras(fused), ijk_to_ras(anatomical)))
        self.assertEqual(fused.GetImageData().GetScalarType(), vtk.VTK_UNSIGNED_CHAR)
        self.assertEqual(fused.GetImageData().GetNumberOfScalarComponents(), 3)
        from MedicalFusionLib.metrics import METRICS  # noqa: PLC0415

        self.assertEqual(outcome.table_node.GetNumberOfRows(), len(METRICS))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(functional), before))
        self.assertTrue(np.array_equal(ijk_to_ras(functional), functionalMatrix))
        self.assertIsNotNone(functional.GetParentTransformNode())
        MedicalFusionLogic.showResults(outcome, anatomical, foreground=True)
        self.delayDisplay("Phantom fused")

    def test_CancelAndBadInputLeaveSceneUnchanged(self):
        self.delayDisplay("Cancel and bad input")
        from MedicalFusionLib.errors import FusionCancelled, FusionError  # noqa: PLC0415
        from MedicalFusionLib.pipeline import FusionOptions  # noqa: PLC0415
        from MedicalFusionLib.scene import fuse_nodes  # noqa: PLC0415

        anatomical, functional = self._phantom()
        ids = [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())]
        with self.assertRaises(FusionCancelled):
            fuse_nodes(slicer.mrmlScene, anatomical, functional, FusionOptions(method="average"), cancel=lambda: True)
        with self.assertRaises(FusionError):
            fuse_nodes(slicer.mrmlScene, anatomical, functional, FusionOptions(method="average"),
                       output_volume=None, output_table=anatomical)
        self.assertEqual(ids, [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())])
        self.delayDisplay("Scene unchanged")

    def test_WidgetValidation(self):
        self.delayDisplay("Panel refuses bad input with a reason")
        from MedicalFusionLib.scene import validate_inputs  # noqa: PLC0415

        anatomical, functional = self._phantom()
        widget = slicer.modules.medicalfusion.widgetRepresentation().self()
        p = widget.logic.getParameterNode()
        p.anatomicalVolume, p.functionalVolume, p.outputVolume = anatomical, functional, None
        widget._checkCanApply()
        self.assertTrue(widget.ui.fuseButton.enabled)
        p.functionalVolume = None
        widget._checkCanApply()
        self.assertFalse(widget.ui.fuseButton.enabled)
        self.assertIn("functional", widget.ui.fuseButton.toolTip)
        # a label map is hidden from the selectors; the logic refuses it too
        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "segmentation")
        slicer.util.updateVolumeFromArray(label, np.ones((4, 4, 4), np.uint8))
        ok, reason = validate_inputs(slicer.mrmlScene, anatomical, label)
        self.assertFalse(ok)
        self.assertIn("label map", reason)
        self.delayDisplay("Validation works")
