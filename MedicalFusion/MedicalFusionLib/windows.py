"""Windows a radiologist would pick: named presets, how a CT in Hounsfield units is recognised,
and which window an input gets when the user gave none.

Presets (``medicalfusion presets`` lists them). The CT ones are 3D Slicer's own volume display
presets (Modules/Loadable/Volumes/Resources/VolumeDisplayPresets.json: CT-Abdomen W 350 / L 40,
CT-Bone W 1000 / L 400, CT-Brain W 100 / L 50, CT-Lung W 1400 / L -500, CT-Air W 1000 / L -426);
``ct-soft-tissue`` is Slicer's CT-Abdomen, the preset Slicer's PET/CT hanging protocol applies to
the CT (Slicer script repository, "Activate hanging protocol by keyboard shortcut"). The PET ones
are SUV windows from 0: ``pet-suv-0-20`` is the window that hanging protocol gives the PET
(SetWindowLevelMinMax(0, 20) with PET-Heat); any ``pet-suv-0-N`` (N > 0) is accepted.

Default windows (no ``--window`` / preset given):

- a CT in HU gets ``ct-soft-tissue`` (as anatomical, and as a grayscale functional);
- 8-bit images keep 0..255; anything else (MR, PET) keeps the pipeline's data-driven window
  (anatomical: 0.5-99.5 % percentiles of the non-background voxels; functional: minimum to the
  99.9th percentile).

A scalar image is a CT in HU (:func:`is_ct_hu`) when, first match wins:

1. its units are known (``units`` hint): ``HU`` -> yes; any other known unit -> no. The hint comes
   from the DICOM header (Modality CT with Rescale Type HU or none: the rescaled values are HU,
   see :mod:`MedicalFusionLib.io.dicom`) or, in Slicer, from the volume node (voxel value units coded
   ``[hnsf'U]``, the ``DICOM.Modality`` attribute ``CT``: see ``scene.node_units``);
2. otherwise (a NIfTI/NRRD file, a node without DICOM attributes) its value range: air present
   (minimum between -3100 and -900: -1000 air, -1024 or -3024 padding) and nothing above 4000
   (the 99.9th percentile; bone and contrast stay below, metal streaks are rare). MR, PET and 8-bit
   images never have such negative values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import FusionError

DEFAULT_CT_PRESET = "ct-soft-tissue"
#: Value-range rule of :func:`is_ct_hu` (HU).
HU_MIN_RANGE = (-3100.0, -900.0)
HU_MAX_P999 = 4000.0


@dataclass(frozen=True)
class WindowPreset:
    name: str           # the command-line name
    units: str          # what the window is in: HU or SUVbw
    lo: float
    hi: float
    source: str         # where the figures come from

    @property
    def window(self) -> tuple[float, float]:
        return self.lo, self.hi

    def describe(self) -> str:
        width, level = self.hi - self.lo, (self.hi + self.lo) / 2.0
        return f"{self.name} ({self.units} {self.lo:g}..{self.hi:g}, W {width:g} / L {level:g}; {self.source})"


def _wl(name: str, width: float, level: float, source: str) -> WindowPreset:
    return WindowPreset(name, "HU", level - width / 2.0, level + width / 2.0, source)


_SLICER = "3D Slicer volume display preset"
PRESETS: dict[str, WindowPreset] = {p.name: p for p in (
    _wl("ct-soft-tissue", 350, 40, f"{_SLICER} CT-Abdomen, used by Slicer's PET/CT hanging protocol"),
    _wl("ct-bone", 1000, 400, f"{_SLICER} CT-Bone"),
    _wl("ct-lung", 1400, -500, f"{_SLICER} CT-Lung"),
    _wl("ct-brain", 100, 50, f"{_SLICER} CT-Brain"),
    _wl("ct-air", 1000, -426, f"{_SLICER} CT-Air"),
    WindowPreset("pet-suv-0-5", "SUVbw", 0.0, 5.0, "SUV 0-5"),
    WindowPreset("pet-suv-0-10", "SUVbw", 0.0, 10.0, "SUV 0-10"),
    WindowPreset("pet-suv-0-20", "SUVbw", 0.0, 20.0, "Slicer's PET/CT hanging protocol (PET-Heat, 0-20)"),
)}
#: Slicer's own preset names (as its Volumes module shows them) -> ours.
SLICER_NAMES = {"CT-Abdomen": "ct-soft-tissue", "CT-Bone": "ct-bone", "CT-Lung": "ct-lung",
                "CT-Brain": "ct-brain", "CT-Air": "ct-air"}
_SUV_RANGE = re.compile(r"^pet-suv-0-(\d+(?:\.\d+)?)$")


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> WindowPreset:
    """A preset by name (ours, case-insensitive, or Slicer's e.g. 'CT-Abdomen'; 'pet-suv-0-N')."""
    key = SLICER_NAMES.get(str(name).strip(), str(name).strip().lower())
    if key in PRESETS:
        return PRESETS[key]
    m = _SUV_RANGE.match(key)
    if m and float(m.group(1)) > 0:
        return WindowPreset(key, "SUVbw", 0.0, float(m.group(1)), f"SUV 0-{m.group(1)}")
    raise FusionError(f"unknown window preset '{name}': choose one of {', '.join(PRESETS)} or pet-suv-0-N "
                      "(see 'medicalfusion presets')")


def is_ct_hu(image: sitk.Image, units: str | None = None) -> bool:
    """Whether a scalar image holds CT Hounsfield units (see the module docstring for the rule)."""
    if units:
        return units.upper() == "HU"
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetPixelID() == sitk.sitkUInt8:
        return False
    arr = sitk.GetArrayViewFromImage(image)
    lo = float(arr.min())
    if not HU_MIN_RANGE[0] <= lo <= HU_MIN_RANGE[1]:
        return False
    return float(np.percentile(arr, 99.9)) <= HU_MAX_P999


@dataclass
class WindowChoice:
    """The window an input gets: (lo, hi) or None (the pipeline's data-driven default), and why."""

    window: tuple[float, float] | None
    source: str
    units: str = ""       # what the values are: the units given, HU when recognised, else ''
    notice: str = ""


def choose_window(image: sitk.Image, role: str, window: tuple[float, float] | None = None,
                  preset: str | None = None, units: str | None = None) -> WindowChoice:
    """The window of one scalar input: the explicit window, else the preset, else the CT soft-tissue
    preset for a CT in HU, else None (the caller's data-driven default)."""
    scalar = image.GetNumberOfComponentsPerPixel() == 1
    known = units or ("HU" if scalar and is_ct_hu(image) else "")
    if window is not None:
        return WindowChoice((float(window[0]), float(window[1])), "given", known)
    if preset:
        p = get_preset(preset)
        notice = ""
        if known and known.upper() != p.units.upper() and not (p.units == "SUVbw" and known.upper().startswith("SUV")):
            notice = f"the {role} window preset {p.name} is in {p.units} but the {role} values are {known}"
        return WindowChoice(p.window, f"preset {p.describe()}", known, notice)
    if scalar and known.upper() == "HU":
        p = PRESETS[DEFAULT_CT_PRESET]
        how = "units" if units else "value range"
        return WindowChoice(p.window, f"CT in HU (by {how}): preset {p.describe()}", known)
    return WindowChoice(None, "auto", known)


def display_metadata(prepared) -> dict[str, str]:
    """What the fused picture shows, as strings for file metadata, node attributes and the metrics
    table: each input's units, window (lo..hi, in those units), how the window was chosen, and the
    colour map. ``prepared`` is a :class:`MedicalFusionLib.pipeline.Prepared`."""
    out = {}
    for role, window in (("anatomical", prepared.anatomical_window), ("functional", prepared.functional_window)):
        out[f"{role}_units"] = getattr(prepared, f"{role}_units", "") or "unknown"
        out[f"{role}_window"] = f"{window[0]:.6g}..{window[1]:.6g}" if window else "RGB as given"
        out[f"{role}_window_source"] = prepared.window_sources.get(role, "")
    out["colormap"] = prepared.colormap or "RGB as given"
    return out
