"""The Slicer panel's Qt-free half: what it offers beyond :mod:`MedicalFusionLib.options` (the window
boxes' sentinels and presets), the :class:`~MedicalFusionLib.options.FusionOptions` its parameter
node stands for, its checks, and the texts it shows (method tooltips, status lines, help).

The module file (MedicalFusion.py) binds these to Qt and MRML; everything here runs, and is
tested, without Slicer. ``p`` is the panel's parameter node, or anything with its field names
(``method``, ``device``, ``axis``, ``computeMetrics``, ``metricSet``, ``colormap``,
``useDisplayWindow``, ``functionalWindowMin``/``Max``, ``anatomicalWindowPreset``,
``functionalWindowPreset``, ``functionalVolume``).
"""
from __future__ import annotations

import html

from . import options as choices
from . import windows
from .errors import FusionError

#: The colour map box's first entry: the functional's display node's colour node.
AS_DISPLAYED = "As displayed"
#: First entry of the window preset boxes: no preset (the window comes from 'As displayed' or the data).
NO_PRESET = "No preset"
ANATOMICAL_PRESETS = [name for name in windows.preset_names() if name.startswith("ct-")]
FUNCTIONAL_PRESETS = [name for name in windows.preset_names() if name.startswith("pet-")] + ANATOMICAL_PRESETS
#: How the panel names the windows in a refusal.
WINDOW_NAMES = ("The anatomical window", "The functional window")


def scalar_functional(p) -> bool:
    """A functional is selected and it holds values (not RGB): colour map and window apply to it."""
    node = p.functionalVolume
    return node is not None and not node.IsA("vtkMRMLVectorVolumeNode")


def options_from_panel(p) -> choices.FusionOptions:
    """The run's options as the CLI builds them: 'As displayed' and 'No preset' are None, and so is
    a colour map or window of an RGB functional; a typed window only when neither the display
    window nor a preset is used."""
    scalar = scalar_functional(p)
    functional_preset = None if p.functionalWindowPreset == NO_PRESET or not scalar else p.functionalWindowPreset
    return choices.FusionOptions(
        method=p.method, device=p.device, axis=p.axis, compute_metrics=p.computeMetrics, metric_set=p.metricSet,
        colormap=None if p.colormap == AS_DISPLAYED or not scalar else p.colormap,
        functional_window=None if p.useDisplayWindow or not scalar or functional_preset
        else (p.functionalWindowMin, p.functionalWindowMax),
        anatomical_preset=None if p.anatomicalWindowPreset == NO_PRESET else p.anatomicalWindowPreset,
        functional_preset=functional_preset)


def check(p) -> tuple[bool, str]:
    """(ok, reason) of the panel's settings, by the options module's one check (:func:`options.validate`:
    method known and available, windows, presets, colour map, orientation, device, metric set)."""
    try:
        choices.validate(options_from_panel(p), WINDOW_NAMES)
    except FusionError as exc:
        return False, str(exc)
    return True, ""


def method_tooltip(name: str) -> tuple[bool, str]:
    """(available, tooltip) of a method in the method box, from the catalogue (nothing is imported:
    torch need not be installed): its description and paper, and why it is not available."""
    method = choices.method_info(name)
    ok, reason = method.available()
    tip = f"{method.description}\nReference: {method.reference}"
    return bool(ok), tip if ok else f"Not available: {reason}\n\n{tip}"


def dependency_notice(missing: list) -> list:
    """The status line's note when dependencies are not installed yet (empty list when none)."""
    if not missing:
        return []
    return [f"Not installed yet: {', '.join(missing)}. The fusion methods need them (the networks MRDFN, LYWNet "
            "and DM-FNet need PyTorch), so they are not listed yet: the first Fuse offers to install them "
            "(a few minutes)."]


def run_node_roles(anatomical, functional, output_volume, output_table) -> dict:
    """Node ID -> its role, for the nodes a run reads or writes (the inputs' parent transforms
    included): deleting one of them cancels the run."""
    roles = {}
    for node, role in ((output_table, "output table"), (output_volume, "output volume"),
                       (functional, "functional volume"), (anatomical, "anatomical volume")):
        if node is None:
            continue
        roles[node.GetID()] = role
        if node in (anatomical, functional):
            transform = node.GetParentTransformNode()
            while transform is not None:
                roles[transform.GetID()] = f"parent transform of the {role}"
                transform = transform.GetParentTransformNode()
    return roles


def running_message(p) -> str:
    if p.registerFirst:
        return f"Registering ({p.registration}), then fusing with '{p.method}'..."
    return f"Fusing with '{p.method}'..."


def done_message(outcome, seconds: float) -> str:
    """The status line after a run (``outcome``: scene.SceneFusionResult): time, device, method, the
    nodes written and, after a registration, the transform and how well it is determined."""
    result = outcome.result
    written = f"'{outcome.volume_node.GetName()}'" + (f" + '{outcome.table_node.GetName()}'"
                                                       if outcome.table_node else "")
    text = (f"Done in {seconds:.1f} s on {result.device} ('{result.method}', engine {result.seconds:.1f} s) -> "
            f"{written}.")
    if outcome.transform_node is not None:
        info = outcome.info
        text += (f" Registered: '{outcome.transform_node.GetName()}' is now the functional's parent transform "
                 f"(normalised mutual information {info.get('registration_normalized_mutual_information', '')}; "
                 f"restarts from perturbed starts end {info.get('registration_spread_centre_mm', '')} mm apart at "
                 f"the centre, {info.get('registration_spread_overlap_mm', '')} mm over the overlap).")
        if info.get("registration_warning"):
            text += f" Warning: {info['registration_warning']}"
    return text


def methods_help() -> str:
    """The module help's list of methods (HTML), from the catalogue."""
    items = "".join(f"<li><b>{m.name}</b>: {html.escape(m.description)} ({html.escape(m.reference)})"
                    f"{'; greyed out when its weights are missing' if m.needs_weights else ''}.</li>"
                    for m in choices.METHODS)
    return f"<ul>{items}</ul>"
