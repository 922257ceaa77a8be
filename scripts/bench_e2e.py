"""End to end, from files in to files out with metrics: every method on the real STS cases (DICOM,
PET -> CT and PET -> MR), the spm12 T1 + PET pair, the MNI demo sample and a synthetic 256x256x180
anatomical with a PET; the 'e2e' section of docs/BENCHMARKS.md.

Run: make bench   (or: python scripts/bench_e2e.py --output docs/BENCHMARKS.md [--methods mrdfn lp]
     [--cases synthetic-256 STS_001-CT] [--threads 2] [--device auto])

Each (case, method) runs in a fresh child process that calls the command line itself
(``medicalfusion fuse ... -o fused.nrrd --metrics metrics.csv``, i.e. ``cli.main``), so the figures
follow whatever the pipeline and metrics on the branch do. Phases are timed by wrapping, in the
child only, the functions the command calls: ``io.read.read_source`` (read), ``pipeline.prepare``
(align: checks, resampling onto the anatomical grid, windows, colour; with ``Prepared.slab``, the
voxels of each streamed slab made inside the run by its own thread: slabs made ahead on a CPU
worker while another is fused are not counted) and ``pipeline._fuse_prepared`` (fuse = the engine and
recombination, ``FusionResult.seconds``; metrics = the rest of that call but the slabs' voxels);
write = what the command does after that (fused volume, metadata, metrics CSV). Process start and
imports are not counted; loading a network's weights is (in fuse).

Memory: after the two inputs are read, the child resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and notes its RSS; "beyond inputs" is the peak RSS after that minus that
RSS. Inputs are made before the children run (synthetic and demo cases written to a temporary
folder with fixed seeds), so every run reads the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO / "scripts"))

from benchdoc import machine_line, replace_section  # noqa: E402

SECTION = "e2e"
TARGET_SECONDS = 5.0          # mrdfn, 256x256x180 anatomical with a PET, end to end with metrics
TARGET_EXTRA_MB = 2048.0      # any method, beyond its inputs
TARGET_FLOOR_RATIO = 10.0     # mrdfn on the MNI demo with metrics, against the I/O floor (issue 21)
STS_PATIENTS = ("STS_001", "STS_002", "STS_003")


# --------------------------------------------------------------------------------------------------
# the cases: name -> (anatomical path, functional path)


def make_cases(data: pathlib.Path, work: pathlib.Path, wanted: list[str] | None) -> dict[str, tuple[str, str]]:
    import SimpleITK as sitk  # noqa: PLC0415

    from MedicalFusionLib.sample import phantom_head, simulate_pet, write_sample  # noqa: PLC0415

    def want(name: str) -> bool:
        return not wanted or name in wanted

    cases: dict[str, tuple[str, str]] = {}
    if want("synthetic-256"):
        t1, gm, wm = phantom_head((256, 256, 180), spacing=1.0)
        pet = simulate_pet(gm, wm, seed=0, spacing=4.0, tilt_deg=12.0)
        folder = work / "synthetic-256"
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(t1, str(folder / "t1.nrrd"), useCompression=True)
        sitk.WriteImage(pet, str(folder / "pet.nrrd"), useCompression=True)
        cases["synthetic-256"] = (str(folder / "t1.nrrd"), str(folder / "pet.nrrd"))
    for patient in STS_PATIENTS:
        for anatomical in ("CT", "MR_T1"):
            name = f"{patient}-{anatomical.split('_')[0]}"
            pet = data / "sts" / patient / "PET" / "dicom"
            if want(name) and pet.is_dir():
                cases[name] = (str(data / "sts" / patient / anatomical / "dicom"), str(pet))
    if want("spm12") and (data / "spm12" / "PET.nii").is_file():
        cases["spm12"] = (str(data / "spm12" / "T1.nii"), str(data / "spm12" / "PET.nii"))
    if want("mni-demo"):
        anat, func = write_sample(work / "mni-demo", seed=0)
        cases["mni-demo"] = (str(anat), str(func))
    return cases


# --------------------------------------------------------------------------------------------------
# the child: one run of the command with timed phases


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")            # resets VmHWM (the peak RSS) to the current RSS
        return True
    except OSError:
        return False


def child(anatomical: str, functional: str, method: str, device: str, out_dir: str, metric_set: str = "all") -> dict:
    import resource  # noqa: PLC0415

    import SimpleITK as sitk  # noqa: PLC0415

    from MedicalFusionLib import cli, pipeline  # noqa: PLC0415
    from MedicalFusionLib.io import read as sources  # noqa: PLC0415

    phases = {"read": 0.0, "align": None, "fuse": None, "metrics": None}
    state = {"reads": 0, "base": 0, "reset": False, "fused_seconds": None, "slabs": 0.0}
    read_source, prepare, fuse_prepared = sources.read_source, pipeline.prepare, pipeline._fuse_prepared
    make_slab = pipeline.Prepared.slab

    def timed_read(*a, **k):
        t = time.perf_counter()
        out = read_source(*a, **k)
        phases["read"] += time.perf_counter() - t
        state["reads"] += 1
        if state["reads"] == 2:          # both inputs in memory: count memory from here
            state["reset"] = _reset_peak()
            state["base"] = _rss_bytes("VmRSS")
        return out

    def timed_prepare(*a, **k):
        t = time.perf_counter()
        out = prepare(*a, **k)
        phases["align"] = time.perf_counter() - t
        return out

    def timed_slab(*a, **k):          # the voxels of a slab (resampling, windows, colour): align too
        t = time.perf_counter()
        out = make_slab(*a, **k)
        if threading.current_thread() is threading.main_thread():   # not a slab made ahead on a worker
            state["slabs"] += time.perf_counter() - t
        return out

    def timed_fuse(*a, **k):
        t = time.perf_counter()
        slabs = state["slabs"]
        result = fuse_prepared(*a, **k)
        total = time.perf_counter() - t
        made = state["slabs"] - slabs
        phases["align"] = (phases["align"] or 0.0) + made
        phases["fuse"] = result.seconds
        phases["metrics"] = max(0.0, total - result.seconds - made)
        return result

    # fuse_images (what the command calls) and fuse_prepared both run _fuse_prepared
    sources.read_source, pipeline.prepare, pipeline._fuse_prepared = timed_read, timed_prepare, timed_fuse
    pipeline.Prepared.slab = timed_slab
    out = pathlib.Path(out_dir)
    t0 = time.perf_counter()
    measure = [] if metric_set == "none" else ["--metrics", str(out / "metrics.csv"), "--metric-set", metric_set]
    rc = cli.main(["fuse", "-a", anatomical, "-f", functional, "-m", method, "--device", device,
                   "-o", str(out / "fused.nrrd"), *measure, "-q"])
    total = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"medicalfusion fuse exited with {rc}")
    known = [v for k, v in phases.items() if v is not None]
    peak = _rss_bytes("VmHWM") if state["reset"] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fused = sitk.ReadImage(str(out / "fused.nrrd"))
    return {**phases, "write": max(0.0, total - sum(known)), "total": total,
            "extra_mb": max(0, peak - state["base"]) / 2**20, "peak_exact": state["reset"],
            "size": list(fused.GetSize())}


def floor_child(anatomical: str, functional: str, out_dir: str) -> dict:
    """The I/O floor of a case (issue 21): plain SimpleITK reading both inputs, resampling the
    functional onto the anatomical grid (linear) and writing an RGB uint8 gzip NRRD of the
    anatomical's size (at the pipeline's compression level), nothing else."""
    import SimpleITK as sitk  # noqa: PLC0415

    from MedicalFusionLib.io.outputs import COMPRESSION_LEVEL  # noqa: PLC0415

    def read(path: str) -> sitk.Image:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(path))
            return reader.Execute()
        return sitk.ReadImage(path)

    t0 = time.perf_counter()
    a = read(anatomical)
    f = read(functional)
    if a.GetNumberOfComponentsPerPixel() > 1:
        a = sitk.VectorIndexSelectionCast(a, 0)
    if f.GetNumberOfComponentsPerPixel() > 1:
        f = sitk.VectorIndexSelectionCast(f, 0)
    a8 = sitk.Cast(sitk.RescaleIntensity(a, 0, 255), sitk.sitkUInt8)
    f_on_a = sitk.Resample(f, a, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    f8 = sitk.Cast(sitk.RescaleIntensity(f_on_a, 0, 255), sitk.sitkUInt8)
    sitk.WriteImage(sitk.Compose(f8, a8, a8), str(pathlib.Path(out_dir) / "floor.nrrd"), True, COMPRESSION_LEVEL)
    return {"floor": time.perf_counter() - t0}


def run_floor(anatomical: str, functional: str) -> float | None:
    """Seconds of :func:`floor_child` in a fresh process (imports not counted)."""
    with tempfile.TemporaryDirectory(prefix="bench-e2e-floor-") as out:
        proc = subprocess.run([sys.executable, __file__, "--floor", anatomical, functional, "--out", out],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"floor of {anatomical}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["floor"]


def run_case(name: str, anatomical: str, functional: str, method: str, device: str, threads: int | None,
             functional_size: list[int], metric_set: str = "all") -> dict | None:
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as out:
        cmd = [sys.executable, __file__, "--child", anatomical, functional, "--method", method,
               "--device", device, "--out", out, "--metric-set", metric_set]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{name} {method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(case=name, method=method, functional_size=functional_size)
    return row


# --------------------------------------------------------------------------------------------------
# the report


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def report(rows: list[dict], command: str, threads: int, device: str, metric_set: str = "all") -> str:
    import torch  # noqa: PLC0415

    lines = [
        "## End to end: files in, files out, with metrics"
        + {"all": "", "none": " (no metrics: `--metrics` left out)"}.get(
            metric_set, f" (metric set '{metric_set}': every metric but FMI)"), "",
        f"Command: `{command}` (also run by `make bench`).",
        machine_line(f"torch {torch.__version__} with {threads} threads, device {device}; one child process per run."),
        "",
        "Each run is `medicalfusion fuse -a ANATOMICAL -f FUNCTIONAL -m METHOD -o fused.nrrd --metrics metrics.csv --metric-set SET` "
        "in a fresh process (imports not counted). read: both inputs (DICOM series, NIfTI, NRRD); align: "
        "checks, resampling onto the anatomical grid, windows and colour (also while slabs stream); fuse: the engine and recombination; "
        "metrics: the metrics table; write: fused NRRD with metadata and the CSV. Memory: peak resident memory "
        "beyond the two inputs (kernel peak-RSS counter reset after reading). Seconds; other jobs on the "
        "machine inflate them (see the load above).",
        "",
        "I/O floor: plain SimpleITK reading both inputs, resampling the functional onto the anatomical grid "
        "and writing an RGB gzip NRRD (same compression level), in a fresh process per case; x floor: total / floor.",
        "",
        "| case | anatomical | functional | method | read | align | fuse | metrics | write | total | MB beyond inputs "
        "| I/O floor | x floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = r.get("floor")
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['size']))} | {'x'.join(map(str, r['functional_size']))} | "
                     f"{r['method']} | {_fmt(r['read'])} | {_fmt(r['align'])} | {_fmt(r['fuse'])} | "
                     f"{_fmt(r['metrics'])} | {_fmt(r['write'])} | {_fmt(r['total'])} | {r['extra_mb']:.0f} | "
                     f"{_fmt(floor)} | {_fmt(r['total'] / floor if floor else None)} |")
    target = [r for r in rows if r["case"] == "synthetic-256" and r["method"] == "mrdfn"]
    lines += ["", "Targets on this CPU:", ""]
    if target:
        t = target[0]["total"]
        lines.append(f"- `mrdfn`, 256x256x180 anatomical with a PET, end to end with metrics <= {TARGET_SECONDS:.0f} s: "
                     f"{t:.2f} s ({'met' if t <= TARGET_SECONDS else 'NOT met'}).")
    demo = [r for r in rows if r["case"] == "mni-demo" and r["method"] == "mrdfn" and r.get("floor")]
    if demo and metric_set != "none":
        ratio = demo[0]["total"] / demo[0]["floor"]
        lines.append(f"- `mrdfn` on the MNI demo with metrics within {TARGET_FLOOR_RATIO:.0f}x the I/O floor: "
                     f"{demo[0]['total']:.2f} s / {demo[0]['floor']:.2f} s = {ratio:.1f}x "
                     f"({'met' if ratio <= TARGET_FLOOR_RATIO else 'NOT met'}).")
    if rows:
        worst = max(rows, key=lambda r: r["extra_mb"])
        lines.append(f"- every method <= {TARGET_EXTRA_MB:.0f} MB beyond its inputs: largest {worst['extra_mb']:.0f} MB "
                     f"({worst['method']} on {worst['case']}; {'met' if worst['extra_mb'] <= TARGET_EXTRA_MB else 'NOT met'}).")
    lines += ["", "Cases: STS_00N-CT / -MR are the real TCIA soft-tissue-sarcoma studies (see docs/CLINICAL.md), "
              "read from their DICOM folders (PET in SUV); spm12 is the SPM12 T1 + PET template pair; mni-demo is "
              "`make demo`'s sample (MNI152 1 mm + a simulated 4 mm PET); synthetic-256 is a 256x256x180 1 mm "
              "phantom with a simulated 4 mm PET on a tilted grid (scripts/bench.py's case), written to NRRD first."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", help="write the report section into this markdown file (make bench: "
                   "docs/BENCHMARKS.md); without it, the figures are only printed")
    p.add_argument("--methods", nargs="*", help="methods to run (default: every available method)")
    p.add_argument("--cases", nargs="*", help="cases to run (default: all): synthetic-256 STS_001-CT STS_001-MR "
                   "... spm12 mni-demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads in each run (default: torch's choice)")
    p.add_argument("--data", default=os.environ.get("MEDICALFUSION_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--child", nargs=2, metavar=("ANATOMICAL", "FUNCTIONAL"), help=argparse.SUPPRESS)
    p.add_argument("--floor", nargs=2, metavar=("ANATOMICAL", "FUNCTIONAL"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--metric-set", default="all", help="the CLI's --metric-set: all (default) or quick (no FMI); none: no --metrics at all")
    p.add_argument("--section", default=SECTION, help=f"section of the output file (default {SECTION})")
    args = p.parse_args()
    import torch  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.floor:
        print(json.dumps(floor_child(args.floor[0], args.floor[1], args.out)))
        return
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.method, args.device, args.out, args.metric_set)))
        return
    from MedicalFusionLib.methods import all_methods  # noqa: PLC0415
    from MedicalFusionLib.io.read import read_source  # noqa: PLC0415

    methods = args.methods or [m.name for m in all_methods() if m.available()[0]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-inputs-") as work:
        cases = make_cases(pathlib.Path(args.data), pathlib.Path(work), args.cases)
        for name, (anatomical, functional) in cases.items():
            fsize = list(read_source(functional, "functional").image.GetSize())
            floor = run_floor(anatomical, functional)
            for method in methods:
                row = run_case(name, anatomical, functional, method, args.device, args.threads, fsize, args.metric_set)
                if row:
                    row["floor"] = floor
                    rows.append(row)
                    print(f"{name:14s} {method:12s} total {row['total']:6.2f} s  (read {_fmt(row['read'])}, align "
                          f"{_fmt(row['align'])}, fuse {_fmt(row['fuse'])}, metrics {_fmt(row['metrics'])}, write "
                          f"{_fmt(row['write'])})  {row['extra_mb']:.0f} MB; I/O floor {_fmt(floor)} s", flush=True)
    command = " ".join(["python scripts/bench_e2e.py"] + sys.argv[1:])
    if args.output:
        replace_section(args.output, args.section,
                        report(rows, command, torch.get_num_threads(), args.device, args.metric_set))
        print(f"wrote section '{args.section}' of {args.output}")


if __name__ == "__main__":
    main()
