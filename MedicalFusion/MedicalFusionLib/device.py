"""Pick the torch device at run time: CUDA, then Apple MPS, then CPU (or what the user forces)."""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import FusionError
from .options import DEVICES as DEVICE_CHOICES  # noqa: F401  (the names live in options.py)


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(preference: str = "auto") -> torch.device:
    """Resolve 'auto' | 'cuda' | 'gpu' | 'mps' | 'cpu' (or 'cuda:1') to an available torch.device."""
    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref == "gpu":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        raise FusionError("no GPU found (neither CUDA nor Apple MPS): choose device 'auto' or 'cpu'")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FusionError("CUDA was requested but torch sees no CUDA GPU: choose device 'auto' or 'cpu'")
        return torch.device(pref)
    if pref == "mps":
        if not mps_available():
            raise FusionError("Apple MPS was requested but is not available: choose device 'auto' or 'cpu'")
        return torch.device("mps")
    if pref == "cpu":
        return torch.device("cpu")
    raise FusionError(f"unknown device '{preference}': choose one of {', '.join(DEVICE_CHOICES)}")


def free_memory_bytes(device: torch.device) -> int:
    """Memory the engine may use on ``device`` for one batch (a conservative share of what is free)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        import os

        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(min(pages * 0.25, 1 << 30))  # at most 1 GiB of working memory on the CPU / MPS
    except (ValueError, OSError, AttributeError):
        return 512 << 20


@contextlib.contextmanager
def cpu_workers(dev: torch.device):
    """On the CPU: torch ops on one thread each, and a pool of as many worker threads as torch had.

    Used by the engine (a network's chunks on every worker, see :func:`MedicalFusionLib.engine.fuse_slices`)
    and the metrics (:mod:`MedicalFusionLib.metrics.torch_engine`).

    The metrics are many small tensor operations; torch's own intra-op threads synchronise at
    every one of them, which on a CPU shared with other work costs several times the work itself
    (measured: FMI 10x slower with 2 intra-op threads than with 1 on a busy 2-core machine). Worker
    threads that each take whole FMI chunks do not wait for each other. The thread count is
    restored afterwards. On a GPU: no pool, nothing changed. The pipeline holds one block over the
    whole run and gives its pool the network's chunks, the slices' metrics and the colour metrics.
    """
    if dev.type != "cpu":
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads > 1:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medicalfusion-cpu") as pool:
                yield pool
        else:
            yield None
    finally:
        torch.set_num_threads(threads)
