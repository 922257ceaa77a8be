#!/usr/bin/env python
"""Accuracy of registration on demand (MedicalFusionLib.registration) against known misalignments.

Each pair is aligned in the data (sts: co-registered upstream in world coordinates; spm12: templates
on one grid). For every trial the functional's geometry is moved by a known random rigid transform G
(rotations uniform in +-10 degrees about each axis through the functional's centre, translations
uniform in +-20 mm along each axis; numpy seeded per trial), without resampling its voxels. The
registration then estimates T (anatomical point -> functional point); the truth is G. The target
registration error of an anatomical point x is |T(x) - G(x)| in mm, over the region's voxels: the
tumour mask (sts, gtv_mask.nii.gz on the anatomical's grid) or the brain (spm12: T1 above its Otsu
threshold, holes filled, eroded by 10 mm). Reported per pair: median and 95th percentile of the TRE
per trial, their median and worst over the trials, and the seconds of register() (reading excluded,
wall and process CPU). Each pair is also registered once without misalignment: where that ends is
what mutual information takes for aligned; each trial's TRE measured from it ("from the reference")
tells whether the registration finds the same answer from a misaligned start, apart from where the
metric's optimum lies.

Targets (issue 14): median TRE below half the functional's voxel size for PET/SPECT, below 1 mm for
MR->CT and T2->T1; 95th percentile below one functional voxel; under 10 s per pair. The voxel size
of an anisotropic grid is the cube root of the voxel volume (geometric mean of the spacings).

    python scripts/bench_registration.py [--data ../shared/data] [--trials 5] [--kind rigid]
        [--pairs sts/PET-CT ...] [--set name=value ...] [--output docs/BENCHMARKS.md]

``--set`` overrides a RegistrationSettings field (e.g. --set samples=40000 --set shrink_factors=4,2,1)
to compare settings. Without --output the table is printed only.

Cases with a true alignment by construction, ours against the tools users would pick instead
(issue #20), one section each (registration-<case>):

    python scripts/bench_registration.py --cases hybrid synthetic-mr spm12-t2 --peers elastix ants
        --peers-python .venv-bench/bin/python --trials 5 --threads 1 [--output docs/BENCHMARKS.md]

- hybrid: PET -> CT of the sts patients (one hybrid PET/CT session, one FrameOfReferenceUID: the
  scanner's alignment is the truth); TRE over the tumour (the CT's GTV mask);
- synthetic-mr: CT -> an MR-like image made from the same CT (:func:`synthetic_mr`: a documented
  non-monotonic map of air, fat, water/muscle and bone, a smooth bias field, Rician noise), which is
  the registration ``--register-with CT`` performs; TRE over the tumour;
- spm12-t2: T2 -> T1 templates (one grid; aligned by normalisation); TRE over the brain.

Every trial moves the functional (the moving image) by the same known random rigid transform
for every tool (up to 10 degrees about each axis and 20 mm along each, seeds 1000 and up); the
peers (scripts/registration_peers.py: elastix's default rigid map, ANTs' Rigid) run in their own
venv on the same two images written as NRRD. Reported per tool: TRE (mm; per trial the median
over the region) median / 95th percentile / worst over the trials, seconds (the registration
alone) median / worst, refusals; for ours also the warnings (uncertain spread) and the accepted
results more than 10 mm off without one.

The peers take 3-5x ours' CPU time. ``--cache DIR`` keeps every tool's per-trial results
(DIR/<case>.<tool>.<pid>.json) and takes a peer's trial from there instead of running it again (its
result does not depend on our code); ``--run`` says which tools run (the others come from the cache
only), ``--patients`` picks sts patients and ``--peer-trials`` runs the peers on the first N trials
only. So the peers can run once, each pair in its own process, and ours after every change:

    ... --cases hybrid --patients STS_002 --trials 5 --cache /tmp/peers --run elastix ants
    ... --cases hybrid --trials 5 --cache /tmp/peers --run ours
    ... --cases hybrid --trials 5 --cache /tmp/peers --run elastix ants --output docs/BENCHMARKS.md

(the last one finds everything in the cache and writes the table; a table is written only when
every tool has every trial).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import time

import numpy as np
import SimpleITK as sitk

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO / "scripts"))

from MedicalFusionLib.errors import FusionError  # noqa: E402
from MedicalFusionLib.io.read import read_source  # noqa: E402
from MedicalFusionLib.registration import RegistrationSettings, affine_matrix, moved_geometry, register  # noqa: E402

SECTION = "registration"
STS_PATIENTS = ("STS_001", "STS_002", "STS_003")
# (name, functional, anatomical, mask image, PET/SPECT?)
STS_PAIRS = (("PET-CT", "PET", "CT", True), ("PET-MR", "PET", "MR_T1", True), ("MR-CT", "MR_T1", "CT", False))
SPM_PAIRS = (("PET-T1", "PET", True), ("SPECT-T1", "SPECT", True), ("T2-T1", "T2", False))


def brain_mask(t1: sitk.Image) -> sitk.Image:
    mask = sitk.BinaryFillhole(sitk.OtsuThreshold(t1, 0, 1))
    radius = [max(1, int(round(10.0 / s))) for s in t1.GetSpacing()]
    return sitk.BinaryErode(mask, radius)


def region_points(mask: sitk.Image) -> np.ndarray:
    """Physical (LPS) points of the mask's voxels, N x 3."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(float)   # (i, j, k)
    spacing = np.array(mask.GetSpacing())
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    return np.array(mask.GetOrigin()) + (idx * spacing) @ direction.T


def random_rigid(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """4x4 rigid: rotations uniform +-10 deg about x, y, z through ``centre``, translation +-20 mm."""
    ax, ay, az = np.deg2rad(rng.uniform(-10.0, 10.0, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx
    m[:3, 3] = centre + rng.uniform(-20.0, 20.0, 3) - m[:3, :3] @ centre
    return m


def centre_of(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()]))


def voxel_size(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) ** (1.0 / 3.0)


def load_pairs(data: pathlib.Path, wanted: list[str] | None):
    """Yield (name, anatomical, functional, region points, target median, target p95, functional voxel)."""
    sts, spm = data / "sts", data / "spm12"
    spm_wanted = not wanted or any(w.startswith("spm12/") for w in wanted)
    if spm_wanted and (spm / "T1.nii").is_file():
        t1 = sitk.ReadImage(str(spm / "T1.nii"))
        pts = region_points(brain_mask(t1))
        for name, func, is_nuclear in SPM_PAIRS:
            key = f"spm12/{name}"
            if wanted and key not in wanted:
                continue
            f = sitk.ReadImage(str(spm / f"{func}.nii"))
            v = voxel_size(f)
            yield key, t1, f, pts, (v / 2.0 if is_nuclear else 1.0), v, v
    elif spm_wanted:
        print(f"spm12 not found in {spm}: skipped", file=sys.stderr)
    for patient in STS_PATIENTS:
        root = sts / patient
        if not root.is_dir():
            print(f"sts not found in {sts}: skipped", file=sys.stderr)
            break
        images = {}
        for name, func, anat, is_nuclear in STS_PAIRS:
            key = f"sts/{patient}/{name}"
            if wanted and key not in wanted and f"sts/{name}" not in wanted:
                continue
            for m in (func, anat):
                if m not in images:
                    # as `medicalfusion fuse --register` reads them (checked; PET in SUV)
                    images[m] = read_source(root / m / "dicom", "functional" if m == func else "anatomical").image
            mask = sitk.ReadImage(str(root / anat / "gtv_mask.nii.gz"))
            v = voxel_size(images[func])
            yield key, images[anat], images[func], region_points(mask), (v / 2.0 if is_nuclear else 1.0), v, v


def parse_settings(pairs: list[str]) -> RegistrationSettings:
    settings = RegistrationSettings()
    fields = {f.name: f for f in dataclasses.fields(RegistrationSettings)}
    for item in pairs or []:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown setting {key}: one of {', '.join(fields)}")
        current = getattr(settings, key)
        if isinstance(current, tuple):
            setattr(settings, key, tuple(type(current[0])(v) for v in value.split(",")))
        else:
            setattr(settings, key, type(current)(value))
    return settings


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:3, :3].T + m[:3, 3]


def trial(anat, func, points, g, kind, settings, reference=None):
    """Register the functional moved by ``g``. Returns a dict: median and p95 TRE against the truth
    ``g``; the same against ``g`` after the registration's own answer without misalignment
    (``reference``, a 4x4; 'self'); the estimated 4x4; wall and CPU seconds; the error or ''."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = {"med": float("nan"), "p95": float("nan"), "self_med": float("nan"), "self_p95": float("nan"),
           "matrix": None, "error": ""}
    try:
        reg = register(anat, moved_geometry(func, g), kind=kind, settings=settings)
    except FusionError as exc:
        out["error"] = str(exc)
    out["sec"], out["cpu"] = time.perf_counter() - t0, time.process_time() - c0
    if out["error"]:
        return out
    t = affine_matrix(reg.transform)
    est = apply(t, points)
    tre = np.linalg.norm(est - apply(g, points), axis=1)
    out.update(med=float(np.median(tre)), p95=float(np.percentile(tre, 95)), matrix=t)
    if reference is not None:
        self_tre = np.linalg.norm(est - apply(g @ reference, points), axis=1)
        out.update(self_med=float(np.median(self_tre)), self_p95=float(np.percentile(self_tre, 95)))
    return out


def fmt(x: float) -> str:
    """Two decimals; three under 1 mm, where the tools differ by hundredths."""
    return "fail" if not np.isfinite(x) else f"{x:.3f}" if abs(x) < 1.0 else f"{x:.2f}"


def worst(values: list[float]) -> float:
    """The largest value; NaN (a failed trial) makes it NaN."""
    return float("nan") if any(not np.isfinite(v) for v in values) else max(values)


def middle(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def run_pair(name, anat, func, points, kind, settings, trials: int, verbose: bool) -> dict:
    """The reference run (no misalignment) and ``trials`` misaligned runs of one pair."""
    base = trial(anat, func, points, np.eye(4), kind, settings)
    if verbose:
        print(f"  {name} without misalignment: median {fmt(base['med'])} mm, p95 {fmt(base['p95'])} mm, "
              f"{base['sec']:.1f} s, cpu {base['cpu']:.1f} s {base['error']}", flush=True)
    runs = []
    for k in range(trials):
        g = random_rigid(np.random.default_rng(1000 + k), centre_of(func))
        t = trial(anat, func, points, g, kind, settings, base["matrix"])
        runs.append(t)
        if verbose:
            print(f"  {name} trial {k}: median {fmt(t['med'])} mm, p95 {fmt(t['p95'])} mm; from the reference "
                  f"{fmt(t['self_med'])} / {fmt(t['self_p95'])} mm; {t['sec']:.1f} s, cpu {t['cpu']:.1f} s "
                  f"{t['error']}", flush=True)
    return {"base": base, "runs": runs}


def summarise(name, vox, target_med, target_p95, result) -> dict:
    runs, base = result["runs"], result["base"]
    col = {key: [r[key] for r in runs] for key in ("med", "p95", "self_med", "self_p95", "sec", "cpu")}
    row = {"pair": name, "voxel": vox, "target_med": target_med, "target_p95": target_p95,
           "med": middle(col["med"]), "worst_med": worst(col["med"]), "p95": middle(col["p95"]),
           "worst_p95": worst(col["p95"]), "base_med": base["med"], "base_p95": base["p95"],
           "self_med": middle(col["self_med"]), "worst_self_p95": worst(col["self_p95"]),
           "sec": middle(col["sec"]), "max_sec": max(col["sec"]), "cpu": middle(col["cpu"]), "max_cpu": max(col["cpu"]),
           "failures": sum(1 for r in runs if r["error"]), "errors": [r["error"] for r in runs if r["error"]],
           "trials": runs}
    row["met_accuracy"] = bool(row["worst_med"] < target_med and row["worst_p95"] < target_p95)
    row["met_time"] = bool(row["max_sec"] < 10.0)
    return row


# --------------------------------------------------------------------------------------------------
# cases with a known truth, against elastix and ANTs (issue #20)

CASES = ("hybrid", "synthetic-mr", "spm12-t2")
#: CT number (HU) -> T1-weighted MR signal (fraction of the brightest) for the synthetic MR, linear
#: in between: air dark, lung-like air/tissue mixes rising, fat the brightest, water and muscle
#: mid-grey (muscle darker than the water-rich tissue around 10 HU), blood/enhanced tissue a little
#: brighter, cortical bone dark again. Not monotonic (fat > muscle < tumour, bone dark while
#: brightest on CT), as between real CT and T1 MR, so a registration must use mutual information.
SYNTHETIC_HU = (-1000.0, -600.0, -200.0, -100.0, -30.0, 10.0, 40.0, 80.0, 200.0, 400.0, 1000.0, 3000.0)
SYNTHETIC_T1 = (0.00, 0.02, 0.55, 0.95, 0.85, 0.45, 0.35, 0.40, 0.30, 0.10, 0.05, 0.05)
#: Rician noise: the standard deviation of the two Gaussian channels, as a fraction of the brightest.
SYNTHETIC_NOISE = 0.03


def synthetic_mr(ct: sitk.Image, seed: int = 0) -> sitk.Image:
    """An MR-like image made from a CT (HU), on the CT's grid: :data:`SYNTHETIC_HU` ->
    :data:`SYNTHETIC_T1`, times a smooth bias field exp(0.25 (0.6 x - 0.4 y^2 + 0.5 z + 0.3 x y)) over
    the grid's box scaled to [-1, 1] (gains of about 0.6-1.6), then Rician noise
    sqrt((s + n1)^2 + n2^2) with n1, n2 ~ N(0, :data:`SYNTHETIC_NOISE`), scaled to 0..1000."""
    hu = sitk.GetArrayFromImage(ct).astype(np.float64)
    signal = np.interp(hu, SYNTHETIC_HU, SYNTHETIC_T1)
    z, y, x = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in hu.shape], indexing="ij")
    signal *= np.exp(0.25 * (0.6 * x - 0.4 * y ** 2 + 0.5 * z + 0.3 * x * y))
    rng = np.random.default_rng(seed)
    noisy = np.sqrt((signal + rng.normal(0.0, SYNTHETIC_NOISE, hu.shape)) ** 2
                    + rng.normal(0.0, SYNTHETIC_NOISE, hu.shape) ** 2)
    out = sitk.GetImageFromArray((1000.0 * noisy).astype(np.float32))
    out.CopyInformation(ct)
    return out


def load_cases(data: pathlib.Path, cases: list[str], patients: tuple = STS_PATIENTS):
    """Yield (case, pair name, fixed image, moving image, region points (on the fixed side), truth note)."""
    if "hybrid" in cases:
        for key, ct, pet, points, *_ in load_pairs(data, [f"sts/{p}/PET-CT" for p in patients]):
            yield "hybrid", key.replace("/PET-CT", " PET->CT"), ct, pet, points
    if "synthetic-mr" in cases:
        for patient in patients:
            root = data / "sts" / patient / "CT"
            if not (root / "dicom").is_dir():
                print(f"sts {patient} not found: skipped", file=sys.stderr)
                continue
            ct = read_source(root / "dicom", "functional").image
            mask = sitk.ReadImage(str(root / "gtv_mask.nii.gz"))
            yield "synthetic-mr", f"sts/{patient} CT->synthetic MR", synthetic_mr(ct, seed=7), ct, region_points(mask)
    if "spm12-t2" in cases:
        for key, t1, t2, points, *_ in load_pairs(data, ["spm12/T2-T1"]):
            yield "spm12-t2", "spm12 T2->T1", t1, t2, points


def peer_register(tool: str, fixed_path: pathlib.Path, moving_path: pathlib.Path, python: str,
                  threads: int | None) -> tuple[np.ndarray | None, float, float, str]:
    """(4x4 fixed -> moving, seconds, CPU seconds, error) from scripts/registration_peers.py in the peers' venv."""
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    env = dict(os.environ)
    if threads:
        env.update(ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "found.tfm"
        proc = subprocess.run([python, str(REPO / "scripts" / "registration_peers.py"), "--tool", tool,
                               str(fixed_path), str(moving_path), str(out)], capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.is_file():
            lines = (proc.stderr or proc.stdout or "failed").strip().splitlines()
            return None, float("nan"), float("nan"), lines[-1] if lines else "failed"
        timing = json.loads(proc.stdout.strip().splitlines()[-1])
        return affine_matrix(sitk.ReadTransform(str(out))), float(timing["seconds"]), float(timing["cpu"]), ""


def load_cache(directory: str | None, case: str) -> dict:
    """Per-trial results of ``case`` kept by earlier runs (``--cache``): {"pair|tool|trial": trial dict},
    from DIR/<case>.json and DIR/<case>.*.json, oldest file first (a later run's trial replaces an
    earlier one's: the file names carry process ids, whose order says nothing)."""
    import json  # noqa: PLC0415

    cache: dict = {}
    if directory and pathlib.Path(directory).is_dir():
        paths = list(pathlib.Path(directory).glob(f"{case}.json")) + list(pathlib.Path(directory).glob(f"{case}.*.json"))
        for path in sorted(paths, key=lambda p: (p.stat().st_mtime, p.name)):
            cache.update(json.loads(path.read_text()))
    return cache


def save_cache(directory: str | None, case: str, tool: str, cache: dict) -> None:
    """``tool``'s results in ``cache`` to DIR/<case>.<tool>.<process id>.json (one file per tool and
    process: several runs may fill the cache at the same time)."""
    import json  # noqa: PLC0415

    if not directory:
        return
    path = pathlib.Path(directory) / f"{case}.{tool}.{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v for k, v in cache.items() if k.split("|")[1] == tool}, indent=1))
    os.replace(tmp, path)


def run_case_trials(fixed, moving, points, tools, trials, settings, python, threads, verbose, name,
                    cache: dict | None = None, on_cached=None, run: tuple = (), peer_trials: int | None = None):
    """Every tool on the same ``trials`` misaligned starts: {tool: [trial dicts]}. With a ``cache``
    (key: pair, tool, trial; the start depends only on the trial's seed and the image): a peer's
    trial found there is taken from it, not run again, and so is every trial of a tool not in
    ``run`` (missing: left out); a trial that is run is added to it and ``on_cached(tool)`` called."""
    import tempfile  # noqa: PLC0415

    cache = {} if cache is None else cache
    results = {tool: [] for tool in tools}
    with tempfile.TemporaryDirectory() as tmp:
        fixed_path = pathlib.Path(tmp) / "fixed.nrrd"
        sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), str(fixed_path))
        for k in range(trials):
            g = random_rigid(np.random.default_rng(1000 + k), centre_of(moving))
            moved = moved_geometry(moving, g)
            moving_path = pathlib.Path(tmp) / "moving.nrrd"
            sitk.WriteImage(sitk.Cast(moved, sitk.sitkFloat32), str(moving_path))
            for tool in tools:
                if tool != "ours" and peer_trials is not None and k >= peer_trials:
                    continue
                key = f"{name}|{tool}|{k}"
                if key in cache and (tool != "ours" or tool not in run):
                    results[tool].append(cache[key])
                    if verbose:
                        print(f"  {name} trial {k} {tool}: TRE {fmt(cache[key]['tre'])} mm (kept from an earlier run)",
                              flush=True)
                    continue
                if tool not in run:
                    continue
                found, warning, error = None, "", ""
                if tool == "ours":
                    t0, c0 = time.perf_counter(), time.process_time()
                    try:
                        outcome = register(fixed, moved, "rigid", settings=settings)
                        found, warning = affine_matrix(outcome.transform), outcome.warning or ""
                    except FusionError as exc:
                        error = str(exc)
                    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                else:
                    found, seconds, cpu, error = peer_register(tool, fixed_path, moving_path, python, threads)
                tre = float("nan")
                if found is not None:
                    tre = float(np.median(np.linalg.norm(apply(found, points) - apply(g, points), axis=1)))
                results[tool].append({"tre": tre, "sec": seconds, "cpu": cpu, "error": error, "warning": warning})
                cache[key] = results[tool][-1]
                if on_cached is not None:
                    on_cached(tool)
                if verbose:
                    flag = " WARNING" if warning else ""
                    print(f"  {name} trial {k} {tool}: TRE {fmt(tre)} mm, {seconds:.1f} s (CPU {cpu:.1f}){flag} {error}",
                          flush=True)
    return results


def case_row(tool: str, runs: list[dict]) -> dict:
    tres = [r["tre"] for r in runs if np.isfinite(r["tre"])]
    secs = [r["sec"] for r in runs if np.isfinite(r["sec"])]
    cpus = [r["cpu"] for r in runs if np.isfinite(r["cpu"])]
    return {"tool": tool, "median": float(np.median(tres)) if tres else float("nan"),
            "p95": float(np.percentile(tres, 95)) if tres else float("nan"),
            "worst": max(tres) if tres else float("nan"),
            "sec": float(np.median(secs)) if secs else float("nan"), "max_sec": max(secs) if secs else float("nan"),
            "cpu": float(np.median(cpus)) if cpus else float("nan"), "max_cpu": max(cpus) if cpus else float("nan"),
            "refused": sum(1 for r in runs if r["error"]), "trials": len(runs),
            "warned": sum(1 for r in runs if r["warning"]),
            "silent_far": sum(1 for r in runs if np.isfinite(r["tre"]) and r["tre"] > 10.0 and not r["warning"]),
            "errors": [r["error"] for r in runs if r["error"]]}


CASE_TEXT = {
    "hybrid": ("Hybrid PET -> CT", "sts PET and CT of one PET/CT session (one FrameOfReferenceUID): the scanner's "
               "alignment is the truth (itself good to a few mm: see REGISTRATION.md). Fixed: the CT; moving: the "
               "PET in SUV. TRE over the tumour (the CT's GTV mask)."),
    "synthetic-mr": ("CT -> synthetic MR (what --register-with CT does)", "Fixed: an MR-like image made from the "
                     "sts CT itself (bench_registration.synthetic_mr: HU -> T1 signal through a non-monotonic map "
                     "of air, fat, water/muscle and bone, a smooth bias field of gains 0.6-1.6, Rician noise of 3 % "
                     "of the brightest); moving: the CT. The truth is exact. TRE over the tumour."),
    "spm12-t2": ("spm12 T2 -> T1", "The SPM12 T2 and T1 templates (one 2 mm grid, aligned by normalisation: a "
                 "weak truth). TRE over the brain (T1 above its Otsu threshold, holes filled, eroded 10 mm)."),
}


def case_markdown(case: str, rows: list[tuple[str, list[dict]]], args, machine: str) -> str:
    title, text = CASE_TEXT[case]
    cmd = (f"python scripts/bench_registration.py --cases {case} --peers {' '.join(args.peers)} --peers-python "
           f"{args.peers_python} --trials {args.trials}" + (f" --threads {args.threads}" if args.threads else "")
           + (f" --peer-trials {args.peer_trials}" if args.peer_trials and args.peer_trials < args.trials else "")
           + (f" --cache {args.cache}" if args.cache else "") + " --output docs/BENCHMARKS.md")
    lines = [f"## Registration with a known truth: {title}", "", f"Command: `{cmd}`. {machine}", "",
             text + f" {args.trials} trials per pair"
             + (f" (the peers: the first {args.peer_trials}, for time)" if args.peer_trials and args.peer_trials < args.trials else "")
             + ": the moving image moved by a known random rigid transform "
             "(up to 10 degrees about each axis, 20 mm along each; numpy seeds 1000 and up), the same for every "
             "tool. TRE per trial: the median distance over the region between where the found and the true "
             "transforms put its points; the table gives its median, 95th percentile and worst over the trials. "
             "Ours: `registration.register`, rigid, defaults; elastix: itk-elastix 0.25.4, default rigid parameter "
             "map (starts from the placement); ANTs: antspyx 0.6.3 `Rigid` (starts by matching centres of mass). "
             "Seconds: the registration alone, wall clock, and its process CPU time (the honest figure when other "
             "jobs load the machine). *Warned*: ours flagged the result as uncertain (restarts "
             "more than a voxel apart); *silent > 10 mm*: accepted more than 10 mm off without a warning.", "",
             "| pair | tool | TRE median | p95 | worst | seconds median / worst | CPU s median / worst | refused "
             "| warned | silent > 10 mm |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for name, tool_rows in rows:
        for r in tool_rows:
            ours = r["tool"] == "ours"
            lines.append(f"| {name} | {r['tool']} | {fmt(r['median'])} | {fmt(r['p95'])} | {fmt(r['worst'])} | "
                         f"{r['sec']:.1f} / {r['max_sec']:.1f} | {r['cpu']:.1f} / {r['max_cpu']:.1f} | "
                         f"{r['refused']}/{r['trials']} | "
                         f"{r['warned'] if ours else ''} | {r['silent_far'] if ours else ''} |")
    errors = [(name, r["tool"], e) for name, tool_rows in rows for r in tool_rows for e in r["errors"]]
    if errors:
        lines += ["", "Refusals and failures:", ""] + [f"- {n} {t}: {e}" for n, t, e in errors]
    return "\n".join(lines)


def main_cases(args) -> int:
    from benchdoc import machine_line, replace_section  # noqa: PLC0415

    if args.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    settings = parse_settings(args.set)
    tools = ["ours"] + list(args.peers)
    peer_trials = min(args.trials, args.peer_trials or args.trials)
    run = tuple(args.run or (list(args.peers) if args.peers_only else tools))
    by_case: dict = {}
    complete = True
    for case, name, fixed, moving, points in load_cases(pathlib.Path(args.data), args.cases, tuple(args.patients)):
        cache = load_cache(args.cache, case)
        results = run_case_trials(fixed, moving, points, tools, args.trials, settings, args.peers_python,
                                  args.threads, args.verbose, name, cache,
                                  lambda tool, c=case, d=cache: save_cache(args.cache, c, tool, d), run,
                                  peer_trials)
        missing = [tool for tool in tools if len(results[tool]) < (args.trials if tool == "ours" else peer_trials)]
        if missing:
            print(f"{name}: no table: {', '.join(missing)} not run and not all in the cache", flush=True)
            complete = False
            continue
        tool_rows = [case_row(tool, results[tool]) for tool in tools]
        by_case.setdefault(case, []).append((name, tool_rows))
        for r in tool_rows:
            print(f"{name} {r['tool']}: TRE median {fmt(r['median'])} p95 {fmt(r['p95'])} worst {fmt(r['worst'])} mm; "
                  f"{r['sec']:.1f} s (max {r['max_sec']:.1f}, CPU max {r['max_cpu']:.1f}); refused {r['refused']}/{r['trials']}; "
                  f"warned {r['warned']}; silent > 10 mm {r['silent_far']}", flush=True)
    for case, rows in (by_case.items() if complete else ()):
        body = case_markdown(case, rows, args, machine_line())
        if args.cache:
            body += ("\n\nWith `--cache`: trials kept by earlier runs of the same command (same pairs, seeds and "
                     "starts; a peer's result does not depend on our code) were taken from it, so their seconds "
                     "were measured then, under those runs' load.")
        if args.output:
            replace_section(args.output, f"registration-{case}", body)
            print(f"-> {args.output} (section 'registration-{case}')")
        else:
            print(body)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("MEDICALFUSION_DATA") or str(REPO.parent / "shared" / "data")
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kind", default="rigid", choices=("rigid", "affine"))
    parser.add_argument("--pairs", nargs="+", help="e.g. spm12/PET-T1 sts/PET-CT sts/STS_001/MR-CT (default: all)")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                        help="override a RegistrationSettings field")
    parser.add_argument("--output", help="write the table as the 'registration' section of this Markdown file")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every trial")
    parser.add_argument("--cases", nargs="+", choices=CASES,
                        help="cases with a known truth, ours against --peers (sections registration-<case>)")
    parser.add_argument("--peers", nargs="*", default=["elastix", "ants"], choices=("elastix", "ants"))
    parser.add_argument("--peers-python", default=str(REPO / ".venv-bench" / "bin" / "python"),
                        help="the interpreter with itk-elastix and antspyx (make bench-deps)")
    parser.add_argument("--threads", type=int, help="threads for every tool (ITK's default otherwise)")
    parser.add_argument("--cache", "--peer-cache", dest="cache", metavar="DIR",
                        help="keep every tool's per-trial results in DIR/<case>.<tool>.json and reuse the peers' "
                             "(they do not depend on our code) and those of tools not in --run: the slow peers run "
                             "once, alongside or before ours")
    parser.add_argument("--run", nargs="+", choices=("ours", "elastix", "ants"),
                        help="with --cache: run only these tools, take the others from the cache (default: all); "
                             "the tables are written only when every tool has every trial")
    parser.add_argument("--patients", nargs="+", default=list(STS_PATIENTS), choices=STS_PATIENTS,
                        help="the sts patients of the hybrid and synthetic-mr cases (default: all three)")
    parser.add_argument("--peer-trials", type=int,
                        help="the peers' trials (the first ones of --trials; default: as many as --trials)")
    parser.add_argument("--peers-only", action="store_true", help="the same as --run with the --peers")
    args = parser.parse_args(argv)
    if args.cases:
        return main_cases(args)
    settings = parse_settings(args.set)

    rows = []
    for name, anat, func, points, target_med, target_p95, vox in load_pairs(pathlib.Path(args.data), args.pairs):
        result = run_pair(name, anat, func, points, args.kind, settings, args.trials, args.verbose)
        row = summarise(name, vox, target_med, target_p95, result)
        rows.append(row)
        print(f"{name}: median TRE {fmt(row['med'])} (worst {fmt(row['worst_med'])}) mm, p95 {fmt(row['p95'])} "
              f"(worst {fmt(row['worst_p95'])}) mm, targets {target_med:.2f}/{target_p95:.2f}; without misalignment "
              f"{fmt(row['base_med'])} mm; from it {fmt(row['self_med'])} mm; {row['sec']:.1f} s (max "
              f"{row['max_sec']:.1f}, cpu {row['max_cpu']:.1f}); failures {row['failures']}", flush=True)
        for e in row["errors"][:2]:
            print(f"    {e}")

    if args.output and rows:
        from benchdoc import machine_line, replace_section  # noqa: PLC0415

        replace_section(args.output, SECTION, markdown(rows, args, settings, machine_line()))
        print(f"-> {args.output} (section '{SECTION}')")
    return 0


def method_text(settings) -> str:
    """The registration method as ``settings`` build it (MedicalFusionLib.registration._optimise), in words."""
    s = settings
    text = (f"Mattes mutual information, {s.histogram_bins} bins"
            + (f" (a CT, recognised by air at its 1st percentile, saturated above {s.ct_bone_hu:g} HU)"
               if np.isfinite(s.ct_bone_hu) else "")
            + f", shrink {list(s.shrink_factors)}, smoothing "
            f"{list(s.smoothing_sigmas_mm)} mm, regular-step gradient descent (first step {s.learning_rate:g} mm); "
            f"each level {s.samples} samples on a jittered regular grid and at most {s.iterations} iterations "
            f"({s.coarsest_iterations} at the coarsest rigid level)")
    if s.finest_samples > s.samples and s.refine_iterations > 0:
        grid = (f" on a grid of at most {s.first_pass_voxels} voxels (every k-th voxel)" if s.first_pass_voxels > 0
                else "")
        text += (f"; the finest level in two passes: the first as above{grid}, then, only when it has settled "
                 f"(stopped before its budget) and the restarts agree, a second from where it stopped with "
                 f"{s.finest_samples} samples on the whole grid, first step {s.refine_step:g} mm, at most "
                 f"{s.refine_iterations} iterations")
    if s.restarts > 0:
        text += (f"; {s.restarts} restarts from starts {s.restart_shift_mm:g} mm / {s.restart_turn_deg:g} degrees "
                 f"off run the {s.restart_levels} coarsest levels with {s.restart_budget:g} times the main run's iterations, "
                 "for the spread")
        if s.uncertain_budget < 1.0:
            text += (f"; an answer they flag (spread over a voxel) gets {s.uncertain_budget:g} times the finest level's "
                     "iterations in its first pass")
    return text


def markdown(rows, args, settings, machine: str) -> str:
    sets = "".join(f" --set {s}" for s in args.set)
    cmd = (f"python scripts/bench_registration.py --trials {args.trials} --kind {args.kind}{sets} "
           "--output docs/BENCHMARKS.md")
    yes = {True: "yes", False: "**no**"}
    lines = [
        "## Registration on demand: accuracy (target registration error) and time",
        "",
        f"Command: `{cmd}` (part of `make bench`). {machine}",
        "",
        f"{args.kind.capitalize()} registration (`MedicalFusionLib.registration.register`, defaults: "
        f"{method_text(settings)}) of each functional to its anatomical, after "
        f"{args.trials} known random rigid misalignments (rotations up to 10 degrees about each axis, translations "
        "up to 20 mm along each; numpy seeds 1000 and up). TRE: the distance between where the found and the true "
        "transform put each voxel of the region (sts: the tumour mask on the anatomical's grid; spm12: the brain, "
        "T1 above its Otsu threshold, holes filled, eroded 10 mm), in mm. Per trial its median and 95th "
        "percentile; the table gives their median and worst over the trials. *Without misalignment*: the same "
        "registration started from the data's own alignment; where it ends is what mutual information takes for "
        "aligned (its distance from the data's alignment bounds what any trial can reach). *From it*: the TRE of "
        "each trial measured from that answer instead of the data's alignment (does the registration find the "
        "same answer from a misaligned start?). Seconds: `register()` alone (reading excluded), wall clock and "
        "process CPU (all threads); other jobs shared the 2 cores, so wall times are inflated.",
        "",
        "| pair | functional voxel (mm) | median TRE (mm): median / worst | target | p95 TRE (mm): median / worst "
        "| target | without misalignment: median / p95 (mm) | from it: median / worst p95 (mm) "
        "| seconds: median / worst (CPU worst) | failures | accuracy met | time met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['voxel']:.2f} | {fmt(r['med'])} / {fmt(r['worst_med'])} | < {r['target_med']:.2f} "
            f"| {fmt(r['p95'])} / {fmt(r['worst_p95'])} | < {r['target_p95']:.2f} | {fmt(r['base_med'])} / "
            f"{fmt(r['base_p95'])} | {fmt(r['self_med'])} / {fmt(r['worst_self_p95'])} | {r['sec']:.1f} / "
            f"{r['max_sec']:.1f} ({r['max_cpu']:.1f}) | {r['failures']} | {yes[r['met_accuracy']]} | "
            f"{yes[r['met_time']]} |")
    lines += ["", "Voxel size of an anisotropic grid: the cube root of the voxel volume. A target is met when the "
              "worst trial meets it; a failed trial (a one-line error, listed below: refused, or did not converge) fails it.", ""]
    errors = [(r["pair"], e) for r in rows for e in r["errors"]]
    if errors:
        lines += ["Failed trials:", ""] + [f"- {pair}: {e}" for pair, e in errors] + [""]
    lines += ["<details><summary>Every trial</summary>", "", "| pair | trial | median TRE | p95 TRE | from the "
              "reference: median / p95 | seconds (CPU) |", "|---|---|---|---|---|---|"]
    for r in rows:
        for k, t in enumerate(r["trials"]):
            lines.append(f"| {r['pair']} | {k} | {fmt(t['med'])} | {fmt(t['p95'])} | {fmt(t['self_med'])} / "
                         f"{fmt(t['self_p95'])} | {t['sec']:.1f} ({t['cpu']:.1f}) |")
    lines += ["", "</details>", "", "Data: sts (TCIA Soft-tissue-Sarcoma; Vallieres et al. 2015, "
              "doi:10.7937/K9/TCIA.2015.7GO2GSKS; CC BY 3.0) and the SPM12 templates (GPL-2.0+)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
