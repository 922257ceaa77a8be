"""Speed of the recombination: the colour-keeping one (pipeline.recombine) against the former
BT.601 one (keep_colour=False), on a synthetic PET-Heat volume (half background, uptake spread
over the map), one torch/numpy thread. Prints seconds (best of 3 after a warm-up that fills the
per-colour tables) and the machine load.

    PYTHONPATH=$PWD/MedicalFusion OMP_NUM_THREADS=1 python scripts/bench_recombine.py [--shape 64 256 256]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "MedicalFusion"))

from MedicalFusionLib import colour  # noqa: E402
from MedicalFusionLib.pipeline import recombine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[64, 256, 256])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shape = tuple(args.shape)
    y = rng.random(shape, dtype=np.float32)
    unit = np.clip(rng.normal(0.2, 0.25, shape), 0, 1).astype(np.float32)
    unit[rng.random(shape) < 0.5] = 0.0
    table = colour.colormap_table("PET-Heat")
    ycc = colour.apply_colormap(unit, colour.rgb_to_ycbcr(table))
    recombine(y[:2], ycc[:2], 1.0, False, table=table)
    for name, keep in (("former (BT.601)", False), ("colour-keeping", True)):
        best = min(_time(lambda: recombine(y, ycc, 1.0, False, keep_colour=keep, table=table)) for _ in range(3))
        print(f"{name}: {best:.2f} s for {np.prod(shape) / 1e6:.1f} M voxels")
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    raise SystemExit(main())
