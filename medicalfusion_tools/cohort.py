"""``medicalfusion batch MANIFEST.csv --output DIR``: every study of a cohort fused on Dask distributed.

One way through: a study is one ``medicalfusion fuse`` run. Its manifest row becomes a ``fuse``
command line (:func:`study_argv`), parsed by the CLI's own parser and run by the CLI's own
:func:`~MedicalFusionLib.cli.fuse_one` inside a Dask worker; nothing here fuses, reads or writes an
image by itself. What this module adds around that:

- the manifest (:func:`read_manifest`): a CSV with a header; columns ``id``, ``anatomical``,
  ``functional`` (or ``pacs``, ``anatomical-series``, ``functional-series``: a study read from a
  PACS, ``batch --pacs`` for an empty pacs cell; rows of both kinds may be mixed), optional
  ``method``, ``store`` (yes / no; empty: ``batch --store``) and any other ``fuse`` option by its
  long name (``window`` "LO HI", ``register`` rigid, ``colormap``, ``metric-set``...); relative paths
  are relative to the manifest's folder. The options ``batch`` sets itself (output, metrics,
  preview, output-dicom, quiet, threads, save-transform) are refused as columns;
- per study: its folder ``DIR/<id>/`` (``DIR/<id>/<method>/`` with ``--methods``) holds what ``fuse``
  writes (``fused.nrrd``, ``metrics.csv``; ``preview.png`` with ``--preview``), put in place
  together by the run's OutputSet (with ``--output-dicom`` the fused DICOM series in ``dicom/``
  too; with --store the series is stored on the study's PACS first, as ``fuse`` does it), then
  ``done.json`` (the study's options and outputs, the sha256 of every file, the stored series),
  written last. What a study stores is recorded (:data:`STORE_RECORD`, then ``done.json``) so that
  a rerun never stores it twice, even after a worker killed between the store and ``done.json``.
  A rerun skips a study whose ``done.json`` matches its options and files and redoes every other one. A study runs under a lock (``DIR/.locks/``, released by the OS when its
  process dies), so a task that Dask runs again after a lost worker never writes beside another;
  leftovers of a killed run (``.mf-tmp-*``) are removed under that lock before the study is redone;
- the cohort: ``DIR/summary.csv`` (id, method, status ok / failed / skipped, message, seconds),
  ``DIR/cohort_metrics.csv`` (every study's metrics, one row per study and method) and, with
  ``--methods``, ``DIR/ranking.csv`` (mean rank over studies and metrics, see :func:`rank_methods`);
- the workers: a LocalCluster sized to the machine (worker processes x torch threads <= cores) or
  the scheduler given by ``--scheduler``; each worker keeps the methods it built
  (:func:`~MedicalFusionLib.methods.registry.keep_built`), so a network's weights are loaded once per
  worker, not once per study.

Dask is imported only here and only when a batch runs (the ``cohort`` extra); the Slicer extension
never imports this module.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import pathlib
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

from MedicalFusionLib.errors import FusionError
from MedicalFusionLib.options import DEFAULT_METRIC_SET
from MedicalFusionLib.io.outputs import sha256_of

REQUIRED_COLUMNS = ("id",)
#: The two inputs of a study, one pair or the other (or both columns, each row filling one pair):
#: files or DICOM folders, or two series of a PACS (``fuse --pacs URL --anatomical-series UID
#: --functional-series UID``; ``pacs`` column, else ``batch --pacs``).
FILE_COLUMNS = ("anatomical", "functional")
SERIES_COLUMNS = ("anatomical-series", "functional-series")
#: ``fuse`` options that ``batch`` sets for every study: its threads, its progress, and its file outputs
#: (every row of cli.FUSE_OUTPUTS, so an output added to ``fuse`` is refused as a column until batch
#: places it in the study's folder), the DICOM series among them (``batch --output-dicom``:
#: ``DIR/<id>/dicom/``). ``store`` is a column (yes / no; empty: ``batch --store``).
SET_BY_BATCH = ("quiet", "threads", "output_dicom")
DICOM_FOLDER = "dicom"
#: The fused series a study's run is about to store, or stored without a done.json vouching for it
#: yet (a run killed between the store and its done.json), and the one an earlier complete run
#: stored (kept here while the study is redone): removed from the PACS before the study stores again.
STORE_RECORD = ".mf-pacs-series.json"
#: ``fuse`` options that name an input file: relative to the manifest's folder.
PATH_OPTIONS = ("anatomical", "functional", "transform", "register_with")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DONE_NAME = "done.json"
LOCK_FOLDER = ".locks"
SUMMARY_COLUMNS = ("id", "method", "status", "message", "seconds")
TRUE_WORDS, FALSE_WORDS = ("1", "yes", "y", "true", "on", "x"), ("", "0", "no", "n", "false", "off")
#: Metrics of the metrics table (metrics.METRICS, which gives every metric's direction) left out of
#: the ranking, with the reason. Every other metric of that table counts, so a metric added there
#: (e.g. a colour-fidelity one) is ranked without a change here.
NOT_RANKED = {
    "MI_bits": "MI_nats in other units (counted once)",
    "SSIM_avg": "half of SSIM_sum (counted once)",
    "FMI_pixel": "not in the reference evaluator (CDDFuse's Evaluator.py)",
    "FMI_gradient": "not in the reference evaluator (CDDFuse's Evaluator.py)",
    "ARI": "not in the reference evaluator (CDDFuse's Evaluator.py)",
}
#: Test hook: ``<study id>:<pause point>`` makes that study's first run pause at the OutputSet's
#: pause point (io.outputs.pause_point) until its process is killed; later runs (the pause file exists) go on.
TEST_PAUSE_ENV = "MEDICALFUSION_TEST_COHORT_PAUSE"


# --------------------------------------------------------------------------------------------------
# the manifest -> one fuse command line per study and method


@dataclass
class Task:
    """One ``fuse`` run of the cohort: a study with one method."""

    id: str
    method: str
    folder: str                       # DIR/<id>/ or DIR/<id>/<method>/
    options: list                     # the study's fuse options (inputs, method and --store included)
    argv: list                        # options + the outputs batch sets
    error: str = ""                   # a bad manifest value: the study fails without running
    lock: str = ""
    outputs: list = field(default_factory=list)   # what batch asks of it: fused.nrrd, ..., dicom/


@dataclass
class Outcome:
    id: str
    method: str
    status: str                       # ok | failed | skipped
    message: str = ""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def _parser():
    """The CLI's parser (built once per process; parsing leaves it unchanged)."""
    from MedicalFusionLib.cli import build_parser  # noqa: PLC0415

    return build_parser()


@functools.lru_cache(maxsize=1)
def _fuse_actions() -> dict:
    """``{long option name without dashes: argparse action}`` of the ``fuse`` subcommand."""
    parser = _parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")  # noqa: SLF001
    actions = {}
    for action in sub.choices["fuse"]._actions:  # noqa: SLF001
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                actions[opt[2:]] = action
    return actions


def _set_by_batch() -> tuple:
    from MedicalFusionLib.cli import FUSE_OUTPUTS  # noqa: PLC0415

    return SET_BY_BATCH + tuple(dest for dest, _what, _kind in FUSE_OUTPUTS)


def _column_key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def parse_fuse_argv(argv: list) -> tuple[object | None, str]:
    """``(args, "")`` from the CLI's own parser, or ``(None, its one-line error)``."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _parser().parse_args(argv), ""
    except SystemExit:
        text = " ".join(err.getvalue().split()).replace("medicalfusion: error: ", "")
        return None, re.sub(r" \(see '.*?--help'\)$", "", text) or "bad options"


def read_manifest(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """The manifest's rows (``{column key: value}``, empty rows left out) and its option columns;
    FusionError for a missing file, a missing or unknown column, a missing, bad or repeated id."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FusionError(f"manifest {p} does not exist or is not a file: give a CSV file with a header "
                          "(id,anatomical,functional[,method,...])")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FusionError(f"manifest {p} cannot be read ({type(exc).__name__}): give a UTF-8 CSV file") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise FusionError(f"manifest {p} is empty: give a CSV file with a header (id,anatomical,functional)")
    keys = [_column_key(h) for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in keys]
    lacking = [[c for c in pair if c not in keys] for pair in (FILE_COLUMNS, SERIES_COLUMNS)]
    if missing or all(lacking):
        missing += min(lacking, key=len)
        raise FusionError(f"manifest {p} has no column {', '.join(missing)}: its header must name id and the "
                          "inputs: anatomical and functional (files or DICOM folders), or anatomical-series and "
                          "functional-series (series of a PACS), or all four (then any fuse option by its long name)")
    actions = _fuse_actions()
    for k in keys:
        if k not in actions and k != "id":
            raise FusionError(f"manifest {p}: column '{k}' is not a fuse option: use id, anatomical, functional "
                              "(or pacs, anatomical-series, functional-series) and the long names of 'medicalfusion "
                              "fuse --help' (e.g. method, window, register, store)")
        if k in actions and actions[k].dest in _set_by_batch():
            raise FusionError(f"manifest {p}: column '{k}' is set by batch for every study (outputs go to "
                              "DIR/<id>/): remove the column")
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise FusionError(f"manifest {p}: column {', '.join(dup)} appears twice: keep one")
    rows, seen = [], {}
    for line, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        if len(values) > len(keys):
            raise FusionError(f"manifest {p} line {line}: {len(values)} values for {len(keys)} columns: "
                              "quote values that hold a comma")
        row = {k: (values[i].strip() if i < len(values) else "") for i, k in enumerate(keys)}
        sid = row["id"]
        if not ID_PATTERN.match(sid):
            raise FusionError(f"manifest {p} line {line}: id '{sid}' must start with a letter or digit and hold only "
                              "letters, digits, '.', '_' and '-' (it names the study's output folder)")
        if sid.casefold() in seen:
            raise FusionError(f"manifest {p} line {line}: id '{sid}' is also on line {seen[sid.casefold()]}: "
                              "give every study its own id")
        seen[sid.casefold()] = line
        rows.append(row)
    if not rows:
        raise FusionError(f"manifest {p} lists no study: add one row per study under the header")
    return rows, [k for k in keys if k != "id"]


def study_options(row: dict, manifest_dir: pathlib.Path, method: str | None, metric_set: str,
                  pacs: str | None = None, store: bool = False) -> list:
    """The ``fuse`` options of one manifest row (without the outputs), in column order; ``method``
    (one of --methods, or --method for a row without one) replaces the row's method column,
    ``metric_set`` fills an empty metric-set column, ``pacs`` an empty pacs column of a row that
    names series, and ``store`` an empty store column. A yes/no column is a flag (``store``,
    ``insecure``); ValueError for a value that is neither, and for a study to store whose inputs
    are files."""
    actions = _fuse_actions()
    argv = []
    for key, value in row.items():
        if key == "id" or (key == "method" and method) or key == "store":
            continue
        action = actions[key]
        opt = f"--{key}"
        if action.nargs == 0:                           # a flag: yes / no
            if value.lower() in TRUE_WORDS:
                argv.append(opt)
            elif value.lower() not in FALSE_WORDS:
                raise ValueError(f"column {key}: '{value}' is neither yes nor no")
            continue
        if value == "":
            continue                                    # the option's default
        if action.dest in PATH_OPTIONS and "://" not in value and value != "-":
            value = os.path.abspath(os.path.join(manifest_dir, os.path.expanduser(value)))
        tokens = value.replace(",", " ").split() if action.nargs not in (None, 1) else [value]
        argv += [opt, *tokens]
    if method:
        argv += ["--method", method]
    if not row.get("metric-set"):
        argv += ["--metric-set", metric_set]
    from_pacs = any(row.get(c) for c in SERIES_COLUMNS)
    if from_pacs and not row.get("pacs") and pacs:
        argv += ["--pacs", pacs]
    cell = row.get("store", "").lower()
    if cell not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"column store: '{row['store']}' is neither yes nor no")
    wanted = (cell in TRUE_WORDS) if cell else store
    if wanted:
        if not from_pacs:
            raise ValueError("store: only a study read from a PACS (pacs, anatomical-series, functional-series) is "
                             "stored back to it, and this study's inputs are files: set its store cell to no")
        argv.append("--store")
    return argv


def plan(manifest: str | os.PathLike, output: str | os.PathLike, methods: list | None = None,
         method: str = "lp", metric_set: str = DEFAULT_METRIC_SET, preview: bool = False,
         output_dicom: bool = False, pacs: str | None = None, store: bool = False) -> list[Task]:
    """Every task of the cohort: a study x method with its ``fuse`` command line, parsed by the
    CLI's parser and checked by fuse's input checks here already (a bad value fails that study
    only, before any work). ``pacs``: the PACS of rows that name series and no pacs; ``store``:
    store every PACS study whose store cell is empty; ``output_dicom``: each study's fused series
    also as DICOM in its folder's ``dicom/``."""
    from MedicalFusionLib.io import pacs as pacs_io  # noqa: PLC0415

    rows, columns = read_manifest(manifest)
    if methods and "method" in columns:
        raise FusionError("the manifest has a method column and --methods was given: drop one of them")
    manifest_dir = pathlib.Path(manifest).resolve().parent
    out = pathlib.Path(output).resolve()
    tasks = []
    for row in rows:
        for m in (methods or [None]):
            folder = out / row["id"] / m if m else out / row["id"]
            chosen = m or row.get("method") or method
            try:
                options = study_options(row, manifest_dir, m or (None if row.get("method") else method), metric_set,
                                        pacs, store)
            except ValueError as exc:
                tasks.append(Task(row["id"], chosen, str(folder), [], [], error=str(exc)))
                continue
            outputs = ["fused.nrrd", "metrics.csv"] + (["preview.png"] if preview else []) + \
                ([DICOM_FOLDER + "/"] if output_dicom else [])
            argv = ["fuse", *options, "--output", str(folder / "fused.nrrd"), "--metrics", str(folder / "metrics.csv"),
                    "--quiet"] + (["--preview", str(folder / "preview.png")] if preview else []) + \
                (["--output-dicom", str(folder / DICOM_FOLDER)] if output_dicom else [])
            args, error = parse_fuse_argv(argv)
            if args is not None:
                chosen = args.method
                try:
                    pacs_io.check_arguments(args)       # files or series (not both), the URL, the login's variables
                except FusionError as exc:
                    error = str(exc)
            lock = out / LOCK_FOLDER / (row["id"] + (f"__{m}" if m else "") + ".lock")
            tasks.append(Task(row["id"], chosen, str(folder), options, argv, error=error, lock=str(lock),
                              outputs=outputs))
    return tasks


# --------------------------------------------------------------------------------------------------
# one study, in a worker


def verified(folder: str | os.PathLike, options: list, outputs: list | None = None) -> bool:
    """True when ``folder/done.json`` was written for these options (and these outputs, when
    given), every file it lists is there with its recorded sha256, an output folder (``dicom/``)
    holds just the files listed, and a study that stores (``--store``) has its stored series
    recorded: a complete study from an earlier run."""
    folder = pathlib.Path(folder)
    try:
        done = json.loads((folder / DONE_NAME).read_text(encoding="utf-8"))
        if done.get("options") != options or not done.get("files"):
            return False
        if outputs is not None and done.get("outputs") != outputs:
            return False
        if "--store" in options and not (done.get("stored") or {}).get("series"):
            return False
        for name in (o for o in done.get("outputs", []) if o.endswith("/")):
            held = {p.relative_to(folder).as_posix() for p in (folder / name).rglob("*") if not p.is_dir()}
            if held != {f for f in done["files"] if f.startswith(name)}:
                return False
        return all(sha256_of(folder / name) == digest for name, digest in done["files"].items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def written_files(folder: pathlib.Path, written: list) -> dict:
    """``{path relative to the study's folder: sha256}`` of what a run put in place (every file
    of an output folder)."""
    files = {}
    for p in written:
        p = pathlib.Path(p)
        for f in sorted(q for q in p.rglob("*") if not q.is_dir()) if p.is_dir() else [p]:
            files[f.relative_to(folder).as_posix()] = sha256_of(f)
    return files


@contextlib.contextmanager
def study_lock(path: str):
    """Hold an exclusive lock on ``path`` for the block (POSIX flock: the OS releases it when the
    process dies, so a killed worker never leaves a study locked). Without fcntl (Windows) the
    block runs unlocked."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_leftovers(folder: pathlib.Path) -> None:
    """Temporaries and backups of an OutputSet whose process was killed (held lock: none is live)."""
    from MedicalFusionLib.io.outputs import BACKUP_PREFIX, TEMP_PREFIX  # noqa: PLC0415

    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith((TEMP_PREFIX, BACKUP_PREFIX)):
                with contextlib.suppress(OSError):
                    if (folder / name).is_dir() and not (folder / name).is_symlink():
                        shutil.rmtree(folder / name)        # a DICOM folder being written, or set aside
                    else:
                        os.unlink(folder / name)


# the PACS side of a study (--store): what it stored is recorded, so that it is never stored twice


def _read_record(folder: pathlib.Path) -> list:
    try:
        return list(json.loads((folder / STORE_RECORD).read_text(encoding="utf-8")).get("series", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def _write_record(folder: pathlib.Path, entries: list) -> None:
    from MedicalFusionLib.io.outputs import OutputSet  # noqa: PLC0415

    if not entries:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / STORE_RECORD)
        return
    with OutputSet() as out:
        out.add_text(folder / STORE_RECORD, json.dumps({"series": entries}, indent=1) + "\n", "PACS record")
        out.commit()


def _keep_stored_in_record(folder: pathlib.Path) -> None:
    """Before a study is redone (its done.json removed): the series its earlier run stored goes
    into the record, to be replaced (removed) when the study stores again."""
    try:
        stored = json.loads((folder / DONE_NAME).read_text(encoding="utf-8")).get("stored")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(stored, dict) and stored.get("series") and stored.get("pacs"):
        entries = [e for e in _read_record(folder) if e.get("series") != stored["series"]]
        _write_record(folder, entries + [{**stored, "state": "stored"}])


def _clear_record(folder: pathlib.Path, args) -> None:
    """Remove from the PACS every series the record names that is not complete and vouched for
    (a store cut short), and, when this run stores, the series an earlier run stored (it is
    replaced); FusionError when one cannot be removed (the record keeps it for the next run)."""
    from MedicalFusionLib.io.pacs import DEFAULT_TIMEOUT, Pacs, StoredSeries  # noqa: PLC0415

    entries = _read_record(folder)
    left = []
    for e in entries:
        if e.get("state") == "stored" and not args.store:
            continue                      # a complete series of an earlier run, not replaced by this one: kept
        client = Pacs(e["pacs"], insecure=args.insecure, timeout=args.pacs_timeout or DEFAULT_TIMEOUT)
        series = StoredSeries(str(e.get("study", "")), str(e["series"]))
        if client._series_gone(series):                                     # noqa: SLF001
            continue
        note = client.remove(series)
        if not client._series_gone(series):                                 # noqa: SLF001
            left.append(e)
            _write_record(folder, left + entries[entries.index(e) + 1:])
            what = "an earlier run of this study stored" if e.get("state") == "stored" else \
                "a run of this study cut short was storing"
            raise FusionError(f"the fused series {e['series']} that {what} on PACS {client.shown} must be removed "
                              f"before the study is stored again: {note}; then rerun")
    _write_record(folder, left)


def _record_store(folder: pathlib.Path, args, datasets) -> None:
    """Just before the store (pacs.commit_and_store's hook): the series about to be stored."""
    from MedicalFusionLib.io.pacs import shown_url  # noqa: PLC0415

    ds = datasets[0]
    _write_record(folder, _read_record(folder) + [{
        "pacs": shown_url(args.pacs), "study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
        "instances": len(datasets), "state": "storing"}])


def _set_aside(path: pathlib.Path) -> pathlib.Path | None:
    """An output folder of an earlier run (the study's ``dicom/``), moved aside while the study is
    redone (fuse writes a new or empty folder): put back if the run fails, removed if it succeeds."""
    from MedicalFusionLib.io.outputs import BACKUP_PREFIX  # noqa: PLC0415

    if not path.is_dir() or path.is_symlink():
        return None
    aside = path.parent / (BACKUP_PREFIX + os.urandom(4).hex())
    os.rename(path, aside)
    return aside


_configured: dict = {}


def _configure_worker(threads: int) -> None:
    """This process's torch and ITK threads, built methods kept, ITK's warnings off (once)."""
    import SimpleITK as sitk  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from MedicalFusionLib.methods.registry import keep_built  # noqa: PLC0415

    if _configured.get("threads") != threads:
        torch.set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        _configured["threads"] = threads
    if not _configured.get("kept"):
        keep_built(True)
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        _configured["kept"] = True


@contextlib.contextmanager
def _test_pause(study_id: str):
    from MedicalFusionLib.io.outputs import PAUSE_ENV, PAUSE_FILE_ENV  # noqa: PLC0415

    hook = os.environ.get(TEST_PAUSE_ENV, "")
    sid, _, point = hook.partition(":")
    marker = os.environ.get(PAUSE_FILE_ENV)
    if not hook or sid != study_id or not marker or os.path.exists(marker):
        yield
        return
    os.environ[PAUSE_ENV] = point
    try:
        yield
    finally:
        os.environ.pop(PAUSE_ENV, None)


def run_task(task: Task, threads: int) -> Outcome:
    """Run one study (in a Dask worker): skip it when its outputs are verified, else ``fuse`` it as
    the CLI does and write its done.json last. Never raises for the study's own failure: that is
    an Outcome with status 'failed' and the one-line message ``fuse`` would print."""
    from MedicalFusionLib.errors import FusionCancelled  # noqa: PLC0415

    t0 = time.perf_counter()
    if task.error:
        return Outcome(task.id, task.method, "failed", task.error)
    folder = pathlib.Path(task.folder)
    with study_lock(task.lock):
        if verified(folder, task.options, task.outputs):
            with contextlib.suppress(OSError):
                os.unlink(folder / STORE_RECORD)              # the series done.json records (killed just after it)
            return Outcome(task.id, task.method, "skipped", "outputs verified (done.json)",
                           time.perf_counter() - t0, read_metrics(folder / "metrics.csv"))
        _configure_worker(threads)
        made = [p for p in (folder.parent, folder) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(folder)
        _keep_stored_in_record(folder)
        with contextlib.suppress(OSError):
            os.unlink(folder / DONE_NAME)                     # it vouches for no file from here on
        status, message = "ok", ""
        try:
            with _test_pause(task.id):
                status, message = _fuse_and_mark(task, folder)
        except FusionError as exc:
            status, message = "failed", str(exc)
        except FusionCancelled:
            status, message = "failed", "cancelled"
        except MemoryError:
            status, message = "failed", "out of memory: give the workers more memory, or --batch-size 1 in the manifest"
        except Exception as exc:  # noqa: BLE001 - a bug of ours: one study's line, the others go on
            detail = " ".join(str(exc).split())[:300]
            status, message = "failed", f"internal error: {type(exc).__name__}: {detail} (report it)"
        if status == "failed":
            for p in reversed(made):                           # leave no empty folder behind
                with contextlib.suppress(OSError):
                    p.rmdir()
            return Outcome(task.id, task.method, status, message, time.perf_counter() - t0)
    return Outcome(task.id, task.method, "ok", message, time.perf_counter() - t0, read_metrics(folder / "metrics.csv"))


def _fuse_and_mark(task: Task, folder: pathlib.Path) -> tuple[str, str]:
    from MedicalFusionLib import __version__  # noqa: PLC0415
    from MedicalFusionLib.cli import fuse_one  # noqa: PLC0415
    from MedicalFusionLib.io.outputs import OutputSet  # noqa: PLC0415

    args, error = parse_fuse_argv(task.argv)
    if args is None:
        return "failed", error
    if folder.joinpath(STORE_RECORD).exists():
        _clear_record(folder, args)
    dicom = folder / DICOM_FOLDER
    aside = _set_aside(dicom) if args.output_dicom else None
    args.before_store = functools.partial(_record_store, folder, args)
    try:
        fuse_one(args)
    except BaseException:
        if aside is not None:
            if dicom.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(aside, dicom)
        if folder.joinpath(STORE_RECORD).exists():
            with contextlib.suppress(Exception):                # the store's own clean-up said what it did
                _clear_record(folder, args)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    stored = getattr(args, "pacs_stored", None)
    done = {"options": task.options, "outputs": task.outputs, "files": written_files(folder, args.output_set.written),
            "version": __version__}
    if stored is not None:
        done["stored"] = {"pacs": args.pacs_client.shown, "study": stored.study_uid, "series": stored.series_uid,
                          "instances": len(stored.instances)}
    with OutputSet() as out:
        out.add_text(folder / DONE_NAME, json.dumps(done, indent=1) + "\n", "done marker")
        out.commit()
    _write_record(folder, [])                                    # done.json vouches for the stored series now
    if stored is None:
        return "ok", ""
    return "ok", f"stored series {stored.series_uid} ({len(stored.instances)} instances) on {args.pacs_client.shown}"


# --------------------------------------------------------------------------------------------------
# the cohort tables


def read_metrics(path: str | os.PathLike) -> dict:
    """``{metric: mean}`` of a metrics.csv that ``fuse`` wrote (the luma and the colour-fidelity
    metrics), and its 'seconds' run information."""
    from MedicalFusionLib.metrics import COLOUR_METRIC_KEYS, METRIC_KEYS  # noqa: PLC0415

    wanted = set(METRIC_KEYS) | set(COLOUR_METRIC_KEYS) | {"seconds"}
    values = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("metric") in wanted:
                    with contextlib.suppress(TypeError, ValueError):
                        values[row["metric"]] = float(row["mean"])
    except OSError:
        return {}
    return values


def ranked_metrics(table=None) -> list:
    """The metrics the ranking uses, with their directions: every row of the metrics table (the
    reference evaluator's metrics.METRICS and the colour fidelity's metrics.COLOUR_METRICS) but
    :data:`NOT_RANKED`."""
    from MedicalFusionLib.metrics import COLOUR_METRICS, METRICS  # noqa: PLC0415

    return [m for m in (METRICS + COLOUR_METRICS if table is None else table) if m.key not in NOT_RANKED]


def _ranks(values: list) -> list:
    """1 = best of ``values`` (higher is better), ties get the mean of their ranks (scipy's rankdata)."""
    from scipy.stats import rankdata  # noqa: PLC0415

    return [float(r) for r in rankdata([-v for v in values], method="average")]


def rank_methods(outcomes: list, methods: list, table=None) -> tuple[list, list, int]:
    """Rank ``methods`` over the cohort: in each study that every method fused, every ranked metric
    (:func:`ranked_metrics`; a metric that is lower-is-better is ranked on its negative) ranks the
    methods (1 best, ties shared); a method's score is its mean rank over studies and metrics.
    Returns (rows sorted best first: {method, mean_rank, <metric>: cohort mean}, the metric keys
    used, the number of studies)."""
    by_study: dict = {}
    for o in outcomes:
        if o.status in ("ok", "skipped") and o.method in methods:
            by_study.setdefault(o.id, {})[o.method] = o.metrics
    studies = [s for s, per in by_study.items() if all(m in per for m in methods)]
    metrics = [m for m in ranked_metrics(table)          # those every method has in every study, as numbers
               if studies and all(m.key in by_study[s][meth] and not math.isnan(by_study[s][meth][m.key])
                                  for s in studies for meth in methods)]
    totals = {m: 0.0 for m in methods}
    for s in studies:
        for info in metrics:
            sign = 1.0 if info.higher_is_better else -1.0
            ranks = _ranks([sign * by_study[s][meth][info.key] for meth in methods])
            for meth, r in zip(methods, ranks):
                totals[meth] += r
    n = len(studies) * len(metrics)
    rows = []
    for meth in methods:
        row = {"method": meth, "mean_rank": totals[meth] / n if n else float("nan")}
        for info in metrics:
            row[info.key] = sum(by_study[s][meth][info.key] for s in studies) / len(studies)
        rows.append(row)
    rows.sort(key=lambda r: (r["mean_rank"], r["method"]))
    return rows, [m.key for m in metrics], len(studies)


def summary_text(outcomes: list) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for o in outcomes:
        w.writerow([o.id, o.method, o.status, o.message, f"{o.seconds:.2f}"])
    return buf.getvalue()


def cohort_metrics_text(outcomes: list) -> str:
    """Every fused study's metrics: one row per study and method, one column per metric."""
    from MedicalFusionLib.metrics import COLOUR_METRIC_KEYS, METRIC_KEYS  # noqa: PLC0415

    keys = [k for k in METRIC_KEYS + COLOUR_METRIC_KEYS if any(k in o.metrics for o in outcomes)]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "method", "seconds", *keys])
    for o in outcomes:
        if o.status in ("ok", "skipped") and o.metrics:
            seconds = o.metrics.get("seconds")
            w.writerow([o.id, o.method, "" if seconds is None else f"{seconds:.3f}",
                        *(f"{o.metrics[k]:.6g}" if k in o.metrics else "" for k in keys)])
    return buf.getvalue()


def ranking_text(rows: list, keys: list, studies: int) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["position", "method", "mean_rank", "studies", *keys])
    for i, r in enumerate(rows, start=1):
        w.writerow([i, r["method"], f"{r['mean_rank']:.4f}", studies, *(f"{r[k]:.6g}" for k in keys)])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# the cluster


def _dask():
    try:
        import distributed  # noqa: PLC0415
    except ImportError:
        raise FusionError("medicalfusion batch runs on Dask: install it with pip install 'medicalfusion[cohort]' "
                          "(dask[distributed])") from None
    return distributed


def _machine_cores() -> int:
    from MedicalFusionLib.cli import cpu_count  # noqa: PLC0415

    return cpu_count()


def local_sizes(tasks: int, cores: int, workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(worker processes, torch threads each) for a LocalCluster: one process per core by default
    (fewer when there are fewer studies), and threads so that processes x threads <= cores."""
    if workers is None:
        workers = max(1, min(cores // (threads or 1), tasks))
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads


def connect(scheduler: str | None, tasks: int, workers: int | None, threads: int | None):
    """(client, cluster or None, torch threads per worker, a line saying where the work runs)."""
    import logging  # noqa: PLC0415

    distributed = _dask()
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise FusionError(f"cannot reach the Dask scheduler at {scheduler} ({' '.join(str(exc).split())[:160]}): "
                              "check the address (tcp://HOST:8786) and that 'dask scheduler' runs there") from None
        try:
            client.wait_for_workers(1, timeout=60)
        except TimeoutError:
            client.close()
            raise FusionError(f"the Dask scheduler at {scheduler} has no worker after 60 s: start some with "
                              f"'dask worker {scheduler}'") from None
        try:
            cores = client.run(_machine_cores)                     # {worker address: cores of its machine}
        except Exception as exc:  # noqa: BLE001 - whatever the workers raised: they cannot run a study
            client.close()
            raise FusionError(f"the workers of {scheduler} cannot run MedicalFusion ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:120]}): install medicalfusion[cohort] on every "
                              "worker") from None
        if threads is None:
            info = client.scheduler_info()["workers"]
            per_host: dict = {}
            for addr, w in info.items():
                per_host.setdefault(w["host"], [0, cores.get(addr, 1)])[0] += w["nthreads"]
            threads = max(1, min(c // max(1, n) for n, c in per_host.values()))
        n = len(client.scheduler_info()["workers"])
        return client, None, threads, f"{n} workers at {scheduler}, {threads} torch thread(s) each"
    cores = _machine_cores()
    workers, threads = local_sizes(tasks, cores, workers, threads)
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       silence_logs=logging.ERROR, dashboard_address=":8787")
    client = distributed.Client(cluster)
    client.register_plugin(_interrupt_plugin(distributed), name="medicalfusion-ctrl-c")
    return client, cluster, threads, f"LocalCluster: {workers} worker process(es) x {threads} torch thread(s) ({cores} cores)"


def _interrupt_plugin(distributed):
    """A worker plugin for our own LocalCluster: its worker processes ignore SIGINT. Ctrl-C on a
    terminal reaches the whole process group; only ``batch`` handles it (it closes the cluster, and
    the message says what was kept), instead of every worker printing a KeyboardInterrupt traceback.
    Registered plugins also run in a worker that the nanny restarts."""

    class IgnoreInterrupt(distributed.WorkerPlugin):
        def setup(self, worker):
            import signal  # noqa: PLC0415
            import threading  # noqa: PLC0415

            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    return IgnoreInterrupt()


def _dashboard(client) -> str:
    try:
        link = client.dashboard_link
    except Exception:  # noqa: BLE001 - no bokeh, or the dashboard was turned off
        link = ""
    return link or "not running (pip install bokeh)"


# --------------------------------------------------------------------------------------------------
# the command


def run_batch(args) -> int:
    """``medicalfusion batch``: plan, run every task on Dask, write the cohort tables; 0 when every
    study is ok or skipped, 2 when any failed (after every other study was done)."""
    from MedicalFusionLib.methods import get_method  # noqa: PLC0415
    from MedicalFusionLib.io.outputs import OutputSet  # noqa: PLC0415

    for m in args.methods or [args.method]:
        ok, reason = get_method(m).available()
        if not ok:
            raise FusionError(reason)
    if args.scheduler and args.workers:
        raise FusionError("--workers sizes the LocalCluster started on this machine; with --scheduler the "
                          "cluster's own workers run the studies: drop --workers")
    if args.methods and len(set(args.methods)) != len(args.methods):
        raise FusionError("--methods names a method twice: give each once")
    out_dir = pathlib.Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise FusionError(f"batch --output folder {out_dir} is a file, not a folder: give a folder")
    if args.pacs:
        from MedicalFusionLib.io.pacs import check_url  # noqa: PLC0415

        check_url(args.pacs)
    tasks = plan(args.manifest, out_dir, args.methods, args.method, args.metric_set, args.preview,
                 output_dicom=args.output_dicom, pacs=args.pacs, store=args.store)
    if any("--pacs" in t.argv for t in tasks):
        from MedicalFusionLib.io.pacs import credentials  # noqa: PLC0415

        credentials()                           # both login variables or neither: one line before any work
    client, cluster, threads, where = connect(args.scheduler, len(tasks), args.workers, args.worker_threads)
    try:
        with OutputSet() as out:                # DIR made once the manifest and the cluster are fine
            out.folder(out_dir, "batch --output folder")
            out.commit()
        args.interrupt_note = (f"the studies finished so far are kept in {out_dir} (each with its done.json); "
                               "rerun the same command to do the rest")
        if not args.quiet:
            print(f"{len(tasks)} fuse runs ({len({t.id for t in tasks})} studies) on {where}")
            print(f"Dask dashboard: {_dashboard(client)}")
        t0 = time.perf_counter()
        outcomes = _run_all(client, tasks, threads, show_bar=not args.quiet and sys.stderr.isatty())
        wall = time.perf_counter() - t0
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    methods = args.methods or []
    ranking = rank_methods(outcomes, methods) if len(methods) > 1 else None
    with OutputSet() as out:
        out.add_text(out_dir / "summary.csv", summary_text(outcomes), "summary.csv")
        out.add_text(out_dir / "cohort_metrics.csv", cohort_metrics_text(outcomes), "cohort_metrics.csv")
        if ranking is not None:
            out.add_text(out_dir / "ranking.csv", ranking_text(*ranking), "ranking.csv")
        out.commit()
    failed = [o for o in outcomes if o.status == "failed"]
    if not args.quiet:
        counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
        print(f"{counts['ok']} ok, {counts['skipped']} skipped (verified), {counts['failed']} failed in {wall:.1f} s "
              f"-> {out_dir / 'summary.csv'}, {out_dir / 'cohort_metrics.csv'}")
        if ranking is not None:
            rows, keys, n = ranking
            print(f"ranking over {n} studies and {len(keys)} metrics ({', '.join(keys)}) -> {out_dir / 'ranking.csv'}")
            for i, r in enumerate(rows, start=1):
                print(f"  {i}. {r['method']:14s} mean rank {r['mean_rank']:.3f}")
    for o in failed:
        print(f"medicalfusion: error: study {o.id} ({o.method}): {o.message}", file=sys.stderr)
    return 2 if failed else 0


def _run_all(client, tasks: list, threads: int, show_bar: bool) -> list:
    """Submit every task, collect the outcomes in manifest order (a task whose worker died again
    and again is a failed study)."""
    distributed = _dask()
    futures = {}
    outcomes: dict = {}
    for i, t in enumerate(tasks):
        if t.error:
            outcomes[i] = Outcome(t.id, t.method, "failed", t.error)
            continue
        key = f"fuse-{t.id}-{t.method}-{os.urandom(4).hex()}"
        futures[client.submit(run_task, t, threads, key=key, pure=False, retries=0)] = i
    bar = None
    if show_bar:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(tasks), desc="studies", unit="study", file=sys.stderr, initial=len(outcomes))
    try:
        for fut in distributed.as_completed(list(futures)):
            i, t = futures[fut], tasks[futures[fut]]
            try:
                outcomes[i] = fut.result()
            except distributed.KilledWorker:
                outcomes[i] = Outcome(t.id, t.method, "failed", "its worker died every time it ran this study "
                                      "(out of memory? see the worker logs); rerun to try again")
            except Exception as exc:  # noqa: BLE001 - the cluster's failure is this study's line
                outcomes[i] = Outcome(t.id, t.method, "failed",
                                      f"Dask: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [outcomes[i] for i in range(len(tasks))]
