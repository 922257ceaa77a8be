"""One section of a benchmark report, replaced in place.

Several benchmark scripts report into docs/BENCHMARKS.md. Each owns one section, delimited by
``<!-- BEGIN name -->`` and ``<!-- END name -->`` lines, and rewrites only that section, so running
one benchmark never drops another's figures. A section that is not in the file yet is appended.
The file is replaced atomically (temporary file + rename).
"""
from __future__ import annotations

import os
import pathlib
import platform
import time

HEADER = "# Benchmarks\n\nEach section below is written by the command it names; `make bench` runs them all.\n"


def machine_line(extra: str = "") -> str:
    """One line on where and when a benchmark ran (the machine's load included: it inflates times)."""
    load = os.getloadavg()
    text = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    return f"{text} {extra}".strip()


def replace_section(path: str | os.PathLike, name: str, body: str) -> None:
    """Put ``body`` (markdown, without the markers) as section ``name`` of the report at ``path``."""
    path = pathlib.Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def common_arguments(parser, section: str, repo: pathlib.Path) -> None:
    """The options the report-writing benchmarks share: --data, --threads, --section, --output."""
    parser.add_argument("--data", default=os.environ.get("MEDICALFUSION_DATA") or str(repo.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--section", default=section, help="name of the report section to write")
    parser.add_argument("--output", help=f"write the '{section}' section (or --section) of this markdown report")


def command_line(script: str, argv) -> str:
    """How the benchmark was run, for its report: ``python scripts/<script> <arguments>``."""
    import sys  # noqa: PLC0415

    return f"python scripts/{script}" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
