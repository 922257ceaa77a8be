"""The files of an image, checked before they are trusted and after they are written: paths
(:func:`check_input_path`), the files an input is made of (:func:`source_files`), and whether a file
is complete (:func:`check_image_file`), so that bad input fails early with one line that says what
to do.

- the path: it exists, is a regular file or a folder (no FIFO, device or socket: they would hang
  or never end), no symbolic-link loop, not longer than the system allows, readable (permission);
- the file is complete (:func:`check_image_file`): NRRD and MetaImage data against the sizes and
  type in their header (raw data by file size, gzip/bzip2/zlib streams decompressed to the end),
  NIfTI/Analyze read by nibabel (it reports short files, where ITK fills the rest with zeros, and
  it keeps NaN/Inf, which ITK's NIfTI reader turns into 0), PNG/JPEG/BMP decoded by Pillow (ITK
  reads truncated JPEG/BMP files with a warning).

:func:`source_files` lists every file an input is made of (header and data files, the files of a
DICOM folder): outputs.py checks outputs against them. Reading is read.py's job; what the picture
holds (dimension, components, values) is checked by :mod:`MedicalFusionLib.images`.
"""
from __future__ import annotations

import bz2
import errno
import os
import pathlib
import stat
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import FusionError

#: 8-bit pictures that are display-ready as stored: their default window is 0..255. Every other
#: image (any NRRD, NIfTI, MHA, DICOM, TIFF, even uint8 ones) is windowed from its values.
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
NIFTI_EXTENSIONS = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz", ".hdr.gz")
#: Extensions made of two suffixes (everything else is ``Path.suffix``).
COMPOUND_EXTENSIONS = (".nii.gz", ".img.gz", ".hdr.gz", ".raw.gz")


# --------------------------------------------------------------------------------------------------
# paths


def extension(path: str | os.PathLike) -> str:
    """Lower-case extension, two suffixes for .nii.gz and its kind (``'x.nii.gz'`` -> ``'.nii.gz'``)."""
    name = pathlib.Path(path).name.lower()
    for ext in COMPOUND_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return pathlib.Path(name).suffix


def display_path(path: str | os.PathLike, limit: int = 120) -> str:
    """A path short enough for a one-line message (the middle of a very long one is elided)."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:50]}...{text[-60:]}"


def _os_error_reason(exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return f"its path is too long for this system (at most {_path_max()} bytes, {_name_max()} per name)"
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link that loops (or too many links in a row)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOTDIR:
        return "a part of its path is a file, not a folder"
    return exc.strerror or str(exc)


def _path_max() -> int:
    try:
        return int(os.pathconf("/", "PC_PATH_MAX"))
    except (ValueError, OSError, AttributeError):
        return 4096


def _name_max(folder: str | os.PathLike = "/") -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (ValueError, OSError, AttributeError):
        return 255


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input_path(path: str | os.PathLike, label: str) -> pathlib.Path:
    """The path of an input that exists, is a regular file or a folder and can be read; else a
    FusionError naming the cause (``label`` is e.g. 'anatomical input')."""
    p = pathlib.Path(path)
    shown = f"{label} {display_path(p)}"
    if not str(path):
        raise FusionError(f"{label} is an empty path: give an image file or a DICOM folder")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise FusionError(f"{shown} is a symbolic link to a file that does not exist: check the link") from None
        raise FusionError(f"{shown} does not exist: check the path") from None
    except OSError as exc:
        raise FusionError(f"{shown} cannot be opened: {_os_error_reason(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            os.listdir(p)
        except OSError as exc:
            raise FusionError(f"{shown} is a folder that cannot be listed: {_os_error_reason(exc)}") from None
        return p
    if not stat.S_ISREG(st.st_mode):
        raise FusionError(f"{shown} is {_kind(st.st_mode)}, not an image file: give an image file or a DICOM folder")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise FusionError(f"{shown} cannot be read: {_os_error_reason(exc)}") from None
    return p


# --------------------------------------------------------------------------------------------------
# the files an image is made of


def _companions(p: pathlib.Path) -> list[pathlib.Path]:
    """Header/data files that belong to ``p`` by their name or its header."""
    ext = extension(p)
    stem = p.name[: len(p.name) - len(ext)]
    pairs = {".hdr": (".img", ".img.gz"), ".img": (".hdr",), ".img.gz": (".hdr.gz", ".hdr"), ".hdr.gz": (".img.gz",)}
    if ext in pairs:
        return [p.with_name(stem + e) for e in pairs[ext]]
    try:
        if ext == ".nhdr":
            return _nrrd_header(p).data_files
        if ext == ".mhd":
            return _meta_header(p).data_files
    except (OSError, ValueError, _NotThisFormat):
        return []
    return []


def source_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """Every file that makes up the input at ``path``: itself, a header's data file(s) or an
    Analyze/NIfTI pair's other half, or a folder and the files in it. Missing ones are left out."""
    p = pathlib.Path(path)
    if p.is_dir():
        out = [p]
        try:
            out += [p / n for n in sorted(os.listdir(p))]
        except OSError:
            pass
        return out
    out = [p] + [c for c in _companions(p) if os.path.lexists(c)]
    return out


# --------------------------------------------------------------------------------------------------
# completeness of a file against its header


class _NotThisFormat(Exception):
    """The file does not have the header its extension promises (left for ITK to report)."""


@dataclass
class _DataLayout:
    expected: int | None             # bytes of (decompressed) voxel data, None when unknown
    encoding: str                    # 'raw', 'gzip', 'bzip2', 'zlib' or 'other'
    data_files: list                 # detached data files (empty: data in the header's file)
    offset: int                      # where the data starts in its file (-1: at the end)


_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
        "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_NRRD_TYPE_SIZE = {name: size for size, names in _NRRD_TYPES.items() for name in names}
_META_TYPE_SIZE = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_ASCII_CHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2,
                   "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
                   "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_HEADER_LINE = 1 << 16


def _product(values: list[int]) -> int:
    n = 1
    for v in values:
        n *= v
    return n


def _nrrd_header(path: pathlib.Path) -> _DataLayout:
    fields: dict[str, str] = {}
    listed: list[str] = []
    with open(path, "rb") as f:
        if not f.readline(_HEADER_LINE).startswith(b"NRRD"):
            raise _NotThisFormat
        while True:
            line = f.readline(_HEADER_LINE)
            text = line.rstrip(b"\r\n").decode("latin-1")
            if not line or not text:
                break
            if text.startswith("#") or ":=" in text:
                continue
            key, sep, value = text.partition(":")
            if sep:
                fields[key.strip().lower().replace("datafile", "data file").replace("byteskip", "byte skip")
                       .replace("lineskip", "line skip")] = value.strip()
            if key.strip().lower() in ("data file", "datafile") and value.strip().upper().startswith("LIST"):
                listed = [ln.strip() for ln in f.read().decode("latin-1").splitlines() if ln.strip()]
                break
        offset = f.tell()
    try:
        sizes = [int(s) for s in fields["sizes"].split()]
        size = int(fields["block size"]) if fields.get("type") == "block" else _NRRD_TYPE_SIZE[fields["type"].lower()]
    except (KeyError, ValueError):
        return _DataLayout(None, "other", [], offset)
    enc = fields.get("encoding", "raw").lower()
    encoding = {"raw": "raw", "gz": "gzip", "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2"}.get(enc, "other")
    data_files: list = []
    datafile = fields.get("data file")
    if datafile:
        words = datafile.split()
        if listed:
            data_files = [path.parent / n for n in listed]
        elif len(words) >= 4 and "%" in words[0]:      # a pattern: fmt min max step [subdim]
            try:
                lo, hi, step = int(words[1]), int(words[2]), int(words[3])
                data_files = [path.parent / (words[0] % i) for i in range(lo, hi + (1 if step > 0 else -1), step)]
            except (ValueError, TypeError, ZeroDivisionError):
                data_files = []
        else:
            data_files = [path.parent / datafile]
        offset = 0
    skip = fields.get("byte skip", "0")
    try:
        skip_bytes = int(skip)
    except ValueError:
        skip_bytes = 0
    if skip_bytes < 0:
        offset = -1
    elif encoding == "raw":
        offset += skip_bytes
    return _DataLayout(_product(sizes) * size, encoding, data_files, offset)


def _meta_header(path: pathlib.Path) -> _DataLayout:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        while True:
            line = f.readline(_HEADER_LINE)
            if not line:
                break
            key, sep, value = line.decode("latin-1").strip().partition("=")
            if not sep:
                if not fields:
                    raise _NotThisFormat
                continue
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
        offset = f.tell()
    if "ElementDataFile" not in fields:
        raise _NotThisFormat
    datafile = fields["ElementDataFile"]
    try:
        dims = [int(s) for s in fields["DimSize"].split()]
        size = _META_TYPE_SIZE[fields["ElementType"].replace("_ARRAY", "")]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        return _DataLayout(None, "other", [], offset)
    binary = fields.get("BinaryData", "True").lower() in ("true", "1")
    compressed = fields.get("CompressedData", "False").lower() in ("true", "1")
    encoding = "other" if not binary else ("zlib" if compressed else "raw")
    data_files: list = []
    if datafile.upper() != "LOCAL":
        words = datafile.split()
        if words and words[0].upper() == "LIST" or (len(words) >= 4 and "%" in words[0]):
            encoding = "other"             # one file a slice: ITK checks each
        else:
            data_files = [path.parent / datafile]
        try:
            header_size = int(fields.get("HeaderSize", "0"))
        except ValueError:
            header_size = 0
        offset = -1 if header_size < 0 else header_size
    return _DataLayout(_product(dims) * size * channels, encoding, data_files, offset)


def _stream_length(f, decompressor_factory) -> tuple[int, bool]:
    """Bytes a compressed stream decompresses to, and whether it ended properly (concatenated
    gzip members are followed; zero padding after the last one is allowed)."""
    total, d, pending = 0, decompressor_factory(), b""
    while True:
        chunk, pending = pending or f.read(1 << 16), b""
        if not chunk:
            return total, bool(d.eof)
        if d.eof:
            if not chunk.strip(b"\0"):
                continue
            d = decompressor_factory()
        total += len(d.decompress(chunk))
        if d.eof:
            pending = d.unused_data


def _check_layout(label: str, layout: _DataLayout, header: pathlib.Path) -> None:
    if layout.expected is None or layout.encoding == "other":
        return
    files = layout.data_files or [header]
    for data in files:
        try:
            st = os.stat(data)
        except OSError as exc:
            raise FusionError(f"{label}: its data file {display_path(data)} cannot be opened "
                              f"({_os_error_reason(exc)}): keep the header and its data file together") from None
        if not stat.S_ISREG(st.st_mode):
            raise FusionError(f"{label}: its data file {display_path(data)} is {_kind(st.st_mode)}: "
                              "give a regular file")
    if len(files) != 1:
        return
    data = files[0]
    size = os.stat(data).st_size
    if layout.encoding == "raw":
        have = size if layout.offset < 0 else size - layout.offset
        if have < layout.expected:
            raise FusionError(f"{label} is truncated: {max(have, 0)} of {layout.expected} bytes of voxel data in "
                              f"{display_path(data)}; the file is incomplete, copy it again")
        return
    factory = {"gzip": lambda: zlib.decompressobj(wbits=47), "zlib": lambda: zlib.decompressobj(wbits=47),
               "bzip2": bz2.BZ2Decompressor}[layout.encoding]
    try:
        with open(data, "rb") as f:
            f.seek(max(layout.offset, 0))
            total, ended = _stream_length(f, factory)
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        raise FusionError(f"{label} has damaged compressed data in {display_path(data)} ({exc}): "
                          "copy the file again") from None
    if not ended or total < layout.expected:
        raise FusionError(f"{label} is truncated: its compressed data in {display_path(data)} "
                          f"{'ends early' if not ended else f'holds {total} of {layout.expected} bytes'}; "
                          "the file is incomplete, copy it again")


def _check_nifti(p: pathlib.Path, label: str, values: bool) -> None:
    import nibabel as nib  # noqa: PLC0415  (only for NIfTI/Analyze files)

    try:
        img = nib.load(str(p))
    except nib.filebasedimages.ImageFileError:
        return                                         # not NIfTI/Analyze after all: ITK reports it
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise FusionError(f"{label} has a damaged NIfTI header ({_short(exc)}): copy the file again") from None
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise FusionError(f"{label} is truncated or damaged ({_short(exc)}): the file is incomplete, "
                          "copy it again") from None
    if values and data.dtype.kind in "fc" and not np.all(np.isfinite(data)):
        raise FusionError(f"{label} contains NaN or infinite values: fix or mask them before fusing")


def _check_picture(p: pathlib.Path, label: str) -> None:
    from PIL import Image  # noqa: PLC0415  (Pillow comes with scikit-image)

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None        # ITK reads it whatever its size: check it whatever its size
    try:
        with Image.open(p) as im:
            im.load()
    except Image.UnidentifiedImageError:
        return                                         # not this format: ITK reports it
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise FusionError(f"{label} is truncated or damaged ({_short(exc)}): copy the file again") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 100 else text[:97] + "..."


def check_image_file(path: str | os.PathLike, label: str, values: bool = True) -> None:
    """Check that an image file is complete (and, for NIfTI, that its values are finite when
    ``values``); raises FusionError with ``label`` in the message. Formats without a check here
    are left to ITK's reader. Used for inputs and to verify what was written."""
    p = pathlib.Path(path)
    ext = extension(p)
    try:
        if ext in NIFTI_EXTENSIONS:
            _check_nifti(p, label, values)
        elif ext in (".nrrd", ".nhdr"):
            _check_layout(label, _nrrd_header(p), p)
        elif ext in (".mha", ".mhd"):
            _check_layout(label, _meta_header(p), p)
        elif ext in PICTURE_EXTENSIONS:
            _check_picture(p, label)
    except _NotThisFormat:
        return
    except OSError as exc:
        raise FusionError(f"{label} cannot be read: {_os_error_reason(exc)}") from None
