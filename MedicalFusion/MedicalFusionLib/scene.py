"""MRML scene <-> fusion pipeline: the logic behind the 3D Slicer panel, with no Qt and no application.

Everything here takes the ``vtkMRMLScene`` as an argument (never ``slicer.mrmlScene``), so it runs in
Slicer and, outside it, on a scene from the ``slicer-core`` wheel (that is how the tests drive it).
This is the only core module that imports ``slicer``; nothing else in the package imports this one.

What :func:`fuse_nodes` does, node to node:

1. reads both volume nodes: voxels (copied), geometry (IJKToRAS), and from their display nodes the
   window/level and, for a scalar functional, the colour node;
2. turns them into SimpleITK images in ITK's LPS convention (direction = diag(-1,-1,1) @ IJKToRAS
   direction, origin likewise, spacing from the node);
3. expresses the nodes' parent transforms as one SimpleITK transform from the anatomical's local
   space to the functional's (linear: an affine; non-linear: a displacement field sampled on the
   anatomical grid). Neither node is hardened or otherwise touched;
4. runs :func:`MedicalFusionLib.pipeline.fuse_images` with progress and cancel callbacks;
5. only after it succeeded, builds every output off the scene (the voxels' vtkImageData, the
   metrics' vtkTable) and then writes them together: a ``vtkMRMLVectorVolumeNode`` (RGB uint8, the
   anatomical's exact IJKToRAS, under the anatomical's parent transform) and a ``vtkMRMLTableNode``.

Cancel (:class:`FusionCancelled`) or an error (:class:`FusionError`) therefore leaves the scene as
it was: no node is created and output nodes passed in are not modified. All or nothing holds for
the writing step too: if putting any output in place fails, the nodes it created are removed and
the output nodes passed in get back their data, geometry, attributes and display nodes.

Colour of a scalar functional: ``FusionOptions.colormap`` when given; otherwise the colour node its
display node uses. A colour node of the shipped list (PET-Heat, Rainbow, Grey, ...) is passed to the
pipeline by name; any other colour node by its own lookup table (the pipeline resamples the values
first and colours them after, as the slice views do). A display node without a colour node falls
back to PET-Heat with a logged warning.

Windows: ``FusionOptions`` windows when given; otherwise (``use_display_windows=True``) each input's
display window/level, i.e. what the user sees in the slice views; otherwise the pipeline's defaults.

Colour legend: a fused volume coloured through a map (not a grayscale fusion, not an RGB
functional) gets Slicer's colour legend in the slice views, showing the map over the window the
run used, in the functional's units (see :func:`add_colour_legend`).

The metrics table has one row per metric and the columns ``metric, mean, std, slices,
description``. How the result was made is stored as node attributes on both outputs (see
:data:`ATTRIBUTE_PREFIX`): method, device, seconds, slice axis, windows, colour map, inputs, versions.
The fused volume also references its two input nodes (MRML node references, roles
:data:`INPUT_REFERENCE_ROLES`: kept when the scene is saved, read back or imported).
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import __version__, colour
from . import legend as colour_bar
from .errors import FusionError
from .progress import Progress
from .windows import display_metadata

logger = logging.getLogger(__name__)

#: Prefix of the attributes written on the output volume and table nodes.
ATTRIBUTE_PREFIX = "MedicalFusion."
#: Node classes that hold more than one 3D frame (time series, diffusion, multi-volume).
#: (vtkMRMLVectorVolumeNode derives from vtkMRMLTensorVolumeNode, so the tensor base class is not listed.)
FOUR_D_CLASSES = ("vtkMRMLMultiVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLDiffusionTensorVolumeNode")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: Node reference roles from a fused volume to the nodes it was fused from (the DICOM export reads them).
INPUT_REFERENCE_ROLES = {"anatomical": "MedicalFusion.anatomical", "functional": "MedicalFusion.functional"}


def _slicer():
    import slicer  # noqa: PLC0415  (only this module needs slicer; import when used)

    return slicer


def _vtk():
    import vtk  # noqa: PLC0415

    return vtk


# --------------------------------------------------------------------------------------------------
# reading nodes


def _resolve(scene, node, role: str):
    """A node object or ID -> the node, checked to be in ``scene``."""
    if node is None or node == "":
        return None
    if isinstance(node, str):
        found = scene.GetNodeByID(node)
        if found is None:
            raise FusionError(f"the {role} node '{node}' is not in the scene")
        return found
    if node.GetScene() is not scene:
        raise FusionError(f"the {role} node '{node.GetName()}' belongs to another scene")
    return node


def ijk_to_ras(node) -> np.ndarray:
    """The node's 4x4 IJKToRAS matrix (its own geometry, without parent transforms)."""
    vtk = _vtk()
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def lps_geometry(node) -> tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) of a volume node in ITK's LPS convention."""
    m = ijk_to_ras(node)
    spacing = np.array(node.GetSpacing(), dtype=float)
    direction_ras = m[:3, :3] / spacing[None, :]
    direction = _RAS_TO_LPS @ direction_ras
    origin = _RAS_TO_LPS @ m[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def image_from_node(node) -> sitk.Image:
    """A copy of a volume node's voxels as a 3D SimpleITK image (scalar or vector) in LPS."""
    slicer = _slicer()
    arr = slicer.util.arrayFromVolume(node)      # a view [K, J, I] or [K, J, I, C]; copied below
    vector = arr.ndim == 4
    if vector and arr.shape[-1] == 1:
        arr, vector = arr[..., 0], False
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=vector)
    origin, spacing, direction = lps_geometry(node)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


@dataclass
class DisplaySettings:
    """What a volume's display node shows: window (lo, hi), colour node ID and its 256x3 table."""

    window: tuple[float, float] | None = None
    color_node_id: str | None = None
    colormap: str | None = None           # name in the shipped list, when the node is one of them
    table: np.ndarray | None = None       # the colour node's own table when it is not


def display_settings(node) -> DisplaySettings:
    """Read (never change) the window/level and colour node of a volume's display node."""
    out = DisplaySettings()
    dn = node.GetDisplayNode()
    if dn is None:
        return out
    if hasattr(dn, "GetWindow"):
        w, level = float(dn.GetWindow()), float(dn.GetLevel())
        if np.isfinite(w) and np.isfinite(level) and w > 0:
            out.window = (level - w / 2.0, level + w / 2.0)
    out.color_node_id = dn.GetColorNodeID()
    if out.color_node_id:
        by_id = {v: k for k, v in colour.SLICER_COLOR_NODE_IDS.items()}
        out.colormap = by_id.get(out.color_node_id)
        if out.colormap is None:
            color_node = dn.GetColorNode()
            lut = color_node.GetLookupTable() if color_node is not None else None
            if lut is not None and lut.GetNumberOfTableValues() > 0:
                out.table = np.array([lut.GetTableValue(i)[:3] for i in range(lut.GetNumberOfTableValues())],
                                     dtype=np.float32)
    return out


#: Voxel value unit codes (UCUM, as Slicer's DICOM plugins and the PET DICOM extension write them).
HU_CODE = ("[hnsf'U]", "UCUM", "Hounsfield unit")
SUVBW_CODE = ("{SUVbw}g/ml", "UCUM", "Standardized Uptake Value body weight")


def _subject_hierarchy_attribute(node, name: str) -> str:
    """An attribute of the node's subject hierarchy item (where Slicer's DICOM module puts
    ``DICOM.Modality``), or ''."""
    scene = node.GetScene()
    # an existing subject hierarchy only: GetSubjectHierarchyNode would add one to the scene
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene is not None else None
    if sh is None:
        return ""
    item = sh.GetItemByDataNode(node)
    return sh.GetItemAttribute(item, name) if item else ""


def node_units(node) -> str | None:
    """What a volume node's values are: 'HU', 'SUVbw', ... or None when nothing says.

    First match: our own attribute ``MedicalFusion.units`` (set by :func:`load_dicom_volume`); the
    node's voxel value units code (``[hnsf'U]`` -> HU, ``{SUVbw}g/ml`` -> SUVbw: what Slicer's DICOM
    plugins and the PET DICOM extension set); the ``DICOM.Modality`` attribute of the node or of its
    subject hierarchy item (``CT`` -> HU). None lets the pipeline judge from the values.
    """
    attr = node.GetAttribute(ATTRIBUTE_PREFIX + "units")
    if attr:
        return attr
    coded = node.GetVoxelValueUnits() if hasattr(node, "GetVoxelValueUnits") else None
    code = (coded.GetCodeValue() or "") if coded is not None else ""
    if code == HU_CODE[0]:
        return "HU"
    if code.startswith("{SUV") and code.endswith("}g/ml"):
        return code[1:-len("}g/ml")]
    modality = node.GetAttribute("DICOM.Modality") or _subject_hierarchy_attribute(node, "DICOM.Modality")
    if (modality or "").upper() == "CT":
        return "HU"
    return None


def add_volume_from_image(scene, image: sitk.Image, name: str):
    """A new scalar volume node holding a 3D SimpleITK image (LPS) with its geometry in RAS, and
    its default display node."""
    slicer, vtk = _slicer(), _vtk()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    direction = _RAS_TO_LPS @ np.array(image.GetDirection()).reshape(3, 3)   # LPS -> RAS (its own inverse)
    origin = _RAS_TO_LPS @ np.array(image.GetOrigin())
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, direction[r, c] * image.GetSpacing()[c])
        m.SetElement(r, 3, origin[r])
    node.SetIJKToRASMatrix(m)
    node.CreateDefaultDisplayNodes()
    return node


def load_dicom_volume(scene, folder, name: str | None = None):
    """Load one DICOM series folder into a new scalar volume node, as a radiologist would see it.

    The voxels are read as the command line reads them (SimpleITK; PET in SUV when its header
    allows, see :mod:`MedicalFusionLib.io.dicom`). The node gets the units (``MedicalFusion.units``
    and the voxel value units code), ``DICOM.Modality`` and ``DICOM.FrameOfReferenceUID``
    attributes, the series folder (``MedicalFusion.dicom_folder``: the DICOM export of a fused
    volume reads patient, study and source instances there, see :mod:`MedicalFusionLib.scene_dicom`), and a display node with the window the pipeline would choose (a CT in HU: the
    soft-tissue preset; PET: PET-Heat when that colour node is in the scene). A notice about PET
    units (logged when the series is read) is kept in ``MedicalFusion.units_notice``. Returns the node.
    """
    from .pipeline import functional_window_default  # noqa: PLC0415
    from .io.read import read_source  # noqa: PLC0415
    from .windows import choose_window  # noqa: PLC0415

    source = read_source(folder, "DICOM")
    facts = source.facts
    if facts is None:
        raise FusionError(f"{folder} is not a DICOM series folder: give the folder that holds the series")
    node = add_volume_from_image(scene, source.image, name or facts.series_description or facts.modality or "DICOM")
    if facts.units:
        node.SetAttribute(ATTRIBUTE_PREFIX + "units", facts.units)
    node.SetAttribute("DICOM.Modality", facts.modality)
    node.SetAttribute("DICOM.FrameOfReferenceUID", facts.frame_of_reference_uid)
    # where its files are: the DICOM export of a fused volume takes patient, study and sources from them
    node.SetAttribute(ATTRIBUTE_PREFIX + "dicom_folder", os.path.abspath(str(folder)))
    code = {"HU": HU_CODE, "SUVbw": SUVBW_CODE}.get(facts.units)
    if code is not None:
        coded = _slicer().vtkCodedEntry()
        coded.SetValueSchemeMeaning(*code)
        node.SetVoxelValueUnits(coded)
    if facts.notice:              # logged when the series was read
        node.SetAttribute(ATTRIBUTE_PREFIX + "units_notice", facts.notice)
    display = node.GetDisplayNode()
    if facts.modality == "PT":
        window = functional_window_default(source.image)
        if scene.GetNodeByID(colour.SLICER_COLOR_NODE_IDS["PET-Heat"]) is not None:
            display.SetAndObserveColorNodeID(colour.SLICER_COLOR_NODE_IDS["PET-Heat"])
    else:
        window = choose_window(source.image, "anatomical", units=facts.units or None).window
        if window is None:                    # the pipeline's automatic anatomical window
            window = colour.robust_window(sitk.GetArrayViewFromImage(source.image))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*window)
    return node


def _number_of_components(node) -> int:
    image = node.GetImageData()
    return int(image.GetNumberOfScalarComponents()) if image is not None else 0


def _sequence_of(scene, node):
    """The sequence browser node that has ``node`` as a proxy (a 4D time series), else None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        if browser.IsProxyNodeID(node.GetID()):
            return browser
    return None


# --------------------------------------------------------------------------------------------------
# parent transforms


def _transformed_ras_bounds(node) -> np.ndarray:
    b = [0.0] * 6
    node.GetRASBounds(b)          # world bounds: parent transforms applied
    return np.array(b).reshape(3, 2)


def functional_transform(anatomical, functional) -> sitk.Transform | None:
    """SimpleITK transform from the anatomical's physical (LPS, local) space to the functional's.

    It combines both parent transforms: functional-local <- world <- anatomical-local. None when
    neither node has a parent transform. Non-linear transforms become a displacement field sampled
    at the anatomical's voxel centres (exact at the points the pipeline resamples).
    """
    slicer, vtk = _slicer(), _vtk()
    a_parent = anatomical.GetParentTransformNode()
    f_parent = functional.GetParentTransformNode()
    if a_parent is None and f_parent is None:
        return None
    m = vtk.vtkMatrix4x4()
    if slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(a_parent, f_parent, m):
        ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        lps = flip @ ras @ flip
        if np.allclose(lps, np.eye(4)):
            return None
        t = sitk.AffineTransform(3)
        t.SetMatrix(lps[:3, :3].ravel().tolist())
        t.SetTranslation(lps[:3, 3].tolist())
        return t
    general = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(a_parent, f_parent, general)
    return _displacement_field(anatomical, general)


def _displacement_field(anatomical, general) -> sitk.Transform:
    """Sample a VTK (RAS) transform at the anatomical's voxel centres as an ITK displacement field."""
    vtk = _vtk()
    from vtk.util import numpy_support  # noqa: PLC0415

    dims = anatomical.GetImageData().GetDimensions()
    m = ijk_to_ras(anatomical)
    k, j, i = np.meshgrid(np.arange(dims[2]), np.arange(dims[1]), np.arange(dims[0]), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)], axis=0)
    ras = (m @ ijk)[:3].T.astype(np.float64)
    points = vtk.vtkPoints()
    points.SetData(numpy_support.numpy_to_vtk(ras, deep=True))
    moved = vtk.vtkPoints()
    general.TransformPoints(points, moved)
    ras_moved = numpy_support.vtk_to_numpy(moved.GetData()).astype(np.float64)
    disp = (ras_moved - ras) * np.array([-1.0, -1.0, 1.0])
    field = sitk.GetImageFromArray(disp.reshape(dims[2], dims[1], dims[0], 3), isVector=True)
    origin, spacing, direction = lps_geometry(anatomical)
    field.SetOrigin(origin)
    field.SetSpacing(spacing)
    field.SetDirection(direction)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


# --------------------------------------------------------------------------------------------------
# validation


def validate_inputs(scene, anatomical, functional, output_volume=None, output_table=None) -> tuple[bool, str]:
    """(ok, reason) for the panel: what stops fusion, as one line the user can act on.

    Checks: both inputs selected and in ``scene``, image data present, no label map, no 4D
    volume (multi-volume, diffusion, sequence proxy, more than 3 components), no fused volume of
    ours as an input, the output not one of the inputs, and the two volumes overlapping in world
    space (parent transforms applied).
    """
    try:
        anatomical = _resolve(scene, anatomical, "anatomical")
        functional = _resolve(scene, functional, "functional")
        output_volume = _resolve(scene, output_volume, "output volume")
        output_table = _resolve(scene, output_table, "output table")
    except FusionError as exc:
        return False, str(exc)
    if anatomical is None:
        return False, "Select an anatomical volume (MRI or CT)."
    if functional is None:
        return False, "Select a functional volume (PET, SPECT or an RGB pseudo-colour image)."
    if anatomical is functional:
        return False, "The anatomical and functional volumes are the same node: select two different volumes."
    for role, node in (("anatomical", anatomical), ("functional", functional)):
        name = node.GetName()
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            return False, f"The {role} volume '{name}' is a label map (segmentation): select an image volume."
        if any(node.IsA(c) for c in FOUR_D_CLASSES):
            return False, f"The {role} volume '{name}' is 4D ({node.GetClassName()}): extract one 3D frame first."
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            return False, f"The {role} node '{name}' is not an image volume: select a scalar or RGB volume."
        if node.IsA("vtkMRMLVectorVolumeNode") and node.GetAttribute(ATTRIBUTE_PREFIX + "method"):
            # e.g. what a node selector picks when the PET is deleted after a fusion: fusing a fused
            # image again would put the anatomy in twice
            return False, (f"The {role} volume '{name}' is a MedicalFusion result (fused with "
                           f"'{node.GetAttribute(ATTRIBUTE_PREFIX + 'method')}'): select the volume it was made from.")
        if node.GetImageData() is None or 0 in node.GetImageData().GetDimensions():
            return False, f"The {role} volume '{name}' has no voxels: load an image into it first."
        browser = _sequence_of(scene, node)
        if browser is not None:
            return False, (f"The {role} volume '{name}' is a frame of the sequence '{browser.GetName()}' (4D): "
                           "extract one 3D frame first (Sequences module) and fuse that.")
        ncomp = _number_of_components(node)
        if role == "anatomical" and ncomp not in (1, 3):
            return False, f"The anatomical volume '{name}' has {ncomp} components per voxel (4D): select a 3D scalar volume."
        if role == "functional" and ncomp not in (1, 3, 4):
            return False, (f"The functional volume '{name}' has {ncomp} components per voxel (4D): "
                           "select a scalar or RGB volume.")
    if output_volume is not None:
        if output_volume is anatomical or output_volume is functional:
            return False, (f"The output volume '{output_volume.GetName()}' is one of the inputs: "
                           "choose 'Create new volume' so the input is not overwritten.")
        if not output_volume.IsA("vtkMRMLVectorVolumeNode"):
            return False, f"The output volume '{output_volume.GetName()}' must be a vector (RGB) volume."
    if output_table is not None and not output_table.IsA("vtkMRMLTableNode"):
        return False, f"The output table '{output_table.GetName()}' is not a table node."
    a_box, f_box = _transformed_ras_bounds(anatomical), _transformed_ras_bounds(functional)
    lo = np.maximum(a_box[:, 0], f_box[:, 0])
    hi = np.minimum(a_box[:, 1], f_box[:, 1])
    # 2D images have zero thickness on one axis: allow touching boxes there.
    if np.any(lo > hi + 1e-6):
        return False, (f"The functional volume '{functional.GetName()}' does not overlap the anatomical "
                       f"'{anatomical.GetName()}' in space (anatomical {np.round(a_box[:, 0], 1).tolist()}.."
                       f"{np.round(a_box[:, 1], 1).tolist()} mm, functional {np.round(f_box[:, 0], 1).tolist()}.."
                       f"{np.round(f_box[:, 1], 1).tolist()} mm RAS): register them or fix the transform.")
    return True, ""


# --------------------------------------------------------------------------------------------------
# fusion


@dataclass
class SceneFusionResult:
    """What :func:`fuse_nodes` wrote: the output nodes, the pipeline result and timings."""

    volume_node: object
    table_node: object | None
    result: object                    # MedicalFusionLib.pipeline.FusionResult
    seconds: float                    # whole scene round trip (read nodes, fuse, write nodes)
    created_node_ids: list[str] = field(default_factory=list)
    colormap: str | None = None
    info: dict = field(default_factory=dict)
    transform_node: object | None = None  # the registration's transform node (fuse_nodes(register=...))
    legend_node: object | None = None     # the fused volume's colour legend (None: grayscale, RGB functional)


def prepare_inputs(scene, anatomical, functional, options=None, use_display_windows: bool = True):
    """Nodes -> (anatomical image, functional image, options filled from display nodes, transform, info).

    Nothing in the scene is changed. Options given explicitly win over the display nodes.
    """
    from .pipeline import FusionOptions  # noqa: PLC0415  (torch only when fusing)

    options = FusionOptions(**vars(options)) if options is not None else FusionOptions()
    a_img = image_from_node(anatomical)
    f_img = image_from_node(functional)
    info = {"anatomical": anatomical.GetName(), "functional": functional.GetName()}
    if options.anatomical_units is None:
        options.anatomical_units = node_units(anatomical)
    if options.functional_units is None:
        options.functional_units = node_units(functional)
    a_disp, f_disp = display_settings(anatomical), display_settings(functional)
    # A window preset wins over the display window ("as displayed"), as an explicit window does.
    if (use_display_windows and options.anatomical_window is None and options.anatomical_preset is None
            and a_img.GetNumberOfComponentsPerPixel() == 1):
        options.anatomical_window = a_disp.window
        if a_disp.window is not None:
            info["anatomical_window_source"] = "as displayed (the volume's window/level)"
    scalar_functional = f_img.GetNumberOfComponentsPerPixel() == 1
    if scalar_functional:
        if use_display_windows and options.functional_window is None and options.functional_preset is None:
            options.functional_window = f_disp.window
            if f_disp.window is not None:
                info["functional_window_source"] = "as displayed (the volume's window/level)"
        if options.colormap is None:
            if f_disp.colormap is not None:
                options.colormap = f_disp.colormap
            elif f_disp.table is not None:
                options.colormap = f_disp.table      # a colour node outside the shipped list
                info["colormap"] = f"{f_disp.color_node_id} (its own table)"
            else:
                logger.warning("MedicalFusion: the functional volume '%s' has no colour node; using %s",
                               functional.GetName(), colour.DEFAULT_COLORMAP)
                options.colormap = colour.DEFAULT_COLORMAP
    transform = functional_transform(anatomical, functional)
    return a_img, f_img, options, transform, info


def _new_or_existing(scene, node, cls: str, name: str, created: list):
    if node is not None:
        return node
    node = scene.AddNewNodeByClass(cls, scene.GenerateUniqueName(name))
    created.append(node.GetID())
    return node


def _set_attributes(node, info: dict) -> None:
    for key, value in info.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))


def volume_image_data(rgb: np.ndarray):
    """RGB uint8 voxels [K, J, I, 3] as a new vtkImageData (built off the scene)."""
    vtk = _vtk()
    from vtk.util import numpy_support  # noqa: PLC0415

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(rgb.shape[2], rgb.shape[1], rgb.shape[0])
    scalars = numpy_support.numpy_to_vtk(rgb.reshape(-1, rgb.shape[-1]), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


def write_volume(node, anatomical, rgb) -> None:
    """Fill a vector volume node with RGB uint8 voxels (an array, or a vtkImageData from
    :func:`volume_image_data`) on the anatomical's exact grid."""
    vtk = _vtk()
    image = rgb if isinstance(rgb, vtk.vtkImageData) else volume_image_data(rgb)
    m = vtk.vtkMatrix4x4()
    anatomical.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    node.SetAndObserveTransformNodeID(anatomical.GetTransformNodeID())
    node.SetAndObserveImageData(image)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()


def metrics_vtk_table(rows: list[dict]):
    """The metrics as a new vtkTable (built off the scene): metric, mean, std, slices, description."""
    vtk = _vtk()
    table = vtk.vtkTable()
    columns = {
        "metric": vtk.vtkStringArray(), "mean": vtk.vtkDoubleArray(), "std": vtk.vtkDoubleArray(),
        "slices": vtk.vtkIntArray(), "description": vtk.vtkStringArray(),
    }
    for name, array in columns.items():
        array.SetName(name)
        array.SetNumberOfValues(len(rows))
    for r, row in enumerate(rows):
        columns["metric"].SetValue(r, str(row["metric"]))
        columns["mean"].SetValue(r, float(row["mean"]))
        columns["std"].SetValue(r, float(row["std"]))
        columns["slices"].SetValue(r, int(row["slices"]))
        columns["description"].SetValue(r, str(row["description"]))
    for array in columns.values():
        table.AddColumn(array)
    return table


def write_table(node, rows) -> None:
    """Replace a table node's content with one row per metric (rows, or a table from
    :func:`metrics_vtk_table`)."""
    vtk = _vtk()
    table = rows if isinstance(rows, vtk.vtkTable) else metrics_vtk_table(rows)
    node.SetAndObserveTable(table)
    node.SetColumnDescription("mean", "Mean over the non-empty slices")
    node.SetColumnDescription("std", "Population standard deviation over the non-empty slices")
    node.SetColumnDescription("slices", "Number of non-empty slices the metric was averaged over")


def _display_ids(node) -> list:
    if not hasattr(node, "GetNumberOfDisplayNodes"):
        return []
    return [node.GetNthDisplayNodeID(i) for i in range(node.GetNumberOfDisplayNodes())]


def _remove_with_display_nodes(scene, node_id: str) -> None:
    node = scene.GetNodeByID(node_id)
    if node is None:
        return
    display_ids = _display_ids(node)
    scene.RemoveNode(node)
    for display_id in display_ids:
        display = scene.GetNodeByID(display_id) if display_id else None
        if display is not None:
            scene.RemoveNode(display)


class _NodeState:
    """What writing may change on an output node the user gave, to put it back if a later output
    fails: its data object (image or table; replaced, never modified), geometry, parent transform,
    schema, attributes and display nodes."""

    def __init__(self, node):
        vtk = _vtk()
        self.node = node
        self.attributes = {n: node.GetAttribute(n) for n in (node.GetAttributeNames() or ())}
        self.display_ids = _display_ids(node)
        self.references = {role: node.GetNodeReferenceID(role) for role in INPUT_REFERENCE_ROLES.values()}
        self.data = node.GetImageData() if hasattr(node, "GetImageData") else node.GetTable()
        self.matrix = None
        if hasattr(node, "GetIJKToRASMatrix"):
            self.matrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(self.matrix)
            self.transform_id = node.GetTransformNodeID()
        self.schema = None
        if hasattr(node, "GetSchema") and node.GetSchema() is not None:
            self.schema = vtk.vtkTable()
            self.schema.DeepCopy(node.GetSchema())

    def restore(self, scene) -> None:
        node = self.node
        if self.matrix is not None:
            node.SetIJKToRASMatrix(self.matrix)
            node.SetAndObserveTransformNodeID(self.transform_id)
            node.SetAndObserveImageData(self.data)
        else:
            node.SetAndObserveTable(self.data)
            if self.schema is not None:
                node.SetAndObserveSchema(self.schema)
        for name in node.GetAttributeNames() or ():
            if name not in self.attributes:
                node.RemoveAttribute(name)
        for name, value in self.attributes.items():
            node.SetAttribute(name, value)
        for display_id in _display_ids(node):
            if display_id not in self.display_ids:
                _remove_with_display_nodes(scene, display_id)
        for role, node_id in self.references.items():
            node.SetNodeReferenceID(role, node_id)


def fuse_nodes(scene, anatomical, functional, options=None, output_volume=None, output_table=None,
               use_display_windows: bool = True, progress: Callable[[int, int], None] | None = None,
               cancel: Callable[[], bool] | None = None, register: str | None = None,
               registration_settings=None, register_with=None) -> SceneFusionResult:
    """Fuse two volume nodes of ``scene`` into an RGB vector volume node (and a metrics table node).

    ``register`` ('rigid' or 'affine'): first align the functional to the anatomical (see
    :func:`register_nodes`); with the fusion's outputs, a linear transform node holding the result
    becomes the functional's parent (:func:`place_registration`). Progress then runs over both.
    ``register_with`` (a scalar volume node or ID, e.g. the PET's own CT of the same PET/CT
    session): register that volume instead and apply the result to the functional; the transform
    node becomes the parent of both. It must share the functional's DICOM FrameOfReferenceUID, or
    its parent transform and placement (:func:`check_register_with`).

    ``options`` is a :class:`~MedicalFusionLib.pipeline.FusionOptions`; its ``colormap`` and windows,
    when None, come from the display nodes (see the module docstring). ``output_volume`` /
    ``output_table``: existing nodes (or IDs) to overwrite, or None to create new ones. The table is
    written only when ``options.compute_metrics``. Raises FusionError (bad input) or FusionCancelled;
    in both cases nothing in the scene has changed.

    ``progress(done, total)`` and ``cancel() -> bool`` are called from the start to the end, at
    least every few tenths of a second (reading the nodes, the pipeline, writing; see
    :mod:`MedicalFusionLib.progress`). The last cancel check is made right before the scene is
    touched; writing the nodes then reports progress only.
    """
    with Progress(progress, cancel, scene_phases(bool(register))) as tracker:
        result = _fuse_nodes(scene, anatomical, functional, options, output_volume, output_table,
                             use_display_windows, tracker, register, registration_settings, register_with)
        tracker.finish()
    return result


def scene_phases(register: bool) -> tuple[tuple[str, float], ...]:
    """Progress phases of :func:`fuse_nodes`: reading the nodes, the registration when asked for,
    the pipeline (prepare, fuse, recombine, metrics), writing the output nodes."""
    if register:
        return ("read", 0.02), ("register", REGISTRATION_SHARE), ("pipeline", 0.95 - REGISTRATION_SHARE), ("write", 0.03)
    return ("read", 0.02), ("pipeline", 0.95), ("write", 0.03)


def _fuse_nodes(scene, anatomical, functional, options, output_volume, output_table, use_display_windows,
                tracker: Progress, register: str | None, registration_settings,
                register_with=None) -> SceneFusionResult:
    from .pipeline import check_memory, fuse_images  # noqa: PLC0415  (torch only when fusing)

    t0 = time.perf_counter()
    tracker.phase("read")
    ok, reason = validate_inputs(scene, anatomical, functional, output_volume, output_table)
    if not ok:
        raise FusionError(reason)
    anatomical = _resolve(scene, anatomical, "anatomical")
    functional = _resolve(scene, functional, "functional")
    output_volume = _resolve(scene, output_volume, "output volume")
    output_table = _resolve(scene, output_table, "output table")

    tracker.tick()
    a_img, f_img, opts, transform, info = prepare_inputs(scene, anatomical, functional, options, use_display_windows)
    check_memory(a_img, f_img, opts)          # a study too big for the memory: refused before registering
    registration = None
    also_placed = []
    if register:
        moving, m_img, start = functional, f_img, transform
        if register_with is not None:
            moving = check_register_with(scene, functional, register_with)
            m_img, start = image_from_node(moving), functional_transform(anatomical, moving)
            also_placed = [moving]
        tracker.phase("register")
        register_progress, register_cancel = tracker.callbacks()
        registration = _register_images(anatomical, moving, a_img, m_img, start, register,
                                        register_progress, register_cancel, registration_settings)
        transform = registration.transform
        info.update(registration_info(registration))
    tracker.phase("pipeline")
    pipeline_progress, pipeline_cancel = tracker.callbacks()
    result = fuse_images(a_img, f_img, opts, progress=pipeline_progress, cancel=pipeline_cancel, transform=transform)

    # Success. Every output is built off the scene first; only then are nodes created or changed,
    # all together: if any of that fails, created nodes are removed and given nodes put back.
    tracker.phase("write")
    prepared = result.prepared
    info.update(method=result.method, device=result.device, seconds_engine=round(result.seconds, 3),
                axis=opts.axis, version=__version__, grayscale=result.grayscale)
    if prepared is not None:
        info["anatomical_window"] = prepared.anatomical_window
        info.setdefault("functional_window", prepared.functional_window)
        info.setdefault("colormap", prepared.colormap)
        for key, value in display_metadata(prepared).items():   # units, how each window was chosen
            info.setdefault(key, value)
    image_data = volume_image_data(result.rgb)
    bar = colour_bar.legend_for(prepared, None if isinstance(opts.colormap, str) else opts.colormap,
                                functional.GetName())
    tracker.tick()
    vtk_table = None
    if opts.compute_metrics and result.metrics:
        from .metrics import metrics_table_rows  # noqa: PLC0415

        vtk_table = metrics_vtk_table(metrics_table_rows(result.metrics))
    created: list[str] = []
    legend_parts: list[str] = []      # not in created_node_ids: display nodes get no subject hierarchy item
    given = [_NodeState(n) for n in (output_volume, output_table if vtk_table is not None else None) if n is not None]
    previous_parent = functional.GetTransformNodeID()
    previous_parents = [(node, node.GetTransformNodeID()) for node in also_placed]
    transform_node = None
    tracker.commit()      # the last cancel check: the scene is changed from here on
    try:
        if registration is not None:
            transform_node = place_registration(scene, anatomical, functional, registration, created, also_placed)
        volume = _new_or_existing(scene, output_volume, "vtkMRMLVectorVolumeNode",
                                  f"{anatomical.GetName()} + {functional.GetName()} fused ({result.method})", created)
        write_volume(volume, anatomical, image_data)
        for role, node in (("anatomical", anatomical), ("functional", functional)):
            volume.SetNodeReferenceID(INPUT_REFERENCE_ROLES[role], node.GetID())
        tracker.advance(1, 2)
        table = None
        if vtk_table is not None:
            table = _new_or_existing(scene, output_table, "vtkMRMLTableNode",
                                     f"Fusion metrics ({result.method})", created)
            write_table(table, vtk_table)
        seconds = time.perf_counter() - t0
        info["seconds"] = round(seconds, 3)
        for node in (volume, table):
            if node is not None:
                _set_attributes(node, info)
        legend_node = add_colour_legend(scene, volume, bar, legend_parts)   # last: replaces an older one
    except BaseException:
        if registration is not None:
            functional.SetAndObserveTransformNodeID(previous_parent)
            for node, parent in previous_parents:
                node.SetAndObserveTransformNodeID(parent)
        for node_id in created:   # leave the scene as it was (display nodes made for it too)
            _remove_with_display_nodes(scene, node_id)
        for state in given:
            state.restore(scene)
        for node_id in legend_parts:
            if scene.GetNodeByID(node_id) is not None:
                scene.RemoveNode(scene.GetNodeByID(node_id))
        raise
    return SceneFusionResult(volume_node=volume, table_node=table, result=result, seconds=seconds,
                             created_node_ids=created, colormap=info.get("colormap"), info=info,
                             transform_node=transform_node, legend_node=legend_node)


# --------------------------------------------------------------------------------------------------
# the colour legend of the fused volume
#
# Slicer's colour legend (vtkMRMLColorLegendDisplayNode, drawn by the Colors module's displayable
# manager) takes its colours and numbers from its *primary display node*: that node's colour node,
# and for a scalar volume display node its window/level. The fused volume's own display node cannot
# serve: it is a vector (RGB) display node whose window/level scales the RGB voxels (255 / 127.5
# shows them as they are) and it has no colour node. So the legend gets a primary display node of its
# own on the fused volume, a vtkMRMLScalarVolumeDisplayNode added after the volume's display node
# (slice views use the first one, so it draws nothing), holding the functional's colour node and
# the window lo..hi the run used. The legend then maps lo..hi over the colour node's entries as the
# pipeline did, in the functional's units, and shows only in the views where the fused volume is.

#: Attribute marking the nodes a fused volume's colour legend is made of: 'legend' (the
#: vtkMRMLColorLegendDisplayNode), 'range' (its primary display node) or 'colours' (a colour table
#: node holding the map's entries, made only when the map is not one of Slicer's own colour nodes).
LEGEND_PART = ATTRIBUTE_PREFIX + "legend_part"


def colour_legend(volume):
    """The colour legend :func:`add_colour_legend` gave ``volume`` (a fused volume node), or None."""
    found = _legends_of(volume)
    return found[0] if found else None


def _legends_of(volume) -> list:
    out = []
    for i in range(volume.GetNumberOfDisplayNodes() if volume is not None else 0):
        node = volume.GetNthDisplayNode(i)
        if node is not None and node.IsA("vtkMRMLColorLegendDisplayNode") and node.GetAttribute(LEGEND_PART) == "legend":
            out.append(node)
    return out


def add_colour_legend(scene, volume, bar, created: list | None = None):
    """Give a fused volume node Slicer's colour legend for ``bar`` (a
    :class:`MedicalFusionLib.legend.Legend`); returns the legend node, or None when ``bar`` is None.

    The legend shows ``bar.table`` over ``bar.window`` (lo..hi, the functional's values) with the
    title '<functional> [<units>]' and five labels in one number format, in the slice views showing
    the volume. The colours come from Slicer's colour node of the same name (PET-Heat, Rainbow...)
    when it is in the scene, else from a new colour table node holding the table (a colour node
    outside Slicer's list keeps the table the run used, even if that node is edited later).

    A legend this function gave the volume before (a rerun into the same output) is replaced, and its
    position, size, orientation and visibility carried over; with ``bar`` None it is removed, since
    it would no longer be true. When the volume leaves the scene, its legend nodes go with it (a
    scene observer, see :func:`watch_legends`). IDs of the nodes made are appended to
    ``created``.
    """
    slicer = _slicer()
    old = _legends_of(volume)
    if bar is None:
        _remove_legends(scene, old)
        return None
    created = created if created is not None else []
    lo, hi = bar.window
    colour_id = _legend_colour_node(scene, volume, bar, created)

    primary = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode",
                                      scene.GenerateUniqueName(f"{volume.GetName()} legend range"))
    created.append(primary.GetID())
    primary.SetAttribute(LEGEND_PART, "range")
    primary.SetHideFromEditors(True)
    primary.AutoWindowLevelOff()
    primary.SetWindowLevelMinMax(lo, hi)
    primary.SetAndObserveColorNodeID(colour_id)
    volume.AddAndObserveDisplayNodeID(primary.GetID())

    # as vtkSlicerColorLogic::AddDefaultColorLegendDisplayNode does, with our title and numbers
    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):   # the Colors module registers
        scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())     # it; a bare scene has not
    node = scene.AddNewNodeByClass("vtkMRMLColorLegendDisplayNode",
                                   scene.GenerateUniqueName(f"{volume.GetName()} color legend"))
    created.append(node.GetID())
    node.SetAttribute(LEGEND_PART, "legend")
    node.SetTitleText(bar.title)
    node.SetLabelFormat(bar.label_format)
    node.SetNumberOfLabels(colour_bar.TICKS)
    node.SetUseColorNamesForLabels(False)
    node.SetAndObserveColorNodeID(colour_id)          # the manager reads the primary's; kept equal
    node.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
    node.SetScalarRange(lo, hi)
    node.SetAndObservePrimaryDisplayNode(primary)
    if old:
        previous = old[0]
        node.SetOrientation(previous.GetOrientation())
        node.SetPosition(*previous.GetPosition())
        node.SetSize(*previous.GetSize())
        node.SetVisibility(previous.GetVisibility())
    else:
        node.SetVisibility(True)
        node.SetVisibility2D(True)
    volume.AddAndObserveDisplayNodeID(node.GetID())
    node.Modified()     # adding it as a display node does not update the displayable manager
    watch_legends(scene)
    _remove_legends(scene, old)
    return node


def _legend_colour_node(scene, volume, bar, created: list) -> str:
    node_id = colour.SLICER_COLOR_NODE_IDS.get(bar.colormap)
    if node_id and scene.GetNodeByID(node_id) is not None:
        return node_id
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode",
                                    scene.GenerateUniqueName(f"{volume.GetName()} legend colours"))
    created.append(table.GetID())
    table.SetAttribute(LEGEND_PART, "colours")
    table.SetTypeToUser()
    table.SetNumberOfColors(len(bar.table))
    for i, (r, g, b) in enumerate(np.asarray(bar.table, dtype=float)):
        table.SetColor(i, str(i), float(r), float(g), float(b), 1.0)
    return table.GetID()


def _ours(node, part: str) -> bool:
    return node is not None and node.GetAttribute(LEGEND_PART) == part


def _remove_legends(scene, legends) -> None:
    _remove_legend_parts(scene, [node.GetID() for node in legends])


#: Role of a colour legend node's reference to its primary display node (vtkMRMLColorLegendDisplayNode).
PRIMARY_DISPLAY_ROLE = "primaryDisplay"


def _remove_legend_parts(scene, node_ids) -> None:
    """Remove the nodes of ours among ``node_ids`` and what each holds: a legend its range node, a
    range node its colour table copy. Nodes that are not ours are never touched."""
    queue = [i for i in node_ids if i]
    while queue:
        node = scene.GetNodeByID(queue.pop(0))
        if _ours(node, "legend"):
            queue.append(node.GetNodeReferenceID(PRIMARY_DISPLAY_ROLE))
        elif _ours(node, "range"):
            queue.append(node.GetColorNodeID())
        elif not _ours(node, "colours"):
            continue
        queue = [i for i in queue if i]
        scene.RemoveNode(node)


#: Scenes observed by :func:`watch_legends` (weak: a scene that is deleted leaves the set).
_WATCHED: "weakref.WeakSet" = weakref.WeakSet()


def watch_legends(scene) -> None:
    """Once per scene: when a volume node leaves the scene (not while the whole scene is closed),
    remove the legend parts of ours among its display nodes; when a legend of ours is removed
    (e.g. by the user), remove its range node and colour copy. The removed node still holds the IDs
    it referenced, so no search of the scene is needed. :func:`add_colour_legend` calls it; call it
    too for a scene whose legends were read from a file (.mrml, .mrb) before any fusion in it."""
    if scene in _WATCHED:
        return
    vtk = _vtk()
    from vtkmodules.util.misc import calldata_type  # noqa: PLC0415

    @calldata_type(vtk.VTK_OBJECT)
    def on_removed(caller, _event, node):
        if caller is None or node is None or caller.IsClosing():   # None: the scene is being deleted
            return
        if node.IsA("vtkMRMLDisplayableNode"):
            _remove_legend_parts(caller, [node.GetNthDisplayNodeID(i) for i in range(node.GetNumberOfDisplayNodes())])
        elif _ours(node, "legend"):
            _remove_legend_parts(caller, [node.GetNodeReferenceID(PRIMARY_DISPLAY_ROLE)])

    scene.AddObserver(scene.NodeRemovedEvent, on_removed)
    _WATCHED.add(scene)


# --------------------------------------------------------------------------------------------------
# registration on demand (the computation is MedicalFusionLib.registration)

#: Share of the progress bar given to the registration when fuse_nodes registers first.
REGISTRATION_SHARE = 0.3


def _register_images(anatomical, functional, a_img, f_img, start, kind, progress, cancel, settings):
    from .registration import register  # noqa: PLC0415

    if start is not None and not start.IsLinear():
        raise FusionError(f"'{functional.GetName()}' is placed by a non-linear transform: registration starts from "
                          "a linear placement, so harden or remove that transform first")
    uid = shared_frame_of_reference(anatomical, functional)
    if uid:
        logger.warning("MedicalFusion: '%s' and '%s' share the DICOM FrameOfReferenceUID %s: they are already "
                       "registered; registering anyway as asked", anatomical.GetName(), functional.GetName(), uid)
    return register(a_img, f_img, kind, initial=start, progress=progress, cancel=cancel, settings=settings)


def register_nodes(scene, anatomical, functional, kind: str = "rigid", progress=None, cancel=None, settings=None):
    """Align the functional volume node to the anatomical one; the scene is not changed.

    Starts from the functional's present placement relative to the anatomical (both parent
    transforms; a non-linear one is refused). Returns a
    :class:`~MedicalFusionLib.registration.Registration`; :func:`place_registration` puts it in the
    scene. Raises FusionError (bad input, failed or not converged) or FusionCancelled.
    """
    ok, reason = validate_inputs(scene, anatomical, functional)
    if not ok:
        raise FusionError(reason)
    anatomical = _resolve(scene, anatomical, "anatomical")
    functional = _resolve(scene, functional, "functional")
    return _register_images(anatomical, functional, image_from_node(anatomical), image_from_node(functional),
                            functional_transform(anatomical, functional), kind, progress, cancel, settings)


def registration_info(registration) -> dict:
    """Node attributes describing a registration (without the prefix): kind, start, match score,
    iterations, time, and how sure it is (the restarts' spread in mm, the voxel limit, whether it
    is uncertain): :meth:`MedicalFusionLib.registration.Registration.metadata`."""
    return registration.metadata()


def check_register_with(scene, functional, register_with):
    """The node to register instead of the functional (``register_with``, node or ID), checked: a
    scalar volume other than the functional, in the same frame as the functional: the same DICOM
    FrameOfReferenceUID when both have one (:func:`shared_frame_of_reference`), else the same
    parent transform and a shared placement (registration.check_same_frame). One-line FusionError
    otherwise."""
    from .registration import check_same_frame  # noqa: PLC0415

    node = _resolve(scene, register_with, "volume to register with")
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise FusionError("the volume to register with must be a scalar volume (e.g. the PET's own CT)")
    if node is functional or node.GetID() == functional.GetID():
        return functional
    name = f"'{node.GetName()}'"
    if shared_frame_of_reference(functional, node):
        same = True
    else:
        uids = [(n.GetAttribute("DICOM.FrameOfReferenceUID") or "").strip() for n in (functional, node)]
        if all(uids):       # both DICOM, different frames
            check_same_frame(image_from_node(functional), image_from_node(node), *uids, what=name)
        same = False
    if functional.GetTransformNodeID() != node.GetTransformNodeID():
        raise FusionError(f"{name} and '{functional.GetName()}' have different parent transforms: registering {name} "
                          "places the functional only when both are placed alike (give them the same parent, or none)")
    if not same:
        check_same_frame(image_from_node(functional), image_from_node(node), what=name)
    return node


def place_registration(scene, anatomical, functional, registration, created: list | None = None,
                       also: list | None = None):
    """Put a registration in the scene: a new ``vtkMRMLLinearTransformNode`` becomes the functional's
    parent (and the parent of the nodes in ``also``: the volume registered instead of the functional).

    The node holds the result as its transform *from parent* (RAS), and sits under the anatomical's
    parent transform, so the functional follows the anatomical wherever that is moved. A transform
    the functional had before is not changed or deleted: it was the registration's starting point,
    its ID is kept in the new node's ``MedicalFusion.previous_parent`` attribute, and setting it back
    as the functional's parent undoes the registration. Nothing is hardened.
    """
    vtk = _vtk()
    from .registration import ras_matrix  # noqa: PLC0415

    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName(
        f"{functional.GetName()} to {anatomical.GetName()} ({registration.kind} registration)"))
    if created is not None:
        created.append(node.GetID())
    m = vtk.vtkMatrix4x4()
    for r, row in enumerate(ras_matrix(registration.transform)):
        for c, value in enumerate(row):
            m.SetElement(r, c, float(value))
    node.SetMatrixTransformFromParent(m)
    node.SetAndObserveTransformNodeID(anatomical.GetTransformNodeID())
    info = registration_info(registration)
    info["previous_parent"] = functional.GetTransformNodeID() or ""
    if also:
        info["registered_with"] = " ".join(n.GetID() for n in also)
    _set_attributes(node, info)
    functional.SetAndObserveTransformNodeID(node.GetID())
    for other in also or []:
        other.SetAndObserveTransformNodeID(node.GetID())
    return node


def shared_frame_of_reference(anatomical, functional, database=None) -> str | None:
    """The DICOM FrameOfReferenceUID both volumes were loaded with, when it is the same; else None.

    A node's ``DICOM.FrameOfReferenceUID`` attribute (set by :func:`load_dicom_volume`), else a
    look-up in Slicer's DICOM database (``slicer.dicomDatabase``, or ``database``) from its
    ``DICOM.instanceUIDs`` attribute (Slicer's DICOM module); None for volumes that did not come
    from DICOM.
    """
    database = database if database is not None else getattr(_slicer(), "dicomDatabase", None)

    def uid(node):
        own = (node.GetAttribute("DICOM.FrameOfReferenceUID") or "").strip()
        instances = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
        if own or database is None or not instances:
            return own
        return (database.instanceValue(instances[0], "0020,0052") or "").strip()
    a = uid(anatomical)
    return a if a and a == uid(functional) else None


# --------------------------------------------------------------------------------------------------
# a generated phantom (Slicer self-test and demos: no download needed)


def add_phantom_pair(scene, shift_ras=(6.0, -4.0, 3.0)):
    """Add an anatomical / functional phantom pair to ``scene`` and return (anatomical, functional).

    The anatomical is a 64x72x40 "head" on a 1 x 1 x 1.5 mm grid with a flipped (RAS) axis; the
    functional is a PET-like volume with two hot spots on a coarser 2 x 2 x 3 mm grid, placed with a
    parent linear transform (translation ``shift_ras``) and its origin moved back by the same amount,
    so it lines up with the anatomical only when the transform is honoured. Its display node uses
    PET-Heat when that colour node is in the scene.
    """
    slicer, vtk = _slicer(), _vtk()
    z, y, x = np.mgrid[0:40, 0:72, 0:64].astype(np.float32)
    r = np.sqrt(((x - 32) / 28) ** 2 + ((y - 36) / 32) ** 2 + ((z - 20) / 18) ** 2)
    head = (r < 0.9).astype(np.float32)
    texture = 0.6 + 0.25 * np.sin(x / 3.0 + np.sin(y / 7.0)) * np.cos(y / 4.0 + z / 9.0)
    skull = np.exp(-((r - 0.95) / 0.04) ** 2)
    anat = (800.0 * (head * texture + skull)).astype(np.int16)

    fz, fy, fx = np.mgrid[0:20, 0:36, 0:32].astype(np.float32)
    spots = (np.exp(-(((fx - 20) / 4) ** 2 + ((fy - 14) / 5) ** 2 + ((fz - 10) / 4) ** 2))
             + 0.6 * np.exp(-(((fx - 11) / 5) ** 2 + ((fy - 24) / 4) ** 2 + ((fz - 8) / 3) ** 2)))
    pet = (spots * 12.0 + 0.3 * (np.sqrt(((fx - 16) / 14) ** 2 + ((fy - 18) / 16) ** 2 + ((fz - 10) / 9) ** 2) < 0.9))
    pet = pet.astype(np.float32)

    anatomical = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName("Phantom MRI"))
    slicer.util.updateVolumeFromArray(anatomical, anat)
    anatomical.SetSpacing(1.0, 1.0, 1.5)
    anatomical.SetIJKToRASDirections(-1, 0, 0, 0, 1, 0, 0, 0, 1)
    anatomical.SetOrigin(32.0, -36.0, -30.0)
    anatomical.CreateDefaultDisplayNodes()

    functional = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName("Phantom PET"))
    slicer.util.updateVolumeFromArray(functional, pet)
    functional.SetSpacing(2.0, 2.0, 3.0)
    functional.SetIJKToRASDirections(-1, 0, 0, 0, 1, 0, 0, 0, 1)
    shift = np.asarray(shift_ras, dtype=float)
    functional.SetOrigin(*(np.array([32.5, -35.5, -29.25]) - shift))
    functional.CreateDefaultDisplayNodes()
    if scene.GetNodeByID(colour.SLICER_COLOR_NODE_IDS["PET-Heat"]) is not None:
        functional.GetDisplayNode().SetAndObserveColorNodeID(colour.SLICER_COLOR_NODE_IDS["PET-Heat"])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName("Phantom PET placement"))
    m = vtk.vtkMatrix4x4()
    for i in range(3):
        m.SetElement(i, 3, float(shift[i]))
    transform.SetMatrixTransformToParent(m)
    functional.SetAndObserveTransformNodeID(transform.GetID())
    return anatomical, functional


# --------------------------------------------------------------------------------------------------
# subject hierarchy (the Data module's tree)


def move_to_subject_hierarchy_item(scene, nodes, parent_item: int) -> None:
    """Put ``nodes`` under the subject hierarchy item ``parent_item`` (a study, a folder, the scene).

    A node without an item yet (the application's subject hierarchy plugins give data nodes one as
    they are added; a bare scene does not) gets one there.
    """
    slicer = _slicer()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None or not parent_item:
        return
    for node in nodes:
        if node is None:
            continue
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent_item)
        else:
            sh.CreateItem(parent_item, node)


def place_beside(scene, nodes, reference) -> None:
    """Put ``nodes`` in the subject hierarchy beside ``reference``: under the same parent (its study,
    when it was loaded from DICOM or placed in one). Nothing happens when ``reference`` has no item."""
    slicer = _slicer()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    reference_item = sh.GetItemByDataNode(reference) if (sh is not None and reference is not None) else 0
    if reference_item:
        move_to_subject_hierarchy_item(scene, nodes, sh.GetItemParent(reference_item))
