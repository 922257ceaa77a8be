import numpy as np
import pytest
import torch

from MedicalFusionLib.device import pick_device
from MedicalFusionLib.engine import batch_size_for, fuse_slices, fuse_volume
from MedicalFusionLib.errors import FusionCancelled, FusionError
from MedicalFusionLib.methods import all_methods, get_method


def _stack(rng, n=5, h=37, w=45):
    a = rng.random((n, h, w), dtype=np.float32)
    b = rng.random((n, h, w), dtype=np.float32)
    return a, b


def test_auto_device_is_cpu_without_accelerators_and_forced_gpu_is_refused():
    dev = pick_device("auto")
    if not torch.cuda.is_available() and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        assert dev.type == "cpu"
        with pytest.raises(FusionError, match="no GPU"):
            pick_device("gpu")
        with pytest.raises(FusionError, match="CUDA"):
            pick_device("cuda")
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(FusionError, match="unknown device"):
        pick_device("tpu")


def test_progress_is_reported_per_batch_and_empty_slices_are_skipped(rng):
    a, b = _stack(rng, n=6)
    a[2] = 0
    b[2] = 0
    calls = []
    out = fuse_slices(a, b, "max", batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert np.all(out[2] == 0)
    assert np.allclose(out[0], np.maximum(a[0], b[0]))


def test_cancel_between_batches_raises_and_returns_nothing(rng):
    a, b = _stack(rng, n=6)
    seen = []

    def cancel():
        seen.append(1)
        return len(seen) > 1          # let one batch run, then cancel

    with pytest.raises(FusionCancelled):
        fuse_slices(a, b, "lp", batch_size=2, cancel=cancel)


def test_fuse_volume_along_each_axis_matches_per_slice_fusion(rng):
    a = rng.random((6, 7, 8), dtype=np.float32)
    b = rng.random((6, 7, 8), dtype=np.float32)
    for axis in range(3):
        out = fuse_volume(a, b, "lp", axis=axis)
        k = 3
        single = fuse_slices(np.take(a, [k], axis=axis).reshape(1, *np.delete(a.shape, axis)),
                             np.take(b, [k], axis=axis).reshape(1, *np.delete(b.shape, axis)), "lp")[0]
        assert np.allclose(np.take(out, k, axis=axis), single, atol=1e-6)


def test_batch_size_is_bounded_by_memory():
    m = get_method("lp")
    assert 1 <= batch_size_for(m, 256, 256, torch.device("cpu")) <= 64
    huge = get_method("lp")
    assert batch_size_for(huge, 20000, 20000, torch.device("cpu")) == 1


@pytest.mark.parametrize("method", [m.name for m in all_methods() if m.available()[0]])
def test_every_available_method_keeps_the_contract(method, rng):
    """Shape and range kept, any H/W, and a slice fuses the same alone or in a batch."""
    a, b = _stack(rng, n=3, h=41, w=30)
    batched = fuse_slices(a, b, method, batch_size=3)
    alone = np.stack([fuse_slices(a[i:i + 1], b[i:i + 1], method, batch_size=1)[0] for i in range(3)])
    assert batched.shape == a.shape and batched.dtype == np.float32
    assert batched.min() >= 0.0 and batched.max() <= 1.0
    assert np.allclose(batched, alone, atol=1e-5)
    assert np.abs(batched).sum() > 0


def test_unknown_method_is_a_user_error():
    with pytest.raises(FusionError, match="unknown method 'nope'"):
        get_method("nope")


def _recording_method(names: list, done: list, beats: int = 0, fail_at: int | None = None, step: float = 0.01,
                      parallel: bool = True):
    """A method whose calls may run side by side (``parallel``): the maximum of its inputs, the
    threads that ran it in ``names``, ``beats`` heartbeats a call after ``step`` s of work each
    (each in ``done``), an error from call ``fail_at`` on."""
    import threading
    import time

    from MedicalFusionLib.methods.registry import FusionMethod
    from MedicalFusionLib.progress import heartbeat

    def build(_device):
        def fuse(a, b):
            names.append(threading.current_thread().name)
            if fail_at is not None and len(names) >= fail_at:
                raise FusionError("the method failed on this batch")
            for _ in range(beats):
                time.sleep(step)
                done.append(1)
                heartbeat()
            return torch.maximum(a, b)
        return fuse

    return FusionMethod(name="recording", description="", reference="", family="basic", build=build, parallel=parallel)


def _slow_single_slice_method(steps: int, done: list):
    """A method whose one slice takes ``steps`` x 20 ms and calls heartbeat() between its steps
    (as a network's layers and NSST-PAPCNN's maps do), in the engine's thread."""
    return _recording_method([], done, beats=steps, step=0.02, parallel=False)


def test_inside_one_slice_the_engine_still_reports_and_can_be_cancelled(rng):
    """One slice of 0.6 s: without heartbeats the panel would hear nothing for 0.6 s."""
    import time

    a, b = _stack(rng, n=1)
    done, stamps = [], []
    fuse_slices(a, b, _slow_single_slice_method(30, done), progress=lambda d, t: stamps.append(time.perf_counter()))
    gaps = np.diff(stamps)
    assert len(stamps) >= 5 and gaps.max() < 0.3            # a report every ~0.1 s, not one at the end
    asked = []

    def cancel():
        asked.append(time.perf_counter())
        return len(asked) > 2                                 # before the run, then once inside the slice

    done.clear()
    with pytest.raises(FusionCancelled):
        fuse_slices(a, b, _slow_single_slice_method(30, done), cancel=cancel)
    assert len(done) < 30                                    # stopped inside the slice, not after it


def test_heartbeat_outside_a_run_does_nothing():
    from MedicalFusionLib.progress import beating, heartbeat

    heartbeat()                                              # no run: nothing to call, no error
    calls = []
    with beating(lambda: calls.append(1), every=0.0):
        heartbeat()
        heartbeat()
    heartbeat()
    assert calls == [1, 1]


@pytest.mark.parametrize("name", ["nsst_papcnn", "dmfnet"])
def test_slow_methods_beat_inside_a_slice(name, rng):
    """The methods whose single slice can take most of a second report from inside it (the other
    networks take 35-70 ms a slice)."""
    from MedicalFusionLib.progress import beating

    method = get_method(name)
    ok, reason = method.available()
    if not ok:
        pytest.skip(reason)
    fn = method.build(torch.device("cpu"))
    a, b = (torch.from_numpy(x).unsqueeze(1) for x in _stack(rng, n=1, h=64, w=64))
    beats = []
    with beating(lambda: beats.append(1), every=0.0):
        fn(a, b)
    assert len(beats) >= 8


def test_a_parallel_method_runs_its_batches_on_the_workers_with_the_same_result(rng, two_torch_threads):
    """Issue 21: on the CPU with two torch threads the engine runs a network's batches on two
    worker threads of one torch thread each; the bytes are those of one thread, whatever the batches."""
    a, b = _stack(rng, n=12, h=32, w=30)
    names: list = []
    calls = []
    out = fuse_slices(a, b, _recording_method(names, []), device="cpu", batch_size=2,
                      progress=lambda d, t: calls.append(d))
    assert np.array_equal(out, np.maximum(a, b))
    assert names and all(n.startswith("medicalfusion-cpu") for n in names)
    assert calls == sorted(calls) and calls[-1] == 12          # progress in order, in this thread
    assert torch.get_num_threads() == 2                        # restored after the run
    y2 = fuse_slices(a, b, "mrdfn", device="cpu")
    y2b = fuse_slices(a, b, "mrdfn", device="cpu", batch_size=5)
    torch.set_num_threads(1)                                   # no workers: everything in this thread
    y1 = fuse_slices(a, b, "mrdfn", device="cpu")
    assert np.array_equal(y1, y2) and np.array_equal(y1, y2b)


def test_a_cancel_or_an_error_stops_the_workers(rng, two_torch_threads):
    import threading

    a, b = _stack(rng, n=8, h=16, w=16)
    names: list = []
    done: list = []
    asked = []

    def cancel():
        asked.append(1)
        return len(done) >= 3                                  # inside the first batches

    with pytest.raises(FusionCancelled):
        fuse_slices(a, b, _recording_method(names, done, beats=20), device="cpu", batch_size=1, cancel=cancel)
    assert len(done) < 2 * 20                                  # the running batches stopped inside, at a beat
    assert not [t for t in threading.enumerate() if t.name.startswith("medicalfusion-cpu")]
    names.clear()
    with pytest.raises(FusionError, match="^the method failed on this batch$"):
        fuse_slices(a, b, _recording_method(names, [], fail_at=3), device="cpu", batch_size=1)
    assert not [t for t in threading.enumerate() if t.name.startswith("medicalfusion-cpu")]
