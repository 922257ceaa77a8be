"""PACS round trip: pull + fuse + store of one sts study through a real Orthanc (DICOMweb), the time
of each phase.

Orthanc (scripts/orthanc.py) is started on 127.0.0.1 with a login, loaded with the patient's CT and
PET; then, per repeat, the phases the command ``medicalfusion fuse --pacs URL --anatomical-series CT
--functional-series PET -m METHOD --store`` goes through are timed one by one with the package's
own functions (QIDO + WADO-RS of both series into a temporary folder; reading them as any DICOM
folder, PET in SUV; the fusion; the DICOM Secondary Capture series; STOW-RS + the QIDO check of what
was stored), and the whole command is timed as a separate process (Python start and imports
included). The stored series is deleted after each repeat.

    python scripts/bench_pacs.py [--patient STS_001] [--method lp] [--repeats 3] [--output docs/BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO / "scripts"))

PHASES = ("pull (QIDO + WADO-RS, 2 series)", "read (DICOM reader, SUV/HU)", "fuse", "DICOM series (SC)",
          "store (STOW-RS + QIDO check)")


def main(argv=None) -> int:
    from benchdoc import command_line, common_arguments, machine_line, replace_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "pacs", REPO)
    parser.add_argument("--patient", default="STS_001")
    parser.add_argument("--method", default="lp")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import orthanc
    from MedicalFusionLib.io import dicom_export, pacs
    from MedicalFusionLib.cli import build_parser, run_fuse
    from MedicalFusionLib.io.outputs import OutputSet
    from MedicalFusionLib.io.read import read_source

    study = pathlib.Path(args.data) / "sts" / args.patient
    user, password = "bench", secrets.token_hex(8)
    os.environ["MEDICALFUSION_PACS_USER"], os.environ["MEDICALFUSION_PACS_PASSWORD"] = user, password
    times = {p: [] for p in PHASES}
    whole = []
    with orthanc.Orthanc(user=user, password=password) as server:
        server.upload(study / "CT" / "dicom", study / "PET" / "dicom")
        uids = {v[2]: k for k, v in server.series_uids().items()}
        ct = next(uid for d, uid in uids.items() if "_CT_" in d)
        pet = next(uid for d, uid in uids.items() if "_PET_" in d)
        size = None
        for _ in range(args.repeats):
            fuse_args = build_parser().parse_args(
                ["fuse", "--pacs", server.dicomweb, "--anatomical-series", ct, "--functional-series", pet,
                 "-m", args.method, "--store", "-q"])
            tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-pacs-"))
            try:
                client = pacs.Pacs(server.dicomweb)
                t0 = time.perf_counter()
                a_dir = client.retrieve_series(ct, tmp / "a", "anatomical")
                f_dir = client.retrieve_series(pet, tmp / "f", "functional")
                t1 = time.perf_counter()
                anat, func = read_source(a_dir, "anatomical"), read_source(f_dir, "functional")
                t2 = time.perf_counter()
                with OutputSet() as out:
                    result = run_fuse(fuse_args, anat, func, out, {})
                t3 = time.perf_counter()
                datasets = dicom_export.fused_series(result, anat, func)
                t4 = time.perf_counter()
                stored = client.store_series(datasets)
                t5 = time.perf_counter()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            size = anat.image.GetSize()
            for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[phase].append(dt)
            server.delete_series(stored.series_uid)
            env = dict(os.environ, PYTHONPATH=str(REPO / "MedicalFusion"))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "MedicalFusionLib.cli", "fuse", "--pacs", server.dicomweb,
                                   "--anatomical-series", ct, "--functional-series", pet, "-m", args.method,
                                   "--store", "-q"] + (["--threads", str(args.threads)] if args.threads else []),
                                  env=env, capture_output=True, text=True)
            whole.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise SystemExit(f"the command failed: {proc.stderr.strip()}")
            for uid, (_st, _n, description) in server.series_uids().items():
                if description.startswith("Fused"):
                    server.delete_series(uid)
    rows = [f"| {phase} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |" for phase, v in times.items()]
    total = [sum(v[i] for v in times.values()) for i in range(args.repeats)]
    rows.append(f"| **phases together** | {statistics.median(total):.2f} | {min(total):.2f} | {max(total):.2f} |")
    rows.append(f"| the whole command (new process: start, imports, all of the above) | {statistics.median(whole):.2f} "
                f"| {min(whole):.2f} | {max(whole):.2f} |")
    body = "\n".join([
        "## PACS round trip: pull + fuse + store of one study (Orthanc, DICOMweb)",
        "",
        f"`{command_line('bench_pacs.py', argv)}`: sts {args.patient} (CT {size[0]}x{size[1]}x{size[2]} as the "
        f"anatomical, its PET as the functional, method {args.method}), Orthanc "
        "(Debian orthanc 1.10 + orthanc-dicomweb) on 127.0.0.1 with a login, started by scripts/orthanc.py; "
        f"seconds, median / min / max of {args.repeats} repeats. The phases are timed in one process with the "
        "functions the command calls; the last row is the command itself in a new process.",
        "",
        "| phase | median (s) | min (s) | max (s) |",
        "|---|---|---|---|",
        *rows,
        "",
        machine_line(f"torch threads: {args.threads or 'default'}."),
    ])
    print(body)
    if args.output:
        replace_section(args.output, args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
