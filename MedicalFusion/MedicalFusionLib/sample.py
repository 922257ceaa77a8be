"""The embedded default sample: an anatomical MRI and a simulated PET on its own coarser grid.

The anatomical is the MNI152 2009a symmetric T1 template that the nilearn wheel ships
(``nilearn/datasets/data``, 1 mm, 197x233x189). The PET is simulated from the template's grey and
white matter probability maps, the way FDG uptake looks: grey matter about 4x white matter, a
little CSF activity, a hot lesion, blurred to PET resolution (6 mm FWHM), sampled on a 4 mm grid
that is tilted by 8 degrees and stored with the x axis flipped, with Poisson-like noise. When
nilearn is not installed, a procedural head phantom (ellipsoids) stands in for the template.

Nothing here is copied from elsewhere: the data is generated at run time from installed packages.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import SimpleITK as sitk


_TEMPLATE_FILES = [f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")]


def template_folder() -> pathlib.Path | None:
    """Where the installed nilearn package keeps the MNI152 template files, or None.

    Found without importing nilearn (its import pulls in scikit-learn, pandas...; only the files are used).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return data if all((data / n).is_file() for n in _TEMPLATE_FILES) else None


def _nilearn_templates() -> tuple[sitk.Image, sitk.Image, sitk.Image] | None:
    data = template_folder()
    if data is None:
        return None
    return tuple(sitk.ReadImage(str(data / n)) for n in _TEMPLATE_FILES)  # type: ignore[return-value]


def phantom_head(size: tuple[int, int, int] = (128, 128, 96), spacing: float = 1.5) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """A procedural head (x, y, z sizes): T1-like image and grey/white matter maps, LPS geometry."""
    nx, ny, nz = size
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in (nz, ny, nx)), indexing="ij")
    r = np.sqrt((x / 0.80) ** 2 + (y / 0.92) ** 2 + (z / 0.85) ** 2)
    brain = r < 0.82
    wm = (r < 0.62).astype(np.float32)
    ventricles = (np.sqrt((np.abs(x) - 0.12) ** 2 / 0.06 ** 2 + y ** 2 / 0.35 ** 2 + z ** 2 / 0.2 ** 2) < 1)
    wm[ventricles] = 0
    gm = (brain & (r >= 0.62)).astype(np.float32)
    # gyri: modulate the cortical ribbon
    gm *= (0.6 + 0.4 * np.cos(18 * np.arctan2(y, x)) * np.cos(14 * z)) > 0.3
    skull = ((r >= 0.88) & (r < 0.97)).astype(np.float32)
    t1 = 0.85 * wm + 0.55 * gm + 0.15 * ventricles + 0.35 * skull
    images = []
    for arr in (np.clip(t1 * 255, 0, 255).astype(np.uint8), (gm * 255).astype(np.uint8), (wm * 255).astype(np.uint8)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((spacing,) * 3)
        img.SetOrigin((-(nx - 1) * spacing / 2, -(ny - 1) * spacing / 2, -(nz - 1) * spacing / 2))
        images.append(img)
    return tuple(images)  # type: ignore[return-value]


def simulate_pet(gm: sitk.Image, wm: sitk.Image, seed: int = 0, spacing: float = 4.0, tilt_deg: float = 8.0,
                 fwhm_mm: float = 6.0) -> sitk.Image:
    """FDG-like PET (float32, kBq/ml-like units) on a coarse, tilted, x-flipped grid covering ``gm``."""
    g = sitk.GetArrayFromImage(gm).astype(np.float32) / 255.0
    w = sitk.GetArrayFromImage(wm).astype(np.float32) / 255.0
    brain = np.clip(g + w, 0, 1)
    uptake = 10.0 * g + 2.5 * w + 0.6 * (brain > 0.05) * (1 - brain)
    # a hot lesion: 12 mm radius sphere in the right frontal white matter, 3x grey matter uptake
    centre = np.array(gm.TransformContinuousIndexToPhysicalPoint([s / 2 for s in gm.GetSize()])) + np.array([-25.0, -30.0, 15.0])
    ci = np.array(gm.TransformPhysicalPointToContinuousIndex(centre.tolist()))[::-1]   # z, y, x
    radius_vox = 12.0 / np.array(gm.GetSpacing())[::-1]
    zz, yy, xx = np.ogrid[: uptake.shape[0], : uptake.shape[1], : uptake.shape[2]]
    lesion = ((zz - ci[0]) / radius_vox[0]) ** 2 + ((yy - ci[1]) / radius_vox[1]) ** 2 + ((xx - ci[2]) / radius_vox[2]) ** 2 < 1
    uptake[lesion] = 30.0
    img = sitk.GetImageFromArray(uptake)
    img.CopyInformation(gm)
    img = sitk.SmoothingRecursiveGaussian(img, fwhm_mm / 2.3548)
    # the coarse grid: x flipped, rotated about z by tilt_deg, covering the anatomical extent
    t = math.radians(tilt_deg)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    direction = rot @ np.diag([-1.0, 1.0, 1.0])
    extent = np.array(gm.GetSize()) * np.array(gm.GetSpacing())
    size = [int(math.ceil(e / spacing)) + 4 for e in extent]
    centre_phys = np.array(gm.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in gm.GetSize()]))
    origin = centre_phys - direction @ (np.array(size, dtype=np.float64) - 1) / 2 * spacing
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing((spacing,) * 3)
    ref.SetDirection(direction.ravel().tolist())
    ref.SetOrigin(origin.tolist())
    pet = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(pet)
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.clip(arr, 0, None) * 20.0) / 20.0
    out = sitk.GetImageFromArray(counts.astype(np.float32))
    out.CopyInformation(pet)
    return out


def sample_pair(seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """(anatomical T1, simulated PET) as SimpleITK images; MNI152 when nilearn is there, else a phantom."""
    templates = _nilearn_templates()
    t1, gm, wm = templates if templates is not None else phantom_head()
    return t1, simulate_pet(gm, wm, seed=seed)


SAMPLE_FILES = ("anatomical_t1.nrrd", "functional_pet.nrrd")


def _add_sample_files(out, folder: pathlib.Path, seed: int) -> tuple[sitk.Image, sitk.Image]:
    """Make the pair in memory and add its two NRRD files to the OutputSet ``out``."""
    out.folder(folder, "sample folder")
    t1, p = sample_pair(seed)
    out.add_image(folder / SAMPLE_FILES[0], t1, "sample anatomical")
    out.add_image(folder / SAMPLE_FILES[1], p, "sample functional")
    return t1, p


def write_sample(folder: str | pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """Write the sample pair as NRRD files in ``folder`` (made if needed) and return their paths.

    A cache that is reused: when both files are there they are kept; otherwise both are written
    together, all or nothing (:class:`~MedicalFusionLib.io.outputs.OutputSet`)."""
    from .io.outputs import OutputSet  # noqa: PLC0415

    folder = pathlib.Path(folder)
    anat, pet = (folder / n for n in SAMPLE_FILES)
    if not (anat.is_file() and pet.is_file()):
        with OutputSet() as out:
            _add_sample_files(out, folder, seed)
            out.commit()
    return anat, pet


def add_sample(out, folder: str | pathlib.Path, seed: int = 0):
    """The sample pair as :class:`~MedicalFusionLib.io.read.Source` objects for a demo run.

    When ``folder`` already holds both NRRD files (an earlier demo) and they read cleanly, they are
    used as they are; otherwise the pair is made in memory and its two files are added to the run's
    :class:`~MedicalFusionLib.io.outputs.OutputSet` ``out``, so they appear only if the whole demo
    succeeds (``folder`` is made, and removed again on failure, by ``out``)."""
    from .errors import FusionError  # noqa: PLC0415
    from .io.read import Source, read_source  # noqa: PLC0415

    folder = pathlib.Path(folder)
    anat, pet = (folder / n for n in SAMPLE_FILES)
    if anat.is_file() and pet.is_file():
        try:
            sources = read_source(anat, "demo sample anatomical"), read_source(pet, "demo sample functional")
        except FusionError:
            sources = None           # damaged by something else: made again below
        if sources is not None:
            out.protect(anat, "demo sample anatomical")
            out.protect(pet, "demo sample functional")
            return sources
    t1, p = _add_sample_files(out, folder, seed)
    return Source(t1, path=str(anat)), Source(p, path=str(pet))


# --------------------------------------------------------------------------------------------------
# the sample in 3D Slicer's Sample Data module (registered and loaded by MedicalFusion.py)

#: Its name in Sample Data and the names of its two nodes.
SAMPLE_NAME = "MedicalFusionPETMRI"
SAMPLE_NODE_NAMES = ("MNI152 T1", "Simulated FDG PET")
#: What Sample Data copies for it (a small file the extension ships in Resources/), and the file
#: type of the module's reader that loads that file by generating the pair.
SAMPLE_RECIPE_FILE = "MedicalFusionSample.mfsample"
SAMPLE_RECIPE_MARKER = "MedicalFusion sample"
SAMPLE_FILE_TYPE = "MedicalFusionSample"


def is_sample_recipe(path: str | pathlib.Path) -> bool:
    """Whether ``path`` is the sample's recipe file (``*.mfsample`` starting with its marker)."""
    if not str(path).lower().endswith(".mfsample"):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(SAMPLE_RECIPE_MARKER)
    except (OSError, UnicodeDecodeError):
        return False
