"""Summarise `medicalfusion evaluate` output (the per-pair CSVs) into the compact tables and the
target checks of docs/EVALUATION.md.

Run: python scripts/evaluation_summary.py docs/evaluation/results [more folders ...]
Rows of a method found in a later folder replace those of an earlier one (e.g. a network re-evaluated
after retraining).
"""
from __future__ import annotations

import csv
import pathlib
import sys
from collections import defaultdict

KEYS = ("Qabf", "VIF", "SF", "AG", "SSIM_avg", "MI_nats", "SCD", "PSNR", "CC", "EN")
PAIRS = ("CT-MRI", "PET-MRI", "SPECT-MRI")


def load(folder: pathlib.Path) -> dict:
    """{pair: {method: {metric: mean, 'seconds': s}}}"""
    out: dict = {}
    for pair in PAIRS:
        path = folder / f"{pair}.csv"
        if not path.is_file():
            continue
        rows: dict = defaultdict(dict)
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                rows[r["method"]][r["metric"]] = float(r["mean"])
                rows[r["method"]]["seconds"] = float(r["seconds_per_pair"])
        out[pair] = dict(rows)
    return out


def compact_table(pair: str, rows: dict) -> list[str]:
    best = {k: max(r[k] for r in rows.values()) for k in KEYS}
    lines = [f"#### {pair}", "", "| method | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for name, r in rows.items():
        cells = [(f"**{r[k]:.3f}**" if r[k] == best[k] else f"{r[k]:.3f}") for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def targets(data: dict) -> list[str]:
    lines = ["| pair | method | Qabf > alpha | VIF > alpha | SF > alpha | AG > alpha | SSIM_avg >= alpha - 0.02 |",
             "|---|---|---|---|---|---|---|"]
    for pair, rows in data.items():
        if "alpha" not in rows:
            continue
        a = rows["alpha"]
        for name in ("mrdfn", "lywnet", "dmfnet"):
            if name not in rows:
                continue
            r = rows[name]
            checks = [r[k] > a[k] for k in ("Qabf", "VIF", "SF", "AG")] + [r["SSIM_avg"] >= a["SSIM_avg"] - 0.02]
            lines.append(f"| {pair} | {name} | " + " | ".join(
                f"{'yes' if ok else 'NO'} ({r[k]:.3f} vs {a[k]:.3f})"
                for ok, k in zip(checks, ("Qabf", "VIF", "SF", "AG", "SSIM_avg"))) + " |")
    lines += ["", "| pair | DM-FNet Qabf rank | DM-FNet SF rank | leader on Qabf | leader on SF |", "|---|---|---|---|---|"]
    for pair, rows in data.items():
        if "dmfnet" not in rows:
            continue
        rank = {k: sorted(rows, key=lambda m: -rows[m][k]) for k in ("Qabf", "SF")}
        lines.append(f"| {pair} | {rank['Qabf'].index('dmfnet') + 1} of {len(rows)} | "
                     f"{rank['SF'].index('dmfnet') + 1} of {len(rows)} | {rank['Qabf'][0]} | {rank['SF'][0]} |")
    return lines + [""]


def main() -> None:
    folders = [pathlib.Path(a) for a in sys.argv[1:]] or [pathlib.Path("docs/evaluation/results")]
    data: dict = {}
    for folder in folders:
        for pair, rows in load(folder).items():
            data.setdefault(pair, {}).update(rows)
    out = ["### Key metrics (means over the test pairs; best of each column in bold)", ""]
    for pair, rows in data.items():
        out += compact_table(pair, rows)
    out += ["### Targets of the network issues", ""] + targets(data)
    print("\n".join(out))


if __name__ == "__main__":
    main()
