"""The ``medicalfusion`` command: fuse, batch, presets, methods, evaluate, train, demo.

Every user error ends in one line on stderr (``medicalfusion: error: ...``) and exit status 2,
argparse mistakes included; "internal error" (exit 1) is left for bugs. Every file a run writes
goes through one :class:`~MedicalFusionLib.io.outputs.OutputSet`, so nothing is written unless the
whole run succeeded. SIGINT, SIGTERM and SIGHUP end a run with a true message ("nothing was
written") and exit status 128 + the signal's number, leaving no temporary behind. ITK's warnings
are not shown (failures are detected and reported by the checks of io/files.py / io/outputs.py).

How the command is put together, so that an option or an output can be added in one place:

- argument types (:func:`positive_int`, :func:`finite_float`, :func:`thread_count`, ...) reject a
  bad value while parsing; :func:`check_fuse_arguments` checks what needs more than one value
  (windows, method availability, device) -- all before any work;
- :data:`FUSE_OUTPUTS` lists the file outputs of ``fuse`` (argument, name in messages, kind);
  :func:`claim_outputs` claims them in the run's OutputSet before the inputs are read and
  :func:`write_fuse_outputs` writes them; a new output adds a row there and a writer (e.g.
  ``out.add_file(path, lambda tmp: sitk.WriteTransform(t, str(tmp)), "transform file")``).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import threading

from . import __version__
from . import options as choices
from .errors import FusionCancelled, FusionError
from .options import MAX_BATCH_SIZE, FusionOptions

EXIT_USER_ERROR = 2


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so the run's OutputSet removes its temporaries."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and values such as ``-inf`` or ``-1e3`` read as values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"medicalfusion: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------------------
# argument types: a bad value fails while parsing, with one line


def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a {'whole ' if kind is int else ''}number") from None


def finite_float(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be more than 0")
    return value


def int_range(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"'{text}' is out of range: give {lo} or more" if hi is None
                                             else f"'{text}' is out of range: give {lo} to {hi}")
        return value
    parse.__name__ = "whole number"
    return parse


positive_int = int_range(1)


def cpu_count() -> int:
    return max(1, os.cpu_count() or 1)


def thread_count(text: str) -> int:
    """1 .. this machine's CPU count (torch crashes on absurd thread counts)."""
    return int_range(1, cpu_count())(text)


def path_text(text: str) -> str:
    """A file or folder argument: anything but an empty string (``-o ''`` is a user's mistake)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give a file or folder name")
    return text


def axis_name(text: str) -> str:
    if text.lower() not in choices.AXES + ("0", "1", "2"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a slice orientation: use {', '.join(choices.AXES)} or 0-2")
    return text.lower()


# --------------------------------------------------------------------------------------------------
# progress and signals


def _progress_bar(desc: str, enabled: bool, unit: str = "slice", percent: bool = False):
    """A tqdm-backed ``progress(done, total)`` callback and a closer. Shown only on a terminal
    (never as fragments in a log), and cleared before any message. With ``percent`` the bar counts
    per cent of the whole run (the fusion reports fractions of a fixed total over its phases, not
    slices)."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm  # noqa: PLC0415

    bar = {"b": None}

    def progress(done: int, total: int) -> None:
        if bar["b"] is None:
            if percent:
                bar["b"] = tqdm(total=100, desc=desc, leave=False, file=sys.stderr,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
            else:
                bar["b"] = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)
        bar["b"].n = round(100.0 * done / total, 1) if percent and total else done
        bar["b"].refresh()

    def close() -> None:
        if bar["b"] is not None:
            bar["b"].close()
            bar["b"] = None

    return progress, close


def _install_signal_handlers() -> dict:
    """SIGTERM and SIGHUP raise :class:`Interrupted`, SIGINT KeyboardInterrupt (unless ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None or signal.getsignal(sig) is signal.SIG_IGN:
            continue
        previous[sig] = signal.signal(sig, handler)
    return previous


class _NoteHandler(logging.Handler):
    """The package's warnings (e.g. own weights in use), shown as 'medicalfusion: note: ...' lines
    after a run that succeeded (an error stays one line)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        note = " ".join(record.getMessage().split())
        if note not in self.notes:
            self.notes.append(note)

    def show(self) -> None:
        for note in self.notes:
            print(f"medicalfusion: note: {note}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# fuse

#: The file outputs of ``fuse``: (argument dest, name in messages, OutputSet.claim kind).
FUSE_OUTPUTS = [
    ("output", "output", "image"),
    ("metrics", "metrics file", "file"),
    ("preview", "preview", "picture"),
    ("save_transform", "transform file", "file"),
]
#: Output extensions that hold one 2D picture.
PICTURE_ONLY = (".png", ".jpg", ".jpeg", ".bmp")


WINDOW_FLAGS = ("--window", "--functional-window")


def check_fuse_arguments(args) -> None:
    """Everything about the arguments that can be checked before any file is read: the options
    (options.validate: method and its weights, windows, presets, colour map, ...), the device,
    the registration's arguments."""
    from .device import pick_device  # noqa: PLC0415

    choices.validate(fuse_options(args), WINDOW_FLAGS)
    pick_device(args.device)
    check_placement_arguments(args)


def fuse_inputs(args) -> dict:
    inputs = {"anatomical input": args.anatomical, "functional input": args.functional}
    if getattr(args, "transform", None):
        inputs["transform file"] = args.transform
    if getattr(args, "register_with", None):
        inputs["--register-with input"] = args.register_with
    return inputs


def claim_outputs(out, args, specs=None) -> dict:
    """Claim every output given on the command line (checked before any work): {dest: path}."""
    return {dest: out.claim(getattr(args, dest), what, kind)
            for dest, what, kind in (specs or FUSE_OUTPUTS) if getattr(args, dest, None)}


def fuse_options(args, anat=None, func=None) -> FusionOptions:
    """FusionOptions from the arguments (before the inputs are read: ``anat``/``func`` None); with
    the read sources, display-ready 8-bit pictures default to 0..255, and the units a DICOM series'
    header gives go in (a CT in HU gets the soft-tissue window)."""
    window = choices.check_window(args.window, WINDOW_FLAGS[0])
    fwindow = choices.check_window(args.functional_window, WINDOW_FLAGS[1])
    if window is None and anat is not None and anat.display_ready:
        window = (0.0, 255.0)
    if (fwindow is None and func is not None and func.display_ready
            and func.image.GetNumberOfComponentsPerPixel() == 1):
        fwindow = (0.0, 255.0)
    return FusionOptions(method=args.method, colormap=args.colormap or None, anatomical_window=window,
                         functional_window=fwindow, axis=args.axis, device=args.device,
                         batch_size=args.batch_size, compute_metrics=bool(getattr(args, "metrics", None)),
                         metric_set=getattr(args, "metric_set", choices.DEFAULT_METRIC_SET),
                         anatomical_preset=getattr(args, "window_preset", None),
                         functional_preset=getattr(args, "functional_preset", None),
                         anatomical_units=_units(anat), functional_units=_units(func))


def _units(source) -> str | None:
    facts = getattr(source, "facts", None)
    return (facts.units or None) if facts is not None else None


def fusion_metadata(result, anat, func) -> dict:
    """What the fused picture shows (units, windows and how they were chosen, colour map) and the
    DICOM facts of the inputs: keys for the fused file's header and the metrics CSV."""
    from .windows import display_metadata  # noqa: PLC0415

    meta = display_metadata(result.prepared)
    for role, source in (("anatomical", anat), ("functional", func)):
        facts = getattr(source, "facts", None)
        if facts is not None:
            meta.update(facts.as_metadata(role))
    return meta


def write_fuse_outputs(out, paths: dict, result, args, as_2d: bool, meta: dict | None = None,
                       transform=None, functional_name: str = "functional") -> None:
    """Write every claimed output of ``fuse`` into the run's OutputSet (not yet in place);
    ``meta`` (units, windows: :func:`fusion_metadata`) goes into the fused file's header (NRRD and
    MHA keep it) and the metrics CSV; ``transform`` (the registration's) into --save-transform.
    The preview gets the colour bar (window, map and units of ``functional_name``) under the
    pictures; the fused volume never carries it."""
    from . import legend  # noqa: PLC0415
    from .io import outputs  # noqa: PLC0415
    from .metrics import metrics_table_rows  # noqa: PLC0415
    from .pipeline import preview_sources  # noqa: PLC0415

    meta = meta or {}
    fused = outputs.fused_image_for_file(result.rgb, result.reference, as_2d)
    for key, value in meta.items():
        fused.SetMetaData(f"MedicalFusion.{key}", value)
    if "output" in paths:
        out.add_image(paths["output"], fused)
    del fused                     # a copy of the result: not kept while the preview is made
    if "preview" in paths:
        a8, func_rgb = preview_sources(result.prepared)
        montage = outputs.preview_montage(a8, func_rgb, result.rgb, result.reference, args.axis)
        bar = legend.legend_for(result.prepared, name=functional_name)
        if bar is not None:
            montage = legend.draw_colour_bar(montage, bar)
        out.add_image(paths["preview"], outputs.picture(montage))
    if "metrics" in paths:
        extra = {"method": result.method, "device": result.device, "seconds": f"{result.seconds:.3f}",
                 "version": __version__, **meta}
        out.add_text(paths["metrics"], outputs.metrics_csv_text(metrics_table_rows(result.metrics), extra))
    if "save_transform" in paths:
        from .registration import write_transform  # noqa: PLC0415

        write_transform(transform, paths["save_transform"], out)


def run_fuse(args, anat, func, out, paths: dict):
    """Fuse two read sources and write the claimed outputs into ``out`` (the caller commits)."""
    from .pipeline import check_memory, fuse_images  # noqa: PLC0415
    from .io.files import extension  # noqa: PLC0415

    ext = extension(paths["output"]) if "output" in paths else ""
    slices = anat.image.GetSize()[2] if anat.image.GetDimension() == 3 else 1
    if ext in PICTURE_ONLY and slices > 1:
        raise FusionError(f"output {paths['output']} holds one 2D picture but the anatomical input is a 3D volume "
                          f"({slices} slices): use .nrrd, .nii.gz or .mha")
    options = fuse_options(args, anat, func)
    check_memory(anat.image, func.image, options)     # a study too big for the memory: refused before registering
    transform = args.fuse_transform = placement(args, anat, func)
    progress, close = _progress_bar(f"fusing ({args.method})", not args.quiet, percent=True)
    try:
        result = fuse_images(anat.image, func.image, options, progress=progress, transform=transform)
    finally:
        close()
    as_2d = ext in PICTURE_ONLY or (anat.was_2d and ext in (".tif", ".tiff"))
    meta = fusion_metadata(result, anat, func)
    if getattr(args, "registration", None) is not None:     # how sure the registration is, in the CSV and header
        meta.update({k: str(v) for k, v in args.registration.metadata().items()})
        if getattr(args, "register_with", None):
            meta["registration_with"] = str(args.register_with)
    write_fuse_outputs(out, paths, result, args, as_2d, meta, transform, functional_name=source_name(func))
    return result


def source_name(source) -> str:
    """A short name for an input in pictures: a DICOM series' description (or modality), else the
    file or folder name without its image extension."""
    facts = getattr(source, "facts", None)
    if facts is not None and (facts.series_description or facts.modality):
        return facts.series_description or facts.modality
    name = os.path.basename(os.path.normpath(str(getattr(source, "path", "") or ""))) or "functional"
    for ext in (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


# registration on demand (MedicalFusionLib/registration.py): --register, --transform, --save-transform


def check_placement_arguments(args) -> None:
    """--save-transform needs a transform to save and a transform-file extension (before any work)."""
    from .registration import check_transform_path  # noqa: PLC0415

    if getattr(args, "save_transform", None):
        if not (args.register or args.transform):
            raise FusionError("--save-transform writes the registration's transform: add --register rigid|affine "
                              "(or --transform)")
        check_transform_path(args.save_transform, "--save-transform")
    if getattr(args, "strict_registration", False) and not getattr(args, "register", None):
        raise FusionError("--strict-registration refuses an uncertain registration: add --register rigid|affine")
    if getattr(args, "register_with", None) and not getattr(args, "register", None):
        raise FusionError("--register-with names the volume to register (e.g. the PET's own CT): add --register "
                          "rigid|affine")


def placement(args, anat, func):
    """The transform placing the functional (None: as stored): registered when --register is given
    (starting from --transform if given), else read from --transform. A shared DICOM
    FrameOfReferenceUID (from the headers read with the series) is noted (the package log, shown
    after the run)."""
    from .registration import note_if_already_registered, read_transform, register  # noqa: PLC0415

    from .registration import check_same_frame  # noqa: PLC0415
    from .io.read import read_source  # noqa: PLC0415

    transform = read_transform(args.transform) if getattr(args, "transform", None) else None
    note_if_already_registered(*(s.facts.frame_of_reference_uid if s.facts else None for s in (anat, func)))
    if not getattr(args, "register", None):
        return transform
    moving = func
    if getattr(args, "register_with", None):       # e.g. the PET's own CT: CT -> anatomical, applied to the PET
        moving = read_source(args.register_with, "--register-with")
        check_same_frame(func.image, moving.image, *(s.facts.frame_of_reference_uid if s.facts else None
                                                      for s in (func, moving)), what="--register-with")
    progress, close = _progress_bar(f"registering ({args.register})", not args.quiet, unit="iteration")
    try:
        args.registration = register(anat.image, moving.image, args.register, initial=transform, progress=progress)
    finally:
        close()
    warning = args.registration.warning
    if warning and getattr(args, "strict_registration", False):
        raise FusionError(f"{warning} (refused: --strict-registration)")
    if warning:                       # shown with --quiet too
        print(f"medicalfusion: warning: {warning}", file=sys.stderr)
    return args.registration.transform


def _report_fuse(args, result, paths: dict) -> None:
    if args.quiet:
        return
    if getattr(args, "registration", None) is not None:
        through = (f" (of {args.register_with}, applied to the functional)" if getattr(args, "register_with", None)
                   else "")
        print(args.registration.summary() + through
              + (f" -> {paths['save_transform']}" if "save_transform" in paths else ""))
    where = [str(paths["output"])] if "output" in paths else []
    where += [f"{args.output_dicom}/ (DICOM, {args.dicom_instances} files)"] if getattr(args, "output_dicom", None) else []
    stored = getattr(args, "pacs_stored", None)
    where += [f"PACS series {stored.series_uid} ({len(stored.instances)} instances, study {stored.study_uid})"] \
        if stored is not None else []
    print(f"fused with {result.method} on {result.device} in {result.seconds:.2f} s -> {', '.join(where)}")
    if "metrics" in paths:
        shown = ", ".join(f"{k} {v[0]:.3f}" for k, v in result.metrics.items() if k in ("SSIM_avg", "Qabf", "VIF", "MI_bits"))
        print(f"metrics ({shown}) -> {paths['metrics']}")
    if "preview" in paths:
        print(f"preview -> {paths['preview']}")


def fuse_one(args):
    """One ``fuse`` run from parsed ``fuse`` arguments: check, claim, read, fuse, write, commit
    (all or nothing; with --store, stored in the PACS too); returns ``(result, {dest: path
    written})``. ``cmd_fuse`` and each study of ``batch`` (medicalfusion_tools/cohort.py) run exactly this."""
    from .io import pacs  # noqa: PLC0415
    from .io.files import check_input_path  # noqa: PLC0415
    from .io.outputs import OutputSet  # noqa: PLC0415
    from .io.read import read_source  # noqa: PLC0415

    check_fuse_arguments(args)
    pacs.check_arguments(args)
    for label, path in fuse_inputs(args).items():
        if path is not None:
            check_input_path(path, label)
    with OutputSet(fuse_inputs(args)) as out:
        args.output_set = out
        paths = claim_outputs(out, args)
        if args.output_dicom:
            out.claim_folder(args.output_dicom, "--output-dicom folder")
        with pacs.fuse_inputs(args) as (anatomical, functional):
            anat = read_source(anatomical, "anatomical")
            func = read_source(functional, "functional")
            result = run_fuse(args, anat, func, out, paths)
            datasets = write_dicom_outputs(out, args, result, anat, func)
        pacs.commit_and_store(out, args, datasets)
    return result, paths


def cmd_fuse(args) -> int:
    result, paths = fuse_one(args)
    _report_fuse(args, result, paths)
    return 0


def write_dicom_outputs(out, args, result, anat, func) -> list:
    """The fused series as DICOM (MedicalFusionLib/io/dicom_export.py) when --output-dicom or --store
    asks for it: written into the run's OutputSet; returns the datasets (for --store)."""
    if not (args.output_dicom or args.store):
        return []
    from .io import dicom_export  # noqa: PLC0415

    datasets = dicom_export.fused_series(result, anat, func, transform=getattr(args, "fuse_transform", None))
    args.dicom_instances = len(datasets)
    if datasets and getattr(datasets[0], "PatientName", "") == dicom_export.SYNTHETIC_PATIENT_NAME:
        logging.getLogger("MedicalFusionLib").warning(
            "the anatomical input is not DICOM: the fused series has a new, synthetic patient and study (patient "
            "%s, ID %s)", dicom_export.SYNTHETIC_PATIENT_NAME, datasets[0].PatientID)
    if args.output_dicom:
        dicom_export.add_dicom_folder(out, args.output_dicom, datasets, result, "--output-dicom folder")
    return datasets


# --------------------------------------------------------------------------------------------------
# the other commands


def cmd_presets(args) -> int:
    from .windows import PRESETS, SLICER_NAMES  # noqa: PLC0415

    slicer_names = {v: k for k, v in SLICER_NAMES.items()}
    for p in PRESETS.values():
        alias = f" (also '{slicer_names[p.name]}')" if p.name in slicer_names else ""
        print(f"{p.name:16s} {p.units:6s} {p.lo:g}..{p.hi:g}  W {p.hi - p.lo:g} / L {(p.hi + p.lo) / 2:g}  {p.source}{alias}")
    print(f"{'pet-suv-0-N':16s} {'SUVbw':6s} 0..N    any N > 0")
    print("A CT in HU gets ct-soft-tissue unless a window or preset is given; MR and PET get a window from their data.")
    return 0


def cmd_methods(args) -> int:
    for m in choices.METHODS:           # the catalogue: no method (and no torch) is imported
        ok, reason = m.available()
        note = "" if ok else f"  [unavailable: {reason}]"
        print(f"{m.name:14s} {m.description}{note}")
        if args.verbose:
            print(f"{'':14s} {m.family}; {m.reference}")
    return 0


def tools_module(name: str, command: str):
    """``medicalfusion_tools.<name>``: the tools (evaluate, training, cohort) live in their own package,
    beside the core and not shipped in the Slicer extension; imported only when their command runs.
    An install without them (the extension's Python) says so in one line."""
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(f"medicalfusion_tools.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("medicalfusion_tools", f"medicalfusion_tools.{name}"):
            raise
        raise FusionError(f"'{command}' needs the medicalfusion_tools package, which this installation lacks "
                          "(the Slicer extension does not ship it): install the repository's pip package "
                          "(pip install -e . in a checkout) and run it there") from None


def cmd_evaluate(args) -> int:
    from .device import pick_device  # noqa: PLC0415

    evaluate = tools_module("evaluate", "evaluate").evaluate
    pick_device(args.device)
    evaluate(args.dataset, args.split, args.methods, args.output, pairs=args.pairs, device=args.device,
             limit=args.limit, quiet=args.quiet,
             montage_sources=not args.montage_without_sources, run=args)
    return 0


def cmd_train(args) -> int:
    from .device import pick_device  # noqa: PLC0415

    training = tools_module("training", "train")
    train, trainable_methods = training.train, training.trainable_methods
    read_split = tools_module("training.data", "train").read_split

    if args.method not in trainable_methods():
        raise FusionError(f"no trainer for '{args.method}': choose one of {', '.join(trainable_methods())}")
    pick_device(args.device)
    read_split(args.data, "train")                  # the data is there and readable before any work
    args.interrupt_note = "no weights were written; the run's checkpoint lets 'medicalfusion train' resume"
    entry = train(args.method, args.data, out_dir=args.out, minutes=args.minutes, resume=not args.no_resume,
                  seed=args.seed, device=args.device)
    print(f"trained {args.method}: {entry.get('file', '')} sha256 {str(entry.get('sha256', ''))[:12]}...")
    return 0


def cmd_batch(args) -> int:
    return tools_module("cohort", "batch").run_batch(args)   # Dask only when a batch runs


def cmd_demo(args) -> int:
    from .io.outputs import OutputSet  # noqa: PLC0415
    from .sample import add_sample  # noqa: PLC0415

    fuse_args = build_parser().parse_args([
        "fuse", "--anatomical", "-", "--functional", "-", "--method", args.method, "-o", "fused.nrrd",
        "--metrics", "metrics.csv", "--preview", "preview.png", "--device", args.device]
        + (["--quiet"] if args.quiet else []))
    check_fuse_arguments(fuse_args)
    with OutputSet() as out:
        args.output_set = out
        folder = out.folder(args.output, "demo --output folder")
        for dest, name in (("output", "fused.nrrd"), ("metrics", "metrics.csv"), ("preview", "preview.png")):
            setattr(fuse_args, dest, str(folder / name))
        paths = claim_outputs(out, fuse_args)
        anat, func = add_sample(out, folder / "sample")
        if not args.quiet:
            print(f"sample: {anat.path} (MNI152 T1, 1 mm) and {func.path} (simulated FDG-PET, 4 mm, oblique)")
        result = run_fuse(fuse_args, anat, func, out, paths)
        out.commit()
    _report_fuse(fuse_args, result, paths)
    return 0


# --------------------------------------------------------------------------------------------------
# the parser


def _add_threads(p) -> None:
    p.add_argument("--threads", type=thread_count, help="CPU threads, 1 to this machine's CPU count (default: torch's "
                   "choice); a fusion runs as many workers of one torch thread each, with the same result whatever the number")


def build_parser() -> argparse.ArgumentParser:
    devices = choices.DEVICES
    p = _Parser(prog="medicalfusion", description="Multimodal medical image fusion (MRI/CT + PET/SPECT).")
    p.add_argument("--version", action="version", version=f"medicalfusion {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fuse", help="fuse a registered anatomical + functional pair")
    f.add_argument("--anatomical", "-a", type=path_text, help="MRI or CT: NRRD, NIfTI, MHA, DICOM folder, PNG/JPG")
    f.add_argument("--functional", "-f", type=path_text, help="PET/SPECT values (scalar) or pseudo-colour RGB "
                   "(8-bit, or floats in 0..1)")
    f.add_argument("--method", "-m", default=choices.DEFAULT_METHOD,
                   help=f"fusion method (see 'medicalfusion methods'); default {choices.DEFAULT_METHOD}")
    f.add_argument("--colormap", help="colour map for a scalar functional (Slicer names: PET-Heat, PET-Rainbow2, "
                   "Rainbow, Grey, ...); default PET-Heat; use Grey for CT (grayscale fusion)")
    f.add_argument("--window", nargs=2, type=finite_float, metavar=("LO", "HI"),
                   help="anatomical window (default: ct-soft-tissue for a CT in HU, see --window-preset; else "
                   "0.5-99.5th percentile of the non-background voxels; 0..255 for an 8-bit PNG/JPG/BMP picture)")
    f.add_argument("--functional-window", nargs=2, type=finite_float, metavar=("LO", "HI"),
                   help="functional window for the colour map (default: minimum .. 99.9th percentile of the "
                   "non-background voxels, whatever the voxel type; 0..255 for an 8-bit PNG/JPG/BMP picture)")
    from .windows import preset_names  # noqa: PLC0415

    names = ", ".join(preset_names())
    f.add_argument("--window-preset", metavar="NAME",
                   help=f"anatomical window by name ({names}, pet-suv-0-N; see 'medicalfusion presets'); "
                   "default: ct-soft-tissue for a CT in HU, else --window's default")
    f.add_argument("--functional-preset", metavar="NAME",
                   help="functional window by name, e.g. pet-suv-0-5, pet-suv-0-10, pet-suv-0-20 (PET in SUV) "
                   "or a CT preset for a CT functional; --functional-window wins over it")
    f.add_argument("--axis", default=choices.DEFAULT_AXIS, type=axis_name,
                   help="slice orientation: axial, coronal, sagittal (or array axis 0-2)")
    f.add_argument("--device", default=choices.DEFAULT_DEVICE, choices=devices, help="torch device; default auto")
    f.add_argument("--batch-size", type=int_range(1, MAX_BATCH_SIZE),
                   help=f"slices per batch, 1 to {MAX_BATCH_SIZE} (default: sized to the device memory)")
    f.add_argument("--output", "-o", type=path_text, help="fused RGB output (.nrrd, .nii.gz, .mha, ...; "
                   ".png/.jpg for a 2D pair); -o, --output-dicom or --store is needed")
    # DICOM and PACS (MedicalFusionLib/io/dicom_export.py, io/pacs.py; docs/PACS.md)
    f.add_argument("--output-dicom", metavar="DIR", type=path_text, help="also (or only) write the fused volume as a DICOM series "
                   "(RGB Secondary Capture, one file a slice, on the anatomical's grid, in its patient and study) "
                   "into this new or empty folder")
    f.add_argument("--pacs", metavar="URL", help="DICOMweb root of a PACS (e.g. http://127.0.0.1:8042/dicom-web) to "
                   "retrieve the two series from; login from $MEDICALFUSION_PACS_USER and $MEDICALFUSION_PACS_PASSWORD "
                   "(or ~/.netrc)")
    f.add_argument("--anatomical-series", metavar="UID", help="with --pacs: SeriesInstanceUID of the anatomical series")
    f.add_argument("--functional-series", metavar="UID", help="with --pacs: SeriesInstanceUID of the functional series")
    f.add_argument("--store", action="store_true", help="with --pacs: store the fused series on the PACS, in the "
                   "anatomical's study (STOW-RS); all instances or none")
    f.add_argument("--insecure", action="store_true", help="with --pacs https://...: do not verify the server's "
                   "certificate (only for a server you trust)")
    f.add_argument("--pacs-timeout", type=positive_float, metavar="SECONDS",
                   help="with --pacs: give up when the PACS does not answer within this time (default 30)")
    f.add_argument("--metrics", type=path_text, help="write the quality metrics (mean, std over slices) to this CSV")
    f.add_argument("--metric-set", default=choices.DEFAULT_METRIC_SET, choices=tuple(choices.METRIC_SETS),
                   help="with --metrics: quick (default): every metric but FMI, which takes most of the metrics' "
                   "time; all: every metric, FMI included ('evaluate' always reports every metric)")
    f.add_argument("--preview", type=path_text, help="write a picture (.png, .jpg, ...): anatomical | functional | fused")
    f.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    _add_threads(f)
    # registration on demand (MedicalFusionLib/registration.py)
    f.add_argument("--register", choices=("rigid", "affine"),
                   help="align the functional to the anatomical first (mutual information); off by default")
    f.add_argument("--transform", type=path_text, metavar="IN.tfm",
                   help="ITK transform file placing the functional (as Slicer saves the functional's parent "
                   "transform); with --register, the registration starts from it")
    f.add_argument("--save-transform", type=path_text, metavar="OUT.tfm",
                   help="save the registration's transform as an ITK transform file (.tfm; in Slicer: load it "
                   "and set it as the functional's parent transform)")
    f.add_argument("--register-with", metavar="VOLUME",
                   help="with --register: register this volume instead of the functional and apply the result to "
                   "the functional (e.g. the PET's own CT from the same PET/CT session: CT -> MR is far better "
                   "constrained than PET -> MR); it must share the functional's DICOM FrameOfReferenceUID, or "
                   "(files without one) its placement")
    f.add_argument("--strict-registration", action="store_true",
                   help="with --register: refuse an uncertain registration (restarts from perturbed starts end "
                   "more than a voxel apart) instead of warning")
    f.set_defaults(func=cmd_fuse)

    pr = sub.add_parser("presets", help="list the named windows (--window-preset, --functional-preset)")
    pr.set_defaults(func=cmd_presets)

    m = sub.add_parser("methods", help="list the fusion methods")
    m.add_argument("--verbose", "-v", action="store_true", help="also show family and reference")
    m.set_defaults(func=cmd_methods)

    e = sub.add_parser("evaluate", help="evaluate methods on the aanlib pairs of a split")
    e.add_argument("--dataset", required=True, type=path_text, help="the aanlib folder (with split.csv)")
    e.add_argument("--split", default="test", choices=("train", "test"))
    e.add_argument("--methods", nargs="+", help="methods to evaluate (default: every available method)")
    e.add_argument("--pairs", nargs="+", default=None, choices=("CT-MRI", "PET-MRI", "SPECT-MRI"),
                   help="CT-MRI PET-MRI SPECT-MRI (default: all)")
    e.add_argument("--output", type=path_text, default="out/evaluation", help="folder for the CSV, markdown and montage files")
    e.add_argument("--device", default="auto", choices=devices)
    e.add_argument("--limit", type=positive_int, help="at most this many pairs per modality, 1 or more (quick runs)")
    e.add_argument("--montage-without-sources", action="store_true",
                   help="montage of fused results only (for figures that must not reproduce the dataset)")
    e.add_argument("--quiet", "-q", action="store_true")
    _add_threads(e)
    e.set_defaults(func=cmd_evaluate)

    t = sub.add_parser("train", help="train a fusion network on the aanlib train split (CPU is fine)")
    t.add_argument("--method", required=True, help="network to train (mrdfn, lywnet, dmfnet)")
    t.add_argument("--data", required=True, type=path_text, help="the aanlib folder (with split.csv)")
    t.add_argument("--minutes", type=positive_float, default=60.0, help="wall-time budget (more than 0)")
    t.add_argument("--out", type=path_text, help="folder for the run's checkpoints and loss log (default: runs/<method>); "
                   "the weights and manifest entry go to weights/")
    t.add_argument("--no-resume", action="store_true", help="start over instead of resuming the checkpoint")
    t.add_argument("--seed", type=int_range(0, 2 ** 32 - 1), default=0)
    t.add_argument("--device", default="auto", choices=devices)
    _add_threads(t)
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("batch", help="fuse every study of a manifest (CSV) on Dask: a laptop or a cluster "
                       "(docs/COHORTS.md)")
    b.add_argument("manifest", help="CSV with a header: id, anatomical, functional (or pacs, anatomical-series, "
                   "functional-series), optional method and any other fuse option by its long name; relative paths "
                   "are relative to the manifest")
    b.add_argument("--output", "-o", required=True, metavar="DIR", help="folder: DIR/<id>/ gets what fuse writes (fused.nrrd, "
                   "metrics.csv), DIR/summary.csv one line per study, DIR/cohort_metrics.csv every study's metrics")
    b.add_argument("--method", "-m", default="lp", help="method for the studies whose row names none; default lp")
    b.add_argument("--methods", nargs="+", metavar="METHOD", help="fuse every study with each of these methods "
                   "(DIR/<id>/<method>/) and rank them over the cohort (DIR/ranking.csv)")
    b.add_argument("--metric-set", default=choices.DEFAULT_METRIC_SET, choices=tuple(choices.METRIC_SETS),
                   help="metrics of every study (a metric-set column wins): quick (default, as fuse: no FMI) or all")
    b.add_argument("--preview", action="store_true", help="also write DIR/<id>/preview.png")
    b.add_argument("--output-dicom", action="store_true", help="also write each study's fused series as DICOM "
                   "into DIR/<id>/dicom/ (as fuse --output-dicom)")
    b.add_argument("--pacs", metavar="URL", help="DICOMweb root of the PACS of the rows that give anatomical-series "
                   "and functional-series and no pacs; login from $MEDICALFUSION_PACS_USER and "
                   "$MEDICALFUSION_PACS_PASSWORD (or ~/.netrc) where the workers run")
    b.add_argument("--store", action="store_true", help="store each PACS study's fused series back to its PACS "
                   "(a store column wins); a study whose inputs are files fails")
    b.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler (tcp://HOST:8786); default: "
                   "a LocalCluster on this machine")
    b.add_argument("--workers", type=positive_int, metavar="N", help="LocalCluster worker processes (default: one per core, "
                   "at most one per study)")
    b.add_argument("--threads", dest="worker_threads", type=positive_int, metavar="T",
                   help="torch threads per worker (default: the cores of a worker's machine shared among its workers)")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    b.set_defaults(func=cmd_batch)

    d = sub.add_parser("demo", help="fuse the embedded sample (MNI152 T1 + simulated PET)")
    d.add_argument("--output", type=path_text, default="out/demo", help="folder for sample, fused volume, preview and metrics")
    d.add_argument("--method", default=choices.DEFAULT_METHOD)
    d.add_argument("--device", default="auto", choices=devices)
    d.add_argument("--quiet", "-q", action="store_true")
    _add_threads(d)
    d.set_defaults(func=cmd_demo)
    return p


# --------------------------------------------------------------------------------------------------
# main


def _interrupted(args, exc: KeyboardInterrupt) -> int:
    signum = getattr(exc, "signum", signal.SIGINT)
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    out = getattr(args, "output_set", None)
    if out is not None and out.committed:
        done = ", ".join(str(p) for p in out.written)
        print(f"medicalfusion: {what} after every output was written ({done})", file=sys.stderr)
    else:
        note = getattr(args, "interrupt_note", None) or "nothing was written"
        print(f"medicalfusion: {what}; {note}", file=sys.stderr)
    return 128 + int(signum)


#: Set by :func:`run` (the program): once the run's outcome is settled, signals stay ignored until
#: the process ends, so a late Ctrl-C never reaches Python's shutdown (torch's atexit handlers).
_PROGRAM = {"running": False}


def _pause(name: str) -> None:
    """The test hook of io/outputs.py (a subprocess paused at a named point), without importing it."""
    if name in os.environ.get("MEDICALFUSION_TEST_PAUSE_AT", "").split(","):
        from .io.outputs import pause_point  # noqa: PLC0415

        pause_point(name)


def _settle(handlers) -> None:
    """The run's outcome is known: later SIGINT/SIGTERM/SIGHUP are ignored while it is reported."""
    for sig in handlers:
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    """The command with ``argv`` (default: sys.argv); returns the exit status. Signal handlers are
    in place from the start (a Ctrl-C while the command starts up is one line too) and are put
    back when it returns."""
    args = argparse.Namespace(debug=False)
    previous = _install_signal_handlers()
    notes = _NoteHandler()
    package_log = logging.getLogger("MedicalFusionLib")
    warnings_shown = None
    try:
        _pause("start")
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:          # --help, --version, or a one-line argparse error
            _settle(previous)
            return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
        import SimpleITK as sitk  # noqa: PLC0415

        warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        package_log.addHandler(notes)
        if getattr(args, "threads", None) is not None:
            import torch  # noqa: PLC0415

            torch.set_num_threads(args.threads)
        rc = args.func(args)
        _settle(previous)
        notes.show()
        return rc
    except FusionError as exc:
        _settle(previous)
        print(f"medicalfusion: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FusionCancelled:
        _settle(previous)
        print("medicalfusion: cancelled; nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt as exc:
        _settle(previous)                        # a second Ctrl-C must not cut the message short
        return _interrupted(args, exc)
    except MemoryError:
        _settle(previous)
        print("medicalfusion: error: out of memory: use --batch-size 1 or --device cpu; nothing was written",
              file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line unless --debug
        _settle(previous)
        if args.debug:
            raise
        detail = " ".join(str(exc).split())[:300]
        print(f"medicalfusion: internal error: {type(exc).__name__}: {detail} (rerun with --debug and report it)",
              file=sys.stderr)
        return 1
    finally:
        if not _PROGRAM["running"]:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        package_log.removeHandler(notes)
        if warnings_shown is not None:
            import SimpleITK as sitk  # noqa: PLC0415

            sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)


def run() -> None:
    """The ``medicalfusion`` program: :func:`main`, then exit with its status. Signals stay ignored
    from the moment the outcome is settled until the process has ended (Python's shutdown runs
    torch's atexit handlers, where a Ctrl-C printed a traceback): a late Ctrl-C changes nothing, the
    status is the run's (0 when everything was written)."""
    _PROGRAM["running"] = True
    try:
        rc = main()
    except KeyboardInterrupt:          # in the instant before main's handlers were in place
        _settle(_install_signal_handlers())
        print("medicalfusion: interrupted; nothing was written", file=sys.stderr)
        rc = 128 + int(signal.SIGINT)
    _pause("exit")
    sys.exit(rc)


if __name__ == "__main__":
    run()
