"""Slice-by-slice fusion on the torch device, in batches bounded by time and by the device's memory.

The engine sees only normalised arrays: the anatomical and the functional luma, float32 in [0, 1],
stacked as slices [N, H, W]. Between batches it reports progress and asks whether to cancel; on
cancel it raises :class:`FusionCancelled` and returns nothing, so the caller writes nothing.
Slices where both inputs are zero (padding outside the head) fuse to zero without running the
method.

Batches are sized so that the panel stays responsive: unless a batch size is given, the first
batch is one slice (one chunk for a network), and each later batch holds as many slices as the last batch's seconds per
slice fit into :data:`BATCH_SECONDS` (never more than the memory bound of :func:`batch_size_for`).
Methods do not depend on batch composition, so the sizes change nothing in the result (the
networks run fixed chunks of slices, see :func:`MedicalFusionLib.networks.inference.network_fuse_fn`;
batches are then sized in whole chunks). Inside a
batch, methods whose single slice takes long call :func:`MedicalFusionLib.progress.heartbeat`; the
engine then repeats its last report and asks cancel (at most every 0.1 s).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

import numpy as np
import torch

from .device import cpu_workers, free_memory_bytes, pick_device
from .errors import FusionCancelled
from .methods import FusionMethod, get_method
from .methods.registry import build_method
from .progress import HEARTBEAT_SECONDS, beating

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
MAX_BATCH = 64
#: Seconds of work per batch the engine aims at (progress and a cancel check between batches).
BATCH_SECONDS = 0.1


def batch_size_for(method: FusionMethod, height: int, width: int, device: torch.device) -> int:
    """Slices per batch so that the method's working memory stays within the device budget."""
    per_slice = max(1, method.bytes_per_pixel) * height * width
    return int(max(1, min(MAX_BATCH, free_memory_bytes(device) // per_slice)))


def fuse_slices(anatomical: np.ndarray, functional_y: np.ndarray, method: str | FusionMethod,
                device: str | torch.device = "auto", batch_size: int | None = None,
                progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                batch_seconds: float = BATCH_SECONDS, pool: Executor | None = None) -> np.ndarray:
    """Fuse stacks of slices [N, H, W] (float32 in [0, 1]) and return the fused luma [N, H, W].

    ``batch_size``: slices per batch; None sizes batches by time (``batch_seconds`` of work each,
    the first batch one slice, or one chunk for a method that runs fixed chunks) within the memory
    bound.

    On the CPU, a method whose calls may run side by side (the networks: ``fn.parallel``) runs its
    batches on worker threads, one torch thread each (:func:`~MedicalFusionLib.device.cpu_workers`:
    ``pool``, or a pool of its own when torch has more than one thread), as many batches at a time
    as there are workers: a network's small layers gain little from torch's intra-op threads (MRDFN
    1.25x with two), whole chunks on two cores nearly 2x. The result does not depend on it: every
    chunk runs on one thread, whichever worker takes it. Progress and cancel stay in this thread,
    which waits for the batches in order (reporting every :data:`~MedicalFusionLib.progress.HEARTBEAT_SECONDS`);
    a cancel drops the batches not started and stops a running one at its method's next heartbeat.
    """
    if anatomical.shape != functional_y.shape or anatomical.ndim != 3:
        raise ValueError(f"expected two [N, H, W] stacks of one shape, got {anatomical.shape} and {functional_y.shape}")
    m = get_method(method) if isinstance(method, str) else method
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if cancel is not None and cancel():
        raise FusionCancelled("fusion cancelled")
    parallel = dev.type == "cpu" and bool(getattr(m, "parallel", False))
    if parallel and pool is None and torch.get_num_threads() > 1:
        with cpu_workers(dev) as own:
            return _fuse_slices(anatomical, functional_y, m, dev, batch_size, progress, cancel, batch_seconds, own)
    return _fuse_slices(anatomical, functional_y, m, dev, batch_size, progress, cancel, batch_seconds,
                        pool if parallel else None)


def _fuse_slices(anatomical: np.ndarray, functional_y: np.ndarray, m: FusionMethod, dev: torch.device,
                 batch_size: int | None, progress: ProgressFn | None, cancel: CancelFn | None,
                 batch_seconds: float, pool: Executor | None) -> np.ndarray:
    n, h, w = anatomical.shape
    out = np.zeros((n, h, w), dtype=np.float32)
    nonempty = np.flatnonzero(anatomical.reshape(n, -1).any(axis=1) | functional_y.reshape(n, -1).any(axis=1))
    fn = build_method(m, dev)
    # a method that runs fixed chunks of slices (the networks) is given whole chunks
    chunk = int(getattr(fn, "chunk_for", lambda _h, _w: 1)(h, w))
    limit = batch_size or max(chunk, batch_size_for(m, h, w, dev) // chunk * chunk)
    bs = limit if batch_size else chunk
    total = len(nonempty)
    workers = getattr(pool, "_max_workers", 1) if pool is not None else 1
    if progress:
        progress(0, total)
    done = submitted = 0
    in_flight: deque = deque()            # (indices, future) of the batches handed to the pool
    stopped = threading.Event()           # set when the run ends early: a worker's batch stops at its next beat

    def stop_worker() -> None:
        if stopped.is_set():
            raise FusionCancelled("fusion cancelled")

    def run(idx: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            a = torch.from_numpy(np.ascontiguousarray(anatomical[idx], dtype=np.float32)).unsqueeze(1).to(dev)
            b = torch.from_numpy(np.ascontiguousarray(functional_y[idx], dtype=np.float32)).unsqueeze(1).to(dev)
            f = fn(a, b).squeeze(1).clamp_(0.0, 1.0).float().cpu().numpy()
        return f, (time.perf_counter() - t0) / len(idx)

    def run_in_worker(idx: np.ndarray) -> tuple[np.ndarray, float]:
        with beating(stop_worker, every=0.0):    # the method's heartbeats here only ask whether to stop
            return run(idx)

    def stop_if_cancelled() -> None:
        if cancel is not None and cancel():
            raise FusionCancelled("fusion cancelled")

    def beat() -> None:         # inside a batch: the last report again, and a cancel check
        stop_if_cancelled()
        if progress:
            progress(done, total)

    try:
        with torch.inference_mode(), beating(beat):
            while done < total:
                stop_if_cancelled()
                if pool is None:
                    idx = nonempty[done:done + bs]
                    f, per_slice = run(idx)
                else:
                    while submitted < total and len(in_flight) < workers:
                        idx = nonempty[submitted:submitted + bs]
                        in_flight.append((idx, pool.submit(run_in_worker, idx)))
                        submitted += len(idx)
                    idx, job = in_flight[0]
                    while not finished(job, HEARTBEAT_SECONDS):
                        beat()
                    f, per_slice = job.result()
                    in_flight.popleft()
                out[idx] = f
                done += len(idx)
                if not batch_size:   # size the next batch by the seconds per slice just measured
                    bs = int(max(1, min(limit, batch_seconds // per_slice if per_slice > 0 else limit)))
                    bs = max(chunk, bs // chunk * chunk)
                if progress:
                    progress(done, total)
    finally:
        stopped.set()
        for _idx, job in in_flight:      # a cancel or an error: the batches not started are dropped,
            job.cancel()                 # a running one stops at its next heartbeat
    stop_if_cancelled()
    return out


def finished(job: Future, seconds: float) -> bool:
    """Whether ``job`` is done, waiting up to ``seconds`` for it."""
    try:
        job.exception(timeout=seconds)
    except FutureTimeout:
        return False
    return True


def fuse_volume(anatomical: np.ndarray, functional_y: np.ndarray, method: str | FusionMethod, axis: int = 0,
                **kw) -> np.ndarray:
    """Fuse 3D arrays slice by slice along array ``axis``; the result has the inputs' shape."""
    a = np.moveaxis(anatomical, axis, 0)
    b = np.moveaxis(functional_y, axis, 0)
    return np.moveaxis(fuse_slices(a, b, method, **kw), 0, axis)
