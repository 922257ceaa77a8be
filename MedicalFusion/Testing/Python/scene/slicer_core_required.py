"""The scene tests' shared start: skip the calling test module unless slicer-core's real MRML classes
(``slicer``, and the ``vtk`` it brings) can be imported. The package itself is on ``sys.path`` from
conftest.py."""
from __future__ import annotations

import pytest


def slicer_and_vtk():
    """(slicer, vtk), or a skip of the calling module with the reason."""
    slicer = pytest.importorskip(
        "slicer", reason="slicer-core is not installed (pip install slicer-core): the MRML scene tests need real MRML nodes")
    vtk = pytest.importorskip("vtk", reason="vtk is not installed (it comes with slicer-core)")
    return slicer, vtk
