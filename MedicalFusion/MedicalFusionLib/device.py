"""Pick the torch device at run time: CUDA, then Apple MPS, then CPU (or what the user forces)."""
from __future__ import annotations

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
