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

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inference import register_network

DEFAULT_SETTINGS = {"branch": 4, "width": 8, "growth": 8, "layers_full": 2, "layers_half": 3}
# A dense block's layers run slice by slice (inference, CPU) from this many values per slice of the
# block's input: 4x torch's threshold for handing one image to oneDNN (20480), a margin should it move.
# 2 slices of 256x256, 1 thread: ~12 % less CPU time than one strided batched call per layer.
SLICE_BY_SLICE_VALUES = 4 * 20480


class MultiscaleExtractor(nn.Module):
    """Three parallel 3x3 convolutions with dilation 1, 2, 3 (receptive fields 3, 5, 7), concatenated."""

    def __init__(self, branch: int):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(1, branch, 3, padding=d, dilation=d) for d in (1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(torch.cat([b(x) for b in self.branches], dim=1))

    def into_pairs(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Inference: ``forward(x)`` for x = cat([a, b]) (2n images), written as the merge's input
        ``out`` = cat([features of a, features of b], dim=1) ([n, 2 * 3 * branch, H, W]): each branch's
        ReLU writes straight into its channels, no concatenation."""
        n2, _, h, w = x.shape
        n, k = n2 // 2, self.branches[0].out_channels
        by_branch = out.view(n, 2, len(self.branches), k, h, w)
        for i, conv in enumerate(self.branches):
            torch.clamp_min(conv(x).view(2, n, k, h, w).transpose(0, 1), 0, out=by_branch[:, :, i])


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

    def in_buffer(self, features: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Inference: ``forward(x)`` where ``features`` ([N, width + layers * growth, H, W]) holds x in
        its first ``width`` channels. Each layer reads the channels filled so far (the concatenation
        ``forward`` builds, as a view) and its ReLU writes its own channels; the local fusion reads the
        whole buffer. Same operations on the same values as ``forward``: the same bits.

        With several slices the channels filled so far are a strided view, which a convolution first
        copies; one slice's are contiguous. On the CPU the layers therefore run slice by slice when a
        slice is large enough that torch gives one slice to oneDNN as it gives it a batch (torch's own
        convolution takes a single image under 20480 values), so that the bits stay the same."""
        n, width = features.shape[0], self.local_fusion.out_channels
        by_slice = n > 1 and features.device.type == "cpu" and width * features[0, 0].numel() >= SLICE_BY_SLICE_VALUES
        filled = width
        for conv in self.convs:
            grown = features[:, filled:filled + conv.out_channels]
            if by_slice:
                for i in range(n):
                    torch.clamp_min(conv(features[i:i + 1, :filled]), 0, out=grown[i:i + 1])
            else:
                torch.clamp_min(conv(features[:, :filled]), 0, out=grown)
            filled += conv.out_channels
        return torch.add(features[:, :width], self.local_fusion(features), out=out)


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
        # Without autograd: the buffered path (same bits, less cost). Not in the channels-last layout
        # (the wrapper's, at 2 threads), where its channel views would cost a copy per layer; a 3x3
        # weight tells the layout (a 1x1 one is channels-last and contiguous at once).
        if not torch.is_grad_enabled() and self.recon1.weight.is_contiguous():
            return self._infer(a, b)
        n = a.shape[0]
        fa, fb = self.extractor(torch.cat([a, b], dim=0)).split(n, dim=0)
        x0 = F.relu(self.merge(torch.cat([fa, fb], dim=1)))
        x1 = self.rdb_full(x0)
        x2 = self.rdb_half(F.avg_pool2d(x1, 2))
        x2 = F.interpolate(x2, size=x1.shape[-2:], mode="bilinear", align_corners=False)
        feat = x0 + self.global_fusion(torch.cat([x1, x2], dim=1))
        y = F.relu(self.recon1(feat))
        return self.recon2(torch.cat([y, a, b], dim=1))

    def _infer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``forward`` without autograd (inference_mode or no_grad), bit for bit the same output
        (tested against the plain forward in test_networks.py) at less cost: the concatenations are
        channel ranges of a few buffers that each layer writes once (ReLUs and residual sums write
        into them directly), the 2x2 average pooling is four strided additions. On the CPU the
        buffers are kept per thread between calls of the same shape (fresh ones cost a page fault
        per 4 KiB every call). Training (autograd) runs the plain forward: a layer must not write
        into a buffer another layer's saved input views."""
        n, _, h, w = a.shape
        width = self.merge.out_channels
        merged, full, wide, half, recon = _scratch(self, a, n, h, w)
        self.extractor.into_pairs(torch.cat([a, b], dim=0), merged)
        torch.clamp_min(self.merge(merged), 0, out=full[:, :width])
        x0 = full[:, :width]
        x1 = self.rdb_full.in_buffer(full, out=wide[:, :width])
        if h % 2 == 0 and w % 2 == 0 and a.device.type == "cpu":     # (torch's CPU loop is the slow one)
            _avg_pool2_into(x1, half[:, :width])
        else:
            half[:, :width].copy_(F.avg_pool2d(x1, 2))
        x2 = self.rdb_half.in_buffer(half)
        wide[:, width:].copy_(F.interpolate(x2, size=(h, w), mode="bilinear", align_corners=False))
        feat = self.global_fusion(wide).add_(x0)         # x0 + fusion: a float sum commutes exactly
        torch.clamp_min(self.recon1(feat), 0, out=recon[:, :width])
        recon[:, width:width + 1].copy_(a)
        recon[:, width + 1:].copy_(b)
        return self.recon2(recon)


def _avg_pool2_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2)`` for even H and W, into ``out``: the same sum, in the same order
    (top-left, top-right, bottom-left, bottom-right), divided by 4 (torch's CPU kernel loops per output
    pixel; this is four vectorised passes)."""
    n, c, h, w = x.shape
    quad = x.unflatten(2, (h // 2, 2)).unflatten(4, (w // 2, 2))
    torch.add(quad[:, :, :, 0, :, 0], quad[:, :, :, 0, :, 1], out=out)
    out.add_(quad[:, :, :, 1, :, 0]).add_(quad[:, :, :, 1, :, 1])
    return out.div_(4)


_SCRATCH = threading.local()


def _scratch(model: MRDFN, a: torch.Tensor, n: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """The inference buffers for ``n`` slices of ``h`` x ``w``: the inputs of the merge, of the
    global fusion and of the reconstructor's last convolution, and the full- and half-resolution
    dense blocks' features. On the CPU the last shape's buffers are kept per thread (43 MB for 2 slices of 256x256)."""
    sizes = ((n, 2 * model.extractor.branches[0].out_channels * len(model.extractor.branches), h, w),
             (n, model.rdb_full.local_fusion.in_channels, h, w),
             (n, model.global_fusion.in_channels, h, w),
             (n, model.rdb_half.local_fusion.in_channels, h // 2, w // 2),
             (n, model.recon2.in_channels, h, w))
    key = (sizes, a.dtype, a.device, torch.is_inference_mode_enabled())  # inference tensors stay there
    if a.device.type == "cpu" and getattr(_SCRATCH, "key", None) == key:
        return _SCRATCH.buffers
    buffers = tuple(torch.empty(size, dtype=a.dtype, device=a.device) for size in sizes)
    if a.device.type == "cpu":
        _SCRATCH.key, _SCRATCH.buffers = key, buffers
    return buffers


# The half-resolution block pools by 2: inputs are padded to an even size.
PAD_MULTIPLE = 2


register_network("mrdfn", MRDFN, pad_multiple=PAD_MULTIPLE)   # texts: options.METHODS
