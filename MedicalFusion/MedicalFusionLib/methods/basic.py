"""Pixel-wise baselines: the average, the maximum and 3D Slicer's own 50 % overlay."""
from __future__ import annotations

import torch

from .registry import register_function


def fuse_average(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F = (A + B) / 2 on the luma; the functional's colour kept."""
    return (a + b) * 0.5


def fuse_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F = max(A, B) on the luma; the functional's colour kept."""
    return torch.maximum(a, b)


# family, description and paper: options.METHODS
register_function("average", fuse_average, bytes_per_pixel=16)
register_function("max", fuse_max, bytes_per_pixel=16)
# 3D Slicer composites the foreground (functional through its colour map, fully opaque tables)
# over the grey background as RGB = (1 - a) * grey + a * colour with a = the foreground opacity.
# YCbCr is linear in RGB, so at a = 0.5 this is Y = (Ya + Yf) / 2 and Cb/Cr pulled half-way to
# neutral: the same function as `average` with chroma_scale 0.5.
register_function("alpha", fuse_average, chroma_scale=0.5, bytes_per_pixel=16)
