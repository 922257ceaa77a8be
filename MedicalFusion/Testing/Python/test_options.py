"""The options module (MedicalFusionLib/options.py, issue 21): one FusionOptions, one set of checks and
choices for the CLI, the panel and Python callers; the methods catalogue the registry registers
against; the quick metric set as the default; and a start-up that does not import torch
(``medicalfusion methods``, ``--help``, the panel's first display: checked in fresh interpreters)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from MedicalFusionLib import options  # noqa: E402
from MedicalFusionLib.errors import FusionError  # noqa: E402

MODULE_DIR = HERE.parents[1]


def _python(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter with the worktree's package first; it prints one JSON line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CLI = """
import contextlib, io, json, sys
from MedicalFusionLib.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules, "scipy": "scipy" in sys.modules,
                  "stdout": out.getvalue()}))
"""


@pytest.mark.parametrize("argv", [["methods"], ["methods", "-v"], ["--help"], ["fuse", "--help"]],
                         ids=["methods", "methods-v", "help", "fuse-help"])
def test_cli_start_up_does_not_import_torch(argv):
    r = _python(_CLI, *argv)
    assert r["rc"] == 0 and not r["torch"] and not r["scipy"], r
    if argv[0] == "methods":
        names = [line.split()[0] for line in r["stdout"].splitlines() if line and not line.startswith(" ")]
        assert names == options.method_names()


_PANEL = """
import json, sys
import slicer_harness as sh
version = sys.argv[1]
with sh.SlicerHarness(version) as h:
    widget = h.widget()
    box = widget.ui.methodComboBox
    items = [box.itemText(i) for i in range(box.count)]
    tips = [box.itemData(i, __import__("qt").Qt.ToolTipRole) for i in range(box.count)]
    from MedicalFusionLib.scene import add_phantom_pair
    anatomical, functional = add_phantom_pair(h.scene)
    widget.ui.anatomicalSelector.setCurrentNode(anatomical)
    widget.ui.functionalSelector.setCurrentNode(functional)
    p = widget._parameterNode
    print(json.dumps({"torch": "torch" in sys.modules, "items": items, "tips": [str(t) for t in tips],
                      "method": p.method, "metric_set": p.metricSet, "axis": p.axis,
                      "fuse_enabled": bool(widget.ui.fuseButton.enabled), "errors": list(h.callback_errors)}))
"""


@pytest.mark.parametrize("version", ["v5.8.1"])
def test_panel_first_display_lists_every_method_without_importing_torch(version):
    import slicer_harness as sh

    reason = sh.missing_reason(version)
    if reason:
        pytest.skip(reason)
    r = _python(_PANEL, version)
    assert not r["torch"], "the panel's first display imported torch"
    assert r["errors"] == []
    assert r["items"] == options.method_names()                      # the catalogue, whole
    for name, tip in zip(r["items"], r["tips"]):
        assert options.method_info(name).reference in tip, (name, tip)
    assert (r["method"], r["metric_set"], r["axis"]) == (options.DEFAULT_METHOD, "quick", "axial")
    assert r["fuse_enabled"]


def test_the_registry_implements_exactly_the_catalogue_with_its_texts():
    from MedicalFusionLib.methods import all_methods

    methods = all_methods()
    assert [m.name for m in methods] == options.method_names()
    for m in methods:
        info = options.method_info(m.name)
        assert (m.family, m.description, m.reference) == (info.family, info.description, info.reference)
        assert m.available() == info.available()
    assert {m.family for m in methods} <= set(options.FAMILIES)


def test_a_method_missing_from_the_catalogue_cannot_be_registered():
    from MedicalFusionLib.methods.registry import FusionMethod, register

    with pytest.raises(RuntimeError, match="not in the catalogue"):
        register(FusionMethod(name="not_in_catalogue", build=lambda device: None))
    with pytest.raises(RuntimeError, match="differs from the catalogue"):
        register(FusionMethod(name="lp", description="something else", build=lambda device: None))


def test_metric_set_names_agree_with_the_metrics_keys():
    from MedicalFusionLib.metrics import METRIC_KEYS, METRIC_SETS

    assert tuple(METRIC_SETS) == tuple(options.METRIC_SETS)
    assert METRIC_SETS["all"] == list(METRIC_KEYS)
    assert METRIC_SETS["quick"] == [k for k in METRIC_KEYS if not k.startswith("FMI")]


def test_defaults_quick_metric_set_for_fuse_panel_and_api_every_metric_for_evaluate():
    from MedicalFusionLib.cli import build_parser
    from MedicalFusionLib.pipeline import FusionOptions as PipelineOptions

    assert PipelineOptions is options.FusionOptions
    assert options.FusionOptions().metric_set == "quick" == options.DEFAULT_METRIC_SET
    args = build_parser().parse_args(["fuse", "-a", "a.nrrd", "-f", "b.nrrd", "-o", "o.nrrd", "--metrics", "m.csv"])
    assert args.metric_set == "quick" and args.method == options.DEFAULT_METHOD
    assert options.EVALUATE_METRIC_SET == "all"


def test_python_api_default_computes_the_quick_set(small_pair):
    from MedicalFusionLib.metrics import COLOUR_METRIC_KEYS, METRIC_SETS
    from MedicalFusionLib.pipeline import fuse_images

    for chosen, keys in ((None, METRIC_SETS["quick"]), ("all", METRIC_SETS["all"])):
        kw = {} if chosen is None else {"metric_set": chosen}
        names = list(fuse_images(*small_pair, options.FusionOptions(method="average", **kw)).metrics)
        # the set's luma metrics in order, then the colour-fidelity rows (issue 18), never FMI by default
        assert names[:len(keys)] == keys and set(names[len(keys):]) <= set(COLOUR_METRIC_KEYS), (chosen, names)


@pytest.mark.parametrize("change, message", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"anatomical_window": (5, 1)}, "anatomical window 5 1 is empty"),
    ({"functional_window": (2, 2)}, "functional window 2 2 is empty"),
    ({"axis": "diagonal"}, "unknown slice orientation"),
    ({"axis": 3}, "axis 3 does not exist"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"batch_size": 0}, "batch size 0"),
    ({"batch_size": 2.5}, "batch size 2.5"),
    ({"metric_set": "some"}, "unknown metric set 'some'"),
    ({"colormap": "NoSuchMap"}, "NoSuchMap"),
    ({"anatomical_preset": "ct-nothing"}, "ct-nothing"),
])
def test_validate_refuses_each_bad_choice_in_one_line(change, message):
    opts = options.FusionOptions(**change)
    with pytest.raises(FusionError, match=message) as info:
        options.validate(opts)
    assert "\n" not in str(info.value)


def test_validate_accepts_the_defaults_and_every_choice():
    for name in options.method_names():
        if options.method_info(name).available()[0]:
            options.validate(options.FusionOptions(method=name))
    for axis in options.AXES + (0, 1, 2, "2"):
        options.validate(options.FusionOptions(axis=axis))
    for device in options.DEVICES + ("cuda:1",):
        options.validate(options.FusionOptions(device=device))
    options.validate(options.FusionOptions(metric_set="all", batch_size=options.MAX_BATCH_SIZE,
                                           anatomical_window=(-1000.0, 400.0)))


def test_unavailable_network_is_refused_with_the_reason(monkeypatch, tmp_path):
    from MedicalFusionLib.networks import weights

    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path))            # an empty weights folder
    with pytest.raises(FusionError, match="no weights for 'mrdfn'"):
        options.validate(options.FusionOptions(method="mrdfn"))
