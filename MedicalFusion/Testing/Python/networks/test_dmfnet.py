"""DM-FNet (CPU-scaled): forward contract, deterministic inference, and a short run of each training
stage on tiny synthetic images (loss goes down, checkpoints reload). No trained weights needed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from MedicalFusionLib.methods.registry import get_method
from MedicalFusionLib.networks.dmfnet import DMFNet, cosine_alpha_bar
from medicalfusion_tools.training import dmfnet as T

TINY = {"inner_channels": 8, "channel_mults": [1, 2, 2], "norm_groups": 4, "head_channels": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed: int = 0) -> DMFNet:
    torch.manual_seed(seed)
    return DMFNet(TINY).eval()


def _synthetic(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """[n, 2, size, size] in [0,1]: a bright disc (MRI-like) and an offset blurred blob (functional)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = np.zeros((n, 2, size, size), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(10, size - 10, 2).tolist() + [rng.uniform(5, 10)]
        out[i, 0] = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * rng.uniform(0.5, 1.0)
        out[i, 0] += 0.2 * (np.sin(xx / 2.0 + i) > 0.5) * out[i, 0]
        by, bx = rng.uniform(8, size - 8, 2)
        out[i, 1] = np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * rng.uniform(3, 6) ** 2))
    return np.clip(out, 0, 1)


def test_registered():
    m = get_method("dmfnet")
    assert m.family == "network"
    ok, reason = m.available()
    assert isinstance(ok, bool) and (ok or "dmfnet" in reason)


def test_schedule_is_cosine():
    ab = cosine_alpha_bar(2000)
    assert ab.shape == (2001,) and float(ab[0]) == 1.0
    assert torch.all(ab[1:] < ab[:-1]) and float(ab[-1]) < 1e-6
    assert 0.999 < float(ab[5]) < 1.0 and float(ab[20]) < float(ab[10]) < float(ab[5])


def test_forward_shape_range_any_size():
    model = _model()
    a, b = torch.rand(2, 1, 37, 50), torch.rand(2, 1, 37, 50)
    f = model.fuse(a, b)
    assert f.shape == (2, 1, 37, 50)
    assert torch.isfinite(f).all() and float(f.min()) >= 0.0 and float(f.max()) <= 1.0


def test_deterministic_and_batch_independent():
    model = _model()
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(3, 1, 40, 44, generator=g), torch.rand(3, 1, 40, 44, generator=g)
    first, second = model.fuse(a, b), model.fuse(a, b)
    assert torch.equal(first, second)
    for i in range(3):
        assert torch.equal(model.fuse(a[i:i + 1], b[i:i + 1]), first[i:i + 1])
    assert torch.equal(model.fuse(a.flip(0), b.flip(0)).flip(0), first)
    # the global RNG plays no part
    torch.manual_seed(999)
    assert torch.equal(model.fuse(a, b), first)


def test_hybrid_loss_prefers_max_fusion():
    x = torch.from_numpy(_synthetic(4))
    a, b = x[:, :1], x[:, 1:]
    l_max, _ = T.hybrid_loss(torch.maximum(a, b), a, b)
    l_avg, _ = T.hybrid_loss((a + b) / 2, a, b)
    assert float(l_max) < float(l_avg)


def test_stage1_trains_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = DMFNet(TINY)
    imgs = _synthetic(12).reshape(-1, 1, 32, 32)
    val = _synthetic(4, seed=9).reshape(-1, 1, 32, 32)
    before = T.stage1_validation(model, val, "cpu")
    ck = tmp_path / "s1.pt"
    state = T.train_stage1(model, imgs, val, ck, seconds=600, resume=False, seed=0, device=torch.device("cpu"),
                           log=lambda m: None, crop=16, batch=8, max_steps=25)
    after = T.stage1_validation(model, val, "cpu")
    assert state["step"] == 25 and state["done"]
    assert after["t10"] < before["t10"] and after["t100"] < before["t100"]
    reloaded = DMFNet(TINY)
    ckpt = torch.load(ck, map_location="cpu", weights_only=False)
    reloaded.unet.load_state_dict(ckpt["unet"])
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, reloaded.unet.state_dict()[k])
    # a finished stage is not trained again on resume
    again = T.train_stage1(reloaded, imgs, val, ck, seconds=600, resume=True, seed=0, device=torch.device("cpu"),
                           log=lambda m: None, crop=16, batch=8, max_steps=50)
    assert again["step"] == 25


def test_stage2_trains_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = DMFNet(TINY)
    pairs, val = _synthetic(12), _synthetic(3, seed=5)
    before = T.stage2_validation(model, val, "cpu")
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    ck = tmp_path / "s2.pt"
    T.train_stage2(model, pairs, val, ck, seconds=600, resume=False, seed=0, device=torch.device("cpu"),
                   log=lambda m: None, crop=16, batch=4, max_steps=25)
    after = T.stage2_validation(model, val, "cpu")
    assert after < before
    for k, v in model.unet.state_dict().items():  # stage II leaves the UNet frozen
        assert torch.equal(v, unet_before[k])
    # an interrupted run resumes from its checkpoint and continues counting steps
    ckpt = torch.load(ck, map_location="cpu", weights_only=False)
    ckpt["state"]["done"] = False
    torch.save(ckpt, ck)
    fresh = DMFNet(TINY)
    fresh.unet.load_state_dict(model.unet.state_dict())
    st = T.train_stage2(fresh, pairs, val, ck, seconds=600, resume=True, seed=0, device=torch.device("cpu"),
                        log=lambda m: None, crop=16, batch=4, max_steps=28)
    assert st["step"] == 28


def test_split_keeps_cases_disjoint():
    from medicalfusion_tools.training.data import PairRecord
    import pathlib
    recs = [PairRecord("CT-MRI", "CT", pathlib.Path(f"{c}_{i}.png"), pathlib.Path("x.png"), str(c), "train")
            for c in range(10) for i in range(3)]
    recs += [PairRecord("PET-MRI", "PET", pathlib.Path(f"p{c}_{i}.png"), pathlib.Path("x.png"), f"p{c}", "train")
             for c in range(2) for i in range(3)]
    tr, va = T.split_train_val(recs)
    assert va and {r.case for r in tr}.isdisjoint({r.case for r in va})
    assert all(r.pair == "CT-MRI" for r in va)  # too few PET cases to hold one out
