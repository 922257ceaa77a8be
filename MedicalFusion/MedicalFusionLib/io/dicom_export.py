"""The fused volume as a DICOM series: a new series of the anatomical's patient and study that PACS
viewers, SimpleITK/GDCM and 3D Slicer place on the anatomical's grid (see docs/PACS.md).

What is written (:func:`fused_series`), one file per slice of the anatomical grid:

- SOP class **Secondary Capture Image Storage** (1.2.840.10008.5.1.4.1.1.7), 8-bit RGB, uncompressed
  (Explicit VR Little Endian): the one colour class every PACS viewer displays. The SC core
  (patient, study, series, equipment, SC image modules, pixel encoding) is built by highdicom's
  ``SCImage``.
- The **Image Plane** attributes (Image Position/Orientation (Patient), Pixel Spacing, Slice
  Thickness) and the **Frame of Reference** of the anatomical (its FrameOfReferenceUID), added to
  each slice: a Standard Extended SOP Class (PS3.4 B.1.3; dciodvfy warns, no error), as Slicer's
  own DICOM export of a scalar volume writes SC. GDCM (SimpleITK, ITK, Slicer's DICOM loading) and
  the viewers that stack and cross-reference slices read these per slice; Nominal Scanned Pixel
  Spacing (the SC module's own attribute) repeats the pixel spacing for readers that look there.
- Patient and study of the anatomical series (same StudyInstanceUID, so a PACS lists the fused
  series in the same study); a new SeriesInstanceUID; a series description that says what the
  pictures show (:func:`series_description`, e.g. ``Fused PET/CT mrdfn PET-Heat SUVbw 0-10``);
  Source Image Sequence per slice: the anatomical slice at that position and the functional slices
  that the fused slice was resampled from; Derivation Description: inputs, method, windows, map.
- No text in the pixels (Burned In Annotation NO): the fused picture only.

An anatomical that is not DICOM (NRRD, NIfTI, a picture) gets a new patient and study with
clearly synthetic identifiers (:data:`SYNTHETIC_PATIENT_ID` ..., :func:`synthetic_identity`) and a
new FrameOfReferenceUID, and the CLI says so.

Slices are written in the order of the normal (row x column direction): an anatomical whose third
axis points the other way (a left-handed direction matrix, possible in NIfTI, never in a DICOM
series) is written with its slices reversed, so a reader gets the same physical grid with its
third axis along the normal.

:func:`add_dicom_folder` writes the series into a run's :class:`~MedicalFusionLib.io.outputs.OutputSet`
as one folder output (all or nothing), after reading it back with SimpleITK's series reader and
comparing it voxel for voxel and in geometry with what was fused.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import warnings
import io
import os
import pathlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import FusionError

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SYNTHETIC_PATIENT_NAME = "MEDICALFUSION^SYNTHETIC"
SYNTHETIC_PATIENT_PREFIX = "MF-SYNTHETIC-"
SYNTHETIC_STUDY_DESCRIPTION = "MedicalFusion synthetic study (inputs were not DICOM)"
MANUFACTURER = "MedicalFusion"
#: Fused series are numbered anatomical series number + this (or this alone).
SERIES_NUMBER_OFFSET = 1000
#: Patient / study attributes copied from the anatomical series to the fused one.
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription",
)
MODALITY_NAMES = {"PT": "PET", "NM": "SPECT", "CT": "CT", "MR": "MR"}
GEOMETRY_TOLERANCE_MM = 1e-3


def _pydicom():
    from .dicom import _pydicom as load  # noqa: PLC0415

    return load()


def _highdicom():
    try:
        import highdicom  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a dependency of the package
        raise FusionError("writing DICOM needs highdicom: pip install highdicom") from None
    return highdicom


@dataclass
class SeriesIdentity:
    """Who and where the fused series belongs to: the anatomical's patient and study (or synthetic)."""

    attributes: dict                      # keyword -> value, copied into every slice
    frame_of_reference_uid: str
    series_number: int
    synthetic: bool
    anatomical_instances: list = field(default_factory=list)   # (SOPClassUID, SOPInstanceUID) per slice
    functional_instances: list = field(default_factory=list)   # idem, reader order
    anatomical_series_uid: str = ""
    functional_series_uid: str = ""
    specific_character_set: str = "ISO_IR 192"


def _instances(files: Sequence[str]) -> tuple[list, list]:
    from .dicom import read_headers  # noqa: PLC0415

    headers = read_headers(files) if files else []
    return headers, [(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in headers
                     if "SOPClassUID" in h and "SOPInstanceUID" in h]


def synthetic_identity(seed: str = "") -> dict:
    """A new patient and study with identifiers that say they are synthetic (non-DICOM inputs)."""
    pydicom = _pydicom()
    tag = hashlib.sha256((seed + _dt.datetime.now().isoformat()).encode()).hexdigest()[:12].upper()
    now = _dt.datetime.now()
    return {"PatientName": SYNTHETIC_PATIENT_NAME, "PatientID": SYNTHETIC_PATIENT_PREFIX + tag,
            "PatientBirthDate": "", "PatientSex": "", "StudyInstanceUID": pydicom.uid.generate_uid(),
            "StudyDate": now.strftime("%Y%m%d"), "StudyTime": now.strftime("%H%M%S"), "StudyID": "MF" + tag[:8],
            "AccessionNumber": "", "ReferringPhysicianName": "", "StudyDescription": SYNTHETIC_STUDY_DESCRIPTION}


def series_identity(anat, func) -> SeriesIdentity:
    """The fused series' patient, study and frame of reference from the anatomical ``Source``
    (a DICOM series: its headers; else synthetic), and the instances it derives from."""
    pydicom = _pydicom()
    anat_files = list(anat.facts.files) if getattr(anat, "facts", None) is not None else []
    func_files = list(func.facts.files) if getattr(func, "facts", None) is not None else []
    anat_headers, anat_instances = _instances(anat_files)
    func_headers, func_instances = _instances(func_files)
    if anat_headers:
        first = anat_headers[0]
        if func_headers:
            check_same_patient(first, func_headers[0])
        attributes = {k: first.get(k) for k in PATIENT_STUDY_KEYWORDS if first.get(k) not in (None, "")}
        for k in ("StudyID", "AccessionNumber"):     # SH: 16 characters at most (some sources write more)
            if k in attributes:
                attributes[k] = str(attributes[k])[:16]
        for k in ("BodyPartExamined", "Laterality"):
            if first.get(k):
                attributes[k] = first.get(k)
        for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "StudyID", "AccessionNumber", "ReferringPhysicianName"):
            attributes.setdefault(k, "")          # type 2 in the SC IOD: present, maybe empty
        frame = str(first.get("FrameOfReferenceUID", "") or "") or pydicom.uid.generate_uid()
        try:
            number = int(first.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
        except (TypeError, ValueError):
            number = SERIES_NUMBER_OFFSET
        return SeriesIdentity(attributes, frame, number, False, anat_instances, func_instances,
                              str(first.get("SeriesInstanceUID", "")), func.facts.series_instance_uid if func_files else "")
    # a synthetic patient does not point at a real patient's instances
    return SeriesIdentity(synthetic_identity(getattr(anat, "path", "")), pydicom.uid.generate_uid(),
                          SERIES_NUMBER_OFFSET, True, [], [], "", "")


def check_same_patient(anatomical, functional) -> None:
    """FusionError when two DICOM headers name different patients (Patient ID and its issuer): the
    fused series would be filed under the anatomical's patient with another patient's uptake."""
    def who(ds):
        return str(ds.get("PatientID", "") or "").strip(), str(ds.get("IssuerOfPatientID", "") or "").strip()

    a, f = who(anatomical), who(functional)
    if a[0] and f[0] and a != f:
        raise FusionError(f"the anatomical series is of patient ID '{a[0]}' and the functional series of patient ID "
                          f"'{f[0]}': a fused DICOM series would mix two patients; check the inputs (or write -o only)")


# --------------------------------------------------------------------------------------------------
# what the series says it is


def _modality_name(source) -> str:
    facts = getattr(source, "facts", None)
    return MODALITY_NAMES.get(facts.modality, facts.modality) if facts is not None and facts.modality else ""


def series_description(result, anat, func) -> str:
    """``Fused PET/CT mrdfn PET-Heat SUVbw 0-10``: modalities (when DICOM says them), method, colour
    map and the functional window with its units (at most 64 characters, DICOM LO)."""
    prepared = result.prepared
    pair = "/".join(m for m in (_modality_name(func), _modality_name(anat)) if m)
    parts = ["Fused", pair, result.method]
    if prepared is not None and prepared.functional_window is not None:
        lo, hi = prepared.functional_window
        units = prepared.functional_units or ""
        parts += [prepared.colormap or "", units, f"{lo:.4g}-{hi:.4g}"]
    elif prepared is not None:
        parts.append("RGB as given")
    text = " ".join(p for p in parts if p)
    return text[:64]


def derivation_description(result, anat, func, identity: SeriesIdentity) -> str:
    """One paragraph (DICOM ST, at most 1024 characters): inputs, method, windows, colour map."""
    from ..windows import display_metadata  # noqa: PLC0415

    meta = display_metadata(result.prepared) if result.prepared is not None else {}

    def named(source, uid):
        facts = getattr(source, "facts", None)
        if facts is not None:
            return f"{facts.modality or 'DICOM'} series '{facts.series_description}' ({uid})"
        return f"file {pathlib.Path(getattr(source, 'path', '') or 'unknown').name}"

    text = (f"Image fusion by MedicalFusion {__version__}, method {result.method}: anatomical "
            f"{named(anat, identity.anatomical_series_uid)} window {meta.get('anatomical_window', '?')} "
            f"{meta.get('anatomical_units', '')}; functional {named(func, identity.functional_series_uid)} resampled "
            f"onto the anatomical grid, window {meta.get('functional_window', '?')} {meta.get('functional_units', '')}, "
            f"colour map {meta.get('colormap', '?')}. RGB picture, no burned-in text. Not for diagnosis on its own: "
            "read with the source series.")
    return " ".join(text.split())[:1024]


# --------------------------------------------------------------------------------------------------
# geometry


def _orientation_letter(v: np.ndarray) -> str:
    """Patient Orientation (0020,0020) letters of a direction (LPS): the main axes, largest first."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(v))
    out = ""
    for axis in order:
        if abs(v[axis]) > 1e-3 and len(out) < 3:
            out += letters[axis][0 if v[axis] > 0 else 1]
    return out or "L"


def slice_geometry(reference: sitk.Image) -> tuple[np.ndarray, list, np.ndarray, np.ndarray, bool]:
    """(positions [Z,3] in writing order, the array slice index of each, row and column directions,
    whether the slices are reversed): slices run along row x column."""
    if reference.GetDimension() == 2:
        reference = sitk.JoinSeries(reference)
    d = np.asarray(reference.GetDirection(), float).reshape(3, 3)
    origin = np.asarray(reference.GetOrigin(), float)
    sz = reference.GetSpacing()[2]
    row, col, axis = d[:, 0], d[:, 1], d[:, 2]
    n = reference.GetSize()[2]
    flipped = float(np.dot(np.cross(row, col), axis)) < 0
    order = list(range(n - 1, -1, -1)) if flipped else list(range(n))
    positions = np.array([origin + k * sz * axis for k in order])
    return positions, order, row, col, flipped


def _ds_number(x: float) -> str:
    from pydicom.valuerep import format_number_as_ds  # noqa: PLC0415

    return format_number_as_ds(float(0.0 if abs(x) < 1e-12 else x))


def _functional_slices(reference: sitk.Image, func_image: sitk.Image | None, transform, order: list) -> list:
    """For each written slice, the functional slice indices its resampling read: floor to ceiling
    of the functional's continuous third index at the slice's corners and centre (what linear
    interpolation reads), within the functional; none where the slice lies outside it."""
    if func_image is None or func_image.GetDimension() != 3:
        return [[] for _ in order]
    size = reference.GetSize()
    nz = func_image.GetSize()[2]
    out = []
    for k in order:
        ks = []
        for i in (0, size[0] - 1, (size[0] - 1) / 2):
            for j in (0, size[1] - 1, (size[1] - 1) / 2):
                p = reference.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
                if transform is not None:
                    p = transform.TransformPoint(p)
                ks.append(func_image.TransformPhysicalPointToContinuousIndex(p)[2])
        lo, hi = int(np.floor(min(ks))), int(np.ceil(max(ks)))
        out.append([z for z in range(max(lo, 0), min(hi, nz - 1) + 1)])
    return out


# --------------------------------------------------------------------------------------------------
# the datasets


def fused_series(result, anat, func, transform=None, description: str | None = None) -> list:
    """The fused result as SC datasets, one per slice (see the module docstring); ``transform``
    is the functional's placement used for the fusion (for the source references)."""
    hd = _highdicom()
    pydicom = _pydicom()
    with warnings.catch_warnings():     # pydicom's remarks on the sources' own values (e.g. too long)
        warnings.simplefilter("ignore", UserWarning)
        identity = series_identity(anat, func)
    reference = result.reference
    rgb = np.asarray(result.rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise FusionError("the fused result is not 8-bit RGB: it cannot be written as DICOM")
    positions, order, row, col, _flipped = slice_geometry(reference)
    spacing = reference.GetSpacing()
    now = _dt.datetime.now()
    func_image = getattr(func, "image", None)
    n_func = (func_image.GetSize()[2] if func_image.GetDimension() == 3 else 1) if func_image is not None else 0
    func_slices = _functional_slices(reference, func_image, transform, order) \
        if identity.functional_instances and len(identity.functional_instances) == n_func else [[] for _ in order]
    series = {
        "identity": identity, "series_uid": pydicom.uid.generate_uid(), "now": now,
        "description": description or series_description(result, anat, func),
        "derivation": derivation_description(result, anat, func, identity),
        "pixel_spacing": [_ds_number(spacing[1]), _ds_number(spacing[0])],
        "orientation": [_ds_number(v) for v in (*row, *col)],
        "patient_orientation": (_orientation_letter(row), _orientation_letter(col)),
        "thickness": _ds_number(spacing[2] if reference.GetDimension() == 3 else 1.0),
    }
    datasets = []
    with warnings.catch_warnings():     # highdicom's and pydicom's remarks on the source's own values
        warnings.simplefilter("ignore", UserWarning)
        for n, (k, pos) in enumerate(zip(order, positions), start=1):
            sources = list(identity.anatomical_instances[k:k + 1]) if len(identity.anatomical_instances) == len(order) \
                else []
            sources += [identity.functional_instances[z] for z in func_slices[n - 1]]
            datasets.append(_slice_dataset(hd, pydicom, series, np.ascontiguousarray(rgb[k]), n, pos, sources))
    return datasets


def _slice_dataset(hd, pydicom, series: dict, pixels: np.ndarray, number: int, position, sources: list):
    """One slice of the fused series (``series``: the values all slices share)."""
    from pydicom.dataset import Dataset  # noqa: PLC0415

    identity, now = series["identity"], series["now"]
    attrs = identity.attributes
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=attrs["StudyInstanceUID"], series_instance_uid=series["series_uid"],
        series_number=identity.series_number, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=number,
        manufacturer=MANUFACTURER, patient_id=attrs.get("PatientID") or None,
        patient_name=attrs.get("PatientName") or None, patient_birth_date=attrs.get("PatientBirthDate") or None,
        patient_sex=attrs.get("PatientSex") or None, accession_number=attrs.get("AccessionNumber") or None,
        study_id=attrs.get("StudyID") or None, study_date=attrs.get("StudyDate") or None,
        study_time=attrs.get("StudyTime") or None,
        referring_physician_name=attrs.get("ReferringPhysicianName") or None,
        patient_orientation=tuple(v[0] for v in series["patient_orientation"]), series_description=series["description"],
        software_versions=f"MedicalFusion {__version__}", manufacturer_model_name="MedicalFusion")
    # set here, not through SCImage: highdicom 0.22 (the last for Python 3.9) has no such arguments
    sc.SpecificCharacterSet = identity.specific_character_set
    sc.SeriesDate, sc.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sc.ContentDate, sc.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for key, value in attrs.items():          # whatever SCImage did not take, as read
        if sc.get(key) in (None, ""):
            setattr(sc, key, value)
    sc.PatientOrientation = list(series["patient_orientation"])   # oblique: e.g. LP\\AF (highdicom takes one letter)
    if "Laterality" not in sc:
        sc.Laterality = ""                    # General Series, type 2C: unknown
    sc.ConversionType = "WSD"                 # a workstation made it
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"
    sc.LossyImageCompression = "00"
    sc.DerivationDescription = series["derivation"]
    # image plane and frame of reference: the anatomical's grid
    sc.ImagePositionPatient = [_ds_number(v) for v in position]
    sc.ImageOrientationPatient = series["orientation"]
    sc.PixelSpacing = series["pixel_spacing"]
    sc.NominalScannedPixelSpacing = series["pixel_spacing"]
    sc.SliceThickness = series["thickness"]
    sc.FrameOfReferenceUID = identity.frame_of_reference_uid
    sc.PositionReferenceIndicator = ""
    if sources:                               # what it was made from
        items = []
        for cls, uid in sources:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = uid
            items.append(item)
        sc.SourceImageSequence = items
    return sc


def dataset_bytes(ds) -> bytes:
    """A dataset as a DICOM Part 10 file's bytes (preamble, file meta)."""
    pydicom = _pydicom()
    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    except TypeError:                       # pydicom 2.x
        pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# reading back and writing


def read_back(folder: str | os.PathLike) -> sitk.Image:
    """The series in ``folder`` as SimpleITK's series reader (GDCM) reads it."""
    from .read import native_quiet  # noqa: PLC0415

    reader = sitk.ImageSeriesReader()
    with native_quiet():
        names = reader.GetGDCMSeriesFileNames(str(folder))
        reader.SetFileNames(names)
        return reader.Execute()


def on_written_grid(rgb: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """The fused RGB as the written series holds it: the reference grid with its slices along
    the normal (reversed when the reference's third axis points against row x column)."""
    if reference.GetDimension() == 2:
        reference = sitk.JoinSeries(reference)
    positions, order, row, col, flipped = slice_geometry(reference)
    img = sitk.GetImageFromArray(np.ascontiguousarray(rgb[order]), isVector=True)
    img.SetSpacing(reference.GetSpacing())
    img.SetOrigin(tuple(positions[0]))
    img.SetDirection(tuple(np.column_stack([row, col, np.cross(row, col)]).ravel()))
    return img


def check_same(back: sitk.Image, expected: sitk.Image, what: str = "the DICOM series") -> None:
    """FusionError unless ``back`` equals ``expected`` voxel for voxel, on the same grid."""
    if back.GetDimension() == 4 and back.GetSize()[3] == 1:
        back = back[:, :, :, 0]
    problems = []
    if back.GetSize() != expected.GetSize():
        problems.append(f"size {back.GetSize()} instead of {expected.GetSize()}")
    elif not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(expected)):
        problems.append("the voxels differ")
    for name, a, b in (("origin", back.GetOrigin(), expected.GetOrigin()),
                       ("spacing", back.GetSpacing(), expected.GetSpacing()),
                       ("direction", back.GetDirection(), expected.GetDirection())):
        if len(a) != len(b) or not np.allclose(a, b, atol=GEOMETRY_TOLERANCE_MM, rtol=0):
            problems.append(f"{name} {tuple(round(x, 4) for x in a)} instead of {tuple(round(x, 4) for x in b)}")
    if problems:
        raise FusionError(f"{what} read back differs from the fused volume: {'; '.join(problems)}")


def write_series_folder(datasets: Sequence, folder: pathlib.Path) -> list[pathlib.Path]:
    """Write the datasets as IM00001.dcm, ... into an existing empty folder."""
    paths = []
    for n, ds in enumerate(datasets, start=1):
        path = folder / f"IM{n:05d}.dcm"
        data = dataset_bytes(ds)
        with open(path, "wb") as f:
            f.write(data)
        if os.stat(path).st_size != len(data):
            raise OSError(f"only {os.stat(path).st_size} of {len(data)} bytes of {path.name} were written")
        paths.append(path)
    return paths


def add_dicom_folder(out, path: str | os.PathLike, datasets: Sequence, result, what: str = "DICOM output folder"):
    """Write the series into the run's OutputSet as one folder (put in place at commit, with the
    other outputs, or not at all), after checking it reads back as the fused volume."""
    expected = on_written_grid(result.rgb, result.reference)

    def verify(tmp: pathlib.Path) -> None:
        check_same(read_back(tmp), expected, f"the written {what}")

    return out.add_folder(path, lambda tmp: write_series_folder(datasets, tmp), what, verify=verify)
