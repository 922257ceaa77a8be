"""The Slicer logic (MedicalFusionLib.scene) against a real MRML scene from the slicer-core wheel.

Volumes are loaded into nodes the way Slicer loads them (vtkSlicerVolumesLogic for NIfTI; PNG pairs
read with SimpleITK and put in nodes with slicer.util.updateVolumeFromArray), fused node to node and
checked: output class and geometry, voxel type, metrics table, inputs untouched, cancel and errors
leaving the scene as it was, parent transforms honoured, bad input refused with a reason.

Skips the whole module when ``slicer`` (pip install slicer-core) cannot be imported, and the data
tests when the shared data folder is absent (set MEDICALFUSION_DATA to point at it).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from slicer_core_required import slicer_and_vtk  # noqa: E402

slicer, vtk = slicer_and_vtk()

import SimpleITK as sitk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from MedicalFusionLib import scene as fscene  # noqa: E402
from MedicalFusionLib.errors import FusionCancelled, FusionError  # noqa: E402
from MedicalFusionLib.pipeline import FusionOptions, fuse_images  # noqa: E402

DATA = Path(os.environ.get("MEDICALFUSION_DATA") or Path(__file__).resolve().parents[4].parent / "shared" / "data")
SPM12 = DATA / "spm12"
AANLIB = DATA / "aanlib"
needs_spm12 = pytest.mark.skipif(not (SPM12 / "T1.nii").is_file(),
                                 reason=f"spm12 templates not found in {SPM12} (set MEDICALFUSION_DATA)")
needs_aanlib = pytest.mark.skipif(not (AANLIB / "PET-MRI" / "PET" / "30025.png").is_file(),
                                  reason=f"aanlib PET-MRI pairs not found in {AANLIB} (set MEDICALFUSION_DATA)")
PET_HEAT = "vtkMRMLPETProceduralColorNodePET-Heat"


# ------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()   # adds Slicer's colour nodes (PET-Heat, Grey, ...)
    colors.SetMRMLScene(s)
    yield s
    colors.SetMRMLScene(None)
    s.Clear(1)


def load_nifti(scene, path: Path, name: str):
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    node = logic.AddArchetypeVolume(str(path), name, 0)
    assert node is not None, f"could not load {path}"
    return node


def node_from_png(scene, path: Path, name: str, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)):
    image = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(image)[None]            # one-slice volume [1, Y, X] or [1, Y, X, 3]
    cls = "vtkMRMLVectorVolumeNode" if arr.ndim == 4 else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    slicer.util.updateVolumeFromArray(node, arr)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)   # LPS-identity, as ITK reads a PNG
    node.CreateDefaultDisplayNodes()
    return node


def matrix(node) -> np.ndarray:
    return fscene.ijk_to_ras(node)


def fingerprint(node) -> dict:
    """Everything a fusion must not change on an input node."""
    arr = slicer.util.arrayFromVolume(node)
    dn = node.GetDisplayNode()
    return {
        "sha": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(),
        "shape": arr.shape, "dtype": str(arr.dtype), "ijk": matrix(node).tolist(),
        "transform": node.GetTransformNodeID(), "name": node.GetName(),
        "display": None if dn is None else (dn.GetWindow(), dn.GetLevel(), dn.GetColorNodeID(), dn.GetAutoWindowLevel()),
    }


def scene_state(scene) -> list[tuple[str, str]]:
    return [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetClassName()) for i in range(scene.GetNumberOfNodes())]


def translation_node(scene, offset_ras):
    tn = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        m.SetElement(r, 3, float(offset_ras[r]))
    tn.SetMatrixTransformToParent(m)
    return tn


@pytest.fixture
def spm12_pair(scene):
    t1 = load_nifti(scene, SPM12 / "T1.nii", "T1")
    pet = load_nifti(scene, SPM12 / "PET.nii", "PET")
    pet.GetDisplayNode().SetAndObserveColorNodeID(PET_HEAT)    # as Slicer's PET/CT hanging protocol does
    return t1, pet


FAST = dict(method="alpha", compute_metrics=False)


# ------------------------------------------------------------------------------------------------
# spm12: a real 3D pair through the scene


@needs_spm12
def test_fused_node_has_the_anatomical_grid_and_rgb_voxels(scene, spm12_pair):
    t1, pet = spm12_pair
    before = {n.GetID(): fingerprint(n) for n in (t1, pet)}
    out = fscene.fuse_nodes(scene, t1, pet, FusionOptions(**FAST))
    vol = out.volume_node
    assert vol.IsA("vtkMRMLVectorVolumeNode")
    assert vol.GetScene() is scene and vol.GetID() in out.created_node_ids
    np.testing.assert_array_equal(matrix(vol), matrix(t1))
    assert vol.GetImageData().GetScalarType() == vtk.VTK_UNSIGNED_CHAR
    assert vol.GetImageData().GetNumberOfScalarComponents() == 3
    arr = slicer.util.arrayFromVolume(vol)
    assert arr.shape == slicer.util.arrayFromVolume(t1).shape + (3,)
    assert arr.dtype == np.uint8 and arr.max() > 0
    assert vol.GetDisplayNode() is not None
    assert out.table_node is None                       # metrics not asked for: no table
    assert vol.GetAttribute("MedicalFusion.method") == "alpha"
    assert vol.GetAttribute("MedicalFusion.device") == "cpu"
    assert float(vol.GetAttribute("MedicalFusion.seconds")) > 0
    assert out.colormap == "PET-Heat"
    assert {n.GetID(): fingerprint(n) for n in (t1, pet)} == before     # inputs untouched


@needs_spm12
def test_scene_result_equals_the_headless_engine_on_the_same_files(scene):
    """Node geometry (RAS) -> ITK (LPS) conversion: the same pixels as reading the files directly.
    SPECT.nii stores x flipped in its affine: the scene path must honour that like the file path."""
    t1 = load_nifti(scene, SPM12 / "T1.nii", "T1")
    spect = load_nifti(scene, SPM12 / "SPECT.nii", "SPECT")
    spect.GetDisplayNode().SetAndObserveColorNodeID(PET_HEAT)
    out = fscene.fuse_nodes(scene, t1, spect, FusionOptions(method="average", compute_metrics=False))
    prep = out.result.prepared
    opts = FusionOptions(method="average", compute_metrics=False, colormap="PET-Heat",
                         anatomical_window=prep.anatomical_window, functional_window=prep.functional_window)
    direct = fuse_images(sitk.ReadImage(str(SPM12 / "T1.nii")), sitk.ReadImage(str(SPM12 / "SPECT.nii")), opts)
    # Slicer's reader may store the voxels in another order (T1.nii: k reversed, IJKToRAS z -2):
    # compare physically, the file result resampled (nearest, same points) onto the node's grid.
    fused_img = fscene.image_from_node(out.volume_node)
    on_node_grid = sitk.Resample(direct.rgb_image(), fused_img, sitk.Transform(), sitk.sitkNearestNeighbor)
    diff = np.abs(sitk.GetArrayFromImage(fused_img).astype(int) - sitk.GetArrayFromImage(on_node_grid).astype(int))
    assert diff.max() <= 1, f"scene and file paths differ by up to {diff.max()} levels"
    # and the windows came from the display nodes, not from the pipeline defaults
    dn = spect.GetDisplayNode()
    assert prep.functional_window == pytest.approx((dn.GetLevel() - dn.GetWindow() / 2, dn.GetLevel() + dn.GetWindow() / 2))


@needs_spm12
def test_cancel_leaves_the_scene_and_given_outputs_unchanged(scene, spm12_pair):
    t1, pet = spm12_pair
    first = fscene.fuse_nodes(scene, t1, pet, FusionOptions(method="average", compute_metrics=False))
    out_vol = first.volume_node
    out_sha = fingerprint(out_vol)
    state = scene_state(scene)
    inputs = {n.GetID(): fingerprint(n) for n in (t1, pet)}
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1           # let the first batch start, cancel at the next check

    for output in (None, out_vol):
        calls.clear()
        with pytest.raises(FusionCancelled):
            fscene.fuse_nodes(scene, t1, pet, FusionOptions(method="alpha", batch_size=8), output_volume=output,
                              cancel=cancel)
        assert scene_state(scene) == state
        assert fingerprint(out_vol) == out_sha
        assert {n.GetID(): fingerprint(n) for n in (t1, pet)} == inputs


@needs_spm12
def test_existing_output_nodes_are_updated_in_place(scene, spm12_pair):
    t1, pet = spm12_pair
    vol = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "my fused")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "my metrics")
    state = scene_state(scene)
    progress = []
    out = fscene.fuse_nodes(scene, t1, pet, FusionOptions(method="average", compute_metrics=False),
                            output_volume=vol.GetID(), output_table=table, progress=lambda d, t: progress.append((d, t)))
    assert out.volume_node is vol and out.created_node_ids == []
    assert scene_state(scene)[: len(state)] == state
    # only its display node, and its colour legend (the legend node and the display node it reads)
    legend = fscene.colour_legend(vol)
    assert [i for i, _ in scene_state(scene)[len(state):]] == [vol.GetDisplayNodeID(),
                                                               legend.GetPrimaryDisplayNode().GetID(), legend.GetID()]
    np.testing.assert_array_equal(matrix(vol), matrix(t1))
    assert progress and progress[-1][0] == progress[-1][1]
    assert table.GetNumberOfRows() == 0          # no metrics asked for: table untouched


@needs_spm12
def test_parent_transform_on_the_functional_is_honoured(scene, spm12_pair):
    """Functional moved by +d through a transform node, its origin moved by -d: the same world
    position, so the same fused voxels as the untransformed pair; the input keeps its transform."""
    t1, pet = spm12_pair
    reference = slicer.util.arrayFromVolume(
        fscene.fuse_nodes(scene, t1, pet, FusionOptions(**FAST)).volume_node).copy()

    moved = load_nifti(scene, SPM12 / "PET.nii", "PET moved")
    moved.GetDisplayNode().SetAndObserveColorNodeID(PET_HEAT)
    moved.GetDisplayNode().SetWindowLevel(pet.GetDisplayNode().GetWindow(), pet.GetDisplayNode().GetLevel())
    d = np.array([13.0, -7.0, 5.0])
    moved.SetOrigin(*(np.array(moved.GetOrigin()) - d))
    shift = translation_node(scene, d)
    moved.SetAndObserveTransformNodeID(shift.GetID())
    before = fingerprint(moved)

    fused = slicer.util.arrayFromVolume(fscene.fuse_nodes(scene, t1, moved, FusionOptions(**FAST)).volume_node)
    diff = np.abs(fused.astype(int) - reference.astype(int))
    assert diff.max() <= 1, f"transformed functional differs by up to {diff.max()} levels"
    assert fingerprint(moved) == before
    assert moved.GetTransformNodeID() == shift.GetID()

    # without compensating the origin the transform really moves the functional
    moved.SetOrigin(*pet.GetOrigin())
    shifted = slicer.util.arrayFromVolume(fscene.fuse_nodes(scene, t1, moved, FusionOptions(**FAST)).volume_node)
    assert np.abs(shifted.astype(int) - reference.astype(int)).max() > 10


@needs_spm12
def test_non_linear_parent_transform_is_sampled(scene, spm12_pair):
    """A grid (non-linear) transform with a constant displacement acts like the same translation."""
    t1, pet = spm12_pair
    d = np.array([6.0, 4.0, -2.0])
    linear = load_nifti(scene, SPM12 / "PET.nii", "PET linear")
    gridded = load_nifti(scene, SPM12 / "PET.nii", "PET grid")
    for node in (linear, gridded):
        node.GetDisplayNode().SetAndObserveColorNodeID(PET_HEAT)
        node.GetDisplayNode().SetWindowLevel(pet.GetDisplayNode().GetWindow(), pet.GetDisplayNode().GetLevel())
    linear.SetAndObserveTransformNodeID(translation_node(scene, d).GetID())

    grid = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetOrigin(-150.0, -150.0, -150.0)
    field.SetSpacing(50.0, 50.0, 50.0)
    field.SetDimensions(7, 7, 7)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    values = numpy_support.vtk_to_numpy(field.GetPointData().GetScalars())
    values[:] = d
    grid.SetDisplacementGridData(field)
    grid.SetInterpolationModeToLinear()
    grid_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "grid")
    grid_node.SetAndObserveTransformToParent(grid)
    gridded.SetAndObserveTransformNodeID(grid_node.GetID())
    assert not grid_node.IsLinear()

    a = slicer.util.arrayFromVolume(fscene.fuse_nodes(scene, t1, linear, FusionOptions(**FAST)).volume_node)
    b = slicer.util.arrayFromVolume(fscene.fuse_nodes(scene, t1, gridded, FusionOptions(**FAST)).volume_node)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


@needs_spm12
def test_output_follows_the_anatomical_parent_transform(scene, spm12_pair):
    t1, pet = spm12_pair
    tn = translation_node(scene, (5.0, 0.0, 0.0))
    t1.SetAndObserveTransformNodeID(tn.GetID())
    pet.SetAndObserveTransformNodeID(tn.GetID())       # both moved together: same relative position
    out = fscene.fuse_nodes(scene, t1, pet, FusionOptions(**FAST))
    assert out.volume_node.GetTransformNodeID() == tn.GetID()
    assert fscene.functional_transform(t1, pet) is None


@needs_spm12
def test_errors_leave_the_scene_unchanged(scene, spm12_pair):
    t1, pet = spm12_pair
    far = load_nifti(scene, SPM12 / "PET.nii", "PET far away")
    far.SetOrigin(1000.0, 1000.0, 1000.0)
    state = scene_state(scene)
    ok, reason = fscene.validate_inputs(scene, t1, far)
    assert not ok and "does not overlap" in reason
    with pytest.raises(FusionError, match="does not overlap"):
        fscene.fuse_nodes(scene, t1, far, FusionOptions(**FAST))
    with pytest.raises(FusionError, match="unknown method"):
        fscene.fuse_nodes(scene, t1, pet, FusionOptions(method="no-such-method"))
    assert scene_state(scene) == state


@needs_spm12
def test_a_study_too_big_for_the_memory_is_refused_with_the_clis_message(scene, spm12_pair, monkeypatch):
    t1, pet = spm12_pair
    state = scene_state(scene)
    monkeypatch.setenv("MEDICALFUSION_MEMORY_AVAILABLE", "50M")
    with pytest.raises(FusionError) as err:
        fscene.fuse_nodes(scene, t1, pet, FusionOptions(**FAST), register="rigid")
    assert str(err.value).startswith("this study needs about") and "but 50 MB is available" in str(err.value)
    assert "\n" not in str(err.value)
    assert scene_state(scene) == state


@needs_spm12
def test_validation_reasons_for_the_panel(scene, spm12_pair):
    t1, pet = spm12_pair
    assert fscene.validate_inputs(scene, t1, pet) == (True, "")
    ok, reason = fscene.validate_inputs(scene, None, None)
    assert not ok and "anatomical" in reason
    ok, reason = fscene.validate_inputs(scene, t1, None)
    assert not ok and "functional" in reason
    ok, reason = fscene.validate_inputs(scene, t1, t1)
    assert not ok and "same node" in reason

    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")
    slicer.util.updateVolumeFromArray(label, np.ones((4, 5, 6), np.uint8))
    ok, reason = fscene.validate_inputs(scene, t1, label)
    assert not ok and "label map" in reason

    four_d = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "dynamic PET")
    slicer.util.updateVolumeFromArray(four_d, np.ones((4, 5, 6, 8), np.float32))
    ok, reason = fscene.validate_inputs(scene, t1, four_d)
    assert not ok and "4D" in reason

    # Sequence classes come from a loadable module: register them as Slicer's Sequences module does.
    for cls in (slicer.vtkMRMLSequenceNode, slicer.vtkMRMLSequenceBrowserNode):
        if not scene.IsNodeClassRegistered(cls.__name__):
            scene.RegisterNodeClass(cls())
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "PET frames")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "PET browser")
    browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
    proxy = load_nifti(scene, SPM12 / "PET.nii", "PET frame")
    browser.AddProxyNode(proxy, seq, False)
    ok, reason = fscene.validate_inputs(scene, t1, proxy)
    assert not ok and "sequence" in reason and "4D" in reason

    ok, reason = fscene.validate_inputs(scene, t1, pet, output_volume=pet)
    assert not ok and "one of the inputs" in reason
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb functional")
    slicer.util.updateVolumeFromArray(rgb, np.ones((91, 109, 91, 3), np.uint8))
    ok, reason = fscene.validate_inputs(scene, t1, rgb, output_volume=rgb)
    assert not ok and "one of the inputs" in reason

    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    ok, reason = fscene.validate_inputs(scene, empty, pet)
    assert not ok and "no voxels" in reason

    other = slicer.vtkMRMLScene()
    stray = other.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "elsewhere")
    ok, reason = fscene.validate_inputs(scene, stray, pet)
    assert not ok and "another scene" in reason


# ------------------------------------------------------------------------------------------------
# aanlib: a 2D PNG pair with an RGB functional, with metrics


@needs_aanlib
def test_png_pair_with_metrics_table(scene):
    mri = node_from_png(scene, AANLIB / "PET-MRI" / "MRI" / "30025.png", "MRI 30025")
    pet = node_from_png(scene, AANLIB / "PET-MRI" / "PET" / "30025.png", "PET 30025")
    before = {n.GetID(): fingerprint(n) for n in (mri, pet)}
    out = fscene.fuse_nodes(scene, mri, pet, FusionOptions(method="lp", compute_metrics=True, metric_set="all"),
                            use_display_windows=False)
    from MedicalFusionLib.metrics import METRICS  # noqa: PLC0415

    table = out.table_node
    assert table is not None and table.IsA("vtkMRMLTableNode") and table.GetID() in out.created_node_ids
    names = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert names == ["metric", "mean", "std", "slices", "description"]
    # the 16 metrics, then the colour metrics (a PET: hue error and chroma kept; no colour bar, no bone)
    keys = [m.key for m in METRICS] + ["hue_err10", "chroma_kept"]
    assert table.GetNumberOfRows() == len(keys)
    vtable = table.GetTable()
    for r, key in enumerate(keys):
        assert table.GetCellText(r, 0) == key
        mean, std, n = out.result.metrics[key]
        assert vtable.GetValue(r, 1).ToDouble() == pytest.approx(mean)
        assert vtable.GetValue(r, 2).ToDouble() == pytest.approx(std)
        assert vtable.GetValue(r, 3).ToInt() == n == 1
        assert table.GetCellText(r, 4)
    for attr in ("method", "device", "seconds", "anatomical", "functional"):
        assert table.GetAttribute("MedicalFusion." + attr)
    assert table.GetAttribute("MedicalFusion.method") == "lp"
    assert {n.GetID(): fingerprint(n) for n in (mri, pet)} == before

    direct = fuse_images(sitk.ReadImage(str(AANLIB / "PET-MRI" / "MRI" / "30025.png")),
                         sitk.ReadImage(str(AANLIB / "PET-MRI" / "PET" / "30025.png")),
                         FusionOptions(method="lp", compute_metrics=False))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out.volume_node), direct.rgb)


@needs_aanlib
def test_colour_node_outside_the_shipped_list_is_used_through_its_table(scene):
    """A scalar functional shown with a colour node we do not ship keeps its look: it is coloured
    through that node's own table (here an inverted grey) instead of a silently different map."""
    mri = node_from_png(scene, AANLIB / "CT-MRI" / "MRI" / "28008.png", "MRI")
    ct = node_from_png(scene, AANLIB / "CT-MRI" / "CT" / "28008.png", "CT")
    inv = scene.GetNodeByID("vtkMRMLColorTableNodeInvertedGrey")
    assert inv is not None
    ct.GetDisplayNode().SetAndObserveColorNodeID(inv.GetID())
    for node in (mri, ct):
        node.GetDisplayNode().SetAutoWindowLevel(False)
        node.GetDisplayNode().SetWindowLevel(255, 127.5)
    out = fscene.fuse_nodes(scene, mri, ct, FusionOptions(method="average", compute_metrics=False))
    assert "InvertedGrey" in out.colormap
    fused = slicer.util.arrayFromVolume(out.volume_node).astype(float)
    a = slicer.util.arrayFromVolume(mri).astype(float)
    b = 255.0 - slicer.util.arrayFromVolume(ct).astype(float)
    expected = (a + b) / 2
    assert np.abs(fused[..., 0] - expected).mean() < 2.0


# ------------------------------------------------------------------------------------------------
# the generated phantom the Slicer self-test uses (no data needed)


def test_self_test_phantom_fuses_and_its_transform_matters(scene):
    anatomical, functional = fscene.add_phantom_pair(scene)
    assert fscene.validate_inputs(scene, anatomical, functional) == (True, "")
    before = fingerprint(functional)
    out = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(method="alpha", compute_metrics=False))
    np.testing.assert_array_equal(matrix(out.volume_node), matrix(anatomical))
    assert out.colormap == "PET-Heat"
    assert fingerprint(functional) == before
    with_transform = slicer.util.arrayFromVolume(out.volume_node).astype(int)
    functional.SetAndObserveTransformNodeID(None)
    without = fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(method="alpha", compute_metrics=False))
    assert np.abs(slicer.util.arrayFromVolume(without.volume_node).astype(int) - with_transform).max() > 50


def test_a_failure_while_writing_removes_what_was_created(scene, monkeypatch):
    anatomical, functional = fscene.add_phantom_pair(scene)
    state = scene_state(scene)
    original = fscene.write_volume

    def write_then_fail(node, anat, rgb):
        original(node, anat, rgb)              # the node and its display node exist now
        raise RuntimeError("disk full")

    monkeypatch.setattr(fscene, "write_volume", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        fscene.fuse_nodes(scene, anatomical, functional, FusionOptions(method="average", compute_metrics=False))
    assert scene_state(scene) == state
