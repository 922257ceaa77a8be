"""``medicalfusion evaluate``: every method on the aanlib pairs of a split, as the papers report it.

Protocol (the one of the reference evaluator most fusion papers use, CDDFuse's utils/Evaluator.py):
the MRI and the functional's BT.601 luma are fused; the fused luma is recombined with the
functional's Cb/Cr to RGB uint8 (grayscale for CT); then every image is read as 8-bit grayscale
(BT.601 luma) and the metrics of :mod:`.metrics` are computed per pair and averaged over the
pairs. Written per modality pair into the output folder: ``<pair>.csv`` (one row per method and
metric: mean, std, seconds per pair), ``<pair>.md`` (a table of mean ± std like the papers'),
``<pair>_montage.png`` (a few cases: MRI, functional, then each method), and ``summary.md``.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib
import time

import numpy as np
import SimpleITK as sitk

from . import colour
from .device import pick_device
from .engine import fuse_slices
from .errors import FusionError
from .methods import all_methods, get_method
from .metrics import METRICS, slice_metrics
from .pipeline import recombine
from .training.data import PAIRS, read_png, read_split

TABLE_KEYS = ("EN", "SD", "SF", "AG", "MI_nats", "FMI_pixel", "SCD", "VIF", "Qabf", "SSIM_avg", "SSIM_sum", "PSNR",
              "CC", "ARI")
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


def write_tables(out: pathlib.Path, pair: str, rows: dict, seconds: dict, n: int) -> None:
    with open(out / f"{pair}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "metric", "mean", "std", "pairs", "seconds_per_pair"])
        for name, per_key in rows.items():
            for key in [m.key for m in METRICS]:
                vals = per_key[key]
                w.writerow([name, key, f"{np.mean(vals):.6f}", f"{np.std(vals):.6f}", n, f"{seconds[name]:.5f}"])
    lines = [f"### {pair} ({n} test pairs)", "",
             "| method | " + " | ".join(TABLE_KEYS) + " | s/pair |",
             "|---|" + "---|" * (len(TABLE_KEYS) + 1)]
    for name, per_key in rows.items():
        cells = [_fmt(float(np.mean(per_key[k])), float(np.std(per_key[k]))) for k in TABLE_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds[name]:.4f} |")
    (out / f"{pair}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_montage(out: pathlib.Path, pair: str, data: dict, fused: dict, with_sources: bool = True) -> None:
    """A few cases (rows) by method (columns); the two sources first unless ``with_sources`` is
    False (figures for the repository show only our outputs, never the dataset's images)."""
    n = len(data["names"])
    picks = np.linspace(0, n - 1, min(MONTAGE_CASES, n)).round().astype(int)
    rows = []
    for i in picks:
        tiles = [np.repeat(colour.to_uint8(data["mri"][i])[..., None], 3, -1), data["func_rgb8"][i]] if with_sources else []
        tiles += [fused[name][i] for name in fused]
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1))
    sitk.WriteImage(sitk.GetImageFromArray(np.concatenate(rows, axis=0), isVector=True),
                    str(out / f"{pair}_montage.png"))
    (out / f"{pair}_montage.txt").write_text(
        "columns: " + ("MRI, functional, " if with_sources else "") + ", ".join(fused) + "\nrows: " + ", ".join(data["names"][i] for i in picks) + "\n", encoding="utf-8")


def evaluate(dataset, split: str = "test", methods: list[str] | None = None, output="out/evaluation",
             pairs: list[str] | None = None, device: str = "auto", limit: int | None = None,
             quiet: bool = False, montage_sources: bool = True) -> dict:
    """Evaluate ``methods`` (default: every available one) and write the tables; returns
    ``{pair: {method: {metric: [values per pair]}}}``."""
    from tqdm import tqdm  # noqa: PLC0415

    pairs = pairs or list(PAIRS)
    for p in pairs:
        if p not in PAIRS:
            raise FusionError(f"unknown modality pair '{p}': choose from {', '.join(PAIRS)}")
    chosen = [get_method(m) for m in methods] if methods else [m for m in all_methods() if m.available()[0]]
    for m in chosen:
        ok, reason = m.available()
        if not ok:
            raise FusionError(reason)
    dev = pick_device(device)
    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    summary = [f"# Evaluation on the aanlib {split} split", "",
               "Protocol: fused luma + functional Cb/Cr -> RGB uint8 -> BT.601 8-bit grayscale; A = MRI, "
               "B = CT/PET/SPECT. SSIM_sum = SSIM(F,A)+SSIM(F,B) (reference evaluator), SSIM_avg = half of it; "
               f"MI in nats (sum over A and B); mean ± std over pairs; device {dev}.", ""]
    for pair in pairs:
        records = read_split(dataset, split, pairs=(pair,))
        if limit:
            records = records[:limit]
        if not records:
            continue
        data = load_modality(records)
        rows, seconds, fused_all = {}, {}, {}
        for m in chosen:
            fused, seconds[m.name] = fuse_modality(data, m, dev)
            fused_all[m.name] = fused
            f8 = colour.gray8(fused)
            per_key: dict = {info.key: [] for info in METRICS}
            it = range(len(records))
            if not quiet:
                it = tqdm(it, desc=f"{pair} {m.name}", unit="pair", leave=False)
            for i in it:
                for k, v in slice_metrics(data["a8"][i], data["b8"][i], f8[i]).items():
                    per_key[k].append(v)
            rows[m.name] = per_key
        write_tables(out, pair, rows, seconds, len(records))
        write_montage(out, pair, data, fused_all, with_sources=montage_sources)
        summary += [(out / f"{pair}.md").read_text(encoding="utf-8"), f"![{pair}]({pair}_montage.png)", ""]
        results[pair] = rows
        if not quiet:
            print(f"{pair}: {len(records)} pairs, {len(chosen)} methods -> {out / (pair + '.md')}")
    (out / "summary.md").write_text("\n".join(summary) + "\n", encoding="utf-8")
    return results
