"""Speed and memory benchmarks; writes a markdown report (default docs/BENCHMARKS.md).

Run: make bench   (or: python scripts/bench.py --output docs/BENCHMARKS.md [--methods lp alpha] [--repeats 20])

1. Milliseconds per 256x256 pair for every available method (one pair per call, the median of
   ``--repeats`` calls after a warm-up), on the device ``auto`` picks.
2. End to end for 3D cases (read nothing from disk; align + prepare + fuse + recombine), each in a
   fresh subprocess so that its peak resident memory above the process's baseline is measured:
   a synthetic 256x256x180 anatomical with a functional on a coarser, tilted, x-flipped grid, and
   the spm12 T1 + PET pair from ../shared/data when present.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO / "scripts"))

from benchdoc import machine_line, replace_section  # noqa: E402


def bench_methods(names, repeats, device):
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from MedicalFusionLib.device import pick_device  # noqa: PLC0415
    from MedicalFusionLib.methods import all_methods, get_method  # noqa: PLC0415

    dev = pick_device(device)
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((1, 1, 256, 256), dtype=np.float32)).to(dev)
    b = torch.from_numpy(rng.random((1, 1, 256, 256), dtype=np.float32)).to(dev)
    methods = [get_method(n) for n in names] if names else [m for m in all_methods()]
    rows = []
    for m in methods:
        ok, reason = m.available()
        if not ok:
            rows.append((m.name, m.family, None, reason))
            continue
        fn = m.build(dev)
        times = []
        with torch.inference_mode():
            fn(a, b)
            for _ in range(repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(a, b)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        rows.append((m.name, m.family, statistics.median(times) * 1000, ""))
        print(f"{m.name:14s} {rows[-1][2]:8.2f} ms", flush=True)
    return str(dev), rows


def _case_child(case: str, method: str, data: str) -> dict:
    """Runs in a subprocess: build the inputs, then time the fusion and report peak memory."""
    import numpy as np  # noqa: PLC0415
    import SimpleITK as sitk  # noqa: PLC0415

    from MedicalFusionLib.pipeline import FusionOptions, fuse_images  # noqa: PLC0415
    from MedicalFusionLib.sample import phantom_head, simulate_pet  # noqa: PLC0415

    if case == "synthetic":
        t1, gm, wm = phantom_head((256, 256, 180), spacing=1.0)
        pet = simulate_pet(gm, wm, spacing=4.0, tilt_deg=12.0)
    else:
        t1 = sitk.ReadImage(str(pathlib.Path(data) / "spm12" / "T1.nii"))
        pet = sitk.ReadImage(str(pathlib.Path(data) / "spm12" / "PET.nii"))
    import gc  # noqa: PLC0415

    gc.collect()
    base = _rss_now()
    t0 = time.perf_counter()
    r = fuse_images(t1, pet, FusionOptions(method=method, compute_metrics=False))
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "size": list(t1.GetSize()), "functional_size": list(pet.GetSize()), "method": method,
            "seconds_total": total, "seconds_engine": r.seconds, "device": r.device,
            "extra_memory_mb": max(0, peak - base) / 2**20, "slices": int(np.asarray(r.rgb.shape)[r.axis])}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_case(case: str, method: str, data: str, threads: int | None = None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", case, "--method-3d", method, "--data", data]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output", help="write the report section into this markdown file (make bench: "
                   "docs/BENCHMARKS.md); without it, the figures are only printed")
    p.add_argument("--methods", nargs="*")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--method-3d", default="lp")
    p.add_argument("--data", default=os.environ.get("MEDICALFUSION_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--child")
    args = p.parse_args()
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_case_child(args.child, args.method_3d, args.data)))
        return
    import torch  # noqa: PLC0415

    device, rows = bench_methods(args.methods, args.repeats, args.device)
    cases = [bench_case("synthetic", args.method_3d, args.data, args.threads)]
    if (pathlib.Path(args.data) / "spm12" / "PET.nii").is_file():
        cases.append(bench_case("spm12", args.method_3d, args.data, args.threads))
    lines = [
        "## Fusion speed and memory", "",
        f"Command: `{' '.join(['python scripts/bench.py'] + sys.argv[1:])}` (or `make bench`).",
        machine_line(f"torch {torch.__version__} with {torch.get_num_threads()} threads, device {device}."), "",
        "### Milliseconds per 256x256 pair (one pair per call, median)", "",
        "| method | family | ms per pair |", "|---|---|---|"]
    for name, family, ms, reason in rows:
        lines.append(f"| {name} | {family} | {'%.2f' % ms if ms is not None else 'not run: ' + reason} |")
    lines += ["", f"### 3D end to end with `{args.method_3d}` (align + prepare + fuse + recombine, no metrics)", "",
              "| case | anatomical | functional | slices | total s | engine s | extra peak memory MB |",
              "|---|---|---|---|---|---|---|"]
    for c in cases:
        if c:
            lines.append(f"| {c['case']} | {'x'.join(map(str, c['size']))} | {'x'.join(map(str, c['functional_size']))} | "
                         f"{c['slices']} | {c['seconds_total']:.2f} | {c['seconds_engine']:.2f} | {c['extra_memory_mb']:.0f} |")
    lines += ["", "The Slicer scene round trip (node to node against the engine alone) is measured by "
              "`scripts/bench_scene.py`: see [BENCHMARKS_SCENE.md](BENCHMARKS_SCENE.md)."]
    if args.output:
        replace_section(args.output, "fusion", "\n".join(lines))
        print(f"wrote {args.output}")
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
