"""Cohorts on Dask: ``medicalfusion batch`` on a LocalCluster against the two ways without it; the
'cohort' section of docs/BENCHMARKS.md.

Run: make bench   (or: python scripts/bench_cohort.py --output docs/BENCHMARKS.md [--studies 24]
     [--method mrdfn] [--metric-set quick] [--skip-sequential])

The cohort is ``--studies`` spm12-sized studies: the SPM12 T1 + PET pair (91x109x91, 2 mm) of
../shared/data/spm12, one manifest row per study. Each way writes what ``fuse`` writes per study
(fused.nrrd, metrics.csv with ``--metric-set``) into a fresh folder:

- sequential: one ``python -m MedicalFusionLib.cli fuse ...`` process per study, one after the other
  (torch's default threads), as a researcher runs them by hand today (process start, imports and
  the network's loading every time);
- single process (hand-tuned): one Python process that imports once, keeps the network
  (registry.keep_built) and runs ``cli.fuse_one`` for every study, at 1, half the cores and all the
  cores as torch threads; the best is reported (the cohort's floor without parallel processes);
- batch: ``medicalfusion batch`` (its LocalCluster with the default sizing), the whole command
  timed from its start (cluster start-up and worker imports included), and inside it, through the
  same functions: the run from the first submit to the last result.

Scheduler overhead: 1 - (sum of the studies' own seconds in their workers) / (workers x the run's
wall time): what is not a study running on a worker (scheduling, transfers, idle tails). Memory per
worker: each worker process's peak RSS (ru_maxrss) after the run.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO))   # medicalfusion_tools
sys.path.insert(0, str(REPO / "scripts"))

from benchdoc import command_line, machine_line, replace_section  # noqa: E402

SECTION = "cohort"
TARGET_SPEEDUP = 1.7          # batch vs sequential fuse calls
TARGET_VS_BEST = 1.2          # batch within this factor of the best single process
TARGET_OVERHEAD = 0.05        # scheduler overhead, share of the work


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "MedicalFusion"), str(REPO), env.get("PYTHONPATH", "")])
    return env


def write_manifest(work: pathlib.Path, data: pathlib.Path, n: int) -> pathlib.Path:
    rows = ["id,anatomical,functional"]
    rows += [f"study{i:03d},{data / 'spm12' / 'T1.nii'},{data / 'spm12' / 'PET.nii'}" for i in range(n)]
    path = work / "manifest.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def fuse_argv(manifest: pathlib.Path, out: pathlib.Path, method: str, metric_set: str) -> list:
    """The studies' fuse command lines, as batch builds them (cohort.plan)."""
    from medicalfusion_tools import cohort  # noqa: PLC0415

    return [t.argv for t in cohort.plan(manifest, out, method=method, metric_set=metric_set)]


def sequential(argvs: list) -> float:
    t0 = time.perf_counter()
    for argv in argvs:
        pathlib.Path(argv[argv.index("--output") + 1]).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "MedicalFusionLib.cli", *argv], check=True, env=child_env(),
                       stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


SINGLE = r"""
import pathlib, sys, time, json, torch
from MedicalFusionLib import cli
from MedicalFusionLib.methods.registry import keep_built
torch.set_num_threads(int(sys.argv[1]))
keep_built(True)
argvs = json.loads(sys.stdin.read())
t0 = time.perf_counter()
for argv in argvs:
    pathlib.Path(argv[argv.index("--output") + 1]).parent.mkdir(parents=True, exist_ok=True)
    cli.fuse_one(cli.build_parser().parse_args(argv))
print(time.perf_counter() - t0)
"""


def single_process(argvs: list, threads: int) -> tuple[float, float]:
    """(whole process wall, the loop's wall) of one process fusing every study."""
    import json  # noqa: PLC0415

    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", SINGLE, str(threads)], input=json.dumps(argvs), text=True,
                         capture_output=True, check=True, env=child_env())
    return time.perf_counter() - t0, float(run.stdout.strip().splitlines()[-1])



def _peak_rss_mb() -> float:
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def batch(manifest: pathlib.Path, out: pathlib.Path, method: str, metric_set: str) -> dict:
    """medicalfusion batch through its own functions (cohort.plan, connect, _run_all), timed."""
    from medicalfusion_tools import cohort  # noqa: PLC0415

    t0 = time.perf_counter()
    tasks = cohort.plan(manifest, out, method=method, metric_set=metric_set)
    client, cluster, threads, where = cohort.connect(None, len(tasks), None, None)
    try:
        workers = len(client.scheduler_info()["workers"])
        t1 = time.perf_counter()
        outcomes = cohort._run_all(client, tasks, threads, show_bar=False)   # noqa: SLF001
        run = time.perf_counter() - t1
        rss = client.run(_peak_rss_mb)
    finally:
        client.close()
        cluster.close()
    whole = time.perf_counter() - t0
    failed = [o for o in outcomes if o.status != "ok"]
    if failed:
        raise SystemExit(f"batch: {len(failed)} studies failed, e.g. {failed[0].id}: {failed[0].message}")
    work = sum(o.seconds for o in outcomes)
    return {"whole": whole, "run": run, "workers": workers, "threads": threads, "where": where,
            "overhead": 1.0 - work / (workers * run), "rss": sorted(rss.values()),
            "first": max(o.seconds for o in outcomes), "median": sorted(o.seconds for o in outcomes)[len(outcomes) // 2]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("MEDICALFUSION_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--studies", type=int, default=24)
    p.add_argument("--method", default="mrdfn")
    p.add_argument("--metric-set", default="quick", choices=("all", "quick"))
    p.add_argument("--skip-sequential", action="store_true", help="leave out the sequential fuse calls (slow)")
    p.add_argument("--note", default="", help="a sentence put first in the section (e.g. why a run is small)")
    p.add_argument("--section", default=SECTION)
    p.add_argument("--output", help="write the section into this markdown report")
    args = p.parse_args(argv)
    data = pathlib.Path(args.data)
    if not (data / "spm12" / "T1.nii").is_file():
        print(f"bench_cohort: no spm12 pair under {data}: skipped", file=sys.stderr)
        return 0
    load0 = os.getloadavg()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        work = pathlib.Path(tmp)
        manifest = write_manifest(work, data, args.studies)
        b = batch(manifest, work / "batch", args.method, args.metric_set)
        print(f"batch: {b['whole']:.1f} s whole, run {b['run']:.1f} s, {b['where']}", flush=True)
        singles = {}
        for t in sorted({1, max(1, cores // 2), cores}):
            shutil.rmtree(work / "single", ignore_errors=True)
            singles[t] = single_process(fuse_argv(manifest, work / "single", args.method, args.metric_set), t)
            print(f"single process, {t} thread(s): {singles[t][0]:.1f} s ({singles[t][1]:.1f} s in the loop)", flush=True)
        seq = None
        if not args.skip_sequential:
            seq = sequential(fuse_argv(manifest, work / "seq", args.method, args.metric_set))
            print(f"sequential fuse calls: {seq:.1f} s", flush=True)
    best_t = min(singles, key=lambda t: singles[t][0])
    best = singles[best_t][0]
    lines = ([f"**{args.note}**", ""] if args.note else []) + [
        f"{args.studies} spm12-sized studies (SPM12 T1 + PET, 91x109x91 at 2 mm), method {args.method}, metrics "
        f"'{args.metric_set}', each study's fused.nrrd + metrics.csv written as `fuse` writes them. "
        f"Load average at the start {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}.",
        "",
        "| way | wall s | s per study | vs batch |",
        "|---|---|---|---|",
    ]
    if seq is not None:
        lines.append(f"| {args.studies} sequential `medicalfusion fuse` calls | {seq:.1f} | {seq / args.studies:.2f} | "
                     f"{seq / b['whole']:.2f}x |")
    for t, (whole, loop) in singles.items():
        lines.append(f"| one process, `cli.fuse_one` per study, {t} torch thread(s){' (best)' if t == best_t else ''} "
                     f"| {whole:.1f} | {whole / args.studies:.2f} | {whole / b['whole']:.2f}x |")
    lines += [f"| `medicalfusion batch` ({b['where']}), whole command | {b['whole']:.1f} | "
              f"{b['whole'] / args.studies:.2f} | 1.00x |",
              f"| ... of which the run (first submit to last result) | {b['run']:.1f} | {b['run'] / args.studies:.2f} | |",
              "",
              f"Targets: batch at least {TARGET_SPEEDUP}x faster than the sequential calls "
              + (f"(measured {seq / b['whole']:.2f}x); " if seq is not None else "(not measured in this run); ")
              + f"within {TARGET_VS_BEST}x of the best single process (measured {b['whole'] / best:.2f}x); "
              f"scheduler overhead below {TARGET_OVERHEAD:.0%} of the work (measured {b['overhead']:.1%}: "
              f"1 - sum of the studies' seconds / (workers x run wall)). Memory per worker (peak RSS): "
              + ", ".join(f"{r:.0f} MB" for r in b["rss"]) + f". Slowest study {b['first']:.1f} s (a worker's first: "
              f"imports and the network's loading), median {b['median']:.1f} s.",
              "",
              f"Command: `{command_line('bench_cohort.py', argv)}`. "
              + machine_line()]
    text = "\n".join(lines)
    print(text)
    if args.output:
        replace_section(args.output, args.section, "## Cohorts on Dask (`medicalfusion batch`)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
