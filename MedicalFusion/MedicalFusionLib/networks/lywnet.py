"""LYWNet: multi-scale pyramid residual weight network (Quant. Imaging Med. Surg., doi:10.21037/qims-24-851), CPU-sized.

The paper's structure, with our (much smaller) channel counts so a 256x256 pair runs in tens of
milliseconds on two CPU cores instead of seconds:

- feature preprocessor: three convolutions of kernel 3, 5 and 7 on the input, concatenated along
  channels and fused by a fourth convolution; each convolution followed by BN + ReLU;
- feature extractor: three LYW blocks in series. Each block has three branches fed by the same
  input:
  * a pyramid residual branch (the input at full, 1/2 and 1/4 resolution, one 3x3 convolution per
    level, upsampled and added to the input),
  * a residual branch (a basic residual block) followed by a micro pyramid pooling module (two
    average-pooling scales, 1/4 and 1/8, 1x1 reductions, upsampled and concatenated with the input,
    1x1 fusion),
  * a bottleneck branch (1x1 reduce, 3x3, 1x1 expand, residual),
  and a boundary-attention-guided (BAG) fusion: with sigma = sigmoid(bottleneck/boundary branch),
  out = conv(sigma * detail + (1 - sigma) * context), detail = pyramid branch, context = PPM branch
  (sigma > 0.5 leans on detail, otherwise on context, as the paper puts it);
- a skip connection adds the preprocessor's low-level features to the deep features (a
  concatenation instead was tried and not adopted: docs/evaluation/networks.md, run v4a);
- feature distillation strategy (FDS): per element, the two sources' features are weighted by a
  softmax over the sources with temperature T, F = sum_i softmax(phi_i / T) * phi_i (T = 30 as in
  the paper);
- reconstructor: two 3x3 convolutions and one 1x1 convolution to the fused luma. With
  ``source_skip=True`` (not in the paper; MRDFN's output layer does this) the last convolution is a
  3x3 one that reads the two source images beside the reconstructor's features, so fine detail of
  either source can reach the output without passing through the FDS.

The extractor is siamese (shared weights for the two sources). We train the whole network end to
end for fusion (the FDS inside the forward pass, losses against both sources), which is one of the
two readings the paper allows; see docs/evaluation/networks.md for why.

All BatchNorms are folded into the preceding convolutions at inference (:meth:`LYWNet.fold_bn`),
which gives the same output as eval-mode BN and is faster.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inference import register_network

DEFAULT_SETTINGS = {"channels": 8, "blocks": 3, "temperature": 30.0}


class ConvBN(nn.Module):
    """Convolution + BatchNorm (+ ReLU); :meth:`fold` merges the BN into the convolution."""

    def __init__(self, cin: int, cout: int, k: int, relu: bool = True, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return _relu(y) if self.relu else y

    @torch.no_grad()
    def fold(self) -> None:
        if isinstance(self.bn, nn.Identity):
            return
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size,
                         stride=self.conv.stride, padding=self.conv.padding, bias=True)
        conv.weight.copy_(self.conv.weight * scale[:, None, None, None])
        conv.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv = conv.to(self.conv.weight.device)
        self.bn = nn.Identity()


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# Inference (no autograd) runs the same operations on the same values, with the sums and ReLUs done in
# place on intermediates nothing else holds (one allocation and one pass fewer each; the same bits:
# a float sum commutes exactly) and the average poolings as strided sums. Training records them
# out of place, as autograd needs.
def _plus(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``; into ``fresh`` (an intermediate no one else holds) when autograd is off."""
    return fresh + other if torch.is_grad_enabled() else fresh.add_(other)


def _relu(fresh: torch.Tensor) -> torch.Tensor:
    return F.relu(fresh) if torch.is_grad_enabled() else fresh.relu_()


def _avg_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.avg_pool2d(x, k)``. Without autograd and for sizes divisible by ``k``: the same sum of the
    k x k window in the same order (row by row, as torch's CPU loop adds them), divided by k*k, as
    k*k - 1 strided vectorised additions instead of torch's per-pixel loop: the same bits."""
    h, w = x.shape[-2:]
    if torch.is_grad_enabled() or h % k or w % k or x.device.type != "cpu" or not x.is_contiguous():
        return F.avg_pool2d(x, k)       # (channels-last: torch's kernel, vectorised over channels there)
    window = x.unflatten(-2, (h // k, k)).unflatten(-1, (w // k, k))      # [..., H/k, k, W/k, k]
    out = window[..., 0, :, 0] + window[..., 0, :, 1]
    for i in range(k):
        for j in range(2 if i == 0 else 0, k):
            out.add_(window[..., i, :, j])
    return out.div_(k * k)


class Preprocessor(nn.Module):
    """Convolutions of kernel 3, 5 and 7 on the input, concatenated, fused by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        k3 = channels // 2
        k57 = max((channels - k3) // 2, 1)
        self.k3 = ConvBN(1, k3, 3)
        self.k5 = ConvBN(1, k57, 5)
        self.k7 = ConvBN(1, k57, 7)
        self.fuse = ConvBN(k3 + 2 * k57, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not self.fuse.conv.weight.is_contiguous():   # (training; channels-last,
            return self.fuse(torch.cat([self.k3(x), self.k5(x), self.k7(x)], dim=1))  # where cat is the fast way)
        # without autograd each branch's ReLU writes straight into its channels of the fusion's input
        joined = x.new_empty((x.shape[0], self.fuse.conv.in_channels) + x.shape[2:])
        start = 0
        for branch in (self.k3, self.k5, self.k7):
            stop = start + branch.conv.out_channels
            torch.clamp_min(branch.bn(branch.conv(x)), 0, out=joined[:, start:stop])
            start = stop
        return self.fuse(joined)


class PyramidResidual(nn.Module):
    """The detail branch: the input at 1, 1/2 and 1/4 resolution, one 3x3 convolution per level,
    coarse levels upsampled step by step and added to the input (residual)."""

    def __init__(self, c: int):
        super().__init__()
        self.levels = nn.ModuleList(ConvBN(c, c, 3, relu=False) for _ in range(3))

    def forward(self, x: torch.Tensor, p2: torch.Tensor, p4: torch.Tensor) -> torch.Tensor:
        coarse = _plus(self.levels[1](p2), _up(self.levels[2](p4), p2.shape[-2:]))
        return _relu(_plus(_plus(self.levels[0](x), x), _up(coarse, x.shape[-2:])))   # x + level + coarse


class MicroPPM(nn.Module):
    """Pyramid pooling with two local scales (1/4, 1/8): each pooled map reduced by a 1x1
    convolution, upsampled, concatenated with the input and fused by a 1x1 convolution. The 1x1
    fusion of a concatenation is a sum of per-part 1x1 convolutions, and upsampling commutes with
    1x1 convolutions, so it is computed that way (one full-size upsampling instead of two)."""

    def __init__(self, c: int):
        super().__init__()
        r = max(c // 2, 2)
        self.reduce = nn.ModuleList(ConvBN(c, r, 1) for _ in range(2))
        self.fuse_x = nn.Conv2d(c, c, 1, bias=False)
        self.fuse_pooled = nn.ModuleList(nn.Conv2d(r, c, 1, bias=False) for _ in range(2))
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor, p4: torch.Tensor, p8: torch.Tensor) -> torch.Tensor:
        q8 = self.fuse_pooled[1](self.reduce[1](p8))
        q4 = _plus(self.fuse_pooled[0](self.reduce[0](p4)), _up(q8, p4.shape[-2:]))
        return _relu(self.bn(_plus(self.fuse_x(x), _up(q4, x.shape[-2:]))))


class ResidualPPM(nn.Module):
    """The context branch: a basic residual block followed by the micro-PPM."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = ConvBN(c, c, 3, relu=False)
        self.ppm = MicroPPM(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _relu(_plus(self.conv(x), x))
        p4 = _avg_pool(y, 4)
        return self.ppm(y, p4, _avg_pool(p4, 2))


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        m = max(c // 2, 2)
        self.reduce = ConvBN(c, m, 1)
        self.mid = ConvBN(m, m, 3)
        self.expand = ConvBN(m, c, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _plus(self.expand(self.mid(self.reduce(x))), x)


class LYWBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.detail = PyramidResidual(c)
        self.context = ResidualPPM(c)
        self.boundary = Bottleneck(c)
        self.out = ConvBN(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p2 = _avg_pool(x, 2)
        detail = self.detail(x, p2, _avg_pool(p2, 2))
        sigma = torch.sigmoid(self.boundary(x))
        if torch.is_grad_enabled():
            return self.out(sigma * detail + (1.0 - sigma) * self.context(x))
        rest = (1.0 - sigma).mul_(self.context(x))
        return self.out(sigma.mul_(detail).add_(rest))


def feature_distillation(fa: torch.Tensor, fb: torch.Tensor, temperature: float, gain=1.0) -> torch.Tensor:
    """FDS: element-wise softmax over the two sources with temperature T, then the weighted sum.

    ``gain`` (1 in the paper) scales the features inside the softmax only: weights
    softmax(gain * phi_i / T), sum of weights * phi_i."""
    if torch.is_grad_enabled():
        wa = torch.sigmoid(gain * (fa - fb) / temperature)  # = softmax([fa, fb] * gain / T)[0]
        return fb + wa * (fa - fb)
    # the same operations, the difference computed once and the rest in place (1.0 * d is d exactly)
    d = fa - fb
    wa = torch.sigmoid_(d / temperature if isinstance(gain, float) and gain == 1.0 else gain * d / temperature)
    return wa.mul_(d).add_(fb)


class LYWNet(nn.Module):
    def __init__(self, channels: int = 8, blocks: int = 3, temperature: float = 30.0, fds_gain: float | None = None,
                 source_skip: bool = False):
        super().__init__()
        self.settings = dict(channels=channels, blocks=blocks, temperature=float(temperature))
        self.source_skip = bool(source_skip)
        if self.source_skip:  # settings of weights trained before the option existed stay as they were
            self.settings["source_skip"] = True
        self.temperature = float(temperature)
        # Optional learned gain on the features inside the FDS softmax (log-parameterised, starts at
        # ``fds_gain``). None = the paper's rule. BN keeps features near unit scale, where T = 30
        # makes the softmax weights ~1/2 (an average); the gain lets the network make them selective.
        self.log_gain = None
        if fds_gain is not None:
            self.settings["fds_gain"] = float(fds_gain)
            self.log_gain = nn.Parameter(torch.tensor(float(fds_gain)).log())
        self.pre = Preprocessor(channels)
        self.down = ConvBN(channels, channels, 3, stride=2)
        self.blocks = nn.Sequential(*[LYWBlock(channels) for _ in range(blocks)])
        recon = [ConvBN(channels, channels, 3), ConvBN(channels, channels // 2, 3)]
        if self.source_skip:  # the output conv reads the features and both sources (forward)
            self.out = nn.Conv2d(channels // 2 + 2, 1, 3, padding=1)
        else:  # the paper's 1x1 output conv, inside recon (the state_dict keys of earlier weights)
            recon.append(nn.Conv2d(channels // 2, 1, 1))
        self.recon = nn.Sequential(*recon)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Low-level features at full resolution plus the LYW blocks' deep features (computed at
        half resolution, upsampled): the skip connection between low-level and deep features."""
        low = self.pre(x)
        deep = self.blocks(self.down(low))
        return _plus(F.interpolate(deep, size=low.shape[-2:], mode="bilinear", align_corners=False), low)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        fa, fb = self.features(torch.cat([a, b], dim=0)).split(n, dim=0)
        gain = 1.0 if self.log_gain is None else self.log_gain.exp()
        fused = self.recon(feature_distillation(fa, fb, self.temperature, gain))
        return self.out(torch.cat([fused, a, b], dim=1)) if self.source_skip else fused

    def fold_bn(self) -> "LYWNet":
        """Fold every BatchNorm into its convolution (inference only: call after eval())."""
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.fold()
        return self


# The blocks run at 1/2 resolution, where the pyramid pools by 4 and the micro-PPM by 8: pad to 16.
PAD_MULTIPLE = 16


register_network("lywnet", LYWNet, pad_multiple=PAD_MULTIPLE,   # texts: options.METHODS
                 prepare=lambda model: model.eval().fold_bn())
