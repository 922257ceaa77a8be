"""A fused volume node as a DICOM series: the Slicer side of :mod:`MedicalFusionLib.io.dicom_export`.

:func:`export_fused_node_dicom` writes what :func:`MedicalFusionLib.scene.fuse_nodes` put in the
scene (a ``vtkMRMLVectorVolumeNode`` with ``MedicalFusion.*`` attributes) as the same series the
command line's ``--output-dicom`` writes: dicom_export's series builder (:func:`~MedicalFusionLib.
dicom_export.fused_series`) and its all-or-nothing folder output (an :class:`~MedicalFusionLib.
io.outputs.OutputSet` folder, read back with SimpleITK and compared voxel for voxel before it is put in
place). There is no second DICOM writer here: this module only turns nodes into what that builder
reads (the fused picture on the anatomical's grid, and a ``Source`` per input with its DICOM files).

Where patient, study and source references come from, per input node (first match):

1. ``MedicalFusion.dicom_folder``: the series folder :func:`MedicalFusionLib.scene.load_dicom_volume`
   read the node from (the panel's and the tests' DICOM loading);
2. ``DICOM.instanceUIDs`` (what Slicer's DICOM scalar volume plugin sets on a volume it loads from the
   DICOM database): each instance's file from Slicer's DICOM database
   (``slicer.dicomDatabase.fileForInstance``, or the ``database`` argument: anything with that method);
3. neither: the input is not DICOM. An anatomical that is not DICOM gives a new, synthetic patient and
   study (as the command line does; the result says so); a functional that is not DICOM is simply not
   referenced.

A node that says it came from DICOM but whose files cannot be found (moved folder, database closed or
without them) is refused with one line rather than exported under a synthetic patient. The files are
put in the node's slice order by their Image Position (Patient) on the node's grid, and must lie on
that grid (a volume cropped or resampled after loading is refused: the series would reference slices
it does not show).

The fused node must still be on the anatomical's grid (same IJK-to-RAS and size); the inputs are the
nodes the fused node was made from (its node references ``MedicalFusion.anatomical`` /
``MedicalFusion.functional``, set by ``fuse_nodes``). The functional's source slices are found with the inputs' parent transforms as they
are at export time (the placement the fusion used, unless it was changed since). Nothing in the scene
is changed.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import scene as sc
from .errors import FusionError

#: Node attribute holding the DICOM series folder a volume was read from (scene.load_dicom_volume).
DICOM_FOLDER_ATTRIBUTE = sc.ATTRIBUTE_PREFIX + "dicom_folder"
#: Slicer's DICOM plugins: the SOP Instance UIDs of the files a volume was loaded from (space-separated).
SLICER_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
WHAT = "DICOM export folder"
POSITION_TOLERANCE_MM = 0.01


@dataclass
class DicomExport:
    """What :func:`export_fused_node_dicom` wrote."""

    folder: pathlib.Path
    files: list
    series_instance_uid: str
    series_description: str
    patient_id: str
    patient_name: str
    study_instance_uid: str
    synthetic: bool                         # a new patient/study: the anatomical was not DICOM
    message: str = ""                       # one line for the panel's status
    notes: list = field(default_factory=list)


@dataclass
class _Shown:
    """What the fused picture shows (the attributes dicom_export reads from a pipeline ``Prepared``)."""

    anatomical_window: tuple | None
    functional_window: tuple | None
    colormap: str | None
    anatomical_units: str = ""
    functional_units: str = ""
    window_sources: dict = field(default_factory=dict)


@dataclass
class _Picture:
    """The fused node as dicom_export reads a pipeline ``FusionResult``: the RGB voxels [K, J, I, 3]
    and the grid (reference image, LPS) they are on, the method, what the colours show."""

    reference: sitk.Image
    rgb: np.ndarray
    method: str
    prepared: _Shown


@dataclass
class _NodeSource:
    """An input node as dicom_export reads a ``io.read.Source``: grid image, DICOM facts, a name."""

    image: sitk.Image
    path: str
    facts: object = None


# --------------------------------------------------------------------------------------------------
# checks the panel runs before enabling its button


def is_fused_volume(node) -> bool:
    """Whether ``node`` is a fused volume written by MedicalFusion (what the export needs)."""
    return (node is not None and node.IsA("vtkMRMLVectorVolumeNode")
            and bool(node.GetAttribute(sc.ATTRIBUTE_PREFIX + "method")))


def can_export(node) -> tuple[bool, str]:
    """(ok, reason) for the panel's export button: a fused volume of ours with voxels."""
    if node is None:
        return False, "Select a fused volume (fuse first): only a MedicalFusion result can be exported as DICOM."
    if not is_fused_volume(node):
        return False, (f"'{node.GetName()}' is not a MedicalFusion result: select the fused volume "
                       "(only a fusion result is exported as DICOM).")
    image = node.GetImageData()
    if image is None or 0 in image.GetDimensions():
        return False, f"The fused volume '{node.GetName()}' has no voxels: fuse again."
    return True, ""


# --------------------------------------------------------------------------------------------------
# the inputs' DICOM files


def _slicer_database(database):
    if database is not None:
        return database
    try:
        return getattr(sc._slicer(), "dicomDatabase", None)
    except ImportError:  # pragma: no cover - scene needs slicer anyway
        return None


def _grid_image(node) -> sitk.Image:
    """An empty image on the node's grid (LPS): its geometry without copying its voxels."""
    dims = node.GetImageData().GetDimensions()
    image = sitk.Image([int(d) for d in dims], sitk.sitkUInt8)
    origin, spacing, direction = sc.lps_geometry(node)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def node_dicom_files(node, database=None) -> list[str]:
    """The DICOM files a volume node was loaded from (see the module docstring), [] when it was not
    loaded from DICOM; FusionError when it was but the files are not found."""
    from .io.read import dicom_series_files  # noqa: PLC0415

    name = node.GetName()
    folder = (node.GetAttribute(DICOM_FOLDER_ATTRIBUTE) or "").strip()
    if folder:
        if not os.path.isdir(folder):
            raise FusionError(f"'{name}' was loaded from the DICOM series {folder}, which is no longer there: "
                              "put the series back (or load it again) and export again")
        return dicom_series_files(pathlib.Path(folder), f"the DICOM series of '{name}' ({folder})")
    uids = (node.GetAttribute(SLICER_INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        return []
    database = _slicer_database(database)
    if database is None:
        raise FusionError(f"'{name}' was loaded from Slicer's DICOM database, which is not open: open it "
                          "(DICOM module) and export again")
    files = []
    for uid in uids:
        path = database.fileForInstance(uid) if uid != "Unknown" else ""
        if not path or not os.path.isfile(path):
            raise FusionError(f"'{name}' was loaded from DICOM, but instance {uid} is not in Slicer's DICOM database "
                              "(or its file is gone): import the series into the database again and export again")
        files.append(path)
    return files


def _ordered(node, files: list[str]):
    """(headers, files) in the node's slice order by Image Position (Patient); FusionError when the
    files do not lie on the node's grid. Multi-frame files are kept as they are."""
    from .io.dicom import read_headers  # noqa: PLC0415

    headers = read_headers(files)
    grid = _grid_image(node)
    nk = grid.GetSize()[2]
    if len(headers) != nk or any("ImagePositionPatient" not in h for h in headers):
        return headers, files
    d = np.asarray(grid.GetDirection()).reshape(3, 3)
    slot = {}
    for h, f in zip(headers, files):
        i, j, k = grid.TransformPhysicalPointToContinuousIndex([float(v) for v in h.ImagePositionPatient])
        kk = round(k)
        row_col = [float(v) for v in h.get("ImageOrientationPatient", [])]
        in_plane = len(row_col) == 6 and np.allclose(row_col, np.r_[d[:, 0], d[:, 1]], atol=1e-4)
        spacing = grid.GetSpacing()
        off = max(abs(i) * spacing[0], abs(j) * spacing[1], abs(k - kk) * spacing[2])
        if not in_plane or off > POSITION_TOLERANCE_MM or not 0 <= kk < nk or kk in slot:
            raise FusionError(f"'{node.GetName()}' is no longer on the grid of the DICOM series it was loaded from "
                              "(cropped, resampled or another series?): export needs the volume as loaded")
        slot[kk] = (h, f)
    return [slot[k][0] for k in range(nk)], [slot[k][1] for k in range(nk)]


def _source(node, database) -> _NodeSource:
    from .io.dicom import facts_from_headers  # noqa: PLC0415

    files = node_dicom_files(node, database)
    facts = None
    if files:
        headers, files = _ordered(node, files)
        facts = facts_from_headers(headers, files)
    return _NodeSource(image=_grid_image(node), path=node.GetName(), facts=facts)


# --------------------------------------------------------------------------------------------------
# the fused node


def _window(text: str | None) -> tuple | None:
    numbers = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text or "")
    if len(numbers) != 2:
        return None
    lo, hi = float(numbers[0]), float(numbers[1])
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def _picture(scene, fused) -> _Picture:
    attr = lambda key: fused.GetAttribute(sc.ATTRIBUTE_PREFIX + key) or ""   # noqa: E731
    reference = sc.image_from_node(fused)
    rgb = sitk.GetArrayFromImage(reference)
    if rgb.dtype != np.uint8 or rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise FusionError(f"'{fused.GetName()}' does not hold 8-bit RGB voxels: fuse again")
    units = {role: ("" if attr(f"{role}_units") in ("", "unknown") else attr(f"{role}_units"))
             for role in ("anatomical", "functional")}
    colormap = attr("colormap") or None
    if colormap and colormap.endswith(" (its own table)"):        # a colour node outside the shipped list
        node = scene.GetNodeByID(colormap[:-len(" (its own table)")])
        colormap = node.GetName() if node is not None else "custom map"
    shown = _Shown(anatomical_window=_window(attr("anatomical_window")),
                   functional_window=_window(attr("functional_window")),
                   colormap=None if colormap == "RGB as given" else colormap,
                   window_sources={r: attr(f"{r}_window_source") for r in ("anatomical", "functional")}, **{
                       f"{r}_units": u for r, u in units.items()})
    return _Picture(reference=reference, rgb=rgb, method=attr("method"), prepared=shown)


def _inputs(scene, fused, anatomical, functional):
    found = []
    for role, given in (("anatomical", anatomical), ("functional", functional)):
        recorded_id = fused.GetNodeReferenceID(sc.INPUT_REFERENCE_ROLES[role]) or ""
        recorded_name = fused.GetAttribute(sc.ATTRIBUTE_PREFIX + role) or "?"
        node = sc._resolve(scene, given, role) if given is not None else None
        if node is None:
            node = scene.GetNodeByID(recorded_id) if recorded_id else None
            if node is None:
                raise FusionError(f"the {role} volume '{recorded_name}' that '{fused.GetName()}' was fused from is not "
                                  "in the scene (deleted, or not recorded by an older version): load it again and "
                                  "fuse again, then export")
        elif recorded_id and node.GetID() != recorded_id:
            raise FusionError(f"'{fused.GetName()}' was fused from the {role} volume '{recorded_name}', not "
                              f"'{node.GetName()}': export it with the volumes it was made from")
        found.append(node)
    return found


def export_fused_node_dicom(scene, fused, folder, anatomical=None, functional=None,
                            database=None) -> DicomExport:
    """Write the fused volume node ``fused`` as a DICOM series into ``folder`` (new, or empty).

    ``anatomical`` / ``functional``: the nodes it was fused from (default: those it records).
    ``database``: Slicer's DICOM database (default ``slicer.dicomDatabase`` when there is one) for
    inputs loaded by Slicer's DICOM module. The folder appears complete or not at all; bad input
    (not a fused volume, inputs gone or changed, a folder that is not new or empty) is one
    FusionError line and nothing is written. Returns a :class:`DicomExport`.
    """
    from .io import dicom_export  # noqa: PLC0415
    from .io.outputs import OutputSet  # noqa: PLC0415

    fused = sc._resolve(scene, fused, "fused volume")
    ok, reason = can_export(fused)
    if not ok:
        raise FusionError(reason)
    anatomical, functional = _inputs(scene, fused, anatomical, functional)
    if (fused.GetImageData().GetDimensions() != anatomical.GetImageData().GetDimensions()
            or not np.allclose(sc.ijk_to_ras(fused), sc.ijk_to_ras(anatomical), atol=1e-6)):
        raise FusionError(f"'{fused.GetName()}' is no longer on the grid of '{anatomical.GetName()}' it was fused "
                          "on: fuse again, then export")
    anat = _source(anatomical, database)
    func = _source(functional, database)
    picture = _picture(scene, fused)
    transform = sc.functional_transform(anatomical, functional)
    protected = {f"DICOM series of '{n.GetName()}'": os.path.dirname(s.facts.files[0])
                 for n, s in ((anatomical, anat), (functional, func)) if s.facts is not None and s.facts.files}
    with OutputSet(protected) as out:
        out.claim_folder(folder, WHAT)
        datasets = dicom_export.fused_series(picture, anat, func, transform=transform)
        dicom_export.add_dicom_folder(out, folder, datasets, picture, WHAT)
        out.commit()
    folder = pathlib.Path(folder)
    first = datasets[0]
    synthetic = str(first.PatientName) == dicom_export.SYNTHETIC_PATIENT_NAME
    done = DicomExport(folder=folder, files=sorted(folder.glob("*.dcm")),
                       series_instance_uid=str(first.SeriesInstanceUID), series_description=str(first.SeriesDescription),
                       patient_id=str(first.PatientID), patient_name=str(first.PatientName),
                       study_instance_uid=str(first.StudyInstanceUID), synthetic=synthetic)
    done.message = (f"Exported '{fused.GetName()}' as a DICOM series of {len(datasets)} files to {folder} "
                    f"('{done.series_description}').")
    if synthetic:
        done.notes.append(f"'{anatomical.GetName()}' is not from DICOM: the series has a new, synthetic patient "
                          f"and study (patient ID {done.patient_id}).")
    else:
        done.notes.append(f"Patient ID '{done.patient_id}', in the study of '{anatomical.GetName()}' "
                          f"({done.study_instance_uid}).")
    done.message = " ".join([done.message] + done.notes)
    return done
