"""Registration on demand through the MRML scene (MedicalFusionLib.scene: fuse_nodes(register=...),
register_nodes, place_registration) on a real scene from the slicer-core wheel.

Checked: a linear transform node is created and set as the functional's parent (not hardened; the
inputs' voxels and geometry untouched); it aligns the pair in world space; an earlier parent of the
functional is kept and named; cancel (during the registration or the fusion after it) and errors
leave the scene as it was; an ITK .tfm saved by the command line, loaded by Slicer's own transform
storage node and set as the functional's parent, aligns them the same way (LPS/RAS and
fixed->moving conventions).

The volumes are the small synthetic phantoms of test_registration.py (a second or two each).
"""
from __future__ import annotations

import numpy as np
import pytest

from slicer_core_required import slicer_and_vtk  # noqa: E402

slicer, vtk = slicer_and_vtk()

from MedicalFusionLib.scene import add_volume_from_image  # noqa: E402
from test_registration import phantom, rigid  # noqa: E402
from test_scene import fingerprint, scene_state  # noqa: E402

from MedicalFusionLib import registration as reg  # noqa: E402
from MedicalFusionLib import scene as fscene  # noqa: E402
from MedicalFusionLib.errors import FusionCancelled, FusionError  # noqa: E402
from MedicalFusionLib.pipeline import FusionOptions  # noqa: E402

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
FAST = reg.RegistrationSettings()      # 60 iterations a level ran out with the interpolator's gradients
OPTIONS = FusionOptions(method="average", compute_metrics=False, colormap="PET-Heat")


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture
def truth():
    return rigid()


@pytest.fixture
def pair(scene, truth):
    """Anatomical 'MR' node and a 'PET' node misplaced by ``truth`` (in its geometry, no transform)."""
    mr = add_volume_from_image(scene, phantom("mr"), "MR")
    pet = add_volume_from_image(scene, reg.moved_geometry(phantom("pet", spacing=4.0, seed=1),
                                                    truth), "PET")
    return mr, pet


def matrix_of(node, from_parent=True) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    (node.GetMatrixTransformFromParent if from_parent else node.GetMatrixTransformToParent)(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def world_error(anatomical, functional, truth: np.ndarray) -> float:
    """Largest distance (mm) over the anatomical's head between where the scene now puts the
    functional's points (both parent transforms) and where they truly are."""
    placed = fscene.functional_transform(anatomical, functional) or reg.affine_transform(np.eye(4))
    image = fscene.image_from_node(anatomical)
    arr = slicer.util.arrayFromVolume(anatomical)
    idx = np.argwhere(arr > 0.5 * arr.max())[:, ::-1]
    pts = np.array([image.TransformIndexToPhysicalPoint(tuple(int(v) for v in i)) for i in idx[::7]])
    m = reg.affine_matrix(placed)
    return float(np.max(np.linalg.norm(pts @ m[:3, :3].T + m[:3, 3] - (pts @ truth[:3, :3].T + truth[:3, 3]), axis=1)))


def without_transform(fp: dict) -> dict:
    return {k: v for k, v in fp.items() if k != "transform"}


def test_fuse_with_registration_sets_a_transform_node_as_the_functional_parent(scene, pair, truth,
                                                                               shared_registrations):
    mr, pet = pair
    before = {n.GetID(): fingerprint(n) for n in (mr, pet)}
    assert world_error(mr, pet, truth) > 15.0
    out = fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid", registration_settings=FAST)
    node = out.transform_node
    assert node.IsA("vtkMRMLLinearTransformNode") and node.GetID() in out.created_node_ids
    assert pet.GetTransformNodeID() == node.GetID()
    assert node.GetTransformNodeID() is None                     # the MR has no parent
    assert world_error(mr, pet, truth) < 2.0                     # aligned in world space
    # RAS 'from parent' = the ITK (LPS) transform, flipped: what Slicer shows
    assert np.allclose(matrix_of(node), FLIP @ reg.affine_matrix(fscene.functional_transform(mr, pet)) @ FLIP)
    # nothing hardened: the PET's voxels and IJK-to-RAS are as they were; the MR is untouched
    assert without_transform(fingerprint(pet)) == without_transform(before[pet.GetID()])
    assert fingerprint(mr) == before[mr.GetID()]
    assert node.GetAttribute("MedicalFusion.registration") == "rigid"
    assert node.GetAttribute("MedicalFusion.previous_parent") == ""
    assert out.volume_node.GetAttribute("MedicalFusion.registration") == "rigid"
    # how sure: the restarts' spread (mm) and the voxel limit, on the transform node
    spread = float(node.GetAttribute("MedicalFusion.registration_spread_centre_mm"))
    assert 0.0 <= spread < float(node.GetAttribute("MedicalFusion.registration_spread_limit_mm")) == 4.0
    assert node.GetAttribute("MedicalFusion.registration_restarts") == "2"
    assert node.GetAttribute("MedicalFusion.registration_spread_overlap_mm") is not None
    # the user can remove it: the PET goes back to where it was
    pet.SetAndObserveTransformNodeID(None)
    scene.RemoveNode(node)
    assert fingerprint(pet) == before[pet.GetID()]


def test_an_earlier_parent_is_the_start_and_is_kept(scene, pair, truth):
    mr, pet = pair
    rough = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rough placement")
    guess = rigid(angles_deg=(4, -2, 6), translation=(7, -10, 4))      # near the truth
    m = vtk.vtkMatrix4x4()
    for r, row in enumerate(FLIP @ guess @ FLIP):
        for c, v in enumerate(row):
            m.SetElement(r, c, float(v))
    rough.SetMatrixTransformFromParent(m)
    pet.SetAndObserveTransformNodeID(rough.GetID())
    rough_before = matrix_of(rough)
    out = fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid", registration_settings=FAST)
    assert out.transform_node.GetAttribute("MedicalFusion.previous_parent") == rough.GetID()
    assert out.transform_node.GetAttribute("MedicalFusion.registration_start") == "given transform"
    assert pet.GetTransformNodeID() == out.transform_node.GetID()
    assert scene.GetNodeByID(rough.GetID()) is rough and np.array_equal(matrix_of(rough), rough_before)
    assert world_error(mr, pet, truth) < 2.0


def test_the_transform_node_follows_the_anatomical_parent(scene, pair, truth, shared_registrations):
    mr, pet = pair
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MR placement")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 25.0)
    m.SetElement(2, 3, -10.0)
    shift.SetMatrixTransformToParent(m)
    mr.SetAndObserveTransformNodeID(shift.GetID())
    out = fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid", registration_settings=FAST)
    assert out.transform_node.GetTransformNodeID() == shift.GetID()
    assert world_error(mr, pet, truth) < 2.0
    assert out.volume_node.GetTransformNodeID() == shift.GetID()


@pytest.mark.parametrize("phase", ["registration", "fusion"])
def test_cancel_leaves_the_scene_as_it_was(scene, pair, phase):
    mr, pet = pair
    earlier = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "earlier")
    pet.SetAndObserveTransformNodeID(earlier.GetID())
    state = scene_state(scene)
    inputs = {n.GetID(): fingerprint(n) for n in (mr, pet)}
    seen = []

    def cancel():
        if phase == "registration":
            return len(seen) >= 5
        return any(done > 1000 * fscene.REGISTRATION_SHARE for done in seen)

    with pytest.raises(FusionCancelled):
        fscene.fuse_nodes(scene, mr, pet, FusionOptions(method="average", compute_metrics=False, batch_size=2),
                          register="rigid", registration_settings=FAST, progress=lambda d, t: seen.append(d),
                          cancel=cancel)
    if phase == "fusion":     # the registration had finished: the fusion was under way
        assert max(seen) > 1000 * fscene.REGISTRATION_SHARE
    else:
        assert max(seen) < 1000 * fscene.REGISTRATION_SHARE
    assert scene_state(scene) == state
    assert pet.GetTransformNodeID() == earlier.GetID()
    assert {n.GetID(): fingerprint(n) for n in (mr, pet)} == inputs


def test_errors_leave_the_scene_as_it_was(scene, pair, monkeypatch, shared_registrations):
    mr, pet = pair
    state = scene_state(scene)
    with pytest.raises(FusionError, match="did not converge"):
        fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid",
                          registration_settings=reg.RegistrationSettings(iterations=3, coarsest_iterations=3, learning_rate=0.5))
    assert scene_state(scene) == state and pet.GetTransformNodeID() is None
    # a failure while writing the outputs (after the transform node was made) undoes the node and the parent
    monkeypatch.setattr(fscene, "write_volume", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid", registration_settings=FAST)
    assert scene_state(scene) == state and pet.GetTransformNodeID() is None


def test_non_linear_parent_is_refused(scene, pair):
    mr, pet = pair
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    field = vtk.vtkImageData()
    field.SetDimensions(4, 4, 4)
    field.SetOrigin(-60.0, -60.0, -60.0)
    field.SetSpacing(40.0, 40.0, 40.0)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    field.GetPointData().GetScalars().Fill(0.0)
    field.GetPointData().GetScalars().SetTuple3(21, 3.0, 0.0, 0.0)    # one bent grid point
    warp = slicer.vtkOrientedGridTransform()
    warp.SetDisplacementGridData(field)
    grid.SetAndObserveTransformToParent(warp)
    assert not grid.IsLinear()
    pet.SetAndObserveTransformNodeID(grid.GetID())
    state = scene_state(scene)
    with pytest.raises(FusionError, match="non-linear"):
        fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid", registration_settings=FAST)
    assert scene_state(scene) == state and pet.GetTransformNodeID() == grid.GetID()


def test_register_nodes_changes_nothing_and_place_registration_applies_it(scene, pair, truth, shared_registrations):
    mr, pet = pair
    state = scene_state(scene)
    inputs = {n.GetID(): fingerprint(n) for n in (mr, pet)}
    found = fscene.register_nodes(scene, mr, pet, "rigid", settings=FAST)
    assert scene_state(scene) == state and {n.GetID(): fingerprint(n) for n in (mr, pet)} == inputs
    node = fscene.place_registration(scene, mr, pet, found)
    assert pet.GetTransformNodeID() == node.GetID()
    assert world_error(mr, pet, truth) < 2.0


def test_a_tfm_saved_by_the_command_line_aligns_the_pair_when_slicer_loads_it(scene, pair, truth, tmp_path,
                                                                              shared_registrations):
    """What a Slicer user does with --save-transform: load the .tfm (Slicer's own reader) and set it
    as the PET's parent. ITK files hold the resampling (fixed -> moving, LPS) transform; Slicer
    reads it as the transform from parent in RAS, which places the PET onto the MR."""
    mr, pet = pair
    found = reg.register(fscene.image_from_node(mr), fscene.image_from_node(pet), "rigid", settings=FAST)
    path = tmp_path / "pet_to_mr.tfm"
    reg.write_transform(found.transform, path)
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    loaded = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "loaded")
    assert storage.ReadData(loaded)
    pet.SetAndObserveTransformNodeID(loaded.GetID())
    assert world_error(mr, pet, truth) < 2.0
    assert np.allclose(reg.affine_matrix(fscene.functional_transform(mr, pet)), reg.affine_matrix(found.transform))
    # and a transform Slicer saves (the PET's parent) is read back by --transform as the same placement
    storage.SetFileName(str(tmp_path / "from_slicer.tfm"))
    assert storage.WriteData(loaded)
    assert np.allclose(reg.affine_matrix(reg.read_transform(tmp_path / "from_slicer.tfm")),
                       reg.affine_matrix(found.transform), atol=1e-6)


class _DicomDatabase:
    """Stands in for slicer.dicomDatabase (absent outside the application): tag values by instance UID."""

    def __init__(self, frames: dict):
        self.frames = frames

    def instanceValue(self, uid, tag):  # noqa: N802  (Slicer's name)
        assert tag == "0020,0052"
        return self.frames.get(uid, "")


def test_shared_frame_of_reference_from_the_dicom_database(scene, pair):
    mr, pet = pair
    db = _DicomDatabase({"1.2.3.1": "9.8.7", "1.2.3.2": "9.8.7", "1.2.3.3": "5.5.5"})
    assert fscene.shared_frame_of_reference(mr, pet, db) is None          # not from DICOM
    mr.SetAttribute("DICOM.instanceUIDs", "1.2.3.1 1.2.3.9")
    pet.SetAttribute("DICOM.instanceUIDs", "1.2.3.2")
    assert fscene.shared_frame_of_reference(mr, pet, db) == "9.8.7"
    pet.SetAttribute("DICOM.instanceUIDs", "1.2.3.3")
    assert fscene.shared_frame_of_reference(mr, pet, db) is None
    assert fscene.shared_frame_of_reference(mr, pet) is None               # no database outside Slicer

    # volumes loaded by load_dicom_volume carry their own UID: no database needed
    mr.SetAttribute("DICOM.FrameOfReferenceUID", "4.4.4")
    pet.SetAttribute("DICOM.FrameOfReferenceUID", "4.4.4")
    assert fscene.shared_frame_of_reference(mr, pet) == "4.4.4"
    pet.SetAttribute("DICOM.FrameOfReferenceUID", "4.4.5")
    assert fscene.shared_frame_of_reference(mr, pet, db) is None


def test_register_with_the_functionals_ct_places_both(scene, pair, truth, shared_registrations):
    """'Register using' another volume of the functional's study (the PET's own CT): that volume is
    registered, and one transform node becomes the parent of both; refused with one line (scene
    unchanged) when it is not in the functional's frame."""
    mr, pet = pair
    ct = add_volume_from_image(scene, reg.moved_geometry(phantom("t2", spacing=3.5, seed=3), truth), "CT")
    far = add_volume_from_image(scene, reg.moved_geometry(phantom("t2", spacing=3.5, seed=3),
                                                          rigid(angles_deg=(0, 0, 0), translation=(0, 0, 250.0))),
                                "other CT")
    before = scene_state(scene)
    with pytest.raises(FusionError, match="do not share a placement") as err:
        fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid", register_with=far, registration_settings=FAST)
    assert "\n" not in str(err.value)
    assert scene_state(scene) == before and far.GetTransformNodeID() is None

    out = fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid", register_with=ct, registration_settings=FAST)
    node = out.transform_node
    assert pet.GetTransformNodeID() == node.GetID() == ct.GetTransformNodeID()
    assert world_error(mr, pet, truth) < 2.0 and world_error(mr, ct, truth) < 2.0
    assert node.GetAttribute("MedicalFusion.registered_with") == ct.GetID()

    # a volume under another parent transform is not in the PET's placement
    pet.SetAndObserveTransformNodeID(None)
    with pytest.raises(FusionError, match="different parent transforms"):
        fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid", register_with=ct, registration_settings=FAST)
    assert pet.GetTransformNodeID() is None and ct.GetTransformNodeID() == node.GetID()


def test_cancel_while_registering_with_the_ct_leaves_both_parents(scene, pair, truth):
    mr, pet = pair
    ct = add_volume_from_image(scene, reg.moved_geometry(phantom("t2", spacing=3.5, seed=3), truth), "CT")
    before = scene_state(scene)
    asked = []

    def cancel():
        asked.append(1)
        return len(asked) > 30

    with pytest.raises(FusionCancelled):
        fscene.fuse_nodes(scene, mr, pet, OPTIONS, register="rigid", register_with=ct, cancel=cancel,
                          registration_settings=FAST)
    assert scene_state(scene) == before
    assert pet.GetTransformNodeID() is None and ct.GetTransformNodeID() is None
