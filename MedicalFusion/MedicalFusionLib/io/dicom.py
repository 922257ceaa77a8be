"""What a DICOM series says about its voxels: modality, units, frame of reference, and the PET
SUV factor (pydicom reads the headers; SimpleITK stays the pixel reader).

:func:`series_facts` reads every file's header of one series (no pixel data) and returns a
:class:`SeriesFacts`: the modality (0008,0060), the Frame of Reference UID (0020,0052), the series
UID, what the voxel values are after :func:`apply_units` (``HU`` for CT, ``SUVbw`` for a PET that
can be put in SUV, else the raw unit), and for PET the SUV factor of every slice. Another module
(e.g. registration) uses it to tell whether two series share a frame of reference.

PET in SUV (body weight), following the vendor-neutral SUV pseudo-code of the QIBA FDG-PET/CT
technical committee (Kinahan, Clunie et al., UW-Madison / RSNA QIBA wiki "Standardized Uptake Value
(SUV)", the "happy path" of Corrected Image, Decay Correction and Units), completed for the decay
references the pseudo-code leaves out as the IBSI SUV document does (Vácha et al., "SUV
computation", oncoray.github.io/suv_computation):

- Units (0054,1001) ``GML``: the values are SUVbw already (``SUV Type`` (0054,1006) names another
  normalisation, e.g. ``LBM``: kept and named); factor 1.
- ``BQML`` (Bq/ml): SUVbw = value x weight[g] / dose(t), where dose(t) is the Radionuclide Total
  Dose (0018,1074) decayed with the Radionuclide Half Life (0018,1075) from the injection time to
  the time the voxel values refer to, as Decay Correction (0054,1102) says:
    * ``START``: the scan start. Series Date/Time (0008,0021/0031) when it is not after the earliest
      Acquisition Date/Time (0008,0022/0032) of the series; otherwise the series was made later
      (post-processing) and the earliest acquisition date/time is used (the pseudo-code's
      vendor-neutral alternative to GE's private scan time).
    * ``ADMIN``: the injection itself: no decay, dose(t) = dose.
    * ``NONE``: each slice is not decay-corrected: the dose is decayed to that slice's acquisition
      date/time and averaged over its Actual Frame Duration (0018,1242) D:
      dose x 2^(-dt/T) x (1 - e^(-lambda D)) / (lambda D), lambda = ln 2 / T.
  Injection time: Radiopharmaceutical Start DateTime (0018,1078) when present, else the
  Radiopharmaceutical Start Time (0018,1072) on the series date (the day before when that would
  put the injection after the scan: a scan that crosses midnight). Patient's Weight (0010,1030) in
  kg. Corrected Image (0028,0051), when present, must contain ATTN (attenuation-corrected).
- ``CNTS``: Philips' private SUV Scale Factor (7053,1000) of the "Philips PET Private Group" when
  present (as the pseudo-code does), else raw counts.
- Anything else, or a field missing, empty, zero or inconsistent: the raw values stay, and
  :attr:`SeriesFacts.notice` says in one line why (logged as a warning when the series is read:
  the command line shows it as one ``medicalfusion: note:`` line, Slicer in its log).

Rescale slope and intercept (0028,1053/1052) may differ per slice (GE writes one per slice):
SimpleITK's series reader applies each file's own, so a PET is read as float32 to keep them, and
the SUV factor is applied per slice in the reader's slice order.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import FusionError

#: Units this package reports, as UCUM-like short names (what goes into metadata and tables).
UNIT_HU = "HU"
UNIT_SUVBW = "SUVbw"
PET_MODALITIES = ("PT",)
logger = logging.getLogger(__name__)


@dataclass
class SeriesFacts:
    """What one DICOM series' headers say about its voxels (see the module docstring)."""

    modality: str = ""                       # (0008,0060): CT, PT, MR, NM, ...
    units: str = ""                          # the voxel values after apply_units: HU, SUVbw, BQML, CNTS, ... or ""
    raw_units: str = ""                      # as stored: PET Units (0054,1001), or HU for a CT
    frame_of_reference_uid: str = ""         # (0020,0052)
    series_instance_uid: str = ""            # (0020,000E)
    series_description: str = ""             # (0008,103E)
    suv_factors: tuple[float, ...] | None = None   # PET: one factor per slice (reader order), else None
    decay_correction: str = ""               # PET: (0054,1102) START / ADMIN / NONE
    notice: str = ""                         # one line when units could not be made what they should be
    files: tuple[str, ...] = field(default_factory=tuple, repr=False)

    @property
    def suv_factor(self) -> float | None:
        """The SUV factor when it is the same for every slice (START, ADMIN, GML), else None."""
        if not self.suv_factors:
            return None
        first = self.suv_factors[0]
        return first if all(math.isclose(f, first, rel_tol=1e-9) for f in self.suv_factors) else None

    @property
    def is_ct_hu(self) -> bool:
        return self.units == UNIT_HU

    def as_metadata(self, role: str) -> dict[str, str]:
        """Key/value facts for file metadata or node attributes, prefixed with ``role``."""
        out = {f"{role}_modality": self.modality, f"{role}_units": self.units or "unknown"}
        if self.frame_of_reference_uid:
            out[f"{role}_frame_of_reference_uid"] = self.frame_of_reference_uid
        if self.suv_factor is not None and self.raw_units not in ("", self.units):
            out[f"{role}_suv_factor"] = f"{self.suv_factor:.9g}"
        return out


# --------------------------------------------------------------------------------------------------
# reading headers


def _pydicom():
    try:
        import pydicom  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a dependency; Slicer ships it too
        raise FusionError("reading DICOM headers needs pydicom: pip install pydicom") from None
    return pydicom


def read_headers(files: Sequence[str | os.PathLike]) -> list:
    """pydicom datasets of ``files`` without pixel data (a file that is not DICOM: FusionError)."""
    pydicom = _pydicom()
    out = []
    for f in files:
        try:
            out.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types for a bad file
            raise FusionError(f"{f} is not a DICOM file pydicom can read ({type(exc).__name__}): check the series") from None
    return out


def series_facts(source: str | os.PathLike | Sequence[str | os.PathLike]) -> SeriesFacts:
    """Facts of one DICOM series: a folder holding it, or its files in slice order."""
    if isinstance(source, (str, os.PathLike)):
        from .read import dicom_series_files  # noqa: PLC0415  (read.py reads series through this module)

        files = dicom_series_files(pathlib.Path(source)) if pathlib.Path(source).is_dir() else [str(source)]
    else:
        files = [str(f) for f in source]
    return facts_from_headers(read_headers(files), files)


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _number(ds, keyword: str) -> float | None:
    text = _text(ds, keyword)
    if not text:
        return None
    try:
        value = float(text.split("\\")[0])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def facts_from_headers(datasets: Sequence, files: Sequence[str] = ()) -> SeriesFacts:
    """:class:`SeriesFacts` from the headers of one series (slice order = ``datasets`` order)."""
    if not datasets:
        raise FusionError("the DICOM series has no files")
    ds0 = datasets[0]
    facts = SeriesFacts(modality=_text(ds0, "Modality").upper(),
                        frame_of_reference_uid=_text(ds0, "FrameOfReferenceUID"),
                        series_instance_uid=_text(ds0, "SeriesInstanceUID"),
                        series_description=_text(ds0, "SeriesDescription"),
                        files=tuple(str(f) for f in files))
    if facts.modality == "CT":
        rescale_type = _text(ds0, "RescaleType").upper()
        if rescale_type in ("", "HU"):
            facts.units = facts.raw_units = UNIT_HU
        else:
            facts.units = facts.raw_units = rescale_type
    elif facts.modality in PET_MODALITIES:
        _pet_units(datasets, facts)
    return facts


# --------------------------------------------------------------------------------------------------
# PET: SUV


def _parse_date(text: str) -> _dt.date | None:
    text = text.strip().replace(".", "").replace("-", "")   # old ACR-NEMA style 'YYYY.MM.DD' too
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _parse_time(text: str) -> _dt.timedelta | None:
    """DICOM TM ('HHMMSS.FFFFFF', 'HHMM', 'HH', or old 'HH:MM:SS') as time since midnight."""
    text = text.strip().replace(":", "")
    if not text:
        return None
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (frac and not frac.isdigit()):
        return None
    h, m, s = int(whole[:2]), int(whole[2:4] or 0), int(whole[4:6] or 0)
    if h > 23 or m > 59 or s > 60:
        return None
    return _dt.timedelta(hours=h, minutes=m, seconds=s, microseconds=int((frac + "000000")[:6]) if frac else 0)


def _parse_datetime(text: str) -> _dt.datetime | None:
    """DICOM DT 'YYYYMMDDHHMMSS.FFFFFF&ZZXX' (the UTC offset is ignored: all times of one study
    are taken in the same zone)."""
    text = text.strip()
    for sign in ("+", "-"):
        if sign in text[8:]:
            text = text[:8] + text[8:].split(sign)[0]
    day = _parse_date(text[:8])
    if day is None:
        return None
    time = _parse_time(text[8:]) if len(text) > 8 else _dt.timedelta(0)
    return None if time is None else _dt.datetime.combine(day, _dt.time()) + time


def _date_time(ds, date_kw: str, time_kw: str) -> _dt.datetime | None:
    day, time = _parse_date(_text(ds, date_kw)), _parse_time(_text(ds, time_kw))
    if day is None or time is None:
        return None
    return _dt.datetime.combine(day, _dt.time()) + time


def _raw(facts: SeriesFacts, why: str) -> None:
    facts.units = facts.raw_units or "unknown"
    facts.suv_factors = None
    facts.notice = (f"PET series '{facts.series_description or facts.series_instance_uid}': {why}; "
                    f"fused as raw values ({facts.units}), not SUV")


def _philips_suv_factor(ds) -> float | None:
    try:
        block = ds.private_block(0x7053, "Philips PET Private Group")
        return float(block[0x00].value)
    except (KeyError, ValueError, TypeError):
        return None


def _pet_units(datasets: Sequence, facts: SeriesFacts) -> None:
    ds0 = datasets[0]
    units = _text(ds0, "Units").upper()
    facts.raw_units = units
    facts.decay_correction = _text(ds0, "DecayCorrection").upper()
    n = len(datasets)
    if units == "GML":
        suv_type = _text(ds0, "SUVType").upper()
        facts.units = f"SUV{suv_type.lower()}" if suv_type and suv_type != "BW" else UNIT_SUVBW
        facts.suv_factors = (1.0,) * n
        return
    if units == "CNTS":
        factor = _philips_suv_factor(ds0)
        if factor is None or factor <= 0:
            _raw(facts, "Units are CNTS (counts) without Philips' SUV scale factor (7053,1000)")
            return
        facts.units = UNIT_SUVBW
        facts.suv_factors = tuple(_philips_suv_factor(ds) or factor for ds in datasets)
        return
    if units != "BQML":
        _raw(facts, f"Units (0054,1001) are {units or 'missing'}, not BQML or GML")
        return
    corrected = _text(ds0, "CorrectedImage").upper().split("\\")
    if corrected != [""] and "ATTN" not in corrected:
        _raw(facts, "Corrected Image (0028,0051) has no ATTN: the image is not attenuation-corrected")
        return
    missing = []
    weight = _number(ds0, "PatientWeight")
    if not weight or weight <= 0:
        missing.append("Patient's Weight (0010,1030)")
    info = ds0.get("RadiopharmaceuticalInformationSequence", None)
    item = info[0] if info else None
    dose = _number(item, "RadionuclideTotalDose") if item is not None else None
    half_life = _number(item, "RadionuclideHalfLife") if item is not None else None
    if not dose or dose <= 0:
        missing.append("Radionuclide Total Dose (0018,1074)")
    if not half_life or half_life <= 0:
        missing.append("Radionuclide Half Life (0018,1075)")
    decay = facts.decay_correction
    if decay not in ("START", "ADMIN", "NONE"):
        missing.append(f"Decay Correction (0054,1102) START/ADMIN/NONE (it is '{decay}')" if decay
                       else "Decay Correction (0054,1102)")
    acquisitions = [_date_time(ds, "AcquisitionDate", "AcquisitionTime") for ds in datasets]
    series_dt = _date_time(ds0, "SeriesDate", "SeriesTime")
    known = [a for a in acquisitions if a is not None]
    earliest = min(known) if known else None
    scan = series_dt if series_dt is not None and (earliest is None or series_dt <= earliest) else earliest
    injection = None
    if item is not None:
        injection = _parse_datetime(_text(item, "RadiopharmaceuticalStartDateTime"))
        if injection is None:
            start = _parse_time(_text(item, "RadiopharmaceuticalStartTime"))
            if start is not None and scan is not None:
                injection = _dt.datetime.combine(scan.date(), _dt.time()) + start
                if injection > scan:               # injected before midnight, scanned after it
                    injection -= _dt.timedelta(days=1)
    if decay in ("START", "NONE") and scan is None:
        missing.append("Series or Acquisition Date/Time (0008,0021/0031, 0008,0022/0032)")
    if decay in ("START", "NONE") and injection is None:
        missing.append("Radiopharmaceutical Start DateTime or Time (0018,1078/1072)")
    if missing:
        _raw(facts, "Units are BQML but " + ", ".join(missing) + (" is" if len(missing) == 1 else " are")
             + " missing or invalid")
        return
    grams = weight * 1000.0
    if decay == "ADMIN":
        facts.suv_factors = (grams / dose,) * n
    elif decay == "START":
        dt = (scan - injection).total_seconds()
        if dt < 0:
            _raw(facts, f"the scan ({scan}) is before the injection ({injection})")
            return
        facts.suv_factors = (grams / (dose * 2.0 ** (-dt / half_life)),) * n
    else:  # NONE: every slice decays to its own acquisition time, averaged over its frame
        lam = math.log(2.0) / half_life
        factors = []
        for ds, acquired in zip(datasets, acquisitions):
            t = acquired or scan
            dt = (t - injection).total_seconds()
            if dt < 0:
                _raw(facts, f"a slice was acquired ({t}) before the injection ({injection})")
                return
            duration = (_number(ds, "ActualFrameDuration") or 0.0) / 1000.0   # ms -> s
            in_frame = (1.0 - math.exp(-lam * duration)) / (lam * duration) if duration > 0 else 1.0
            factors.append(grams / (dose * math.exp(-lam * dt) * in_frame))
        facts.suv_factors = tuple(factors)
    facts.units = UNIT_SUVBW


# --------------------------------------------------------------------------------------------------
# reading a series with its units


def read_series(files: Sequence[str]) -> tuple[sitk.Image, SeriesFacts]:
    """Read the files of one DICOM series (slice order) with SimpleITK and put its values in the
    units :func:`series_facts` finds (PET: SUV when it can be computed). Returns (image, facts)."""
    files = [str(f) for f in files]
    facts = facts_from_headers(read_headers(files), files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    if facts.modality in PET_MODALITIES:
        reader.SetOutputPixelType(sitk.sitkFloat32)   # keep every slice's own rescale slope
    image = reader.Execute()
    if facts.notice:              # the CLI shows the package's warnings as one 'note:' line each
        logger.warning(facts.notice)
    return apply_units(image, facts), facts


def apply_units(image: sitk.Image, facts: SeriesFacts) -> sitk.Image:
    """The image times its per-slice SUV factors (a new float32 image), or the image unchanged."""
    factors = facts.suv_factors
    if not factors or all(f == 1.0 for f in factors):
        return image
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)     # already a copy
    if facts.suv_factor is not None:
        arr *= np.float32(facts.suv_factor)
    elif arr.ndim == 3 and arr.shape[0] == len(factors):
        arr *= np.asarray(factors, dtype=np.float32)[:, None, None]
    else:
        raise FusionError(f"the PET series has {len(factors)} files but {image.GetSize()[2:]} slices: "
                          "give a series of single-frame slices")
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out
