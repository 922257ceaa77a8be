"""Shared fixtures: where ../shared/data is, and small synthetic images; how the suite is split for
``make test`` / ``make test-fast`` (pytest-xdist on both cores, the ``slow`` marker)."""
from __future__ import annotations

import os
import pathlib
import re
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):   # two workers on two cores: one thread each (before numpy/torch)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))                      # medicalfusion_tools (evaluate, training, hotspot, cohort)
sys.path.insert(0, str(REPO / "MedicalFusion"))
#: The tests mirror the package (io/, metrics/, methods/, networks/, scene/, slicer_module/, tools/);
#: a few share helpers across folders (``from test_faults import cli``, ``from test_pacs import ...``):
#: every test folder is importable by its modules' names, as when they all sat here.
HERE = pathlib.Path(__file__).resolve().parent
for _folder in sorted(p for p in HERE.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))


def data_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MEDICALFUSION_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> pathlib.Path:
    root = data_root()
    if not (root / "aanlib" / "split.csv").is_file() or not (root / "spm12" / "T1.nii").is_file():
        pytest.skip(f"shared data not found at {root} (set MEDICALFUSION_DATA or put shared/ beside the checkout)")
    return root


def make_image(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None,
               vector: bool = False) -> sitk.Image:
    img = sitk.GetImageFromArray(arr, isVector=vector)
    img.SetSpacing(spacing[: img.GetDimension()])
    img.SetOrigin(origin[: img.GetDimension()])
    if direction is not None:
        img.SetDirection(direction)
    return img


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def small_pair(rng):
    """A 3D anatomical (uint8-like float) and a scalar PET on the same 1 mm grid, 8x40x48."""
    z, y, x = np.mgrid[0:8, 0:40, 0:48].astype(np.float32)
    anat = (100 + 80 * np.sin(x / 5.0) * np.cos(y / 7.0) + rng.normal(0, 5, (8, 40, 48))).astype(np.float32)
    pet = np.exp(-((x - 24) ** 2 + (y - 20) ** 2) / 150.0) * 10.0 + 0.5
    return make_image(anat), make_image(pet.astype(np.float32))


def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread, as the trainers do on the shared CPU; restore afterwards."""
    yield from _torch_threads(1)


@pytest.fixture
def two_torch_threads():
    """Two torch threads (the pipeline's metrics then run on a pool of two workers); restored afterwards."""
    yield from _torch_threads(2)


# --------------------------------------------------------------------------------------------------
# how the suite is split (make test: -n 2 --dist loadgroup; make test-fast: -m "not slow")

#: Whole modules left out of ``make test-fast``: real DICOM studies with every method, real
#: registrations, the Slicer module on Slicer's Python layer (a harness a test), DM-FNet's training.
SLOW_MODULES = {"test_real_cases", "test_registration", "test_scene_registration", "test_slicer_module",
                "test_slicer_module_registration", "test_dmfnet"}
#: Single tests (name up to the parameters) left out of ``make test-fast``: the slowest of the rest
#: (--durations in docs/BENCHMARKS.md, 'tests'): real data, training, the demo.
SLOW_TESTS = {
    "test_demo_runs_on_the_embedded_sample",
    "test_evaluate_writes_tables_and_montage",
    "test_evaluate_reports_what_fuse_gives_users",
    "test_torch_volume_metrics_match_numpy_on_aanlib_slices",
    "test_torch_volume_metrics_match_numpy_on_spm12_fused_with_lp",
    "test_reproduces_reference_evaluator_anchors",
    "test_fuse_nodes_reports_every_phase_and_a_cancel_in_any_phase_changes_nothing",
    "test_short_training_lowers_loss_and_resumes",
    "test_trainer_writes_manifest_entry",
    "test_two_identical_mrdfn_runs_write_the_same_bytes",
    "test_trained_network_fuses_a_slice_to_the_same_bytes_alone_or_in_any_batch",
    "test_panel_first_display_lists_every_method_without_importing_torch",
    # real sts studies pulled from Orthanc, fused and stored back (io/test_pacs.py)
    "test_pull_fuse_store_lands_in_the_same_study",
    "test_slicer_scene_round_trip_pull_fuse_export_store",
    "test_output_dicom_alongside_store_and_mr_as_anatomical",
}
#: A test that uses one of these fixtures is slow too: tools/test_cohort.py's Dask cluster (a
#: scheduler and two worker processes) and the cohorts run on it; the three real sts patients fused
#: for the DICOM export tests (io/test_dicom_export.py: CLI, scene/test_scene_dicom_export.py: scene).
SLOW_FIXTURES = {"cluster", "sts_fused", "fused_sts"}
#: A test that starts a Python subprocess (each imports the package and torch: seconds) is slow too.
SUBPROCESS_CALLS = ("run_cli(", "start_paused(", "subprocess.", "_python(", "cli_process.")


def _starts_a_subprocess(item) -> bool:
    import inspect  # noqa: PLC0415

    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError):
        return False
    return any(call in source for call in SUBPROCESS_CALLS)


def pytest_collection_modifyitems(config, items):
    """``slow`` on the tests above; every user of a fixture of SHARED_RESULT_UNITS is listed there."""
    for item in items:
        module = item.module.__name__ if item.module is not None else ""
        if (module in SLOW_MODULES or item.originalname in SLOW_TESTS or _starts_a_subprocess(item)
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)
        for unit, (fixture, modules) in SHARED_RESULT_UNITS.items():
            if (fixture is not None and fixture in getattr(item, "fixturenames", ())
                    and item.originalname not in modules.get(module, ())):
                raise pytest.UsageError(f"{item.nodeid} uses the shared fixture {fixture}: add it to "
                                        f"conftest.SHARED_RESULT_UNITS['{unit}'] (so it runs in that fixture's worker)")


_REAL_CASE = re.compile(r"\[(STS_\d+)(?:-PET-([^-\]]+))?")


#: Modules run whole in one worker: their module- or session-scoped fixtures are costly and would
#: be made again in the other worker (test_cohort: a Dask cluster, an Orthanc and two cohort runs;
#: test_pacs: an Orthanc holding the three sts patients, and an HTTPS one; the DICOM exports of the
#: sts series; the Slicer sample's download).
WHOLE_MODULES = {"test_cohort", "test_pacs", "test_dicom_export", "test_scene_dicom_export", "test_slicer_sample_data"}

#: Tests that share one costly result (a module-scoped fixture, or a cache a fixture installs) run in
#: one worker, so that it is made once: unit -> (fixture, {module: the tests that use it}). A test
#: that uses the fixture and is not listed stops the collection (pytest_collection_modifyitems), so
#: the lists cannot fall behind (fixture None: no such check).
SHARED_RESULT_UNITS = {
    # the sample pair generated from the MNI template (~4 s) into the session's Slicer cache folder
    # (sample_cache), once a process: the Slicer tests that load it, with test_slicer_sample_data
    "test_slicer_sample_data": (None, {
        "test_slicer_module": (
            "test_sample_is_registered_with_sample_data_and_loads_in_one_click",
            "test_self_test_reload_and_test_passes",
            "test_self_test_loaded_test_by_test_as_ctest_does",
        ),
        "test_slicer_glue": ("test_load_sample_from_the_python_console_selects_the_pair",),
    }),
    # the head phantom's rigid registration (test_registration.py: head_run)
    "registration-head-run": ("head_run", {"test_registration": (
        "test_rigid_recovers_a_known_misalignment_and_maps_anatomical_to_functional_points",
        "test_the_same_inputs_give_the_same_answer_bit_for_bit",
        "test_inputs_are_not_modified",
        "test_volumes_far_from_the_world_origin_converge_as_near_it",
        "test_progress_every_iteration_of_every_start",
        "test_cancel_at_any_point_stops_at_once_and_leaves_nothing",
        "test_every_registration_says_how_sure_it_is",
    )}),
    # the registrations the scene's and the panel's tests repeat (registration_memo.py)
    "registration-front-doors": ("shared_registrations", {
        "test_scene_registration": (
            "test_fuse_with_registration_sets_a_transform_node_as_the_functional_parent",
            "test_the_transform_node_follows_the_anatomical_parent",
            "test_errors_leave_the_scene_as_it_was",
            "test_register_nodes_changes_nothing_and_place_registration_applies_it",
            "test_a_tfm_saved_by_the_command_line_aligns_the_pair_when_slicer_loads_it",
            "test_register_with_the_functionals_ct_places_both",
        ),
        "test_registration": (
            "test_cli_register_saves_a_transform_and_reuses_it",
            "test_cli_uncertain_registration_warns_even_quiet_and_strict_refuses",
            "test_cli_register_with_the_functionals_ct",
        ),
        "test_slicer_module_registration": (
            "test_fuse_with_register_first_sets_an_aligning_parent_transform",
            "test_an_uncertain_registration_is_shown_as_a_warning",
            "test_register_using_the_functionals_ct_places_both",
        ),
    }),
}


@pytest.fixture
def shared_registrations(monkeypatch):
    """Registrations answered from a cache when this process registered the same inputs before
    (registration_memo.py): for the tests of what a front door does with a registration's answer."""
    import registration_memo  # noqa: PLC0415

    registration_memo.install(monkeypatch)
    return registration_memo


def xdist_scope(nodeid: str) -> str:
    """The unit of work pytest-xdist hands one worker whole: each real case (patient + anatomical:
    its prepared pair and fusions, test_real_cases' module cache, are made once), each Slicer-without-
    torch subprocess (test_slicer_module: one a version), the modules of WHOLE_MODULES (their
    fixtures are made once), the tests of each SHARED_RESULT_UNITS entry; every other test alone."""
    path, _, rest = nodeid.partition("::")
    module = pathlib.PurePosixPath(path).stem
    if module == "test_real_cases":
        found = _REAL_CASE.search(rest)
        if found:
            return f"real-case-{found.group(1)}-{found.group(2) or 'CT'}"
    if module in WHOLE_MODULES:
        return module
    name = rest.partition("[")[0]
    for unit, (_, modules) in SHARED_RESULT_UNITS.items():
        if name in modules.get(module, ()):
            return unit
    if module == "test_slicer_module" and "without_torch" in rest:
        return "without-torch-" + rest.partition("[")[2].rstrip("]")
    return nodeid


def _is_heavy(nodeid: str) -> bool:
    """A test of SLOW_MODULES or SLOW_TESTS (seconds each, most of them), from its node id alone."""
    path, _, rest = nodeid.partition("::")
    return pathlib.PurePosixPath(path).stem in SLOW_MODULES or rest.partition("[")[0] in SLOW_TESTS


def handout_order(units: dict) -> list:
    """The order the units are handed to the workers: the units of several tests first, most tests
    first (as pytest-xdist's --loadscope-reorder does), then the single heavy tests, then the other
    single tests, each in collection order; so the run does not end with one worker on a heavy test
    and the other idle (longest first)."""
    def key(item):
        scope, nodeids = item
        return -len(nodeids), 0 if any(_is_heavy(n) for n in nodeids) else 1
    return [scope for scope, _ in sorted(units.items(), key=key)]


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with the units of :func:`xdist_scope`, handed out in :func:`handout_order`.
    (pytest-xdist's own xdist_group marks do nothing under pytest 9, whose node ids can no longer be
    renamed; the units are found from the node ids instead.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling  # noqa: PLC0415

    class CaseScheduling(LoadGroupScheduling):
        _ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self._ordered:          # the queue is complete when the first unit is handed out
                self._ordered = True
                for scope in handout_order(self.workqueue):
                    self.workqueue.move_to_end(scope)
            super()._assign_work_unit(node)

    return CaseScheduling(config, log)


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> pathlib.Path:
    """One Slicer cache folder per test process: the module's generated sample is made once (the
    tests that load it run in one worker: SHARED_RESULT_UNITS['test_slicer_sample_data'])."""
    return tmp_path_factory.mktemp("slicer-cache")


@pytest.fixture
def harness(request, sample_cache):
    """The module on Slicer's own Python layer (slicer_harness.py), at the version given by
    ``@slicer_harness.parametrize_versions`` (indirect); skips with the reason where it cannot run."""
    here = str(pathlib.Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import slicer_harness as sh  # noqa: PLC0415

    with sh.opened(request.param, sample_cache) as h:
        yield h


# --------------------------------------------------------------------------------------------------
# per-test CPU time (docs/TESTING.md): MEDICALFUSION_TEST_CPU_TIMES=PREFIX writes PREFIX.<worker>.tsv,
# one line a test: CPU seconds (this process and the children it reaped: the fork server's, the
# command's, Dask's), wall seconds (setup + call + teardown), node id; a last line for the whole
# process. On a loaded machine the CPU seconds move much less than the wall seconds --durations gives.

_CPU_TIMES: dict = {}


def _cpu_seconds() -> float:
    import resource  # noqa: PLC0415

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not os.environ.get("MEDICALFUSION_TEST_CPU_TIMES"):
        yield
        return
    import time  # noqa: PLC0415

    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    _CPU_TIMES[item.nodeid] = (_cpu_seconds() - cpu, time.perf_counter() - wall)


def pytest_sessionfinish(session, exitstatus):
    prefix = os.environ.get("MEDICALFUSION_TEST_CPU_TIMES")
    if prefix and _CPU_TIMES:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(f"{prefix}.{worker}.tsv", "w", encoding="utf-8") as fh:
            fh.writelines(f"{cpu:.2f}\t{wall:.2f}\t{nodeid}\n" for nodeid, (cpu, wall) in _CPU_TIMES.items())
            fh.write(f"{_cpu_seconds():.2f}\t-\t(the whole process: imports, collection and every test)\n")
