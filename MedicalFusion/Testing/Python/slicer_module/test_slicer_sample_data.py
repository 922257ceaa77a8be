"""The sample in 3D Slicer's Sample Data module, loaded the ways Sample Data loads it.

Sample Data has two entry points (Slicer's Modules/Scripted/SampleData/SampleData.py, v5.8.1 / main):
the sample's button, which calls the source's custom downloader if it has one and
``SampleDataLogic.downloadFromSource`` otherwise (lines 392-395 / 454-457), and
``SampleData.downloadSample(name)``, which always calls ``downloadFromSource`` (50-61 and 856-870 /
50-61 and 1041-1055): it copies each URI into Slicer's cache and loads the copy through the IO
manager. The module's sample has no custom downloader: its URI is a file the extension ships and its
file type is the module's file reader, so both entry points load the pair through MedicalFusion code.

Two ways to run Sample Data here: Slicer's own SampleData.py, when it can be read (beside
shared/slicer-python as <version>/Modules/Scripted/SampleData/SampleData.py, or from a Slicer git
directory named by $MEDICALFUSION_SLICER_GIT), and otherwise the harness's stand-in, which follows
the lines cited above (slicer_harness._sample_data_module).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]          # Testing/Python: the harness beside conftest
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import slicer_harness as sh  # noqa: E402
from MedicalFusionLib.sample import SAMPLE_FILE_TYPE, SAMPLE_NAME, SAMPLE_NODE_NAMES  # noqa: E402

VERSIONS = sh.version_params()


def _harness(version, cache, sample_data=None):
    """``cache``: conftest's session Slicer cache folder, where the generated pair lands once
    (<cache>/MedicalFusion), shared with the other Slicer tests that load the sample."""
    reason = sh.missing_reason(version)
    if reason:
        pytest.skip(reason)
    return sh.SlicerHarness(version, cache_dir=cache, sample_data=sample_data)


def _check_loaded(h, returned) -> None:
    """The demo pair is in the scene, selected in the panel, and Fuse is enabled."""
    module = h.module
    p = module.MedicalFusionLogic().getParameterNode()
    assert returned is p.anatomicalVolume, returned
    assert (p.anatomicalVolume.GetName(), p.functionalVolume.GetName()) == SAMPLE_NODE_NAMES
    assert h.slicer.util.arrayFromVolume(p.anatomicalVolume).shape == (189, 233, 197)   # MNI152 template
    assert p.functionalVolume.GetDisplayNode().GetColorNodeID().endswith("PET-Heat")
    widget = h.widget()
    assert widget.ui.fuseButton.enabled, widget.ui.fuseButton.toolTip
    assert [n.GetName() for n in h.nodes("vtkMRMLScalarVolumeNode")] == list(SAMPLE_NODE_NAMES)
    assert h.callback_errors == [], h.callback_errors


def _real_sample_data(version, tmp_path) -> Path:
    path = sh.slicer_sample_data_source(version, tmp_path)
    if path is None:
        pytest.skip("Slicer's SampleData.py is not available: put it in shared/slicer-python/<version>/"
                    f"{sh.SAMPLE_DATA_RELATIVE} or set MEDICALFUSION_SLICER_GIT to a Slicer git directory")
    return path


@pytest.mark.parametrize("version", VERSIONS)
def test_download_sample_loads_the_pair_with_slicers_own_sample_data(version, sample_cache, tmp_path):
    """``SampleData.downloadSample('MedicalFusionPETMRI')``, Slicer's own code."""
    with _harness(version, sample_cache, _real_sample_data(version, tmp_path)) as h:
        import SampleData  # noqa: PLC0415

        assert Path(SampleData.__file__).name == "SampleData.py" and hasattr(SampleData, "SampleDataWidget")
        _check_loaded(h, SampleData.downloadSample(SAMPLE_NAME))


@pytest.mark.parametrize("version", VERSIONS)
def test_the_sample_button_loads_the_pair_with_slicers_own_sample_data(version, sample_cache, tmp_path):
    """The button: Slicer's SampleDataWidget connects it as click_sample does (lines cited there)."""
    with _harness(version, sample_cache, _real_sample_data(version, tmp_path)) as h:
        import SampleData  # noqa: PLC0415

        sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory("Medical Image Fusion")
        assert [s.sampleName for s in sources] == [SAMPLE_NAME]
        assert Path(sources[0].thumbnailFileName).is_file()
        assert sources[0].customDownloader is None        # the button and downloadSample: one path
        (returned,) = h.click_sample(SAMPLE_NAME)
        _check_loaded(h, returned)


@pytest.mark.parametrize("version", VERSIONS)
def test_download_sample_loads_the_pair(version, sample_cache):
    """The same through the harness's SampleData (Slicer's semantics, cited): runs where Slicer's
    SampleData.py is not available, as in CI."""
    with _harness(version, sample_cache) as h:
        import SampleData  # noqa: PLC0415

        returned_first = SampleData.downloadSample(SAMPLE_NAME)
        _check_loaded(h, returned_first)
        # a second download reuses the copy in the cache and the generated pair
        again = SampleData.downloadSample(SAMPLE_NAME)
        assert again.GetName().startswith(SAMPLE_NODE_NAMES[0]) and again is not returned_first


@pytest.mark.parametrize("version", VERSIONS)
def test_the_sample_file_loads_through_the_modules_reader_as_add_data_does(version, sample_cache):
    """The file Sample Data copies is a file any user can drop on Slicer: the module's reader loads it."""
    with _harness(version, sample_cache) as h:
        import vtk  # noqa: PLC0415

        from MedicalFusionSlicer.sample_data import sampleRecipePath  # noqa: PLC0415

        recipe = sampleRecipePath()
        loaded = vtk.vtkCollection()
        assert h.app.coreIOManager().loadNodes(SAMPLE_FILE_TYPE, {"fileName": recipe}, loaded)
        assert [loaded.GetItemAsObject(i).GetName() for i in range(loaded.GetNumberOfItems())] == \
            list(SAMPLE_NODE_NAMES)
        reader = h.module.MedicalFusionFileReader(None)
        assert reader.canLoadFile(recipe) and not reader.canLoadFile(str(sh.MODULE_DIR / "MedicalFusion.py"))
