"""The Slicer panel's Qt-free half: what it offers beyond :mod:`MedicalFusionLib.options` (the window
boxes' sentinels and presets), the :class:`~MedicalFusionLib.options.FusionOptions` its parameter
node stands for, its checks, and the texts it shows (method tooltips, status lines, help), translated
inside Slicer as they were in the module file (``_()``, :mod:`MedicalFusionLib.i18n`).

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
from .i18n import tr as _

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


def control_states(p) -> dict:
    """Which of the panel's controls apply to these settings: widget name (in MedicalFusion.ui) -> enabled.
    The colour map and functional preset apply to a scalar functional, the typed window only when neither
    the display window nor a preset is used, the registration choices with 'Register first', the metric
    set with 'Compute metrics'."""
    scalar = scalar_functional(p)
    typed = scalar and not p.useDisplayWindow and p.functionalWindowPreset == NO_PRESET
    return {"colormapComboBox": scalar, "functionalWindowPresetComboBox": scalar,
            "functionalWindowMinSpinBox": typed, "functionalWindowMaxSpinBox": typed,
            "registrationComboBox": p.registerFirst, "registerWithSelector": p.registerFirst,
            "metricSetComboBox": p.computeMetrics}


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
    tip = _("{description}\nReference: {reference}").format(description=method.description,
                                                            reference=method.reference)
    return bool(ok), tip if ok else _("Not available: {reason}").format(reason=reason) + "\n\n" + tip


def dependency_notice(missing: list) -> list:
    """The status line's note when dependencies are not installed yet (empty list when none)."""
    if not missing:
        return []
    return [_("Not installed yet: {packages}. The fusion methods need them (the networks MRDFN, LYWNet and "
              "DM-FNet need PyTorch), so they are not listed yet: the first Fuse offers to install them "
              "(a few minutes).").format(packages=", ".join(missing))]


def run_node_roles(anatomical, functional, output_volume, output_table) -> dict:
    """Node ID -> its role, for the nodes a run reads or writes (the inputs' parent transforms
    included): deleting one of them cancels the run."""
    roles = {}
    for node, role in ((output_table, _("output table")), (output_volume, _("output volume")),
                       (functional, _("functional volume")), (anatomical, _("anatomical volume"))):
        if node is None:
            continue
        roles[node.GetID()] = role
        if node in (anatomical, functional):
            transform = node.GetParentTransformNode()
            while transform is not None:
                roles[transform.GetID()] = _("parent transform of the {role}").format(role=role)
                transform = transform.GetParentTransformNode()
    return roles


def running_message(p) -> str:
    if p.registerFirst:
        return _("Registering ({kind}), then fusing with '{method}'...").format(kind=p.registration, method=p.method)
    return _("Fusing with '{method}'...").format(method=p.method)


def cancelled_message(reason: str | None) -> str:
    """The status line after a cancelled run: why it stopped (``reason``, None: the user's Cancel)."""
    if reason is None:
        return _("Cancelled: nothing was written, the scene is unchanged.")
    return _("Cancelled: {reason}; nothing was written.").format(reason=reason)


def done_message(outcome, seconds: float) -> str:
    """The status line after a run (``outcome``: scene.SceneFusionResult): time, device, method, the
    nodes written and, after a registration, the transform and how well it is determined."""
    result = outcome.result
    written = f"'{outcome.volume_node.GetName()}'" + (f" + '{outcome.table_node.GetName()}'"
                                                       if outcome.table_node else "")
    text = _("Done in {seconds:.1f} s on {device} ('{method}', engine {engine:.1f} s) -> {outputs}.").format(
        seconds=seconds, device=result.device, method=result.method, engine=result.seconds, outputs=written)
    if outcome.transform_node is not None:
        info = outcome.info
        text += " " + _("Registered: '{node}' is now the functional's parent transform (normalised mutual "
                        "information {nmi}; restarts from perturbed starts end {centre} mm apart at the centre, "
                        "{overlap} mm over the overlap).").format(
            node=outcome.transform_node.GetName(), nmi=info.get("registration_normalized_mutual_information", ""),
            centre=info.get("registration_spread_centre_mm", ""), overlap=info.get("registration_spread_overlap_mm", ""))
        if info.get("registration_warning"):
            text += " " + _("Warning: {warning}").format(warning=info["registration_warning"])
    return text


def methods_help() -> str:
    """The module help's list of methods (HTML), from the catalogue."""
    items = "".join(f"<li><b>{m.name}</b>: {html.escape(m.description)} ({html.escape(m.reference)})"
                    f"{'; greyed out when its weights are missing' if m.needs_weights else ''}.</li>"
                    for m in choices.METHODS)
    return f"<ul>{items}</ul>"
