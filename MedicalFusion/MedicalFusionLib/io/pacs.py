"""A PACS as input and output: series pulled with DICOMweb WADO-RS and the fused series stored
with STOW-RS (dicomweb-client over requests), for ``medicalfusion fuse --pacs URL ...``.

- **Credentials** come from the environment (``MEDICALFUSION_PACS_USER``,
  ``MEDICALFUSION_PACS_PASSWORD``: HTTP basic authentication) or, when these are not set, from
  ``~/.netrc`` (requests' own lookup, the usual config file for HTTP credentials); never from the
  command line: a URL with ``user:password@`` is refused. They never appear in messages or logs
  (messages name the URL without credentials and say which variables to set).
- **HTTPS** certificates are verified (the system's CA store, or ``REQUESTS_CA_BUNDLE``) unless
  ``--insecure`` is given.
- **Failures** are one line each (:class:`FusionError`), raised before anything is stored: the
  PACS is down (connection refused, name not found), refuses (401/403), does not answer within
  ``--pacs-timeout`` seconds, does not hold the series, or returns a partial series (fewer
  instances than QIDO-RS lists, instances of another series, or a gap in the slice positions).
- **Retrieval**: QIDO-RS finds the series (its study and number of instances), WADO-RS retrieves
  it, the instances are written to a temporary folder and read by the same reader as any DICOM
  folder (read.read_source: HU, SUV, the series checks). The folder is removed afterwards.
- **Store**: the fused series is sent in requests of :data:`STORE_BATCH` instances. Every
  instance must be listed as stored in the STOW-RS answers; otherwise (a request refused, an
  instance failed, the connection lost half way) the instances already stored are removed again
  (DICOMweb DELETE where the server has it, else Orthanc's REST API) and the error says whether
  that worked, so no partial series is left behind silently.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import FusionError

USER_ENV, PASSWORD_ENV = "MEDICALFUSION_PACS_USER", "MEDICALFUSION_PACS_PASSWORD"
DEFAULT_TIMEOUT = 30.0
STORE_BATCH = 32
#: A gap between neighbouring slices larger than this many times the usual spacing: slices missing.
GAP_FACTOR = 1.5
logger = logging.getLogger(__name__)
# dicomweb-client's own log lines (e.g. "Resource could not be deleted") are not shown on the terminal
# next to our one-line messages (Python's last-resort handler would print them); an application
# that configures logging still gets them
logging.getLogger("dicomweb_client").addHandler(logging.NullHandler())


def _requests():
    try:
        import requests  # noqa: PLC0415
        from dicomweb_client.api import DICOMwebClient  # noqa: PLC0415
    except ImportError:  # pragma: no cover - dependencies of the package
        raise FusionError("--pacs needs dicomweb-client: pip install dicomweb-client") from None
    return requests, DICOMwebClient


def check_url(url: str) -> str:
    """The DICOMweb root as given, checked: http(s), a host, no credentials in it."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FusionError(f"--pacs '{shown_url(url)}' is not a DICOMweb URL: give e.g. http://127.0.0.1:8042/dicom-web")
    if parts.username or parts.password:
        raise FusionError(f"--pacs must not hold credentials: remove them from the URL and set {USER_ENV} and "
                          f"{PASSWORD_ENV} in the environment")
    return url.rstrip("/")


def shown_url(url: str) -> str:
    """The URL without any user:password part (for messages)."""
    try:
        parts = urllib.parse.urlsplit(url or "")
    except ValueError:
        return "(unparseable URL)"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")) or str(url)


def credentials() -> tuple[str, str] | None:
    """(user, password) from the environment, or None (then requests may read ~/.netrc)."""
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user is None and password is None:
        return None
    if not user or password is None:
        raise FusionError(f"set both {USER_ENV} and {PASSWORD_ENV} (or neither, for a PACS without a login)")
    return user, password


@dataclass
class StoredSeries:
    """What a store put on the PACS (to report it, or to remove it again)."""

    study_uid: str
    series_uid: str
    instances: list = field(default_factory=list)
    seconds: float = 0.0


class Pacs:
    """One DICOMweb server (see the module docstring)."""

    def __init__(self, url: str, insecure: bool = False, timeout: float = DEFAULT_TIMEOUT):
        requests, client_class = _requests()
        self.url = check_url(url)
        self.shown = shown_url(self.url)
        self.timeout = float(timeout)
        self.session = requests.Session()
        auth = credentials()
        if auth is not None:
            self.session.auth = auth
        self.session.verify = not insecure
        if insecure:
            # requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE override session.verify = False:
            # --insecure must win over them
            merge = self.session.merge_environment_settings

            def unverified(*args, **kwargs):
                settings = merge(*args, **kwargs)
                settings["verify"] = False
                return settings

            self.session.merge_environment_settings = unverified
            with contextlib.suppress(ImportError):
                import urllib3  # noqa: PLC0415

                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        limits = (min(self.timeout, 10.0), self.timeout)          # (connect, read) seconds
        request = self.session.request

        def with_timeout(method, url, **kwargs):                # every request has a time limit
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = limits
            return request(method, url, **kwargs)

        self.session.request = with_timeout
        try:
            self.client = client_class(self.url, session=self.session, timeout=limits)
        except TypeError:            # dicomweb-client < 0.61 (the last for Python 3.9): no timeout argument
            self.client = client_class(self.url, session=self.session)
        self.client.set_http_retry_params(retry=False)
        self._requests = requests

    # ---- errors ----------------------------------------------------------------------------------
    def _error(self, exc: BaseException, doing: str) -> FusionError:
        r = self._requests
        if isinstance(exc, r.exceptions.SSLError):
            why = ("its HTTPS certificate could not be verified: give the CA with REQUESTS_CA_BUNDLE, or --insecure "
                   "if you trust this server")
        elif isinstance(exc, r.exceptions.Timeout):
            why = f"it did not answer within {self.timeout:g} s (--pacs-timeout): check the server and the network"
        elif isinstance(exc, r.exceptions.ConnectionError):
            why = "it cannot be reached (connection refused or host not found): check --pacs and that the server runs"
        elif isinstance(exc, r.exceptions.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            if code in (401, 403):
                why = (f"it refused the login (HTTP {code}): set {USER_ENV} and {PASSWORD_ENV} to an account "
                       "that may read and store")
            elif code == 404:
                why = "it does not have it (HTTP 404): check the UID and the DICOMweb root URL"
            else:
                why = f"it answered HTTP {code} {exc.response.reason or ''}".rstrip()
        else:
            why = f"{type(exc).__name__}"
        return FusionError(f"PACS {self.shown}: {doing} failed: {why}")

    @contextlib.contextmanager
    def _talking(self, doing: str):
        from pydicom.errors import InvalidDicomError  # noqa: PLC0415

        try:
            yield
        except FusionError:
            raise
        except (self._requests.exceptions.RequestException, InvalidDicomError, ValueError) as exc:
            raise self._error(exc, doing) from None

    # ---- retrieval -------------------------------------------------------------------------------
    def find_series(self, series_uid: str) -> tuple[str, int | None]:
        """(StudyInstanceUID, number of instances or None) of a series, by QIDO-RS."""
        with self._talking(f"looking up series {series_uid}"):
            found = self.client.search_for_series(
                search_filters={"SeriesInstanceUID": series_uid},
                fields=["StudyInstanceUID", "NumberOfSeriesRelatedInstances"])
        if not found:
            raise FusionError(f"PACS {self.shown}: no series {series_uid}: check the UID (e.g. in the PACS viewer)")
        item = found[0]
        study = (item.get("0020000D", {}).get("Value") or [""])[0]
        count = (item.get("00201209", {}).get("Value") or [None])[0]
        if not study:
            raise FusionError(f"PACS {self.shown}: series {series_uid} is listed without its study UID")
        return str(study), (int(count) if count is not None else None)

    def retrieve_series(self, series_uid: str, folder: pathlib.Path, role: str) -> pathlib.Path:
        """Retrieve a whole series (WADO-RS) into ``folder`` (made here) and check it is whole."""
        study, count = self.find_series(series_uid)
        with self._talking(f"retrieving the {role} series {series_uid}"):
            datasets = self.client.retrieve_series(study, series_uid)
        check_whole(datasets, series_uid, count, f"PACS {self.shown}: the {role} series {series_uid}")
        folder.mkdir(parents=True, exist_ok=False)
        for n, ds in enumerate(datasets, start=1):
            from .dicom_export import dataset_bytes  # noqa: PLC0415

            (folder / f"{n:05d}.dcm").write_bytes(dataset_bytes(ds))
        return folder

    # ---- store -----------------------------------------------------------------------------------
    def store_series(self, datasets: Sequence, batch: int = STORE_BATCH) -> StoredSeries:
        """STOW-RS every dataset (one series); all of them stored, or none left (see module doc)."""
        if not datasets:
            raise FusionError("nothing to store")
        study, series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
        stored = StoredSeries(study, series)
        t0 = time.perf_counter()
        try:
            for start in range(0, len(datasets), batch):
                chunk = list(datasets[start:start + batch])
                with self._talking(f"storing the fused series {series}"):
                    answer = self.client.store_instances(chunk, study_instance_uid=study)
                ok = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}
                stored.instances += [str(ds.SOPInstanceUID) for ds in chunk if str(ds.SOPInstanceUID) in ok]
                failed = [ds for ds in chunk if str(ds.SOPInstanceUID) not in ok]
                if failed:
                    reasons = sorted({_failure_reason(item) for item in answer.get("FailedSOPSequence", [])}) or \
                        ["not listed as stored"]
                    raise FusionError(f"PACS {self.shown}: {len(failed)} of {len(datasets)} instances of the fused "
                                      f"series were not stored ({', '.join(reasons)})")
            held = self.count_instances(study, series)          # what the PACS really kept
            if held != len(datasets):
                raise FusionError(f"PACS {self.shown}: {len(datasets) - held} of {len(datasets)} instances of the "
                                  "fused series were not stored (the server acknowledged them but holds "
                                  f"{held}: a filter or a storage limit on the server?)")
        except (FusionError, KeyboardInterrupt) as exc:
            note = self.remove(stored) if stored.instances or isinstance(exc, KeyboardInterrupt) else "nothing was stored"
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise FusionError(f"{exc}; {note}") from None
        stored.seconds = time.perf_counter() - t0
        return stored

    def count_instances(self, study_uid: str, series_uid: str) -> int:
        """How many instances of a series the PACS lists (QIDO-RS)."""
        with self._talking(f"checking the stored series {series_uid}"):
            found = self.client.search_for_instances(study_uid, series_uid, fields=["SOPInstanceUID"], get_remaining=True)
        return len({(item.get("00080018", {}).get("Value") or [""])[0] for item in found})

    def remove(self, stored: StoredSeries) -> str:
        """Remove a series stored in part; returns what happened, for the message."""
        what = f"{len(stored.instances)} instance(s) of series {stored.series_uid}"
        try:
            self.client.delete_series(stored.study_uid, stored.series_uid)
            if self._series_gone(stored):
                return f"the {what} already stored were removed again"
        except (self._requests.exceptions.RequestException, ValueError, AttributeError):
            pass                     # no DICOMweb DELETE on this server (or in this dicomweb-client)
        try:
            if self._orthanc_delete(stored.series_uid) and self._series_gone(stored):
                return f"the {what} already stored were removed again (Orthanc REST API)"
        except (self._requests.exceptions.RequestException, ValueError):
            pass
        if self._series_gone(stored):
            return "nothing was left stored"
        return f"the {what} already stored could NOT be removed: delete that series on the PACS by hand"

    def _series_gone(self, stored: StoredSeries) -> bool:
        try:
            return not self.client.search_for_series(search_filters={"SeriesInstanceUID": stored.series_uid})
        except (self._requests.exceptions.RequestException, ValueError):
            return False

    def _orthanc_delete(self, series_uid: str) -> bool:
        """Delete a series through Orthanc's REST API (the DICOMweb root is .../dicom-web)."""
        root = self.url[: -len("/dicom-web")] if self.url.endswith("/dicom-web") else None
        if root is None:
            return False
        found = self.session.post(f"{root}/tools/lookup", data=series_uid, timeout=self.timeout)
        if found.status_code != 200:
            return False
        ids = [item["ID"] for item in found.json() if item.get("Type") == "Series"]
        for oid in ids:
            self.session.delete(f"{root}/series/{oid}", timeout=self.timeout).raise_for_status()
        return bool(ids)


def _failure_reason(item) -> str:
    reason = item.get("FailureReason", None)
    codes = {0x0110: "processing failure", 0x0122: "SOP class not supported", 0xA700: "out of resources",
             0xA900: "data set does not match SOP class", 0xC000: "cannot understand", 0x0124: "refused"}
    if reason is None:
        return "refused"
    try:
        return codes.get(int(reason), f"failure reason {int(reason):#06x}")
    except (TypeError, ValueError):
        return "refused"


def check_whole(datasets: Sequence, series_uid: str, expected: int | None, label: str) -> None:
    """FusionError when the retrieved instances are not one whole series: fewer than QIDO-RS
    listed, another series among them, or a gap in the slice positions along the normal."""
    if not datasets:
        raise FusionError(f"{label} came back empty: check the PACS")
    other = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets} - {series_uid}
    if other:
        raise FusionError(f"{label} came back with instances of another series: check the PACS")
    if expected is not None and len(datasets) < expected:
        raise FusionError(f"{label} came back partial: {len(datasets)} of {expected} instances; nothing was fused "
                          "(retry, or check the series on the PACS)")
    positions = []
    for ds in datasets:
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is None or iop is None or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            return                                        # no per-slice geometry to check
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        positions.append(float(np.dot(normal, np.asarray(ipp, float))))
    if len(positions) < 3:
        return
    steps = np.diff(np.sort(positions))
    usual = float(np.median(steps))
    if usual > 0 and float(steps.max()) > GAP_FACTOR * usual:
        raise FusionError(f"{label} came back partial: a gap of {steps.max():.3g} mm between two slices (usual "
                          f"{usual:.3g} mm) means slices are missing; nothing was fused (check the series on the PACS)")


# --------------------------------------------------------------------------------------------------
# the command line: fuse --pacs URL --anatomical-series UID --functional-series UID [--store]


def check_arguments(args) -> None:
    """The PACS and DICOM output arguments of ``fuse``, before any work."""
    pacs = getattr(args, "pacs", None)
    series = (getattr(args, "anatomical_series", None), getattr(args, "functional_series", None))
    if pacs:
        check_url(pacs)
        if not all(series):
            raise FusionError("--pacs needs --anatomical-series UID and --functional-series UID")
        if args.anatomical or args.functional:
            raise FusionError("give the inputs either as files (--anatomical, --functional) or as PACS series "
                              "(--pacs with --anatomical-series, --functional-series), not both")
        if series[0] == series[1]:
            raise FusionError("--anatomical-series and --functional-series are the same series: give two series")
        credentials()
    else:
        if any(series) or getattr(args, "store", False):
            raise FusionError("--anatomical-series, --functional-series and --store need --pacs URL")
        if not (args.anatomical and args.functional):
            raise FusionError("--anatomical and --functional are required (files or DICOM folders), or --pacs with "
                              "--anatomical-series and --functional-series")
    if not (getattr(args, "output", None) or getattr(args, "output_dicom", None) or getattr(args, "store", False)):
        raise FusionError("an output is required: -o FILE, --output-dicom FOLDER, or --store (with --pacs)")
    if getattr(args, "pacs_timeout", None) is not None and not args.pacs_timeout > 0:
        raise FusionError("--pacs-timeout must be more than 0 seconds")


@contextlib.contextmanager
def fuse_inputs(args):
    """(anatomical, functional) paths to read: the files given, or the PACS series retrieved into
    a temporary folder (removed when the block ends). Sets ``args.pacs_client`` and the retrieval
    time (``args.pacs_seconds``)."""
    if not getattr(args, "pacs", None):
        yield args.anatomical, args.functional
        return
    pacs = Pacs(args.pacs, insecure=args.insecure, timeout=args.pacs_timeout or DEFAULT_TIMEOUT)
    args.pacs_client = pacs
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="medicalfusion-pacs-"))
    try:
        t0 = time.perf_counter()
        anat = pacs.retrieve_series(args.anatomical_series, tmp / "anatomical", "anatomical")
        func = pacs.retrieve_series(args.functional_series, tmp / "functional", "functional")
        args.pacs_seconds = time.perf_counter() - t0
        yield str(anat), str(func)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_and_store(out, args, datasets) -> StoredSeries | None:
    """Store the fused series (--store), then put the local outputs in place; a local commit that
    fails removes the stored series again, so the run is all or nothing on both sides.
    ``args.before_store(datasets)``, when set (``batch``: a record of the series about to be
    stored, so that a run killed half way can be undone), runs just before the store."""
    stored = None
    if getattr(args, "store", False):
        before = getattr(args, "before_store", None)
        if before is not None:
            before(datasets)
        stored = args.pacs_client.store_series(datasets)
        args.pacs_stored = stored
    try:
        out.commit()
    except FusionError as exc:
        if stored is None:
            raise
        raise FusionError(f"{exc}; the fused series stored on the PACS: {args.pacs_client.remove(stored)}") from None
    except BaseException:
        if stored is not None:
            args.interrupt_note = f"nothing was written; the fused series stored on the PACS: " \
                                  f"{args.pacs_client.remove(stored)}"
        raise
    return stored
