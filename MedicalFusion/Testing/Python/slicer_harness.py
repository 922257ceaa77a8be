"""A headless 3D Slicer for the test suite: Slicer's own Python layer on slicer-core's MRML scene.

``../shared/slicer-python/<version>/slicer`` holds Slicer's ``Base/Python/slicer`` package,
unmodified (``ScriptedLoadableModule``, ``parameterNodeWrapper``, ``util``, ``testing``, ``i18n``),
for the stable release and for the main branch (``$MEDICALFUSION_SLICER_PYTHON`` may point
elsewhere). :class:`SlicerHarness` imports that package, read in place, as ``slicer`` - with the
MRML classes of the slicer-core wheel as its compiled "kits", which is how Slicer's own
``slicer/__init__.py`` fills the namespace - and puts in small stand-ins only for what needs the Qt
application:

- ``qt``, ``ctk`` and the MRML widgets (:mod:`qt_standins`), the .ui loader included;
- ``slicer.app`` (:class:`HarnessApp`): testing mode, ``processEvents`` (which can play queued
  "user actions", e.g. a click on Cancel), translation (recorded), settings, the IO manager (volumes
  and scenes through slicer-core's logics), the layout manager (the scene's real layout, slice and
  composite nodes) and the application logic (slicer-core's ``vtkSlicerApplicationLogic``);
- ``slicer.modules``: the scripted module loaded the way Slicer loads it (a module object put in
  ``sys.modules`` before its source runs, then ``<Module>(parent)``), its widget representation
  (``setup()``, ``enter()`` / ``exit()``, ``reload()`` for "Reload and Test");
- the subject hierarchy's automatic items for new data nodes (Slicer's plugin logic is Qt);
- ``SampleData``: Slicer's own SampleData.py when a test passes it (``sample_data``, see
  :func:`slicer_sample_data_source`), else a stand-in with its semantics, cited line by line
  (registration, ``downloadSample``, ``downloadFromSource`` through the IO manager), and a click
  on a sample's button;
- the IO manager's scripted file readers (a module's ``<Module>FileReader`` class).

Use it as a context manager; on exit every module it imported is removed again, so the rest of the
test session keeps the slicer-core ``slicer`` meta-package::

    with SlicerHarness("v5.8.1") as h:
        widget = h.widget()          # MedicalFusionWidget after setup() and enter()
        ...

A Slicer without torch: :func:`hide_modules`, called first thing in a fresh interpreter (see
test_slicer_module.py, which runs those checks in a subprocess).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path

import qt_standins as qts

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "MedicalFusion"
MODULE_NAME = "MedicalFusion"
#: the folders of ../shared/slicer-python: stable release, main branch
VERSIONS = ("v5.8.1", "main-583e9b37")
#: names the harness puts into (or takes out of) sys.modules; the module's Slicer-side package too, which
#: binds the ``slicer`` of the Slicer version it was first imported with
_OWNED = ("slicer", "qt", "ctk", "SampleData", "PyTorchUtils", MODULE_NAME, MODULE_NAME + "Slicer")


def slicer_python_root() -> Path:
    return Path(os.environ.get("MEDICALFUSION_SLICER_PYTHON", REPO.parent / "shared" / "slicer-python"))


def missing_reason(version: str) -> str | None:
    """Why the harness cannot run ``version`` here, or None."""
    package = slicer_python_root() / version / "slicer"
    if not (package / "ScriptedLoadableModule.py").is_file():
        return (f"Slicer's Python package not found at {package} (set MEDICALFUSION_SLICER_PYTHON to a folder "
                f"holding {version}/slicer, or put shared/ beside the checkout)")
    if importlib.util.find_spec("slicer_core") is None:
        return "slicer-core is not installed (pip install slicer-core): the harness needs its MRML classes"
    return None


def version_params() -> list:
    """pytest parameters for every Slicer version the harness runs (ids v5.8.1, main)."""
    import pytest  # noqa: PLC0415  (test-only)

    return [pytest.param(v, id=v.split("-")[0]) for v in VERSIONS]


def parametrize_versions(fn):
    """Run a test that takes conftest's ``harness`` fixture once per Slicer version."""
    import pytest  # noqa: PLC0415  (test-only)

    return pytest.mark.parametrize("harness", version_params(), indirect=True)(fn)


@contextlib.contextmanager
def opened(version: str, cache_dir, **kwargs):
    """A harness for a pytest fixture: skips with the reason when ``version`` cannot run here, and
    fails the test when a Slicer callback raised inside it (Slicer prints those and goes on)."""
    import pytest  # noqa: PLC0415  (test-only)

    reason = missing_reason(version)
    if reason:
        pytest.skip(reason)
    with SlicerHarness(version, cache_dir=cache_dir, **kwargs) as h:
        yield h
        assert h.callback_errors == [], "exceptions in Slicer callbacks:\n" + "\n".join(h.callback_errors)


# --------------------------------------------------------------------------------------------------
# importing Slicer's package from a read-only folder, compiled once per process


class _CodeCachingLoader(importlib.machinery.SourceFileLoader):
    """A source loader that keeps compiled code in memory: ../shared is read-only, so Python cannot
    write .pyc files there and would compile Slicer's package again for every harness."""

    _code: dict = {}

    def get_code(self, fullname):
        key = (self.path, os.stat(self.path).st_mtime_ns)
        if key not in self._code:
            self._code[key] = super().get_code(fullname)
        return self._code[key]


class _SlicerPackageFinder(importlib.abc.MetaPathFinder):
    """Finds ``slicer`` and ``slicer.*`` in one version's folder (ahead of slicer-core's meta-package)."""

    def __init__(self, package_dir: Path):
        self.package_dir = package_dir

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if parts[0] != "slicer":
            return None
        base = self.package_dir.joinpath(*parts[1:])
        if (base / "__init__.py").is_file():
            init = str(base / "__init__.py")
            return importlib.util.spec_from_file_location(fullname, init, loader=_CodeCachingLoader(fullname, init),
                                                          submodule_search_locations=[str(base)])
        source = base.parent / (base.name + ".py")
        if parts[1:] and source.is_file():
            return importlib.util.spec_from_file_location(fullname, str(source),
                                                          loader=_CodeCachingLoader(fullname, str(source)))
        return None


# --------------------------------------------------------------------------------------------------
# hiding installed packages (a Slicer without torch)


class _HidingPathFinder(importlib.machinery.PathFinder):
    """sys.meta_path's path finder, blind to some top-level packages: ``import torch`` then fails
    with ModuleNotFoundError and ``importlib.util.find_spec('torch')`` is None, as in a Slicer where
    it was never installed."""

    hidden: frozenset = frozenset()

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.split(".")[0] in cls.hidden:
            return None
        return super().find_spec(fullname, path, target)


def hide_modules(names) -> None:
    """Make ``names`` unimportable in this interpreter; call it before anything imports them."""
    loaded = sorted(n for n in sys.modules if n.split(".")[0] in set(names))
    if loaded:
        raise RuntimeError(f"already imported, cannot hide: {loaded[:5]}")
    _HidingPathFinder.hidden = frozenset(names)
    sys.meta_path[:] = [_HidingPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    importlib.invalidate_caches()


# --------------------------------------------------------------------------------------------------
# the application


class LayoutManager(qts.QObject):
    """The scene's layout node, view nodes and slice logics (slicer-core's vtkMRMLLayoutLogic and
    vtkMRMLSliceLogic), without views: what ``slicer.app.layoutManager()`` offers scripts."""

    def __init__(self, slicer, scene):
        super().__init__()
        self._slicer = slicer
        self._scene = scene
        self._layout_logic = slicer.vtkMRMLLayoutLogic()
        self._layout_logic.SetMRMLScene(scene)
        self._layout_logic.GetLayoutNode().SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        self._slice_logics = []
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLScene(scene)
            logic.SetSliceNode(scene.GetNthNodeByClass(i, "vtkMRMLSliceNode"))
            self._slice_logics.append(logic)

    @property
    def layout(self) -> int:
        return self._layout_logic.GetLayoutNode().GetViewArrangement()

    @layout.setter
    def layout(self, value: int) -> None:
        self._layout_logic.GetLayoutNode().SetViewArrangement(int(value))

    def setLayout(self, value: int) -> None:
        self.layout = value

    def sliceViewNames(self) -> list:
        return [logic.GetSliceNode().GetLayoutName() for logic in self._slice_logics]

    def mrmlSliceLogics(self):
        import vtk  # noqa: PLC0415

        collection = vtk.vtkCollection()
        for logic in self._slice_logics:
            collection.AddItem(logic)
        return collection

    def sliceWidget(self, name: str):
        for logic in self._slice_logics:
            if logic.GetSliceNode().GetLayoutName() == name:
                return types.SimpleNamespace(sliceLogic=lambda lg=logic: lg,
                                             mrmlSliceNode=lambda lg=logic: lg.GetSliceNode())
        return None

    def slice_composite_nodes(self) -> list:
        return [logic.GetSliceCompositeNode() for logic in self._slice_logics]


class CoreIOManager:
    """``slicer.app.coreIOManager()``: volumes through vtkSlicerVolumesLogic, scenes through the scene."""

    VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")

    def __init__(self, slicer, scene, app_logic):
        self._slicer = slicer
        self._scene = scene
        self._volumes_logic = slicer.vtkSlicerVolumesLogic()
        self._volumes_logic.SetMRMLApplicationLogic(app_logic)   # finds the Colors logic there
        self._volumes_logic.SetMRMLScene(scene)
        self._readers: dict = {}   # file type -> [(scripted reader, its parent)]

    def register_scripted_readers(self, module, name: str) -> None:
        """What qSlicerScriptedLoadableModule::registerIO does for a scripted module: the class
        ``<Module>FileReader`` of its source, if any, is instantiated with the C++ reader as
        ``parent`` and registered for its ``fileType()`` (Base/QTGUI/qSlicerScriptedLoadableModule.cxx
        lines 212-228 and Base/QTCore/qSlicerScriptedFileReader.cxx setPythonSource, 97-160, at v5.8.1)."""
        cls = getattr(module, name + "FileReader", None)
        if cls is None:
            return
        parent = types.SimpleNamespace(loadedNodes=[])
        reader = cls(parent)
        self._readers.setdefault(str(reader.fileType()), []).append((reader, parent))

    def fileType(self, filename) -> str:
        name = str(filename).lower()
        if name.endswith((".mrml", ".mrb")):
            return "SceneFile"
        return "VolumeFile" if name.endswith(self.VOLUME_SUFFIXES) else "NoFile"

    def loadNodes(self, fileType, properties, loadedNodes=None, userMessages=None) -> bool:
        path = str(properties["fileName"])
        if fileType in self._readers:
            # qSlicerCoreIOManager::loadNodes (Base/QTCore/qSlicerCoreIOManager.cxx, v5.8.1 lines
            # 640-700): readers of the type in turn, skipped at confidence 0, the first whose load()
            # succeeds gives its loadedNodes (IDs), which are added to the collection
            for reader, parent in self._readers[fileType]:
                if reader.canLoadFileConfidence(path) <= 0.0:
                    continue
                parent.loadedNodes = []
                if not reader.load(dict(properties)):
                    continue
                if loadedNodes is not None:
                    for node_id in parent.loadedNodes:
                        node = self._scene.GetNodeByID(node_id)
                        if node is not None:
                            loadedNodes.AddItem(node)
                return True
            return False
        if fileType == "VolumeFile":
            name = properties.get("name") or Path(path).name.split(".")[0]
            node = self._volumes_logic.AddArchetypeVolume(path, name, 1 if properties.get("labelmap") else 0)
            if node is None:
                return False
            if properties.get("colorNodeID") and node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetAndObserveColorNodeID(properties["colorNodeID"])
            if loadedNodes is not None:
                loadedNodes.AddItem(node)
            return True
        if fileType == "SceneFile":
            self._scene.SetURL(path)
            return bool(self._scene.Import())
        return False


class ModuleManager(qts.QObject):
    SIGNALS = ("moduleAboutToBeUnloaded", "moduleLoaded")

    def __init__(self, harness):
        super().__init__()
        self._harness = harness

    def module(self, name: str):
        return getattr(self._harness.slicer.modules, name.lower(), None)


class HarnessApp(qts.QObject):
    """``slicer.app``: what MedicalFusion.py and Slicer's Python package ask of qSlicerApplication."""

    SIGNALS = ("startupCompleted",)

    def __init__(self, harness, testing: bool, main_window: bool):
        super().__init__()
        self._harness = harness
        self._testing = testing
        self._main_window = qts.QMainWindow() if main_window else None
        if self._main_window is not None:
            self._main_window.objectName = "qSlicerMainWindow"
        self.applicationName = "3D Slicer"
        self.cachePath = str(harness.cache_dir)
        self.temporaryPath = str(harness.cache_dir / "tmp")
        self.documentationBaseUrl = "https://slicer.readthedocs.io/en/latest/"
        self.translations: list = []
        self.process_events_calls = 0
        self._actions: list = []   # [calls_left, callable]
        self._in_actions = False

    def testingEnabled(self) -> bool:
        return self._testing

    def commandOptions(self):
        return types.SimpleNamespace(noMainWindow=self._main_window is None, runPythonAndExit=False,
                                     disableMessageHandlers=True)

    def topLevelWidgets(self) -> list:
        return [self._main_window] if self._main_window is not None else []

    def translate(self, context: str, text: str) -> str:
        self.translations.append((context, text))
        return text

    def processEvents(self, *args) -> None:
        """Let the 'user' act: queued actions whose turn has come run here, as Qt would deliver a
        click while the module calls processEvents. With ``qt.QEventLoop.ExcludeUserInputEvents``
        Qt holds user input back until a later call that accepts it: such calls neither count
        towards an action's turn nor run one (timers still fire)."""
        self.process_events_calls += 1
        if self._in_actions:
            return
        user_input = not (args and int(args[0]) & qts.QEventLoop.ExcludeUserInputEvents)
        self._in_actions = True
        try:
            due = []
            for entry in self._actions if user_input else ():
                entry[0] -= 1
                if entry[0] <= 0:
                    due.append(entry)
            for entry in due:
                self._actions.remove(entry)
                entry[1]()
            pending, qts.QTimer.pending = qts.QTimer.pending, []
            for callback in pending:
                callback()
        finally:
            self._in_actions = False

    def after_process_events(self, calls: int, action) -> None:
        """Run ``action`` (e.g. a button's ``click``) during the ``calls``-th processEvents from now."""
        self._actions.append([int(calls), action])

    def mrmlScene(self):
        return self._harness.scene

    def layoutManager(self):
        return self._harness.layout_manager

    def applicationLogic(self):
        return self._harness.app_logic

    def moduleManager(self):
        return self._harness.module_manager

    def coreIOManager(self):
        return self._harness.io_manager

    def userSettings(self):
        return qts.QSettings()

    settings = userSettings

    def setOverrideCursor(self, cursor) -> None:
        qts.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self) -> None:
        qts.QApplication.restoreOverrideCursor()

    def thread(self):
        return qts.QThread.currentThread()

    def pythonConsole(self):
        return None

    def moduleDocumentationUrl(self, name: str) -> str:
        return self.documentationBaseUrl + "user_guide/modules/" + name.lower() + ".html"


# --------------------------------------------------------------------------------------------------
# scripted modules


class ScriptedModuleWidget(qts.QWidget):
    """qSlicerScriptedLoadableModuleWidget: holds the Python widget, knows whether it is entered."""

    def __init__(self, harness, module):
        super().__init__()
        self._harness = harness
        self._module = module
        self.isEntered = False
        self.setLayout(qts.QVBoxLayout())
        self._python = None
        self._create()

    def _create(self) -> None:
        python_module = sys.modules[self._module.objectName]
        self._python = getattr(python_module, self._module.objectName + "Widget")(self)
        self._python.setup()
        setattr(self._harness.slicer.modules, self._module.objectName + "Widget", self._python)

    def self(self):
        return self._python

    def reload(self) -> None:
        """What reloadScriptedModule ends with: a new Python widget from the reloaded source."""
        entered = self.isEntered
        self.isEntered = False
        self._create()
        if entered:
            self.enter()

    def enter(self) -> None:
        self.isEntered = True
        self._python.enter()

    def exit(self) -> None:
        self._python.exit()
        self.isEntered = False


class ScriptedModule(qts.QObject):
    """qSlicerScriptedLoadableModule: the ``parent`` the module class fills in (title, categories...)."""

    def __init__(self, harness, name: str, path: Path):
        super().__init__()
        self._harness = harness
        self.objectName = name
        self.path = str(path)
        self.title = ""
        self.categories: list = []
        self.dependencies: list = []
        self.contributors: list = []
        self.helpText = ""
        self.acknowledgementText = ""
        self.icon = None
        self.hidden = False
        self.index = -1
        self._widget = None

    def widgetRepresentation(self):
        if self._widget is None:
            self._widget = ScriptedModuleWidget(self._harness, self)
        return self._widget

    def logic(self):
        return None


_COMPILED: dict = {}


def load_source_as_module(name: str, path: Path) -> types.ModuleType:
    """As Slicer's qSlicerScriptedUtils::loadSourceAsModule: the module object is in sys.modules
    before its code runs, and its folder is on sys.path."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _COMPILED:
        _COMPILED[key] = compile(path.read_text(encoding="utf-8"), str(path), "exec")
    code = _COMPILED[key]
    exec(code, module.__dict__)   # noqa: S102 - this is what Slicer does with a scripted module
    return module


# --------------------------------------------------------------------------------------------------
# SampleData


#: Slicer's own SampleData.py for a version, where a test may read it: shared/slicer-python holds
#: only Base/Python/slicer, so look for Modules/Scripted/SampleData/SampleData.py beside it, then in
#: a Slicer git directory ($MEDICALFUSION_SLICER_GIT; a clone or mirror of github.com/Slicer/Slicer)
SLICER_REVISIONS = {"v5.8.1": "v5.8.1", "main-583e9b37": "583e9b37d50ead7daf7b783dce465ccaecec8809"}
SAMPLE_DATA_RELATIVE = "Modules/Scripted/SampleData/SampleData.py"


def slicer_sample_data_source(version: str, folder: Path) -> Path | None:
    """Slicer's unmodified SampleData.py of ``version`` (written into ``folder`` when read from git),
    or None when neither shared/slicer-python nor a Slicer git directory has it."""
    import subprocess  # noqa: PLC0415

    beside = slicer_python_root() / version / SAMPLE_DATA_RELATIVE
    if beside.is_file():
        return beside
    git_dir = os.environ.get("MEDICALFUSION_SLICER_GIT")
    if not git_dir or version not in SLICER_REVISIONS:
        return None
    try:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{SLICER_REVISIONS[version]}:{SAMPLE_DATA_RELATIVE}"],
                              check=True, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(folder) / version / "SampleData.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _sample_data_module(slicer) -> types.ModuleType:
    """``SampleData`` where Slicer's own SampleData.py is not at hand: the same semantics, for what
    other modules and a user's click use (Slicer's Modules/Scripted/SampleData/SampleData.py; line
    numbers at v5.8.1 / main):

    - a source's fields are lists of one length; a single string is one file (SampleDataSource
      __init__, 147-215 / 147-215); ``loadFileType`` is accepted for ``loadFileTypes``;
    - a sample's button calls the source's ``customDownloader(source)`` when it has one, else
      ``SampleDataLogic().downloadFromSource(source)`` (SampleDataWidget.setCategory, 392-395 / 454-457);
    - ``downloadSample(name)`` = ``downloadSamples(name)[0]`` = ``downloadFromSource(source)``:
      the custom downloader is NOT used there (50-61, 856-870 / 50-61, 1041-1055);
    - ``downloadFromSource``: each file is fetched into the scene's remote cache directory (a file
      already there is reused; else ``urllib.request.urlretrieve(uri)``; a failure is retried 3
      times), then loaded by ``loadNode(path, nodeName, loadFileType, properties)`` through
      ``slicer.app.coreIOManager().loadNodes``, whose loaded nodes lose their storage nodes; the
      first loaded node of each file is returned (680-800, 934-1031 / 850-980, 1133-1234).
    """
    import urllib.request  # noqa: PLC0415

    module = types.ModuleType("SampleData", "Stand-in for Slicer's SampleData module (its semantics, cited)")

    class SampleDataSource:
        def __init__(self, sampleName=None, sampleDescription=None, uris=None, fileNames=None, nodeNames=None,
                     checksums=None, loadFiles=None, customDownloader=None, thumbnailFileName=None,
                     loadFileTypes=None, loadFileProperties=None, loadFileType=None):
            if loadFileType is not None and loadFileTypes is not None:
                raise ValueError("loadFileType and loadFileTypes cannot be specified at the same time")
            if loadFileTypes is None:
                loadFileTypes = loadFileType
            self.sampleName = sampleName
            self.sampleDescription = sampleName if sampleDescription is None else sampleDescription
            if isinstance(uris, (list, tuple)):
                n = len(uris)
                loadFileTypes = [loadFileTypes] * n if loadFileTypes is None or isinstance(loadFileTypes, str) else loadFileTypes
                nodeNames = [None] * n if nodeNames is None else nodeNames
                loadFiles = [None] * n if loadFiles is None else loadFiles
                checksums = [None] * n if checksums is None else checksums
            elif isinstance(uris, str):
                uris, fileNames, nodeNames = [uris], [fileNames], [nodeNames]
                loadFiles, loadFileTypes, checksums = [loadFiles], [loadFileTypes], [checksums]
            if uris is None or fileNames is None:
                # Slicer fails here too (len(None)): a source needs uris and fileNames
                raise TypeError("a sample data source needs uris and fileNames (also with a customDownloader)")
            if not len(uris) == len(fileNames) == len(nodeNames) == len(loadFiles) == len(loadFileTypes) == len(checksums):
                raise ValueError("All fields of sample data source must have the same length")
            self.uris, self.fileNames, self.nodeNames = list(uris), list(fileNames), list(nodeNames)
            self.loadFiles, self.loadFileTypes, self.checksums = list(loadFiles), list(loadFileTypes), list(checksums)
            self.customDownloader = customDownloader
            self.thumbnailFileName = thumbnailFileName
            self.loadFileProperties = loadFileProperties or {}

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                           nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                           loadFileTypes=None, loadFiles=None, loadFileProperties={},
                                           checksums=None, loadFileType=None):
            sources = SampleDataLogic.sampleDataSourcesByCategory()
            source = SampleDataSource(sampleName=sampleName, uris=uris, fileNames=fileNames, nodeNames=nodeNames,
                                      thumbnailFileName=thumbnailFileName, loadFileTypes=loadFileTypes,
                                      loadFileType=loadFileType, loadFiles=loadFiles,
                                      loadFileProperties=loadFileProperties, checksums=checksums,
                                      customDownloader=customDownloader)
            registered = sources.setdefault(category, [])
            if not any(s.sampleName == sampleName for s in registered):
                registered.append(source)

        @staticmethod
        def sampleDataSourcesByCategory(category=None):
            if not hasattr(slicer.modules, "sampleDataSources"):
                slicer.modules.sampleDataSources = {}
            if category is None:
                return slicer.modules.sampleDataSources
            return slicer.modules.sampleDataSources.get(category, [])

        def sourceForSampleName(self, sampleName):
            for sources in self.sampleDataSourcesByCategory().values():
                for source in sources:
                    if source.sampleName == sampleName:
                        return source
            return None

        def downloadSample(self, sampleName):
            return self.downloadSamples(sampleName)[0]

        def downloadSamples(self, sampleName):
            source = self.sourceForSampleName(sampleName)
            return self.downloadFromSource(source) if source else []

        def downloadFileIntoCache(self, uri, name):
            folder = Path(slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory())
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            if not path.exists() or path.stat().st_size == 0:
                try:
                    urllib.request.urlretrieve(uri, str(path))
                except OSError as exc:
                    raise ValueError(f"Failed to download {uri} to {path}") from exc
            return str(path)

        def loadNode(self, uri, name, fileType=None, fileProperties=None):
            import vtk  # noqa: PLC0415

            properties = dict(fileProperties or {}, fileName=uri)
            if name:
                properties["name"] = name
            io_manager = slicer.app.coreIOManager()
            loaded = vtk.vtkCollection()
            if not io_manager.loadNodes(fileType or io_manager.fileType(uri), properties, loaded) \
                    and loaded.GetNumberOfItems() < 1:
                return None
            for i in range(loaded.GetNumberOfItems()):
                node = loaded.GetItemAsObject(i)
                storage = node.GetStorageNode() if node.IsA("vtkMRMLStorableNode") else None
                if storage is not None:
                    slicer.mrmlScene.RemoveNode(storage)
                    node.SetAndObserveStorageNodeID(None)
            return loaded.GetItemAsObject(0) if loaded.GetNumberOfItems() else slicer.mrmlScene

        def downloadFromSource(self, source, maximumAttemptsCount=3):
            nodes, paths = [], []
            for uri, fileName, nodeName, loadFile, loadFileType in zip(
                    source.uris, source.fileNames, source.nodeNames, source.loadFiles, source.loadFileTypes):
                if nodeName is None:
                    nodeName = os.path.splitext(os.path.basename(fileName))[0]
                for _attempt in range(maximumAttemptsCount):
                    try:
                        path = self.downloadFileIntoCache(uri, fileName)
                    except ValueError:
                        continue
                    paths.append(path)
                    if loadFile is False:
                        nodes.append(path)
                        break
                    node = self.loadNode(path, nodeName, loadFileType, dict(source.loadFileProperties))
                    if node:
                        nodes.append(node)
                        break
                    os.remove(path)   # a failed load: fetched again on the next attempt
            return nodes or paths

    def downloadSample(sampleName):
        return SampleDataLogic().downloadSample(sampleName)

    def downloadSamples(sampleName):
        return SampleDataLogic().downloadSamples(sampleName)

    module.SampleDataSource = SampleDataSource
    module.SampleDataLogic = SampleDataLogic
    module.downloadSample = downloadSample
    module.downloadSamples = downloadSamples
    return module


# --------------------------------------------------------------------------------------------------
# the harness


class SlicerHarness:
    """Slicer's Python layer of ``version`` with the module loaded; see the module docstring.

    testing: ``slicer.app.testingEnabled()`` (ctest runs Slicer with --testing; an interactive
    "Reload and Test" runs without). main_window: give the application a main window, so message
    boxes are shown (recorded in ``qt_standins.QMessageBox.shown``) instead of only logged.
    """

    def __init__(self, version: str, testing: bool = True, main_window: bool = False,
                 module_path: Path = MODULE_DIR / f"{MODULE_NAME}.py", cache_dir: Path | None = None,
                 sample_data: Path | None = None):
        reason = missing_reason(version)
        if reason:
            raise RuntimeError(reason)
        self.version = version
        self.testing = testing
        self.main_window = main_window
        self.module_path = Path(module_path)
        #: Slicer's SampleData.py to import as ``SampleData`` (slicer_sample_data_source), else the stand-in
        self.sample_data = sample_data
        self._tmp = None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mf-slicer-")
            cache_dir = Path(self._tmp.name)
        self.cache_dir = Path(cache_dir)
        self._saved: dict = {}
        self._sys_path = None
        self._excepthook = None
        self._log_handler = None
        self._root_level = None
        self.slicer = None
        self.module = None
        #: exceptions raised in VTK observers and Qt slots: Slicer prints them and goes on, so the
        #: code that triggered them never sees them; tests check this list is empty
        self.callback_errors: list = []
        #: log records (INFO and up) while the harness runs: delayDisplay messages, errors shown...
        self.log_records: list = []

    # ---- setting up and tearing down

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    @staticmethod
    def _owned(name: str) -> bool:
        return name.split(".")[0] in _OWNED

    def start(self) -> None:
        self._saved = {n: m for n, m in sys.modules.items() if self._owned(n)}
        for name in self._saved:
            del sys.modules[name]
        self._sys_path = list(sys.path)
        self._excepthook = sys.excepthook
        sys.excepthook = self._record_callback_error
        self._log_handler = _ListHandler(self.log_records)
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(logging.INFO)
        root.addHandler(self._log_handler)
        qts.reset_state()
        qts.QSettings.store["Developer/SelfTestDisplayMessageDelay"] = "100"
        sys.modules["qt"] = qts.make_module("qt", qts.QT_CLASSES)
        sys.modules["ctk"] = qts.make_module("ctk", qts.CTK_CLASSES)
        if "imp" not in sys.modules and importlib.util.find_spec("imp") is None:
            # Slicer 5.8's slicer/__init__.py imports imp (removed in Python 3.12); Slicer 5.8 ships 3.9
            sys.modules["imp"] = types.SimpleNamespace(new_module=types.ModuleType)

        package_dir = slicer_python_root() / self.version / "slicer"
        kits = types.ModuleType("slicer.kits")
        kits.available_kits = ["slicer_core"]   # Slicer's generated kits.py lists its compiled kits
        sys.modules["slicer.kits"] = kits
        self._finder = _SlicerPackageFinder(package_dir)
        sys.meta_path.insert(0, self._finder)
        spec = self._finder.find_spec("slicer")
        slicer = importlib.util.module_from_spec(spec)
        sys.modules["slicer"] = slicer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # Slicer 5.8 imports imp
            spec.loader.exec_module(slicer)
        slicer.kits = kits
        self.slicer = slicer
        for name, cls in qts.MRML_WIDGET_CLASSES.items():
            setattr(slicer, name, cls)
        qts.QUiLoader.resolver = self.resolve_class

        self._make_scene()
        slicer.app = HarnessApp(self, self.testing, self.main_window)
        setattr(slicer.moduleNames, MODULE_NAME, MODULE_NAME)
        if self.sample_data is not None:
            load_source_as_module("SampleData", Path(self.sample_data))   # Slicer's own SampleData.py
        else:
            sys.modules["SampleData"] = _sample_data_module(slicer)
        self.module = load_source_as_module(MODULE_NAME, self.module_path)
        self.io_manager.register_scripted_readers(self.module, MODULE_NAME)
        module_object = ScriptedModule(self, MODULE_NAME, self.module_path)
        setattr(slicer.modules, MODULE_NAME.lower(), module_object)
        instance = getattr(self.module, MODULE_NAME)(module_object)
        setattr(slicer.modules, MODULE_NAME + "Instance", instance)
        slicer.app.startupCompleted.emit()

    def _make_scene(self) -> None:
        slicer = self.slicer
        scene = slicer.vtkMRMLScene()
        self.scene = scene
        slicer.mrmlScene = scene
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(scene)
        home = self.cache_dir / "slicer-home"           # no colour files to find there (and no error about it)
        (home / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
        self.app_logic.SetHomeDirectory(str(home))
        self.app_logic.SetShareDirectory("share")
        self._colour_logic = slicer.vtkSlicerColorLogic()   # Slicer's colour nodes (PET-Heat...)
        self._colour_logic.SetMRMLApplicationLogic(self.app_logic)
        self._colour_logic.SetMRMLScene(scene)
        self.app_logic.SetModuleLogic("Colors", self._colour_logic)
        # The scene's cache and data IO managers, as qSlicerCoreApplication sets them up
        # (Base/QTCore/qSlicerCoreApplication.cxx at v5.8.1: lines 649-654 and 1398): .mrb reading
        # and Sample Data's downloads use the remote cache directory (Slicer's cache folder)
        self._remote_io = slicer.vtkMRMLRemoteIOLogic()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / ".slicer-cache").touch()   # the sentinel vtkCacheManager (5.13) looks for
        self._remote_io.GetCacheManager().SetRemoteCacheDirectory(str(self.cache_dir))
        self._data_io_logic = slicer.vtkDataIOManagerLogic()
        self._data_io_logic.SetMRMLApplicationLogic(self.app_logic)
        self._data_io_logic.SetAndObserveDataIOManager(self._remote_io.GetDataIOManager())
        self.app_logic.SetMRMLSceneDataIO(scene, self._remote_io, self._data_io_logic)
        self._sh_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        self._sh_logic.SetMRMLScene(scene)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
        self.layout_manager = LayoutManager(slicer, scene)
        self.io_manager = CoreIOManager(slicer, scene, self.app_logic)
        self.module_manager = ModuleManager(self)
        import vtk  # noqa: PLC0415

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def add_subject_hierarchy_item(caller, event, node):
            # Slicer's subject hierarchy plugin logic (Qt) gives every new data node an item
            if node is None or node.GetHideFromEditors() or node.IsA("vtkMRMLSubjectHierarchyNode"):
                return
            if not (node.IsA("vtkMRMLStorableNode") or node.IsA("vtkMRMLTransformNode")):
                return
            sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
            if sh is not None and not sh.GetItemByDataNode(node):
                sh.CreateItem(sh.GetSceneItemID(), node)

        self._sh_tag = scene.AddObserver(scene.NodeAddedEvent, add_subject_hierarchy_item)

    def _record_callback_error(self, exc_type, exc, tb) -> None:
        import traceback  # noqa: PLC0415

        self.callback_errors.append("".join(traceback.format_exception(exc_type, exc, tb)))

    def _release_scene(self) -> None:
        """As the application quits: modules clean up (moduleAboutToBeUnloaded), node selectors let
        go of the scene, then every Python observer is removed, so nothing of this harness is called
        when the scene is finally deleted (possibly during a later test)."""
        scene = getattr(self, "scene", None)
        if scene is None:
            return
        try:
            if self.module is not None:
                self.module_manager.moduleAboutToBeUnloaded.emit(MODULE_NAME)
            module_object = getattr(self.slicer.modules, MODULE_NAME.lower(), None)
            representation = module_object._widget if module_object is not None else None
            if representation is not None:
                for selector in representation.findChildren(qts.qMRMLNodeComboBox):
                    selector.setMRMLScene(None)
        finally:
            for i in range(scene.GetNumberOfNodes()):
                scene.GetNthNode(i).RemoveAllObservers()
            scene.RemoveAllObservers()
            self.scene = None

    def stop(self) -> None:
        if self._excepthook is not None:
            sys.excepthook = self._excepthook
            self._excepthook = None
        self._release_scene()
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            logging.getLogger().setLevel(self._root_level)
            self._log_handler = None
        if getattr(self, "_finder", None) in sys.meta_path:
            sys.meta_path.remove(self._finder)
        for name in [n for n in sys.modules if self._owned(n)]:
            del sys.modules[name]
        sys.modules.update(self._saved)
        self._saved = {}
        if self._sys_path is not None:
            sys.path[:] = self._sys_path
        qts.QUiLoader.resolver = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ---- helpers for tests

    def resolve_class(self, name: str):
        """.ui class name -> stand-in class (Q* from qt, ctk* from ctk, qMRML*/qSlicer* from slicer)."""
        for module in (sys.modules["qt"], sys.modules["ctk"], self.slicer):
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                return cls
        raise RuntimeError(f"the .ui uses widget class {name}, which the harness does not provide")

    @property
    def app(self) -> HarnessApp:
        return self.slicer.app

    def module_object(self) -> ScriptedModule:
        return getattr(self.slicer.modules, MODULE_NAME.lower())

    def widget_representation(self) -> ScriptedModuleWidget:
        return self.module_object().widgetRepresentation()

    def widget(self, enter: bool = True):
        """The module's Python widget, set up (and entered, as when the user selects the module)."""
        representation = self.widget_representation()
        if enter and not representation.isEntered:
            representation.enter()
        return representation.self()

    def click_sample(self, sample_name: str):
        """What a click on a sample's button in the Sample Data module does: SampleDataWidget connects
        it to ``source.customDownloader(source)`` when the source has one, else to
        ``logic.downloadFromSource(source)`` (SampleData.py, v5.8.1 lines 392-395, main 454-457)."""
        logic = sys.modules["SampleData"].SampleDataLogic()
        source = logic.sourceForSampleName(sample_name)
        if source is None:
            raise LookupError(f"no sample data source named {sample_name!r} is registered")
        if source.customDownloader:
            return source.customDownloader(source)
        return logic.downloadFromSource(source)

    def import_scene(self, path) -> bool:
        """File > Add Data of a .mrml: the scene's nodes are added (singletons replaced)."""
        self.scene.SetURL(str(path))
        return bool(self.scene.Import())

    def save_scene(self, path) -> None:
        self.scene.SetURL(str(path))
        if not self.scene.Commit():
            raise RuntimeError(f"cannot write the scene to {path}")

    def save_scene_bundle(self, path) -> None:
        """File > Save as a Medical Reality Bundle (.mrb), the scene with every node's data, the
        way Slicer writes one: qSlicerSceneWriter::writeToMRB sets the scene's URL and root
        directory and calls ``vtkMRMLScene::WriteToMRB`` (Modules/Loadable/Data/qSlicerSceneWriter.cxx,
        v5.8.1 lines 155-190, main 154-189), which gives each storable node its default storage
        node (volumes: NRRD) and writes the data beside the .mrml, then zips the folder."""
        path = Path(path).resolve()
        self.scene.SetURL(str(path))
        self.scene.SetRootDirectory(str(path.parent))
        if not self.scene.WriteToMRB(str(path)):
            raise RuntimeError(f"cannot write the scene bundle {path}")

    def open_scene_bundle(self, path, clear: bool = True) -> bool:
        """File > Open of a .mrb, as qSlicerSceneBundleReader::load does: ``vtkMRMLScene::ReadFromMRB``
        (Base/QTCore/qSlicerSceneBundleReader.cxx line 103 at v5.8.1 and main) unpacks it and
        imports the .mrml, whose storage nodes read the data back."""
        return bool(self.scene.ReadFromMRB(str(Path(path).resolve()), clear))

    def messages(self, level: int = logging.INFO) -> list:
        return [r.getMessage() for r in self.log_records if r.levelno >= level]

    def nodes(self, class_name: str = "vtkMRMLNode") -> list:
        scene = self.scene
        return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]

    def node_ids(self) -> list:
        return [self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())]


class _ListHandler(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.INFO)
        self._records = records

    def emit(self, record) -> None:
        self._records.append(record)


# --------------------------------------------------------------------------------------------------
# installers that fail or are watched


def fake_python_slicer(folder: Path, exit_code: int = 1) -> Path:
    """A ``PythonSlicer`` executable in ``folder`` that fails like pip without network: put the folder
    first on PATH and Slicer's ``slicer.util.pip_install`` raises CalledProcessError, as it does then."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "PythonSlicer"
    script.write_text("#!/bin/sh\necho \"ERROR: Could not find a version that satisfies the requirement $*\"\n"
                      f"exit {int(exit_code)}\n", encoding="utf-8")
    script.chmod(0o755)
    return folder


def pytorch_utils_standin(installed: bool = False, install_result=None) -> types.ModuleType:
    """``PyTorchUtils`` of the PyTorch extension, recording how it is asked to install torch."""
    module = types.ModuleType("PyTorchUtils", "Stand-in for the PyTorch extension's PyTorchUtils")
    module.calls = []

    class PyTorchUtilsLogic:
        def torchInstalled(self) -> bool:
            return installed

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            module.calls.append({"askConfirmation": askConfirmation})
            return install_result

    module.PyTorchUtilsLogic = PyTorchUtilsLogic
    return module
