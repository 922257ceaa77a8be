"""DM-FNet scaled to the CPU: a diffusion-trained UNet (stage I) feeding a fusion network (stage II).

Following He et al., "DM-FNet: Unified multimodal medical image fusion via diffusion process-trained
encoder-decoder" (code: github.com/HeDan-11/DM-FNet). The structure is the paper's; the sizes are
not (see ``DEFAULT_CONFIG`` and docs/evaluation/dmfnet.md):

* Stage I: an SR3-style UNet (residual blocks with GroupNorm and a noise-level embedding, self-attention
  in the middle) trained as a denoising diffusion model on single images (MRI, CT, functional luma)
  under a cosine schedule with T = 2000; it is given x_t and the noise level and predicts the clean
  image x_0.
* Stage II: the UNet is frozen. Each source gets light noise at a few timesteps (5, 10, 20 as in the
  release); the UNet's decoder features at every resolution feed three fusion modules:
  a timestep-fusion block per resolution (the features of all timesteps merged), a cross-modal
  attention block (channel, spatial and pixel attention giving a per-pixel, per-channel weight
  between the two sources) and a coarse-to-fine aggregation up the resolutions; a small head maps
  the finest aggregate (with the two sources) to the fused Y. The release's head regresses the image
  directly (tanh); with minutes instead of hours of training this head instead predicts a per-pixel
  weight w and a bounded detail term r: F = clamp(w A + (1 - w) B + r/2) (``head_output='mix'``;
  'image' keeps the release's form).

Inference is deterministic: the diffusion noise is drawn from a CPU ``torch.Generator`` seeded with a
fixed seed on every call, one noise image per (timestep, source) shared by every slice of the batch,
then moved to the device. A slice therefore fuses to the same result on any device, alone or in a
batch. Nothing is loaded at import time; ``build`` reads ``weights/dmfnet.pt``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.pyramids import pad_to_multiple
from ..methods.registry import FusionMethod, register
from . import weights as _weights
from .inference import report_between_layers

NAME = "dmfnet"

#: The scaled architecture (the release: inner 64, mults (1, 2, 4, 8, 8), 2 res blocks, ~21 M params).
DEFAULT_CONFIG = {
    "inner_channels": 16,
    "channel_mults": [1, 2, 2, 4],
    "res_blocks": 1,
    "norm_groups": 8,
    "space_to_depth": 2,
    "diffusion_steps": 2000,
    "schedule": "cosine",
    "fusion_timesteps": [5, 10, 20],
    "noise_seed": 20250,
    "head_channels": 16,
    "head_output": "mix",
}


# --------------------------------------------------------------------------------------------------
# Diffusion schedule (shared with training)
# --------------------------------------------------------------------------------------------------
def cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal fraction alpha_bar[t] for t = 0..steps (Nichol & Dhariwal 2021), float64.

    alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2); the per-step betas are
    clipped at 0.999 as in the improved-DDPM paper, and alpha_bar is rebuilt from the clipped betas.
    """
    t = torch.arange(steps + 1, dtype=torch.float64)
    f = torch.cos(((t / steps) + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]
    betas = (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    out = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), 1 - betas]), 0)
    return out


def noise_level(alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The value the UNet is conditioned on: the noise standard deviation sqrt(1 - alpha_bar)."""
    return torch.sqrt((1.0 - alpha_bar_t).clamp(min=0.0))


# --------------------------------------------------------------------------------------------------
# Stage I: the UNet
# --------------------------------------------------------------------------------------------------
class LevelEmbedding(nn.Module):
    """Sinusoidal embedding of the noise level (std in [0, 1], scaled by 1000) followed by an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.SiLU(), nn.Linear(dim * 4, dim))

    def forward(self, level: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=level.device, dtype=torch.float32) / half)
        arg = (level.float() * 1000.0)[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.sin(arg), torch.cos(arg)], dim=1))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions, residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, ch * 3, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                           v.transpose(1, 2)[:, None])[:, 0]
        return x + self.out(y.transpose(1, 2).reshape(b, c, h, w))


class DiffusionUNet(nn.Module):
    """SR3-style UNet: x_t [B,1,H,W] and noise level [B] -> predicted x_0 (and decoder features).

    H and W must be multiples of 2 ** (len(channel_mults) - 1).
    """

    def __init__(self, inner_channels: int = 16, channel_mults=(1, 2, 4, 4), res_blocks: int = 1,
                 norm_groups: int = 8, space_to_depth: int = 1, **_ignored):
        super().__init__()
        self.levels = len(channel_mults)
        self.s2d = int(space_to_depth)
        emb = inner_channels
        self.embed = LevelEmbedding(emb)
        self.stem = nn.Conv2d(self.s2d ** 2, inner_channels, 3, padding=1)
        skip_ch = [inner_channels]
        ch = inner_channels
        self.down = nn.ModuleList()
        for i, m in enumerate(channel_mults):
            for _ in range(res_blocks):
                self.down.append(ResBlock(ch, inner_channels * m, emb, norm_groups))
                ch = inner_channels * m
                skip_ch.append(ch)
            if i < self.levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_ch.append(ch)
        self.mid1 = ResBlock(ch, ch, emb, norm_groups)
        self.mid_attn = SelfAttention(ch, norm_groups)
        self.mid2 = ResBlock(ch, ch, emb, norm_groups)
        self.up = nn.ModuleList()
        self.level_channels = []  # decoder channels per level, finest first
        for i in reversed(range(self.levels)):
            m = channel_mults[i]
            for _ in range(res_blocks + 1):
                self.up.append(ResBlock(ch + skip_ch.pop(), inner_channels * m, emb, norm_groups))
                ch = inner_channels * m
            self.level_channels.insert(0, ch)
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out_norm = nn.GroupNorm(norm_groups, ch)
        self.out_conv = nn.Conv2d(ch, self.s2d ** 2, 3, padding=1)

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1) * self.s2d

    def forward(self, x: torch.Tensor, level: torch.Tensor, features: bool = False):
        emb = self.embed(level)
        if self.s2d > 1:
            x = F.pixel_unshuffle(x, self.s2d)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        feats = []
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                feats.append(h)  # last block of a level, just before upsampling
                h = layer(h)
        feats.append(h)
        feats.reverse()  # finest first
        if features:
            return feats
        out = self.out_conv(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, self.s2d) if self.s2d > 1 else out


# --------------------------------------------------------------------------------------------------
# Stage II: the fusion modules
# --------------------------------------------------------------------------------------------------
class TimestepFusion(nn.Module):
    """Merge one resolution's features of all timesteps: 1x1 conv (n*C -> C), ReLU, 3x3 conv, ReLU."""

    def __init__(self, ch: int, n_steps: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch * n_steps, ch, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CrossModalAttention(nn.Module):
    """Per-pixel, per-channel weight w in (0, 1) between the two sources' features.

    The sum of the two sources is described by a channel attention (global pooling, bottleneck MLP),
    a spatial attention (7x7 conv over the channel mean and max) and, from their sum and the features
    themselves, a pixel attention (a grouped 3x3 conv over each channel's pair of maps, sigmoid), as in
    the release's DEA-Net-style block. Output: w * a + (1 - w) * b + a + b (the release adds the
    sources back as a residual).
    """

    def __init__(self, ch: int, reduction: int = 4):
        super().__init__()
        mid = max(ch // reduction, 4)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, mid, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(mid, ch, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, padding_mode="replicate")
        self.pixel = nn.Conv2d(2 * ch, ch, 3, padding=1, padding_mode="replicate", groups=ch)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = a + b
        sa = self.spatial(torch.cat([s.mean(1, keepdim=True), s.amax(1, keepdim=True)], dim=1))
        coarse = self.channel(s) + sa
        pair = torch.stack([s, coarse], dim=2).flatten(1, 2)  # channel k's two maps side by side
        w = torch.sigmoid(self.pixel(pair))
        return w * a + (1 - w) * b + s


class FusionHead(nn.Module):
    """Timestep fusion, cross-modal attention and coarse-to-fine aggregation, then the output head."""

    def __init__(self, level_channels, n_steps: int, head_channels: int = 16, head_output: str = "mix"):
        super().__init__()
        self.head_output = head_output
        self.tfb = nn.ModuleList(TimestepFusion(c, n_steps) for c in level_channels)
        self.cma = nn.ModuleList(CrossModalAttention(c) for c in level_channels)
        n = len(level_channels)
        # lift[i] brings level i+1's aggregate to level i's channels before the 2x upsampling
        self.lift = nn.ModuleList(nn.Conv2d(level_channels[i + 1], level_channels[i], 1) for i in range(n - 1))
        self.refine = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True))
                                    for c in level_channels)
        self.head = nn.Sequential(nn.Conv2d(level_channels[0] + 2, head_channels, 3, padding=1),
                                  nn.LeakyReLU(0.2, inplace=True),
                                  nn.Conv2d(head_channels, 2 if head_output == "mix" else 1, 3, padding=1))

    def forward(self, feats_a, feats_b, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """feats_x[level] = [B, n_steps*C_level, h, w] (timesteps concatenated); a, b the sources."""
        agg = None
        for i in reversed(range(len(self.tfb))):
            fused = self.cma[i](self.tfb[i](feats_a[i]), self.tfb[i](feats_b[i]))
            if agg is not None:
                fused = fused + F.interpolate(self.lift[i](agg), size=fused.shape[-2:], mode="bilinear",
                                              align_corners=False)
            agg = self.refine[i](fused)
        if agg.shape[-2:] != a.shape[-2:]:  # UNet run on a space-to-depth grid: back to full resolution
            agg = F.interpolate(agg, size=a.shape[-2:], mode="bilinear", align_corners=False)
        out = self.head(torch.cat([agg, a, b], dim=1))
        if self.head_output == "mix":
            # per-pixel weight between the sources plus a bounded detail term (see module docstring)
            w = torch.sigmoid(out[:, :1])
            return (w * a + (1 - w) * b + 0.5 * torch.tanh(out[:, 1:])).clamp(0, 1)
        return torch.sigmoid(out)  # 'image': the release's direct regression of the fused image


class DMFNet(nn.Module):
    """The frozen stage-I UNet plus the stage-II fusion head, on sources in [0, 1]."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = dict(DEFAULT_CONFIG)
        cfg.update(config or {})
        self.config = cfg
        self.unet = DiffusionUNet(**cfg)
        self.steps = list(cfg["fusion_timesteps"])
        self.head = FusionHead(self.unet.level_channels, len(self.steps), cfg["head_channels"],
                               cfg.get("head_output", "image"))
        ab = cosine_alpha_bar(cfg["diffusion_steps"])
        self.register_buffer("alpha_bar", ab.float(), persistent=False)

    def fixed_noise(self, h: int, w: int, device) -> torch.Tensor:
        """[n_steps, 2, 1, h, w] standard normal noise from a CPU generator seeded with the fixed seed."""
        g = torch.Generator(device="cpu").manual_seed(int(self.config["noise_seed"]))
        return torch.randn(len(self.steps), 2, 1, h, w, generator=g).to(device)

    def unet_features(self, a: torch.Tensor, b: torch.Tensor, noise: torch.Tensor):
        """Decoder features of both sources at every level, timesteps concatenated on channels.

        a, b: [B,1,H,W] in [0,1]; noise broadcastable to [n_steps, 2, B, 1, H, W] (same noise for every
        slice at inference). One batched UNet pass over the 2 * n_steps * B noisy images.
        """
        bsz = a.shape[0]
        x0 = torch.stack([a, b]) * 2 - 1  # [2,B,1,H,W] in [-1,1]
        t = torch.tensor(self.steps, device=a.device)
        ab = self.alpha_bar.to(a.device)[t].view(-1, 1, 1, 1, 1, 1)
        if noise.dim() == 5:  # [n, 2, 1, H, W] -> per-slice broadcast
            noise = noise[:, :, None]
        xt = ab.sqrt() * x0[None] + (1 - ab).sqrt() * noise  # [n,2,B,1,H,W]
        n = len(self.steps)
        level = noise_level(ab.view(-1)).float().repeat_interleave(2 * bsz)
        feats = self.unet(xt.reshape(n * 2 * bsz, 1, *a.shape[-2:]), level, features=True)
        out_a, out_b = [], []
        for f in feats:
            f = f.view(n, 2, bsz, *f.shape[1:])
            out_a.append(f[:, 0].permute(1, 0, 2, 3, 4).flatten(1, 2))
            out_b.append(f[:, 1].permute(1, 0, 2, 3, 4).flatten(1, 2))
        return out_a, out_b

    def forward(self, a: torch.Tensor, b: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Fused Y [B,1,H,W] in [0,1]; H, W must be multiples of ``unet.multiple`` (see ``fuse``)."""
        if noise is None:
            noise = self.fixed_noise(a.shape[-2], a.shape[-1], a.device)
        with torch.no_grad():  # the stage-I UNet is frozen in stage II
            fa, fb = self.unet_features(a, b, noise)
        return self.head(fa, fb, a, b)

    @torch.no_grad()
    def fuse(self, anat: torch.Tensor, func_y: torch.Tensor) -> torch.Tensor:
        """Registry contract: any H, W; reflect-padded to the UNet's multiple and cropped back.

        Slices go through the network one at a time (the UNet pass itself is batched over the
        2 sources x 3 timesteps), so a slice's result is bit-identical alone or in any batch.
        """
        m = self.unet.multiple
        a, (h, w) = pad_to_multiple(anat.float(), m)
        b, _ = pad_to_multiple(func_y.float(), m)
        noise = self.fixed_noise(a.shape[-2], a.shape[-1], a.device)
        out = torch.cat([self(a[i:i + 1], b[i:i + 1], noise=noise) for i in range(a.shape[0])])
        return out[..., :h, :w].clamp(0, 1).to(anat.dtype)


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def load_model(device: torch.device | str = "cpu") -> DMFNet:
    """The trained network from ``weights/dmfnet.pt`` (checksum verified), in eval mode on ``device``."""
    model, _entry = _weights.build_network(NAME, lambda entry: DMFNet((entry.get("architecture") or {}).get("config")))
    return model.eval().to(device)


def _build(device):
    model = report_between_layers(load_model(device))
    return model.fuse


register(FusionMethod(   # family, description, paper and availability (weights): options.METHODS
    name=NAME,
    build=_build,
    bytes_per_pixel=4096,  # measured peak ~2.3 kB/pixel for one 256x256 slice on CPU; slices run one at a time
    parallel=True,         # eval mode, the noise from a generator of its own per call: calls may run side by side
))
