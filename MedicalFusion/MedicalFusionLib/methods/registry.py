"""The one method registry: the engine, the CLI, the evaluation and the Slicer panel list and run
fusion methods through it, so a method registered here appears everywhere at once.

The registry holds the implementations; what the user sees of a method (name, family, description,
paper, whether its weights are there) is its entry in the torch-free catalogue
:data:`MedicalFusionLib.options.METHODS`, which the CLI's ``methods`` and the panel read without
importing torch. A method registers against that entry: its texts come from there, and a name the
catalogue lacks cannot be registered.

Contract of a method (see DESIGN.md): ``fn(anatomical, functional_y) -> fused_y`` on float tensors
of shape [B, 1, H, W] in [0, 1], on any device, returning the same shape in [0, 1]. A slice must
fuse to the same result alone or in a batch (no batch statistics). H and W are arbitrary: a method
that needs sizes divisible by something pads and crops itself.

Family modules in ``methods/`` and ``networks/`` register their methods at import time with
:func:`register`; :func:`all_methods` imports every module of both packages once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import options as _options
from ..errors import FusionError

FuseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FusionMethod:
    """A registered fusion method.

    name: registry key used on the command line and in the panel.
    description: one line for ``medicalfusion methods`` and the panel tooltip.
    reference: the paper (authors, venue, year) the method follows.
    family: 'basic' | 'pyramid' | 'classic' | 'network'.
    build: ``build(device) -> FuseFn``; called once per run (networks load their weights here).
    chroma_scale: the output keeps Cb/Cr = 0.5 + chroma_scale * (functional Cb/Cr - 0.5); 1.0 keeps
        the functional's colour, 0.5 is Slicer's 50 % foreground blend over a grey background.
    bytes_per_pixel: working memory per slice pixel, used to size batches.
    available: ``available() -> (ok, reason)``; a method whose weights are missing says why.
    parallel: its ``FuseFn`` may be called from several threads at once with the same result (the
        networks: eval mode, no state); on the CPU the engine then runs its batches side by side.
    """

    name: str
    description: str = ""
    reference: str = ""
    family: str = ""
    build: Callable[[torch.device], FuseFn] = None  # type: ignore[assignment]
    chroma_scale: float = 1.0
    bytes_per_pixel: int = 256
    available: Callable[[], tuple[bool, str]] = field(default=lambda: (True, ""))
    parallel: bool = False


_REGISTRY: dict[str, FusionMethod] = {}
_loaded = False
_kept: dict | None = None          # {(name, build, device, torch threads): FuseFn} while keep_built() is on
#: Real ``build`` calls per method name in this process (what :func:`keep_built` saves is visible here).
build_counts: dict[str, int] = {}


def register(method: FusionMethod) -> FusionMethod:
    """Register ``method`` against its catalogue entry (options.METHODS): family, description,
    reference and availability come from there; texts given here must agree with it."""
    try:
        info = _options.method_info(method.name)
    except FusionError:
        raise RuntimeError(f"fusion method '{method.name}' is not in the catalogue: add it to "
                           "MedicalFusionLib.options.METHODS") from None
    for key in ("family", "description", "reference"):
        given = getattr(method, key)
        if given and given != getattr(info, key):
            raise RuntimeError(f"fusion method '{method.name}': its {key} differs from the catalogue's")
    method = dataclasses.replace(method, family=info.family, description=info.description,
                                 reference=info.reference, available=info.available)
    if method.name in _REGISTRY:
        raise RuntimeError(f"fusion method '{method.name}' registered twice")
    _REGISTRY[method.name] = method
    return method


def register_function(name: str, fn: FuseFn, **kw) -> FusionMethod:
    """Register a stateless function (no weights): ``build`` just returns it; being stateless, its
    calls may run side by side (``parallel``, unless ``parallel=False`` is given)."""
    kw.setdefault("parallel", True)
    return register(FusionMethod(name=name, build=lambda device: fn, **kw))


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in ("MedicalFusionLib.methods", "MedicalFusionLib.networks"):
        pkg = importlib.import_module(pkg_name.replace("MedicalFusionLib", __package__.rsplit(".", 1)[0]))
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{info.name}")


def all_methods() -> list[FusionMethod]:
    """Every registered method, in catalogue order (grouped by family)."""
    _load_all()
    return [_REGISTRY[name] for name in _options.method_names() if name in _REGISTRY]


def method_names() -> list[str]:
    return [m.name for m in all_methods()]


def keep_built(on: bool = True) -> None:
    """Keep every method's built function for the life of this process (on), so a network's weights
    are read, checked and loaded once however many volumes it fuses: a cohort worker (medicalfusion_tools/cohort.py)
    turns it on. Off (the default, the CLI and the panel) builds per run and keeps nothing."""
    global _kept
    _kept = {} if on else None


@contextlib.contextmanager
def built_once():
    """Within the block every method is built once, as with :func:`keep_built` (unless that is on
    already); what was built is dropped after it. One run's slabs (the pipeline streams them) share
    one build of the method, and a network's weights are read once."""
    global _kept
    if _kept is not None:
        yield
        return
    _kept = {}
    try:
        yield
    finally:
        _kept = None


def build_method(method: FusionMethod, device: torch.device) -> FuseFn:
    """``method.build(device)``, or the one kept from an earlier call with the same method, device
    and torch thread count (a network's CPU layout depends on it) while :func:`keep_built` is on."""
    key = (method.name, method.build, str(device), torch.get_num_threads())
    if _kept is not None and key in _kept:
        return _kept[key]
    fn = method.build(device)
    build_counts[method.name] = build_counts.get(method.name, 0) + 1
    if _kept is not None:
        _kept[key] = fn
    return fn


def get_method(name: str) -> FusionMethod:
    _options.method_info(name)           # unknown: the catalogue's one-line error, before any import
    _load_all()
    if name not in _REGISTRY:
        raise FusionError(f"method '{name}' is listed but its implementation did not load")
    return _REGISTRY[name]
