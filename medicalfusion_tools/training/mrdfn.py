"""Train MRDFN (``medicalfusion train --method mrdfn``): end-to-end fusion, MSE + SSIM + gradient
difference against both sources (see :func:`training.losses.mrdfn_loss` for the targets and weights)."""
from __future__ import annotations

import functools

from MedicalFusionLib.networks.inference import network_fuse_fn
from MedicalFusionLib.networks.mrdfn import DEFAULT_SETTINGS, MRDFN, PAD_MULTIPLE
from .loop import TrainConfig, run_training
from .losses import DEFAULT_MRDFN_WEIGHTS, mrdfn_loss

LOSS_WEIGHTS = dict(DEFAULT_MRDFN_WEIGHTS)


def make_config(minutes: float, seed: int) -> TrainConfig:
    return TrainConfig(crop=96, batch=12, lr=1e-3, val_every=100, patience=8, lr_patience=3,
                       minutes=minutes, seed=seed)


def train(data_root, out_dir=None, minutes: float = 60.0, resume: bool = True, seed: int = 0,
          device: str = "auto", config: TrainConfig | None = None, log=print) -> dict:
    import torch

    cfg = config or make_config(minutes, seed)
    cfg.extra = {"loss": "mrdfn_loss", "loss_weights": LOSS_WEIGHTS, "optimizer": "Adam",
                 "lr_schedule": "halve after lr_patience rounds without validation improvement"}
    torch.manual_seed(cfg.seed)
    model = MRDFN(**DEFAULT_SETTINGS)
    description = {
        "architecture": "MRDFN (CPU-sized): siamese multiscale extractor (3x3 dilation 1/2/3), residual dense "
                        "blocks at full and half resolution, global fusion + residual, reconstructor with source skip",
        "settings": dict(model.settings),
        "reference": "Multiscale residual dense fusion network, Intelligent Oncology 2026, doi:10.1016/j.intonc.2026.100054",
        "input": "MRI in [0,1] and functional luma (BT.601 Y of PET/SPECT, CT as is) in [0,1]; output fused luma",
    }
    return run_training("mrdfn", model, functools.partial(mrdfn_loss, weights=LOSS_WEIGHTS), cfg, data_root,
                        out_dir=out_dir, resume=resume, device=device, description=description,
                        fuse_wrapper=lambda m: network_fuse_fn(m, torch.device("cpu"), multiple=PAD_MULTIPLE),
                        log=log)
