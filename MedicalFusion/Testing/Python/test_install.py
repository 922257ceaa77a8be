"""Installing the dependencies the Slicer module needs (MedicalFusionLib/install.py), without Slicer:
the installers are stand-ins that record their calls, ``find_spec`` says what is importable. (The
module's dialogs around it run on Slicer's own layer in test_slicer_module.py.)"""
from __future__ import annotations

import importlib.util
import subprocess

import pytest

from MedicalFusionLib import install

REAL_FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def importable(monkeypatch):
    """The set of dependency import names that find_spec finds (others fall through to the real one);
    a pip install of a name adds its import name."""
    found = set()
    names = {"torch": "torch", **{pip: name for name, pip in install.PIP_DEPENDENCIES}}

    def find_spec(name, *args, **kwargs):
        if name in names.values():
            return object() if name in found else None
        return REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return found, names


def test_missing_lists_torch_first_and_every_pip_name(importable):
    found, _ = importable
    assert install.missing_dependencies() == ["torch", "scikit-image", "scikit-learn", "scipy"]
    found.update({"torch", "sklearn"})
    assert install.missing_dependencies() == ["scikit-image", "scipy"]


class Pip:
    """``slicer.util.pip_install`` of Slicer 5.10+ (keyword arguments), recording its calls."""

    def __init__(self, found, names, fail=None):
        self.calls, self.found, self.names, self.fail = [], found, names, fail

    def __call__(self, requirements, **kwargs):
        self.calls.append((requirements, kwargs))
        if self.fail is not None:
            raise self.fail
        self.found.update(self.names[r] for r in requirements.split())


def test_pip_installs_torch_then_the_rest_quietly(importable):
    found, names = importable
    pip = Pip(found, names)
    assert install.install_dependencies(pip) == []
    assert pip.calls == [("torch", {"show_progress": False}),
                         ("scikit-image scikit-learn scipy", {"show_progress": False})]


def test_an_older_pip_install_gets_no_keywords():
    calls = []

    def pip_install(requirements):          # Slicer 5.4-5.8: one argument
        calls.append(requirements)

    install.pip_install_quietly(pip_install, "nilearn")
    assert calls == ["nilearn"]


def test_the_pytorch_extension_installs_torch_without_asking_again(importable):
    found, names = importable
    asked = []

    class TorchLogic:
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation=True):
            asked.append(askConfirmation)
            found.add("torch")
            return "torch"

    pip = Pip(found, names)
    assert install.install_dependencies(pip, TorchLogic()) == []
    assert asked == [False] and [c[0] for c in pip.calls] == ["scikit-image scikit-learn scipy"]


def test_failures_are_one_line_naming_the_packages(importable):
    found, names = importable

    class TorchLogic:
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation=True):
            return None                      # the extension gave up

    with pytest.raises(install.InstallFailed) as failed:
        install.install_dependencies(Pip(found, names), TorchLogic())
    assert failed.value.packages == "PyTorch" and "PyTorch extension did not install torch" in failed.value.detail
    found.add("torch")
    with pytest.raises(install.InstallFailed) as failed:
        install.install_dependencies(Pip(found, names, fail=subprocess.CalledProcessError(1, ["pip"])))
    assert str(failed.value) == "installing scikit-image, scikit-learn, scipy failed: pip exit status 1"


def test_still_missing_after_an_install_is_returned(importable):
    found, names = importable
    found.add("torch")

    def pip_that_installs_nothing(requirements, **kwargs):
        pass

    assert install.install_dependencies(pip_that_installs_nothing) == ["scikit-image", "scikit-learn", "scipy"]
