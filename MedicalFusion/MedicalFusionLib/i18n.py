"""Translation of the texts the core shows in the Slicer panel (status lines, tooltips, messages).

``from .i18n import tr as _`` then ``_("text")``, as Slicer's own ``slicer.i18n.tr``: inside the 3D
Slicer application the text is translated in the calling file's context, the one Slicer's translation
tools give a ``_()`` call found there (Utilities/Scripts/lupdate_preprocess.py with
``slicer.i18n.getContext``: the package folder and the file name, e.g. ``MedicalFusionLib.panel``);
everywhere else (the command line, the pip package, tests without Slicer) the text as it is.

Slicer-free: ``slicer`` is never imported here. The application imported it long before any text is
shown, so it is only looked up (``sys.modules``), with its ``app``; slicer-core's package has no ``app``.
"""
from __future__ import annotations

import os
import string
import sys

_CONTEXTS: dict = {}


def context_of(path: str) -> str:
    """Slicer's translation context of a source file: ``<package folder>.<file name>`` when the folder is
    a package (has ``__init__.py``), else the file name, without ``.py`` (as slicer.i18n.getContext)."""
    if path not in _CONTEXTS:
        folder, name = os.path.split(path)
        name = name[:-3] if name.endswith(".py") else name
        package = os.path.isfile(os.path.join(folder, "__init__.py"))
        _CONTEXTS[path] = f"{os.path.basename(folder)}.{name}" if package else name
    return _CONTEXTS[path]


def _fields(text: str) -> set:
    """The replacement fields of a format string (name and format spec); ValueError when malformed."""
    return {(name, spec) for _, name, spec, _ in string.Formatter().parse(text) if name is not None}


def tr(text: str) -> str:
    """``text`` in the language of the running Slicer application (the caller's context), else unchanged.
    A translation whose replacement fields differ from the text's is not used (as slicer.i18n.tr):
    ``.format()`` on it would fail."""
    slicer = sys.modules.get("slicer")
    app = getattr(slicer, "app", None) if slicer is not None else None
    if app is None:
        return text
    translated = app.translate(context_of(sys._getframe(1).f_code.co_filename), text)
    try:
        return translated if _fields(translated) == _fields(text) else text
    except ValueError:
        return text
