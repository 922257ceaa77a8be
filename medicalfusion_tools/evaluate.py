"""``medicalfusion evaluate``: every method on the aanlib pairs of a split, as the papers report it.

Protocol (the one of the reference evaluator most fusion papers use, CDDFuse's utils/Evaluator.py):
the MRI and the functional's BT.601 luma are fused; the fused luma is recombined with the
functional's colour to RGB uint8 by the pipeline's ``recombine`` (grayscale for CT); then every
image is read as 8-bit grayscale
(BT.601 luma) and the metrics of :mod:`.metrics` are computed per pair and averaged over the
pairs. For a coloured functional (PET, SPECT) the colour metrics of the pipeline
(:func:`~MedicalFusionLib.metrics_torch.colour_metrics_torch`: hue error, chroma kept, against the
functional's own colour) are added per pair, over the pairs with coloured voxels. Written per
modality pair into the output folder: ``<pair>.csv`` (one row per method and
metric: mean, std, seconds per pair), ``<pair>.md`` (a table of mean ± std like the papers'),
``<pair>_montage.png`` (a few cases: MRI, functional, then each method), and ``summary.md`` -- all
of them together at the end of a successful run, or none.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import sys
import time

import numpy as np

from . import colour
from .device import pick_device
from .engine import fuse_slices
from .errors import FusionError
from .methods import all_methods, get_method
from .metrics import COLOUR_METRICS, METRICS, slice_metrics
from .pipeline import recombine
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


def fuse_modality(data: dict, method, device) -> tuple[np.ndarray, float]:
    """RGB uint8 [N,H,W,3] for every pair and the seconds per pair (after one warm-up pair).

    The method is built once (networks read and verify their weights once) and used for the
    warm-up and the timed run."""
    fn = method.build(device)
    method = dataclasses.replace(method, build=lambda _device: fn)
    fuse_slices(data["mri"][:1], data["ycc"][:1, ..., 0], method, device=device)   # warm-up (caches)
    t0 = time.perf_counter()
    fused_y = fuse_slices(data["mri"], data["ycc"][..., 0], method, device=device)
    seconds = (time.perf_counter() - t0) / len(data["mri"])
    return recombine(fused_y, data["ycc"], method.chroma_scale, data["grayscale"]), seconds


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def table_texts(pair: str, rows: dict, seconds: dict, n: int) -> tuple[str, str]:
    """(``<pair>.csv``, ``<pair>.md``): per method and metric mean, std, pairs, seconds per pair."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["method", "metric", "mean", "std", "pairs", "seconds_per_pair"])
    for name, per_key in rows.items():
        for key in [m.key for m in METRICS + COLOUR_METRICS]:
            vals = per_key.get(key)
            if not vals:                 # a colour metric without coloured voxels (CT-MRI)
                continue
            w.writerow([name, key, f"{np.mean(vals):.6f}", f"{np.std(vals):.6f}", len(vals), f"{seconds[name]:.5f}"])
    keys = TABLE_KEYS + tuple(k for k in COLOUR_TABLE_KEYS if all(per_key.get(k) for per_key in rows.values()))
    lines = [f"### {pair} ({n} test pairs)", "",
             "| method | " + " | ".join(keys) + " | s/pair |",
             "|---|" + "---|" * (len(keys) + 1)]
    for name, per_key in rows.items():
        cells = [_fmt(float(np.mean(per_key[k])), float(np.std(per_key[k]))) for k in keys]
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
    ``{pair: {method: {metric: [values per pair]}}}``.

    Every file goes through one :class:`~MedicalFusionLib.outputs.OutputSet`: the tables, montages
    and summary appear together when every pair was evaluated, or not at all (an unreadable PNG or
    an interrupt leaves the output folder as it was). ``run``, when given, gets the set as
    ``run.output_set`` (the CLI uses it to report an interrupt truthfully)."""
    from tqdm import tqdm  # noqa: PLC0415

    from .metrics_torch import colour_metrics_torch  # noqa: PLC0415
    from .outputs import OutputSet, picture  # noqa: PLC0415

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
               "Protocol: fused luma + functional colour (pipeline.recombine) -> RGB uint8 -> BT.601 8-bit grayscale; A = MRI, "
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
            rows, seconds, fused_all = {}, {}, {}
            for m in chosen:
                fused, seconds[m.name] = fuse_modality(data, m, dev)
                fused_all[m.name] = fused
                f8 = colour.gray8(fused)
                per_key: dict = {info.key: [] for info in METRICS + COLOUR_METRICS}
                it = range(len(records))
                if bars:
                    it = tqdm(it, desc=f"{pair} {m.name}", unit="pair", leave=False)
                for i in it:
                    for k, v in slice_metrics(data["a8"][i], data["b8"][i], f8[i]).items():
                        per_key[k].append(v)
                    if not data["grayscale"]:
                        for k, v in colour_metrics_torch(fused[i:i + 1], data["ycc"][i:i + 1], device=dev).items():
                            per_key[k].append(v[0])
                rows[m.name] = per_key
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
