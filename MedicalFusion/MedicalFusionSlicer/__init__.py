"""The Slicer-application side of the MedicalFusion module, which only MedicalFusion.py imports.

What needs the running 3D Slicer (``slicer.app``, ``slicer.util``'s dialogs, the Sample Data module, the
module panel) and is not the panel's binding itself: asking to install the dependencies
(:mod:`.dependencies`), the demo pair in Sample Data (:mod:`.sample_data`) and the self-test's tests
(:mod:`.self_test`, run by ``MedicalFusionTest``). The work itself stays in the Qt-free core,
``MedicalFusionLib``, which never imports this package.

A package folder, not a ``.py`` beside MedicalFusion.py: Slicer takes every ``.py`` file of a module
folder for a module of its own. The extension ships it (MedicalFusion/CMakeLists.txt); the pip package
(pyproject.toml) does not. Python 3.9, like the module file (``make check-py39``).
"""
from __future__ import annotations

import importlib
import sys

#: The package's modules, each after those it imports.
SUBMODULES = ("dependencies", "parameters", "results", "sample_data", "self_test")


def reloadSubmodules() -> None:
    """Developer mode's Reload (MedicalFusionWidget.onReload): Slicer reads MedicalFusion.py again, not the
    packages it imports; this package's modules are read again first, so that an edit to one of them (the
    self-test's tests, the Sample Data entry) is what Reload and Test runs, as when they were in the file."""
    for name in SUBMODULES:
        module = sys.modules.get(f"{__name__}.{name}")
        if module is not None:
            importlib.reload(module)
