"""``medicalfusion batch`` on a real Dask cluster: a scheduler and two worker processes started here
on loopback (distributed.LocalCluster, processes=True), never a mock.

One cohort of tiny synthetic studies runs once for the module (a broken study, a bad manifest value,
and a worker killed with SIGKILL while it writes a study); the tests then check its outputs against
single ``medicalfusion fuse`` runs (bit for bit), the kill, a rerun, and --methods ranking.

A second cohort mixes a file study with studies read from a real Orthanc (scripts/orthanc.py, with
a login; skipped without Orthanc unless MEDICALFUSION_REQUIRE_PACS=1): --output-dicom and --store,
checked against single ``fuse --pacs`` runs, on the PACS (the series stored once, never twice on a
rerun) and after a run cut short between the store and its done.json.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import pathlib
import secrets
import shutil
import signal
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

distributed = pytest.importorskip("distributed", reason="the cohort extra (dask[distributed]) is not installed")

from medicalfusion_tools import cohort  # noqa: E402
from MedicalFusionLib.cli import main  # noqa: E402
from MedicalFusionLib.metrics import MetricInfo  # noqa: E402
from MedicalFusionLib.io.outputs import PAUSE_FILE_ENV  # noqa: E402

from conftest import REPO  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
import orthanc  # noqa: E402

VICTIM = "victim"          # the study whose worker is killed while it writes its fused volume
#: The login of the PACS cohort's Orthanc, in the environment of the test and of the workers.
PACS_USER, PACS_PASSWORD = "cohort", "pw-" + secrets.token_hex(8)
REQUIRE_PACS = os.environ.get("MEDICALFUSION_REQUIRE_PACS") == "1"    # set by `make test`: fail, never skip


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


@contextlib.contextmanager
def workers_env(address: str, env: dict, thread_target):
    """The cluster's workers with ``env`` set for the block, ``thread_target`` started beside it (it
    watches the run: sends the interrupt, kills the paused worker); the workers alive at the end
    get their variables back (a killed worker's restart has the nanny's environment anyway)."""
    def set_env(values: dict) -> dict:          # runs in each worker (nested: Dask sends it by value)
        import os as worker_os  # noqa: PLC0415

        old = {k: worker_os.environ.get(k) for k in values}
        for k, v in values.items():
            if v is None:
                worker_os.environ.pop(k, None)
            else:
                worker_os.environ[k] = v
        return old

    with distributed.Client(address) as client:
        saved = client.run(set_env, env)
        thread = threading.Thread(target=thread_target, daemon=True)
        thread.start()
        try:
            yield thread
        finally:
            client.run(set_env, next(iter(saved.values())))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two worker processes on 127.0.0.1; the pause hook armed for VICTIM; the
    PACS login in the environment (the workers' too: they read it as fuse does)."""
    pause_file = tmp_path_factory.mktemp("pause") / "pid"
    env = {cohort.TEST_PAUSE_ENV: f"{VICTIM}:write:output", PAUSE_FILE_ENV: str(pause_file),
           "MEDICALFUSION_PACS_USER": PACS_USER, "MEDICALFUSION_PACS_PASSWORD": PACS_PASSWORD}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
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
    ("id,anatomical-series\n", "no column functional-series"),
    ("id,pacs\n", "no column anatomical, functional"),
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

    # c0 is held at its output's write (the pause hook, armed in the workers for this test only) until
    # the Ctrl-C has been handled, so the batch cannot finish before it whatever the machine's load.
    pause_file = tmp_path / "pause"
    env = {cohort.TEST_PAUSE_ENV: "c0:write:output", PAUSE_FILE_ENV: str(pause_file)}

    def ctrl_c():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (list(out.glob("*/done.json")) and pause_file.is_file()
                                                   and pause_file.read_text().strip()):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)          # as Ctrl-C: batch's handler, in the main thread

    # SIGINT as a terminal has it: a background job (`make test &`, CI under nohup) inherits it
    # ignored, and batch keeps an ignored SIGINT ignored, as the CLI does
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with workers_env(cluster[0].scheduler_address, env, ctrl_c) as thread:
            rc = main(argv)
            thread.join()
    finally:
        signal.signal(signal.SIGINT, inherited)
        pause_file.unlink(missing_ok=True)             # c0's run goes on (its task was cancelled; the rerun waits on its lock)
    assert rc == 130
    err = capsys.readouterr().err
    assert err.startswith("medicalfusion: interrupted; the studies finished so far are kept") and err.count("\n") == 1
    assert not (out / "summary.csv").exists()
    assert main(argv) == 0
    status = [r["status"] for r in read_csv(out / "summary.csv")]
    assert len(status) == 12 and "skipped" in status and "ok" in status and set(status) <= {"ok", "skipped"}
    assert leftovers(out) == []
    assert all(cohort.verified(out / f"c{i}", json.loads((out / f"c{i}" / "done.json").read_text())["options"])
               for i in range(12))


# --------------------------------------------------------------------------------------------------
# studies read from a PACS, --output-dicom, --store


def fused_series(server, study_uid: str) -> dict:
    return {uid: v for uid, v in server.series_uids(study_uid).items() if v[2].startswith("Fused")}


def dicom_slices(folder: pathlib.Path) -> list:
    """(Image Position, pixel bytes) of every file of a fused DICOM folder, in instance order."""
    import pydicom

    found = [pydicom.dcmread(str(p)) for p in folder.iterdir()]
    return [(tuple(float(v) for v in ds.ImagePositionPatient), ds.PixelData)
            for ds in sorted(found, key=lambda ds: int(ds.InstanceNumber))]


def series_of(folder: pathlib.Path) -> set:
    import pydicom

    return {pydicom.dcmread(str(p), stop_before_pixels=True).SeriesInstanceUID for p in folder.iterdir()}


@pytest.fixture(scope="module")
def pacs_cohort(cluster, tmp_path_factory):
    """An Orthanc with a login holding two tiny CT + PET studies (test_pacs._synthetic_study), and
    a cohort run once with --output-dicom: f0 (files), p1 (the first study's series, pacs column,
    store yes), p2 (a functional series of the second study with an anatomical series UID that is
    not on the PACS; its PACS from batch --pacs, store yes)."""
    why = orthanc.missing()
    if why:
        (pytest.fail if REQUIRE_PACS else pytest.skip)(why)
    from test_pacs import _synthetic_study

    server = orthanc.Orthanc(user=PACS_USER, password=PACS_PASSWORD).start()
    try:
        data = tmp_path_factory.mktemp("pacs-data")
        uids = {}
        for name in ("A", "B"):
            uids[name] = _synthetic_study(data / name, f"MF-COHORT-{name}")         # (study, ct, pet)
            server.upload(data / name / "ct", data / name / "pet")
        a, f = write_study(data, "f0", 1)
        missing = "1.2.826.0.1.3680043.8.498.4242"
        rows = ["id,anatomical,functional,pacs,anatomical-series,functional-series,store",
                f"f0,{a},{f},,,,",
                f"p1,,,{server.dicomweb},{uids['A'][1]},{uids['A'][2]},yes",
                f"p2,,,,{missing},{uids['B'][2]},yes"]
        (data / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        out = tmp_path_factory.mktemp("pacs-runs") / "cohort"
        argv = ["batch", str(data / "manifest.csv"), "--output", str(out), "--scheduler", cluster[0].scheduler_address,
                "--output-dicom", "--pacs", server.dicomweb, "-q"]
        before = server.series_uids()
        rc = main(argv)
        yield {"rc": rc, "server": server, "uids": uids, "data": data, "out": out, "argv": argv, "before": before,
               "after": server.series_uids(), "missing": missing}
    finally:
        server.stop()


def test_pacs_and_file_studies_in_one_manifest_wrong_series_is_one_line(pacs_cohort):
    out, server = pacs_cohort["out"], pacs_cohort["server"]
    assert pacs_cohort["rc"] == 2
    summary = {r["id"]: r for r in read_csv(out / "summary.csv")}
    assert [(s, summary[s]["status"]) for s in summary] == [("f0", "ok"), ("p1", "ok"), ("p2", "failed")]
    message = summary["p2"]["message"]
    assert f"PACS {server.dicomweb}: no series {pacs_cohort['missing']}" in message and "\n" not in message
    assert not (out / "p2").exists()
    assert [r["id"] for r in read_csv(out / "cohort_metrics.csv")] == ["f0", "p1"]
    # p1's fused series is on the PACS once, in its study: the very series of DIR/p1/dicom/, in done.json
    study_a = pacs_cohort["uids"]["A"][0]
    new = {u: v for u, v in pacs_cohort["after"].items() if u not in pacs_cohort["before"]}
    assert len(new) == 1
    uid, (study, count, description) = next(iter(new.items()))
    assert study == study_a and description.startswith("Fused") and count == 40
    done = json.loads((out / "p1" / "done.json").read_text())
    assert done["stored"]["series"] == uid and done["stored"]["instances"] == 40
    assert series_of(out / "p1" / "dicom") == {uid} and uid in summary["p1"]["message"]
    assert "stored" not in json.loads((out / "f0" / "done.json").read_text())
    assert not (out / "p1" / cohort.STORE_RECORD).exists()


def test_pacs_cohort_outputs_equal_single_fuse_runs_bit_for_bit(pacs_cohort, tmp_path):
    out, server, uids, data = pacs_cohort["out"], pacs_cohort["server"], pacs_cohort["uids"], pacs_cohort["data"]
    runs = {"p1": ["--pacs", server.dicomweb, "--anatomical-series", uids["A"][1], "--functional-series", uids["A"][2]],
            "f0": ["-a", str(data / "f0_mr.nrrd"), "-f", str(data / "f0_pet.nrrd")]}
    for sid, inputs in runs.items():
        single = tmp_path / sid
        single.mkdir()
        assert main(["fuse", *inputs, "-m", "lp", "-o", str(single / "fused.nrrd"), "--metrics",
                     str(single / "metrics.csv"), "--output-dicom", str(single / "dicom"), "-q"]) == 0
        assert (out / sid / "fused.nrrd").read_bytes() == (single / "fused.nrrd").read_bytes()
        batch_rows = [r for r in read_csv(out / sid / "metrics.csv") if r["metric"] != "seconds"]
        single_rows = [r for r in read_csv(single / "metrics.csv") if r["metric"] != "seconds"]
        assert batch_rows == single_rows and len(batch_rows) > 16
        # the DICOM series: the same slices at the same positions, pixel data byte for byte (new UIDs each run)
        assert dicom_slices(out / sid / "dicom") == dicom_slices(single / "dicom")
        done = json.loads((out / sid / "done.json").read_text())
        files = sorted(p.relative_to(out / sid).as_posix() for p in (out / sid / "dicom").iterdir())
        assert len(files) == (40 if sid == "p1" else 6) and files == sorted(f for f in done["files"] if "/" in f)
    assert fused_series(server, uids["A"][0]) == {u: v for u, v in pacs_cohort["after"].items()
                                                  if u not in pacs_cohort["before"]}     # no store by fuse here


def test_pacs_cohort_rerun_skips_and_never_stores_twice(pacs_cohort):
    out, server, argv = pacs_cohort["out"], pacs_cohort["server"], pacs_cohort["argv"]
    study_a = pacs_cohort["uids"]["A"][0]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "p1").rglob("*") if p.is_file()}
    # a rerun: f0 and p1 verified (the DICOM files too) and skipped; nothing stored again
    assert main(argv) == 2
    status = {r["id"]: r["status"] for r in read_csv(out / "summary.csv")}
    assert status == {"f0": "skipped", "p1": "skipped", "p2": "failed"}
    assert server.series_uids() == pacs_cohort["after"]
    assert {p: p.stat().st_mtime_ns for p in (out / "p1").rglob("*") if p.is_file()} == stamps
    first = json.loads((out / "p1" / "done.json").read_text())["stored"]["series"]
    # a DICOM file changed: p1 is redone, and its new series replaces the one stored before (not beside it)
    victim = sorted((out / "p1" / "dicom").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(argv) == 2
    assert {r["id"]: r["status"] for r in read_csv(out / "summary.csv")} == \
        {"f0": "skipped", "p1": "ok", "p2": "failed"}
    second = json.loads((out / "p1" / "done.json").read_text())["stored"]["series"]
    assert second != first and list(fused_series(server, study_a)) == [second]
    assert series_of(out / "p1" / "dicom") == {second} and leftovers(out) == []
    # cut short between the store and its done.json (a worker killed there): the record of the series
    # being stored is all that is left; the rerun removes that series before it stores the study again
    done = json.loads((out / "p1" / "done.json").read_text())
    (out / "p1" / "done.json").unlink()
    (out / "p1" / cohort.STORE_RECORD).write_text(json.dumps({"series": [{**done["stored"], "state": "storing"}]}))
    assert main(argv) == 2
    third = json.loads((out / "p1" / "done.json").read_text())["stored"]["series"]
    assert third not in (first, second) and list(fused_series(server, study_a)) == [third]
    assert not (out / "p1" / cohort.STORE_RECORD).exists()
    assert cohort.verified(out / "p1", done["options"], done["outputs"])


def test_manifest_rows_naming_pacs_series(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDICALFUSION_PACS_USER", raising=False)
    monkeypatch.delenv("MEDICALFUSION_PACS_PASSWORD", raising=False)
    (tmp_path / "m.csv").write_text(
        "id,anatomical,functional,pacs,anatomical-series,functional-series,store\n"
        "files,a.nrrd,b.nrrd,,,,\n"
        "own,,,http://pacs.example:8042/dicom-web,1.2.3,1.2.4,\n"
        "deflt,,,,1.2.5,1.2.6,no\n"
        "both,a.nrrd,b.nrrd,,1.2.7,1.2.8,\n"
        "storefiles,a.nrrd,b.nrrd,,,,yes\n"
        "badstore,,,,1.2.9,1.2.10,maybe\n", encoding="utf-8")
    tasks = {t.id: t for t in cohort.plan(tmp_path / "m.csv", tmp_path / "out", pacs="http://default:8042/dicom-web",
                                          store=True, output_dicom=True)}
    assert tasks["files"].error.startswith("store: only a study read from a PACS") and "set its store cell to no" \
        in tasks["files"].error                           # batch --store: a file study cannot be stored
    assert tasks["own"].error == "" and tasks["own"].options == [
        "--pacs", "http://pacs.example:8042/dicom-web", "--anatomical-series", "1.2.3", "--functional-series",
        "1.2.4", "--method", "lp", "--metric-set", "quick", "--store"]
    assert tasks["own"].argv[-2:] == ["--output-dicom", str(tmp_path / "out" / "own" / "dicom")]
    assert tasks["own"].outputs == ["fused.nrrd", "metrics.csv", "dicom/"]
    assert tasks["deflt"].error == "" and tasks["deflt"].options[-2:] == ["--pacs", "http://default:8042/dicom-web"]
    assert "not both" in tasks["both"].error
    assert "only a study read from a PACS" in tasks["storefiles"].error
    assert "neither yes nor no" in tasks["badstore"].error
    multi = cohort.plan(tmp_path / "m.csv", tmp_path / "out", methods=["lp", "max"], output_dicom=True)
    assert [t.argv[-1] for t in multi if t.id == "own"] == [str(tmp_path / "out" / "own" / m / "dicom")
                                                            for m in ("lp", "max")]
    plain = {t.id: t for t in cohort.plan(tmp_path / "m.csv", tmp_path / "out")}
    assert plain["files"].error == "" and "--store" not in plain["own"].options
    assert "need --pacs URL" in plain["deflt"].error      # no pacs cell and no batch --pacs
    (tmp_path / "s.csv").write_text("id,anatomical-series,functional-series\nx,1.2.3,1.2.4\n", encoding="utf-8")
    only = cohort.plan(tmp_path / "s.csv", tmp_path / "out", pacs="http://default:8042/dicom-web")
    assert only[0].error == "" and "--store" not in only[0].options


def test_batch_store_without_login_pair_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDICALFUSION_PACS_USER", "someone")
    monkeypatch.delenv("MEDICALFUSION_PACS_PASSWORD", raising=False)
    (tmp_path / "m.csv").write_text("id,anatomical-series,functional-series\nx,1.2.3,1.2.4\n", encoding="utf-8")
    assert main(["batch", str(tmp_path / "m.csv"), "-o", str(tmp_path / "out"), "--pacs",
                 "http://127.0.0.1:9/dicom-web", "--store"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medicalfusion: error: set both MEDICALFUSION_PACS_USER") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_worker_killed_between_store_and_done_json_stores_once(pacs_cohort, cluster, tmp_path):
    """A worker SIGKILLed after its study's series was stored and put in place, before its done.json:
    Dask runs the study again on a worker; that run removes the series the killed one stored (its
    record) before it stores the study again, so the PACS gets the fused series once."""
    server, uids = pacs_cohort["server"], pacs_cohort["uids"]
    (tmp_path / "m.csv").write_text("id,pacs,anatomical-series,functional-series,store\n"
                                    f"k1,{server.dicomweb},{uids['B'][1]},{uids['B'][2]},yes\n", encoding="utf-8")
    pause_file = tmp_path / "pause"
    env = {cohort.TEST_PAUSE_ENV: "k1:write:done marker", PAUSE_FILE_ENV: str(pause_file)}
    before = fused_series(server, uids["B"][0])
    killed = {}

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if pause_file.is_file() and pause_file.read_text().strip():
                killed["stored"] = fused_series(server, uids["B"][0])          # stored, no done.json yet
                killed["record"] = (tmp_path / "out" / "k1" / cohort.STORE_RECORD).is_file()
                killed["done"] = (tmp_path / "out" / "k1" / "done.json").exists()
                os.kill(int(pause_file.read_text().split()[0]), signal.SIGKILL)
                return
            time.sleep(0.05)

    with workers_env(cluster[0].scheduler_address, env, killer) as thread:
        rc = main(["batch", str(tmp_path / "m.csv"), "-o", str(tmp_path / "out"), "--scheduler",
                   cluster[0].scheduler_address, "-q"])
        thread.join(timeout=5)
    assert killed.get("record") and not killed["done"] and len(killed["stored"]) == len(before) + 1
    assert rc == 0
    done = json.loads((tmp_path / "out" / "k1" / "done.json").read_text())
    after = fused_series(server, uids["B"][0])
    assert set(after) - set(before) == {done["stored"]["series"]}            # one series: the retry's
    assert not set(killed["stored"]) - set(before) <= set(after)               # the killed run's series is gone
    assert not (tmp_path / "out" / "k1" / cohort.STORE_RECORD).exists() and leftovers(tmp_path / "out") == []
