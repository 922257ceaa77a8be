"""``medicalfusion fuse --pacs URL --anatomical-series UID --functional-series UID --store``
against a real Orthanc with its DICOMweb plugin (scripts/orthanc.py: started once for the test
session on 127.0.0.1, in a temporary folder, with a login; never a mock), loaded with the three
sts patients (CT, PET, MR).

Checked: QIDO-RS + WADO-RS retrieval, fusion, STOW-RS store under the same study, the stored series
equal to the local -o output voxel for voxel, a slice rendered by the PACS (WADO-RS /rendered, what
a web viewer shows) equal to the fused slice and to a fusion of the same series read from disk (same
SUV/HU handling); credentials only from the environment and never printed; a PACS that is down,
refuses the login, does not answer in time, or holds a partial series: one line, nothing stored; a
store the PACS refuses half way (an Orthanc Lua filter rejects the fused slices after the second)
leaves no series behind; HTTPS verified (the same Orthanc behind a TLS front with a self-signed
certificate) unless --insecure or the CA is given.
"""
from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, data_root
from dicom_series import write_series
from test_faults import assert_one_line, cli

sys.path.insert(0, str(REPO / "scripts"))
import orthanc  # noqa: E402

STS = data_root() / "sts"
PATIENTS = ("STS_001", "STS_002", "STS_003")
REQUIRE = os.environ.get("MEDICALFUSION_REQUIRE_PACS") == "1"    # set by `make test`: fail, never skip
USER = "medicalfusion"
PASSWORD = "pw-" + secrets.token_hex(8)
REJECT_PATIENT = "MF-REJECT-HALF"
#: Orthanc refuses the fused (SC) slices of the test patient REJECT_PATIENT after the second one.
REJECT_LUA = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.PatientID == '{REJECT_PATIENT}' and dicom.SOPClassUID == '1.2.840.10008.5.1.4.1.1.7'
     and tonumber(dicom.InstanceNumber) > 2 then
    return false
  end
  return true
end
"""


def _need_orthanc():
    why = orthanc.missing()
    if why:
        (pytest.fail if REQUIRE else pytest.skip)(why)
    if not (STS / "STS_001" / "CT" / "dicom").is_dir():
        pytest.skip(f"the sts patients are not at {STS} (set MEDICALFUSION_DATA)")


@pytest.fixture(scope="session")
def pacs():
    """One Orthanc for the session, with a login, the reject filter and the three sts patients:
    yields (server, {patient: {modality: SeriesInstanceUID}})."""
    _need_orthanc()
    server = orthanc.Orthanc(user=USER, password=PASSWORD, lua=REJECT_LUA).start()
    try:
        series = {}
        for patient in PATIENTS:
            server.upload(*(STS / patient / m / "dicom" for m in ("CT", "PET", "MR_T1")))
        for uid, (_study, _n, description) in server.series_uids().items():
            patient = next(p for p in PATIENTS if p in description)
            modality = next(m for m in ("CT", "PET", "MR_T1") if f"_{m}_" in description)
            series.setdefault(patient, {})[modality] = uid
        yield server, series
    finally:
        server.stop()


@pytest.fixture
def login(monkeypatch):
    monkeypatch.setenv("MEDICALFUSION_PACS_USER", USER)
    monkeypatch.setenv("MEDICALFUSION_PACS_PASSWORD", PASSWORD)


def _fused_series(server, study_uid: str) -> dict:
    return {uid: v for uid, v in server.series_uids(study_uid).items() if v[2].startswith("Fused")}


def _download(server, series_uid: str, folder: pathlib.Path) -> sitk.Image:
    """The series as stored in Orthanc (REST, not the code under test), read by SimpleITK."""
    folder.mkdir()
    found = server.session.post(f"{server.root}/tools/lookup", data=series_uid, timeout=30).json()
    oid = next(item["ID"] for item in found if item["Type"] == "Series")
    for n, iid in enumerate(server.session.get(f"{server.root}/series/{oid}", timeout=30).json()["Instances"]):
        (folder / f"{n:04d}.dcm").write_bytes(server.session.get(f"{server.root}/instances/{iid}/file", timeout=30).content)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize("patient", PATIENTS)
def test_pull_fuse_store_lands_in_the_same_study(pacs, login, tmp_path, capfd, patient):
    server, series = pacs
    ct, pet = series[patient]["CT"], series[patient]["PET"]
    study = server.series_uids()[ct][0]
    before = set(server.series_uids(study))
    rc = __import__("MedicalFusionLib.cli", fromlist=["main"]).main(
        ["fuse", "--pacs", server.dicomweb, "--anatomical-series", ct, "--functional-series", pet, "-m", "lp",
         "--functional-preset", "pet-suv-0-10", "--store", "-o", str(tmp_path / "fused.nrrd"), "--threads", "1"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert PASSWORD not in out + err
    new = {uid: v for uid, v in server.series_uids(study).items() if uid not in before}
    assert len(new) == 1
    uid, (st, count, description) = next(iter(new.items()))
    assert st == study and count == len(list((STS / patient / "CT" / "dicom").glob("*.dcm"))) and description == "Fused PET/CT lp PET-Heat SUVbw 0-10"
    assert uid in out
    stored = _download(server, uid, tmp_path / "stored")
    fused = sitk.ReadImage(str(tmp_path / "fused.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(fused))
    ct_local = sitk.ReadImage(sorted(str(p) for p in (STS / patient / "CT" / "dicom").glob("*.dcm"))[0])
    np.testing.assert_allclose(stored.GetSpacing()[:2], ct_local.GetSpacing()[:2], atol=1e-5)
    # the same series fused from the local folders: the same picture (same reader, SUV and HU)
    rc, lines = cli(capfd, "fuse", "-a", STS / patient / "CT" / "dicom", "-f", STS / patient / "PET" / "dicom",
                    "-m", "lp", "--functional-preset", "pet-suv-0-10", "-o", tmp_path / "local.nrrd", "-q",
                    "--threads", "1")
    assert rc == 0, lines
    local = sitk.ReadImage(str(tmp_path / "local.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(local), sitk.GetArrayFromImage(fused))
    np.testing.assert_allclose(local.GetOrigin(), stored.GetOrigin(), atol=1e-4)
    # what a PACS viewer gets: the slice rendered by the server (WADO-RS /rendered) is the fused slice
    import io

    import pydicom
    from PIL import Image

    middle = sorted((tmp_path / "stored").iterdir())[count // 2]
    ds = pydicom.dcmread(str(middle), stop_before_pixels=True)
    rendered = server.session.get(f"{server.dicomweb}/studies/{study}/series/{uid}/instances/{ds.SOPInstanceUID}/rendered",
                                  headers={"Accept": "image/png"}, timeout=30)
    assert rendered.status_code == 200, rendered.status_code
    k = round(fused.TransformPhysicalPointToContinuousIndex([float(v) for v in ds.ImagePositionPatient])[2])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rendered.content)).convert("RGB")),
                          sitk.GetArrayFromImage(fused)[k])
    server.delete_series(uid)        # the next tests see the study as loaded


def test_slicer_scene_round_trip_pull_fuse_export_store(pacs, login, tmp_path):
    """Issue 22 item 3 as far as slicer-core allows: both series pulled from the PACS (WADO-RS) into
    folders, loaded into a real vtkMRMLScene (scene.load_dicom_volume), fused (fuse_nodes), exported
    from the fused node (scene_dicom.export_fused_node_dicom, what the panel's button calls) and
    stored back (STOW-RS): the PACS lists it in the CT's study, equal to the fused node."""
    slicer = pytest.importorskip("slicer")
    import pydicom
    from MedicalFusionLib.io import pacs as pacs_client
    from MedicalFusionLib import scene as sc
    from MedicalFusionLib import scene_dicom
    from MedicalFusionLib.pipeline import FusionOptions

    server, series = pacs
    ct_uid, pet_uid = series["STS_001"]["CT"], series["STS_001"]["PET"]
    study = server.series_uids()[ct_uid][0]
    client = pacs_client.Pacs(server.dicomweb)
    scene = slicer.vtkMRMLScene()
    colours = slicer.vtkSlicerColorLogic()
    colours.SetMRMLScene(scene)
    ct = sc.load_dicom_volume(scene, client.retrieve_series(ct_uid, tmp_path / "pulled" / "ct", "anatomical"))
    pet = sc.load_dicom_volume(scene, client.retrieve_series(pet_uid, tmp_path / "pulled" / "pet", "functional"))
    fused = sc.fuse_nodes(scene, ct, pet, FusionOptions(method="average", compute_metrics=False)).volume_node
    done = scene_dicom.export_fused_node_dicom(scene, fused, tmp_path / "export")
    assert done.study_instance_uid == study and not done.synthetic
    stored = client.store_series([pydicom.dcmread(str(f)) for f in done.files])
    try:
        assert (stored.study_uid, stored.series_uid) == (study, done.series_instance_uid)
        listed = _fused_series(server, study)
        assert listed[done.series_instance_uid][1] == len(done.files)
        back = _download(server, done.series_instance_uid, tmp_path / "stored")
        assert np.array_equal(sitk.GetArrayFromImage(back), slicer.util.arrayFromVolume(fused))
        np.testing.assert_allclose(back.GetOrigin(), sc.image_from_node(ct).GetOrigin(), atol=1e-4)
    finally:
        server.delete_series(done.series_instance_uid)        # the next tests see the study as loaded


def test_output_dicom_alongside_store_and_mr_as_anatomical(pacs, login, tmp_path, capfd):
    server, series = pacs
    mr, pet = series["STS_002"]["MR_T1"], series["STS_002"]["PET"]
    study = server.series_uids()[mr][0]
    rc, lines = cli(capfd, "fuse", "--pacs", server.dicomweb, "--anatomical-series", mr, "--functional-series", pet,
                    "-m", "lp", "--store", "--output-dicom", tmp_path / "dcm", "--threads", "1")
    assert rc == 0, lines
    fused = _fused_series(server, study)
    assert len(fused) == 1 and next(iter(fused.values()))[2].startswith("Fused PET/MR lp PET-Heat SUVbw")
    uid = next(iter(fused))
    import pydicom

    local = {pydicom.dcmread(str(p), stop_before_pixels=True).SeriesInstanceUID for p in (tmp_path / "dcm").iterdir()}
    assert local == {uid}                    # the folder holds the very series that was stored
    server.delete_series(uid)


# --------------------------------------------------------------------------------------------------
# credentials


def test_credentials_in_the_url_are_refused_and_not_shown(pacs, tmp_path, capfd):
    server, series = pacs
    url = server.dicomweb.replace("http://", f"http://{USER}:{PASSWORD}@")
    rc, lines = cli(capfd, "fuse", "--pacs", url, "--anatomical-series", series["STS_001"]["CT"],
                    "--functional-series", series["STS_001"]["PET"], "--store")
    assert_one_line(rc, lines, "must not hold credentials", "MEDICALFUSION_PACS_USER")
    assert PASSWORD not in lines[0]


@pytest.mark.parametrize("password", [None, "wrong-" + secrets.token_hex(4)], ids=["no-login", "wrong-password"])
def test_a_refused_login_is_one_line_and_nothing_is_stored(pacs, tmp_path, capfd, monkeypatch, password):
    server, series = pacs
    if password is None:
        monkeypatch.delenv("MEDICALFUSION_PACS_USER", raising=False)
        monkeypatch.delenv("MEDICALFUSION_PACS_PASSWORD", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))          # no ~/.netrc either
    else:
        monkeypatch.setenv("MEDICALFUSION_PACS_USER", USER)
        monkeypatch.setenv("MEDICALFUSION_PACS_PASSWORD", password)
    before = server.series_uids()
    rc, lines = cli(capfd, "fuse", "--pacs", server.dicomweb, "--anatomical-series", series["STS_001"]["CT"],
                    "--functional-series", series["STS_001"]["PET"], "--store", "-o", tmp_path / "o.nrrd")
    assert_one_line(rc, lines, "refused the login (HTTP 401)", "MEDICALFUSION_PACS_PASSWORD")
    assert password is None or password not in lines[0]
    assert server.series_uids() == before and not (tmp_path / "o.nrrd").exists()


# --------------------------------------------------------------------------------------------------
# a PACS that is down, silent, or holds a partial series


def test_a_pacs_that_is_down_is_one_line(login, tmp_path, capfd):
    port = orthanc.free_port()                     # nothing listens there
    rc, lines = cli(capfd, "fuse", "--pacs", f"http://127.0.0.1:{port}/dicom-web", "--anatomical-series", "1.2.3",
                    "--functional-series", "1.2.4", "--store", "-o", tmp_path / "o.nrrd")
    assert_one_line(rc, lines, "cannot be reached")
    assert not (tmp_path / "o.nrrd").exists()


def test_a_pacs_that_does_not_answer_times_out_in_one_line(login, tmp_path, capfd):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)                             # accepts connections, never answers
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        rc, lines = cli(capfd, "fuse", "--pacs", f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web",
                        "--anatomical-series", "1.2.3", "--functional-series", "1.2.4", "--store",
                        "--pacs-timeout", "1")
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        listener.close()
    assert_one_line(rc, lines, "did not answer within 1 s")


def test_an_unknown_series_is_one_line(pacs, login, capfd):
    server, series = pacs
    rc, lines = cli(capfd, "fuse", "--pacs", server.dicomweb, "--anatomical-series", "1.2.826.0.1.3680043.8.498.1",
                    "--functional-series", series["STS_001"]["PET"], "--store")
    assert_one_line(rc, lines, "no series 1.2.826.0.1.3680043.8.498.1")


def _synthetic_study(folder: pathlib.Path, patient_id: str, drop_slice: int | None = None):
    """A CT and a PET series of one study (int16), written with pydicom; returns (ct_uid, pet_uid)."""
    import pydicom

    study = pydicom.uid.generate_uid()
    z, y, x = np.mgrid[0:40, 0:24, 0:20]
    ct = (50 * np.sin(x / 3.0) + 40 * np.cos(y / 4.0) + z).astype(np.int16)
    pet = (1000 * np.exp(-((x - 10) ** 2 + (y - 12) ** 2 + (z - 20) ** 2) / 60.0)).astype(np.int16)
    common = {"PatientID": patient_id, "PatientName": "TEST^PACS", "StudyInstanceUID": study}
    ct_files = write_series(folder / "ct", ct, "CT", fields=common)
    write_series(folder / "pet", pet, "PT", fields={**common, "Units": "GML"})
    if drop_slice is not None:
        ct_files[drop_slice].unlink()
    read = lambda f: pydicom.dcmread(str(next((folder / f).iterdir())), stop_before_pixels=True)  # noqa: E731
    return study, read("ct").SeriesInstanceUID, read("pet").SeriesInstanceUID


def test_a_partial_series_is_refused_before_fusing(pacs, login, tmp_path, capfd):
    server, _series = pacs
    study, ct, pet = _synthetic_study(tmp_path, "MF-PARTIAL", drop_slice=17)
    server.upload(tmp_path / "ct", tmp_path / "pet")
    rc, lines = cli(capfd, "fuse", "--pacs", server.dicomweb, "--anatomical-series", ct, "--functional-series", pet,
                    "--store", "-o", tmp_path / "o.nrrd")
    assert_one_line(rc, lines, "the anatomical series", "came back partial", "gap")
    assert not _fused_series(server, study) and not (tmp_path / "o.nrrd").exists()


def test_a_store_refused_half_way_leaves_no_series(pacs, login, tmp_path, capfd):
    server, _series = pacs
    study, ct, pet = _synthetic_study(tmp_path, REJECT_PATIENT)
    server.upload(tmp_path / "ct", tmp_path / "pet")
    rc, lines = cli(capfd, "fuse", "--pacs", server.dicomweb, "--anatomical-series", ct, "--functional-series", pet,
                    "-m", "lp", "--store", "-o", tmp_path / "o.nrrd", "--output-dicom", tmp_path / "dcm")
    assert_one_line(rc, lines, "instances of the fused series were not stored", "removed again")
    assert not _fused_series(server, study)
    assert not (tmp_path / "o.nrrd").exists() and not (tmp_path / "dcm").exists()


# --------------------------------------------------------------------------------------------------
# HTTPS


@pytest.fixture(scope="session")
def https_pacs(pacs, tmp_path_factory):
    """The session's Orthanc behind HTTPS with a self-signed certificate for 127.0.0.1
    (orthanc.TlsFront): yields (DICOMweb URL, CA file)."""
    if shutil.which("openssl") is None:
        (pytest.fail if REQUIRE else pytest.skip)("openssl is needed to make a test certificate")
    server, _series = pacs
    folder = tmp_path_factory.mktemp("https")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    front = orthanc.TlsFront(server.port, str(cert), str(key))
    try:
        yield f"https://127.0.0.1:{front.port}/dicom-web", cert
    finally:
        front.close()


def test_https_is_verified_unless_insecure(pacs, https_pacs, login, tmp_path, capfd, monkeypatch):
    _server, series = pacs
    url, cert = https_pacs
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    args = ["fuse", "--pacs", url, "--anatomical-series", series["STS_003"]["CT"], "--functional-series",
            series["STS_003"]["PET"], "-m", "lp", "--threads", "1"]
    rc, lines = cli(capfd, *args, "-o", tmp_path / "a.nrrd")
    assert_one_line(rc, lines, "certificate could not be verified", "--insecure")
    assert not (tmp_path / "a.nrrd").exists()
    rc, lines = cli(capfd, *args, "-o", tmp_path / "b.nrrd", "--insecure", "-q")
    assert rc == 0, lines
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    rc, lines = cli(capfd, *args, "-o", tmp_path / "c.nrrd", "-q")
    assert rc == 0, lines


# --------------------------------------------------------------------------------------------------
# arguments (no PACS needed: refused before any work)


@pytest.mark.parametrize("args, expected", [
    (["--store", "-a", "a.nrrd", "-f", "f.nrrd"], "need --pacs URL"),
    (["--anatomical-series", "1.2.3", "-a", "a.nrrd", "-f", "f.nrrd", "-o", "o.nrrd"], "need --pacs URL"),
    (["--pacs", "http://127.0.0.1:9/dicom-web", "--anatomical-series", "1.2.3", "--store"],
     "--pacs needs --anatomical-series UID and --functional-series UID"),
    (["--pacs", "http://127.0.0.1:9/dicom-web", "--anatomical-series", "1.2.3", "--functional-series", "1.2.4",
      "-a", "a.nrrd", "--store"], "not both"),
    (["--pacs", "http://127.0.0.1:9/dicom-web", "--anatomical-series", "1.2.3", "--functional-series", "1.2.3",
      "--store"], "the same series"),
    (["--pacs", "ftp://127.0.0.1/dicom-web", "--anatomical-series", "1.2.3", "--functional-series", "1.2.4",
      "--store"], "is not a DICOMweb URL"),
    (["--pacs", "http://127.0.0.1:9/dicom-web", "--anatomical-series", "1.2.3", "--functional-series", "1.2.4"],
     "an output is required"),
], ids=["store-without-pacs", "series-without-pacs", "one-series", "files-and-pacs", "same-series", "not-http",
        "no-output"])
def test_pacs_argument_mistakes_are_one_line(capfd, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    rc, lines = cli(capfd, "fuse", *args)
    assert_one_line(rc, lines, expected)
    assert os.listdir(tmp_path) == []
