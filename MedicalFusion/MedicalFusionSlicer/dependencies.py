"""Installing what the module and its sample need, after asking: the dialogs around
:mod:`MedicalFusionLib.install`, which finds and installs them without Slicer."""
from __future__ import annotations

import importlib
import logging

import slicer
from slicer.i18n import tr as _

from MedicalFusionLib import install


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Install torch (through the PyTorch extension when present), scikit-image, scikit-learn and scipy,
    asking once (not when ``askConfirmation`` is False: an unattended self-test). True when everything
    is importable afterwards; a failure is one message and False, never an exception."""
    missing = install.missing_dependencies()
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("MedicalFusion needs these Python packages, which are not installed yet:\n\n  {packages}\n\n"
              "Install them now? PyTorch is a large download (up to a few GB with GPU support) and may take "
              "several minutes; Slicer may need a restart afterwards.").format(packages=", ".join(missing)),
            _("MedicalFusion: install dependencies")):
        return False
    torchUtils = None
    if "torch" in missing:
        try:
            import PyTorchUtils  # noqa: PLC0415  (the PyTorch extension picks the right CUDA build)
            torchUtils = PyTorchUtils.PyTorchUtilsLogic()
        except ImportError:
            pass
    try:
        with slicer.util.WaitCursor():
            still = install.install_dependencies(slicer.util.pip_install, torchUtils)
    except install.InstallFailed as exc:
        logging.error("MedicalFusion: %s", exc)
        slicer.util.errorDisplay(
            _("Installing {packages} failed ({detail}). Check the internet connection (and a proxy, if any), "
              "read pip's messages in the Python console, then click Fuse again.").format(
                packages=exc.packages, detail=exc.detail), windowTitle=_("MedicalFusion: installation failed"))
        return False
    if still:
        slicer.util.errorDisplay(_("MedicalFusion could not install: {packages}. See the Python console for pip's "
                                   "messages.").format(packages=", ".join(still)))
        return False
    logging.info("MedicalFusion: %s", install.version_report())
    return True


def ensureSampleTemplate(askConfirmation: bool = True) -> bool:
    """The MNI152 template comes with the nilearn package: offer to install it on first use."""
    from MedicalFusionLib.sample import template_folder  # noqa: PLC0415

    if template_folder() is not None:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("The MedicalFusion sample is made from the MNI152 brain template that the nilearn Python package "
              "ships. Install nilearn now (a few tens of MB)?\n\nCancel loads a procedural head phantom instead."),
            _("MedicalFusion: sample data")):
        return False
    try:
        with slicer.util.WaitCursor():
            install.pip_install_quietly(slicer.util.pip_install, "nilearn")
    except install.INSTALL_ERRORS as exc:
        logging.warning("MedicalFusion: installing nilearn failed (%s); the sample is a procedural phantom", exc)
        return False
    importlib.invalidate_caches()
    return template_folder() is not None
