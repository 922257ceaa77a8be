"""``medicalfusion batch`` on a real Dask cluster: a scheduler and two worker processes started here
on loopback (distributed.LocalCluster, processes=True), never a mock.

One cohort of tiny synthetic studies runs once for the module (a broken study, a bad manifest value,
and a worker killed with SIGKILL while it writes a study); the tests then check its outputs against
single ``medicalfusion fuse`` runs (bit for bit), the kill, a rerun, and --methods ranking.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import pathlib
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

distributed = pytest.importorskip("distributed", reason="the cohort extra (dask[distributed]) is not installed")

from medicalfusion_tools import cohort  # noqa: E402
from MedicalFusionLib.cli import main  # noqa: E402
from MedicalFusionLib.metrics import MetricInfo  # noqa: E402
from MedicalFusionLib.outputs import PAUSE_FILE_ENV  # noqa: E402

VICTIM = "victim"          # the study whose worker is killed while it writes its fused volume


def write_study(folder: pathlib.Path, name: str, seed: int) -> tuple[str, str]:
    """A tiny MR-like volume (32x32x6, 1x1x2 mm) and a coarser PET-like one (16x16x6, 2 mm)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:6, 0:32, 0:32]
    mr = 100 * np.exp(-((x - 16) ** 2 + (y - 16) ** 2) / (60 + 7 * seed)) + rng.normal(0, 3, x.shape) + 20
    pet = np.exp(-((x - 10 - seed) ** 2 + (y - 18) ** 2) / 20.0) * (z + 1)
    a = sitk.GetImageFromArray(mr.astype(np.float32))
    a.SetSpacing((1.0, 1.0, 2.0))
    f = sitk.GetImageFromArray(np.ascontiguousarray(pet[:, ::2, ::2]).astype(np.float32))
    f.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(a, str(folder / f"{name}_mr.nrrd"))
    sitk.WriteImage(f, str(folder / f"{name}_pet.nrrd"))
    return f"{name}_mr.nrrd", f"{name}_pet.nrrd"


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def leftovers(folder: pathlib.Path) -> list:
    return [p for p in folder.rglob("*") if p.name.startswith((".mf-tmp-", ".mf-bak-"))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two worker processes on 127.0.0.1; the pause hook armed for VICTIM."""
    pause_file = tmp_path_factory.mktemp("pause") / "pid"
    saved = {k: os.environ.get(k) for k in (cohort.TEST_PAUSE_ENV, PAUSE_FILE_ENV)}
    os.environ[cohort.TEST_PAUSE_ENV] = f"{VICTIM}:write:output"
    os.environ[PAUSE_FILE_ENV] = str(pause_file)
    lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=logging.ERROR)
    try:
        yield lc, pause_file
    finally:
        lc.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cohort_run(cluster, tmp_path_factory):
    """The module's cohort, run once: s0, s1, VICTIM (its worker is SIGKILLed mid-write), broken
    (a truncated NRRD), badopt (a window that is no number)."""
    lc, pause_file = cluster
    data = tmp_path_factory.mktemp("data")
    out = tmp_path_factory.mktemp("runs") / "cohort"
    rows = ["id,anatomical,functional,window"]
    for seed, sid in enumerate(("s0", "s1", VICTIM)):
        a, f = write_study(data, sid, seed)
        rows.append(f"{sid},{a},{f},")
    a, f = write_study(data, "broken", 5)
    raw = data / "broken_pet.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(raw)), str(raw), useCompression=False)
    raw.write_bytes(raw.read_bytes()[:-200])                      # damaged: 200 bytes short
    rows.append(f"broken,{a},{f},")
    rows.append(f"badopt,s0_mr.nrrd,s0_pet.nrrd,abc 5")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    killed = {}

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if pause_file.is_file() and pause_file.read_text().strip():
                time.sleep(0.2)                                   # the temporary is there
                killed["tmp_seen"] = leftovers(out / VICTIM)
                killed["pid"] = int(pause_file.read_text().split()[0])   # "PID POINT"
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    rc = main(["batch", str(data / "manifest.csv"), "--output", str(out), "--scheduler", lc.scheduler_address, "-q"])
    thread.join(timeout=5)
    return {"rc": rc, "data": data, "out": out, "killed": killed, "manifest": data / "manifest.csv"}


def test_batch_outputs_equal_single_fuse_runs_bit_for_bit(cohort_run, tmp_path):
    data, out = cohort_run["data"], cohort_run["out"]
    for sid in ("s0", VICTIM):
        single = tmp_path / sid
        single.mkdir()
        assert main(["fuse", "-a", str(data / f"{sid}_mr.nrrd"), "-f", str(data / f"{sid}_pet.nrrd"), "-m", "lp",
                     "-o", str(single / "fused.nrrd"), "--metrics", str(single / "metrics.csv"), "-q"]) == 0
        assert (out / sid / "fused.nrrd").read_bytes() == (single / "fused.nrrd").read_bytes()
        batch_rows = [r for r in read_csv(out / sid / "metrics.csv") if r["metric"] != "seconds"]
        single_rows = [r for r in read_csv(single / "metrics.csv") if r["metric"] != "seconds"]
        assert batch_rows == single_rows and len(batch_rows) > 16


def test_one_broken_study_is_one_failed_line_and_exit_2(cohort_run):
    assert cohort_run["rc"] == 2
    summary = {r["id"]: r for r in read_csv(cohort_run["out"] / "summary.csv")}
    assert list(summary) == ["s0", "s1", VICTIM, "broken", "badopt"]
    assert [summary[s]["status"] for s in ("s0", "s1", VICTIM)] == ["ok"] * 3
    assert summary["broken"]["status"] == "failed" and "broken_pet.nrrd" in summary["broken"]["message"]
    assert summary["badopt"]["status"] == "failed" and "--window" in summary["badopt"]["message"]
    assert not (cohort_run["out"] / "broken").exists() and not (cohort_run["out"] / "badopt").exists()
    table = read_csv(cohort_run["out"] / "cohort_metrics.csv")
    assert [r["id"] for r in table] == ["s0", "s1", VICTIM]
    fused = cohort.read_metrics(cohort_run["out"] / "s1" / "metrics.csv")
    assert float(table[1]["Qabf"]) == pytest.approx(fused["Qabf"], rel=1e-5)


def test_killed_worker_study_is_rescheduled_and_nothing_is_half_written(cohort_run):
    killed, out = cohort_run["killed"], cohort_run["out"]
    assert killed.get("pid") and killed["pid"] != os.getpid()
    assert killed["tmp_seen"], "the worker was killed after it had started writing the study"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    assert cohort.verified(out / VICTIM, json.loads((out / VICTIM / "done.json").read_text())["options"])
    assert sorted(p.name for p in (out / VICTIM).iterdir()) == ["done.json", "fused.nrrd", "metrics.csv"]
    assert leftovers(out) == []


def test_rerun_skips_verified_studies_and_redoes_the_others(cohort_run, cluster, tmp_path):
    out = tmp_path / "cohort"
    shutil.copytree(cohort_run["out"], out)
    good = (out / "s1" / "fused.nrrd").read_bytes()
    (out / "s1" / "fused.nrrd").write_bytes(good[:-10] + b"0123456789")   # changed after the run
    (out / "s0" / "done.json").unlink()                                    # a run cut short before its marker
    before = (out / VICTIM / "fused.nrrd").stat().st_mtime_ns
    rc = main(["batch", str(cohort_run["manifest"]), "--output", str(out), "--scheduler",
               cluster[0].scheduler_address, "-q"])
    assert rc == 2
    status = {r["id"]: r["status"] for r in read_csv(out / "summary.csv")}
    assert status == {"s0": "ok", "s1": "ok", VICTIM: "skipped", "broken": "failed", "badopt": "failed"}
    assert (out / "s1" / "fused.nrrd").read_bytes() == good
    assert (out / VICTIM / "fused.nrrd").stat().st_mtime_ns == before
    assert [r["id"] for r in read_csv(out / "cohort_metrics.csv")] == ["s0", "s1", VICTIM]


def test_methods_rank_over_the_cohort_and_workers_load_a_network_once(cluster, tmp_path, capsys):
    from MedicalFusionLib.methods import get_method

    if not get_method("mrdfn").available()[0]:
        pytest.skip("mrdfn weights are not installed")
    rows = ["id,anatomical,functional"]
    for seed in range(3):
        a, f = write_study(tmp_path, f"m{seed}", seed)
        rows.append(f"m{seed},{a},{f}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    methods = ["lp", "average", "mrdfn"]
    rc = main(["batch", str(tmp_path / "manifest.csv"), "-o", str(out), "--scheduler", cluster[0].scheduler_address,
               "--methods", *methods, "--metric-set", "quick"])
    assert rc == 0
    assert (out / "m1" / "mrdfn" / "fused.nrrd").is_file() and (out / "m1" / "lp" / "metrics.csv").is_file()
    ranking = read_csv(out / "ranking.csv")
    assert sorted(r["method"] for r in ranking) == sorted(methods)
    # the mean ranks, recomputed here from cohort_metrics.csv with the directions of the metrics table
    table = read_csv(out / "cohort_metrics.csv")
    sign = {m.key: (1.0 if m.higher_is_better else -1.0) for m in cohort.ranked_metrics()}
    assert "FMI_pixel" not in sign and "MI_nats" in sign and "SSIM_sum" in sign
    # the colour fidelity is ranked too (issue 23: the evaluator's metrics and the colour-fidelity metrics)
    assert sign["hue_err10"] == -1.0 and sign["chroma_kept"] == 1.0 and "hue_err10" in table[0]
    keys = [k for k in sign if k in table[0] and all(table_row[k] not in ("", "nan") for table_row in table)]
    assert "readback_err" in keys and "chroma_kept" in ranking[0]
    expected = {m: 0.0 for m in methods}
    for sid in ("m0", "m1", "m2"):
        per = {r["method"]: r for r in table if r["id"] == sid}
        for k in keys:
            for m in methods:
                value = {o: sign[k] * float(per[o][k]) for o in methods}
                better = sum(value[o] > value[m] for o in methods)
                ties = sum(value[o] == value[m] for o in methods) - 1
                expected[m] += 1 + better + ties / 2
    for r in ranking:
        assert float(r["mean_rank"]) == pytest.approx(expected[r["method"]] / (3 * len(keys)), abs=1e-4)
    assert [float(r["mean_rank"]) for r in ranking] == sorted(float(r["mean_rank"]) for r in ranking)
    assert f"1. {ranking[0]['method']}" in capsys.readouterr().out
    # each worker process built mrdfn (read and verified its weights) at most once for its studies
    with distributed.Client(cluster[0].scheduler_address) as client:
        counts = client.run(lambda: __import__("MedicalFusionLib.methods.registry", fromlist=["x"]).build_counts)
    assert sum(c.get("mrdfn", 0) for c in counts.values()) >= 1
    assert all(c.get("mrdfn", 0) <= 1 for c in counts.values()), counts


def test_rank_methods_takes_names_and_directions_from_one_table():
    table = [MetricInfo("up", "up", "higher is better"), MetricInfo("down", "down", "lower is better", False),
             MetricInfo("MI_bits", "left out", "another unit of MI_nats")]
    outcomes = [cohort.Outcome("a", "x", "ok", metrics={"up": 3.0, "down": 5.0, "MI_bits": 1.0}),
                cohort.Outcome("a", "y", "ok", metrics={"up": 1.0, "down": 1.0, "MI_bits": 9.0}),
                cohort.Outcome("b", "x", "ok", metrics={"up": 2.0, "down": 2.0, "MI_bits": 1.0}),
                cohort.Outcome("b", "y", "ok", metrics={"up": 2.0, "down": 3.0, "MI_bits": 9.0}),
                cohort.Outcome("c", "x", "ok", metrics={"up": 9.0, "down": 0.0}),
                cohort.Outcome("c", "y", "failed", "broken")]
    rows, keys, studies = cohort.rank_methods(outcomes, ["x", "y"], table)
    assert keys == ["up", "down"] and studies == 2          # c: y failed, so c is not compared
    by = {r["method"]: r["mean_rank"] for r in rows}
    # study a: up x1 y2, down x2 y1; study b: up tie 1.5/1.5, down x1 y2
    assert by == {"x": pytest.approx((1 + 2 + 1.5 + 1) / 4), "y": pytest.approx((2 + 1 + 1.5 + 2) / 4)}
    assert [r["method"] for r in rows] == ["x", "y"]


@pytest.mark.parametrize("text, expected", [
    ("id,anatomical\n", "no column functional"),
    ("id,anatomical,functional,colourmap\n", "column 'colourmap' is not a fuse option"),
    ("id,anatomical,functional,output\n", "column 'output' is set by batch"),
    ("id,anatomical,functional,save_transform\n", "column 'save-transform' is set by batch"),
    ("id,anatomical,functional,threads\n", "column 'threads' is set by batch"),
    ("id,anatomical,functional\na,x.nrrd,y.nrrd\nA,x.nrrd,y.nrrd\n", "id 'A' is also on line 2"),
    ("id,anatomical,functional\n../up,x.nrrd,y.nrrd\n", "id '../up' must start"),
    ("id,anatomical,functional\n", "lists no study"),
])
def test_bad_manifest_is_one_line_before_any_work(tmp_path, capsys, text, expected):
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    assert main(["batch", str(tmp_path / "m.csv"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medicalfusion: error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_manifest_row_becomes_the_fuse_command_line(tmp_path):
    (tmp_path / "m.csv").write_text("id,anatomical,functional,window,register,colormap,metric_set\n"
                                    "p1,mr/a.nrrd,/abs/pet.nrrd,-5 250,affine,PET-Rainbow2,quick\n"
                                    "p2,a.nrrd,b.nrrd,,,,\n", encoding="utf-8")
    tasks = cohort.plan(tmp_path / "m.csv", tmp_path / "out", method="average")
    t1, t2 = tasks
    assert t1.options == ["--anatomical", str(tmp_path / "mr" / "a.nrrd"), "--functional", "/abs/pet.nrrd",
                          "--window", "-5", "250", "--register", "affine", "--colormap", "PET-Rainbow2",
                          "--metric-set", "quick", "--method", "average"]
    assert t1.argv == ["fuse", *t1.options, "--output", str(tmp_path / "out" / "p1" / "fused.nrrd"),
                       "--metrics", str(tmp_path / "out" / "p1" / "metrics.csv"), "--quiet"]
    assert t1.error == "" and t2.error == "" and "--register" not in t2.options
    assert t2.options[-4:] == ["--method", "average", "--metric-set", "quick"]     # fuse's default set
    multi = cohort.plan(tmp_path / "m.csv", tmp_path / "out", methods=["lp", "max"])
    assert [(t.id, t.method, pathlib.Path(t.folder).relative_to(tmp_path / "out").as_posix()) for t in multi] == [
        ("p1", "lp", "p1/lp"), ("p1", "max", "p1/max"), ("p2", "lp", "p2/lp"), ("p2", "max", "p2/max")]


def test_local_cluster_sizes_never_oversubscribe_the_cores():
    assert cohort.local_sizes(tasks=24, cores=2) == (2, 1)
    assert cohort.local_sizes(tasks=1, cores=8) == (1, 8)
    assert cohort.local_sizes(tasks=24, cores=8, threads=2) == (4, 2)
    assert cohort.local_sizes(tasks=24, cores=16, workers=3) == (3, 5)
    for tasks, cores in ((5, 16), (100, 3), (2, 2)):
        w, t = cohort.local_sizes(tasks, cores)
        assert w * t <= cores


def test_one_progress_bar_over_the_studies_on_a_terminal(cluster, tmp_path, capsys, monkeypatch):
    rows = ["id,anatomical,functional"]
    for seed in range(3):
        a, f = write_study(tmp_path, f"p{seed}", seed)
        rows.append(f"p{seed},{a},{f}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["batch", str(tmp_path / "manifest.csv"), "-o", str(tmp_path / "out"), "--scheduler",
                 cluster[0].scheduler_address, "--metric-set", "quick"]) == 0
    captured = capsys.readouterr()
    assert "studies" in captured.err and "3/3" in captured.err
    assert "Dask dashboard:" in captured.out and "3 ok, 0 skipped" in captured.out


def test_ctrl_c_keeps_the_finished_studies_and_a_rerun_does_the_rest(cluster, tmp_path, capsys):
    rows = ["id,anatomical,functional"]
    for seed in range(12):
        a, f = write_study(tmp_path, f"c{seed}", seed % 6)
        rows.append(f"c{seed},{a},{f}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["batch", str(tmp_path / "manifest.csv"), "-o", str(out), "--scheduler", cluster[0].scheduler_address, "-q"]

    def ctrl_c():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(out.glob("*/done.json")):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)          # as Ctrl-C: batch's handler, in the main thread

    thread = threading.Thread(target=ctrl_c, daemon=True)
    thread.start()
    assert main(argv) == 130
    thread.join()
    err = capsys.readouterr().err
    assert err.startswith("medicalfusion: interrupted; the studies finished so far are kept") and err.count("\n") == 1
    assert not (out / "summary.csv").exists()
    assert main(argv) == 0
    status = [r["status"] for r in read_csv(out / "summary.csv")]
    assert len(status) == 12 and "skipped" in status and "ok" in status and set(status) <= {"ok", "skipped"}
    assert leftovers(out) == []
    assert all(cohort.verified(out / f"c{i}", json.loads((out / f"c{i}" / "done.json").read_text())["options"])
               for i in range(12))
