"""``medicalfusion`` in a process of its own, without a fresh interpreter's imports each time.

The fault tests (test_faults.py, io/test_dicom_export.py) run the command in a real process: a file
size limit, dropped file capabilities, signals sent while it pauses at a named point, a terminal on
stderr. A fresh ``python -m MedicalFusionLib.cli`` spends about 2 s of its run importing torch and
nibabel; here a fork server, started once per test process, has imported the package once, and each
run is a child forked from it. The child is set up as a fresh process would be: the test's stdin,
stdout and stderr (pipes, or a pty), working folder, environment, the limits asked for (:class:`Setup`,
which is also a ``preexec_fn`` for a real subprocess), SIGINT as the test process has it (or at its
default, as from a terminal); it runs ``MedicalFusionLib.cli.run()`` (the installed program's entry
point) and ends through the interpreter's normal shutdown (atexit handlers, torch's included), so its
exit status, signals and output are a real process's. The server itself never runs a fusion, and no
thread: nothing of a run carries over to the next.

What a fork server cannot show is the start of a fresh interpreter (what the command imports, a
signal while it imports): those tests start ``python -m MedicalFusionLib.cli`` (``fresh=True``).
"""
from __future__ import annotations

import atexit
import io
import json
import locale
import os
import pathlib
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]
MODULE_DIR = REPO / "MedicalFusion"
#: What a ``fuse`` run imports that costs time (the rest comes with them); a module of the package
#: that is not there (renamed) is left out.
PRELOAD = ("torch", "nibabel", "SimpleITK", "MedicalFusionLib.cli", "MedicalFusionLib.pipeline",
           "MedicalFusionLib.metrics", "MedicalFusionLib.methods", "MedicalFusionLib.engine",
           "MedicalFusionLib.io.read", "MedicalFusionLib.io.outputs")


# ------------------------------------------------------------------------------------------------
# what the child does before the command (also a preexec_fn of a real subprocess)


class Setup:
    """One step a child takes before running the command: ``Setup("fsize", n)`` (no file larger than
    ``n`` bytes: a full disk), ``Setup("drop_file_capabilities")`` (as root: file permissions apply),
    ``Setup("sigint_default")`` (SIGINT at its default, as a command typed at a terminal has it).
    Calling it applies it (a ``preexec_fn``)."""

    def __init__(self, kind: str, *args):
        if kind not in ("fsize", "drop_file_capabilities", "sigint_default"):
            raise ValueError(kind)
        self.kind, self.args = kind, list(args)

    def __call__(self) -> None:
        if self.kind == "fsize":
            import resource  # noqa: PLC0415

            n = int(self.args[0])
            resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
        elif self.kind == "drop_file_capabilities":
            # Linux, root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the
            # command (still uid 0, owner of the test files) is subject to file permissions
            import ctypes  # noqa: PLC0415

            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2):
                if libc.prctl(24, cap, 0, 0, 0) != 0:   # PR_CAPBSET_DROP: gone after an exec
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
            # and from this process's own sets (a forked child runs without an exec): capget/capset, v3
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)
            data = (ctypes.c_uint32 * 6)()                # {effective, permitted, inheritable} x 2
            if libc.capget(header, data) != 0:
                raise OSError(ctypes.get_errno(), "capget failed")
            for i in range(3):
                data[i] &= ~((1 << 1) | (1 << 2))
            if libc.capset(header, data) != 0:
                raise OSError(ctypes.get_errno(), "capset failed")
        else:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def to_json(self) -> list:
        return [self.kind, *self.args]

    def __repr__(self) -> str:
        return f"Setup{tuple([self.kind, *self.args])!r}"


# ------------------------------------------------------------------------------------------------
# the wire: a length-prefixed JSON message, with file descriptors beside the request


def _send(conn: socket.socket, obj, fds=()) -> None:
    data = json.dumps(obj).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [payload], list(fds))
    else:
        conn.sendall(payload)


def _recv_exact(conn: socket.socket, n: int, fds: list) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk, got, _flags, _addr = socket.recv_fds(conn, n - len(buf), 8)
        fds.extend(got)
        if not chunk:
            raise EOFError("the fork server closed the connection")
        buf += chunk
    return buf


def _recv(conn: socket.socket):
    fds: list = []
    (n,) = struct.unpack("!I", _recv_exact(conn, 4, fds))
    return json.loads(_recv_exact(conn, n, fds)), fds


# ------------------------------------------------------------------------------------------------
# the server (python cli_process.py --serve SOCKET) and its children


def _serve(path: str):
    """Accept runs until the test process goes (EOF on stdin). Returns only in a child: its request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # a Ctrl-C to the test process is the tests' affair
    import importlib  # noqa: PLC0415

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not name.startswith("MedicalFusionLib.") or exc.name != name:
                raise
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    os.write(1, b"ready\n")
    children: dict = {}
    while True:
        ready, _, _ = select.select([listener, 0], [], [], 0.05)
        if 0 in ready and not os.read(0, 1):                # the test process has ended
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)     # the socket's folder
            os._exit(0)
        if listener in ready:
            conn, _ = listener.accept()
            request, fds = _recv(conn)
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in children.values():
                    other.close()
                conn.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                for fd in fds:
                    if fd > 2:
                        os.close(fd)
                return request
            for fd in fds:
                os.close(fd)
            _send(conn, {"pid": pid})
            children[pid] = conn
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()


def _become_the_command(request: dict) -> None:
    """In the child: the process a fresh ``python -m MedicalFusionLib.cli ARGS`` would be, then run it."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # Python's start-up: SIGINT raises KeyboardInterrupt unless it was ignored; SIGTERM at its default
    signal.signal(signal.SIGINT, signal.SIG_IGN if request["sigint_ignored"] else signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for step in request["setup"]:
        Setup(*step)()
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:       # sigint_default: Python's handler, as at start-up
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # the standard streams are on the new descriptors now; buffered as at start-up (a terminal: by line)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    sys.path.insert(0, os.getcwd())                    # as ``python -m`` has it
    from MedicalFusionLib import cli  # noqa: PLC0415

    sys.argv = [cli.__file__, *request["args"]]
    cli.run()


# ------------------------------------------------------------------------------------------------
# the client: Popen-like processes


_SERVER: dict = {}


def _server_socket() -> str:
    """The fork server of this test process (started on first use)."""
    if _SERVER.get("pid") != os.getpid() or _SERVER["proc"].poll() is not None:
        folder = tempfile.mkdtemp(prefix="mf-forkserver-")
        path = os.path.join(folder, "s")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), str(REPO), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen([sys.executable, str(pathlib.Path(__file__)), "--serve", path], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = proc.stdout.readline()
        if line != b"ready\n":
            raise RuntimeError(f"the fork server did not start: {line!r}")
        _SERVER.update(pid=os.getpid(), proc=proc, path=path)
        atexit.register(shutil.rmtree, folder, True)
    return _SERVER["path"]


def _text(data: bytes) -> str:
    """As ``subprocess`` decodes with text=True (locale encoding, universal newlines)."""
    return io.TextIOWrapper(io.BytesIO(data), encoding=locale.getpreferredencoding(False)).read()


class Process:
    """A ``subprocess.Popen``-like handle on a child of the fork server (or, ``fresh=True``, a Popen)."""

    def __init__(self, args, cwd, env=None, setup=(), stdin=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True, fresh=False):
        args = [str(a) for a in args]
        fresh = fresh or not sys.platform.startswith("linux")   # the fork server is for Linux (CI) only
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), str(REPO), full_env.get("PYTHONPATH", "")])
        full_env.update(env or {})
        self.args, self.text = args, text
        self.returncode = None
        self._popen = None
        if fresh:
            steps = list(setup)
            self._popen = subprocess.Popen([sys.executable, "-m", "MedicalFusionLib.cli", *args], cwd=cwd,
                                           env=full_env, stdin=stdin, stdout=stdout, stderr=stderr, text=text,
                                           preexec_fn=(lambda: [s() for s in steps]) if steps else None)
            self.pid, self.stdout, self.stderr = self._popen.pid, self._popen.stdout, self._popen.stderr
            return
        ends, close_after, self._pipes = [], [], {}
        for target, given in enumerate((stdin, stdout, stderr)):
            if given == subprocess.PIPE:
                r, w = os.pipe()
                mine, theirs = (w, r) if target == 0 else (r, w)
                self._pipes[target] = os.fdopen(mine, "wb" if target == 0 else "rb", buffering=0)
                ends.append(theirs)
                close_after.append(theirs)
            elif given == subprocess.DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                ends.append(fd)
                close_after.append(fd)
            elif given is None:
                ends.append(target)                          # inherited, as subprocess does
            else:
                ends.append(given if isinstance(given, int) else given.fileno())
        self.stdin, self.stdout, self.stderr = (self._pipes.get(i) for i in range(3))
        request = {"args": args, "cwd": str(cwd), "env": full_env, "setup": [s.to_json() for s in setup],
                   "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(_server_socket())
        try:
            _send(self._conn, request, ends)
        finally:
            for fd in close_after:
                os.close(fd)
        reply, _ = _recv(self._conn)
        self.pid = reply["pid"]

    # -- state
    def poll(self):
        if self._popen is not None:
            self.returncode = self._popen.poll()
            return self.returncode
        if self.returncode is None:
            ready, _, _ = select.select([self._conn], [], [], 0)
            if ready:
                self._finish()
        return self.returncode

    def _finish(self) -> None:
        reply, _ = _recv(self._conn)
        self.returncode = reply["returncode"]
        self._conn.close()

    def wait(self, timeout=None):
        if self._popen is not None:
            self.returncode = self._popen.wait(timeout)
            return self.returncode
        if self.returncode is None:
            ready, _, _ = select.select([self._conn], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._finish()
        return self.returncode

    def send_signal(self, sig) -> None:
        if self._popen is not None:
            self._popen.send_signal(sig)
        elif self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        """(stdout, stderr) read to their end, then the exit status; TimeoutExpired as Popen's."""
        if self._popen is not None:
            result = self._popen.communicate(timeout=timeout)
            self.returncode = self._popen.returncode
            return result
        if self.stdin is not None:
            self.stdin.close()
        out: dict = {}
        readers = []
        for i in (1, 2):
            if self._pipes.get(i) is not None:
                t = threading.Thread(target=lambda i=i: out.__setitem__(i, self._pipes[i].read()), daemon=True)
                t.start()
                readers.append(t)
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in readers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for i in (1, 2):
            if self._pipes.get(i) is not None:
                self._pipes[i].close()
        result = [out.get(1), out.get(2)]
        if self.text:
            result = [None if r is None else _text(r) for r in result]
        return tuple(result)


def run(args, cwd, env=None, setup=(), timeout=300, fresh=False, **kw) -> subprocess.CompletedProcess:
    """The command to its end, output captured (text), like ``subprocess.run(..., capture_output=True,
    text=True, timeout=timeout)``: on a timeout the process is killed and TimeoutExpired raised."""
    proc = Process(args, cwd, env=env, setup=setup, fresh=fresh, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    sys.path.pop(0)                                    # not this folder: the tests' folders are no packages of the command
    _become_the_command(_serve(sys.argv[2]))
