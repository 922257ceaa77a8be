"""The three real patients of ../shared/data/sts (TCIA soft-tissue sarcoma, IBSI/MIRP test data):
FDG PET fused onto the CT and onto the MR straight from their DICOM folders, with every method.

What is asserted, per patient, pair (PET -> CT, PET -> MR) and method (docs/CLINICAL.md explains):

- grid: the output has exactly the anatomical's grid (CLI, from the DICOM folders);
- the tracer's colour lands on the tumour: rank the voxels by the chroma of the fused RGB (the
  distance of its Cb/Cr from neutral: how coloured the voxel looks); of the top 1 % (ties at the
  cut included), the fraction inside the tumour mask (gtv_mask.nii.gz, on the anatomical grid) is
  at least that of a plain SimpleITK resample of the PET coloured with the same map and window
  (same rule) minus 2 percentage points;
- the anatomy stays visible under the colour: where the PET's colour is visible (its chroma at
  least 0.1) the fine detail of the fused luma (difference of Gaussians, sigma 1 and 3 voxels in
  plane) correlates with that of the windowed anatomical with r >= 0.5 and keeps at least 0.35 of
  its amplitude (regression slope; Slicer's 0.5-opacity overlay keeps about half).

The fusions are made once per pair and method (module cache) and shared by the tests.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import data_root

from MedicalFusionLib import cli, colour
from medicalfusion_tools.hotspot import Case, chroma, detail_kept, top_fraction_in
from MedicalFusionLib.methods import all_methods
from MedicalFusionLib.pipeline import FusionOptions
from MedicalFusionLib.io.read import read_source

STS = data_root() / "sts"
PATIENTS = ("STS_001", "STS_002", "STS_003")
ANATOMICALS = ("CT", "MR_T1")
PAIRS = [(p, a) for p in PATIENTS for a in ANATOMICALS]
PAIR_IDS = [f"{p}-PET-{a}" for p, a in PAIRS]
METHODS = [m.name for m in all_methods() if m.available()[0]]

HOT_SPOT_TOLERANCE = 0.02     # 2 percentage points
MIN_DETAIL_R = 0.5
MIN_DETAIL_SLOPE = 0.35

# The hot spot has no expected failures: six (patient, anatomical, method) combinations (gff on four
# pairs, average and dwt on STS_002 PET->MR) put their strongest colour 6 to 24 points less on the
# tumour than the PET while the recombination was BT.601 (fused luma + the PET's Cb/Cr: a saturated
# yellow clipped on the darker fused luma in the tumour). The colour-keeping recombination
# (colour.keep_colour, issue 18) keeps the PET's chroma wherever the luma falls, and they pass.
#
#: (patient, anatomical, method) -> (r, slope) measured, whose anatomy detail under the colour falls
#: below the rule since the colour-keeping recombination (docs/CLINICAL.md): its fused luma carries
#: the PET's brightness (average), which on STS_002's MR lies outside the lumas PET-Heat's saturated
#: colours can have, so it is clamped to the colour's. strict: a fix shows up. (dwt, 0.48 / 0.57 with
#: the first version, meets the rule since the fused luma is clamped without the linear share.)
ANATOMY_SHORTFALLS = {("STS_002", "MR_T1", "average"): (0.47, 0.40)}

pytestmark = pytest.mark.skipif(not (STS / "STS_001" / "PET" / "dicom").is_dir(),
                                reason=f"the real STS cases are not at {STS} (set MEDICALFUSION_DATA)")


_PAIRS: dict = {}


def pair(patient: str, anatomical: str) -> Case:
    """One PET -> anatomical pair from the DICOM folders, prepared once; fusions made on demand."""
    key = (patient, anatomical)
    if key not in _PAIRS:
        _PAIRS[key] = Case(STS / patient / anatomical / "dicom", STS / patient / "PET" / "dicom",
                           STS / patient / anatomical / "gtv_mask.nii.gz")
    return _PAIRS[key]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_cache():
    """One torch thread (on the loaded 2-core CPU nsst_papcnn took 67 s on STS_001 PET->CT with one
    thread, 729 s with two, run one after the other), and the fusions dropped at the end of the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    _PAIRS.clear()


# --------------------------------------------------------------------------------------------------
# the DICOM facts and windows of the real series


@pytest.mark.parametrize("patient", PATIENTS)
def test_real_series_units_and_frames(patient):
    ct, pet, mr = (read_source(STS / patient / m / "dicom", m).facts for m in ("CT", "PET", "MR_T1"))
    assert (ct.modality, ct.units) == ("CT", "HU")
    assert (pet.modality, pet.raw_units, pet.units, pet.suv_factor, pet.notice) == ("PT", "GML", "SUVbw", 1.0, "")
    assert (mr.modality, mr.units) == ("MR", "")
    # one hybrid PET/CT session: one frame of reference (the MR was registered to it upstream)
    assert ct.frame_of_reference_uid == pet.frame_of_reference_uid != ""


@pytest.mark.parametrize("patient, anatomical", PAIRS, ids=PAIR_IDS)
def test_default_windows_ct_soft_tissue_mr_percentiles(patient, anatomical):
    p = pair(patient, anatomical)
    if anatomical == "CT":
        assert p.prepared.anatomical_window == (-135.0, 215.0)          # Slicer's CT-Abdomen, W 350 / L 40
        assert "ct-soft-tissue" in p.prepared.window_sources["anatomical"]
    else:
        assert p.prepared.anatomical_window == colour.robust_window(sitk.GetArrayViewFromImage(p.anat.image))
    assert p.prepared.functional_units == "SUVbw"


# --------------------------------------------------------------------------------------------------
# the command line, straight from the DICOM folders


@pytest.mark.parametrize("patient, anatomical", PAIRS, ids=PAIR_IDS)
def test_cli_output_has_the_anatomical_grid_and_units(tmp_path, patient, anatomical):
    out = tmp_path / "fused.nrrd"
    args = ["fuse", "-a", str(STS / patient / anatomical / "dicom"), "-f", str(STS / patient / "PET" / "dicom"),
            "-m", "lp", "-o", str(out), "-q"]
    with_metrics = (patient, anatomical) == ("STS_002", "MR_T1")      # the smallest: metrics once
    if with_metrics:
        args += ["--metrics", str(tmp_path / "metrics.csv")]
    assert cli.main(args) == 0
    fused, anat = sitk.ReadImage(str(out)), pair(patient, anatomical).anat.image
    assert fused.GetSize() == anat.GetSize() and fused.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(fused.GetSpacing(), anat.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(fused.GetOrigin(), anat.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(fused.GetDirection(), anat.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fused), pair(patient, anatomical).fused("lp"))
    assert fused.GetMetaData("MedicalFusion.functional_units") == "SUVbw"
    assert fused.GetMetaData("MedicalFusion.anatomical_units") == ("HU" if anatomical == "CT" else "unknown")
    if with_metrics:
        rows = dict(line.split(",")[:2] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:])
        assert rows["functional_units"] == "SUVbw" and "SSIM_avg" in rows


# --------------------------------------------------------------------------------------------------
# the tracer's colour on the tumour, the anatomy under it


@pytest.mark.parametrize("patient, anatomical, method", [(p, a, m) for p, a in PAIRS for m in METHODS],
                         ids=[f"{pid}-{m}" for pid in PAIR_IDS for m in METHODS])
def test_tracer_colour_lands_on_the_tumour(patient, anatomical, method):
    p = pair(patient, anatomical)
    reference, fused = p.hot_spot(), p.hot_spot(method)
    assert fused >= reference - HOT_SPOT_TOLERANCE, (
        f"{method}: {fused:.3f} of its most coloured voxels in the tumour, the plain resample {reference:.3f}")


@pytest.mark.parametrize("patient, anatomical", PAIRS, ids=PAIR_IDS)
def test_hot_spot_rule_catches_a_misplaced_colour(patient, anatomical):
    """The rule can fail: the same colours moved half the field of view sideways leave the tumour."""
    p = pair(patient, anatomical)
    reference = p.hot_spot()
    moved = np.roll(p.reference_rgb, p.mask.shape[2] // 2, axis=2)
    assert top_fraction_in(chroma(moved), p.mask) < reference - HOT_SPOT_TOLERANCE


def _anatomy_cases():
    for (patient, anatomical), pid in zip(PAIRS, PAIR_IDS):
        for method in METHODS:
            known = ANATOMY_SHORTFALLS.get((patient, anatomical, method))
            marks = [pytest.mark.xfail(strict=True, reason=f"measured r {known[0]:.2f}, slope {known[1]:.2f}: the "
                                       "colour's luma range excludes the fused luma")] if known else []
            yield pytest.param(patient, anatomical, method, id=f"{pid}-{method}", marks=marks)


@pytest.mark.parametrize("patient, anatomical, method", list(_anatomy_cases()))
def test_anatomy_stays_visible_under_the_colour(patient, anatomical, method):
    p = pair(patient, anatomical)
    r, slope = p.anatomy(method)
    assert r >= MIN_DETAIL_R and slope >= MIN_DETAIL_SLOPE, f"{method}: detail r {r:.3f}, slope {slope:.3f}"


@pytest.mark.parametrize("patient, anatomical", PAIRS, ids=PAIR_IDS)
def test_anatomy_rule_catches_a_fusion_that_shows_only_the_tracer(patient, anatomical):
    p = pair(patient, anatomical)
    r, slope = detail_kept(colour.gray8(p.reference_rgb), p.anatomical8, p.coloured)
    assert r < MIN_DETAIL_R and slope < MIN_DETAIL_SLOPE


# --------------------------------------------------------------------------------------------------
# the same volumes in a Slicer scene


@pytest.mark.parametrize("patient, anatomical", PAIRS, ids=PAIR_IDS)
def test_scene_fuses_the_loaded_dicom_like_the_cli(patient, anatomical):
    """One pair a test (so each runs in its pair's worker, beside the pair's cached fusions)."""
    slicer = pytest.importorskip("slicer")
    from MedicalFusionLib import scene as sc

    s = slicer.vtkMRMLScene()
    colours = slicer.vtkSlicerColorLogic()
    colours.SetMRMLScene(s)
    pet = sc.load_dicom_volume(s, STS / patient / "PET" / "dicom")
    assert sc.node_units(pet) == "SUVbw" and pet.GetVoxelValueUnits().GetCodeValue() == "{SUVbw}g/ml"
    assert pet.GetDisplayNode().GetColorNodeID() == colour.SLICER_COLOR_NODE_IDS["PET-Heat"]
    node = sc.load_dicom_volume(s, STS / patient / anatomical / "dicom")
    assert sc.node_units(node) == ("HU" if anatomical == "CT" else None)
    before = slicer.util.arrayFromVolume(node).copy()
    result = sc.fuse_nodes(s, node, pet, FusionOptions(method="lp", compute_metrics=False))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(result.volume_node), pair(patient, anatomical).fused("lp"))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)          # input untouched
    attr = result.volume_node.GetAttribute
    assert attr("MedicalFusion.functional_units") == "SUVbw"
    assert attr("MedicalFusion.anatomical_units") == ("HU" if anatomical == "CT" else "unknown")
    assert attr("MedicalFusion.anatomical_window_source").startswith("as displayed")
