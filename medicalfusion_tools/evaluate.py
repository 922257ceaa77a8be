"""``medicalfusion evaluate``: every method on the aanlib pairs of a split, as the papers report it.

Protocol (the one of the reference evaluator most fusion papers use, CDDFuse's utils/Evaluator.py),
run through the code users run: the pairs of a modality are one stack of slices, prepared by
:func:`MedicalFusionLib.pipeline.prepare` (MRI and functional 0..255 as [0, 1]; a PET/SPECT's
pseudo-colour RGB as it is, a CT as grey), fused and recombined by
:func:`MedicalFusionLib.pipeline.fuse_prepared` (the fused luma with the functional's colour, RGB
uint8), then scored by :func:`score`: the metrics engine
(:func:`MedicalFusionLib.metrics.torch_engine.volume_metrics_torch`, every metric) on the 8-bit
grayscale (BT.601 luma) of the sources and of the fused RGB, as the pipeline's metrics phase
reads them (:func:`MedicalFusionLib.pipeline.source_gray8`), one value per pair, mean and std over
the pairs. For a coloured functional (PET, SPECT) the colour metrics of the pipeline
(:func:`~MedicalFusionLib.metrics.torch_engine.colour_metrics_torch`: hue error, chroma kept,
against the functional's own colour) are added per pair, over the pairs with coloured voxels.
Training scores its test split with the same :func:`score` (training/loop.py). Written per
modality pair into the output folder: ``<pair>.csv`` (one row per method and metric: mean, std,
seconds per pair), ``<pair>.md`` (a table of mean ± std like the papers'), ``<pair>_montage.png``
(a few cases: MRI, functional, then each method), and ``summary.md`` -- all of them together at
the end of a successful run, or none.
"""
from __future__ import annotations

import csv
import io
import sys

import numpy as np
import SimpleITK as sitk

from MedicalFusionLib import colour
from MedicalFusionLib.device import pick_device
from MedicalFusionLib.errors import FusionError
from MedicalFusionLib.methods import all_methods, get_method
from MedicalFusionLib.metrics import COLOUR_METRICS, METRIC_SETS, METRICS, summarise
from MedicalFusionLib.options import FusionOptions
from MedicalFusionLib.pipeline import Prepared, fuse_prepared, prepare, source_gray8

from .training.data import PAIRS, dataset_root, read_png, read_split

TABLE_KEYS = ("EN", "SD", "SF", "AG", "MI_nats", "FMI_pixel", "SCD", "VIF", "Qabf", "SSIM_avg", "SSIM_sum", "PSNR",
              "CC", "ARI")
COLOUR_TABLE_KEYS = ("hue_err10", "chroma_kept")
MONTAGE_CASES = 3


def load_modality(records) -> dict:
    """Arrays of one modality pair: MRI [N,H,W] in [0,1], functional YCbCr [N,H,W,3], 8-bit grays."""
    mri8 = np.stack([read_png(r.mri) for r in records])
    func8 = np.stack([read_png(r.image) for r in records])
    if func8.ndim == 4:
        ycc = colour.rgb_to_ycbcr(func8.astype(np.float32) / 255.0)
        grayscale = False
    else:
        y = func8.astype(np.float32) / 255.0
        ycc = np.stack([y, np.full_like(y, 0.5), np.full_like(y, 0.5)], axis=-1)
        grayscale = True
    if mri8.ndim == 4:
        mri8 = colour.gray8(mri8)
    return {"mri": mri8.astype(np.float32) / 255.0, "ycc": ycc, "grayscale": grayscale,
            "a8": mri8, "b8": colour.gray8(func8), "func_rgb8": func8 if func8.ndim == 4 else
            np.repeat(func8[..., None], 3, axis=-1), "names": [r.stem for r in records]}


def evaluation_options(method: str, device: str = "auto") -> FusionOptions:
    """The options of an evaluation run: the pictures' 0..255 as [0, 1] (no auto window), slices
    along the stack of pairs (array axis 0); the metrics are :func:`score`'s."""
    return FusionOptions(method=method, device=str(device), anatomical_window=(0.0, 255.0),
                         functional_window=(0.0, 255.0), axis=0, compute_metrics=False)


def prepare_modality(data: dict, first: int | None = None) -> Prepared:
    """The pairs of :func:`load_modality` (the first ``first`` of them) prepared by the pipeline as
    one stack of slices [N, H, W]: the MRI as a scalar 8-bit volume, the functional as its RGB
    (a CT's grey in three equal channels, which the pipeline keeps grey).

    The functional's YCbCr is then :func:`load_modality`'s, computed from the 8-bit picture: the
    same values as the pipeline's for a PET/SPECT's RGB; for a CT's grey exactly k / 255 (the
    pipeline's RGB-to-YCbCr of a grey rounds in float32 within 6e-8, enough to turn exact .5 ties
    of ``average`` the other way, as the reference evaluator does not)."""
    n = len(data["a8"]) if first is None else first
    anatomical = sitk.GetImageFromArray(np.ascontiguousarray(data["a8"][:n]))
    functional = sitk.GetImageFromArray(np.ascontiguousarray(data["func_rgb8"][:n]), isVector=True)
    prepared = prepare(anatomical, functional, evaluation_options("alpha"))
    if "ycc" in data:
        prepared.functional_ycc = np.ascontiguousarray(data["ycc"][:n], dtype=np.float32)
    return prepared


def fuse_modality(data: dict, method: str, device, prepared: Prepared | None = None) -> tuple[np.ndarray, float]:
    """RGB uint8 [N,H,W,3] of ``method`` (a name) for every pair, through the pipeline
    (:func:`~MedicalFusionLib.pipeline.fuse_prepared`), and the seconds per pair of its fuse and
    recombine phases (after a warm-up on the first pair).

    The method is built once for the warm-up and the timed run (networks read and verify their
    weights once): :func:`MedicalFusionLib.methods.registry.keep_built` is on for the call."""
    from MedicalFusionLib.methods import registry  # noqa: PLC0415

    prepared = prepared if prepared is not None else prepare_modality(data)
    options = evaluation_options(method, str(device))
    was_kept = registry._kept is not None
    registry.keep_built(True)
    try:
        fuse_prepared(prepare_modality(data, first=1), options)     # warm-up (caches, the built method)
        result = fuse_prepared(prepared, options)
    finally:
        if not was_kept:
            registry.keep_built(False)
    return result.rgb, result.seconds / len(prepared.anatomical)


def score(prepared: Prepared, rgb: np.ndarray, device="auto") -> dict[str, tuple[float, float, int]]:
    """``{key: (mean, std, pairs)}`` over the slices (pairs) of a fused stack: every metric of the
    table by the metrics engine, on the sources and the fused RGB as 8-bit grayscale (as the
    pipeline's metrics phase reads them); for a coloured functional, the colour metrics of each
    pair, over the pairs with coloured voxels."""
    from MedicalFusionLib.metrics.torch_engine import ColourMetrics, volume_metrics_torch  # noqa: PLC0415

    a8, b8 = source_gray8(prepared)
    out = volume_metrics_torch(a8, b8, colour.gray8(rgb), axis=0, keys=METRIC_SETS["all"], device=device)
    if not prepared.grayscale:
        per_pair: dict = {}
        acc = ColourMetrics(rgb[:1].shape[:-1], device=device)     # one look-up of fused colours for every pair
        for i in range(len(rgb)):
            acc.reset()
            acc.add(rgb[i:i + 1], prepared.functional_ycc[i:i + 1])
            for k, v in acc.result().items():
                per_pair.setdefault(k, []).append(v[0])
        out.update(summarise(per_pair))
    return out


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def table_texts(pair: str, rows: dict, seconds: dict, n: int) -> tuple[str, str]:
    """(``<pair>.csv``, ``<pair>.md``): per method and metric mean, std, pairs, seconds per pair;
    ``rows`` is ``{method: {key: (mean, std, pairs)}}`` (:func:`score`)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["method", "metric", "mean", "std", "pairs", "seconds_per_pair"])
    for name, per_key in rows.items():
        for key in [m.key for m in METRICS + COLOUR_METRICS]:
            if key not in per_key:       # a colour metric without coloured voxels (CT-MRI)
                continue
            mean, std, count = per_key[key]
            w.writerow([name, key, f"{mean:.6f}", f"{std:.6f}", count, f"{seconds[name]:.5f}"])
    keys = TABLE_KEYS + tuple(k for k in COLOUR_TABLE_KEYS if all(k in per_key for per_key in rows.values()))
    lines = [f"### {pair} ({n} test pairs)", "",
             "| method | " + " | ".join(keys) + " | s/pair |",
             "|---|" + "---|" * (len(keys) + 1)]
    for name, per_key in rows.items():
        cells = [_fmt(per_key[k][0], per_key[k][1]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds[name]:.4f} |")
    return buf.getvalue(), "\n".join(lines) + "\n"


def montage(data: dict, fused: dict, with_sources: bool = True) -> tuple[np.ndarray, str]:
    """A few cases (rows) by method (columns) as uint8 RGB, and its caption; the two sources come
    first unless ``with_sources`` is False (figures for the repository show only our outputs, never
    the dataset's images)."""
    n = len(data["names"])
    picks = np.linspace(0, n - 1, min(MONTAGE_CASES, n)).round().astype(int)
    rows = []
    for i in picks:
        tiles = [np.repeat(colour.to_uint8(data["mri"][i])[..., None], 3, -1), data["func_rgb8"][i]] if with_sources else []
        tiles += [fused[name][i] for name in fused]
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1))
    caption = ("columns: " + ("MRI, functional, " if with_sources else "") + ", ".join(fused) + "\nrows: "
               + ", ".join(data["names"][i] for i in picks) + "\n")
    return np.concatenate(rows, axis=0), caption


def evaluate(dataset, split: str = "test", methods: list[str] | None = None, output="out/evaluation",
             pairs: list[str] | None = None, device: str = "auto", limit: int | None = None,
             quiet: bool = False, montage_sources: bool = True, run=None) -> dict:
    """Evaluate ``methods`` (default: every available one) and write the tables; returns
    ``{pair: {method: {metric: (mean, std, pairs)}}}``.

    Every file goes through one :class:`~MedicalFusionLib.io.outputs.OutputSet`: the tables, montages
    and summary appear together when every pair was evaluated, or not at all (an unreadable PNG or
    an interrupt leaves the output folder as it was). ``run``, when given, gets the set as
    ``run.output_set`` (the CLI uses it to report an interrupt truthfully)."""
    from tqdm import tqdm  # noqa: PLC0415

    from MedicalFusionLib.io.outputs import OutputSet, picture  # noqa: PLC0415

    bars = not quiet and sys.stderr.isatty()      # never bar fragments in a log
    pairs = pairs or list(PAIRS)
    for p in pairs:
        if p not in PAIRS:
            raise FusionError(f"unknown modality pair '{p}': choose from {', '.join(PAIRS)}")
    if limit is not None and (int(limit) != limit or limit < 1):
        raise FusionError(f"--limit {limit}: give a whole number of pairs, 1 or more")
    chosen = [get_method(m) for m in methods] if methods else [m for m in all_methods() if m.available()[0]]
    for m in chosen:
        ok, reason = m.available()
        if not ok:
            raise FusionError(reason)
    dev = pick_device(device)
    by_pair = {pair: read_split(dataset, split, pairs=(pair,)) for pair in pairs}
    by_pair = {pair: (recs[:limit] if limit else recs) for pair, recs in by_pair.items() if recs}
    if not by_pair:
        raise FusionError(f"no {split} pairs of {', '.join(pairs)} in {dataset_root(dataset) / 'split.csv'}: "
                          "check --dataset, --split and --pairs")
    results: dict = {}
    summary = [f"# Evaluation on the aanlib {split} split", "",
               "Protocol: the pipeline's prepare, fuse and recombine (fused luma + functional colour) -> RGB uint8 -> "
               "BT.601 8-bit grayscale -> the metrics engine (torch); A = MRI, "
               "B = CT/PET/SPECT. SSIM_sum = SSIM(F,A)+SSIM(F,B) (reference evaluator), SSIM_avg = half of it; "
               f"MI in nats (sum over A and B); mean ± std over pairs; device {dev}.", ""]
    with OutputSet() as out:
        if run is not None:
            run.output_set = out
        out.protect(dataset_root(dataset), "dataset folder")
        for folder in sorted({r.mri.parent for rs in by_pair.values() for r in rs}
                             | {r.image.parent for rs in by_pair.values() for r in rs}):
            out.protect(folder, "dataset folder")
        folder = out.folder(output, "evaluate --output folder")
        for pair, records in by_pair.items():
            data = load_modality(records)
            prepared = prepare_modality(data)
            rows, seconds, fused_all = {}, {}, {}
            it = tqdm(chosen, desc=pair, unit="method", leave=False) if bars else chosen
            for m in it:
                fused, seconds[m.name] = fuse_modality(data, m.name, dev, prepared)
                fused_all[m.name] = fused
                rows[m.name] = score(prepared, fused, dev)
            csv_text, md_text = table_texts(pair, rows, seconds, len(records))
            image, caption = montage(data, fused_all, with_sources=montage_sources)
            out.add_text(folder / f"{pair}.csv", csv_text, f"table {pair}.csv")
            out.add_text(folder / f"{pair}.md", md_text, f"table {pair}.md")
            out.add_image(folder / f"{pair}_montage.png", picture(image), f"montage {pair}_montage.png")
            out.add_text(folder / f"{pair}_montage.txt", caption, f"caption {pair}_montage.txt")
            summary += [md_text, f"![{pair}]({pair}_montage.png)", ""]
            results[pair] = rows
        out.add_text(folder / "summary.md", "\n".join(summary) + "\n", "summary.md")
        out.commit()
    if not quiet:
        for pair, records in by_pair.items():
            print(f"{pair}: {len(records)} pairs, {len(chosen)} methods -> {folder / (pair + '.md')}")
    return results
