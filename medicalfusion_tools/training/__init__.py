"""Training of the fusion networks on the aanlib train split.

Each network has a module ``training/<method>.py`` exposing
``train(data_root, out_dir, minutes, resume, seed, device) -> dict`` (the manifest entry it wrote);
``medicalfusion train --method NAME`` dispatches here.
"""
from __future__ import annotations

import importlib
import pathlib

from MedicalFusionLib.errors import FusionError


def trainable_methods() -> list[str]:
    here = pathlib.Path(__file__).parent
    skip = {"__init__", "data", "losses", "loop"}
    return sorted(p.stem for p in here.glob("*.py") if p.stem not in skip)


def train(method: str, data_root, out_dir=None, minutes: float = 60.0, resume: bool = True, seed: int = 0,
          device: str = "auto") -> dict:
    if method not in trainable_methods():
        raise FusionError(f"no trainer for '{method}': choose one of {', '.join(trainable_methods()) or 'none'}")
    module = importlib.import_module(f"{__name__}.{method}")
    return module.train(data_root=pathlib.Path(data_root), out_dir=out_dir, minutes=minutes, resume=resume,
                        seed=seed, device=device)
