"""MRDFN and LYWNet (CPU-sized): forward contract, batch independence, BN folding, checksummed weight
loading (corrupt / missing files), and short training runs on tiny synthetic data (the loss goes
down, the checkpoint reloads and resumes, a manifest entry is written and loads through the
registry). No trained weights and no shared data needed."""
from __future__ import annotations

import copy
import csv
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from MedicalFusionLib.errors import FusionError
from MedicalFusionLib.networks import weights
from MedicalFusionLib.networks.lywnet import LYWNet, feature_distillation
from MedicalFusionLib.networks.inference import network_fuse_fn
from MedicalFusionLib.networks.mrdfn import MRDFN
from medicalfusion_tools.training import losses
from medicalfusion_tools.training.loop import CropSampler, TrainConfig, fit, split_cases, validation_loss

NETS = {"mrdfn": (MRDFN, 2), "lywnet": (LYWNet, 16)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return NETS[name][0]()


def _synthetic(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """[n, 2, size, size] in [0, 1]: a textured disc (MRI-like) and a blurred blob (functional)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = np.zeros((n, 2, size, size), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = rng.uniform(size * 0.2, size * 0.35)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        out[i, 0] = disc * (0.5 + 0.3 * (np.sin(xx / 2.0 + i) > 0))
        by, bx = rng.uniform(size * 0.25, size * 0.75, 2)
        out[i, 1] = 0.9 * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * rng.uniform(4, 8) ** 2))
    return out


@pytest.mark.parametrize("name", list(NETS))
def test_forward_shape_range_any_size(name):
    fn = network_fuse_fn(_model(name).eval(), torch.device("cpu"), multiple=NETS[name][1])
    a, b = torch.rand(2, 1, 37, 50), torch.rand(2, 1, 37, 50)
    out = fn(a, b)
    assert out.shape == (2, 1, 37, 50)
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(NETS))
def test_batch_independence(name):
    model = _model(name).eval()
    fn = network_fuse_fn(model, torch.device("cpu"), multiple=NETS[name][1])
    a, b = torch.rand(3, 1, 40, 40), torch.rand(3, 1, 40, 40)
    together = fn(a, b)
    alone = torch.cat([fn(a[i:i + 1], b[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("name, threads", [("mrdfn", 1), ("mrdfn", 2), ("lywnet", 1), ("lywnet", 2),
                                           ("dmfnet", 1)])   # DM-FNet runs its slices one at a time
def test_trained_network_fuses_a_slice_to_the_same_bytes_alone_or_in_any_batch(name, threads):
    """Issue 21: the engine's batch size (given, or chosen from timing) never changes a bit of the
    result. MRDFN on 91x109 slices (the MNI 2 mm grid) differed by 4e-7 between a batch of 5 and
    slices alone before the networks ran fixed chunks; at 1 and 2 threads (2: channels-last)."""
    from MedicalFusionLib.engine import fuse_slices
    from MedicalFusionLib.methods import get_method

    ok, reason = get_method(name).available()
    if not ok:
        pytest.skip(reason)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        n = 2 if name == "dmfnet" else 5
        a, b = rng.random((n, 91, 109), dtype=np.float32), rng.random((n, 91, 109), dtype=np.float32)
        alone = np.stack([fuse_slices(a[i:i + 1], b[i:i + 1], name, batch_size=1)[0] for i in range(n)])
        for batch_size in (2, n, None):        # None: sized from timing
            assert fuse_slices(a, b, name, batch_size=batch_size).tobytes() == alone.tobytes(), batch_size
    finally:
        torch.set_num_threads(before)     # not left at 2 for the worker's next tests


@pytest.mark.parametrize("name", list(NETS))
def test_cpu_channels_last_layout_matches_default_layout(name):
    """With several CPU threads the wrapper runs the model channels-last; only rounding may differ."""
    model = _model(name).eval()
    a, b = torch.rand(2, 1, 48, 40), torch.rand(2, 1, 48, 40)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        default = network_fuse_fn(copy.deepcopy(model), torch.device("cpu"), multiple=NETS[name][1])
        torch.set_num_threads(2)
        fast = network_fuse_fn(copy.deepcopy(model), torch.device("cpu"), multiple=NETS[name][1])
        conv = next(m for m in fast.model.modules()
                    if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size[0] > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()
        out_fast = fast(a, b)
        torch.set_num_threads(1)
        out_default = default(a, b)
    finally:
        torch.set_num_threads(before)
    assert out_fast.shape == out_default.shape == (2, 1, 48, 40)
    assert torch.allclose(out_fast, out_default, atol=1e-5)


def _mrdfn_reference(model: MRDFN, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MRDFN's forward as first written (each dense layer concatenates the features so far): the
    reference the module's inference path must reproduce bit for bit."""
    def dense(block, x):
        feats = [x]
        for conv in block.convs:
            feats.append(F.relu(conv(torch.cat(feats, dim=1))))
        return x + block.local_fusion(torch.cat(feats, dim=1))

    n = a.shape[0]
    features = F.relu(torch.cat([conv(torch.cat([a, b])) for conv in model.extractor.branches], dim=1))
    fa, fb = features.split(n, dim=0)
    x0 = F.relu(model.merge(torch.cat([fa, fb], dim=1)))
    x1 = dense(model.rdb_full, x0)
    x2 = dense(model.rdb_half, F.avg_pool2d(x1, 2))
    x2 = F.interpolate(x2, size=x1.shape[-2:], mode="bilinear", align_corners=False)
    y = F.relu(model.recon1(x0 + model.global_fusion(torch.cat([x1, x2], dim=1))))
    return model.recon2(torch.cat([y, a, b], dim=1))


def _spread_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of the scale trained ones reach (default init leaves most ReLUs of a deep stack dead)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.eval()


# chunks of 1 and 2 slices of 256x256 (the engine's CPU chunks: dense layers slice by slice at both
# resolutions), odd sizes (the pooling's fallback), slice by slice at full resolution only (120x100),
# at neither (92x110), tiny slices (torch's own convolution instead of oneDNN's), a batch of 5
MRDFN_SHAPES = [(1, 256, 256), (2, 256, 256), (3, 37, 51), (2, 120, 100), (2, 92, 110), (1, 6, 8), (5, 40, 52)]


@pytest.mark.parametrize("settings, threads", [({}, 1), ({}, 2),
                                               ({"branch": 2, "width": 4, "growth": 6, "layers_full": 1,
                                                 "layers_half": 4}, 1)])
def test_mrdfn_inference_forward_matches_the_plain_forward_bit_for_bit(settings, threads):
    """Without autograd, MRDFN writes its dense features into buffers instead of concatenating them
    (issue 21): the same bits as the concatenating forward, in inference_mode and no_grad, with the
    buffers kept between calls of the same shape and reallocated for another; at 1 thread and at 2
    (the default layout: the wrapper's channels-last model runs the plain forward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_mrdfn_inference(settings)
    finally:
        torch.set_num_threads(before)


def _check_mrdfn_inference(settings):
    model = _spread_weights(MRDFN(**settings), seed=1)
    g = torch.Generator().manual_seed(2)
    for shape in MRDFN_SHAPES + MRDFN_SHAPES[:2]:          # back to a shape seen before: kept buffers
        a, b = torch.rand((shape[0], 1) + shape[1:], generator=g), torch.rand((shape[0], 1) + shape[1:], generator=g)
        with torch.inference_mode():
            expected = _mrdfn_reference(model, a, b)
            first, again = model(a, b), model(a, b)
        with torch.no_grad():
            plain_no_grad = model(a, b)
        assert expected.abs().max() > 0.05, shape              # a live network, not a constant
        for out in (first, again, plain_no_grad):
            assert out.shape == expected.shape and torch.equal(out, expected), shape
            assert out.numpy().tobytes() == expected.numpy().tobytes(), shape  # signed zeros too


def test_mrdfn_channels_last_model_runs_the_plain_forward():
    """The wrapper converts the model to channels-last with 2 threads: there the buffers would cost a
    copy per layer, so that model keeps the plain forward (and its bits)."""
    model = _spread_weights(MRDFN(), seed=5).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(2, 1, 256, 256, generator=g), torch.rand(2, 1, 256, 256, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            assert torch.equal(model(a, b), _mrdfn_reference(model, a, b))
    finally:
        torch.set_num_threads(before)


def test_mrdfn_inference_forward_runs_in_two_threads_at_once():
    """The engine's two workers call one model at the same time: each thread has its own buffers."""
    import threading

    model = _spread_weights(MRDFN(), seed=3)
    g = torch.Generator().manual_seed(4)
    inputs = [(torch.rand(2, 1, 128, 128, generator=g), torch.rand(2, 1, 128, 128, generator=g)) for _ in range(2)]
    with torch.inference_mode():
        expected = [_mrdfn_reference(model, a, b) for a, b in inputs]
    wrong = []

    def work(i):
        a, b = inputs[i]
        with torch.inference_mode():
            for _ in range(20):
                if not torch.equal(model(a, b), expected[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def _cat_calls(model, monkeypatch) -> int:
    """torch.cat calls of one inference call of ``model`` on a pair of 2 x 32 x 32 slices."""
    calls = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *args, **kwargs: calls.append(1) or cat(*args, **kwargs))
    with torch.inference_mode():
        model(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32))
    return len(calls)


def test_mrdfn_inference_forward_concatenates_only_the_two_sources(monkeypatch):
    """The plain forward concatenated features seven times per call (the dense blocks' growing lists,
    the extractor, the merges); inference writes them into buffers: one torch.cat (the sources)."""
    assert _cat_calls(MRDFN().eval(), monkeypatch) == 1


def test_lywnet_inference_forward_concatenates_only_the_sources(monkeypatch):
    """The plain forward concatenated the preprocessor's three branches too; inference writes them
    into one buffer (default layout): torch.cat for the two sources and the source skip only."""
    assert _cat_calls(LYWNet(source_skip=True).eval().fold_bn(), monkeypatch) == 2


@pytest.mark.parametrize("name", ["mrdfn", "lywnet"])
def test_trained_network_inference_matches_the_plain_forward_on_real_slices(name, shared_data):
    """The shipped weights (as the registry builds them: LYWNet's BatchNorms folded) on aanlib PET-MRI
    test slices, 256x256, in chunks of 2 as the engine runs them on the CPU."""
    from medicalfusion_tools.training.data import load_stack, read_split
    from MedicalFusionLib.methods import get_method

    ok, reason = get_method(name).available()
    if not ok:
        pytest.skip(reason)
    model = get_method(name).build(torch.device("cpu")).model      # 1 thread: the default layout
    reference = {"mrdfn": _mrdfn_reference, "lywnet": _lywnet_reference}[name]
    stack = torch.from_numpy(load_stack(read_split(shared_data / "aanlib", "test", pairs=("PET-MRI",))[:4]))
    with torch.inference_mode():
        for i in range(0, len(stack), 2):
            a, b = stack[i:i + 2, :1], stack[i:i + 2, 1:]
            assert torch.equal(model(a, b), reference(model, a, b)), i


def _lywnet_reference(model: LYWNet, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LYWNet's forward as first written (out-of-place sums and ReLUs, F.avg_pool2d, the
    preprocessor's concatenation): the reference its inference path must reproduce bit for bit."""
    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def conv_bn(m, x):
        y = m.bn(m.conv(x))
        return F.relu(y) if m.relu else y

    def block(m, x):
        p2 = F.avg_pool2d(x, 2)
        p4 = F.avg_pool2d(p2, 2)
        levels = m.detail.levels
        coarse = conv_bn(levels[1], p2) + up(conv_bn(levels[2], p4), p2.shape[-2:])
        detail = F.relu(x + conv_bn(levels[0], x) + up(coarse, x.shape[-2:]))
        y = F.relu(x + conv_bn(m.context.conv, x))
        q4, q8 = F.avg_pool2d(y, 4), F.avg_pool2d(F.avg_pool2d(y, 4), 2)
        ppm = m.context.ppm
        q8 = ppm.fuse_pooled[1](conv_bn(ppm.reduce[1], q8))
        q4 = ppm.fuse_pooled[0](conv_bn(ppm.reduce[0], q4)) + up(q8, q4.shape[-2:])
        context = F.relu(ppm.bn(ppm.fuse_x(y) + up(q4, y.shape[-2:])))
        bn = m.boundary
        sigma = torch.sigmoid(x + conv_bn(bn.expand, conv_bn(bn.mid, conv_bn(bn.reduce, x))))
        return conv_bn(m.out, sigma * detail + (1.0 - sigma) * context)

    n = a.shape[0]
    x = torch.cat([a, b], dim=0)
    pre = model.pre
    low = conv_bn(pre.fuse, torch.cat([conv_bn(pre.k3, x), conv_bn(pre.k5, x), conv_bn(pre.k7, x)], dim=1))
    deep = conv_bn(model.down, low)
    for m in model.blocks:
        deep = block(m, deep)
    fa, fb = (low + up(deep, low.shape[-2:])).split(n, dim=0)
    gain = 1.0 if model.log_gain is None else model.log_gain.exp()
    wa = torch.sigmoid(gain * (fa - fb) / model.temperature)
    fused = fb + wa * (fa - fb)
    for m in model.recon:
        fused = conv_bn(m, fused) if isinstance(m, type(model.down)) else m(fused)
    return model.out(torch.cat([fused, a, b], dim=1)) if model.source_skip else fused


@pytest.mark.parametrize("settings, fold, threads", [
    ({}, True, 1), ({"source_skip": True}, True, 1), ({"source_skip": True, "fds_gain": 3.0}, False, 1),
    ({"source_skip": True}, True, 2)])
def test_lywnet_inference_forward_matches_the_plain_forward_bit_for_bit(settings, fold, threads):
    """Without autograd LYWNet sums and ReLUs in place, and in the default layout pools by strided
    sums and writes the preprocessor's branches into one buffer (issue 21): the same bits as the
    plain forward, in inference_mode and no_grad, BatchNorms folded or not, at 1 thread (default
    layout) and at 2 in the channels-last layout the wrapper uses there."""
    model = _spread_weights(LYWNet(**settings), seed=7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    if fold:
        model.fold_bn()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    if threads > 1:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(8)
    try:
        for n, h, w in [(2, 256, 256), (3, 48, 80), (1, 16, 16), (2, 35, 50)]:
            a, b = torch.rand(n, 1, h, w, generator=g), torch.rand(n, 1, h, w, generator=g)
            with torch.inference_mode():
                expected = _lywnet_reference(model, a, b)
                first, again = model(a, b), model(a, b)
            with torch.no_grad():
                plain_no_grad = model(a, b)
            assert expected.abs().max() > 0.05, (n, h, w)
            for out in (first, again, plain_no_grad):
                assert out.numpy().tobytes() == expected.numpy().tobytes(), (n, h, w)
    finally:
        torch.set_num_threads(before)


def test_lywnet_bn_folding_is_exact():
    model = _model("lywnet").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
        before = model(a, b)
        after = model.fold_bn()(a, b)
    assert torch.allclose(before, after, atol=1e-5)


def test_feature_distillation_is_a_softmax_over_sources():
    fa, fb = torch.randn(2, 4, 8, 8) * 50, torch.randn(2, 4, 8, 8) * 50
    w = torch.softmax(torch.stack([fa, fb]) / 30.0, dim=0)
    assert torch.allclose(feature_distillation(fa, fb, 30.0), w[0] * fa + w[1] * fb, atol=1e-4)


def test_lywnet_fds_gain_option_round_trips():
    model = LYWNet(fds_gain=30.0).eval()
    assert model.settings["fds_gain"] == 30.0
    fresh = LYWNet(**model.settings)
    fresh.load_state_dict(model.state_dict())
    a, b = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(a, b), model(a, b))


def test_lywnet_source_skip_round_trips_and_folds_exactly():
    torch.manual_seed(0)
    model = LYWNet(fds_gain=30.0, source_skip=True).eval()
    assert model.settings["source_skip"] is True
    # the output convolution reads the reconstructor's features and both sources
    assert model.out.in_channels == model.settings["channels"] // 2 + 2
    fresh = LYWNet(**model.settings)
    fresh.load_state_dict(model.state_dict())
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        ref = model(a, b)
        assert torch.allclose(fresh.eval()(a, b), ref)
        assert torch.allclose(copy.deepcopy(model).fold_bn()(a, b), ref, atol=1e-5)
    # the option changes the network: the paper's reconstructor cannot read these weights
    with pytest.raises(RuntimeError):
        LYWNet(fds_gain=30.0).load_state_dict(model.state_dict())
    # weights trained before the option existed keep their settings (no new key)
    assert set(LYWNet(fds_gain=30.0).settings) == {"channels", "blocks", "temperature", "fds_gain"}
    # the source images reach the output through the skip: a change of one source pixel moves that
    # output pixel even with every feature path zeroed
    with torch.no_grad():
        for prm in model.recon.parameters():
            prm.zero_()
        a2 = a.clone()
        a2[0, 0, 16, 16] += 0.5
        assert (model(a2, b) - model(a, b))[0, 0, 15:18, 15:18].abs().max() > 0


def test_lywnet_trainer_rejects_a_bad_source_skip_in_one_line(tmp_path, monkeypatch):
    from medicalfusion_tools.training import lywnet as lyw_trainer

    monkeypatch.setenv("MEDICALFUSION_LYWNET_SOURCE_SKIP", "yes")
    with pytest.raises(FusionError, match="MEDICALFUSION_LYWNET_SOURCE_SKIP must be 0 or 1"):
        lyw_trainer.train(tmp_path / "no-data", out_dir=tmp_path / "run", log=lambda s: None)


def test_losses_basic_properties():
    x = torch.rand(2, 1, 32, 32)
    assert abs(float(losses.ssim(x, x)) - 1.0) < 1e-5
    assert float(losses.ssim(x, 1 - x)) < 0.5
    assert losses.sobel_gradient(x).shape == x.shape
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert float(losses.sobel_gradient(flat).abs().max()) < 1e-6
    assert float(losses.cosine_intensity(x, 2 * x)) < 1e-5
    m = torch.maximum(x, 1 - x)
    total, terms = losses.mrdfn_loss(m, x, 1 - x)
    assert terms["mse"] < 1e-10 and total.ndim == 0


def test_lywnet_loss_edge_l1_term_and_weight_spec():
    from medicalfusion_tools.training import lywnet as lyw_trainer

    a, b, f = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    # the default weights have no L1 edge term (the behaviour of the earlier runs)
    total_v1, terms_v1 = losses.lywnet_loss(f, a, b)
    assert "edge_l1" not in terms_v1
    total_v2, terms_v2 = losses.lywnet_loss(f, a, b, weights=losses.LYWNET_V2_WEIGHTS)
    target = torch.maximum(losses.sobel_gradient(a), losses.sobel_gradient(b))
    expected_l1 = float((losses.sobel_gradient(f) - target).abs().mean())
    assert abs(terms_v2["edge_l1"] - expected_l1) < 1e-5
    expected = (10 * terms_v2["mse"] + 1 * terms_v2["cos"] + 4 * terms_v2["edge_l1"] + 1 * terms_v2["ssim"])
    assert abs(float(total_v2) - expected) < 1e-4
    # weight specs: empty -> trainer default; presets; key=value over a preset; bad keys refused
    assert lyw_trainer.loss_weights_from("") == lyw_trainer.LOSS_WEIGHTS
    assert lyw_trainer.loss_weights_from("v1") == losses.DEFAULT_LYWNET_WEIGHTS
    assert lyw_trainer.loss_weights_from("v2, ssim=2") == dict(losses.LYWNET_V2_WEIGHTS, ssim=2.0)
    with pytest.raises(FusionError, match="MEDICALFUSION_LYWNET_LOSS"):
        lyw_trainer.loss_weights_from("grad=4")
    with pytest.raises(FusionError, match="not a number"):
        lyw_trainer.loss_weights_from("ssim=high")


# ---- weights: checksum, corrupt and missing files ---------------------------------------------

@pytest.fixture
def weights_tmp(tmp_path, monkeypatch):
    d = tmp_path / "weights"
    monkeypatch.setenv("MEDICALFUSION_WEIGHTS", str(d))
    monkeypatch.setenv("MEDICALFUSION_OWN_WEIGHTS", "1")   # weights these tests train are their own
    return d


@pytest.mark.parametrize("name", list(NETS))
def test_saved_weights_load_through_registry(name, weights_tmp):
    from MedicalFusionLib.methods.registry import get_method

    model = _model(name).eval()
    weights.save_state_dict(model, name, {"settings": dict(model.settings), "architecture": name})
    method = get_method(name)
    assert method.family == "network"
    assert method.available() == (True, "")
    fn = method.build(torch.device("cpu"))
    a, b = torch.rand(1, 1, 33, 33), torch.rand(1, 1, 33, 33)
    ref = network_fuse_fn(_model(name).eval(), torch.device("cpu"), multiple=NETS[name][1])(a, b)
    assert torch.allclose(fn(a, b), ref, atol=1e-5)
    entry = weights.read_manifest(weights_tmp)[name]
    assert entry["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(NETS))
def test_corrupt_weights_raise_naming_the_file(name, weights_tmp):
    from MedicalFusionLib.methods.registry import get_method

    model = _model(name)
    path = weights.save_state_dict(model, name, {"settings": dict(model.settings)})
    good = path.read_bytes()
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(FusionError, match=str(path.name)) as err:
        get_method(name).build(torch.device("cpu"))
    assert "corrupt" in str(err.value)
    path.unlink()
    assert get_method(name).available()[0] is False
    with pytest.raises(FusionError, match=str(path.name)):
        get_method(name).build(torch.device("cpu"))


def test_no_manifest_entry_says_how_to_train(weights_tmp):
    from MedicalFusionLib.methods.registry import get_method

    ok, reason = get_method("mrdfn").available()
    assert not ok and "medicalfusion train --method mrdfn" in reason


# ---- training loop ------------------------------------------------------------------------------

def test_split_cases_is_case_disjoint():
    from medicalfusion_tools.training.data import PairRecord

    recs = [PairRecord(p, "X", None, None, str(c), "train") for p in ("CT-MRI", "PET-MRI")
            for c in range(6) for _ in range(3)]
    train, val = split_cases(recs, 0.34, seed=0)
    assert len(train) + len(val) == len(recs)
    tc, vc = {(r.pair, r.case) for r in train}, {(r.pair, r.case) for r in val}
    assert not tc & vc
    assert {p for p, _ in vc} == {"CT-MRI", "PET-MRI"}
    assert split_cases(recs, 0.34, seed=0)[1] == val


def test_crop_sampler_is_reproducible():
    stack = _synthetic(4)
    s = CropSampler(stack, 32, 3, seed=5)
    s.reseed(7)
    a1, b1 = s.sample()
    s.reseed(7)
    a2, b2 = s.sample()
    assert a1.shape == (3, 1, 32, 32) and torch.equal(a1, a2) and torch.equal(b1, b2)


@pytest.mark.parametrize("name", list(NETS))
def test_short_training_lowers_loss_and_resumes(name, tmp_path):
    loss_fn = losses.mrdfn_loss if name == "mrdfn" else losses.lywnet_loss
    train_stack, val_stack = _synthetic(6, seed=1), _synthetic(2, seed=2)
    model = _model(name)
    val = torch.from_numpy(val_stack)
    before = validation_loss(model, loss_fn, val)
    cfg = TrainConfig(crop=32, batch=4, lr=3e-3, val_every=10, patience=100, minutes=5, seed=0, max_steps=30)
    info = fit(model, loss_fn, cfg, train_stack, val_stack, tmp_path / "run", resume=True, log=lambda s: None)
    after = validation_loss(model, loss_fn, val)
    assert info["step"] == 30 and info["round"] == 3
    assert after < before
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["state"]["step"] == 30 and ckpt["state"]["done"]
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    # the best weights reload into a fresh model and give the same validation loss
    fresh = _model(name, seed=99)
    fresh.load_state_dict(ckpt["best_model"])
    assert abs(validation_loss(fresh, loss_fn, val) - ckpt["state"]["best_val"]) < 1e-4
    # resuming continues from the checkpoint (step 30 -> 40), appending to the same log
    cfg.max_steps = 40
    info2 = fit(_model(name, seed=3), loss_fn, cfg, train_stack, val_stack, tmp_path / "run", resume=True,
                log=lambda s: None)
    assert info2["step"] == 40 and info2["round"] == 4
    with open(tmp_path / "run" / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [10, 20, 30, 40]


def _write_tiny_aanlib(root, size: int = 64) -> None:
    """A CT-MRI-only aanlib look-alike: 3 train cases and 1 test case of 2 slices each."""
    stack = _synthetic(8, size=size, seed=4)
    (root / "CT-MRI" / "MRI").mkdir(parents=True)
    (root / "CT-MRI" / "CT").mkdir(parents=True)
    rows = []
    for i in range(8):
        case, split = str(i // 2), ("test" if i >= 6 else "train")
        for ch, mod in ((0, "MRI"), (1, "CT")):
            img = (stack[i, ch] * 255).round().astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(img), str(root / "CT-MRI" / mod / f"{i}.png"))
        rows.append(["CT-MRI", "CT", f"CT-MRI/MRI/{i}.png", f"CT-MRI/CT/{i}.png", case, split])
    with open(root / "split.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["pair", "modality", "mri", "image", "case", "split"])
        w.writerows(rows)


@pytest.mark.parametrize("name", list(NETS))
def test_trainer_writes_manifest_entry(name, tmp_path, weights_tmp):
    import importlib

    trainer = importlib.import_module(f"medicalfusion_tools.training.{name}")
    data = tmp_path / "aanlib"
    _write_tiny_aanlib(data)
    cfg = trainer.make_config(1.0, 0)
    cfg.crop, cfg.batch, cfg.val_every, cfg.max_steps = 32, 2, 2, 4
    entry = trainer.train(data, out_dir=tmp_path / "run", config=cfg, log=lambda s: None)
    for key in ("file", "sha256", "architecture", "settings", "parameters", "data", "training", "test_metrics"):
        assert key in entry
    assert entry["training"]["steps"] == 4
    assert entry["data"]["validation_pairs"] > 0
    assert set(entry["test_metrics"]) == {"CT-MRI"}
    assert {"Qabf", "VIF", "SF", "AG", "SSIM_avg"} <= set(entry["test_metrics"]["CT-MRI"])
    state, _ = weights.load_state_dict(name)
    fresh = NETS[name][0](**entry["settings"])
    fresh.load_state_dict(state)
    shutil.rmtree(tmp_path / "run")
