"""What the checked reading and the all-or-nothing writing cost, on the demo's volumes.

A/B, alternating within each repeat (the machine is shared, so absolute times are noisy; the
ratios are the figures to read):

- writing the fused-size RGB volume (197x233x189x3, the MNI152 sample's grid): a plain
  ``sitk.WriteImage`` vs ``io.outputs.OutputSet.add_image`` + ``commit`` (temporary, completeness check
  against the header, voxel-for-voxel read-back, rename);
- reading: a plain ``sitk.ReadImage`` vs ``io.read.read_source`` (path checks, completeness against
  the header or through nibabel, then the same ITK read).

    python scripts/bench_io.py [--repeats 5] [--output docs/BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="write the section 'io' of this Markdown report")
    args = parser.parse_args(argv)

    from MedicalFusionLib.io.outputs import OutputSet
    from MedicalFusionLib.sample import sample_pair
    from MedicalFusionLib.io.read import read_source

    t1, _pet = sample_pair()
    gray = sitk.GetArrayFromImage(sitk.RescaleIntensity(t1, 0, 255)).astype(np.uint8)
    rgb = sitk.GetImageFromArray(np.stack([gray] * 3, axis=-1), isVector=True)
    rgb.CopyInformation(t1)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench-io-"))

    def txn_write(path):
        with OutputSet() as out:
            out.add_image(path, rgb)
            out.commit()

    rows = []
    for ext in (".nrrd", ".nii.gz", ".nii"):
        plain, txn = [], []
        for _ in range(args.repeats):
            plain.append(timed(lambda: sitk.WriteImage(rgb, str(folder / f"plain{ext}"), useCompression=True)))
            txn.append(timed(lambda: txn_write(folder / f"txn{ext}")))
        a, b = statistics.median(plain), statistics.median(txn)
        rows.append(f"| write {ext} | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    for ext in (".nrrd", ".nii.gz", ".nii"):
        path = folder / f"plain{ext}"
        plain, checked = [], []
        for _ in range(args.repeats):
            plain.append(timed(lambda: sitk.ReadImage(str(path))))
            checked.append(timed(lambda: read_source(path, "anatomical")))
        a, b = statistics.median(plain), statistics.median(checked)
        rows.append(f"| read {ext} | {a:.3f} | {b:.3f} | {b / a:.2f} |")

    from benchdoc import machine_line, replace_section

    body = "\n".join([
        "## Checked reading and all-or-nothing writing",
        "",
        f"`python scripts/bench_io.py --repeats {args.repeats} --output docs/BENCHMARKS.md`: the sample's "
        f"grid {rgb.GetSize()} as RGB uint8, medians of {args.repeats} alternating A/B repeats "
        "(plain SimpleITK vs the package's checked path: for writing, temporary + completeness check + "
        "voxel-for-voxel read-back + rename; for reading, path checks + completeness/NaN check + read).",
        "",
        "| operation | plain SimpleITK (s) | checked (s) | ratio |",
        "|---|---|---|---|",
        *rows,
        "",
        machine_line(),
    ])
    print(body)
    if args.output:
        replace_section(args.output, "io", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
