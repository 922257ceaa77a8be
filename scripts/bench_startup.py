"""Start-up of the command: wall seconds of ``medicalfusion methods`` and ``medicalfusion --help`` in
fresh interpreters, and whether torch was imported (issue 21: neither may import torch).

    python scripts/bench_startup.py [--repeats 5] [--package-dir OTHER/MedicalFusion ...] [--output docs/BENCHMARKS.md]

Each ``--package-dir`` (default: this checkout's MedicalFusion/) is put first on PYTHONPATH; give an
older checkout's folder too to compare (runs alternate between them, so the load is shared).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PROBE = ("import runpy, sys; sys.argv = ['medicalfusion'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('MedicalFusionLib.cli', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)")


def one_run(package_dir: pathlib.Path, argv: list) -> tuple[float, bool]:
    env = dict(os.environ, PYTHONPATH=str(package_dir))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if "TORCH" not in proc.stderr:
        raise SystemExit(f"{argv} failed: {proc.stderr[-2000:]}")
    return seconds, proc.stderr.strip().endswith("NOTORCH") is False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--package-dir", nargs="+", default=[str(REPO / "MedicalFusion")])
    p.add_argument("--output", help="append the table to this markdown file")
    args = p.parse_args()
    commands = {"methods": ["methods"], "--help": ["--help"]}
    times = {(d, c): [] for d in args.package_dir for c in commands}
    torch_seen = {}
    for _ in range(args.repeats):
        for d in args.package_dir:
            for c, argv in commands.items():
                seconds, imported = one_run(pathlib.Path(d), argv)
                times[(d, c)].append(seconds)
                torch_seen[(d, c)] = imported
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["", "## Start-up: `medicalfusion methods` and `--help`", "",
             f"`python scripts/bench_startup.py --repeats {args.repeats}"
             + (f" --package-dir {' '.join(args.package_dir)}" if len(args.package_dir) > 1 else "") + "`; "
             f"{os.cpu_count()} CPUs, load average {load:.1f} at the end (runs alternate between the trees).", "",
             "| package | command | median s | min s | imports torch |", "|---|---|---|---|---|"]
    for (d, c), values in times.items():
        lines.append(f"| {d} | `{c}` | {statistics.median(values):.2f} | {min(values):.2f} | "
                     f"{'yes' if torch_seen[(d, c)] else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
