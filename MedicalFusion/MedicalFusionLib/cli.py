"""The ``medicalfusion`` command: fuse, methods, evaluate, train, demo.

Every user error ends in one line on stderr (``medicalfusion: error: ...``) and exit status 2;
nothing is written unless the whole run succeeded.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from . import __version__
from .errors import FusionCancelled, FusionError

EXIT_USER_ERROR = 2


def _progress_bar(desc: str, enabled: bool):
    """A tqdm-backed ``progress(done, total)`` callback and a closer."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm  # noqa: PLC0415

    bar = {"b": None}

    def progress(done: int, total: int) -> None:
        if bar["b"] is None:
            bar["b"] = tqdm(total=total, desc=desc, unit="slice", leave=False, file=sys.stderr)
        bar["b"].n = done
        bar["b"].refresh()

    def close() -> None:
        if bar["b"] is not None:
            bar["b"].close()

    return progress, close


def _notice(text: str) -> None:
    """One line on stderr that is not an error (e.g. PET units that could not be made SUV)."""
    print(f"medicalfusion: notice: {text}", file=sys.stderr)


def cmd_fuse(args) -> int:
    from . import colour, outputs, windows  # noqa: PLC0415
    from .methods import get_method  # noqa: PLC0415
    from .metrics import metrics_table_rows  # noqa: PLC0415
    from .pipeline import FusionOptions, fuse_images, source_gray8  # noqa: PLC0415
    from .sources import read_source  # noqa: PLC0415

    get_method(args.method)
    if args.colormap:
        colour.colormap_table(args.colormap)
    for preset in (args.window_preset, args.functional_preset):
        if preset:
            windows.get_preset(preset)
    inputs = [args.anatomical, args.functional]
    out = outputs.check_output_path(args.output, inputs, "output")
    metrics_path = outputs.check_output_path(args.metrics, inputs, "metrics file") if args.metrics else None
    preview_path = outputs.check_output_path(args.preview, inputs, "preview") if args.preview else None
    anat = read_source(args.anatomical, "anatomical")
    func = read_source(args.functional, "functional")
    for src in (anat, func):
        if src.facts is not None and src.facts.notice:
            _notice(src.facts.notice)
    options = FusionOptions(method=args.method, colormap=args.colormap,
                            anatomical_window=tuple(args.window) if args.window else None,
                            functional_window=tuple(args.functional_window) if args.functional_window else None,
                            axis=args.axis, device=args.device, batch_size=args.batch_size,
                            compute_metrics=metrics_path is not None,
                            anatomical_preset=args.window_preset, functional_preset=args.functional_preset,
                            anatomical_units=(anat.facts.units or None) if anat.facts else None,
                            functional_units=(func.facts.units or None) if func.facts else None)
    progress, close = _progress_bar(f"fusing ({args.method})", not args.quiet)
    try:
        result = fuse_images(anat.image, func.image, options, progress=progress)
    finally:
        close()
    for text in result.prepared.notices:
        _notice(text)
    meta = windows.display_metadata(result.prepared)
    for role, src in (("anatomical", anat), ("functional", func)):
        if src.facts is not None:
            meta.update(src.facts.as_metadata(role))
    as_2d = anat.was_2d and out.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    fused = outputs.fused_image_for_file(result.rgb, result.reference, as_2d)
    for key, value in meta.items():      # NRRD and MHA keep these in the file's header
        fused.SetMetaData(f"MedicalFusion.{key}", value)
    outputs.write_image_atomic(fused, out)
    if preview_path:
        a8, _ = source_gray8(result.prepared)
        func_rgb = colour.to_uint8(colour.ycbcr_to_rgb(result.prepared.functional_ycc))
        outputs.write_preview(outputs.preview_montage(a8, func_rgb, result.rgb, result.reference, args.axis),
                              preview_path)
    if metrics_path:
        extra = {"method": result.method, "device": result.device, "seconds": f"{result.seconds:.3f}",
                 "version": __version__, **meta}
        outputs.write_metrics_csv(metrics_table_rows(result.metrics), metrics_path, extra)
    if not args.quiet:
        print(f"fused with {result.method} on {result.device} in {result.seconds:.2f} s -> {out}")
        if metrics_path:
            shown = ", ".join(f"{k} {v[0]:.3f}" for k, v in result.metrics.items() if k in ("SSIM_avg", "Qabf", "VIF", "MI_bits"))
            print(f"metrics ({shown}) -> {metrics_path}")
        if preview_path:
            print(f"preview -> {preview_path}")
    return 0


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
    from .methods import all_methods  # noqa: PLC0415

    for m in all_methods():
        ok, reason = m.available()
        note = "" if ok else f"  [unavailable: {reason}]"
        print(f"{m.name:14s} {m.description}{note}")
        if args.verbose:
            print(f"{'':14s} {m.family}; {m.reference}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate  # noqa: PLC0415

    evaluate(args.dataset, args.split, args.methods, args.output, pairs=args.pairs, device=args.device,
             limit=args.limit, quiet=args.quiet, montage_sources=not args.montage_without_sources)
    return 0


def cmd_train(args) -> int:
    from .training import train  # noqa: PLC0415

    entry = train(args.method, args.data, out_dir=args.out, minutes=args.minutes, resume=not args.no_resume,
                  seed=args.seed, device=args.device)
    print(f"trained {args.method}: {entry.get('file', '')} sha256 {str(entry.get('sha256', ''))[:12]}...")
    return 0


def cmd_demo(args) -> int:
    from .sample import write_sample  # noqa: PLC0415

    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    anat, func = write_sample(out / "sample")
    print(f"sample: {anat} (MNI152 T1, 1 mm) and {func} (simulated FDG-PET, 4 mm, oblique)")
    fuse_args = build_parser().parse_args([
        "fuse", "--anatomical", str(anat), "--functional", str(func), "--method", args.method,
        "-o", str(out / "fused.nrrd"), "--metrics", str(out / "metrics.csv"), "--preview", str(out / "preview.png"),
        "--device", args.device] + (["--quiet"] if args.quiet else []))
    fuse_args.threads = args.threads
    return cmd_fuse(fuse_args)


def build_parser() -> argparse.ArgumentParser:
    from .device import DEVICE_CHOICES  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="medicalfusion", description="Multimodal medical image fusion (MRI/CT + PET/SPECT).")
    p.add_argument("--version", action="version", version=f"medicalfusion {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fuse", help="fuse a registered anatomical + functional pair")
    f.add_argument("--anatomical", "-a", required=True, help="MRI or CT: NRRD, NIfTI, MHA, DICOM folder, PNG/JPG")
    f.add_argument("--functional", "-f", required=True, help="PET/SPECT values (scalar) or pseudo-colour RGB")
    f.add_argument("--method", "-m", default="lp", help="fusion method (see 'medicalfusion methods'); default lp")
    f.add_argument("--colormap", help="colour map for a scalar functional (Slicer names: PET-Heat, PET-Rainbow2, "
                   "Rainbow, Grey, ...); default PET-Heat; use Grey for CT (grayscale fusion)")
    f.add_argument("--window", nargs=2, type=float, metavar=("LO", "HI"), help="anatomical window (default: see --window-preset)")
    f.add_argument("--functional-window", nargs=2, type=float, metavar=("LO", "HI"),
                   help="functional window for the colour map (default: minimum .. 99.9th percentile)")
    from .windows import preset_names  # noqa: PLC0415

    names = ", ".join(preset_names())
    f.add_argument("--window-preset", metavar="NAME",
                   help=f"anatomical window by name ({names}, pet-suv-0-N; see 'medicalfusion presets'); "
                   "default: ct-soft-tissue for a CT in HU, the robust percentile window otherwise")
    f.add_argument("--functional-preset", metavar="NAME",
                   help="functional window by name, e.g. pet-suv-0-5, pet-suv-0-10, pet-suv-0-20 (PET in SUV) "
                   "or a CT preset for a CT functional; default: minimum .. 99.9th percentile")
    f.add_argument("--axis", default="axial", help="slice orientation: axial, coronal, sagittal (or array axis 0-2)")
    f.add_argument("--device", default="auto", choices=DEVICE_CHOICES + ("gpu",), help="torch device; default auto")
    f.add_argument("--batch-size", type=int, help="slices per batch (default: sized to the device memory)")
    f.add_argument("--output", "-o", required=True, help="fused RGB output (.nrrd, .nii.gz, .mha; .png for 2D)")
    f.add_argument("--metrics", help="write the quality metrics (mean, std over slices) to this CSV")
    f.add_argument("--preview", help="write a PNG: anatomical | functional | fused")
    f.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    f.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is "
                   "often faster on a machine busy with other work)")
    f.set_defaults(func=cmd_fuse)

    pr = sub.add_parser("presets", help="list the named windows (--window-preset, --functional-preset)")
    pr.set_defaults(func=cmd_presets)

    m = sub.add_parser("methods", help="list the fusion methods")
    m.add_argument("--verbose", "-v", action="store_true", help="also show family and reference")
    m.set_defaults(func=cmd_methods)

    e = sub.add_parser("evaluate", help="evaluate methods on the aanlib pairs of a split")
    e.add_argument("--dataset", required=True, help="the aanlib folder (with split.csv)")
    e.add_argument("--split", default="test", choices=("train", "test"))
    e.add_argument("--methods", nargs="+", help="methods to evaluate (default: every available method)")
    e.add_argument("--pairs", nargs="+", default=None, help="CT-MRI PET-MRI SPECT-MRI (default: all)")
    e.add_argument("--output", default="out/evaluation", help="folder for the CSV, markdown and montage files")
    e.add_argument("--device", default="auto", choices=DEVICE_CHOICES + ("gpu",))
    e.add_argument("--limit", type=int, help="at most this many pairs per modality (quick runs)")
    e.add_argument("--montage-without-sources", action="store_true",
                   help="montage of fused results only (for figures that must not reproduce the dataset)")
    e.add_argument("--quiet", "-q", action="store_true")
    e.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is "
                   "often faster on a machine busy with other work)")
    e.set_defaults(func=cmd_evaluate)

    t = sub.add_parser("train", help="train a fusion network on the aanlib train split (CPU is fine)")
    t.add_argument("--method", required=True, help="network to train (mrdfn, lywnet, dmfnet)")
    t.add_argument("--data", required=True, help="the aanlib folder (with split.csv)")
    t.add_argument("--minutes", type=float, default=60.0, help="wall-time budget")
    t.add_argument("--out", help="folder for the run's checkpoints and loss log (default: runs/<method>); "
                   "the weights and manifest entry go to weights/")
    t.add_argument("--no-resume", action="store_true", help="start over instead of resuming the checkpoint")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", choices=DEVICE_CHOICES + ("gpu",))
    t.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is "
                   "often faster on a machine busy with other work)")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="fuse the embedded sample (MNI152 T1 + simulated PET)")
    d.add_argument("--output", default="out/demo", help="folder for sample, fused volume, preview and metrics")
    d.add_argument("--method", default="lp")
    d.add_argument("--device", default="auto", choices=DEVICE_CHOICES + ("gpu",))
    d.add_argument("--quiet", "-q", action="store_true")
    d.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is "
                   "often faster on a machine busy with other work)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise FusionError("--threads takes a whole number of 1 or more")
            import torch  # noqa: PLC0415

            torch.set_num_threads(args.threads)
        return args.func(args)
    except FusionError as exc:
        print(f"medicalfusion: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FusionCancelled:
        print("medicalfusion: cancelled; nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("medicalfusion: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("medicalfusion: error: out of memory: use --batch-size 1 or --device cpu", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line unless --debug
        if args.debug:
            raise
        print(f"medicalfusion: internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
