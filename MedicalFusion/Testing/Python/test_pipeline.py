import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image
from MedicalFusionLib.errors import FusionError
from MedicalFusionLib.pipeline import FusionOptions, array_axis, fuse_images


def test_output_keeps_the_anatomical_grid_when_the_functional_is_coarse_and_oblique(small_pair):
    anat, _ = small_pair
    # functional: 3 mm voxels, x axis flipped, covering the anatomical
    f = np.random.default_rng(0).random((4, 16, 18)).astype(np.float32) + 0.1
    func = make_image(f, spacing=(3.0, 3.0, 3.0), origin=(50.0, -2.0, -2.0),
                      direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    r = fuse_images(anat, func, FusionOptions(method="lp", compute_metrics=False))
    assert r.rgb.shape == sitk.GetArrayViewFromImage(anat).shape + (3,)
    assert r.rgb.dtype == np.uint8
    out = r.rgb_image()
    assert out.GetSpacing() == anat.GetSpacing() and out.GetOrigin() == anat.GetOrigin()
    assert out.GetDirection() == anat.GetDirection()
    assert not r.grayscale


def test_grey_colormap_gives_grayscale_fusion(small_pair):
    anat, pet = small_pair
    r = fuse_images(anat, pet, FusionOptions(method="average", colormap="Grey", compute_metrics=False))
    assert r.grayscale
    assert np.array_equal(r.rgb[..., 0], r.rgb[..., 1]) and np.array_equal(r.rgb[..., 1], r.rgb[..., 2])


def test_pet_colour_survives_fusion(small_pair):
    anat, pet = small_pair
    r = fuse_images(anat, pet, FusionOptions(method="max", colormap="PET-Heat", compute_metrics=False))
    hot = r.rgb[:, 20, 34].astype(int)            # half-maximum of the PET: warm colour, red above blue
    assert (hot[:, 0] - hot[:, 2]).min() > 20


def test_metrics_are_reported_over_slices(small_pair):
    anat, pet = small_pair
    r = fuse_images(anat, pet, FusionOptions(method="lp"))
    mean, std, n = r.metrics["SSIM_avg"]
    assert n == 8 and 0.0 < mean <= 1.0 and std >= 0.0
    assert set(r.metrics) >= {"EN", "MI_bits", "MI_nats", "Qabf", "VIF", "PSNR"}


def test_axis_names_follow_the_direction_matrix():
    img = make_image(np.zeros((5, 6, 7), np.float32))            # identity: k is S
    assert array_axis(img, "axial") == 0 and array_axis(img, "coronal") == 1 and array_axis(img, "sagittal") == 2
    # a volume stored sagittal-first: index i runs along S, k along L
    perm = make_image(np.zeros((5, 6, 7), np.float32), direction=(0, 0, 1.0, 0, 1.0, 0, 1.0, 0, 0))
    assert array_axis(perm, "axial") == 2 and array_axis(perm, "sagittal") == 0
    with pytest.raises(FusionError, match="orientation"):
        array_axis(img, "oblique")


@pytest.mark.parametrize("bad,match", [
    (np.full((4, 8, 8), 3.0, np.float32), "constant"),
    (np.where(np.eye(8)[None] > 0, np.nan, 1.0).repeat(4, 0).astype(np.float32), "NaN"),
])
def test_bad_functional_values_are_refused(small_pair, bad, match):
    anat, _ = small_pair
    with pytest.raises(FusionError, match=match):
        fuse_images(anat, make_image(bad), FusionOptions(compute_metrics=False))


def test_unknown_method_fails_before_any_work(small_pair):
    anat, pet = small_pair
    with pytest.raises(FusionError, match="unknown method"):
        fuse_images(anat, pet, FusionOptions(method="magic"))


def test_spm12_pet_on_t1_end_to_end(shared_data):
    t1 = sitk.ReadImage(str(shared_data / "spm12" / "T1.nii"))
    spect = sitk.ReadImage(str(shared_data / "spm12" / "SPECT.nii"))
    r = fuse_images(t1, spect, FusionOptions(method="lp", compute_metrics=False))
    assert r.rgb.shape == (91, 109, 91, 3)
    # SPECT is stored x-flipped: the hottest fused voxel's colour sits where the aligned SPECT peaks
    aligned_y = r.prepared.functional_ycc[..., 0]
    assert np.abs(aligned_y - aligned_y[:, :, ::-1]).mean() < np.abs(aligned_y).mean()  # roughly symmetric brain
    raw = sitk.GetArrayFromImage(spect).astype(np.float32)
    lo, hi = r.prepared.functional_window
    assert np.corrcoef(aligned_y.ravel(), np.clip((raw[:, :, ::-1] - lo) / (hi - lo), 0, 1).ravel())[0, 1] > 0.9


def test_progress_spans_every_phase_and_cancel_works_in_each(small_pair):
    from MedicalFusionLib.errors import FusionCancelled
    from MedicalFusionLib.progress import active_phase

    anat, pet = small_pair
    seen, phases = [], []

    def progress(done, total):
        seen.append((done, total))
        phases.append(active_phase())

    fuse_images(anat, pet, FusionOptions(method="alpha", batch_size=4), progress=progress)
    assert len({t for _, t in seen}) == 1                       # one total for the whole run
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert {"prepare", "fuse", "recombine", "metrics"} <= set(phases)
    for phase in ("prepare", "fuse", "recombine", "metrics"):
        with pytest.raises(FusionCancelled):
            fuse_images(anat, pet, FusionOptions(method="alpha"), cancel=lambda phase=phase: active_phase() == phase)


def test_custom_colour_table_and_grey_rgb_functional(small_pair):
    anat, pet = small_pair
    blue = np.zeros((256, 3), np.float32)
    blue[:, 2] = np.linspace(0, 1, 256)
    r = fuse_images(anat, pet, FusionOptions(method="average", colormap=blue, compute_metrics=False))
    assert r.prepared.colormap.startswith("custom table")
    assert (r.rgb[..., 2].astype(int) - r.rgb[..., 0]).mean() > 10     # blue wins over red
    with pytest.raises(FusionError, match="colour table"):
        fuse_images(anat, pet, FusionOptions(colormap=np.ones((5, 2))))
    # a grayscale image saved as RGB (e.g. a CT PNG) stays grayscale: it is not re-coloured
    g = (sitk.GetArrayFromImage(pet) / 11 * 255).astype(np.uint8)
    grey_rgb = make_image(np.repeat(g[..., None], 3, -1), vector=True)
    r = fuse_images(anat, grey_rgb, FusionOptions(method="average", compute_metrics=False))
    assert r.grayscale and np.array_equal(r.rgb[..., 0], r.rgb[..., 2])


# -- streaming (issue 21, Scale) ---------------------------------------------------------------------


def _ct_and_tilted_pet():
    """A small CT in HU (bone above 215 HU, so the colour metrics' bone rows exist) and a coarse PET
    placed by a rotation: every part of the streamed path (sub-grid resampling, colour metrics with
    a colour bar and bone, all metrics including FMI)."""
    rng = np.random.default_rng(7)
    z, y, x = np.mgrid[0:14, 0:36, 0:30].astype(np.float32)
    ct = -1000 + 1100 * (((x - 15) / 13) ** 2 + ((y - 18) / 16) ** 2 < 1) + 60 * np.sin(x / 3) * np.cos(y / 4)
    ct += 700 * ((np.abs(x - 15) < 2) & (np.abs(y - 18) < 3)) + rng.normal(0, 10, ct.shape)
    ct = make_image(ct.astype(np.int16), spacing=(1.0, 1.0, 2.0))
    pz, py, px = np.mgrid[0:8, 0:12, 0:11].astype(np.float32)
    pet = make_image((np.exp(-((px - 5) ** 2 + (py - 6) ** 2 + (pz - 4) ** 2) / 8.0) * 9 + 0.3).astype(np.float32),
                     spacing=(3.0, 3.0, 4.0), origin=(-1.0, -1.5, -2.0))
    tr = sitk.Euler3DTransform()
    tr.SetRotation(0.04, -0.03, 0.08)
    tr.SetTranslation((1.0, -0.5, 1.5))
    return ct, pet, tr


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_a_slab_streamed_run_equals_a_whole_volume_run_bit_for_bit(axis, monkeypatch):
    from MedicalFusionLib import pipeline
    from MedicalFusionLib.engine import fuse_volume
    from MedicalFusionLib.methods import get_method
    from MedicalFusionLib.metrics.torch_engine import colour_metrics_torch, volume_metrics_torch

    ct, pet, tr = _ct_and_tilted_pet()
    options = FusionOptions(method="lp", axis=axis, metric_set="all", anatomical_units="HU", device="cpu")
    # the whole-volume run, step by step as the pipeline ran before it streamed: whole arrays throughout
    p = pipeline.prepare(ct, pet, options, tr)
    k = array_axis(p.reference, axis)
    fused_y = fuse_volume(p.anatomical, p.functional_ycc[..., 0], get_method("lp"), axis=k, device="cpu")
    rgb = pipeline.recombine(fused_y, p.functional_ycc, 1.0, p.grayscale, table=p.functional_table)
    a8, b8 = pipeline.source_gray8(p)
    metrics = volume_metrics_torch(a8, b8, rgb, axis=k, keys=pipeline._metric_keys(options), device="cpu")
    metrics.update(colour_metrics_torch(rgb, p.functional_ycc, p.functional_level, p.functional_table, p.bone,
                                        axis=k, device="cpu"))
    assert {"FMI_pixel", "readback_err", "hue_err10_bone"} <= set(metrics)
    # streamed in slabs of two or three slices (the default slab holds this volume whole)
    monkeypatch.setattr(pipeline, "STREAM_VOXELS", 2 * 36 * 30)
    assert pipeline.slab_slices(p.shape, k) < p.shape[k] // 3
    r = fuse_images(ct, pet, options, transform=tr)
    assert np.array_equal(r.rgb, rgb)
    assert r.metrics == metrics                                  # every value, to the last bit
    assert list(r.metrics) == list(metrics)


def test_memory_needed_stays_within_the_scale_budget_and_grows_with_the_voxels():
    from MedicalFusionLib.pipeline import memory_needed

    gb = 2**30
    pet = 175 ** 3                                    # a 4 mm PET over 70 cm
    big = memory_needed((700, 700, 700), 1, pet, FusionOptions())
    # issue 21: at most 1 GB + 16 bytes per anatomical voxel beyond the inputs (and no less than the RGB result)
    assert 3 * 700 ** 3 < big <= gb + 16 * 700 ** 3
    per_voxel = (memory_needed((700, 700, 1400), 1, pet) - big) / 700 ** 3
    assert 9 <= per_voxel <= 16                       # the RGB result + the colour metrics' values
    no_metrics = memory_needed((700, 700, 700), 1, pet, FusionOptions(compute_metrics=False))
    assert no_metrics <= big                          # writing needs as much as the colour metrics
    assert memory_needed((512, 512, 1000), 2, pet) <= gb + 16 * 512 * 512 * 1000      # an int16 CT
    # an automatic window needs a mask and two copies of the foreground first: more than the rest for float64
    assert memory_needed((512, 512, 1000), 8, pet) > memory_needed((512, 512, 1000), 8, pet,
                                                                  FusionOptions(anatomical_window=(-135, 215)))
    # a slice larger than the streamed slab is one slab of its own
    assert memory_needed((8000, 8000, 1), 1) > memory_needed((800, 800, 100), 1)


def test_a_study_that_does_not_fit_in_memory_is_refused_before_any_work(small_pair, monkeypatch):
    from MedicalFusionLib import pipeline

    anat, pet = small_pair
    calls = []
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: calls.append("prepare"))
    monkeypatch.setenv("MEDICALFUSION_MEMORY_AVAILABLE", "100M")
    need = pipeline.study_memory(anat, pet, FusionOptions())
    assert need > 100 * 2**20
    with pytest.raises(FusionError) as err:
        fuse_images(anat, pet, FusionOptions(method="lp"), progress=lambda d, t: calls.append(d))
    text = str(err.value)
    assert "\n" not in text and f"{need / 2**20:.0f} MB" in text and "100 MB is available" in text
    assert calls == []                                # no progress, no preparation: nothing was done
    monkeypatch.setenv("MEDICALFUSION_MEMORY_AVAILABLE", "lots")
    with pytest.raises(FusionError, match="MEDICALFUSION_MEMORY_AVAILABLE"):
        fuse_images(anat, pet)


def test_progress_and_cancel_across_slabs(small_pair, monkeypatch):
    from MedicalFusionLib import pipeline
    from MedicalFusionLib.errors import FusionCancelled
    from MedicalFusionLib.progress import active_phase

    anat, pet = small_pair
    monkeypatch.setattr(pipeline, "STREAM_VOXELS", 2 * 40 * 48)          # four slabs of two slices
    seen, phases = [], []

    def progress(done, total):
        seen.append(done)
        if not phases or phases[-1] != active_phase():
            phases.append(active_phase())

    fuse_images(anat, pet, FusionOptions(method="lp", batch_size=1), progress=progress)
    assert seen == sorted(seen) and seen[-1] == 1000 and len(set(seen)) > 10
    assert phases.count("fuse") == 4 and phases.count("colour") == 4         # each slab's turn
    # a cancel while the third slab fuses stops the run
    fused = []

    def cancel():
        if active_phase() == "fuse":
            fused.append(1)
        return len(fused) > 2 * 3

    with pytest.raises(FusionCancelled):
        fuse_images(anat, pet, FusionOptions(method="lp", batch_size=1), progress=lambda d, t: None, cancel=cancel)


def test_metrics_on_the_workers_do_not_depend_on_their_timing(monkeypatch, two_torch_threads):
    """Issue 21: the metrics of the slabs already fused run behind the fusion of the next, on a
    worker of their own, and the last slab's colour metrics on a worker while this thread makes its
    slices' metrics; same values and same bytes whatever the timing and whatever the thread count."""
    import threading
    import time

    import torch

    from MedicalFusionLib import pipeline
    from MedicalFusionLib.metrics.torch_engine import ColourMetrics

    ct, pet, tr = _ct_and_tilted_pet()
    options = FusionOptions(method="lp", metric_set="all", anatomical_units="HU", device="cpu")
    monkeypatch.setattr(pipeline, "STREAM_VOXELS", 3 * 36 * 30)          # several slabs
    monkeypatch.setattr(pipeline, "BEHIND_STREAM_VOXELS", 3 * 36 * 30)
    base = fuse_images(ct, pet, options, transform=tr)
    assert {"FMI_pixel", "readback_err", "hue_err10_bone"} <= set(base.metrics)
    add, threads = ColourMetrics.add, []

    def slow_colour(self, *args, **kw):          # the colour metrics end long after the slices'
        threads.append(threading.current_thread().name)
        time.sleep(0.05)
        return add(self, *args, **kw)

    monkeypatch.setattr(ColourMetrics, "add", slow_colour)
    late = fuse_images(ct, pet, options, transform=tr)
    assert threads and all(name.startswith("medicalfusion-cpu") for name in threads)   # on a worker
    assert "behind" in threads[0] and "behind" not in threads[-1]    # the first slabs' behind the run
    monkeypatch.setattr(ColourMetrics, "add", add)
    measure = pipeline._SliceMetrics._measure

    def slow_slices(self, *args, **kw):          # the slices' metrics end long after the colour ones
        time.sleep(0.05)
        return measure(self, *args, **kw)

    monkeypatch.setattr(pipeline._SliceMetrics, "_measure", slow_slices)
    early = fuse_images(ct, pet, options, transform=tr)
    monkeypatch.setattr(pipeline._SliceMetrics, "_measure", measure)
    torch.set_num_threads(1)                     # no workers: everything in this thread, as before
    alone = fuse_images(ct, pet, options, transform=tr)
    for run in (late, early, alone):
        assert np.array_equal(run.rgb, base.rgb)
        assert run.metrics == base.metrics       # every value, to the last bit


def test_an_error_or_a_cancel_in_the_colour_worker_ends_the_run(small_pair, monkeypatch, two_torch_threads):
    """The colour metrics' worker: its error is the run's error (the same one-line FusionError), and a
    cancel while it works stops it (no worker left running) and the run."""
    import threading

    from MedicalFusionLib.errors import FusionCancelled
    from MedicalFusionLib.metrics.torch_engine import ColourMetrics
    from MedicalFusionLib.progress import active_phase

    anat, pet = small_pair
    add = ColourMetrics.add

    def broken(self, *args, **kw):
        raise FusionError("colour metrics need a colour table")

    monkeypatch.setattr(ColourMetrics, "add", broken)
    with pytest.raises(FusionError, match="^colour metrics need a colour table$"):
        fuse_images(anat, pet, FusionOptions(method="lp"))
    started, stopped = threading.Event(), []

    def endless(self, fused, ycc, levels, bone, axis, tick=None):
        started.set()
        try:
            while True:                          # stops only through its tick (the pipeline's cancel)
                tick(0, 1)
        except FusionCancelled:
            stopped.append(threading.current_thread().name)
            raise

    monkeypatch.setattr(ColourMetrics, "add", endless)
    with pytest.raises(FusionCancelled):
        fuse_images(anat, pet, FusionOptions(method="lp"), progress=lambda d, t: None,
                    cancel=lambda: started.is_set() and active_phase() == "colour")
    assert stopped and stopped[0].startswith("medicalfusion-cpu")
    assert not [t for t in threading.enumerate() if t.name.startswith("medicalfusion-cpu")]
    monkeypatch.setattr(ColourMetrics, "add", add)


def test_an_error_or_a_cancel_behind_the_run_ends_it(small_pair, monkeypatch, two_torch_threads):
    """Issue 21: the metrics that run behind the fusion (the slabs before the last): their error is
    the run's (one line), a cancel while they work stops them, and no worker is left running."""
    import threading

    from MedicalFusionLib import pipeline
    from MedicalFusionLib.errors import FusionCancelled
    from MedicalFusionLib.metrics.torch_engine import ColourMetrics

    anat, pet = small_pair                                       # 8 slices of 40x48
    monkeypatch.setattr(pipeline, "BEHIND_STREAM_VOXELS", 2 * 40 * 48)   # 4 slabs: 3 measured behind
    add, where = ColourMetrics.add, []

    def broken_behind(self, *args, **kw):
        where.append(threading.current_thread().name)
        if "behind" in where[-1]:
            raise FusionError("colour metrics need a colour table")
        return add(self, *args, **kw)

    monkeypatch.setattr(ColourMetrics, "add", broken_behind)
    with pytest.raises(FusionError, match="^colour metrics need a colour table$"):
        fuse_images(anat, pet, FusionOptions(method="lp"))
    assert where == ["medicalfusion-cpu-behind_0"]
    started = threading.Event()

    def endless(self, fused, ycc, levels, bone, axis, tick=None):
        started.set()
        while True:                                              # stops only through its tick (the run's cancel)
            tick(0, 1)

    monkeypatch.setattr(ColourMetrics, "add", endless)
    with pytest.raises(FusionCancelled):
        fuse_images(anat, pet, FusionOptions(method="lp"), progress=lambda d, t: None, cancel=started.is_set)
    assert not [t for t in threading.enumerate() if t.name.startswith("medicalfusion-cpu")]
    monkeypatch.setattr(ColourMetrics, "add", add)


@pytest.mark.parametrize("method", ["lp", "mrdfn"])
def test_slabs_finished_behind_the_run_give_the_same_bytes(method, monkeypatch, two_torch_threads):
    """Issue 21: with two torch threads, each slab after the first is made ahead on a worker of its
    own and each slab but the last is recombined on another, while the next is fused on the others;
    the RGB result is that of one thread, slab for slab."""
    import threading

    import torch

    from MedicalFusionLib import pipeline

    ct, pet, tr = _ct_and_tilted_pet()
    options = FusionOptions(method=method, compute_metrics=False, anatomical_units="HU", device="cpu")
    monkeypatch.setattr(pipeline, "BEHIND_STREAM_VOXELS", 3 * 36 * 30)   # 5 slabs of 3 slices (14 slices)
    recombine, where = pipeline.recombine, []

    def recording(*args, **kw):
        where.append(threading.current_thread().name)
        return recombine(*args, **kw)

    monkeypatch.setattr(pipeline, "recombine", recording)
    slab, made = pipeline.Prepared.slab, []

    def making(self, *args, **kw):
        made.append(threading.current_thread().name)
        return slab(self, *args, **kw)

    monkeypatch.setattr(pipeline.Prepared, "slab", making)
    two = fuse_images(ct, pet, options, transform=tr)
    assert where == ["medicalfusion-cpu-behind_0"] * 4 + [threading.current_thread().name]
    assert made == [threading.current_thread().name] + ["medicalfusion-cpu-ahead_0"] * 4
    torch.set_num_threads(1)
    where.clear()
    one = fuse_images(ct, pet, options, transform=tr)
    assert where == [threading.current_thread().name]             # one thread: one slab, as before
    assert np.array_equal(one.rgb, two.rgb)
