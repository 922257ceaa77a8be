"""Two-stage training of DM-FNet (scaled to the CPU) on the aanlib train split.

Stage I  trains the UNet of ``networks/dmfnet.py`` as a denoising diffusion model on single images
         (every MRI and every functional luma / CT of the train split): x_t = sqrt(ab_t) x_0 +
         sqrt(1 - ab_t) eps under the cosine schedule (T = 2000), the UNet sees x_t and the noise
         level and predicts x_0 (images in [-1, 1]); loss L1(x0_hat, x_0). Half the timesteps are
         drawn uniformly from 1..T, half from 1..200, so the light-noise regime stage II uses
         (t = 5, 10, 20) is well covered in a short run.
Stage II freezes the UNet and trains the fusion head with the release's hybrid loss
         L = 1.5 |F - max(A,B)|_1 + | grad F - max(grad A, grad B) |_1 + 0.5 (1 - SSIM_cs),
         grad = |Sobel x| + |Sobel y|, SSIM_cs the contrast-structure SSIM map of F against, per
         pixel, the source with the larger local standard deviation (as the release's fs_loss does).

Both stages are time-budgeted, checkpoint every minute to ``out_dir`` and resume; ``train`` runs the
unfinished stage(s). ``MEDICALFUSION_DMFNET_STAGE`` = 1 | 2 | both (default) restricts a call to one
stage, which then gets the whole ``minutes``. At the end the whole network (frozen UNet + head) goes
to ``weights/dmfnet.pt`` with its manifest entry.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from MedicalFusionLib.device import pick_device
from MedicalFusionLib.networks import weights as W
from MedicalFusionLib.networks.dmfnet import DEFAULT_CONFIG, DMFNet, count_parameters, noise_level
from .data import default_data_root, load_stack, read_split
from .losses import sobel_gradient

STAGE1_CROP = 64
STAGE1_BATCH = 16
STAGE1_LR = 5e-4
STAGE2_CROP = 96
STAGE2_BATCH = 8
STAGE2_LR = 1e-3
LIGHT_T_MAX = 200
CHECKPOINT_EVERY_S = 60.0
RELEASE_UNET_PARAMS = 21_000_000  # the release's SR3 UNet (inner 64, mults 1-2-4-8-8, 2 res blocks)


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------
def _gauss(window: int = 11, sigma: float = 1.5, like: torch.Tensor | None = None) -> torch.Tensor:
    r = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    k = (g[:, None] * g[None, :])[None, None]
    return k.to(like) if like is not None else k


def contrast_structure_maps(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor, window: int = 11):
    """(cs(F,A), cs(F,B), sigma_A, sigma_B) on the 'valid' Gaussian-window grid (data range 1).

    cs(x, y) = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2), the SSIM without its luminance term.
    """
    k = _gauss(window, like=f)
    c2 = 0.03 ** 2

    def stats(x, y):
        mx, my = F.conv2d(x, k), F.conv2d(y, k)
        vx = (F.conv2d(x * x, k) - mx * mx).clamp(min=0)
        vy = (F.conv2d(y * y, k) - my * my).clamp(min=0)
        cxy = F.conv2d(x * y, k) - mx * my
        return (2 * cxy + c2) / (vx + vy + c2), vy

    cs_a, va = stats(f, a)
    cs_b, vb = stats(f, b)
    return cs_a, cs_b, va.sqrt(), vb.sqrt()


def hybrid_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The release's stage-II objective (weights 1.5 / 1 / 0.5); returns (total, {term: float})."""
    l_int = F.l1_loss(fused, torch.maximum(a, b))
    l_grad = F.l1_loss(sobel_gradient(fused), torch.maximum(sobel_gradient(a), sobel_gradient(b)))
    cs_a, cs_b, sd_a, sd_b = contrast_structure_maps(fused, a, b)
    l_ssim = 1 - torch.where(sd_a >= sd_b, cs_a, cs_b).mean()
    total = 1.5 * l_int + l_grad + 0.5 * l_ssim
    return total, {"int": l_int.item(), "grad": l_grad.item(), "ssim": l_ssim.item()}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def split_train_val(records, val_fraction: float = 0.1, seed: int = 0):
    """Case-disjoint split of the train records: about ``val_fraction`` of the cases per pair type, and
    none from a pair type with fewer than 5 training cases (aanlib's PET-MRI train split has only 2)."""
    rng = np.random.default_rng(seed)
    val = set()
    for pair in sorted({r.pair for r in records}):
        cases = sorted({r.case for r in records if r.pair == pair})
        n = max(1, int(round(len(cases) * val_fraction))) if len(cases) >= 5 else 0
        val.update((pair, c) for c in rng.choice(cases, size=n, replace=False))
    tr = [r for r in records if (r.pair, r.case) not in val]
    va = [r for r in records if (r.pair, r.case) in val]
    return tr, va


def random_crops(stack: np.ndarray, n: int, size: int, rng: np.random.Generator, min_mean: float = 0.03,
                 tries: int = 8) -> np.ndarray:
    """n random crops [n, C, size, size] from stack [N, C, H, W], avoiding near-empty background
    crops (up to ``tries`` redraws), with random flips and 90-degree rotations."""
    N, C, H, W = stack.shape
    out = np.empty((n, C, size, size), dtype=np.float32)
    for i in range(n):
        for _ in range(tries):
            k = rng.integers(N)
            y, x = rng.integers(0, H - size + 1), rng.integers(0, W - size + 1)
            crop = stack[k, :, y:y + size, x:x + size]
            if crop.mean() >= min_mean:
                break
        if rng.random() < 0.5:
            crop = crop[:, :, ::-1]
        crop = np.rot90(crop, k=int(rng.integers(4)), axes=(1, 2))
        out[i] = crop
    return out


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def _save_ckpt(path: pathlib.Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _load_ckpt(path: pathlib.Path):
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def _lr_at(base: float, frac: float) -> float:
    """Cosine decay from base to base/20 over the time budget (frac = elapsed / budget)."""
    frac = min(max(frac, 0.0), 1.0)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


# --------------------------------------------------------------------------------------------------
# Stage I
# --------------------------------------------------------------------------------------------------
def _start_stage(name: str, ckpt: pathlib.Path, resume: bool, key: str, part: torch.nn.Module, opt,
                 crop_seed: int, noise_seed: int, log):
    """A stage's state and random streams (crops: numpy, noise: torch), fresh or, with ``resume`` and a
    checkpoint, where it stopped: ``part`` (saved under ``key``) and ``opt`` reloaded and both streams
    reseeded past the steps already made. Returns (state, rng, gen)."""
    state = {"step": 0, "elapsed": 0.0, "done": False, "history": []}
    rng = np.random.default_rng(crop_seed)
    gen = torch.Generator().manual_seed(noise_seed)
    prev = _load_ckpt(ckpt) if resume else None
    if prev is not None:
        part.load_state_dict(prev[key])
        opt.load_state_dict(prev["opt"])
        state = prev["state"]
        rng = np.random.default_rng(crop_seed + state["step"])
        gen.manual_seed(noise_seed + state["step"])
        log(f"stage {name}: resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min)")
    return state, rng, gen


def _run_stage(stage: int, state: dict, budget: float, lr0: float, opt, step, terms: tuple, report_every: int,
               validate_every: int, validate, part: torch.nn.Module, save, log, max_steps: int | None) -> dict:
    """The loop both stages share, until ``budget`` seconds of training (``state["elapsed"]``, which
    a resumed run continues) or ``max_steps``: the learning rate on its schedule (:func:`_lr_at`),
    ``step()`` (one batch; returns its loss ``terms``), a log line with the terms' means every
    ``report_every`` steps and the held-out ``validate()`` every ``validate_every`` (``part`` back
    in training mode after it), a checkpoint (``save()``) every CHECKPOINT_EVERY_S seconds and at
    the end, with the final validation."""
    t0, last_ckpt, run = time.time(), time.time(), []
    start_elapsed = state["elapsed"]
    while True:
        state["elapsed"] = start_elapsed + (time.time() - t0)
        if state["elapsed"] >= budget or (max_steps is not None and state["step"] >= max_steps):
            break
        for g_ in opt.param_groups:
            g_["lr"] = _lr_at(lr0, state["elapsed"] / budget)
        run.append(step())
        state["step"] += 1
        if state["step"] % report_every == 0:
            means = np.mean(run, axis=0)
            msg = {"stage": stage, "step": state["step"], "min": round(state["elapsed"] / 60, 2)}
            msg.update({name: round(float(m), 5) for name, m in zip(terms, means)})
            msg["lr"] = opt.param_groups[0]["lr"]
            if state["step"] % validate_every == 0:
                msg["val"] = validate()
                part.train()
            state["history"].append(msg)
            log(json.dumps(msg))
            run = []
        if time.time() - last_ckpt > CHECKPOINT_EVERY_S:
            save()
            last_ckpt = time.time()
    state["done"] = True
    state["final_val"] = validate()
    log(json.dumps({"stage": stage, "done": True, "steps": state["step"], "val": state["final_val"]}))
    save()
    return state


def train_stage1(model: DMFNet, train_imgs: np.ndarray, val_imgs: np.ndarray, ckpt: pathlib.Path,
                 seconds: float, resume: bool, seed: int, device: torch.device, log=print,
                 crop: int = STAGE1_CROP, batch: int = STAGE1_BATCH, max_steps: int | None = None) -> dict:
    """Diffusion training of ``model.unet`` on single images [N,1,H,W] in [0,1]; returns stats."""
    unet = model.unet.to(device).train()
    opt = torch.optim.Adam(unet.parameters(), lr=STAGE1_LR)
    state, rng, gen = _start_stage("I", ckpt, resume, "unet", unet, opt, seed + 1, seed + 11, log)
    if state["done"]:
        return state
    T = model.config["diffusion_steps"]
    ab_all = model.alpha_bar.to(device)
    budget = state.get("budget", seconds)  # a resumed run keeps its first budget (and its LR schedule)
    state["budget"] = budget

    def save():
        _save_ckpt(ckpt, {"unet": unet.state_dict(), "opt": opt.state_dict(), "state": state})

    def step() -> list:
        x0 = torch.from_numpy(random_crops(train_imgs, batch, crop, rng)).to(device) * 2 - 1
        half = batch // 2
        t = torch.cat([torch.randint(1, T + 1, (half,), generator=gen),
                       torch.randint(1, LIGHT_T_MAX + 1, (batch - half,), generator=gen)]).to(device)
        ab = ab_all[t].view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        pred = unet(xt, noise_level(ab.view(-1)))
        loss = F.l1_loss(pred, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return [loss.item()]

    def validate():
        return stage1_validation(model, val_imgs, device)

    return _run_stage(1, state, budget, STAGE1_LR, opt, step, ("loss",), 100, 500, validate, unet, save, log,
                      max_steps)


@torch.no_grad()
def stage1_validation(model: DMFNet, val_imgs: np.ndarray, device, n: int = 8) -> dict:
    """L1 of the x_0 prediction on the first ``n`` held-out images at a few fixed timesteps."""
    unet = model.unet.eval()
    if len(val_imgs) == 0:
        return {}
    idx = np.linspace(0, len(val_imgs) - 1, min(n, len(val_imgs))).astype(int)
    x0 = torch.from_numpy(val_imgs[idx]).to(device) * 2 - 1
    x0, _ = _pad16(x0, model.unet.multiple)
    g = torch.Generator().manual_seed(123)
    out = {}
    for t in (10, 100, 500, 1500):
        ab = model.alpha_bar[t].to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        pred = unet(xt, noise_level(ab.expand(len(x0))))
        out[f"t{t}"] = round(float(F.l1_loss(pred, x0)), 5)
    return out


def _pad16(x, m):
    from MedicalFusionLib.methods.pyramids import pad_to_multiple
    return pad_to_multiple(x, m)


# --------------------------------------------------------------------------------------------------
# Stage II
# --------------------------------------------------------------------------------------------------
def train_stage2(model: DMFNet, train_pairs: np.ndarray, val_pairs: np.ndarray, ckpt: pathlib.Path,
                 seconds: float, resume: bool, seed: int, device: torch.device, log=print,
                 crop: int = STAGE2_CROP, batch: int = STAGE2_BATCH, max_steps: int | None = None) -> dict:
    """Train ``model.head`` on pairs [N,2,H,W] with the UNet frozen; returns stats."""
    model.to(device)
    model.unet.eval().requires_grad_(False)
    head = model.head.train()
    opt = torch.optim.Adam(head.parameters(), lr=STAGE2_LR)
    state, rng, gen = _start_stage("II", ckpt, resume, "head", head, opt, seed + 2, seed + 22, log)
    if state["done"]:
        return state
    budget = state.get("budget", seconds)
    state["budget"] = budget
    n_steps = len(model.steps)

    def save():
        _save_ckpt(ckpt, {"head": head.state_dict(), "opt": opt.state_dict(), "state": state})

    def step() -> list:
        x = torch.from_numpy(random_crops(train_pairs, batch, crop, rng)).to(device)
        a, b = x[:, :1], x[:, 1:]
        noise = torch.randn(n_steps, 2, batch, 1, crop, crop, generator=gen).to(device)
        fused = model(a, b, noise=noise)
        loss, terms = hybrid_loss(fused, a, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return [loss.item(), terms["int"], terms["grad"], terms["ssim"]]

    def validate():
        return stage2_validation(model, val_pairs, device)

    return _run_stage(2, state, budget, STAGE2_LR, opt, step, ("loss", "int", "grad", "ssim"), 25, 200, validate,
                      head, save, log, max_steps)


@torch.no_grad()
def stage2_validation(model: DMFNet, val_pairs: np.ndarray, device, n: int = 6) -> float | None:
    """Hybrid loss on ``n`` held-out full-size pairs with the fixed inference noise."""
    if len(val_pairs) == 0:
        return None
    model.head.eval()
    idx = np.linspace(0, len(val_pairs) - 1, min(n, len(val_pairs))).astype(int)
    x = torch.from_numpy(val_pairs[idx]).to(device)
    fused = model.fuse(x[:, :1], x[:, 1:])
    return round(float(hybrid_loss(fused, x[:, :1], x[:, 1:])[0]), 5)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def train(data_root=None, out_dir=None, minutes: float = 60.0, resume: bool = True, seed: int = 0,
          device: str = "auto", stage: str | None = None, config: dict | None = None,
          max_records: int | None = None, save_weights: bool = True) -> dict:
    """Run stage I then stage II (whichever is unfinished), then save ``weights/dmfnet.pt``.

    minutes: the total budget of this call; split evenly when both stages remain to be run.
    stage: '1', '2' or 'both' (default: $MEDICALFUSION_DMFNET_STAGE or 'both').
    Returns the manifest entry written (or the stage state when weights are not saved yet).
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    stage = str(stage or os.environ.get("MEDICALFUSION_DMFNET_STAGE", "both")).lower()
    dev = pick_device(device)
    root = pathlib.Path(data_root) if data_root else default_data_root()
    out = pathlib.Path(out_dir) if out_dir else pathlib.Path(__file__).resolve().parents[2] / "runs" / "dmfnet"
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train.log"

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    records = read_split(root, "train")
    if max_records:
        records = records[:max_records]
    tr, va = split_train_val(records, seed=seed)
    train_pairs, val_pairs = load_stack(tr), load_stack(va) if va else np.zeros((0, 2, 1, 1), np.float32)
    singles = train_pairs.reshape(-1, 1, *train_pairs.shape[-2:])
    val_singles = val_pairs.reshape(-1, 1, *val_pairs.shape[-2:]) if len(val_pairs) else val_pairs
    log(f"data: {len(tr)} train pairs ({len(singles)} single images), {len(va)} validation pairs, device {dev}")

    cfg = dict(DEFAULT_CONFIG)
    cfg.update(config or {})
    model = DMFNet(cfg)
    ck1, ck2 = out / "dmfnet_stage1.pt", out / "dmfnet_stage2.pt"
    prev1 = _load_ckpt(ck1) if resume else None
    stage1_done = bool(prev1 and prev1["state"]["done"])
    run1 = stage in ("1", "both") and not stage1_done
    run2 = stage in ("2", "both")
    secs = minutes * 60.0
    s1_secs = secs / 2 if (run1 and run2) else secs
    if run1:
        s1 = train_stage1(model, singles, val_singles, ck1, s1_secs, resume, seed, dev, log)
    else:
        if prev1 is None:
            raise RuntimeError(f"stage II needs a finished stage I checkpoint at {ck1}")
        model.unet.load_state_dict(prev1["unet"])
        s1 = prev1["state"]
    if not run2 or not s1["done"]:
        return {"stage1": {k: v for k, v in s1.items() if k != "history"}}
    s2_secs = secs - (s1_secs if run1 else 0.0)
    s2 = train_stage2(model, train_pairs, val_pairs, ck2, s2_secs, resume, seed, dev, log)
    if not s2["done"]:
        return {"stage2": {k: v for k, v in s2.items() if k != "history"}}

    n_unet, n_head = count_parameters(model.unet), count_parameters(model.head)
    n_tr1 = len(singles)
    entry = {
        "architecture": {
            "name": "DM-FNet (CPU-scaled)",
            "config": cfg,
            "unet_parameters": n_unet,
            "fusion_parameters": n_head,
            "release_unet_parameters_approx": RELEASE_UNET_PARAMS,
            "scaled": ("UNet inner channels 64 -> 16, channel mults (1,2,4,8,8) -> (1,2,2,4) (5 -> 4 levels), "
                       "2 -> 1 residual blocks per encoder level (2 per decoder level), no upsampling conv, "
                       "2x2 space-to-depth in front (the UNet runs at half resolution, the head sees the "
                       "full-resolution sources), attention only in the middle; fusion head at the UNet's "
                       "widths, the sources concatenated into the output head; crops 64 (stage I) and 96 "
                       "(stage II) instead of full images; minutes instead of the release's epochs"),
            "file_holds": "one state_dict: unet.* (stage I, frozen) and head.* (stage II)",
        },
        "data": f"aanlib train split (case-disjoint), {len(tr)} pairs for training, {len(va)} held out for validation",
        "stage1": {"steps": s1["step"], "minutes": round(s1["elapsed"] / 60, 2), "crop": STAGE1_CROP,
                   "batch": STAGE1_BATCH, "lr": STAGE1_LR,
                   "epochs_equivalent_pixels": round(s1["step"] * STAGE1_BATCH * STAGE1_CROP ** 2
                                                     / (n_tr1 * 256 * 256), 2),
                   "final_val_l1_x0": s1.get("final_val"), "loss": "L1(x0_hat, x0), t half U[1,T], half U[1,200]"},
        "stage2": {"steps": s2["step"], "minutes": round(s2["elapsed"] / 60, 2), "crop": STAGE2_CROP,
                   "batch": STAGE2_BATCH, "lr": STAGE2_LR,
                   "epochs_equivalent_pixels": round(s2["step"] * STAGE2_BATCH * STAGE2_CROP ** 2
                                                     / (len(train_pairs) * 256 * 256), 2),
                   "final_val_hybrid_loss": s2.get("final_val"),
                   "loss": "1.5*L1(F,max(A,B)) + L1(grad F, max(grad A, grad B)) + 0.5*(1-SSIM_cs to the locally "
                           "more structured source)"},
        "wall_time_minutes": round((s1["elapsed"] + s2["elapsed"]) / 60, 2),
        "device": str(dev),
        "threads": 1,
        "seed": seed,
        "command": "medicalfusion train --method dmfnet --data ../shared/data/aanlib --minutes M",
    }
    if not save_weights:
        return entry
    model = model.cpu().eval()
    W.save_state_dict(model, "dmfnet", entry)
    log(f"weights saved to {W.weights_dir() / 'dmfnet.pt'}")
    try:  # the shared scorer (training/loop.py): fused Y + functional chroma -> RGB -> gray8 -> metrics
        from .loop import test_split_metrics  # noqa: PLC0415 - optional, heavy
        test = test_split_metrics(model.fuse, root, log=log)
        full = W.read_manifest().get("dmfnet", {})
        full.update(test_metrics=test,
                    metric_protocol="fused Y + functional Cb/Cr -> RGB uint8 -> BT.601 gray8; the metrics engine "
                                    "(A = MRI, B = CT/PET/SPECT), mean over the test pairs of each modality pair")
        W.update_manifest("dmfnet", full)
        entry = full
    except Exception as exc:  # noqa: BLE001 - the weights are saved; scoring can be redone by 'evaluate'
        log(f"test-split scoring skipped: {type(exc).__name__}: {exc}")
    return entry
