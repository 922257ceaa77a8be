"""Writing results: one transaction for every file a run writes, and the result files' contents.

Every output of a run (fused volume with every file of a multi-file format, metrics CSV, preview
PNG, evaluation tables and montages, demo sample files, trained weights, a saved transform...) goes
through one :class:`OutputSet`::

    with OutputSet(inputs=[anatomical_path, functional_path]) as out:
        fused = out.claim(args.output, "output", kind="image")     # checked before any work
        table = out.claim(args.metrics, "metrics file")            # (optional: add_* claims too)
        ...                                                        # the work
        out.add_image(fused, image)                 # written now, to a temporary beside the target
        out.add_text(table, csv_text)
        out.add_file(path, lambda tmp: sitk.WriteTransform(t, str(tmp)), "transform file")
        out.commit()                                # every temporary renamed into place, together
    # leaving the block without commit() (an error, Ctrl-C, SIGTERM) removes every temporary

What it guarantees:

- :meth:`OutputSet.claim` refuses, before any work: an output that is an input or any file of one
  (same file by identity: hard links, symbolic links, another spelling on a case-insensitive file
  system; every file of a multi-file image such as .hdr/.img, .mhd/.raw, .nhdr/.raw.gz; the files
  of a DICOM folder, and any new file inside an input folder); two outputs that name the same file
  (names compared case-insensitively, all files of multi-file formats); a folder, FIFO or device
  as target; a missing or read-only folder; an extension the writer cannot write; a name longer
  than the file system allows.
- ``add_*`` write at once to a temporary ``.mf-tmp-XXXXXXXX<ext>`` in the target's folder (a short
  name, so any valid target name works) and check what was written: its size (text, bytes) or,
  for images, the file's completeness against its header (:func:`files.check_image_file`) and a
  read-back compared voxel for voxel (lossy JPEG: its size). A failed or short write (disk full,
  file size limit) raises FusionError with the cause, whatever ITK printed. Multi-file formats
  are written under the temporary name and their headers are rewritten to name the final data
  file before anything is put in place.
- :meth:`OutputSet.commit` renames every temporary into place with SIGINT/SIGTERM/SIGHUP held
  back; a target that existed is kept (hard link) until every rename succeeded and is restored if
  one fails. After an error or a signal, :meth:`OutputSet.abort` (run by the ``with`` block)
  removes every temporary and every folder the set made, so "nothing was written" is true.

For tests only: when ``$MEDICALFUSION_TEST_PAUSE_AT`` names a point, or several separated by
commas (``write:<what>`` after a temporary is written, ``commit`` before the renames,
``commit:held`` with signals held back just before them), the process writes its pid and the point's name to
``$MEDICALFUSION_TEST_PAUSE_FILE`` and sleeps there (until a signal held back arrives or the
test removes that file), so a test can send it a signal at that exact point. The CLI has two
more: ``start`` (before the arguments are parsed) and ``exit`` (after the run, before the
interpreter's shutdown).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import pathlib
import secrets
import shutil
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import FusionError
from .files import _name_max, _os_error_reason, _path_max, check_image_file, display_path, extension, source_files
from .read import native_quiet

#: Extensions the fused result may be written to: volumes (and 2D images) ...
IMAGE_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".hdr", ".img", ".img.gz", ".mha", ".mhd", ".tif", ".tiff")
#: ... and 2D pictures (one slice only).
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")
#: gzip level of compressed outputs (.nrrd, .nii.gz, .mha): 1, the fastest. On a 256x256x180 RGB
#: fusion: 0.20 s of CPU and 17.8 MB, against 0.36 s and 15.4 MB at ITK's default (2); any reader
#: of gzip reads it (docs/BENCHMARKS.md, "Speed of the metrics and the write").
COMPRESSION_LEVEL = 1
TEMP_PREFIX = ".mf-tmp-"
BACKUP_PREFIX = ".mf-bak-"
PAUSE_ENV, PAUSE_FILE_ENV = "MEDICALFUSION_TEST_PAUSE_AT", "MEDICALFUSION_TEST_PAUSE_FILE"
_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (weights' checksums, a cohort study's done marker)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_held: list = []        # signals that arrived while held back by signals_held()


def pause_point(name: str) -> None:
    """Test hook: sleep here when ``$MEDICALFUSION_TEST_PAUSE_AT`` is ``name`` (see module doc)."""
    if name not in os.environ.get(PAUSE_ENV, "").split(","):
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        pathlib.Path(marker).write_text(f"{os.getpid()} {name}", encoding="utf-8")
    deadline = time.monotonic() + 60.0
    # a held-back signal ends the pause too, and so does the test removing the marker file
    while time.monotonic() < deadline and not _held and (not marker or os.path.exists(marker)):
        time.sleep(0.02)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT/SIGTERM/SIGHUP back for the block: they are recorded and raised again, to the
    handlers that were in place, when the block ends. (Python-level handlers, so it works whichever
    thread the OS delivers the signal to; outside the main thread it does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def defer(signum, _frame):
        _held.append(signum)

    previous = {}
    for sig in _SIGNALS:
        handler = signal.getsignal(sig)
        if handler in (signal.SIG_IGN, None):
            continue
        previous[sig] = signal.signal(sig, defer)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _held:
            signum = _held[0]
            del _held[:]
            signal.raise_signal(signum)


def image_members(path: str | os.PathLike, compress: bool = True) -> list[pathlib.Path]:
    """The files SimpleITK writes for an image at ``path`` (two for .hdr/.img, .mhd, .nhdr)."""
    p = pathlib.Path(path)
    ext = extension(p)
    pairs = {".hdr": (".hdr", ".img"), ".img": (".hdr", ".img"), ".img.gz": (".hdr.gz", ".img.gz"),
             ".mhd": (".mhd", ".zraw" if compress else ".raw"), ".nhdr": (".nhdr", ".raw.gz" if compress else ".raw")}
    if ext not in pairs:
        return [p]
    stem, upper = p.name[: len(p.name) - len(ext)], p.name[len(p.name) - len(ext):].isupper()
    return [p.with_name(stem + (e.upper() if upper else e)) for e in pairs[ext]]


def _identity(path: pathlib.Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _name_key(path: pathlib.Path):
    parent = _identity(path.parent) or str(path.parent.resolve())
    return parent, os.path.normcase(path.name).casefold()


def _free_bytes(folder: pathlib.Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _size_limit() -> int | None:
    try:
        import resource  # noqa: PLC0415  (POSIX only)

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return None if soft == resource.RLIM_INFINITY else int(soft)
    except (ImportError, OSError, ValueError):
        return None


@dataclass
class _Claim:
    path: pathlib.Path
    what: str
    members: list


@dataclass
class _Staged:
    claim: _Claim
    folder: pathlib.Path
    stem: str                                    # the temporaries are folder/stem* (one or more files)
    moves: list = field(default_factory=list)    # (temporary, final) pairs once written and checked


class OutputSet:
    """All output files of one run, written to temporaries and put in place together (see the
    module docstring). Use as a context manager; call :meth:`commit` at the end of the block."""

    def __init__(self, inputs=()):
        """``inputs``: paths no output may touch, or a dict ``{label: path}`` (labels such as
        'anatomical input' are named in errors)."""
        self._protected: dict = {}         # identity -> (label, input path)
        self._input_folders: dict = {}     # identity of an input folder -> (label, its path)
        self._claims: list[_Claim] = []
        self._staged: list[_Staged] = []
        self._made_folders: list[pathlib.Path] = []
        self.committed = False
        self.written: list[pathlib.Path] = []
        labelled = inputs.items() if isinstance(inputs, dict) else (("input", p) for p in inputs)
        for label, p in labelled:
            if p:
                self.protect(p, label)

    # ---- context manager -----------------------------------------------------------------------
    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.committed:
            self.abort()
        return False

    # ---- checks --------------------------------------------------------------------------------
    def protect(self, path: str | os.PathLike, label: str = "input") -> None:
        """Add an input (and every file it is made of) that no output may touch."""
        p = pathlib.Path(path)
        for member in source_files(p):
            ident = _identity(member)
            if ident is not None:
                self._protected.setdefault(ident, (label, p))
        if p.is_dir() and _identity(p) is not None:
            self._input_folders[_identity(p)] = (label, p)

    def _check_member(self, member: pathlib.Path, what: str, shown: str) -> None:
        name_max = _name_max(member.parent)
        if len(os.fsencode(member.name)) > name_max:
            raise FusionError(f"{what} {shown}: the file name {display_path(member.name, 60)} is "
                              f"{len(os.fsencode(member.name))} bytes, longer than this file system allows "
                              f"({name_max}): choose a shorter name")
        parent = _identity(member.parent)
        if parent in self._input_folders:
            label, folder = self._input_folders[parent]
            raise FusionError(f"{what} {shown} would be written into the folder of the {label} "
                              f"{display_path(folder)}: choose another folder (inputs are never changed)")
        try:
            st = os.stat(member)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise FusionError(f"{what} {shown} cannot be used: {_os_error_reason(exc)}") from None
        if (st.st_dev, st.st_ino) in self._protected:
            label, original = self._protected[(st.st_dev, st.st_ino)]
            via = "" if os.path.abspath(member) == os.path.abspath(original) else f" (through {display_path(member)})"
            raise FusionError(f"{what} {shown} would overwrite the {label} {display_path(original)}{via}: "
                              "choose another path (inputs are never overwritten)")
        if stat.S_ISDIR(st.st_mode):
            raise FusionError(f"{what} {shown} is a folder: give a file name such as fused.nrrd")
        if not stat.S_ISREG(st.st_mode):
            raise FusionError(f"{what} {shown}: {display_path(member)} exists and is not a regular file: "
                              "choose another path")
        if not os.access(member, os.W_OK):
            raise FusionError(f"{what} {shown} exists and is read-only: choose another path or make it writable")

    def claim(self, path: str | os.PathLike, what: str = "output", kind: str = "file",
              compress: bool = True) -> pathlib.Path:
        """Check an output path before any work and reserve it for this set; returns it.

        ``kind``: 'image' (a volume or 2D image: :data:`IMAGE_EXTENSIONS` or
        :data:`PICTURE_EXTENSIONS`), 'picture' (2D only) or 'file' (any name)."""
        if path is None or not str(path):
            raise FusionError(f"{what} is an empty path: give a file name")
        p = pathlib.Path(path)
        shown = display_path(p)
        if len(os.fsencode(os.path.abspath(p))) >= _path_max():
            raise FusionError(f"{what} {shown}: the path is longer than this system allows ({_path_max()} bytes): "
                              "choose a shorter one")
        if os.path.isdir(p):
            raise FusionError(f"{what} {shown} is a folder: give a file name such as fused.nrrd")
        parent = p.parent
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            raise FusionError(f"the folder of {what} {shown} does not exist: create it or choose another path") from None
        except OSError as exc:
            raise FusionError(f"the folder of {what} {shown} cannot be used: {_os_error_reason(exc)}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise FusionError(f"the folder of {what} {shown} is not a folder: choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise FusionError(f"{what} {shown} is not writable: choose a folder you can write to")
        members = image_members(p, compress) if kind in ("image", "picture") else [p]
        for m in members:
            self._check_member(m, what, shown)
        ext = extension(p)
        allowed = {"image": tuple(dict.fromkeys(IMAGE_EXTENSIONS + PICTURE_EXTENSIONS)),
                   "picture": PICTURE_EXTENSIONS}.get(kind)
        if allowed is not None and ext not in allowed:
            told = f": cannot write '{ext}' files" if ext else " has no file extension"
            raise FusionError(f"{what} {shown}{told}: use one of {', '.join(allowed)}")
        keys = {_name_key(m) for m in members}
        for c in self._claims:
            if keys & {_name_key(m) for m in c.members}:
                raise FusionError(f"{what} {shown} and {c.what} {display_path(c.path)} name the same file: "
                                  "give each output its own name")
        self._claims.append(_Claim(p, what, members))
        return p

    def folder(self, path: str | os.PathLike, what: str = "output folder") -> pathlib.Path:
        """An output folder: made (with missing parents) if needed and removed again by
        :meth:`abort` when this set made it; refused when it is a file or an input folder."""
        p = pathlib.Path(path)
        shown = display_path(p)
        if len(os.fsencode(os.path.abspath(p))) >= _path_max():
            raise FusionError(f"{what} {shown}: the path is longer than this system allows: choose a shorter one")
        missing = []
        q = p
        while True:
            try:
                st = os.stat(q)
            except FileNotFoundError:
                missing.append(q)
                if q.parent == q:
                    break
                q = q.parent
                continue
            except OSError as exc:
                raise FusionError(f"{what} {shown} cannot be used: {_os_error_reason(exc)}") from None
            if not stat.S_ISDIR(st.st_mode):
                where = "is" if q == p else f"is inside {display_path(q)}, which is"
                raise FusionError(f"{what} {shown} {where} a file, not a folder: give a folder")
            if not os.access(q, os.W_OK | os.X_OK):
                raise FusionError(f"{what} {shown} is not writable: choose a folder you can write to")
            break
        if _identity(p) in self._input_folders or _identity(p) in self._protected or \
                any(_identity(m.parent) in self._input_folders for m in missing):
            raise FusionError(f"{what} {shown} is or would be inside an input folder: choose another folder")
        for m in reversed(missing):
            try:
                os.mkdir(m)
            except OSError as exc:
                raise FusionError(f"{what} {shown} cannot be made: {_os_error_reason(exc)}") from None
            self._made_folders.append(m)
        return p

    def claim_folder(self, path: str | os.PathLike, what: str = "output folder") -> pathlib.Path:
        """Check a folder output (a DICOM series) before any work: its parent exists and is
        writable; the folder itself does not exist yet or is empty; not an input or inside one."""
        if path is None or not str(path):
            raise FusionError(f"{what} is an empty path: give a folder name")
        p = pathlib.Path(path)
        shown = display_path(p)
        if len(os.fsencode(os.path.abspath(p))) >= _path_max():
            raise FusionError(f"{what} {shown}: the path is longer than this system allows: choose a shorter one")
        if not p.parent.is_dir():
            raise FusionError(f"the folder of {what} {shown} does not exist: create it or choose another path")
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise FusionError(f"{what} {shown} is not writable: choose a folder you can write to")
        if os.path.lexists(p):
            if not p.is_dir() or p.is_symlink():
                raise FusionError(f"{what} {shown} exists and is not a folder: give a new or empty folder")
            try:
                if os.listdir(p):
                    raise FusionError(f"{what} {shown} is not empty: give a new or empty folder "
                                      "(a DICOM series is written as a folder of its own)")
            except OSError as exc:
                raise FusionError(f"{what} {shown} cannot be used: {_os_error_reason(exc)}") from None
        ident = _identity(p)
        if ident in self._input_folders or ident in self._protected or _identity(p.parent) in self._input_folders:
            raise FusionError(f"{what} {shown} is or would be inside an input folder: choose another folder")
        key = _name_key(p)
        for c in self._claims:
            if key in {_name_key(m) for m in c.members}:
                raise FusionError(f"{what} {shown} and {c.what} {display_path(c.path)} name the same path: "
                                  "give each output its own name")
        self._claims.append(_Claim(p, what, [p]))
        return p

    # ---- writing -------------------------------------------------------------------------------
    def _claim_of(self, path, what, kind, compress=True) -> _Claim:
        p = pathlib.Path(path)
        for c in self._claims:
            if c.path == p:
                return c
        self.claim(p, what or "output", kind, compress)
        return self._claims[-1]

    def _start(self, claim: _Claim) -> tuple[_Staged, pathlib.Path]:
        if self.committed:
            raise RuntimeError("this OutputSet was already committed")
        folder = claim.path.parent
        stem = TEMP_PREFIX + secrets.token_hex(4)
        staged = _Staged(claim, folder, stem)
        self._staged.append(staged)
        ext = extension(claim.path) or ""
        tmp = folder / (stem + (claim.path.name[len(claim.path.name) - len(ext):] if ext else ""))
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            os.close(fd)
        except OSError as exc:
            raise self._failure(claim, _os_error_reason(exc), staged) from None
        return staged, tmp

    def _temporaries(self, staged: _Staged) -> list[pathlib.Path]:
        try:
            return sorted(staged.folder / n for n in os.listdir(staged.folder) if n.startswith(staged.stem))
        except OSError:
            return []

    def _failure(self, claim: _Claim, reason: str, staged: _Staged | None = None) -> FusionError:
        """A one-line error for a failed write, naming the likeliest cause (file size limit, full
        disk) before the temporaries are removed."""
        written = 0
        for t in self._temporaries(staged) if staged is not None else []:
            with contextlib.suppress(OSError):
                written = max(written, os.stat(t).st_size)
        free, limit = _free_bytes(claim.path.parent), _size_limit()
        if limit is not None and written >= limit:
            cause = f"the file size limit of this process (ulimit -f, {limit} bytes) was reached"
        elif free is not None and free < (1 << 20):
            cause = f"the disk is full ({free} bytes free)"
        else:
            cause = reason
        return FusionError(f"cannot write {claim.what} {display_path(claim.path)}: {cause}; nothing was written")

    def _finish(self, staged: _Staged, main_tmp: pathlib.Path, rewrite_header: bool) -> None:
        """Map the temporaries to their final names (multi-file formats: fix the header's data file
        name) and re-check any final name the claim did not foresee."""
        claim = staged.claim
        final_stem = claim.path.name[: len(claim.path.name) - len(main_tmp.name) + len(staged.stem)]
        moves = [(t, claim.path.parent / (final_stem + t.name[len(staged.stem):])) for t in self._temporaries(staged)]
        if rewrite_header:
            data = [final for t, final in moves if t != main_tmp]
            _point_header_at(main_tmp, staged.stem, final_stem, data)
        for _t, final in moves:
            if final not in claim.members:
                self._check_member(final, claim.what, display_path(claim.path))
                claim.members.append(final)
        staged.moves = moves

    def add_image(self, path: str | os.PathLike, image: sitk.Image, what: str | None = None,
                  compress: bool = True) -> pathlib.Path:
        """Write ``image`` (every file of its format) to temporaries and verify it; see module doc."""
        claim = self._claim_of(path, what, "image", compress)
        staged, tmp = self._start(claim)
        try:
            with native_quiet():
                sitk.WriteImage(image, str(tmp), useCompression=compress, compressionLevel=COMPRESSION_LEVEL)
        except RuntimeError:
            raise self._failure(claim, "SimpleITK could not write it", staged) from None
        pause_point(f"write:{claim.what}")
        self._verify_image(staged, tmp, image)
        self._finish(staged, tmp, rewrite_header=extension(claim.path) in (".mhd", ".nhdr"))
        return claim.path

    def _verify_image(self, staged: _Staged, tmp: pathlib.Path, image: sitk.Image) -> None:
        claim = staged.claim
        try:
            check_image_file(tmp, f"the written {claim.what}", values=False)
            with native_quiet():
                back = sitk.ReadImage(str(tmp))
        except FusionError as exc:
            raise self._failure(claim, f"the file came out incomplete ({exc})", staged) from None
        except RuntimeError:
            raise self._failure(claim, "the file came out unreadable", staged) from None
        same_shape = back.GetSize() == image.GetSize() and \
            back.GetNumberOfComponentsPerPixel() == image.GetNumberOfComponentsPerPixel()
        lossless = extension(claim.path) not in LOSSY_EXTENSIONS
        if not same_shape or (lossless and not _same_voxels(sitk.GetArrayViewFromImage(back),
                                                            sitk.GetArrayViewFromImage(image))):
            raise self._failure(claim, "the file read back differs from what was written", staged)

    def add_bytes(self, path: str | os.PathLike, data: bytes, what: str | None = None) -> pathlib.Path:
        """Write ``data`` to a temporary and check its size."""
        claim = self._claim_of(path, what, "file")
        staged, tmp = self._start(claim)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise self._failure(claim, _os_error_reason(exc), staged) from None
        pause_point(f"write:{claim.what}")
        if os.stat(tmp).st_size != len(data):
            raise self._failure(claim, f"only {os.stat(tmp).st_size} of {len(data)} bytes were written", staged)
        self._finish(staged, tmp, rewrite_header=False)
        return claim.path

    def add_text(self, path: str | os.PathLike, text: str, what: str | None = None) -> pathlib.Path:
        """Write ``text`` (UTF-8) like :meth:`add_bytes`."""
        return self.add_bytes(path, text.encode("utf-8"), what)

    def _run_writer(self, staged: _Staged, write: Callable[[pathlib.Path], object], tmp: pathlib.Path) -> None:
        """``write(tmp)`` for a caller-supplied writer: an OSError or RuntimeError in it becomes this
        output's one-line failure (its temporaries removed); then the test hook's pause point."""
        claim = staged.claim
        try:
            write(tmp)
        except FusionError:
            raise
        except (OSError, RuntimeError) as exc:
            reason = _os_error_reason(exc) if isinstance(exc, OSError) else "the writer failed"
            raise self._failure(claim, reason, staged) from None
        pause_point(f"write:{claim.what}")

    def add_file(self, path: str | os.PathLike, write: Callable[[pathlib.Path], object], what: str | None = None,
                 verify: Callable[[pathlib.Path], object] | None = None) -> pathlib.Path:
        """Any other output: ``write(tmp)`` writes the file at the temporary path ``tmp`` (it may
        write companions ``tmp.stem + ...`` too); ``verify(tmp)`` may raise FusionError or
        return False. Without ``verify`` the file must exist and not be empty."""
        claim = self._claim_of(path, what, "file")
        staged, tmp = self._start(claim)
        self._run_writer(staged, write, tmp)
        try:
            ok = verify(tmp) if verify is not None else os.stat(tmp).st_size > 0
        except OSError:
            ok = False
        if ok is False:
            raise self._failure(claim, "the file came out empty or incomplete", staged)
        self._finish(staged, tmp, rewrite_header=False)
        return claim.path

    def add_folder(self, path: str | os.PathLike, write: Callable[[pathlib.Path], object], what: str | None = None,
                   verify: Callable[[pathlib.Path], object] | None = None) -> pathlib.Path:
        """A folder output (e.g. a DICOM series): ``write(tmp)`` fills a new temporary folder beside
        the target, ``verify(tmp)`` may raise FusionError or return False; at :meth:`commit` the
        folder is renamed into place with the other outputs (an empty folder there is replaced), so
        it appears complete or not at all."""
        p = pathlib.Path(path)
        claim = next((c for c in self._claims if c.path == p), None)
        if claim is None:
            self.claim_folder(p, what or "output folder")
            claim = self._claims[-1]
        if self.committed:
            raise RuntimeError("this OutputSet was already committed")
        stem = TEMP_PREFIX + secrets.token_hex(4)
        staged = _Staged(claim, claim.path.parent, stem)
        self._staged.append(staged)
        tmp = claim.path.parent / stem

        def make_and_write(folder: pathlib.Path) -> None:
            os.mkdir(folder)
            write(folder)

        self._run_writer(staged, make_and_write, tmp)
        if (verify(tmp) if verify is not None else any(tmp.iterdir())) is False:
            raise self._failure(claim, "the folder came out empty or incomplete", staged)
        staged.moves = [(tmp, claim.path)]
        return claim.path

    # ---- putting in place ----------------------------------------------------------------------
    def commit(self) -> list[pathlib.Path]:
        """Rename every temporary into place, all or none; returns the final paths."""
        if self.committed:
            return self.written
        moves = [m for s in self._staged for m in s.moves]
        for _tmp, final in moves:           # nothing became an input since the claims
            ident = _identity(final)
            if ident in self._protected:
                raise FusionError(f"{display_path(final)} became an input file while this run was working: "
                                  "nothing was written")
        pause_point("commit")
        with signals_held():
            pause_point("commit:held")
            done: list = []
            try:
                for tmp, final in moves:
                    backup = None
                    if os.path.lexists(final):
                        backup = final.parent / (BACKUP_PREFIX + secrets.token_hex(4))
                        try:
                            os.link(final, backup, follow_symlinks=False)
                        except OSError:
                            os.rename(final, backup)
                    done.append((final, backup))
                    os.replace(tmp, final)
            except OSError as exc:
                self._roll_back(done)
                self.abort()
                raise FusionError(f"cannot put {display_path(final)} in place: {_os_error_reason(exc)}; "
                                  "nothing was written") from None
            for _final, backup in done:
                if backup is not None:
                    with contextlib.suppress(OSError):
                        _remove(backup)
            self.committed = True
            self.written = [final for _tmp, final in moves]
        return self.written

    @staticmethod
    def _roll_back(done: list) -> None:
        for final, backup in reversed(done):
            with contextlib.suppress(OSError):
                if backup is not None:
                    if os.path.isdir(final) and not os.path.islink(final):
                        shutil.rmtree(final)       # a folder output put in place
                    os.replace(backup, final)
                elif os.path.lexists(final):
                    _remove(final)

    def abort(self) -> None:
        """Remove every temporary and every folder this set made (nothing is put in place)."""
        if self.committed:
            return
        with signals_held():
            for staged in self._staged:
                for t in self._temporaries(staged):
                    with contextlib.suppress(OSError):
                        _remove(t)
            self._staged = []
            for folder in reversed(self._made_folders):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            self._made_folders = []


def _remove(path: pathlib.Path) -> None:
    """Remove a file, a link, or a folder output with everything in it."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _point_header_at(header: pathlib.Path, temp_stem: str, final_stem: str, data_files: list) -> None:
    """In a .mhd/.nhdr header written under a temporary name, name the final data file instead."""
    text = header.read_bytes().decode("latin-1")
    lines = text.split("\n")
    for i, line in enumerate(lines):
        key = line.split("=" if "=" in line.split(":")[0] else ":")[0].strip().lower()
        if key in ("elementdatafile", "data file", "datafile") and temp_stem in line:
            lines[i] = line.replace(temp_stem, final_stem)
    new = "\n".join(lines).encode("latin-1")
    with open(header, "wb") as f:
        f.write(new)
    if os.stat(header).st_size != len(new):
        raise FusionError(f"cannot rewrite the header {display_path(header)}: it came out short")


# --------------------------------------------------------------------------------------------------
# what the files hold


def _same_voxels(a: np.ndarray, b: np.ndarray, voxels: int = 1 << 24) -> bool:
    """``np.array_equal(a, b)`` slab by slab along the first axis: no whole-volume temporary
    (a large volume's read-back check stays within its own size)."""
    if a.shape != b.shape:
        return False
    step = max(1, voxels // max(1, a[:1].size))
    return all(np.array_equal(a[i:i + step], b[i:i + step]) for i in range(0, a.shape[0], step))


def fused_image_for_file(rgb: np.ndarray, reference: sitk.Image, as_2d: bool) -> sitk.Image:
    """The RGB result as a vector image with the reference geometry (2D when the inputs were 2D)."""
    img = sitk.GetImageFromArray(rgb, isVector=True)
    img.CopyInformation(reference)
    return img[:, :, 0] if as_2d else img


def metrics_csv_text(rows: list[dict], extra: dict | None = None) -> str:
    """The metrics table as CSV: metric, mean, std, slices, description (+ run information rows)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["metric", "mean", "std", "slices", "description"])
    for r in rows:
        writer.writerow([r["metric"], f"{r['mean']:.6g}", f"{r['std']:.6g}", r["slices"], r["description"]])
    for k, v in (extra or {}).items():
        writer.writerow([k, v, "", "", "run information"])
    return buf.getvalue()


def _oriented(array: np.ndarray, reference: sitk.Image) -> np.ndarray:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=array.ndim == 4)
    img.CopyInformation(reference)
    return sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))


def oriented_view(array: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """``array`` ([Z, Y, X] or [Z, Y, X, C], on ``reference``'s grid) in LPS index order, as
    SimpleITK's DICOMOrient puts it, but as a view (axes permuted and flipped; nothing copied): the
    permutation is read off DICOMOrient applied to three small index images with the reference's
    direction."""
    if reference.GetDimension() != 3:
        return _oriented(array, reference)
    shape = (4, 3, 2)                                     # numpy [z, y, x]: every axis its own length
    sources = []
    for ax in range(3):
        index = np.broadcast_to(np.arange(shape[ax], dtype=np.int16).reshape([-1 if k == ax else 1 for k in range(3)]),
                                shape)
        probe = sitk.GetImageFromArray(np.ascontiguousarray(index))
        probe.SetDirection(reference.GetDirection())
        sources.append(sitk.GetArrayFromImage(sitk.DICOMOrient(probe, "LPS")))
    perm, flips = [], []
    for out_axis in range(3):
        for ax in range(3):
            step = np.diff(sources[ax], axis=out_axis)
            if step.size and np.all(step == step.flat[0]) and step.flat[0] != 0:
                perm.append(ax)
                flips.append(step.flat[0] < 0)
                break
    view = np.transpose(array, perm + list(range(3, array.ndim)))
    return view[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def preview_montage(anatomical8: np.ndarray, functional_rgb8: np.ndarray, fused_rgb8: np.ndarray,
                    reference: sitk.Image, orientation: str = "axial") -> np.ndarray:
    """Anatomical | functional | fused side by side (uint8 RGB), at the slice with the most content.

    Volumes are first reoriented to LPS index order, so the picture is in radiological convention
    (anterior or superior up, patient's left on the right) whatever the storage order; as views,
    so only the chosen slice is copied.
    """
    a = oriented_view(anatomical8, reference)
    f = oriented_view(functional_rgb8, reference)
    r = oriented_view(fused_rgb8, reference)
    axis = {"axial": 0, "coronal": 1, "sagittal": 2}.get(str(orientation).lower(), 0)
    if reference.GetSize()[2] == 1:
        axis = 0
    content = a.sum(axis=tuple(k for k in range(3) if k != axis), dtype=np.int64)
    k = int(np.argmax(content))
    a_slice = np.take(a, k, axis=axis)
    views = [np.repeat(a_slice[..., None], 3, axis=-1)] + [np.take(v, k, axis=axis) for v in (f, r)]
    if axis != 0:  # rows run inferior -> superior: put superior at the top
        views = [v[::-1] for v in views]
    gap = np.full((views[0].shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([views[0], gap, views[1], gap, views[2]], axis=1)


def picture(rgb: np.ndarray) -> sitk.Image:
    """A uint8 RGB array [H, W, 3] as a 2D SimpleITK image (preview, montage)."""
    return sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True)


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, what: str = "output") -> None:
    """One image written on its own through an :class:`OutputSet` (checked, all or nothing)."""
    with OutputSet() as out:
        out.add_image(path, image, what)
        out.commit()


def write_preview(montage: np.ndarray, path: str | os.PathLike) -> None:
    """A picture (uint8 RGB [H, W, 3]) written on its own, like :func:`write_image_atomic`."""
    write_image_atomic(picture(montage), path, "picture")
