"""Where the pipeline's time goes (issue 21): cProfile of ``fuse_images`` on a 256x256x180 phantom
(1 mm anatomical head, 4 mm PET) with one method, without and with the default metrics, next to the
bare network's cost per 256x256 slice (the same chunks the engine runs).

    python scripts/profile_pipeline.py [--method mrdfn] [--threads 1] [--top 18]

With ``--cpu``: no profile; CPU seconds (``time.process_time``, every thread of the process) of the
bare network per slice, and of ``fuse_prepared`` without and with the default metrics after a warm
run (weights, imports and colour tables loaded): on a machine shared with other work, CPU time says
more than wall time about what a change saves. ``--repeat N`` runs the two N times, alternating, and
reports medians (the metrics' CPU is the median of the N differences). ``--package DIR`` imports
MedicalFusionLib from DIR (another tree's MedicalFusion folder) instead of this tree's, to compare trees.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pathlib
import pstats
import sys
import time

import numpy as np
import SimpleITK as sitk

_package = sys.argv[sys.argv.index("--package") + 1] if "--package" in sys.argv[:-1] else None
sys.path.insert(0, _package or str(pathlib.Path(__file__).resolve().parents[1] / "MedicalFusion"))


def phantom() -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:180, 0:256, 0:256].astype(np.float32)
    head = ((x - 128) ** 2 / 110 ** 2 + (y - 128) ** 2 / 120 ** 2 + (z - 90) ** 2 / 85 ** 2) < 1
    anat = (head * (400 + 200 * np.sin(x / 6) * np.cos(y / 9)) + rng.normal(0, 10, x.shape)).astype(np.float32)
    a = sitk.GetImageFromArray(anat)
    pz, py, px = np.mgrid[0:45, 0:64, 0:64].astype(np.float32)
    pet = np.exp(-((px - 40) ** 2 + (py - 30) ** 2 + (pz - 25) ** 2) / 40) * 10 + ((px - 32) ** 2 + (py - 32) ** 2 < 700)
    f = sitk.GetImageFromArray(pet.astype(np.float32))
    f.SetSpacing((4.0, 4.0, 4.0))
    return a, f


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="mrdfn")
    p.add_argument("--threads", type=int)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--cpu", action="store_true", help="CPU seconds instead of a profile (see the module doc)")
    p.add_argument("--repeat", type=int, default=1, help="with --cpu: runs of each, alternating; medians")
    p.add_argument("--package", help="import MedicalFusionLib from this folder (another tree's MedicalFusion)")
    args = p.parse_args()
    import torch

    from MedicalFusionLib.methods import get_method
    from MedicalFusionLib.options import FusionOptions
    from MedicalFusionLib.pipeline import fuse_images

    if args.threads:
        torch.set_num_threads(args.threads)
    a, f = phantom()
    if args.cpu:
        return cpu_seconds(a, f, args.method, args.repeat)
    fn = get_method(args.method).build(torch.device("cpu"))
    chunk = getattr(fn, "chunk_for", lambda h, w: 1)(256, 256)
    x, y = torch.rand(chunk, 1, 256, 256), torch.rand(chunk, 1, 256, 256)
    fn(x, y)
    t0 = time.perf_counter()
    for _ in range(5):
        fn(x, y)
    bare = (time.perf_counter() - t0) / (5 * chunk)
    print(f"{args.method}, {torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"bare network: {bare * 1e3:.1f} ms a 256x256 slice (chunks of {chunk})")
    for metrics in (False, True):
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        result = fuse_images(a, f, FusionOptions(method=args.method, compute_metrics=metrics))
        profile.disable()
        total = time.perf_counter() - t0
        print(f"\nmetrics={metrics}: fuse_images {total:.2f} s; fuse + recombine {result.seconds:.2f} s "
              f"({result.seconds / 180 * 1e3:.1f} ms a slice, {result.seconds / 180 / bare:.2f}x the bare network); "
              f"metrics {result.seconds_metrics:.2f} s")
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue().split("Ordered by: internal time")[-1])
    return 0


def cpu_seconds(a: sitk.Image, f: sitk.Image, method: str, repeat: int = 1) -> int:
    import torch

    from MedicalFusionLib.methods import get_method
    from MedicalFusionLib.options import FusionOptions
    from MedicalFusionLib.pipeline import fuse_prepared, prepare

    fn = get_method(method).build(torch.device("cpu"))
    chunk = getattr(fn, "chunk_for", lambda h, w: 1)(256, 256)
    x, y = torch.rand(chunk, 1, 256, 256), torch.rand(chunk, 1, 256, 256)
    with torch.inference_mode():
        fn(x, y)
        c0 = time.process_time()
        for _ in range(20):
            fn(x, y)
        bare = (time.process_time() - c0) / (20 * chunk)
    prepared = prepare(a, f, FusionOptions(method=method))
    fuse_prepared(prepared, FusionOptions(method=method, compute_metrics=True))       # warm
    runs = {False: [], True: []}
    for _ in range(max(1, repeat)):
        for metrics in (False, True):
            c0, w0 = time.process_time(), time.perf_counter()
            fuse_prepared(prepared, FusionOptions(method=method, compute_metrics=metrics))
            runs[metrics].append(time.process_time() - c0)
            print(f"metrics={metrics}: {runs[metrics][-1]:.2f} CPU s, {time.perf_counter() - w0:.2f} s wall")
    cpu = {m: float(np.median(v)) for m, v in runs.items()}
    extra = float(np.median([t - n for t, n in zip(runs[True], runs[False])]))
    n = prepared.anatomical.shape[0]      # the slices the engine fuses (it skips empty ones)
    slices = int(np.count_nonzero(prepared.anatomical.reshape(n, -1).any(1)
                                  | prepared.functional_ycc[..., 0].reshape(n, -1).any(1)))
    fusion = cpu[False]
    print(f"{method}, {torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f}: "
          f"bare network {bare * 1e3:.1f} ms CPU a 256x256 slice; fuse + recombine {fusion:.2f} CPU s "
          f"({fusion / slices * 1e3:.1f} ms a fused slice, {fusion / slices / bare:.2f}x the bare network); "
          f"default metrics {extra:.2f} CPU s ({extra / fusion:.2f}x the fusion); "
          f"with / without metrics {cpu[True] / fusion:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
