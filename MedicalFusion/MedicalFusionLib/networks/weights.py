"""Trained weights: the manifest in ``weights/manifest.json`` and safe, checksummed loading.

Every network's ``state_dict`` is a ``.pt`` file in the repository's ``weights/`` folder (installed
beside the module in a packaged Slicer extension). ``manifest.json`` holds, per file, its sha256,
the architecture and its settings, the parameter count, data and split, epochs, wall time and the
test-split metrics. Loading checks the checksum and uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import torch

from ..errors import FusionError


def weights_dir() -> pathlib.Path:
    """``$MEDICALFUSION_WEIGHTS``, else ``weights/`` beside the package (source tree or extension)."""
    env = os.environ.get("MEDICALFUSION_WEIGHTS")
    if env:
        return pathlib.Path(env)
    here = pathlib.Path(__file__).resolve()
    for parent in here.parents[1:4]:
        candidate = parent / "weights"
        if (candidate / "manifest.json").is_file():
            return candidate
    return here.parents[3] / "weights"


def sha256_of(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: pathlib.Path | None = None) -> dict:
    path = (directory or weights_dir()) / "manifest.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def update_manifest(name: str, entry: dict, directory: pathlib.Path | None = None) -> None:
    """Insert or replace one network's entry (keyed by method name) in the manifest."""
    directory = directory or weights_dir()
    directory.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(directory)
    manifest[name] = entry
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(directory / "manifest.json")


def weights_status(name: str, directory: pathlib.Path | None = None) -> tuple[bool, str]:
    """(True, '') when the manifest lists ``name`` and its file exists; otherwise the reason."""
    directory = directory or weights_dir()
    entry = read_manifest(directory).get(name)
    if entry is None:
        return False, f"no weights for '{name}' in {directory / 'manifest.json'}: train them with 'medicalfusion train --method {name}'"
    if not (directory / entry["file"]).is_file():
        return False, f"weights file {directory / entry['file']} is missing: reinstall the extension or retrain"
    return True, ""


def load_state_dict(name: str, directory: pathlib.Path | None = None) -> tuple[dict, dict]:
    """Verified ``(state_dict, manifest entry)`` for network ``name``; clear FusionError otherwise."""
    directory = directory or weights_dir()
    ok, reason = weights_status(name, directory)
    if not ok:
        raise FusionError(reason)
    entry = read_manifest(directory)[name]
    path = directory / entry["file"]
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        raise FusionError(f"weights file {path} is corrupt (sha256 {digest[:12]}... does not match the manifest): reinstall or retrain")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a corrupt file to the user
        raise FusionError(f"weights file {path} cannot be read ({type(exc).__name__}): reinstall or retrain") from None
    return state, entry


def save_state_dict(module: torch.nn.Module, name: str, entry: dict, directory: pathlib.Path | None = None) -> pathlib.Path:
    """Save ``module``'s state_dict as ``<name>.pt`` and record it (with its sha256) in the manifest."""
    directory = directory or weights_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.pt"
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(state, path)
    full = dict(entry)
    full.update(file=path.name, sha256=sha256_of(path),
                parameters=int(sum(p.numel() for p in module.parameters())))
    update_manifest(name, full, directory)
    return path
