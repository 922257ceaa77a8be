#!/usr/bin/env python
"""Seconds to fuse through the MRML scene (node to node, MedicalFusionLib.scene.fuse_nodes) beside
the headless engine on the same SimpleITK images (MedicalFusionLib.pipeline.fuse_images).

Two pairs: the spm12 T1 + PET templates (91x109x91, loaded by Slicer's volumes logic) and the same
pair resampled to a 256x256x180 grid. Both paths get the same options (explicit windows and colour
map, metrics off: the metrics are the same work on both paths), each timing is the median of
``--repeats`` runs, engine and scene alternating so machine load hits both alike.

    python scripts/bench_scene.py [--data ../shared/data] [--methods alpha lp] [--repeats 3] [--output FILE.md]

Needs slicer-core (pip install slicer-core) and the shared data folder.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
import SimpleITK as sitk

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))


def resampled(image: sitk.Image, size=(256, 256, 180)) -> sitk.Image:
    """``image`` on a grid of ``size`` voxels covering the same field of view (linear)."""
    old_size, old_spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    spacing = old_size * old_spacing / np.array(size)
    ref = sitk.Image([int(s) for s in size], image.GetPixelID())
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(image.GetDirection())
    shift = np.array(image.GetDirection()).reshape(3, 3) @ ((spacing - old_spacing) / 2.0)
    ref.SetOrigin((np.array(image.GetOrigin()) + shift).tolist())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def median_time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("MEDICALFUSION_DATA") or str(REPO.parent / "shared" / "data")
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--methods", nargs="+", default=["alpha", "lp"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="also write the Markdown table here")
    args = parser.parse_args(argv)

    import slicer
    import torch

    from MedicalFusionLib import scene as fscene
    from MedicalFusionLib.pipeline import FusionOptions, fuse_images

    spm12 = pathlib.Path(args.data) / "spm12"
    if not (spm12 / "T1.nii").is_file():
        print(f"spm12 templates not found in {spm12}: pass --data or set MEDICALFUSION_DATA", file=sys.stderr)
        return 2
    t1_file, pet_file = sitk.ReadImage(str(spm12 / "T1.nii")), sitk.ReadImage(str(spm12 / "PET.nii"))
    pairs = {
        "spm12 T1 + PET, 91x109x91": (t1_file, pet_file),
        "spm12 resampled, 256x256x180": (resampled(t1_file), resampled(pet_file)),
    }

    rows = []
    for label, (anat_img, func_img) in pairs.items():
        scene = slicer.vtkMRMLScene()
        colors = slicer.vtkSlicerColorLogic()
        colors.SetMRMLScene(scene)
        anat = fscene.add_volume_from_image(scene, anat_img, "anatomical")
        func = fscene.add_volume_from_image(scene, func_img, "functional")
        func.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLPETProceduralColorNodePET-Heat")
        a_win = fscene.display_settings(anat).window
        f_win = fscene.display_settings(func).window
        for method in args.methods:
            opts = FusionOptions(method=method, device=args.device, colormap="PET-Heat", anatomical_window=a_win,
                                 functional_window=f_win, compute_metrics=False)
            created = []

            def engine():
                fuse_images(anat_img, func_img, opts)

            def through_scene():
                out = fscene.fuse_nodes(scene, anat, func, opts)
                created.append(out.volume_node)

            engine()            # warm-up: imports, first torch call, caches
            through_scene()
            e_times, s_times = [], []
            for _ in range(args.repeats):
                e_times += median_time(engine, 1)
                s_times += median_time(through_scene, 1)
            for node in created:
                scene.RemoveNode(node)
            e, s = statistics.median(e_times), statistics.median(s_times)
            rows.append((label, method, e, s, (s - e) / e * 100.0))
            print(f"{label:32s} {method:8s} engine {e:7.2f} s   scene {s:7.2f} s   overhead {rows[-1][4]:+6.1f} %", flush=True)

    lines = [
        "| pair | method | engine (s) | scene, node to node (s) | scene overhead |",
        "|---|---|---:|---:|---:|",
    ]
    for label, method, e, s, pct in rows:
        lines.append(f"| {label} | {method} | {e:.2f} | {s:.2f} | {pct:+.1f} % |")
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
           f"device {args.device}, median of {args.repeats} runs, metrics off")
    table = "\n".join(lines) + f"\n\n{env}\n"
    print("\n" + table)
    if args.output:
        pathlib.Path(args.output).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
