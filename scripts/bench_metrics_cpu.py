#!/usr/bin/env python
"""CPU seconds of each group of the default metrics at one torch thread (issue 21), this tree's
metrics engine against another tree's, on what the pipeline measures.

The 256x256x180 phantom of scripts/profile_pipeline.py (1 mm head, 4 mm PET) is fused once with
``--method`` (no metrics); the metrics engine then measures the result group by group: histograms
(EN, MI, ARI), moments (SD, SF, AG, PSNR, CC, SCD), SSIM, VIF, Qabf
(``volume_metric_values_torch`` with that group's keys) and the colour metrics (``ColourMetrics``),
with ``metrics/torch_engine.py`` of this tree and of ``--before DIR`` (another tree's MedicalFusion
folder, loaded inside this tree's package), in one process, alternating, ``--repeat`` times. It
prints the min and median CPU seconds (``time.process_time``) of each group per tree and whether
the two trees' values are identical (else the largest relative difference). CPU time of the
metrics alone, alternated in one process, says more than a whole ``fuse`` run on a machine shared
with other work, whose fusion's CPU time moves by seconds from run to run.

    OMP_NUM_THREADS=1 python scripts/bench_metrics_cpu.py --before /work/main/MedicalFusion [--repeat 7]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO / "scripts"))

GROUPS = {"histograms": ["EN", "MI_bits", "MI_nats", "ARI"], "moments": ["SD", "SF", "AG", "PSNR", "CC", "SCD"],
          "SSIM": ["SSIM_avg", "SSIM_sum"], "VIF": ["VIF"], "Qabf": ["Qabf"]}


def load_engine(folder: str):
    """``metrics/torch_engine.py`` of another tree's MedicalFusion ``folder``, inside this tree's package."""
    path = pathlib.Path(folder) / "MedicalFusionLib" / "metrics" / "torch_engine.py"
    spec = importlib.util.spec_from_file_location("MedicalFusionLib.metrics.torch_engine_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="another tree's MedicalFusion folder")
    p.add_argument("--method", default="mrdfn")
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    import torch

    from MedicalFusionLib import colour
    from MedicalFusionLib.metrics import torch_engine as after
    from MedicalFusionLib.options import FusionOptions
    from MedicalFusionLib.pipeline import fuse_prepared, prepare, source_gray8
    from profile_pipeline import phantom

    torch.set_num_threads(1)
    before = load_engine(args.before)
    a, f = phantom()
    prepared = prepare(a, f, FusionOptions(method=args.method))
    rgb = fuse_prepared(prepared, FusionOptions(method=args.method)).rgb
    a8, b8 = source_gray8(prepared)
    f8 = colour.gray8(rgb)
    whole = prepared.slab(0, 0, rgb.shape[0])

    def run(engine, group: str) -> dict[str, np.ndarray]:
        if group != "colour":
            return engine.volume_metric_values_torch(a8, b8, f8, keys=GROUPS[group], device="cpu")
        acc = engine.ColourMetrics(rgb.shape[:-1], prepared.functional_table, prepared.with_bone, "cpu")
        acc.add(rgb, whole.functional_ycc, whole.functional_level, whole.bone, 0)
        return {k: np.array([v[0]]) for k, v in acc.result().items()}

    print(f"{args.method}, 1 torch thread, CPU s of the metrics of the fused 256x256x180 phantom; "
          f"before: {args.before}; load average {os.getloadavg()[0]:.1f} at the start")
    print("| group | before: min (median) | after: min (median) | after / before (min) | values |")
    print("|---|---:|---:|---:|---|")
    totals = {"before": 0.0, "after": 0.0}
    for group in [*GROUPS, "colour"]:
        times: dict[str, list[float]] = {"before": [], "after": []}
        values = {}
        for i in range(args.repeat):
            order = (("before", before), ("after", after)) if i % 2 == 0 else (("after", after), ("before", before))
            for name, engine in order:
                c0 = time.process_time()
                values[name] = run(engine, group)
                times[name].append(time.process_time() - c0)
        old, new = values["before"], values["after"]
        same = old.keys() == new.keys() and all(np.array_equal(old[k], new[k]) for k in old)
        worst = 0.0 if same else max(float(np.max(np.abs(np.asarray(new[k]) - old[k]) / np.maximum(np.abs(old[k]), 1e-300)))
                                     for k in old if k in new)
        lo = {k: min(v) for k, v in times.items()}
        for k in totals:
            totals[k] += lo[k]
        print(f"| {group} | {lo['before']:.3f} ({np.median(times['before']):.3f}) | {lo['after']:.3f} "
              f"({np.median(times['after']):.3f}) | {lo['after'] / lo['before']:.2f} | "
              f"{'identical' if same else f'max relative difference {worst:.1e}'} |", flush=True)
    print(f"| all | {totals['before']:.3f} | {totals['after']:.3f} | {totals['after'] / totals['before']:.2f} | |")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
