"""MRDFN: multiscale residual dense fusion network, scaled down for a CPU.

Follows the design MRDFN's authors describe (Intelligent Oncology 2026, doi:10.1016/j.intonc.2026.100054):
multiscale feature extraction, residual connections and dense connectivity, trained end to end
with MSE + SSIM + gradient-difference losses against both sources, with no hand-made fusion rule.
The paper's exact layer sizes are not public in what we have (a press summary), so the sizes here
are ours, chosen for a budget of 30 ms per 256x256 pair on two CPU cores:

- a siamese multiscale extractor (shared weights for the two sources): three parallel 3x3
  convolutions with dilation 1, 2, 3 (receptive fields 3, 5, 7), concatenated;
- the two sources' features concatenated and mixed by a 1x1 convolution (8 channels);
- two residual dense blocks (densely connected 3x3 convolutions of 8 channels each, a 1x1 local
  fusion and a local residual): 2 layers at full resolution, then 3 layers at half resolution
  (average-pooled, upsampled back) for a second scale;
- a global 1x1 fusion of both blocks' outputs with a global residual to the merged features;
- a reconstructor (3x3 convolution, then a 3x3 convolution that also sees both sources through a
  skip) that outputs the fused luma directly: no fusion rule anywhere, the loss decides.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .inference import register_network

DEFAULT_SETTINGS = {"branch": 4, "width": 8, "growth": 8, "layers_full": 2, "layers_half": 3}


class MultiscaleExtractor(nn.Module):
    """Three parallel 3x3 convolutions with dilation 1, 2, 3 (receptive fields 3, 5, 7), concatenated."""

    def __init__(self, branch: int):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(1, branch, 3, padding=d, dilation=d) for d in (1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(torch.cat([b(x) for b in self.branches], dim=1))


class ResidualDenseBlock(nn.Module):
    """Densely connected 3x3 convolutions, a 1x1 local fusion and a local residual."""

    def __init__(self, width: int, growth: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(width + i * growth, growth, 3, padding=1) for i in range(layers))
        self.local_fusion = nn.Conv2d(width + layers * growth, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(F.relu(conv(torch.cat(feats, dim=1))))
        return x + self.local_fusion(torch.cat(feats, dim=1))


class MRDFN(nn.Module):
    """Two residual dense blocks, one at full and one at half resolution (the multiscale trunk)."""

    def __init__(self, branch: int = 4, width: int = 8, growth: int = 8, layers_full: int = 2, layers_half: int = 3):
        super().__init__()
        self.settings = dict(branch=branch, width=width, growth=growth, layers_full=layers_full,
                             layers_half=layers_half)
        self.extractor = MultiscaleExtractor(branch)
        self.merge = nn.Conv2d(2 * 3 * branch, width, 1)
        self.rdb_full = ResidualDenseBlock(width, growth, layers_full)
        self.rdb_half = ResidualDenseBlock(width, growth, layers_half)
        self.global_fusion = nn.Conv2d(2 * width, width, 1)
        self.recon1 = nn.Conv2d(width, width, 3, padding=1)
        self.recon2 = nn.Conv2d(width + 2, 1, 3, padding=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        fa, fb = self.extractor(torch.cat([a, b], dim=0)).split(n, dim=0)
        x0 = F.relu(self.merge(torch.cat([fa, fb], dim=1)))
        x1 = self.rdb_full(x0)
        x2 = self.rdb_half(F.avg_pool2d(x1, 2))
        x2 = F.interpolate(x2, size=x1.shape[-2:], mode="bilinear", align_corners=False)
        feat = x0 + self.global_fusion(torch.cat([x1, x2], dim=1))
        y = F.relu(self.recon1(feat))
        return self.recon2(torch.cat([y, a, b], dim=1))


# The half-resolution block pools by 2: inputs are padded to an even size.
PAD_MULTIPLE = 2


register_network("mrdfn", MRDFN, pad_multiple=PAD_MULTIPLE)   # texts: options.METHODS
