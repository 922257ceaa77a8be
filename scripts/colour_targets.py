"""Colour fidelity before/after the colour-keeping recombination, and the targets of issue #18.

For every method, on the three sts patients (PET onto CT and onto MR, straight from the DICOM
folders, the pipeline's default windows) and on the coloured modality pairs of the aanlib split
(PET-MRI, SPECT-MRI; CT-MRI is grayscale and unchanged bit for bit), the luma is fused once and
recombined twice: ``before`` (the former BT.601 recombination: fused luma + functional Cb/Cr) and
``after`` (pipeline.recombine as shipped). Measured on each:

- the colour metrics of the pipeline (metrics.torch_engine.colour_metrics_torch): hue error > 10 degrees
  (% of coloured voxels), median chroma kept, median read-back error (% of window; sts only: the
  aanlib functionals are RGB pictures without a colour bar), all and over bone (CT > 215 HU);
- the anatomy rule of docs/CLINICAL.md (hotspot.detail_kept on the luma, in the PET's coloured
  region: r >= 0.5, slope >= 0.35; sts only, as the real-case tests) and the lightness detail
  correlation: the difference of Gaussians (sigma 1 and 3 px in plane) of the fused CIELAB L*
  against the anatomical's, on the coloured voxels (C* > 20) over non-background anatomy, r >= 0.7;
- sts: the hot-spot share (hotspot.top_fraction_in) minus the plain resample's (>= -2 points);
- aanlib with ``--ranks``: the reference evaluator's 11 metrics (the metrics engine, 'quick' set) per
  pair, and the mean rank of every network among the networks and the peers of shared/ANCHORS.md.

Run (one torch thread, in the background; the tables go to --out as CSV and Markdown):

    PYTHONPATH=$PWD/MedicalFusion OMP_NUM_THREADS=1 python scripts/colour_targets.py \
        --sets sts aanlib --ranks --out /tmp/colour/targets
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time

import numpy as np
import torch
from scipy import ndimage as ndi

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedicalFusion"))
sys.path.insert(0, str(ROOT))   # medicalfusion_tools

from MedicalFusionLib import colour  # noqa: E402
from MedicalFusionLib.engine import fuse_slices, fuse_volume  # noqa: E402
from medicalfusion_tools.hotspot import DETAIL_SIGMAS, Case, chroma, detail_kept, top_fraction_in  # noqa: E402
from MedicalFusionLib.methods import all_methods, get_method  # noqa: E402
from MedicalFusionLib.metrics.torch_engine import COLOURED_CHROMA, colour_metrics_torch, volume_metrics_torch  # noqa: E402
from MedicalFusionLib.pipeline import array_axis, recombine  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
COLOUR_KEYS = ("hue_err10", "chroma_kept", "readback_err", "hue_err10_bone", "chroma_kept_bone", "readback_err_bone")
RANK_KEYS = ("EN", "SD", "SF", "AG", "MI_nats", "SCD", "VIF", "Qabf", "SSIM_sum", "PSNR", "CC")
NETWORKS = ("dmfnet", "lywnet", "mrdfn")
#: shared/ANCHORS.md, the peers' means in RANK_KEYS order (MI in nats, SSIM as the sum)
PEERS = {
    "PET-MRI": {
        "alpha (anchors)": (5.523, 63.668, 17.780, 6.266, 3.235, 1.029, 0.753, 0.434, 1.245, 14.006, 0.848),
        "yavg": (5.529, 63.709, 17.778, 6.246, 3.220, 1.033, 0.765, 0.431, 1.245, 13.976, 0.848),
        "ymax": (5.223, 86.040, 32.320, 10.674, 3.709, 1.379, 0.940, 0.767, 1.348, 12.154, 0.777),
        "LYWNet-released": (5.297, 53.650, 16.646, 5.296, 1.981, 0.485, 0.609, 0.351, 1.116, 11.715, 0.821),
        "MATR-released": (5.998, 66.770, 26.256, 9.031, 2.601, 0.310, 0.696, 0.731, 0.742, 11.627, 0.745),
        "GeSeNet": (6.366, 83.710, 32.761, 11.195, 2.307, 1.342, 0.723, 0.758, 1.025, 12.249, 0.779),
        "IFCNN-MAX": (5.780, 80.063, 34.507, 11.588, 1.924, 1.375, 0.584, 0.694, 1.346, 13.317, 0.805),
    },
    "SPECT-MRI": {
        "alpha (anchors)": (3.954, 44.582, 9.583, 2.831, 2.440, 0.713, 0.545, 0.380, 1.570, 18.550, 0.911),
        "yavg": (3.946, 44.599, 9.538, 2.818, 2.421, 0.715, 0.545, 0.376, 1.570, 18.398, 0.911),
        "ymax": (3.688, 60.028, 16.047, 4.424, 3.000, 1.377, 0.694, 0.653, 1.564, 18.108, 0.875),
        "LYWNet-released": (4.161, 50.253, 10.939, 3.077, 1.970, 0.953, 0.547, 0.396, 1.547, 19.082, 0.893),
        "MATR-released": (4.499, 48.333, 14.998, 4.460, 2.488, -0.012, 0.758, 0.706, 0.531, 16.759, 0.843),
        "GeSeNet": (4.596, 59.821, 17.895, 5.250, 2.055, 1.454, 0.679, 0.713, 0.978, 17.926, 0.876),
        "IFCNN-MAX": (4.059, 53.596, 18.205, 5.186, 1.818, 0.995, 0.558, 0.639, 1.579, 19.492, 0.882),
    },
}


def dog(x: np.ndarray) -> np.ndarray:
    s1, s2 = DETAIL_SIGMAS
    x = np.asarray(x, dtype=np.float32)
    return ndi.gaussian_filter(x, (0, s1, s1)) - ndi.gaussian_filter(x, (0, s2, s2))


def lightness_detail_r(rgb8: np.ndarray, anatomical01: np.ndarray, region: np.ndarray) -> float:
    """r of the DoG of the fused L* against the anatomical's L* (a grey), in ``region``."""
    fused_l = colour.rgb_to_lab(rgb8.astype(np.float32) / 255.0)[..., 0]
    anat_l = colour.gray_lightness(anatomical01)
    f, a = dog(fused_l)[region], dog(anat_l)[region]
    return float(np.corrcoef(a, f)[0, 1])


def coloured_voxels(functional_rgb: np.ndarray, anatomical01: np.ndarray) -> np.ndarray:
    lab = colour.rgb_to_lab(functional_rgb)
    return (np.hypot(lab[..., 1], lab[..., 2]) > COLOURED_CHROMA) & (anatomical01 > 0.02)


def measure(rgb, ycc, levels, table, bone, anatomical01, region_clinical, region_lab, axis) -> dict:
    row = {k: v[0] for k, v in colour_metrics_torch(rgb, ycc, levels, table, bone, axis=axis, device="cpu").items()}
    row["lightness_r"] = lightness_detail_r(rgb, anatomical01, region_lab)
    if region_clinical is not None:
        row["detail_r"], row["detail_slope"] = detail_kept(colour.gray8(rgb), colour.to_uint8(anatomical01),
                                                           region_clinical)
    return row


STS_CASES = tuple(f"{p}:{a}" for p in ("STS_001", "STS_002", "STS_003") for a in ("CT", "MR_T1"))


def run_sts(methods, writer, log, cases=STS_CASES) -> None:
    for patient, anatomical in (c.split(":") for c in cases):
        root = DATA / "sts" / patient
        case = Case(root / anatomical / "dicom", root / "PET" / "dicom", root / anatomical / "gtv_mask.nii.gz")
        p = case.prepared
        reference_share = top_fraction_in(chroma(case.reference_rgb), case.mask)
        func_rgb = colour.ycbcr_to_rgb(p.functional_ycc)
        region_lab = coloured_voxels(func_rgb, p.anatomical)
        axis = array_axis(p.reference, "axial")
        for name in methods:
            method = get_method(name)
            t0 = time.perf_counter()
            fused_y = fuse_volume(p.anatomical, p.functional_ycc[..., 0], method, axis=axis,
                                  device=torch.device("cpu"))
            for when, keep in (("before", False), ("after", True)):
                rgb = recombine(fused_y, p.functional_ycc, method.chroma_scale, p.grayscale, keep_colour=keep,
                                table=p.functional_table)
                row = measure(rgb, p.functional_ycc, p.functional_level, p.functional_table, p.bone, p.anatomical,
                              case.coloured, region_lab, axis)
                row["hot_spot_pts"] = 100.0 * (top_fraction_in(chroma(rgb), case.mask) - reference_share)
                writer({"set": f"{patient} PET->{anatomical}", "method": name, "recombination": when, **row})
            log(f"{patient} {anatomical} {name} {time.perf_counter() - t0:.1f} s")


def run_aanlib(methods, writer, log, limit: int | None, ranks: bool) -> None:
    from medicalfusion_tools.evaluate import load_modality  # noqa: PLC0415
    from medicalfusion_tools.training.data import read_split  # noqa: PLC0415

    for pair in ("PET-MRI", "SPECT-MRI"):
        records = read_split(DATA / "aanlib", "test", pairs=(pair,))
        records = records[:limit] if limit else records
        data = load_modality(records)
        func_rgb = colour.ycbcr_to_rgb(data["ycc"])
        region_lab = coloured_voxels(func_rgb, data["mri"])
        for name in methods:
            method = get_method(name)
            t0 = time.perf_counter()
            fused_y = fuse_slices(data["mri"], data["ycc"][..., 0], method, device=torch.device("cpu"))
            for when, keep in (("before", False), ("after", True)):
                rgb = recombine(fused_y, data["ycc"], method.chroma_scale, data["grayscale"], keep_colour=keep)
                row = measure(rgb, data["ycc"], None, None, None, data["mri"], None, region_lab, 0)
                if ranks:
                    gray = volume_metrics_torch(data["a8"], data["b8"], colour.gray8(rgb), keys=list(RANK_KEYS),
                                                device="cpu")
                    row.update({k: gray[k][0] for k in RANK_KEYS})
                writer({"set": f"aanlib {pair} ({len(records)} pairs)", "method": name, "recombination": when, **row})
            log(f"{pair} {name} {time.perf_counter() - t0:.1f} s")


def mean_ranks(rows: list[dict]) -> list[str]:
    """Mean rank over RANK_KEYS (1 = best; higher is better for every one, as the papers rank them)
    of each network among itself and the ANCHORS peers, before and after; whether it is ahead of
    every peer (a lower mean rank than each)."""
    lines = ["| set | network | mean rank before | after | change | ahead of every peer before / after |",
             "|---|---|---|---|---|---|"]
    for pair, peers in PEERS.items():
        table = {(r["method"], r["recombination"]): r for r in rows if pair in r["set"] and "EN" in r}
        for net in NETWORKS:
            out = {}
            for when in ("before", "after"):
                if (net, when) not in table:
                    continue
                entries = {net: [float(table[(net, when)][k]) for k in RANK_KEYS]}
                entries.update({name: list(v) for name, v in peers.items()})
                names = list(entries)
                values = np.array([entries[n] for n in names])
                ranks = np.empty_like(values)
                for j in range(values.shape[1]):
                    order = (-values[:, j]).argsort(kind="stable")
                    ranks[order, j] = np.arange(1, len(names) + 1)
                mean = ranks.mean(1)
                out[when] = (mean[0], all(mean[0] < mean[names.index(peer)] for peer in peers))
            if len(out) == 2:
                b, a = out["before"][0], out["after"][0]
                lines.append(f"| {pair} | {net} | {b:.2f} | {a:.2f} | {a - b:+.2f} | "
                             f"{'yes' if out['before'][1] else 'NO'} / {'yes' if out['after'][1] else 'NO'} |")
    return lines


def targets_table(rows: list[dict]) -> list[str]:
    lines = ["| set | method | recombination | hue > 10° % (all / bone) | chroma kept (all / bone) | read-back % (all / bone) "
             "| detail r / slope (luma) | L* detail r | hot spot pts | targets |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, key, fmt):
        v = r.get(key)
        return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

    for r in rows:
        fails = []
        for k, bad in (("hue_err10", lambda v: v > 5.0), ("hue_err10_bone", lambda v: v > 5.0),
                       ("chroma_kept", lambda v: v < 0.8), ("chroma_kept_bone", lambda v: v < 0.8),
                       ("readback_err", lambda v: v > 5.0), ("readback_err_bone", lambda v: v > 5.0),
                       ("lightness_r", lambda v: v < 0.7), ("detail_r", lambda v: v < 0.5),
                       ("detail_slope", lambda v: v < 0.35), ("hot_spot_pts", lambda v: v < -2.0)):
            if r.get(k) is not None and bad(r[k]):
                fails.append(k)
        lines.append(
            f"| {r['set']} | {r['method']} | {r['recombination']} | {cell(r, 'hue_err10', '.1f')} / {cell(r, 'hue_err10_bone', '.1f')} "
            f"| {cell(r, 'chroma_kept', '.2f')} / {cell(r, 'chroma_kept_bone', '.2f')} "
            f"| {cell(r, 'readback_err', '.1f')} / {cell(r, 'readback_err_bone', '.1f')} "
            f"| {cell(r, 'detail_r', '.2f')} / {cell(r, 'detail_slope', '.2f')} | {cell(r, 'lightness_r', '.2f')} "
            f"| {cell(r, 'hot_spot_pts', '+.1f')} | {'met' if not fails else 'NOT met: ' + ', '.join(fails)} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=["sts", "aanlib"], choices=["sts", "aanlib"])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every available method")
    ap.add_argument("--cases", nargs="+", default=list(STS_CASES), choices=STS_CASES,
                    help="sts: the PATIENT:ANATOMICAL pairs to measure (default: all six)")
    ap.add_argument("--limit", type=int, default=None, help="aanlib: the first N test pairs of each modality pair")
    ap.add_argument("--ranks", action="store_true", help="aanlib: also the evaluator's metrics and the mean ranks")
    ap.add_argument("--out", default="/tmp/colour/targets")
    ap.add_argument("--tables", nargs="+", metavar="CSV",
                    help="no measuring: the Markdown tables (targets, mean ranks) of earlier runs' CSVs, to stdout")
    args = ap.parse_args(argv)
    if args.tables:
        rows = []
        for path in args.tables:
            with open(path, newline="", encoding="utf-8") as f:
                rows += [{k: (float(v) if k not in ("set", "method", "recombination") and v != "" else v)
                          for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        print("\n".join(targets_table(rows) + [""] + mean_ranks(rows)))
        return 0
    torch.set_num_threads(1)
    methods = args.methods or [m.name for m in all_methods() if m.available()[0]]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    fields = ["set", "method", "recombination", *COLOUR_KEYS, "lightness_r", "detail_r", "detail_slope", "hot_spot_pts",
              *RANK_KEYS]
    csv_path = out / "colour_targets.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()

        def writer(row: dict) -> None:
            rows.append(row)
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
            f.flush()

        def log(text: str) -> None:
            print(time.strftime("%H:%M:%S"), text, flush=True)

        if "sts" in args.sets:
            run_sts(methods, writer, log, args.cases)
        if "aanlib" in args.sets:
            run_aanlib(methods, writer, log, args.limit, args.ranks)
    md = ["# Colour targets (scripts/colour_targets.py)", "", "Command: `" + " ".join(sys.argv) + "`", ""]
    md += targets_table(rows)
    if args.ranks:
        md += ["", "## Mean rank (reference evaluator, 11 metrics) among the networks and the ANCHORS peers", ""]
        md += mean_ranks(rows)
    (out / "colour_targets.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print(out / "colour_targets.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
