"""The extension is ready for 3D Slicer's extension catalog (github.com/Slicer/ExtensionsIndex).

docs/extension-index/MedicalFusion.json is the entry to submit there (the index holds one
``<ExtensionName>.json`` per extension; it lives in docs/ because it is not part of the build). It is
validated against the catalog's JSON schema, read in place from ../shared/slicer-extensions-index
(or $MEDICALFUSION_EXTENSIONS_INDEX; skipped with the reason when absent), and checked the way the
index's own script checks an extension: an accepted category, a repository named Slicer*, a LICENSE,
the CMake metadata filled in, icon and screenshot URLs that point at images of this repository.
"""
from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[4]
ENTRY = REPO / "docs" / "extension-index" / "MedicalFusion.json"
SCHEMA_NAME = "slicer-extension-catalog-entry-schema-v1.0.2.json"
#: The catalog's accepted categories named in ../shared/slicer-extensions-index/README.md (the list
#: has about 45 more; these are the ones an extension like this one could use).
ACCEPTED_CATEGORIES = {"Analysis", "DICOM", "Filtering", "IGT", "Informatics", "Neuroimaging", "Nuclear Medicine",
                       "Planning", "Quantification", "Radiotherapy", "Registration", "Rendering", "Segmentation",
                       "Utilities"}
RAW_PREFIX = "https://raw.githubusercontent.com/"


def index_dir() -> Path:
    return Path(os.environ.get("MEDICALFUSION_EXTENSIONS_INDEX", REPO.parent / "shared" / "slicer-extensions-index"))


def cmake_metadata() -> dict:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    return dict(re.findall(r'^set\((EXTENSION_\w+) "([^"]*)"\)', text, flags=re.M))


def module_category() -> str:
    """The category MedicalFusion.py gives its module (translate("qSlicerAbstractCoreModule", ...))."""
    tree = ast.parse((REPO / "MedicalFusion" / "MedicalFusion.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                and node.targets[0].attr == "categories"):
            call = node.value.elts[0]
            assert isinstance(call, ast.Call) and call.func.id == "translate", "the category should be translated"
            return call.args[1].value
    raise AssertionError("MedicalFusion.py sets no module category")


def repository_path(url: str) -> Path:
    """A raw.githubusercontent.com URL of this repository's main branch -> the file in the checkout."""
    scm = json.loads(ENTRY.read_text(encoding="utf-8"))["scm_url"]
    owner_repo = scm.removeprefix("https://github.com/").removesuffix(".git")
    prefix = f"{RAW_PREFIX}{owner_repo}/main/"
    assert url.startswith(prefix), f"{url} is not a file of {scm} (main branch)"
    return REPO / url[len(prefix):]


def test_catalog_entry_is_valid_against_the_catalog_schema():
    schema_path = index_dir() / SCHEMA_NAME
    if not schema_path.is_file():
        pytest.skip(f"the catalog schema is not at {schema_path} (set MEDICALFUSION_EXTENSIONS_INDEX)")
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (pip install -e .[dev])")
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(entry))
    assert not errors, errors
    assert entry["$schema"].rstrip("#").endswith(SCHEMA_NAME)


def test_category_is_accepted_and_the_same_everywhere():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    assert entry["category"] in ACCEPTED_CATEGORIES
    assert cmake_metadata()["EXTENSION_CATEGORY"] == entry["category"] == module_category()


def test_repository_and_dependencies_match_the_cmake_metadata():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    meta = cmake_metadata()
    repo_name = entry["scm_url"].removesuffix(".git").rsplit("/", 1)[1]
    assert repo_name.startswith("Slicer"), "the catalog requires a repository named Slicer*"
    assert meta["EXTENSION_HOMEPAGE"].startswith(entry["scm_url"].removesuffix(".git"))
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    assert (REPO / "LICENSE").is_file()


def test_cmake_metadata_is_filled_in():
    meta = cmake_metadata()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert meta.get(key, "").strip() not in ("", "NA"), f"{key} is empty"
    assert "developers" not in meta["EXTENSION_CONTRIBUTORS"] and "(" in meta["EXTENSION_CONTRIBUTORS"]
    assert len(meta["EXTENSION_DESCRIPTION"]) > 100


def test_icon_and_screenshot_urls_are_images_of_this_repository():
    meta = cmake_metadata()
    icon = repository_path(meta["EXTENSION_ICONURL"])
    assert sitk.ReadImage(str(icon)).GetSize() == (128, 128)
    screenshots = meta["EXTENSION_SCREENSHOTURLS"].split()
    assert len(screenshots) >= 2
    for url in screenshots:
        path = repository_path(url)
        assert path.suffix == ".png" and path.is_file(), url
        assert path.stat().st_size < 300_000, f"{path.name} is large for a screenshot"
        image = sitk.ReadImage(str(path))
        assert image.GetNumberOfComponentsPerPixel() == 3 and min(image.GetSize()) >= 150
        assert path.parent == REPO / "docs" / "figures"


def shipped_scripts() -> list[Path]:
    """The Python files MedicalFusion/CMakeLists.txt ships (MODULE_PYTHON_SCRIPTS): the module file and
    what its GLOB_RECURSE patterns match, resolved here as CMake resolves them."""
    module_dir = REPO / "MedicalFusion"
    text = (module_dir / "CMakeLists.txt").read_text(encoding="utf-8")
    glob = re.search(r"file\(GLOB_RECURSE MODULE_LIB_SCRIPTS(.*?)\)", text, flags=re.S).group(1)
    patterns = [p.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "").replace("${MODULE_NAME}", "MedicalFusion")
                for p in glob.split() if p.startswith("${CMAKE_CURRENT_SOURCE_DIR}/")]
    assert patterns, "CMakeLists.txt globs no script"
    found = [module_dir / "MedicalFusion.py"]
    for pattern in patterns:
        folder, _, suffix = pattern.partition("/*")
        found += sorted((module_dir / folder).rglob("*" + suffix))
    return found


def test_the_extension_ships_the_core_and_not_the_tools():
    """Issue 21: evaluate, training, the hot-spot study and the cohort live in medicalfusion_tools/, which
    the Slicer extension does not ship; what it ships (the metrics package included) imports nothing
    of them (the CLI reaches them only through importlib when their command runs)."""
    shipped = shipped_scripts()
    names = {p.relative_to(REPO / "MedicalFusion").as_posix() for p in shipped}
    assert "MedicalFusionLib/metrics/__init__.py" in names and "MedicalFusionLib/metrics/torch_engine.py" in names
    assert "MedicalFusionLib/pipeline.py" in names and "MedicalFusionLib/cli.py" in names
    tools = REPO / "medicalfusion_tools"
    assert (tools / "evaluate.py").is_file() and (tools / "cohort.py").is_file() and (tools / "hotspot.py").is_file()
    assert (tools / "training" / "loop.py").is_file()
    for gone in ("evaluate.py", "hotspot.py", "cohort.py", "training", "metrics.py", "metrics_torch.py"):
        assert not (REPO / "MedicalFusion" / "MedicalFusionLib" / gone).exists(), f"MedicalFusionLib/{gone} is shipped"
    for path in shipped:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] == "medicalfusion_tools" for m in modules), \
                f"{path.relative_to(REPO)} imports {modules} (not shipped in the extension)"
