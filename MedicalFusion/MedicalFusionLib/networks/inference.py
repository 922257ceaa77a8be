"""Shared by the trained networks: checksummed loading, the wrapper that turns a module into a
registry ``FuseFn`` (eval mode, padding to a multiple, clamping, CPU chunks), and registration."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..methods.registry import FusionMethod, register
from ..progress import heartbeat
from . import weights as _weights

# On the CPU, small chunks keep each layer's activations in cache: measured on the 2-core machine,
# a batch of eight 256x256 slices in one call cost ~3x more per slice than chunks of one or two, and
# since MRDFN's and LYWNet's inference forwards write into kept buffers one 256x256 slice a call
# costs 0.85-0.87x a slice of a chunk of two (docs/evaluation/networks.md, "Inference speed"; the
# same bytes for MRDFN on 256x256 slices, its dense layers running slice by slice either way).
CPU_CHUNK_PIXELS = 256 * 256
# On a GPU, chunks of this many pixels (16 slices of 256x256) keep the device busy.
GPU_CHUNK_PIXELS = 16 * 256 * 256
# On a CPU with more than one torch thread the convolutions run in the channels-last layout
# (oneDNN's native one): faster with 2 threads on the idle 2-core machine, slower with one (MRDFN
# 22 -> 25 ms); outputs differ by rounding only (< 1e-6). The A/B figures are in
# docs/evaluation/networks.md ("Inference speed"). The engine no longer meets this case on the CPU:
# with more than one torch thread it runs a network's batches on one-thread workers
# (engine.fuse_slices), where the model is built in the default layout; it remains for a function
# built and called directly with more threads (scripts/bench.py's bare network).
CPU_CHANNELS_LAST = True


def _layer_done(_module, _inputs, _output) -> None:
    heartbeat()


def report_between_layers(model: nn.Module, depth: int = 3) -> nn.Module:
    """``model`` with a :func:`~MedicalFusionLib.progress.heartbeat` after each of its blocks (the
    submodules up to ``depth`` levels down), for a network whose single slice takes long enough to
    freeze the panel (DM-FNet: ~0.4 s for a 256x256 slice at one thread, more on a busy CPU). Longest
    stretch without a beat on that slice, measured: 300 ms with two levels, 109 ms with three. MRDFN
    and LYWNet (35-70 ms a slice) go without: the hooks cost MRDFN ~4 % (alternating A/B)."""
    level = list(model.children())
    for _ in range(depth):
        for block in level:
            block.register_forward_hook(_layer_done)
        level = [child for block in level for child in block.children()]
    return model


def network_fuse_fn(model: nn.Module, device: torch.device, multiple: int = 1
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap ``model(a, b)`` as ``fn(anat, func_y) -> fused`` (eval, no grad, pad/crop, clamp).

    Same slice, same bytes, whatever the batch: the model always runs on chunks of exactly
    :func:`chunk_slices` slices (about one 256x256 slice on the CPU, sixteen on a GPU; a number that
    depends only on the slice size and the device type), the last chunk of a batch filled up with
    empty slices. A convolution library may pick another algorithm for another batch size (oneDNN
    did: MRDFN on 91x109 slices differed by 4e-7 between a batch of 5 and slices alone, one 8-bit
    level in 3 of 2.7 M output values), but a slice's result does not depend on its place in a
    batch of a given size (eval mode, no batch statistics). ``fuse.chunk_for(h, w)`` tells the
    engine the chunk, so it sizes batches in whole chunks.
    On a CPU with more than one torch thread (counted when the function is built) the model's weights
    are converted to the channels-last layout (:data:`CPU_CHANNELS_LAST`); the one-channel inputs
    need no conversion (they already are channels-last) and the first convolution's output follows
    its weights' layout.
    """
    from ..methods.pyramids import pad_to_multiple

    model = model.to(device).eval()
    channels_last = device.type == "cpu" and CPU_CHANNELS_LAST and torch.get_num_threads() > 1
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def fuse(anat: torch.Tensor, func_y: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            a = anat.to(device=device, dtype=torch.float32)
            b = func_y.to(device=device, dtype=torch.float32)
            if multiple > 1:
                a, (h, w) = pad_to_multiple(a, multiple)
                b, _ = pad_to_multiple(b, multiple)
            else:
                h, w = a.shape[-2:]
            n = a.shape[0]
            chunk = chunk_slices(a.shape[-2], a.shape[-1], device)
            if n % chunk:           # fill the last chunk up: every call sees the same batch size
                fill = chunk - n % chunk
                a = torch.cat([a, a.new_zeros((fill,) + a.shape[1:])])
                b = torch.cat([b, b.new_zeros((fill,) + b.shape[1:])])
            out = torch.cat([model(a[i:i + chunk], b[i:i + chunk]) for i in range(0, n, chunk)])
            out = out[:n, :, :h, :w].clamp_(0.0, 1.0)
        return out.to(anat.device, anat.dtype)

    def chunk_for(height: int, width: int) -> int:
        if multiple > 1:
            height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
        return chunk_slices(height, width, device)

    fuse.model = model  # type: ignore[attr-defined]
    fuse.chunk_for = chunk_for  # type: ignore[attr-defined]
    return fuse


def chunk_slices(height: int, width: int, device: torch.device) -> int:
    """Slices per model call for (padded) slices of ``height`` x ``width`` on ``device``'s type."""
    pixels = CPU_CHUNK_PIXELS if device.type == "cpu" else GPU_CHUNK_PIXELS
    return max(1, pixels // max(1, height * width))


def load_network(name: str, factory: Callable[..., nn.Module]) -> tuple[nn.Module, dict]:
    """Build ``factory(**manifest settings)`` and load the checksummed weights of ``name``."""
    return _weights.build_network(name, lambda entry: factory(**(entry.get("settings") or {})))


def register_network(name: str, factory: Callable[..., nn.Module], pad_multiple: int,
                     prepare: Callable[[nn.Module], nn.Module] | None = None,
                     bytes_per_pixel: int = 2048) -> FusionMethod:
    """Register a network whose weights are ``weights/<name>.pt``: ``build`` loads and verifies
    them, applies ``prepare`` (e.g. BatchNorm folding) and wraps the module with :func:`network_fuse_fn`."""

    def build(device: torch.device):
        model, _entry = load_network(name, factory)
        if prepare is not None:
            model = prepare(model)
        return network_fuse_fn(model, device, multiple=pad_multiple)

    return register(FusionMethod(name=name, build=build, bytes_per_pixel=bytes_per_pixel, parallel=True))
