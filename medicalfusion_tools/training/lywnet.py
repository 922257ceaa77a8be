"""Train LYWNet (``medicalfusion train --method lywnet``).

Reading implemented: end-to-end fusion training (both sources through the siamese extractor, the
feature distillation strategy inside the forward pass, losses against both sources), not the
authors' released recipe of an autoencoder trained on single images with the fusion rule applied
only at test time. Reason: with T = 30 the softmax weights of the FDS are close to 1/2 for
autoencoder features of ordinary size, which makes test-time fusion an average of features, i.e.
close to the `alpha` blend this project must beat; training through the FDS lets the features
learn a scale at which the softmax selects the stronger source. Losses: MSE similarity, cosine
intensity and Sobel edge terms (the paper's three) plus an SSIM term to both sources, by default
with the v2 balance (Sobel edge as L1, weight 4; SSIM weight 1; ``MEDICALFUSION_LYWNET_LOSS``); see
:func:`training.losses.lywnet_loss` for targets and weights.

Architecture by default: the shipped variant, i.e. the paper's network (CPU-sized) plus two additions
of ours, a learned gain inside the FDS softmax and a source skip into the output convolution
(``MEDICALFUSION_LYWNET_FDS_GAIN=none`` and ``MEDICALFUSION_LYWNET_SOURCE_SKIP=0`` remove them);
docs/evaluation/networks.md has the runs that led there.
"""
from __future__ import annotations

import copy
import functools

from MedicalFusionLib.errors import FusionError
from MedicalFusionLib.networks.lywnet import DEFAULT_SETTINGS, PAD_MULTIPLE, LYWNet
from MedicalFusionLib.networks.inference import network_fuse_fn
from .loop import TrainConfig, run_training
from .losses import DEFAULT_LYWNET_WEIGHTS, LYWNET_V2_WEIGHTS, lywnet_loss

# The shipped weights (runs lywnet_v2 and lywnet_v4b) were trained with the v2 balance; MEDICALFUSION_LYWNET_LOSS=v1
# trains with the earlier one (MSE 10, cos 1, Sobel-MSE 3, SSIM 3).
LOSS_WEIGHTS = dict(LYWNET_V2_WEIGHTS)
LOSS_PRESETS = {"v1": DEFAULT_LYWNET_WEIGHTS, "v2": LYWNET_V2_WEIGHTS}
SHIPPED_FDS_GAIN = 30.0


def loss_weights_from(spec: str | None) -> dict:
    """Loss weights from ``MEDICALFUSION_LYWNET_LOSS``: empty -> :data:`LOSS_WEIGHTS`; a preset name
    (``v1`` = MSE 10, cos 1, Sobel-MSE 3, SSIM 3; ``v2`` = MSE 10, cos 1, Sobel-L1 4, SSIM 1); or
    ``key=value`` pairs separated by commas (keys mse, cos, edge, edge_l1, ssim), applied over the
    default weights, e.g. ``v2,ssim=2`` or ``edge=0,edge_l1=4,ssim=1``."""
    weights = dict(LOSS_WEIGHTS)
    for part in (spec or "").replace(" ", "").split(","):
        if not part:
            continue
        if part in LOSS_PRESETS:
            weights = dict(LOSS_PRESETS[part])
            continue
        key, sep, value = part.partition("=")
        if not sep or key not in ("mse", "cos", "edge", "edge_l1", "ssim"):
            raise FusionError(f"MEDICALFUSION_LYWNET_LOSS: cannot read '{part}' (presets {sorted(LOSS_PRESETS)}, "
                              "or key=value with keys mse, cos, edge, edge_l1, ssim)")
        try:
            weights[key] = float(value)
        except ValueError:
            raise FusionError(f"MEDICALFUSION_LYWNET_LOSS: '{value}' in '{part}' is not a number") from None
    return weights


def make_config(minutes: float, seed: int) -> TrainConfig:
    # min_signal 0.01: only near-empty crops are redrawn, so the network also sees the black background
    # around the head (with 0.05 a first run left a faint noisy floor there, which SSIM punishes).
    return TrainConfig(crop=96, batch=8, lr=1e-3, val_every=100, patience=8, lr_patience=3,
                       minutes=minutes, seed=seed, min_signal=0.01)


def train(data_root, out_dir=None, minutes: float = 60.0, resume: bool = True, seed: int = 0,
          device: str = "auto", config: TrainConfig | None = None, log=print,
          loss_weights: dict | None = None) -> dict:
    """``loss_weights`` (else ``$MEDICALFUSION_LYWNET_LOSS``, see :func:`loss_weights_from`, else
    :data:`LOSS_WEIGHTS`) sets the weights of :func:`training.losses.lywnet_loss`."""
    import os

    import torch

    weights = dict(loss_weights) if loss_weights is not None else loss_weights_from(
        os.environ.get("MEDICALFUSION_LYWNET_LOSS"))
    cfg = config or make_config(minutes, seed)
    cfg.extra = {"loss": "lywnet_loss", "loss_weights": weights, "optimizer": "Adam",
                 "lr_schedule": "halve after lr_patience rounds without validation improvement",
                 "reading": "end-to-end fusion training through the FDS (not the released autoencoder recipe)"}
    torch.manual_seed(cfg.seed)

    # The shipped weights learn a feature gain inside the FDS softmax (initialised at 30).
    # MEDICALFUSION_LYWNET_FDS_GAIN=none trains the paper's rule (gain 1) instead.
    settings = dict(DEFAULT_SETTINGS)
    gain = os.environ.get("MEDICALFUSION_LYWNET_FDS_GAIN", str(SHIPPED_FDS_GAIN)).strip().lower()
    if gain not in ("", "none", "0"):
        try:
            settings["fds_gain"] = float(gain)
        except ValueError:
            raise FusionError(f"MEDICALFUSION_LYWNET_FDS_GAIN must be a number or 'none', got '{gain}'") from None
    # The shipped weights (run lywnet_v4b) have a source skip: the output convolution also reads both
    # sources (see networks.lywnet). MEDICALFUSION_LYWNET_SOURCE_SKIP=0 trains the paper's reconstructor.
    source_skip = os.environ.get("MEDICALFUSION_LYWNET_SOURCE_SKIP", "").strip().lower() or "1"
    if source_skip not in ("0", "1"):
        raise FusionError(f"MEDICALFUSION_LYWNET_SOURCE_SKIP must be 0 or 1, got '{source_skip}'")
    settings["source_skip"] = source_skip == "1"
    model = LYWNet(**settings)
    description = {
        "architecture": "LYWNet (CPU-sized): preprocessor (3/5/7 convs + fuse, BN+ReLU), strided conv, 3 LYW blocks "
                        "at 1/2 resolution (pyramid residual, residual + micro-PPM, bottleneck, boundary-attention "
                        "fusion), low/deep skip, FDS softmax(T) over the two sources, reconstructor (3x3, 3x3, 1x1)"
                        + (" with the sources read by a 3x3 output conv" if settings["source_skip"] else ""),
        "settings": dict(model.settings),
        "reference": "LYWNet: a multi-scale pyramid residual weight network for medical image fusion, Quant. Imaging Med. Surg., doi:10.21037/qims-24-851",
        "input": "MRI in [0,1] and functional luma (BT.601 Y of PET/SPECT, CT as is) in [0,1]; output fused luma",
    }
    return run_training("lywnet", model, functools.partial(lywnet_loss, weights=weights), cfg, data_root,
                        out_dir=out_dir, resume=resume, device=device, description=description,
                        fuse_wrapper=lambda m: network_fuse_fn(copy.deepcopy(m).eval().fold_bn(),
                                                               torch.device("cpu"), multiple=PAD_MULTIPLE),
                        log=log)
