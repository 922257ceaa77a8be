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

import time
from typing import Callable

import numpy as np
import torch

from .device import free_memory_bytes, pick_device
from .errors import FusionCancelled
from .methods import FusionMethod, get_method
from .methods.registry import build_method
from .progress import beating

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
                batch_seconds: float = BATCH_SECONDS) -> np.ndarray:
    """Fuse stacks of slices [N, H, W] (float32 in [0, 1]) and return the fused luma [N, H, W].

    ``batch_size``: slices per batch; None sizes batches by time (``batch_seconds`` of work each,
    the first batch one slice, or one chunk for a method that runs fixed chunks) within the memory
    bound.
    """
    if anatomical.shape != functional_y.shape or anatomical.ndim != 3:
        raise ValueError(f"expected two [N, H, W] stacks of one shape, got {anatomical.shape} and {functional_y.shape}")
    m = get_method(method) if isinstance(method, str) else method
    dev = device if isinstance(device, torch.device) else pick_device(device)
    n, h, w = anatomical.shape
    out = np.zeros((n, h, w), dtype=np.float32)
    nonempty = np.flatnonzero(anatomical.reshape(n, -1).any(axis=1) | functional_y.reshape(n, -1).any(axis=1))
    if cancel is not None and cancel():
        raise FusionCancelled("fusion cancelled")
    fn = build_method(m, dev)
    # a method that runs fixed chunks of slices (the networks) is given whole chunks
    chunk = int(getattr(fn, "chunk_for", lambda _h, _w: 1)(h, w))
    limit = batch_size or max(chunk, batch_size_for(m, h, w, dev) // chunk * chunk)
    bs = limit if batch_size else chunk
    total = len(nonempty)
    if progress:
        progress(0, total)
    start = 0

    def beat() -> None:         # inside a batch: the last report again, and a cancel check
        if cancel is not None and cancel():
            raise FusionCancelled("fusion cancelled")
        if progress:
            progress(start, total)

    with torch.inference_mode(), beating(beat):
        while start < total:
            if cancel is not None and cancel():
                raise FusionCancelled("fusion cancelled")
            idx = nonempty[start:start + bs]
            t0 = time.perf_counter()
            a = torch.from_numpy(np.ascontiguousarray(anatomical[idx], dtype=np.float32)).unsqueeze(1).to(dev)
            b = torch.from_numpy(np.ascontiguousarray(functional_y[idx], dtype=np.float32)).unsqueeze(1).to(dev)
            f = fn(a, b)
            out[idx] = f.squeeze(1).clamp_(0.0, 1.0).float().cpu().numpy()
            start += len(idx)
            if not batch_size:   # size the next batch by the seconds per slice just measured
                per_slice = (time.perf_counter() - t0) / len(idx)
                bs = int(max(1, min(limit, batch_seconds // per_slice if per_slice > 0 else limit)))
                bs = max(chunk, bs // chunk * chunk)
            if progress:
                progress(start, total)
    if cancel is not None and cancel():
        raise FusionCancelled("fusion cancelled")
    return out


def fuse_volume(anatomical: np.ndarray, functional_y: np.ndarray, method: str | FusionMethod, axis: int = 0,
                **kw) -> np.ndarray:
    """Fuse 3D arrays slice by slice along array ``axis``; the result has the inputs' shape."""
    a = np.moveaxis(anatomical, axis, 0)
    b = np.moveaxis(functional_y, axis, 0)
    return np.moveaxis(fuse_slices(a, b, method, **kw), 0, axis)
