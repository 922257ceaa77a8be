"""Regenerate MedicalFusionLib/colormaps.json from 3D Slicer's own colour nodes (needs slicer-core).

Run: python scripts/export_colormaps.py
The test suite checks that the shipped tables still equal Slicer's.
"""
import json
import pathlib

from MedicalFusionLib.colour import SLICER_COLOR_NODE_IDS, slicer_colormap_table

out = pathlib.Path(__file__).resolve().parents[1] / "MedicalFusion" / "MedicalFusionLib" / "colormaps.json"
tables = {name: [[round(float(v), 6) for v in row] for row in slicer_colormap_table(name)]
          for name in SLICER_COLOR_NODE_IDS}
out.write_text(json.dumps({"source": "3D Slicer colour nodes (slicer-core), GetLookupTable().GetTableValue(i)",
                           "tables": tables}, separators=(",", ":")) + "\n", encoding="utf-8")
print(f"wrote {out} ({len(tables)} maps)")
