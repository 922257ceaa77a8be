#!/usr/bin/env python3
"""A real Orthanc PACS (with its DICOMweb plugin) on 127.0.0.1 in a temporary folder: for the PACS
tests (started once per test session, see Testing/Python/io/test_pacs.py), the PACS benchmark and the
walk-through in docs/PACS.md.

Orthanc and its DICOMweb plugin are Debian packages (``apt-get install orthanc orthanc-dicomweb``;
``make test`` installs them when run as root). The server gets its own configuration and storage
folder, an HTTP port chosen free on loopback (only local clients are let in:
RemoteAccessAllowed false), no DICOM (DIMSE) port, and, when a user and password are given, HTTP
basic authentication with that one account.

    python scripts/orthanc.py --load ../shared/data/sts      # until Ctrl-C; prints the DICOMweb URL
    MEDICALFUSION_PACS_USER=mf MEDICALFUSION_PACS_PASSWORD=... python scripts/orthanc.py --port 8042

As a library::

    with Orthanc(user="mf", password="s3cret") as pacs:
        pacs.upload(folder)                   # every DICOM file under it (REST POST /instances)
        pacs.dicomweb                         # http://127.0.0.1:PORT/dicom-web
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

PLUGIN_PLACES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so",
                 "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so")
APT_PACKAGES = ("orthanc", "orthanc-dicomweb")


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)),
                                           None)


def dicomweb_plugin() -> str | None:
    found = [p for p in PLUGIN_PLACES if os.path.exists(p)]
    if not found:
        found = sorted(str(p) for p in pathlib.Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    return found[0] if found else None


def missing() -> str | None:
    """Why Orthanc cannot be started here (None when it can)."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; make test does it as root)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc server process with a temporary configuration and storage (see module doc)."""

    def __init__(self, workdir: str | os.PathLike | None = None, user: str | None = None,
                 password: str | None = None, port: int | None = None, lua: str | None = None,
                 extra: dict | None = None):
        why = missing()
        if why:
            raise RuntimeError(why)
        self._own_workdir = workdir is None
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="medicalfusion-orthanc-"))
        self.user, self.password = user, password
        self.port = port or free_port()
        self.lua = lua
        self.extra = dict(extra or {})       # more configuration, e.g. SslEnabled + SslCertificate
        self.proc: subprocess.Popen | None = None
        self.root = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.root}/dicom-web"
        self.session = requests.Session()
        if user is not None:
            self.session.auth = (user, password or "")

    # ---- life ------------------------------------------------------------------------------------
    def config(self) -> dict:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "MedicalFusionTest", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.port, "RemoteAccessAllowed": False, "DicomServerEnabled": False,
            "HttpsCACertificates": "", "Plugins": [dicomweb_plugin()], "SaveJobs": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
            "AuthenticationEnabled": self.user is not None,
            "RegisteredUsers": {self.user: self.password or ""} if self.user is not None else {},
        }
        cfg.update(self.extra)
        if self.lua:
            script = self.workdir / "filter.lua"
            script.write_text(self.lua, encoding="utf-8")
            cfg["LuaScripts"] = [str(script)]
        return cfg

    def start(self, timeout: float = 60.0) -> Orthanc:
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=1), encoding="utf-8")
        self.log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([orthanc_binary(), str(path)], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc ended at start (exit {self.proc.returncode}); see {self.workdir}/orthanc.log")
            try:
                if self.session.get(f"{self.root}/system", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:g} s; see {self.workdir}/orthanc.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- contents --------------------------------------------------------------------------------
    def upload(self, *paths: str | os.PathLike) -> int:
        """Store every DICOM file under the given files/folders (REST POST /instances); returns the count."""
        n = 0
        for p in paths:
            p = pathlib.Path(p)
            files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
            for f in files:
                data = f.read_bytes()
                if data[128:132] != b"DICM":
                    continue
                r = self.session.post(f"{self.root}/instances", data=data, timeout=60)
                r.raise_for_status()
                n += 1
        return n

    def series_uids(self, study_uid: str | None = None) -> dict:
        """{SeriesInstanceUID: (StudyInstanceUID, number of instances, SeriesDescription)}."""
        out = {}
        for oid in self.session.get(f"{self.root}/series", timeout=30).json():
            info = self.session.get(f"{self.root}/series/{oid}", timeout=30).json()
            study = self.session.get(f"{self.root}/studies/{info['ParentStudy']}", timeout=30).json()
            st_uid = study["MainDicomTags"]["StudyInstanceUID"]
            if study_uid is None or st_uid == study_uid:
                out[info["MainDicomTags"]["SeriesInstanceUID"]] = (
                    st_uid, len(info["Instances"]), info["MainDicomTags"].get("SeriesDescription", ""))
        return out

    def delete_series(self, series_uid: str) -> None:
        found = self.session.post(f"{self.root}/tools/lookup", data=series_uid, timeout=30).json()
        for item in found:
            if item.get("Type") == "Series":
                self.session.delete(f"{self.root}/series/{item['ID']}", timeout=30).raise_for_status()


class TlsFront:
    """HTTPS in front of a local HTTP server: TLS with the given certificate on a free loopback
    port, every connection piped to ``127.0.0.1:backend_port``. (The Debian build of Orthanc 1.10
    crashes on its own SslEnabled connections here, so the HTTPS tests put this in front.)"""

    def __init__(self, backend_port: int, certfile: str, keyfile: str):
        import ssl  # noqa: PLC0415
        import threading  # noqa: PLC0415

        self.backend_port = backend_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(32)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._threading = threading
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                continue
            self._threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        import ssl  # noqa: PLC0415

        try:
            raw.settimeout(60)
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        import select  # noqa: PLC0415

        back = socket.create_connection(("127.0.0.1", self.backend_port), timeout=60)
        # Both directions in this one thread: an SSL socket must not be read in one thread while
        # another writes to it (OpenSSL's connection object is not thread-safe; two pipe threads
        # corrupted a response now and then: ChunkedEncodingError in the client).
        other = {tls: back, back: tls}
        try:
            while True:
                ready = [tls] if tls.pending() else select.select([tls, back], [], [], 60)[0]
                if not ready:
                    break                                   # idle for a minute
                data = b""
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        break
                    other[src].sendall(data)
                if not data:
                    break                                   # one side closed: close both
        except OSError:
            pass
        finally:
            for sock in (tls, back):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, help="HTTP port on 127.0.0.1 (default: a free one)")
    p.add_argument("--storage", help="folder for configuration and storage (default: a temporary one, removed)")
    p.add_argument("--load", nargs="*", default=[], help="folders of DICOM files to store at start")
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):     # Ctrl-C or kill PID stop Orthanc too (also in the background)
        signal.signal(sig, signal.default_int_handler)
    user, password = os.environ.get("MEDICALFUSION_PACS_USER"), os.environ.get("MEDICALFUSION_PACS_PASSWORD")
    with Orthanc(args.storage, user=user, password=password, port=args.port) as pacs:
        n = pacs.upload(*args.load) if args.load else 0
        print(f"Orthanc at {pacs.root} (DICOMweb root {pacs.dicomweb}); {n} instances loaded; "
              f"{'login from MEDICALFUSION_PACS_USER/PASSWORD' if user else 'no login'}; Ctrl-C stops it", flush=True)
        try:
            while pacs.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
