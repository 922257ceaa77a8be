"""The module's parameter node against what this version of the module offers."""
from __future__ import annotations

import logging

from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, findFirstAnnotation, splitAnnotations


def acceptSavedChoices(p) -> list:
    """A value its combo box cannot show (a scene saved by a version with other methods) would make the
    GUI connection raise: reset it to its default. ``p``: the wrapped parameter node. Returns the
    notices for the status line."""
    notices = []
    for name in p.allParameters:
        choice = findFirstAnnotation(splitAnnotations(p.dataType(name))[1], Choice)
        if choice is None or p.getValue(name) in choice.choices:
            continue
        message = _("The scene's {parameter} '{value}' is not available here: using '{default}'.").format(
            parameter=name, value=p.getValue(name), default=p.default(name).value)
        logging.warning("MedicalFusion: %s", message)
        p.setValue(name, p.default(name).value)
        notices.append(message)
    return notices
