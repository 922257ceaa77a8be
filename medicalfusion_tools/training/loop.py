"""Generic training loop for the fusion networks (two sources in, one fused luma out).

What every trainer gets from here:

- :func:`split_cases`: validation CASES carved out of the train split (case-disjoint, per modality
  pair, fixed seed), so no slice of a validation case is ever trained on;
- :class:`CropSampler`: random crops of the co-registered pairs (flips and 90-degree rotations,
  mostly-empty background crops rejected), reproducible from ``(seed, step)``;
- :func:`fit`: Adam, validation loss on full validation images every ``val_every`` steps, learning
  rate halved after ``lr_patience`` rounds without improvement, early stopping after ``patience``
  rounds, a wall-time budget, a resumable checkpoint ``<run_dir>/ckpt.pt`` written every round and
  a loss log ``<run_dir>/log.csv``;
- :func:`test_split_metrics`: the fused test split scored the way the evaluation does it (the
  pipeline's prepare and recombine, the engine, the metrics engine: evaluate.score);
- :func:`run_training`: all of the above plus the weights and manifest entry.
"""
from __future__ import annotations

import csv
import os
import pathlib
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from MedicalFusionLib.errors import FusionError
from MedicalFusionLib.metrics import METRIC_KEYS
from .data import PAIRS, PairRecord, load_stack, read_split

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass
class TrainConfig:
    crop: int = 96
    batch: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-5
    val_every: int = 150          # training steps per validation round
    patience: int = 8             # rounds without improvement before stopping
    lr_patience: int = 3          # rounds without improvement before halving the learning rate
    val_fraction: float = 0.15    # share of each modality pair's train CASES used for validation
    val_images: int = 48          # validation loss on at most this many validation slices (evenly spaced)
    min_signal: float = 0.05      # crops whose mean is below this are redrawn (up to 10 times)
    minutes: float = 30.0         # wall-time budget (training only; the final test scoring is extra)
    seed: int = 0
    max_steps: int | None = None  # for tests
    extra: dict = field(default_factory=dict)


def repo_runs_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2] / "runs"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def split_cases(records: list[PairRecord], val_fraction: float, seed: int
                ) -> tuple[list[PairRecord], list[PairRecord]]:
    """(train, validation) records: per modality pair, a seeded random ``val_fraction`` of the cases
    (at least one when the pair has two or more) goes to validation, whole cases only."""
    rng = np.random.default_rng(seed)
    val_cases: set[tuple[str, str]] = set()
    for pair in sorted({r.pair for r in records}):
        cases = sorted({r.case for r in records if r.pair == pair})
        if len(cases) < 2:
            continue
        n_val = min(len(cases) - 1, max(1, int(round(val_fraction * len(cases)))))
        for c in rng.permutation(cases)[:n_val]:
            val_cases.add((pair, str(c)))
    train = [r for r in records if (r.pair, r.case) not in val_cases]
    val = [r for r in records if (r.pair, r.case) in val_cases]
    return train, val


class CropSampler:
    """Random ``crop`` x ``crop`` patches of an [N, 2, H, W] stack, as (a, b) tensors [B, 1, c, c]."""

    def __init__(self, stack: np.ndarray, crop: int, batch: int, seed: int, min_signal: float = 0.05):
        self.stack = stack
        self.crop = min(crop, stack.shape[-1], stack.shape[-2])
        self.batch = batch
        self.seed = seed
        self.min_signal = min_signal
        self.rng = np.random.default_rng(seed)

    def reseed(self, step: int) -> None:
        self.rng = np.random.default_rng([self.seed, step])

    def _one(self) -> np.ndarray:
        n, _, h, w = self.stack.shape
        c = self.crop
        for _ in range(10):
            i = int(self.rng.integers(n))
            y = int(self.rng.integers(h - c + 1))
            x = int(self.rng.integers(w - c + 1))
            patch = self.stack[i, :, y:y + c, x:x + c]
            if patch.mean() >= self.min_signal:
                break
        k = int(self.rng.integers(4))
        patch = np.rot90(patch, k, axes=(1, 2))
        if self.rng.random() < 0.5:
            patch = patch[:, :, ::-1]
        return np.ascontiguousarray(patch)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(np.stack([self._one() for _ in range(self.batch)]))
        return batch[:, :1], batch[:, 1:2]


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loss_fn: LossFn, val: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, val.shape[0], batch):
        chunk = val[i:i + batch]
        a, b = chunk[:, :1], chunk[:, 1:2]
        loss, _ = loss_fn(model(a, b), a, b)
        total += float(loss) * chunk.shape[0]
        count += chunk.shape[0]
    model.train()
    return total / max(count, 1)


def _load_checkpoint(path: pathlib.Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken checkpoint must not silently restart a run
        raise FusionError(f"checkpoint {path} cannot be read ({type(exc).__name__}): delete it or use --no-resume") from None


def _save_checkpoint(path: pathlib.Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


LOG_FIELDS = ["round", "step", "elapsed_s", "lr", "train_loss", "val_loss", "best_val", "terms"]


def fit(model: torch.nn.Module, loss_fn: LossFn, cfg: TrainConfig, train_stack: np.ndarray,
        val_stack: np.ndarray, run_dir: pathlib.Path, resume: bool = True, device: torch.device | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Train ``model`` in place; on return it holds the best-validation weights. Returns run info."""
    device = device or torch.device("cpu")
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run_dir / "ckpt.pt", run_dir / "log.csv"
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"step": 0, "round": 0, "best_val": float("inf"), "bad_rounds": 0, "lr_bad_rounds": 0,
             "elapsed": 0.0, "done": False, "stop_reason": ""}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = _load_checkpoint(ckpt_path) if resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        best_state = ckpt["best_model"]
        state.update({k: ckpt["state"][k] for k in state if k in ckpt["state"]})
        if state["done"] and state["stop_reason"].startswith("wall-time") and state["elapsed"] < cfg.minutes * 60.0:
            state["done"], state["stop_reason"] = False, ""   # a larger budget continues a run the clock stopped
        if state["done"] and state["stop_reason"].startswith("max_steps") and (
                cfg.max_steps is None or state["step"] < cfg.max_steps):
            state["done"], state["stop_reason"] = False, ""
        log(f"resumed from {ckpt_path} at step {state['step']} (round {state['round']}, best val {state['best_val']:.5f})")
    elif log_path.exists():
        log_path.unlink()
    if not log_path.exists():
        with open(log_path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(LOG_FIELDS)

    sampler = CropSampler(train_stack, cfg.crop, cfg.batch, cfg.seed, min_signal=cfg.min_signal)
    val = torch.from_numpy(val_stack).to(device)
    budget = cfg.minutes * 60.0
    t_start = time.monotonic() - state["elapsed"]
    run_loss, run_terms, run_n = 0.0, {}, 0

    def save() -> None:
        _save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "best_model": best_state, "state": dict(state)})

    while not state["done"]:
        sampler.reseed(state["step"])
        a, b = sampler.sample()
        a, b = a.to(device), b.to(device)
        loss, terms = loss_fn(model(a, b), a, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
        run_loss += loss.item()
        run_n += 1
        for k, v in terms.items():
            run_terms[k] = run_terms.get(k, 0.0) + v
        out_of_steps = cfg.max_steps is not None and state["step"] >= cfg.max_steps
        if state["step"] % cfg.val_every and not out_of_steps:
            continue
        # ---- validation round ----
        state["round"] += 1
        v = validation_loss(model, loss_fn, val)
        state["elapsed"] = time.monotonic() - t_start
        lr = opt.param_groups[0]["lr"]
        if v < state["best_val"] - 1e-6:
            state["best_val"], state["bad_rounds"], state["lr_bad_rounds"] = v, 0, 0
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            state["bad_rounds"] += 1
            state["lr_bad_rounds"] += 1
            if state["lr_bad_rounds"] >= cfg.lr_patience and lr > cfg.min_lr:
                for g in opt.param_groups:
                    g["lr"] = max(lr * 0.5, cfg.min_lr)
                state["lr_bad_rounds"] = 0
        term_txt = " ".join(f"{k}={s / run_n:.5f}" for k, s in run_terms.items())
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow([state["round"], state["step"], f"{state['elapsed']:.1f}", f"{lr:.2e}",
                                    f"{run_loss / run_n:.6f}", f"{v:.6f}", f"{state['best_val']:.6f}", term_txt])
        log(f"round {state['round']:3d} step {state['step']:6d} {state['elapsed'] / 60:5.1f} min lr {lr:.1e} "
            f"train {run_loss / run_n:.5f} val {v:.5f} best {state['best_val']:.5f} ({term_txt})")
        run_loss, run_terms, run_n = 0.0, {}, 0
        if state["bad_rounds"] >= cfg.patience:
            state["done"], state["stop_reason"] = True, f"early stop: {cfg.patience} rounds without improvement"
        elif state["elapsed"] >= budget:
            state["done"], state["stop_reason"] = True, f"wall-time budget of {cfg.minutes:g} min reached"
        elif out_of_steps:
            state["done"], state["stop_reason"] = True, f"max_steps {cfg.max_steps} reached"
        save()
    model.load_state_dict(best_state)
    model.eval()
    log(f"finished: {state['stop_reason']} after {state['step']} steps, {state['elapsed'] / 60:.1f} min")
    return dict(state)


def test_split_metrics(fuse_fn: Callable, data_root, split: str = "test", batch: int = 8,
                       log: Callable[[str], None] = print) -> dict:
    """Mean metrics per modality pair of ``fuse_fn`` on ``split``, scored as the evaluation does:
    the pairs prepared by the pipeline (evaluate.prepare_modality), fused by the engine
    (:func:`MedicalFusionLib.engine.fuse_slices`, batches of ``batch``), recombined by
    :func:`MedicalFusionLib.pipeline.recombine` and scored by :func:`..evaluate.score` (the metrics
    engine). ``fuse_fn`` is the network being trained, not yet a registered method."""
    from MedicalFusionLib.engine import fuse_slices
    from MedicalFusionLib.methods import FusionMethod
    from MedicalFusionLib.pipeline import recombine

    from ..evaluate import load_modality, prepare_modality, score

    cpu = torch.device("cpu")
    method = FusionMethod(name="training", build=lambda _device: fuse_fn)
    out: dict = {}
    for pair in PAIRS:
        records = read_split(data_root, split, pairs=(pair,))
        if not records:
            continue
        prepared = prepare_modality(load_modality(records))
        t0 = time.perf_counter()
        fused = fuse_slices(prepared.anatomical, prepared.functional_ycc[..., 0], method, device=cpu, batch_size=batch)
        seconds = (time.perf_counter() - t0) / len(records)
        rgb = recombine(fused, prepared.functional_ycc, method.chroma_scale, prepared.grayscale,
                        table=prepared.functional_table)
        metrics = score(prepared, rgb, cpu)
        out[pair] = {k: round(v[0], 5) for k, v in metrics.items() if k in METRIC_KEYS}
        out[pair]["pairs"] = len(records)
        out[pair]["seconds_per_pair"] = round(seconds, 5)
        log(f"{split} {pair}: " + " ".join(f"{k}={out[pair][k]:.3f}" for k in ("Qabf", "VIF", "SF", "AG", "SSIM_avg")))
    return out


def run_training(name: str, model: torch.nn.Module, loss_fn: LossFn, cfg: TrainConfig, data_root,
                 out_dir=None, resume: bool = True, device: str = "auto", description: dict | None = None,
                 fuse_wrapper: Callable | None = None, log: Callable[[str], None] = print) -> dict:
    """Train ``model`` on the train split (minus validation cases), score it on the test split and
    save weights + manifest entry under ``name``. Returns the manifest entry."""
    from MedicalFusionLib.device import pick_device
    from MedicalFusionLib.networks import weights

    dev = pick_device(device)
    threads = os.environ.get("MEDICALFUSION_TRAIN_THREADS")
    if threads and dev.type == "cpu":
        torch.set_num_threads(int(threads))
    seed_everything(cfg.seed)
    records = read_split(data_root, "train")
    if not records:
        raise FusionError(f"no train pairs under {data_root}")
    train_recs, val_recs = split_cases(records, cfg.val_fraction, cfg.seed)
    log(f"{name}: {len(train_recs)} train / {len(val_recs)} validation pairs "
        f"({len({(r.pair, r.case) for r in val_recs})} validation cases), device {dev}")
    train_stack = load_stack(train_recs)
    keep = np.unique(np.linspace(0, len(val_recs) - 1, min(cfg.val_images, len(val_recs))).round().astype(int))
    val_stack = load_stack([val_recs[i] for i in keep])
    run_dir = pathlib.Path(out_dir) if out_dir else repo_runs_dir() / name
    info = fit(model, loss_fn, cfg, train_stack, val_stack, run_dir, resume=resume, device=dev, log=log)

    model = model.cpu().eval()
    fuse = fuse_wrapper(model) if fuse_wrapper else None
    test = test_split_metrics(fuse, data_root, log=log) if fuse else {}
    px_seen = info["step"] * cfg.batch * cfg.crop ** 2
    entry = dict(description or {})
    entry.update({
        "data": {"dataset": "aanlib (Harvard Whole Brain Atlas pairs), shared/data/aanlib/split.csv",
                 "train_split": "train minus validation cases", "test_split": "test (case-disjoint)",
                 "train_pairs": len(train_recs), "validation_pairs": len(val_recs),
                 "validation_slices_scored": int(val_stack.shape[0]),
                 "validation_cases": sorted(f"{p}:{c}" for p, c in {(r.pair, r.case) for r in val_recs})},
        "training": {**{k: v for k, v in asdict(cfg).items() if k != "extra"}, **cfg.extra,
                     "steps": info["step"], "validation_rounds": info["round"],
                     "epochs": round(px_seen / (len(train_recs) * train_stack.shape[-1] * train_stack.shape[-2]), 2),
                     "epochs_note": "pixels seen in random crops / pixels in the training images",
                     "best_validation_loss": round(info["best_val"], 6), "stop_reason": info["stop_reason"],
                     "wall_time_s": round(info["elapsed"], 1), "device": str(dev),
                     "threads": torch.get_num_threads()},
        "test_metrics": test,
        "metric_protocol": "fused Y + functional Cb/Cr -> RGB uint8 -> BT.601 gray8; the metrics engine "
                           "(A = MRI, B = CT/PET/SPECT), mean over the test pairs of each modality pair",
    })
    weights.save_state_dict(model, name, entry)
    return weights.read_manifest()[name]
