"""The module's self-test: the tests ``MedicalFusionTest`` (MedicalFusion.py) runs inside Slicer, on
generated data (no download). "Reload and Test" runs :meth:`MedicalFusionSelfTests.runTest`; ctest
(``slicer_add_python_unittest``: slicer.testing.runUnitTest, unittest's loader) finds
``MedicalFusionTest`` in the module file and runs these test_* methods one by one."""
from __future__ import annotations

import logging
import unittest

import numpy as np
import qt
import slicer
import vtk
from slicer.i18n import translate

from MedicalFusionLib import colour, install
from MedicalFusionLib import options as choices
from MedicalFusionLib.sample import SAMPLE_NAME

from .dependencies import ensureDependencies


class MedicalFusionSelfTests:
    """The tests of ``MedicalFusionTest(MedicalFusionSelfTests, ScriptedLoadableModuleTest)``, which sets
    :attr:`logicClass` to the module's Logic. Not a TestCase itself, so unittest's loader collects these
    tests once, through the module file's class. A test that needs PyTorch skips, with the reason, when it
    is not installed."""

    #: The module's Logic class (MedicalFusionLogic), set by MedicalFusionTest
    logicClass = None

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

    def _parentItem(self, node):
        """The subject hierarchy item ``node`` sits under (its study, for a loaded pair)."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        return sh.GetItemParent(sh.GetItemByDataNode(node))

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
        p = self.logicClass().getParameterNode()
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
        study = self._parentItem(anatomical)
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        self.assertEqual(sh.GetItemLevel(study), "Study")
        self.assertEqual(self._parentItem(functional), study)
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
        self.assertEqual(self._parentItem(fused), self._parentItem(anatomical))
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
        self.assertEqual(widget._abortReason, translate("MedicalFusion", "the scene was closed"), widget.ui.statusLabel.text)
        self.assertTrue(widget.ui.fuseButton.text == translate("MedicalFusion", "Fuse") and widget.ui.inputsCollapsibleButton.enabled)

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
        self.logicClass.showResults(outcome, anatomical, foreground=True)

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
