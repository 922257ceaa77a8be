"""The Python packages the core needs beyond what 3D Slicer ships, found and installed without
importing them, so the module loads in a fresh Slicer and the first Fuse installs what is missing.

Slicer-free: the installers are passed in (Slicer's ``slicer.util.pip_install`` and, when the PyTorch
extension is there, its ``PyTorchUtilsLogic``, which picks the torch build for the GPU). The module
file asks the user first and shows the one message a failure gives (:class:`InstallFailed`).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import subprocess

from .i18n import tr as _

#: Python packages the core needs beyond what Slicer ships: (import name, pip name).
PIP_DEPENDENCIES = (("skimage", "scikit-image"), ("sklearn", "scikit-learn"), ("scipy", "scipy"))
#: The extension that installs torch for Slicer (named in EXTENSION_DEPENDS of the top CMakeLists.txt).
PYTORCH_EXTENSION = "PyTorch"
#: Errors a failed installation raises: pip's exit status, PythonSlicer not found, disk/network.
INSTALL_ERRORS = (subprocess.CalledProcessError, RuntimeError, OSError)


class InstallFailed(Exception):
    """An installation that failed: which packages and why, in one line (``str()``)."""

    def __init__(self, packages: str, exc: BaseException):
        self.packages = packages
        self.detail = (f"pip exit status {exc.returncode}" if isinstance(exc, subprocess.CalledProcessError)
                       else str(exc))
        super().__init__(f"installing {packages} failed: {self.detail}")


def missing_pip_packages() -> list[str]:
    """pip names of the non-torch dependencies that are not importable (found, not imported)."""
    return [pip for name, pip in PIP_DEPENDENCIES if importlib.util.find_spec(name) is None]


def missing_dependencies() -> list[str]:
    """pip names of every dependency that is not importable yet, torch first."""
    return ([] if importlib.util.find_spec("torch") is not None else ["torch"]) + missing_pip_packages()


def pip_install_quietly(pip_install, requirements: str) -> None:
    """``pip_install(requirements)``, with Slicer's own progress and failure dialogs turned off where
    it has them (5.10 and newer take keyword arguments): a failure gets one message, the caller's."""
    kwargs = {}
    if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(pip_install).parameters.values()):
        kwargs = {"show_progress": False}
    pip_install(requirements, **kwargs)


def install_dependencies(pip_install, torch_utils=None) -> list[str]:
    """Install what :func:`missing_dependencies` lists: torch through the PyTorch extension's logic
    ``torch_utils`` (a ``PyTorchUtilsLogic``; asked not to ask again) when given, else with pip; then
    the pip packages. Raises :class:`InstallFailed` on the first failure; returns what is still
    missing afterwards (empty: everything is importable)."""
    if "torch" in missing_dependencies():
        try:
            if torch_utils is not None:
                if not torch_utils.torchInstalled():
                    logging.info("MedicalFusion: installing PyTorch through the %s extension", PYTORCH_EXTENSION)
                    if torch_utils.installTorch(askConfirmation=False) is None:
                        raise RuntimeError(_("the {extension} extension did not install torch").format(
                            extension=PYTORCH_EXTENSION))
            else:
                logging.info("MedicalFusion: %s extension not found, installing torch with pip", PYTORCH_EXTENSION)
                pip_install_quietly(pip_install, "torch")
        except INSTALL_ERRORS as exc:
            raise InstallFailed("PyTorch", exc) from exc
    names = missing_pip_packages()
    if names:
        logging.info("MedicalFusion: installing %s", " ".join(names))
        try:
            pip_install_quietly(pip_install, " ".join(names))
        except INSTALL_ERRORS as exc:
            raise InstallFailed(", ".join(names), exc) from exc
    importlib.invalidate_caches()
    return missing_dependencies()


def version_report(device: str = "auto") -> str:
    """One line with the versions in use and the device 'auto' resolves to (imports torch)."""
    import numpy as np  # noqa: PLC0415
    import SimpleITK  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415
    from .device import pick_device  # noqa: PLC0415

    try:
        dev = str(pick_device(device))
    except Exception as exc:  # noqa: BLE001 - a report, never an error
        dev = f"unavailable ({exc})"
    cuda = torch.version.cuda or "none"
    return (f"MedicalFusion {__version__}, torch {torch.__version__} (CUDA {cuda}), SimpleITK "
            f"{SimpleITK.Version_VersionString()}, numpy {np.__version__}; device {dev}")
