"""What a user can choose, in one place: :class:`FusionOptions`, the choices (methods catalogue, slice
orientations, devices, metric sets), the defaults and the checks of a choice.

Every front door builds the same :class:`FusionOptions` from here: the CLI (``cli.fuse_options``),
the Slicer panel (``MedicalFusionLogic.options``) and Python callers, and :func:`validate` checks it
once, before any work (the pipeline calls it again, so a library caller gets the same errors).

Importing this module imports neither torch nor numpy: ``medicalfusion methods``, ``--help`` and the
panel's first display list the methods from :data:`METHODS` without loading any method. The method
registry (``methods/registry.py``) registers implementations *against* this catalogue: a method's
family, description and paper come from here, and a method the catalogue lacks cannot be registered.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import FusionError

# --------------------------------------------------------------------------------------------------
# choices and defaults

#: Slice orientations by name (the array axes 0-2 are accepted too, see pipeline.array_axis).
AXES = ("axial", "coronal", "sagittal")
#: Torch devices by name ('gpu': CUDA or else Apple MPS; 'cuda:1' etc. are accepted too).
DEVICES = ("auto", "cuda", "mps", "cpu", "gpu")
#: The panel's shorter device list.
PANEL_DEVICES = ("auto", "gpu", "cpu")
#: Named metric sets (the keys: metrics.METRIC_SETS): 'quick' is every metric but FMI (pixel and
#: gradient), which takes most of the metrics' time on a CPU; 'all' adds FMI, as the papers report.
METRIC_SETS = {"all": "every metric, FMI (pixel and gradient) included",
               "quick": "every metric but FMI (pixel and gradient)"}
DEFAULT_METHOD = "lp"
#: ``fuse``, the panel and the Python API: the quick set (issue 21); ``evaluate`` reports every metric.
DEFAULT_METRIC_SET = "quick"
EVALUATE_METRIC_SET = "all"
DEFAULT_AXIS = "axial"
DEFAULT_DEVICE = "auto"
MAX_BATCH_SIZE = 4096
FAMILIES = ("basic", "pyramid", "classic", "network")


# --------------------------------------------------------------------------------------------------
# the methods catalogue


@dataclass(frozen=True)
class MethodInfo:
    """A fusion method as the user sees it: name, family, one-line description, paper; a network
    needs its trained weights (``weights/<name>.pt``), which :meth:`available` checks."""

    name: str
    family: str
    description: str
    reference: str
    needs_weights: bool = False

    def available(self) -> tuple[bool, str]:
        """(True, '') or (False, why): a network whose weights are missing or not trusted says why."""
        if not self.needs_weights:
            return True, ""
        from .networks.weights import weights_status  # noqa: PLC0415  (json and hashlib, no torch)

        return weights_status(self.name)


_LITERATURE = "Baseline used throughout the fusion literature (e.g. James & Dasarathy, Inf. Fusion 2014)"

#: Every method, in the order they are listed (by family). The implementations live in methods/
#: and networks/ and register against these entries.
METHODS: tuple[MethodInfo, ...] = (
    MethodInfo("average", "basic", "Mean of the anatomical and functional luma; functional colour kept (YCbCr)",
               _LITERATURE),
    MethodInfo("max", "basic", "Pixel-wise maximum of the two lumas; functional colour kept (YCbCr)", _LITERATURE),
    MethodInfo("alpha", "basic",
               "What 3D Slicer shows today: functional as foreground over the anatomical at opacity 0.5",
               "3D Slicer slice-view compositing (vtkMRMLSliceLogic, alpha blend); PET/CT hanging protocol"),
    MethodInfo("lp", "pyramid", "Laplacian pyramid (4 levels): base averaged, details by absolute maximum",
               "Burt & Adelson, IEEE Trans. Commun. 1983; Burt & Kolczynski, ICCV 1993"),
    MethodInfo("dwt", "pyramid", "Haar wavelet (3 levels): approximation averaged, details by absolute maximum",
               "Li, Manjunath & Mitra, Graph. Models Image Process. 1995"),
    MethodInfo("jbf_lge", "classic",
               "Joint bilateral filter split into energy/structure layers; structure by local gradient energy, "
               "energy by maximum",
               "Li, Zhou, Tan, Zhang & Zhao, Information Sciences 569, 2021"),
    MethodInfo("nsct", "classic",
               "NSCT (4 levels, 16/8/4/2 directions): low-pass averaged, high-pass absolute maximum with a 3x3 "
               "majority consistency check",
               "da Cunha, Zhou & Do, IEEE TIP 2006; rule as in Li, Yang & Hu, Inf. Fusion 2011"),
    MethodInfo("gff", "classic",
               "Guided filtering fusion: two-scale split, Laplacian saliency, weights refined by guided filters",
               "Li, Kang & Hu, IEEE Trans. Image Process. 22(7), 2013"),
    MethodInfo("lrd", "classic",
               "Laplacian redecomposition: overlapping / non-overlapping domains of each detail level fused by "
               "different rules (our reading of the paper)",
               "Li, Guo, Han, Wang, Li & Luo, IEEE Trans. Instrum. Meas. 69(9), 2020"),
    MethodInfo("nsst_papcnn", "classic",
               "NSST (4 levels, 8/8/4/4 directions) with WLE*WSEML low-pass rule and parameter-adaptive PCNN "
               "high-pass rule (50 iterations)",
               "Yin, Liu, Liu & Chen, IEEE Trans. Instrum. Meas. 68(1), 2019"),
    MethodInfo("dmfnet", "network",
               "DM-FNet (scaled to CPU): diffusion-trained UNet features at t=5/10/20, timestep fusion + "
               "cross-modal attention + coarse-to-fine aggregation",
               "He et al., DM-FNet: Unified multimodal medical image fusion via diffusion process-trained "
               "encoder-decoder (github.com/HeDan-11/DM-FNet)", needs_weights=True),
    MethodInfo("lywnet", "network",
               "LYWNet: multi-scale pyramid residual weight network (CPU-sized, trained on aanlib); functional "
               "colour kept",
               "LYWNet: a multi-scale pyramid residual weight network for medical image fusion, Quant. Imaging "
               "Med. Surg., doi:10.21037/qims-24-851", needs_weights=True),
    MethodInfo("mrdfn", "network",
               "MRDFN: multiscale residual dense fusion network (CPU-sized, trained on aanlib); functional colour "
               "kept",
               "Multiscale residual dense fusion network, Intelligent Oncology 2026, doi:10.1016/j.intonc.2026.100054",
               needs_weights=True),
)
_BY_NAME = {m.name: m for m in METHODS}


def method_names() -> list[str]:
    """Every method's name, in catalogue order."""
    return [m.name for m in METHODS]


def method_info(name: str) -> MethodInfo:
    """The catalogue entry of ``name``; FusionError for an unknown name."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise FusionError(f"unknown method '{name}': run 'medicalfusion methods' to list them") from None


def check_method(name: str) -> MethodInfo:
    """The entry of an available method; FusionError (unknown, or why it is not available)."""
    info = method_info(name)
    ok, reason = info.available()
    if not ok:
        raise FusionError(reason)
    return info


# --------------------------------------------------------------------------------------------------
# the options and their checks


@dataclass
class FusionOptions:
    """What the user chose. ``None`` windows are computed from the images (see pipeline.prepare)."""

    method: str = DEFAULT_METHOD
    colormap: object = None              # scalar functional: Slicer colour map name (default
                                         # PET-Heat) or an N x 3 RGB table in [0, 1]
    anatomical_window: tuple[float, float] | None = None
    functional_window: tuple[float, float] | None = None
    axis: str | int = DEFAULT_AXIS       # anatomical name or array axis (0 = ITK z)
    device: str = DEFAULT_DEVICE
    batch_size: int | None = None
    compute_metrics: bool = True
    metric_set: str = DEFAULT_METRIC_SET  # METRIC_SETS: 'quick' (all but FMI, default) or 'all'
    # Radiology windows (see windows.py): a named preset is used when no window is given, and the
    # units (e.g. 'HU', 'SUVbw' from DICOM or node attributes; None = unknown, judged from the
    # values) pick the default: a CT in HU gets the soft-tissue window.
    anatomical_preset: str | None = None
    functional_preset: str | None = None
    anatomical_units: str | None = None
    functional_units: str | None = None


def check_window(window, what: str) -> tuple[float, float] | None:
    """``window`` as (lo, hi) floats, or None; FusionError when it is empty (what: '--window', ...)."""
    if window is None:
        return None
    lo, hi = (float(v) for v in window)
    if not lo < hi:
        raise FusionError(f"{what} {lo:g} {hi:g} is empty: give LO < HI")
    return lo, hi


def check_batch_size(value) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or not 1 <= value <= MAX_BATCH_SIZE):
        raise FusionError(f"batch size {value} is not a whole number from 1 to {MAX_BATCH_SIZE}")


def check_metric_set(name: str) -> None:
    if name not in METRIC_SETS:
        raise FusionError(f"unknown metric set '{name}': choose {' or '.join(METRIC_SETS)}")


def check_axis(axis) -> None:
    if isinstance(axis, int) and not isinstance(axis, bool):
        if axis not in (0, 1, 2):
            raise FusionError(f"axis {axis} does not exist: use 0, 1, 2 or axial/coronal/sagittal")
        return
    name = str(axis).lower()
    if name not in AXES and name not in ("0", "1", "2"):
        raise FusionError(f"unknown slice orientation '{axis}': use axial, coronal or sagittal")


def check_device_name(name: str) -> None:
    """The name only (whether the device is there is pick_device's job, when the run starts)."""
    pref = (name or "auto").lower()
    if pref not in DEVICES and not pref.startswith("cuda:"):
        raise FusionError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}")


def validate(options: FusionOptions, window_names: tuple[str, str] = ("anatomical window", "functional window")
             ) -> FusionOptions:
    """Every check that needs no image, before any work: method (known, available), windows,
    presets, colour map, slice orientation, device name, batch size, metric set. Returns
    ``options``; FusionError with one line otherwise. ``window_names`` name the windows in the
    message (the CLI: '--window', '--functional-window')."""
    check_method(options.method)
    check_window(options.anatomical_window, window_names[0])
    check_window(options.functional_window, window_names[1])
    if options.anatomical_preset or options.functional_preset:
        from .windows import get_preset  # noqa: PLC0415

        for preset in (options.anatomical_preset, options.functional_preset):
            if preset:
                get_preset(preset)
    if options.colormap is not None:
        from . import colour  # noqa: PLC0415

        if isinstance(options.colormap, str):
            colour.colormap_table(options.colormap)
        else:
            colour.check_table(options.colormap)
    check_axis(options.axis)
    check_device_name(options.device)
    check_batch_size(options.batch_size)
    if options.compute_metrics:
        check_metric_set(options.metric_set)
    return options
