"""Progress and cancel over a whole run: the tracker (MedicalFusionLib.progress), the engine's
time-bounded batches, and scene.fuse_nodes on a real slicer-core MRML scene (every phase reports,
a cancel in any phase leaves the scene as it was).

How often the callbacks come on real volumes is a benchmark (scripts/bench_ui_gaps.py), not a test:
these tests check the mechanism with a fake clock and small inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from MedicalFusionLib import engine, progress
from MedicalFusionLib.errors import FusionCancelled
from MedicalFusionLib.methods import FusionMethod
from MedicalFusionLib.progress import RESOLUTION, Progress, active_phase


class FakeClock:
    """Stands in for the ``time`` module of the code under test: perf_counter() returns ``now``."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------------
# the tracker


def test_phases_fill_one_total_in_order_and_throttle_reports(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress, "time", clock)
    seen = []
    with Progress(lambda d, t: seen.append((d, t)), None, (("a", 1.0), ("b", 3.0))) as tracker:
        tracker.phase("a")
        assert active_phase() == "a"
        tracker.advance(1, 2)                 # within MIN_INTERVAL of the phase start: not reported
        clock.now += 0.06
        tracker.advance(1, 2)
        tracker.phase("b")                    # phase starts always report
        clock.now += 0.06
        tracker.advance(2, 4)
        tracker.finish()
    assert active_phase() is None
    assert seen == [(0, RESOLUTION), (125, RESOLUTION), (250, RESOLUTION), (625, RESOLUTION),
                    (RESOLUTION, RESOLUTION)]


def test_cancel_is_checked_at_reports_and_no_longer_after_commit():
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) >= 2

    with Progress(None, cancel, (("x", 1.0),)) as tracker:
        tracker.phase("x")                    # first check: go on
        with pytest.raises(FusionCancelled):
            tracker.phase("x")                # second: cancelled
    with Progress(None, lambda: True, (("write", 1.0),)) as tracker:
        with pytest.raises(FusionCancelled):
            tracker.commit()                  # commit is the last check...
    asked, seen = [], []
    with Progress(lambda d, t: seen.append(d), lambda: bool(asked.append(1)), (("write", 1.0),),
                  min_interval=0.0) as tracker:
        tracker.phase("write")
        tracker.commit()
        checks = len(asked)
        tracker.advance(1, 2)                 # ...after it, writing reports progress only
        tracker.tick()
        tracker.finish()
    assert len(asked) == checks == 2
    assert seen == [0, 0, 500, 500, RESOLUTION]


def test_nested_callbacks_fill_the_current_phase():
    seen = []
    with Progress(lambda d, t: seen.append(d), None, (("read", 1.0), ("inner", 2.0), ("write", 1.0)),
                  min_interval=0.0) as outer:
        outer.phase("read")
        outer.phase("inner")
        inner_progress, _ = outer.callbacks()
        with Progress(inner_progress, None, (("p", 1.0), ("q", 1.0)), min_interval=0.0) as inner:
            inner.phase("p")
            assert active_phase() == "p"      # the innermost phase
            inner.phase("q")
            inner.finish()
        assert active_phase() == "inner"
        outer.phase("write")
    assert seen == sorted(seen)
    assert seen[:4] == [0, 250, 250, 500] and 750 in seen      # inner 0 %, 50 %, 100 % -> 25..75 %


# ------------------------------------------------------------------------------------------------
# the engine: batches sized by time


def _slow_method(clock: FakeClock, seconds_per_slice: float, sizes: list) -> FusionMethod:
    def fuse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sizes.append(a.shape[0])
        clock.now += seconds_per_slice * a.shape[0]
        return torch.maximum(a, b)

    return FusionMethod(name="slow", description="test", reference="test", family="basic",
                        build=lambda device: fuse, bytes_per_pixel=16)


@pytest.mark.parametrize("seconds_per_slice, expected", [(0.03, [1, 3, 3, 3, 3, 3, 2]),
                                                        (0.3, [1] * 18),
                                                        (0.0001, [1, 17])])
def test_engine_batches_hold_about_batch_seconds_of_work(monkeypatch, seconds_per_slice, expected):
    clock = FakeClock()
    monkeypatch.setattr(engine, "time", clock)
    sizes: list = []
    rng = np.random.default_rng(0)
    a = rng.random((18, 9, 11), dtype=np.float32)
    b = rng.random((18, 9, 11), dtype=np.float32)
    reports = []
    out = engine.fuse_slices(a, b, _slow_method(clock, seconds_per_slice, sizes), device="cpu",
                             progress=lambda d, t: reports.append(d))
    assert sizes == expected                        # first batch one slice, then BATCH_SECONDS of work each
    assert engine.BATCH_SECONDS == pytest.approx(0.1)
    assert reports == [0] + list(np.cumsum(expected))
    assert np.array_equal(out, np.maximum(a, b))   # the same result whatever the batches


# ------------------------------------------------------------------------------------------------
# the scene: every phase reports, a cancel in any phase leaves the scene unchanged

slicer = pytest.importorskip(
    "slicer", reason="slicer-core is not installed (pip install slicer-core): the scene tests need real MRML nodes")


@pytest.fixture
def phantom_scene():
    from MedicalFusionLib.scene import add_phantom_pair

    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    anat, func = add_phantom_pair(scene)
    yield scene, anat, func
    colors.SetMRMLScene(None)
    scene.Clear(1)


def _node_ids(scene) -> list:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_fuse_nodes_reports_every_phase_and_a_cancel_in_any_phase_changes_nothing(phantom_scene):
    from MedicalFusionLib.pipeline import FusionOptions
    from MedicalFusionLib.scene import fuse_nodes

    scene, anat, func = phantom_scene
    phases, done = [], []

    def report(d, t):
        done.append(d)
        if active_phase() not in phases:
            phases.append(active_phase())

    fuse_nodes(scene, anat, func, FusionOptions(method="lp"), progress=report)
    # the colour-fidelity metrics (issue 18) are a phase of their own inside the metrics
    assert phases[:8] == ["read", "pipeline", "prepare", "fuse", "recombine", "metrics", "colour", "write"], phases
    assert done == sorted(done) and done[-1] == RESOLUTION
    before = _node_ids(scene)
    voxels = slicer.util.arrayFromVolume(anat).copy()
    for phase in ("read", "prepare", "fuse", "recombine", "metrics", "colour", "write"):
        with pytest.raises(FusionCancelled):
            fuse_nodes(scene, anat, func, FusionOptions(method="lp"), cancel=lambda p=phase: active_phase() == p)
        assert _node_ids(scene) == before, phase
    assert np.array_equal(slicer.util.arrayFromVolume(anat), voxels)
