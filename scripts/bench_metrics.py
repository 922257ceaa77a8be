#!/usr/bin/env python
"""Volume metrics: the torch implementation against the numpy reference and against the `lp` fusion.

For the embedded MNI demo pair (197x233x189 T1 with the simulated PET, as `medicalfusion demo`
fuses it) and the spm12 T1 + PET templates (91x109x91), in ONE process and alternating so that
the machine's load hits all three alike, ``--repeats`` times:

- ``lp``: the fusion of the pair without metrics (``pipeline.fuse_images``: prepare, fuse, recombine);
- ``torch``: ``metrics.torch_engine.volume_metrics_torch`` (the metrics engine) on the volumes the pipeline measures;
- ``numpy``: ``reference_metrics.volume_metrics`` (the tests' per-slice numpy/scipy/scikit-image reference) on the
  same volumes (``--numpy-repeats`` times: it is slow).

Reports the median seconds, the ratios torch / lp and numpy / torch, the peak memory the torch
metrics add, and the largest difference per metric between the two implementations (mean and std
over the slices) on these volumes and, with the shared data, on the aanlib test split (every pair
fused as the reference evaluator's `yavg`, stacked as one volume per modality).

    python scripts/bench_metrics.py [--data ../shared/data] [--repeats 3] [--numpy-repeats 1]
                                    [--threads N] [--output docs/BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO))   # medicalfusion_tools
sys.path.insert(0, str(REPO / "MedicalFusion" / "Testing" / "Python"))   # reference_metrics (the numpy reference)
sys.path.insert(0, str(REPO / "scripts"))

from benchdoc import command_line, common_arguments, machine_line, replace_section  # noqa: E402


NOTE_FMI = ("FMI (fast-FMI on pixels and on gradients, 3x3 windows) is most of the torch time: every window pair "
            "where both windows vary is a 17-step merge of two 9-step cdfs plus the entropy of the 17 staircase "
            "cells (metrics/torch_engine.py's docstring), about 2.2 million pairs per source and feature on the MNI grid, "
            "done as a few dozen tensor operations per chunk of pairs.")

#: Groups of metrics that the torch implementation computes together (timed one by one).
GROUPS = {"EN MI ARI": ["EN", "MI_bits", "MI_nats", "ARI"], "SD SF AG PSNR CC SCD": ["SD", "SF", "AG", "PSNR", "CC", "SCD"],
          "SSIM": ["SSIM_avg", "SSIM_sum"], "VIF": ["VIF"], "Qabf": ["Qabf"], "FMI_pixel": ["FMI_pixel"],
          "FMI_gradient": ["FMI_gradient"]}


class PeakRSS:
    """Samples the process's resident memory every few ms while active; ``extra`` = peak - start (bytes)."""

    def __init__(self):
        self.extra = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self._base = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.extra = max(self.extra, self._rss() - self._base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.extra = max(self.extra, self._rss() - self._base)


def cases(data: pathlib.Path):
    import SimpleITK as sitk  # noqa: PLC0415

    from MedicalFusionLib.sample import sample_pair  # noqa: PLC0415

    out = {"MNI demo": sample_pair()}
    if (data / "spm12" / "PET.nii").is_file():
        out["spm12 T1 + PET"] = (sitk.ReadImage(str(data / "spm12" / "T1.nii")),
                                 sitk.ReadImage(str(data / "spm12" / "PET.nii")))
    return out


def aanlib_volumes(data: pathlib.Path):
    """{modality: (a8, b8, f8)}: the aanlib test split, each pair fused as `yavg`, stacked per modality."""
    import csv  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    from MedicalFusionLib.colour import gray8  # noqa: PLC0415

    split = data / "aanlib" / "split.csv"
    if not split.is_file():
        return {}
    luma = np.array([0.299, 0.587, 0.114])
    stacks: dict[str, list] = {}
    with open(split, newline="") as fh:
        for r in csv.DictReader(fh):
            if r["split"] != "test":
                continue
            mri = np.asarray(Image.open(data / "aanlib" / r["mri"]))
            func = np.asarray(Image.open(data / "aanlib" / r["image"]))
            ya = mri @ luma if mri.ndim == 3 else mri.astype(np.float64)
            yb = func @ luma if func.ndim == 3 else func.astype(np.float64)
            y = (ya + yb) / 2
            fused = np.clip(np.rint(y), 0, 255).astype(np.uint8)
            stacks.setdefault(r["pair"], []).append((gray8(mri), gray8(func), fused))
    return {k: tuple(np.stack(x) for x in zip(*v)) for k, v in stacks.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "metrics", REPO)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--numpy-repeats", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from MedicalFusionLib.metrics import METRIC_KEYS, METRIC_SETS  # noqa: PLC0415
    from reference_metrics import volume_metrics  # noqa: PLC0415  (Testing/Python: the numpy reference)
    from MedicalFusionLib.metrics.torch_engine import volume_metrics_torch  # noqa: PLC0415
    from MedicalFusionLib.pipeline import FusionOptions, fuse_images, source_gray8  # noqa: PLC0415
    from MedicalFusionLib.colour import gray8  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    data = pathlib.Path(args.data)
    lp = FusionOptions(method="lp", device=args.device, compute_metrics=False)
    rows, splits, diffs = [], [], {k: (0.0, "all: identical") for k in METRIC_KEYS}

    def note_diffs(label, ref, ours):
        for k in METRIC_KEYS:
            d = max(abs(ref[k][0] - ours[k][0]), abs(ref[k][1] - ours[k][1]))
            if d > diffs[k][0]:
                diffs[k] = (d, label)

    for label, (anat, func) in cases(data).items():
        result = fuse_images(anat, func, lp)                     # warm-up, and the volumes to measure
        a8, b8 = source_gray8(result.prepared)
        f8 = gray8(result.rgb)
        axis = result.axis
        slices = int(np.count_nonzero(np.any(np.moveaxis(a8, axis, 0) != 0, axis=(1, 2))
                                      | np.any(np.moveaxis(b8, axis, 0) != 0, axis=(1, 2))))
        with PeakRSS() as mem:
            ours = volume_metrics_torch(a8, b8, f8, axis=axis, device=args.device)
        times: dict[str, list[float]] = {"lp": [], "torch": [], "quick": [], "numpy": []}
        ref = None
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            fuse_images(anat, func, lp)
            times["lp"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours = volume_metrics_torch(a8, b8, f8, axis=axis, device=args.device)
            times["torch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            volume_metrics_torch(a8, b8, f8, axis=axis, keys=METRIC_SETS["quick"], device=args.device)
            times["quick"].append(time.perf_counter() - t0)
            if rep < args.numpy_repeats:
                t0 = time.perf_counter()
                ref = volume_metrics(a8, b8, f8, axis=axis)
                times["numpy"].append(time.perf_counter() - t0)
            print(f"{label}: lp {times['lp'][-1]:.2f} s, torch {times['torch'][-1]:.2f} s, "
                  f"quick {times['quick'][-1]:.2f} s"
                  + (f", numpy {times['numpy'][-1]:.2f} s" if rep < args.numpy_repeats else ""), flush=True)
        note_diffs(label, ref, ours)
        med = {k: statistics.median(v) for k, v in times.items()}
        shape = "x".join(str(s) for s in a8.shape[::-1])
        rows.append((label, shape, slices, med, mem.extra / 2**20))
        split = {}
        for name, keys in GROUPS.items():          # where the torch time goes (one run each)
            t0 = time.perf_counter()
            volume_metrics_torch(a8, b8, f8, axis=axis, keys=keys, device=args.device)
            split[name] = time.perf_counter() - t0
        splits.append((label, split))

    for modality, (a8, b8, f8) in aanlib_volumes(data).items():
        label = f"aanlib {modality} test ({len(a8)} pairs)"
        note_diffs(label, volume_metrics(a8, b8, f8), volume_metrics_torch(a8, b8, f8, device=args.device))
        print(f"{label}: compared", flush=True)

    command = command_line("bench_metrics.py", argv)
    device = str(torch.device(args.device) if args.device != "auto" else
                 __import__("MedicalFusionLib.device", fromlist=["pick_device"]).pick_device("auto"))
    title = "## Volume metrics: torch against the numpy reference and the `lp` fusion"
    if args.threads:
        title += f" ({args.threads} torch thread{'s' if args.threads > 1 else ''})"
    lines = [title, "",
             f"Command: `{command}` (part of `make bench`).",
             machine_line(f"torch {torch.__version__} with {torch.get_num_threads()} threads, device {device}."), "",
             "One process, alternating lp fusion / torch metrics / numpy metrics (median seconds; numpy "
             f"{args.numpy_repeats} run(s), the others {args.repeats}). `lp` is `pipeline.fuse_images` without metrics "
             "(prepare + fuse + recombine); both metric columns measure all 16 metrics over the same non-empty "
             "slices; *quick* is the `--metric-set quick` (every metric but FMI) in torch. Target: torch metrics at most "
             "half the lp fusion (torch / lp <= 0.5).", "",
             "| volume | grid | slices measured | lp fusion s | torch metrics s | numpy metrics s | torch / lp "
             "| numpy / torch | quick s | quick / lp | torch extra peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, shape, slices, med, mb in rows:
        lines.append(f"| {label} | {shape} | {slices} | {med['lp']:.2f} | {med['torch']:.2f} | {med['numpy']:.2f} | "
                     f"{med['torch'] / med['lp']:.2f} | {med['numpy'] / med['torch']:.1f} | {med['quick']:.2f} | "
                     f"{med['quick'] / med['lp']:.2f} | {mb:.0f} |")
    lines += ["", "Where the torch time goes (each group of metrics alone, seconds):", "",
              "| volume | " + " | ".join(GROUPS) + " |", "|---|" + "---:|" * len(GROUPS)]
    for label, split in splits:
        lines.append(f"| {label} | " + " | ".join(f"{split[g]:.2f}" for g in GROUPS) + " |")
    lines += ["", NOTE_FMI]
    lines += ["", "Largest difference between the torch and the numpy metrics (of the mean or the std over the slices) "
              "on the volumes above:", "", "| metric | largest difference | on |", "|---|---:|---|"]
    for k in METRIC_KEYS:
        lines.append(f"| {k} | {diffs[k][0]:.1e} | {diffs[k][1]} |")
    text = "\n".join(lines)
    print(text)
    if args.output:
        replace_section(args.output, args.section, text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
