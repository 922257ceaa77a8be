"""The real STS cases in figures and numbers: for each patient and pair (PET -> CT, PET -> MR) and
every method, where the tracer's colour lands (share of the 1 % most coloured voxels inside the
tumour, against a plain SimpleITK resample of the PET) and how much anatomical detail stays under
the colour; writes the 'real-cases' section of docs/CLINICAL.md and one figure per pair under
docs/figures/ (fused outputs only: alpha, lp, mrdfn on the axial slice with the most tumour, the
tumour contour in cyan).

Run: python scripts/real_cases.py [--doc docs/CLINICAL.md] [--figures docs/figures] [--methods ...]
     [--threads 1]
The measures are those of MedicalFusion/Testing/Python/test_real_cases.py (medicalfusion_tools/hotspot.py).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))
sys.path.insert(0, str(REPO))   # medicalfusion_tools
sys.path.insert(0, str(REPO / "scripts"))

from benchdoc import replace_section  # noqa: E402

PATIENTS = ("STS_001", "STS_002", "STS_003")
ANATOMICALS = (("CT", "CT"), ("MR_T1", "MR"))
FIGURE_METHODS = ("alpha", "lp", "mrdfn")
CONTOUR = (0, 255, 255)


def figure(case, methods, path: pathlib.Path) -> int:
    """Fused slices side by side (the axial slice with the largest tumour area), tumour outlined."""
    import numpy as np  # noqa: PLC0415
    from scipy import ndimage as ndi  # noqa: PLC0415

    from MedicalFusionLib.io.outputs import write_preview  # noqa: PLC0415

    k = int(np.argmax(case.mask.reshape(case.mask.shape[0], -1).sum(axis=1)))
    edge = case.mask[k] & ~ndi.binary_erosion(case.mask[k])
    panels = []
    for m in methods:
        view = case.fused(m)[k].copy()
        view[edge] = CONTOUR
        panels.append(view)
        panels.append(np.full((view.shape[0], 4, 3), 255, np.uint8))
    write_preview(np.concatenate(panels[:-1], axis=1), path)   # LPS index order: radiological view
    return k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--doc", default="docs/CLINICAL.md")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--methods", nargs="*")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest on a busy CPU)")
    p.add_argument("--data", default=os.environ.get("MEDICALFUSION_DATA", str(REPO.parent / "shared" / "data")))
    args = p.parse_args()
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    from medicalfusion_tools.hotspot import Case  # noqa: PLC0415
    from MedicalFusionLib.methods import all_methods  # noqa: PLC0415

    methods = args.methods or [m.name for m in all_methods() if m.available()[0]]
    sts = pathlib.Path(args.data) / "sts"
    hot = ["| pair | PET resample | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    anat = ["| pair | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    figures = []
    for patient in PATIENTS:
        for folder, short in ANATOMICALS:
            case = Case(sts / patient / folder / "dicom", sts / patient / "PET" / "dicom",
                        sts / patient / folder / "gtv_mask.nii.gz")
            name = f"{patient} PET->{short}"
            ref = case.hot_spot()
            cells = [f"{100 * case.hot_spot(m):.1f} ({100 * (case.hot_spot(m) - ref):+.1f})" for m in methods]
            hot.append(f"| {name} | {100 * ref:.1f} | " + " | ".join(cells) + " |")
            anat.append(f"| {name} | " + " | ".join("%.2f / %.2f" % case.anatomy(m) for m in methods) + " |")
            print(hot[-1], flush=True)
            fig = pathlib.Path(args.figures) / f"sts-{patient[-3:]}-pet-{short.lower()}.png"
            shown = [m for m in FIGURE_METHODS if m in methods]
            k = figure(case, shown, fig)
            figures.append(f"![{name}: {', '.join(shown)}](figures/{fig.name})  \n*{name}, axial slice {k} "
                           f"(the most tumour), fused with {', '.join(shown)}; tumour contour in cyan.*")
            del case
    body = "\n".join([
        "## Measured on the real cases", "",
        f"Command: `{' '.join(['python scripts/real_cases.py'] + sys.argv[1:])}`.", "",
        "### The tracer's colour on the tumour", "",
        "Share (%) of the 1 % most coloured voxels (chroma) inside the tumour mask; in brackets the "
        "difference in points from the plain SimpleITK resample of the PET (same map, window and rule). "
        "The tests require at least -2 points.", ""] + hot + [
        "", "### The anatomy under the colour", "",
        "Where the PET's colour is visible (chroma >= 0.1): correlation / slope of the fused luma's fine "
        "detail (DoG, sigma 1 and 3 voxels in plane) against the windowed anatomical's. The tests require "
        "r >= 0.5 and slope >= 0.35.", ""] + anat + ["", "### Figures", "", "\n\n".join(figures)])
    replace_section(args.doc, "real-cases", body)
    print(f"wrote section 'real-cases' of {args.doc} and {len(figures)} figures under {args.figures}")


if __name__ == "__main__":
    main()
