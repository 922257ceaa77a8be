"""Windows a radiologist would pick: presets with Slicer's figures, how a CT in HU is recognised
(units from DICOM or node attributes, else the value range), the defaults (CT soft tissue, MR
percentiles), presets on the command line and in the scene logic."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_image

from MedicalFusionLib import cli, colour, windows
from MedicalFusionLib.errors import FusionError
from MedicalFusionLib.pipeline import FusionOptions, fuse_images, prepare


def ct_like(rng, air=True) -> sitk.Image:
    """A CT-like int16 volume in HU: soft tissue around 40, bone 700, air -1000 at the border."""
    z, y, x = np.mgrid[0:6, 0:40, 0:48]
    hu = 40 + rng.normal(0, 20, (6, 40, 48))
    hu[(x - 24) ** 2 + (y - 20) ** 2 < 30] = 700
    if air:
        hu[:, :4] = -1000
    return make_image(hu.astype(np.int16))


def pet_like(rng) -> sitk.Image:
    z, y, x = np.mgrid[0:6, 0:40, 0:48].astype(np.float32)
    return make_image((np.exp(-((x - 30) ** 2 + (y - 18) ** 2) / 40.0) * 8 + 0.5).astype(np.float32))


@pytest.mark.parametrize("name, slicer_name, width, level", [
    ("ct-soft-tissue", "CT-Abdomen", 350, 40), ("ct-bone", "CT-Bone", 1000, 400),
    ("ct-lung", "CT-Lung", 1400, -500), ("ct-brain", "CT-Brain", 100, 50), ("ct-air", "CT-Air", 1000, -426)])
def test_ct_presets_are_slicers_volume_display_presets(name, slicer_name, width, level):
    p = windows.get_preset(name)
    assert windows.get_preset(slicer_name) == p
    assert (p.units, p.hi - p.lo, (p.hi + p.lo) / 2) == ("HU", width, level)


def test_suv_presets_and_unknown_names():
    assert windows.get_preset("pet-suv-0-20").window == (0.0, 20.0)          # Slicer's PET/CT hanging protocol
    assert windows.get_preset("PET-SUV-0-7.5").window == (0.0, 7.5)
    for bad in ("pet-suv-0-0", "ct-soft", "suv"):
        with pytest.raises(FusionError, match="unknown window preset"):
            windows.get_preset(bad)


def test_ct_in_hu_is_recognised_by_units_first_then_values(rng):
    ct, mr = ct_like(rng), make_image((rng.random((6, 40, 48)) * 900).astype(np.int16))
    assert windows.is_ct_hu(ct) and not windows.is_ct_hu(mr)
    assert windows.is_ct_hu(mr, units="HU")                       # the header says so: trusted
    assert not windows.is_ct_hu(ct, units="SUVbw")                # the header says otherwise
    assert not windows.is_ct_hu(ct_like(rng, air=False))          # no air in the crop: not recognised
    assert not windows.is_ct_hu(sitk.Cast(mr, sitk.sitkUInt8))
    padded = sitk.GetArrayFromImage(ct)
    padded[:, :2] = -3024                                          # scanner padding outside the field of view
    assert windows.is_ct_hu(make_image(padded))
    z_scored = make_image(rng.normal(0, 1, (6, 40, 48)).astype(np.float32))
    assert not windows.is_ct_hu(z_scored)


def test_default_windows_ct_soft_tissue_mr_percentiles(rng):
    ct, pet = ct_like(rng), pet_like(rng)
    p = prepare(ct, pet, FusionOptions())
    assert p.anatomical_window == (-135.0, 215.0) and p.anatomical_units == "HU"
    assert "value range" in p.window_sources["anatomical"]
    mr = make_image((200 + 300 * rng.random((6, 40, 48))).astype(np.int16))
    p = prepare(mr, pet, FusionOptions())
    assert p.anatomical_window == colour.robust_window(sitk.GetArrayViewFromImage(mr))
    assert p.anatomical_units == "" and p.window_sources["anatomical"].startswith("auto")
    # an MR that the header calls CT would be windowed as CT: units win over values
    assert prepare(mr, pet, FusionOptions(anatomical_units="HU")).anatomical_window == (-135.0, 215.0)


def test_explicit_window_beats_preset_beats_default(rng):
    ct, pet = ct_like(rng), pet_like(rng)
    assert prepare(ct, pet, FusionOptions(anatomical_preset="ct-bone")).anatomical_window == (-100.0, 900.0)
    opts = FusionOptions(anatomical_preset="ct-bone", anatomical_window=(-50.0, 50.0), functional_preset="pet-suv-0-5")
    p = prepare(ct, pet, opts)
    assert p.anatomical_window == (-50.0, 50.0) and p.functional_window == (0.0, 5.0)


def test_a_ct_functional_gets_the_soft_tissue_window(rng):
    mr = make_image((200 + 300 * rng.random((6, 40, 48))).astype(np.int16))
    p = prepare(mr, ct_like(rng), FusionOptions(colormap="Grey"))
    assert p.functional_window == (-135.0, 215.0) and p.grayscale


def test_preset_in_other_units_is_applied_with_a_notice(rng):
    mr = make_image((200 + 300 * rng.random((6, 40, 48))).astype(np.int16))
    p = prepare(mr, pet_like(rng), FusionOptions(functional_preset="ct-bone", functional_units="SUVbw"))
    assert p.functional_window == (-100.0, 900.0)
    assert len(p.notices) == 1 and "in HU but the functional values are SUVbw" in p.notices[0]


def test_cli_lists_presets_and_refuses_an_unknown_one(tmp_path, rng, capsys):
    assert cli.main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "ct-soft-tissue" in listing and "W 350 / L 40" in listing and "CT-Abdomen" in listing
    sitk.WriteImage(ct_like(rng), str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(pet_like(rng), str(tmp_path / "pet.nrrd"))
    rc = cli.main(["fuse", "-a", str(tmp_path / "ct.nrrd"), "-f", str(tmp_path / "pet.nrrd"),
                   "-o", str(tmp_path / "f.nrrd"), "--window-preset", "ct-softtissue"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown window preset 'ct-softtissue'" in err
    assert not (tmp_path / "f.nrrd").exists()
    assert cli.main(["fuse", "--help"]) == 0
    assert "ct-soft-tissue, ct-bone" in " ".join(capsys.readouterr().out.split())


def test_cli_preset_changes_the_fused_picture(tmp_path, rng):
    sitk.WriteImage(ct_like(rng), str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(pet_like(rng), str(tmp_path / "pet.nrrd"))
    outs = {}
    for preset in (None, "ct-bone"):
        out = tmp_path / f"{preset}.nrrd"
        args = ["fuse", "-a", str(tmp_path / "ct.nrrd"), "-f", str(tmp_path / "pet.nrrd"), "-m", "average", "-o", str(out), "-q"]
        assert cli.main(args + (["--window-preset", preset] if preset else [])) == 0
        outs[preset] = sitk.ReadImage(str(out))
    assert outs[None].GetMetaData("MedicalFusion.anatomical_window") == "-135..215"
    assert outs["ct-bone"].GetMetaData("MedicalFusion.anatomical_window") == "-100..900"
    direct = fuse_images(ct_like(np.random.default_rng(1234)), pet_like(rng),
                         FusionOptions(method="average", anatomical_preset="ct-bone", compute_metrics=False))
    assert direct.prepared.anatomical_window == (-100.0, 900.0)
    assert not np.array_equal(sitk.GetArrayFromImage(outs[None]), sitk.GetArrayFromImage(outs["ct-bone"]))


# --------------------------------------------------------------------------------------------------
# in a Slicer scene (slicer-core)


@pytest.fixture
def scene():
    slicer = pytest.importorskip("slicer")
    return slicer.vtkMRMLScene()


def _volume(scene, image, name):
    from MedicalFusionLib.scene import add_volume_from_image

    node = add_volume_from_image(scene, image, name)
    node.CreateDefaultDisplayNodes()
    return node


def test_node_units_from_attributes_codes_and_subject_hierarchy(scene, rng):
    import slicer

    from MedicalFusionLib.scene import node_units

    mr = make_image((200 + 300 * rng.random((6, 40, 48))).astype(np.int16))
    plain, coded, tagged, in_sh = (_volume(scene, mr, n) for n in ("plain", "coded", "tagged", "sh"))
    assert node_units(plain) is None
    code = slicer.vtkCodedEntry()
    code.SetValueSchemeMeaning("[hnsf'U]", "UCUM", "Hounsfield unit")   # what Slicer's DICOM plugin sets on a CT
    coded.SetVoxelValueUnits(code)
    assert node_units(coded) == "HU"
    tagged.SetAttribute("DICOM.Modality", "CT")
    assert node_units(tagged) == "HU"
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.CreateItem(sh.GetSceneItemID(), in_sh)
    sh.SetItemAttribute(item, "DICOM.Modality", "CT")                  # where Slicer's DICOM module puts it
    assert node_units(in_sh) == "HU"
    suv = slicer.vtkCodedEntry()
    suv.SetValueSchemeMeaning("{SUVbw}g/ml", "UCUM", "Standardized Uptake Value body weight")
    plain.SetVoxelValueUnits(suv)
    assert node_units(plain) == "SUVbw"


def test_scene_ct_gets_soft_tissue_unless_displayed_or_preset(scene, rng):
    from MedicalFusionLib.scene import fuse_nodes

    ct, pet = _volume(scene, ct_like(rng), "CT"), _volume(scene, pet_like(rng), "PET")
    ct.SetAttribute("DICOM.Modality", "CT")
    # no display window to take (as displayed off): the CT default
    r = fuse_nodes(scene, ct, pet, FusionOptions(method="average", compute_metrics=False), use_display_windows=False)
    assert r.result.prepared.anatomical_window == (-135.0, 215.0)
    assert r.volume_node.GetAttribute("MedicalFusion.anatomical_units") == "HU"
    # as displayed: the display node's window
    ct.GetDisplayNode().AutoWindowLevelOff()
    ct.GetDisplayNode().SetWindowLevelMinMax(-1000.0, 1000.0)
    r = fuse_nodes(scene, ct, pet, FusionOptions(method="average", compute_metrics=False))
    assert r.result.prepared.anatomical_window == pytest.approx((-1000.0, 1000.0))
    assert r.volume_node.GetAttribute("MedicalFusion.anatomical_window_source").startswith("as displayed")
    # a preset wins over the display window
    r = fuse_nodes(scene, ct, pet, FusionOptions(method="average", compute_metrics=False, anatomical_preset="ct-lung"))
    assert r.result.prepared.anatomical_window == (-1200.0, 200.0)
    assert "ct-lung" in r.volume_node.GetAttribute("MedicalFusion.anatomical_window_source")
