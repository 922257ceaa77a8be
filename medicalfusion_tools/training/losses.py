"""Differentiable losses shared by the fusion-network trainers.

All functions take float tensors [B, 1, H, W] in [0, 1] and return a scalar tensor (mean over the
batch) unless said otherwise.

- :func:`ssim`: mean SSIM (Wang et al., IEEE TIP 2004) with an 11x11 Gaussian window, sigma 1.5,
  C1 = (0.01)^2, C2 = (0.03)^2 for data range 1; 'valid' filtering (no padding), as skimage does
  with ``gaussian_weights=True``, minus skimage's border crop.
- :func:`sobel_gradient`: |Gx| + |Gy| with the 3x3 Sobel kernels and replicate padding (same shape).
- :func:`ssim_to_both`, :func:`max_gradient_target`: helpers of the objectives.
- :func:`cosine_intensity`: 1 - cosine similarity of the flattened images (LYWNet's intensity loss).
- :func:`mrdfn_loss`, :func:`lywnet_loss`: the weighted sums the two trainers use (see their docs).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=8)
def _gaussian_1d_cpu(window: int, sigma: float) -> torch.Tensor:
    r = torch.arange(window, dtype=torch.float32) - (window - 1) / 2.0
    g = torch.exp(-(r ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _gaussian_filter_valid(x: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of every channel of ``x``, 'valid' borders."""
    c = x.shape[1]
    g = _gaussian_1d_cpu(window, sigma).to(device=x.device, dtype=x.dtype)
    x = F.conv2d(x, g.view(1, 1, 1, window).expand(c, 1, 1, window), groups=c)
    return F.conv2d(x, g.view(1, 1, window, 1).expand(c, 1, window, 1), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
             data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM map [B, C, H-window+1, W-window+1]."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    c = x.shape[1]
    stats = _gaussian_filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), window, sigma)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    num = (2 * mu_xy + c1) * (2 * (e_xy - mu_xy) + c2)
    den = (mu_xx + mu_yy + c1) * ((e_xx - mu_xx) + (e_yy - mu_yy) + c2)
    return num / den


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Mean SSIM of ``x`` against ``y`` (a similarity in [-1, 1]; use ``1 - ssim`` as a loss)."""
    return ssim_map(x, y, window=window).mean()


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_xy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives (Gx, Gy), same shape as ``x`` (replicate padding)."""
    kx = _SOBEL_X.to(device=x.device, dtype=x.dtype)[None, None]
    ky = kx.transpose(2, 3)
    c = x.shape[1]
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(xp, kx.expand(c, 1, 3, 3), groups=c)
    gy = F.conv2d(xp, ky.expand(c, 1, 3, 3), groups=c)
    return gx, gy


def sobel_gradient(x: torch.Tensor) -> torch.Tensor:
    """|Gx| + |Gy| of the 3x3 Sobel operator, same shape as ``x`` (any channel count)."""
    gx, gy = sobel_xy(x)
    return gx.abs() + gy.abs()


def cosine_intensity(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over the batch of 1 - cos(x, y), each image flattened to a vector."""
    return (1.0 - F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1, eps=eps)).mean()


# ---------------------------------------------------------------------------------------------
# The trainers' objectives.  Both networks are trained for fusion (two sources in, one image out)
# with losses measured against BOTH sources, as MRDFN's paper describes. Each term is kept, and the
# targets the terms are aimed at are chosen so that the result keeps the brighter structure and the
# stronger edge of the two sources (the 'max' targets) while staying structurally similar to each.
# ---------------------------------------------------------------------------------------------

def ssim_to_both(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(SSIM(F, A) + SSIM(F, B)) / 2 in one filtering pass."""
    return ssim(torch.cat([fused, fused], dim=0), torch.cat([a, b], dim=0))


def max_gradient_target(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max(|grad A|, |grad B|) (Sobel), without gradient tracking."""
    with torch.no_grad():
        g = sobel_gradient(torch.cat([a, b], dim=1))
        return torch.maximum(g[:, :1], g[:, 1:2])


DEFAULT_MRDFN_WEIGHTS = {"mse": 10.0, "ssim": 1.0, "grad": 4.0}
DEFAULT_LYWNET_WEIGHTS = {"mse": 10.0, "cos": 1.0, "edge": 3.0, "ssim": 3.0}
# Rebalanced toward MRDFN's objective (run lywnet_v2): the Sobel edge term as an L1 ("edge_l1")
# instead of an MSE, weight 4, and SSIM weight 1.
LYWNET_V2_WEIGHTS = {"mse": 10.0, "cos": 1.0, "edge": 0.0, "edge_l1": 4.0, "ssim": 1.0}


def mrdfn_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: dict | None = None
               ) -> tuple[torch.Tensor, dict]:
    """MRDFN objective: MSE + SSIM + gradient-difference terms, each against both sources.

    - MSE term: MSE(F, max(A, B)), the intensity target both sources contribute to;
    - SSIM term: 1 - (SSIM(F, A) + SSIM(F, B)) / 2;
    - gradient-difference term: L1(|grad F|, max(|grad A|, |grad B|)).
    Returns (total, {term: float}).
    """
    w = dict(DEFAULT_MRDFN_WEIGHTS, **(weights or {}))
    l_mse = F.mse_loss(fused, torch.maximum(a, b))
    l_ssim = 1.0 - ssim_to_both(fused, a, b)
    l_grad = F.l1_loss(sobel_gradient(fused), max_gradient_target(a, b))
    total = w["mse"] * l_mse + w["ssim"] * l_ssim + w["grad"] * l_grad
    return total, {"mse": l_mse.item(), "ssim": l_ssim.item(), "grad": l_grad.item()}


def lywnet_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: dict | None = None
                ) -> tuple[torch.Tensor, dict]:
    """LYWNet objective: MSE similarity + cosine intensity + Sobel edge terms (+ SSIM to both).

    - MSE term: MSE(F, max(A, B));
    - cosine intensity term: 1 - cos(F, max(A, B));
    - Sobel edge term: MSE(|grad F|, max(|grad A|, |grad B|)) (the paper's edge loss is an MSE of
      Sobel features);
    - Sobel edge term as L1 (weight key ``edge_l1``, default 0): L1(|grad F|, max(|grad A|, |grad B|)),
      the same edge target with MRDFN's L1 penalty (keeps large edge errors from dominating);
    - SSIM term: 1 - (SSIM(F, A) + SSIM(F, B)) / 2 (weight 0 gives the paper's three terms only).
    """
    w = dict(DEFAULT_LYWNET_WEIGHTS, **(weights or {}))
    target = torch.maximum(a, b)
    l_mse = F.mse_loss(fused, target)
    l_cos = cosine_intensity(fused, target)
    grad_f, grad_t = sobel_gradient(fused), max_gradient_target(a, b)
    l_edge = F.mse_loss(grad_f, grad_t)
    total = w["mse"] * l_mse + w["cos"] * l_cos + w["edge"] * l_edge
    terms = {"mse": l_mse.item(), "cos": l_cos.item(), "edge": l_edge.item()}
    if w.get("edge_l1", 0.0):
        l_edge_l1 = F.l1_loss(grad_f, grad_t)
        total = total + w["edge_l1"] * l_edge_l1
        terms["edge_l1"] = l_edge_l1.item()
    if w.get("ssim", 0.0):
        l_ssim = 1.0 - ssim_to_both(fused, a, b)
        total = total + w["ssim"] * l_ssim
        terms["ssim"] = l_ssim.item()
    return total, terms
