"""One ``progress(done, total)`` and one ``cancel() -> bool`` for a whole run, split over its phases.

The Slicer panel (and the CLI's progress bar) pass two callbacks down to the core: ``progress(done,
total)`` and ``cancel() -> bool``. The panel processes UI events inside ``progress``, so the gaps
between calls are the stretches in which the panel is frozen and Cancel cannot be clicked. A
:class:`Progress` tracker turns the work of one run into those calls:

- the run is split into named phases with weights (e.g. read 3 %, fuse 60 %, metrics 30 %, write
  7 %); ``total`` is fixed (:data:`RESOLUTION`) and ``done`` grows monotonically across phases;
- the code reports at phase starts (:meth:`Progress.phase`), at fractions of a phase
  (:meth:`Progress.advance`) and at any point where it can stop (:meth:`Progress.tick`); each of
  these checks ``cancel()`` and raises :class:`FusionCancelled` when it returns True, so the caller
  writes nothing;
- calls to the callbacks are spaced at least :data:`MIN_INTERVAL` seconds apart (phase starts and
  the end always report), so fine-grained ticks cost nothing when the work is fast;
- inside one unit of work that cannot be split (one slice of a network or of NSST-PAPCNN takes up
  to a second on a busy CPU), the method calls :func:`heartbeat` at its natural steps (network
  layers, PCNN maps); within a :func:`beating` block (the engine's batch loop) that repeats the
  last report and asks ``cancel()``, at most every :data:`HEARTBEAT_SECONDS`;
- a nested step that takes ``progress``/``cancel`` callbacks itself (``pipeline.fuse_images``
  called by ``scene.fuse_nodes``) gets them from :meth:`Progress.callbacks`: its ``done/total``
  then fills the current phase of the outer tracker.

:func:`active_phase` names the innermost phase being worked on (benchmarks attribute the gaps
between callback calls to phases with it).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Sequence

from .errors import FusionCancelled

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

#: ``total`` of every progress(done, total) call a tracker makes.
RESOLUTION = 1000
#: Smallest spacing of callback calls made by :meth:`Progress.tick` and :meth:`Progress.advance` (s).
MIN_INTERVAL = 0.05

#: Smallest spacing of the calls :func:`heartbeat` passes on (s).
HEARTBEAT_SECONDS = 0.1

_state = threading.local()


def heartbeat() -> None:
    """Called by a method inside work that cannot be split (a network's layers, NSST-PAPCNN's maps):
    within a :func:`beating` block of this thread it calls the block's function (at most every
    :data:`HEARTBEAT_SECONDS`), which may raise :class:`FusionCancelled`; elsewhere it does nothing."""
    beat = getattr(_state, "beat", None)
    if beat is not None:
        beat()


@contextlib.contextmanager
def beating(fn: Callable[[], None], every: float = HEARTBEAT_SECONDS):
    """Within the block, :func:`heartbeat` in this thread calls ``fn()`` at most every ``every`` s."""
    last = [time.perf_counter()]

    def beat() -> None:
        now = time.perf_counter()
        if now - last[0] >= every:
            last[0] = now
            fn()

    previous = getattr(_state, "beat", None)
    _state.beat = beat
    try:
        yield
    finally:
        _state.beat = previous


def _stack() -> list:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def active_phase() -> str | None:
    """Name of the innermost phase of the trackers running in this thread (None outside a run)."""
    for tracker in reversed(_stack()):
        if tracker.current is not None:
            return tracker.current
    return None


class Progress:
    """Phases of one run reported through ``progress(done, RESOLUTION)``; ``cancel()`` checked at each report.

    ``phases``: ``[(name, weight), ...]`` in the order they run; weights are relative. Use as a
    context manager (it marks the run active for :func:`active_phase` and reports the end).
    """

    def __init__(self, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                 phases: Sequence[tuple[str, float]] = (("work", 1.0),), min_interval: float = MIN_INTERVAL):
        self._progress = progress
        self._cancel = cancel
        total = float(sum(w for _, w in phases)) or 1.0
        self._start: dict[str, float] = {}
        self._width: dict[str, float] = {}
        acc = 0.0
        for name, weight in phases:
            self._start[name] = acc / total
            self._width[name] = weight / total
            acc += weight
        self.current: str | None = None
        self._window: tuple[float, float] | None = None    # set by stage()
        self._fraction = 0.0              # of the whole run, reported so far
        self._last_call = -1e9
        self._min_interval = min_interval

    # -- context --------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        _stack().append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        stack = _stack()
        if self in stack:
            stack.remove(self)
        self.current = None

    # -- reporting ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._progress is not None or self._cancel is not None

    def _report(self, force: bool) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_call < self._min_interval:
            return
        self._last_call = now
        if self._cancel is not None and self._cancel():
            raise FusionCancelled("fusion cancelled")
        if self._progress is not None:
            self._progress(min(RESOLUTION, int(self._fraction * RESOLUTION)), RESOLUTION)

    def phase(self, name: str) -> None:
        """Start phase ``name`` (reported at once, with a cancel check)."""
        if name not in self._start:
            raise KeyError(f"unknown progress phase '{name}'")
        self.current = name
        self._window = None
        self._fraction = max(self._fraction, self._start[name])
        self._report(force=True)

    def stage(self, name: str, start: float, width: float) -> None:
        """Work of phase ``name`` that fills the part [start, start + width] of the whole run
        (fractions of it), for runs whose phases take turns (the pipeline streams slabs: prepare,
        fuse, recombine, metrics of one slab, then of the next). :func:`active_phase` names it,
        :meth:`advance` fills that part; reported at once, with a cancel check."""
        if name not in self._start:
            raise KeyError(f"unknown progress phase '{name}'")
        self.current = name
        self._window = (start, width)
        self._fraction = max(self._fraction, start)
        self._report(force=True)

    def advance(self, done: float, total: float, force: bool = False) -> None:
        """``done`` of ``total`` units of the current phase are finished (reported at once with ``force``)."""
        if self.current is None:
            return
        part = min(1.0, max(0.0, float(done) / float(total))) if total else 1.0
        start, width = self._window or (self._start[self.current], self._width[self.current])
        self._fraction = max(self._fraction, start + part * width)
        self._report(force=force)

    def tick(self) -> None:
        """A point where the work can stop: check cancel and report (at most every MIN_INTERVAL s)."""
        self._report(force=False)

    def commit(self) -> None:
        """Last cancel check: from here on the result is being written, so cancel() is no longer
        called (a half-written result would be worse than a late cancel); progress still is."""
        self._report(force=True)
        self._cancel = None

    def finish(self) -> None:
        """The run is complete: report done == total (no cancel check: nothing is left to stop)."""
        self._fraction = 1.0
        self.current = None
        if self._progress is not None:
            self._last_call = time.perf_counter()
            self._progress(RESOLUTION, RESOLUTION)

    def callbacks(self) -> tuple[ProgressFn | None, CancelFn | None]:
        """(progress, cancel) for a nested step: its done/total fill the current phase."""
        if not self.enabled:
            return None, None

        # not throttled here: the nested step spaces its own calls (and reports its phase starts)
        def progress(done: int, total: int) -> None:
            self.advance(done, total, force=True)

        def cancel() -> bool:
            return bool(self._cancel is not None and self._cancel())

        return progress, cancel
