"""Trained weights: where they are, which checksums are trusted, and safe loading.

Every network's ``state_dict`` is a ``.pt`` file in the repository's ``weights/`` folder (installed
beside the module in a packaged Slicer extension), described by ``weights/manifest.json`` (per
network: the file, its sha256, the architecture and its settings, parameter count, data, training,
test metrics).

Trust does not come from that folder: the sha256 of each shipped weights file, and a digest of the
settings it is built with, live in the package itself (``networks/trusted_weights.json``, next to
this module), so changing a weights file and the manifest beside it is not enough to get it
loaded. Loading (:func:`load_state_dict`) checks:

- the shipped folder, or a folder named by ``$MEDICALFUSION_WEIGHTS``: the file's sha256 and the
  manifest's settings against the package's trusted list; anything else is refused with a line
  that says what to do;
- ``$MEDICALFUSION_OWN_WEIGHTS=1`` (weights you trained yourself, e.g. into your own
  ``$MEDICALFUSION_WEIGHTS``): the file is checked against its own manifest only, and a note says
  so each time such weights are loaded.

Then ``torch.load(weights_only=True)``; the network is built from the manifest's settings by
:func:`build_network`, which turns a bad manifest (invalid JSON, an entry without sha256, an
unknown settings key) or weights of the wrong shapes into one-line FusionErrors.

Training (:func:`save_state_dict`) writes the weights, the manifest and, for the shipped folder,
the package's trusted list in one transaction (:class:`~MedicalFusionLib.io.outputs.OutputSet`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
from typing import Callable

from ..errors import FusionError
from ..io.outputs import sha256_of  # noqa: F401  (also this module's public name)

WEIGHTS_ENV = "MEDICALFUSION_WEIGHTS"
OWN_WEIGHTS_ENV = "MEDICALFUSION_OWN_WEIGHTS"
#: The trusted checksums: shipped with the code, not with the weights.
TRUSTED_FILE = pathlib.Path(__file__).with_name("trusted_weights.json")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
logger = logging.getLogger(__name__)


def shipped_weights_dir() -> pathlib.Path:
    """``weights/`` beside the package (source tree or installed extension)."""
    here = pathlib.Path(__file__).resolve()
    for parent in here.parents[1:4]:
        candidate = parent / "weights"
        if (candidate / "manifest.json").is_file():
            return candidate
    return here.parents[3] / "weights"


def weights_dir() -> pathlib.Path:
    """``$MEDICALFUSION_WEIGHTS``, else :func:`shipped_weights_dir`."""
    env = os.environ.get(WEIGHTS_ENV)
    return pathlib.Path(env) if env else shipped_weights_dir()


def own_weights() -> bool:
    """True when the user said the weights are their own (``$MEDICALFUSION_OWN_WEIGHTS=1``)."""
    return os.environ.get(OWN_WEIGHTS_ENV, "").strip().lower() in ("1", "yes", "true")


def _is_shipped(directory: pathlib.Path) -> bool:
    try:
        return directory.resolve() == shipped_weights_dir().resolve()
    except OSError:
        return False


def settings_digest(entry: dict) -> str:
    """sha256 of what a network is built from: ``settings`` (and ``architecture.config``)."""
    arch = entry.get("architecture")
    config = arch.get("config") if isinstance(arch, dict) else None
    text = json.dumps({"settings": entry.get("settings"), "config": config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_json(path: pathlib.Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FusionError(f"{what} {path} is not valid JSON (line {exc.lineno}): reinstall or retrain") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FusionError(f"{what} {path} cannot be read ({exc.__class__.__name__}): reinstall or retrain") from None
    if not isinstance(data, dict):
        raise FusionError(f"{what} {path} is not a JSON object: reinstall or retrain")
    return data


def trusted_checksums() -> dict:
    """``{name: {file, sha256, settings_sha256}}`` shipped with the package."""
    if not TRUSTED_FILE.is_file():
        return {}
    return _read_json(TRUSTED_FILE, "the package's list of trusted weights")


def read_manifest(directory: pathlib.Path | None = None) -> dict:
    path = (directory or weights_dir()) / "manifest.json"
    if not path.is_file():
        return {}
    return _read_json(path, "weights manifest")


def manifest_entry(name: str, directory: pathlib.Path | None = None) -> dict | None:
    """The manifest's entry for ``name`` (None when absent), checked to name a plain file and a sha256."""
    directory = directory or weights_dir()
    entry = read_manifest(directory).get(name)
    if entry is None:
        return None
    where = directory / "manifest.json"
    if not isinstance(entry, dict):
        raise FusionError(f"the entry '{name}' in {where} is not an object: reinstall or retrain")
    file = entry.get("file")
    if not isinstance(file, str) or not file or file != pathlib.PurePath(file).name or file in (".", ".."):
        raise FusionError(f"the entry '{name}' in {where} has no plain weights file name: reinstall or retrain")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        raise FusionError(f"the entry '{name}' in {where} has no valid sha256: reinstall or retrain")
    return entry


def weights_status(name: str, directory: pathlib.Path | None = None) -> tuple[bool, str]:
    """(True, '') when ``name``'s weights can be loaded as far as the manifest and the trusted list
    tell (the checksum itself is verified at load); otherwise the reason."""
    directory = directory or weights_dir()
    try:
        entry = manifest_entry(name, directory)
        trusted = trusted_checksums()
    except FusionError as exc:
        return False, str(exc)
    if entry is None:
        return False, f"no weights for '{name}' in {directory / 'manifest.json'}: train them with 'medicalfusion train --method {name}'"
    if not (directory / entry["file"]).is_file():
        return False, f"weights file {directory / entry['file']} is missing: reinstall the extension or retrain"
    if not own_weights() and name not in trusted:
        return False, (f"the weights of '{name}' in {directory} are not among those shipped with MedicalFusion: "
                       f"set {OWN_WEIGHTS_ENV}=1 if you trained them yourself")
    return True, ""


def load_state_dict(name: str, directory: pathlib.Path | None = None) -> tuple[dict, dict]:
    """Verified ``(state_dict, manifest entry)`` for network ``name``; clear FusionError otherwise."""
    directory = directory or weights_dir()
    ok, reason = weights_status(name, directory)
    if not ok:
        raise FusionError(reason)
    entry = manifest_entry(name, directory)
    path = directory / entry["file"]
    digest = sha256_of(path)
    if own_weights():
        if digest != entry["sha256"]:
            raise FusionError(f"weights file {path} is corrupt (sha256 {digest[:12]}... does not match its manifest): "
                              "retrain or restore it")
        logger.warning("using your own weights %s (%s=1): checked against %s only, not against the checksums "
                       "shipped with MedicalFusion", path, OWN_WEIGHTS_ENV, directory / "manifest.json")
    else:
        trusted = trusted_checksums()[name]
        if digest != trusted.get("sha256"):
            if _is_shipped(directory):
                raise FusionError(f"weights file {path} does not match the checksum shipped with MedicalFusion "
                                  f"(sha256 {digest[:12]}...): it was changed or damaged; reinstall MedicalFusion or retrain")
            raise FusionError(f"weights file {path} (from ${WEIGHTS_ENV}) is not the one shipped with MedicalFusion "
                              f"(sha256 {digest[:12]}...): unset {WEIGHTS_ENV}, or set {OWN_WEIGHTS_ENV}=1 if you "
                              "trained these weights yourself")
        if settings_digest(entry) != trusted.get("settings_sha256"):
            raise FusionError(f"the settings of '{name}' in {directory / 'manifest.json'} differ from those shipped "
                              "with MedicalFusion: reinstall MedicalFusion or retrain")
    import torch  # noqa: PLC0415  (only to load: the checks above are torch-free for options.METHODS)

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a corrupt file to the user
        raise FusionError(f"weights file {path} cannot be read ({type(exc).__name__}): reinstall or retrain") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FusionError(f"weights file {path} does not hold a state_dict of tensors: reinstall or retrain")
    return state, entry


def build_network(name: str, build: Callable[[dict], torch.nn.Module]) -> tuple[torch.nn.Module, dict]:
    """The network ``build(manifest entry)`` with the verified weights of ``name`` loaded; settings
    that do not build it (unknown key, wrong type) or weights of other shapes are FusionErrors."""
    state, entry = load_state_dict(name)
    where = weights_dir() / "manifest.json"
    try:
        model = build(entry)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise FusionError(f"the settings of '{name}' in {where} do not build the network "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}): reinstall or retrain") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FusionError(f"weights file {weights_dir() / entry['file']} does not fit the network its manifest "
                          f"describes ({_state_dict_mismatch(exc)}): reinstall or retrain") from None
    return model, entry


def _state_dict_mismatch(exc: RuntimeError) -> str:
    """The first difference in torch's load_state_dict error, short enough for one line."""
    text = " ".join(str(exc).split())
    m = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[(.*?)\]\) from checkpoint, "
                  r"the shape in current model is torch\.Size\(\[(.*?)\]\)", text)
    if m:
        return f"{m.group(1)} is [{m.group(2)}] in the file, [{m.group(3)}] in the network"
    m = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: (.*?)(\.|$)", text)
    if m:
        keys = m.group(2)
        return f"{m.group(1).lower()} tensors: {keys[:80]}{'...' if len(keys) > 80 else ''}"
    return text[:120]


def _manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def _trusted_entry(entry: dict, digest: str) -> dict:
    return {"file": entry["file"], "sha256": digest, "settings_sha256": settings_digest(entry)}


def update_manifest(name: str, entry: dict, directory: pathlib.Path | None = None) -> None:
    """Insert or replace one network's entry (keyed by method name) in the manifest; for the shipped
    folder the trusted settings digest follows (the trusted sha256 changes only with new weights)."""
    from ..io.outputs import OutputSet  # noqa: PLC0415

    directory = directory or weights_dir()
    manifest = read_manifest(directory)
    manifest[name] = entry
    with OutputSet() as out:
        out.folder(directory, "weights folder")
        out.add_text(directory / "manifest.json", _manifest_text(manifest), "weights manifest")
        trusted = trusted_checksums() if _is_shipped(directory) else {}
        if name in trusted and trusted[name].get("sha256") == entry.get("sha256"):
            trusted[name] = _trusted_entry(entry, entry["sha256"])
            out.add_text(TRUSTED_FILE, _manifest_text(trusted), "trusted weights list")
        out.commit()


def save_state_dict(module: torch.nn.Module, name: str, entry: dict, directory: pathlib.Path | None = None) -> pathlib.Path:
    """Save ``module``'s state_dict as ``<name>.pt``, record it (with its sha256) in the manifest and,
    for the shipped folder, in the package's trusted list -- all three or none."""
    from ..io.outputs import OutputSet  # noqa: PLC0415

    directory = directory or weights_dir()
    path = directory / f"{name}.pt"
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    digest = {}

    def write(tmp: pathlib.Path) -> None:
        import torch  # noqa: PLC0415

        torch.save(state, tmp)
        digest["sha256"] = sha256_of(tmp)

    with OutputSet() as out:
        out.folder(directory, "weights folder")
        out.add_file(path, write, "weights file")
        full = dict(entry)
        full.update(file=path.name, sha256=digest["sha256"],
                    parameters=int(sum(p.numel() for p in module.parameters())))
        manifest = read_manifest(directory)
        manifest[name] = full
        out.add_text(directory / "manifest.json", _manifest_text(manifest), "weights manifest")
        if _is_shipped(directory):
            trusted = trusted_checksums()
            trusted[name] = _trusted_entry(full, digest["sha256"])
            out.add_text(TRUSTED_FILE, _manifest_text(trusted), "trusted weights list")
        out.commit()
    return path
