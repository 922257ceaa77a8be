"""A fusion's results in the application: shown in the slice views and a table view, and the fused
volume exported as a DICOM series (the panel's DICOM export, through MedicalFusionLib.scene_dicom)."""
from __future__ import annotations

import logging

import slicer
from slicer.i18n import tr as _


def showResults(outcome, anatomical, foreground: bool = False, switchLayout: bool = False) -> None:
    """Fused volume in the slice views (background, or foreground over the anatomical); the metrics table
    selected, so a table view of the layout shows it. The layout is switched to Four-Up + table only
    when ``switchLayout`` (the panel's option) asks for it. ``outcome``: scene.SceneFusionResult."""
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


def exportFusedVolume(volumeNode, folder: str) -> str:
    """Write the fused ``volumeNode`` into ``folder`` as a DICOM series of the anatomical's patient and
    study (MedicalFusionLib.scene_dicom). Returns the status line: what was written, or why not (an
    unexpected failure's details go to the log)."""
    from MedicalFusionLib.errors import FusionError  # noqa: PLC0415
    from MedicalFusionLib.scene_dicom import export_fused_node_dicom  # noqa: PLC0415

    try:
        with slicer.util.WaitCursor():
            done = export_fused_node_dicom(slicer.mrmlScene, volumeNode, folder)
    except FusionError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - show any failure to the user, details in the log
        logging.exception("MedicalFusion DICOM export failed")
        return _("DICOM export failed: {error}").format(error=exc)
    logging.info("MedicalFusion: %s", done.message)
    return done.message
