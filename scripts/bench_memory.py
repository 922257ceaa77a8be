"""Memory and time of ``medicalfusion fuse`` on volumes of growing size; the 'memory' section of
docs/BENCHMARKS.md (issue 21, Scale: at most 1 GB + 16 bytes per anatomical voxel beyond the inputs,
time in proportion to the voxels).

Run: make bench   (or: python scripts/bench_memory.py --output docs/BENCHMARKS.md
     [--sizes 256x256x180 400x400x400 700x700x700 512x512x1000] [--method lp] [--metric-set quick])

Inputs are generated first with a fixed seed and written uncompressed (NRRD): a uint8 anatomical
(a CT in HU, int16, for the 512x512x1000 case) on a 1 mm grid (0.8 x 0.8 x 1 mm for the CT) and a
float32 PET on a 4 mm grid covering the same body. Each size then runs in a fresh child process
that calls the command line itself (``cli.main(["fuse", ...])``, default metrics, the fused volume
written to NRRD with its metrics CSV). Memory: after both inputs are read the child resets the
kernel's peak-RSS counter and notes its RSS; "beyond inputs" is the peak after that minus that RSS
(bench_e2e.py's measure). The table also shows what :func:`MedicalFusionLib.pipeline.study_memory`
predicts for the run (the figure a study is refused on when it exceeds the available memory).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO / "scripts"))

from bench_e2e import _reset_peak, _rss_bytes  # noqa: E402
import numpy as np  # noqa: E402
from benchdoc import machine_line, replace_section  # noqa: E402

SECTION = "memory"
FIXED_MB = 1024.0             # the target: 1 GB ...
PER_VOXEL = 16.0              # ... + 16 bytes per anatomical voxel beyond the inputs
DEFAULT_SIZES = ("256x256x180", "400x400x400")


def make_inputs(size: tuple[int, int, int], folder: pathlib.Path, seed: int = 0) -> tuple[str, str]:
    """A body-like anatomical of ``size`` (x, y, z) and a 4 mm PET over it, written uncompressed."""
    import numpy as np  # noqa: PLC0415
    import SimpleITK as sitk  # noqa: PLC0415

    nx, ny, nz = size
    ct = nx * ny * nz > 200_000_000 and nz > nx       # the long CT case: int16 HU
    spacing = (0.8, 0.8, 1.0) if ct else (1.0, 1.0, 1.0)
    rng = np.random.default_rng(seed)
    arr = np.empty((nz, ny, nx), np.int16 if ct else np.uint8)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    yy, xx = (yy - ny / 2) / (ny * 0.42), (xx - nx / 2) / (nx * 0.45)
    for z in range(nz):                                # slice by slice: no whole-volume float temporaries
        t = z / max(1, nz - 1)
        r2 = xx ** 2 + yy ** 2 * (1.0 + 0.3 * np.sin(6.0 * t))
        body = r2 < 1.0
        organ = (xx - 0.3) ** 2 + (yy + 0.1) ** 2 < 0.05 + 0.03 * np.cos(5.0 * t)
        bone = np.abs(r2 - 0.15) < 0.01
        noise = rng.normal(0.0, 1.0, (ny, nx)).astype(np.float32)
        if ct:
            v = np.where(body, 40.0 + 15.0 * noise, -1000.0)
            v = np.where(organ & body, 90.0 + 10.0 * noise, v)
            v = np.where(bone & body, 700.0 + 50.0 * noise, v)
        else:
            v = np.where(body, 90.0 + 8.0 * noise, 0.0)
            v = np.where(organ & body, 160.0 + 8.0 * noise, v)
            v = np.where(bone & body, 230.0 + 5.0 * noise, v)
        arr[z] = np.clip(v, -1024, 3000) if ct else np.clip(v, 0, 255)
    anat = sitk.GetImageFromArray(arr)
    del arr
    anat.SetSpacing(spacing)
    pet_size = [max(2, int(round(s * sp / 4.0))) for s, sp in zip(size, spacing)]
    pz, py, px = pet_size[2], pet_size[1], pet_size[0]
    zz, yy, xx = np.mgrid[0:pz, 0:py, 0:px].astype(np.float32)
    zz, yy, xx = zz / pz, (yy - py / 2) / (py * 0.42), (xx - px / 2) / (px * 0.45)
    pet = np.where(xx ** 2 + yy ** 2 < 1.0, 1.0, 0.05).astype(np.float32)
    for k in range(6):                                 # hot spots
        cz, cy, cx = rng.uniform(0.1, 0.9), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)
        pet += 8.0 * np.exp(-((zz - cz) ** 2 * 40 + (yy - cy) ** 2 * 20 + (xx - cx) ** 2 * 20))
    pet_img = sitk.GetImageFromArray(pet)
    pet_img.SetSpacing((4.0, 4.0, 4.0))
    pet_img.SetOrigin((1.5, -2.0, 2.5))
    folder.mkdir(parents=True, exist_ok=True)
    a_path, f_path = folder / "anatomical.nrrd", folder / "pet.nrrd"
    sitk.WriteImage(anat, str(a_path), useCompression=False)
    sitk.WriteImage(pet_img, str(f_path), useCompression=False)
    return str(a_path), str(f_path)


def child(anatomical: str, functional: str, method: str, metric_set: str, out_dir: str) -> dict:
    """One ``medicalfusion fuse`` run in this process: peak memory beyond the inputs, seconds."""
    import SimpleITK as sitk  # noqa: PLC0415

    from MedicalFusionLib import cli  # noqa: PLC0415
    from MedicalFusionLib.io import read as sources  # noqa: PLC0415

    import resource  # noqa: PLC0415

    def cpu() -> float:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return use.ru_utime + use.ru_stime

    state = {"reads": 0, "base": 0, "reset": False, "t_read": None, "cpu_read": None}
    read_source = sources.read_source

    def counted_read(*a, **k):
        out = read_source(*a, **k)
        state["reads"] += 1
        if state["reads"] == 2:          # both inputs in memory: count memory from here
            state["reset"] = _reset_peak()
            state["base"] = _rss_bytes("VmRSS")
            state["t_read"] = time.perf_counter()
            state["cpu_read"] = cpu()
        return out

    sources.read_source = counted_read
    out = pathlib.Path(out_dir)
    t0 = time.perf_counter()
    rc = cli.main(["fuse", "-a", anatomical, "-f", functional, "-m", method, "-o", str(out / "fused.nrrd"),
                   "--metrics", str(out / "metrics.csv"), "--metric-set", metric_set, "-q"])
    t_end = time.perf_counter()
    cpu_end = cpu()
    if rc != 0:
        raise SystemExit(f"medicalfusion fuse exited with {rc}")
    if not state["reset"]:
        raise SystemExit("cannot reset the peak-RSS counter (/proc/self/clear_refs): no figure")
    peak = _rss_bytes("VmHWM")
    fused = sitk.ReadImage(str(out / "fused.nrrd"))
    return {"extra_mb": max(0, peak - state["base"]) / 2**20, "base_mb": state["base"] / 2**20,
            "total_s": t_end - t0, "after_read_s": t_end - state["t_read"], "cpu_s": cpu_end - state["cpu_read"],
            "output_size": list(fused.GetSize())}


def predicted_mb(row: dict, method: str, metric_set: str) -> float | None:
    """What the pipeline's up-front estimate (:func:`MedicalFusionLib.pipeline.memory_needed`, the
    figure a study is refused on) says the run needs beyond its inputs (MB)."""
    try:
        from MedicalFusionLib.pipeline import FusionOptions, memory_needed  # noqa: PLC0415
    except ImportError:        # a tree without the estimate (a run of the code before it)
        return None
    size = tuple(int(v) for v in row["size"].split("x"))
    return memory_needed(size, row["voxel_bytes"], row["functional_voxels"],
                         FusionOptions(method=method, metric_set=metric_set)) / 2**20


def run(size: str, folder: pathlib.Path, method: str, metric_set: str, python: str) -> dict | None:
    dims = tuple(int(v) for v in size.split("x"))
    t = time.perf_counter()
    anatomical, functional = make_inputs(dims, folder / size)
    made = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=str(folder)) as out:
        cmd = [python, __file__, "--child", anatomical, functional, "--method", method,
               "--metric-set", metric_set, "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{size}: failed\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    voxels = dims[0] * dims[1] * dims[2]
    import SimpleITK as sitk  # noqa: PLC0415

    reader = sitk.ImageFileReader()
    facts = []
    for p in (anatomical, functional):
        reader.SetFileName(p)
        reader.ReadImageInformation()
        facts.append((int(np.prod(reader.GetSize())), sitk.GetPixelIDValueAsString(reader.GetPixelID()),
                      reader.GetNumberOfComponents()))
    row.update(size=size, voxels=voxels, inputs_s=made, budget_mb=FIXED_MB + PER_VOXEL * voxels / 2**20,
               anatomical_type=facts[0][1], voxel_bytes=2 if "16" in facts[0][1] else 1,
               functional_voxels=facts[1][0] * facts[1][2], method=method, metric_set=metric_set,
               load=round(os.getloadavg()[0], 1), when=time.strftime("%H:%M UTC", time.gmtime()))
    for p in (anatomical, functional):
        pathlib.Path(p).unlink()
    return row


def report(rows: list[dict], command: str, method: str, metric_set: str) -> str:
    lines = [
        "## Memory and time against the volume size (issue 21, Scale)", "",
        f"Command: `{command}` (also run by `make bench`).",
        machine_line("One fresh child process per size; 2 torch threads unless OMP_NUM_THREADS says otherwise."),
        "",
        f"Each run is `medicalfusion fuse -a anatomical.nrrd -f pet.nrrd -m {method} -o fused.nrrd --metrics metrics.csv "
        f"--metric-set {metric_set}` on generated inputs (a uint8 anatomical on a 1 mm grid, or for the long CT an "
        "int16 CT in HU on 0.8 x 0.8 x 1 mm, with a float32 4 mm PET, written uncompressed). Beyond inputs: peak "
        "resident memory after both inputs were read, minus the resident memory then. Budget: 1 GB + 16 bytes per "
        "anatomical voxel. Predicted: `pipeline.study_memory` for the same inputs (what a study is refused on). "
        "Seconds after the inputs were read (fuse + metrics + write), wall and CPU (user + system, all threads: "
        "less inflated by the other jobs on the machine than the wall time), and CPU seconds per million voxels.",
        "",
        "| anatomical | voxels (M) | MB beyond inputs | budget MB | within | predicted MB | s after reading | CPU s | CPU s per M voxels | load at the end |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        mv = r["voxels"] / 1e6
        predicted = predicted_mb(r, method, metric_set)
        pred = "n/a" if predicted is None else f"{predicted:.0f}"
        lines.append(f"| {r['size']} | {mv:.1f} | {r['extra_mb']:.0f} | {r['budget_mb']:.0f} | "
                     f"{'yes' if r['extra_mb'] <= r['budget_mb'] else 'NO'} | {pred} | {r['after_read_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r['cpu_s'] / mv:.3f} | {r.get('load', 'n/a')} ({r.get('when', '')}) |")
    lines += [
        "",
        "Before the pipeline streamed (commit fb3d8fd), the same 256x256x180 run, in the same minutes and load: "
        "1264 MB beyond the inputs (about 110 bytes an anatomical voxel), 91.4 CPU s (streamed: 96.0); a "
        "700x700x700 uint8 study was killed after 240 s at 11 GB and growing. Where that memory went: whole-volume float32 copies of the normalised anatomical (4 bytes a voxel) and of the "
        "resampled functional (4), its YCbCr (12), colour-map levels and bone mask (1 + 1), the fused luma (4), "
        "the 8-bit sources and fused grey for the metrics (3), and the colour metrics' per-voxel values kept as "
        "float64 and int64 (hue, chroma ratio, read-back error, position: up to 40 bytes a coloured voxel), then "
        "the RGB result (3), its SimpleITK copy for writing (3) and the read-back check (3). Now a run holds the "
        "RGB result, the colour metrics' chroma ratio (float32), read-back error (int16) and bone flag per "
        "coloured voxel (7 bytes at most), and one slab of about 4 M voxels at a time (pipeline.STREAM_VOXELS); "
        "writing adds the file's copy and the read-back (6 bytes a voxel) once the metrics' values are gone."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", help="write the 'memory' section (or --section) of this markdown report")
    p.add_argument("--section", default=SECTION)
    p.add_argument("--sizes", nargs="*", default=list(DEFAULT_SIZES), help="anatomical sizes XxYxZ")
    p.add_argument("--method", default="lp")
    p.add_argument("--metric-set", default="quick", help="the CLI's --metric-set (default quick: fuse's default)")
    p.add_argument("--work", help="folder for the generated inputs (default: a temporary folder)")
    p.add_argument("--json", help="also append each row as a JSON line to this file")
    p.add_argument("--rows", nargs="*", help="write the report from rows saved by --json instead of running")
    p.add_argument("--child", nargs=2, metavar=("ANATOMICAL", "FUNCTIONAL"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.method, args.metric_set, args.out)))
        return
    rows = []
    if args.rows:              # runs made earlier (e.g. the large sizes, each in its own background job)
        for path in args.rows:
            rows += [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if line]
        rows.sort(key=lambda r: r["voxels"])
        args.sizes = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-inputs-", dir=args.work) as work:
        for size in args.sizes:
            row = run(size, pathlib.Path(work), args.method, args.metric_set, sys.executable)
            if row is None:
                continue
            rows.append(row)
            print(f"{size:14s} {row['extra_mb']:7.0f} MB beyond inputs (budget {row['budget_mb']:.0f}), "
                  f"{row['after_read_s']:.1f} s after reading", flush=True)
            if args.json:
                with open(args.json, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
    if args.output and rows:
        command = " ".join(["python scripts/bench_memory.py"] + (argv if argv is not None else sys.argv[1:]))
        if args.rows:
            sizes = " ".join(r["size"] for r in rows)
            command = (f"python scripts/bench_memory.py --sizes SIZE --json rows.jsonl` for each of {sizes} "
                       f"(in the background, one job a size), then `{command}")
        replace_section(args.output, args.section, report(rows, command, args.method, args.metric_set))
        print(f"wrote section '{args.section}' of {args.output}")


if __name__ == "__main__":
    main()
