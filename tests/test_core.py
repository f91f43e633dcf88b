"""Preconditioning, loss weight, coordinate grids, crops, the patch-size schedule and the config."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pdiff import config as C
from pdiff.coords import canvas_grid, coord_grid, crop, random_offsets
from pdiff.kernels import edm_loss_ref, net_input_ref
from pdiff.loss import sample_sigma
from pdiff.precond import EDMPrecond, c_in, c_noise, c_out, c_skip, loss_weight
from pdiff.schedule import FullImageSchedule, ProgressiveSchedule, StochasticSchedule


# ---------------------------------------------------------------- preconditioning and loss

def test_preconditioning_coefficients_match_formulas():
    sd = 0.5
    for s in torch.exp(torch.randn(20, dtype=torch.float64) * 1.2 - 1.2):
        s, t = float(s), s.clone()
        assert math.isclose(float(c_skip(t, sd)), sd**2 / (s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(float(c_out(t, sd)), s * sd / math.sqrt(s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(float(c_in(t, sd)), 1 / math.sqrt(s**2 + sd**2), rel_tol=1e-12)
        assert math.isclose(float(c_noise(t)), math.log(s) / 4, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(float(loss_weight(t, sd)), (s**2 + sd**2) / (s * sd) ** 2, rel_tol=1e-12)
    # EDM's unit-variance design: lambda(s) c_out(s)^2 = 1.
    s = torch.exp(torch.randn(50, dtype=torch.float64))
    assert torch.allclose(loss_weight(s) * c_out(s) ** 2, torch.ones_like(s))


class _RecordingNet(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c + 2, c, 3, padding=1)
        self.seen = None

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x, noise_labels)
        return self.conv(x) + noise_labels[:, None, None, None]


def test_denoiser_identity_and_network_input():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    b, c, s, r = 3, 3, 8, 16
    net = _RecordingNet(c)
    model = EDMPrecond(net)
    x = torch.randn(b, c, s, s)
    sigma = torch.exp(torch.randn(b))
    offsets = random_offsets(b, s, r)
    coords = coord_grid(offsets, s, r)
    d = model(x, sigma, coords)
    inp, noise_labels = net.seen
    sb = sigma[:, None, None, None]
    assert torch.allclose(inp[:, :c], x * c_in(sb)) and torch.equal(inp[:, c:], coords)
    assert torch.allclose(noise_labels, sigma.log() / 4)
    f = net(inp, noise_labels)
    assert torch.allclose(d, c_skip(sb) * x + c_out(sb) * f, atol=1e-6)


def test_patch_loss_matches_explicit_formula():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    b, c, s, r = 4, 3, 8, 32
    model = EDMPrecond(_RecordingNet(c))
    y = torch.rand(b, c, s, s) * 2 - 1
    offsets = random_offsets(b, s, r)
    sigma, noise = sample_sigma(b), torch.randn(b, c, s, s)
    d = model(y + sigma[:, None, None, None] * noise, sigma, coord_grid(offsets, s, r))
    expect = (loss_weight(sigma)[:, None, None, None] * (d - y) ** 2).mean((1, 2, 3))
    # The two kernels' plain-torch references, composed around the network as a training step does.
    F = model.raw(net_input_ref(y, sigma, offsets, r, noise), sigma)
    assert torch.allclose(edm_loss_ref(F, y, sigma, noise), expect, rtol=1e-5)


def test_sigma_distribution_is_lognormal():
    g = torch.Generator().manual_seed(1)
    s = sample_sigma(50000, -1.2, 1.2, g)
    assert abs(float(s.log().mean()) + 1.2) < 0.03 and abs(float(s.log().std()) - 1.2) < 0.03


# ---------------------------------------------------------------- coordinates and crops

@pytest.mark.parametrize("r", [16, 64])
def test_coord_grid_corners_and_centre(r):
    for s in (r // 4, r // 2, r):
        offsets = random_offsets(5, s, r)
        offsets[0] = 0
        offsets[1] = r - s
        g = coord_grid(offsets, s, r)
        assert g.shape == (5, 2, s, s)
        norm = lambda k: (k / (r - 1) - 0.5) * 2
        for i in range(5):
            x0, y0 = int(offsets[i, 0]), int(offsets[i, 1])
            # channel 0 = x = column, channel 1 = y = row
            assert math.isclose(g[i, 0, 0, 0], norm(x0), abs_tol=1e-6)
            assert math.isclose(g[i, 1, 0, 0], norm(y0), abs_tol=1e-6)
            assert math.isclose(g[i, 0, s - 1, s - 1], norm(x0 + s - 1), abs_tol=1e-6)
            assert math.isclose(g[i, 1, s - 1, 0], norm(y0 + s - 1), abs_tol=1e-6)
            assert math.isclose(g[i, 0, s - 1, 0], norm(x0), abs_tol=1e-6)  # x constant down a column
            c = s // 2
            assert math.isclose(g[i, 0, c, c], norm(x0 + c), abs_tol=1e-6)
            assert math.isclose(g[i, 1, c, c], norm(y0 + c), abs_tol=1e-6)
        assert torch.allclose(g[0, :, 0, 0], torch.tensor([-1.0, -1.0]))
        assert torch.allclose(g[1, :, -1, -1], torch.tensor([1.0, 1.0]))
    full = canvas_grid(1, r, r)
    assert torch.equal(full, coord_grid(torch.zeros(1, 2, dtype=torch.long), r, r))


def test_crop_at_offset_is_that_region_and_grid_matches_full_grid():
    r = 24
    img = torch.randn(6, 3, r, r)
    full = canvas_grid(6, r, r)
    for s in (6, 12, 24):
        offsets = random_offsets(6, s, r)
        p = crop(img, offsets, s)
        g = coord_grid(offsets, s, r)
        for i in range(6):
            x0, y0 = offsets[i].tolist()
            assert torch.equal(p[i], img[i, :, y0:y0 + s, x0:x0 + s])
            assert torch.equal(g[i], full[i, :, y0:y0 + s, x0:x0 + s])
    with pytest.raises(ValueError):
        crop(img, torch.tensor([[r - 5, 0]] * 6), 6)


def test_random_offsets_cover_both_ends_uniformly():
    o = random_offsets(40000, 12, 16, torch.Generator().manual_seed(0))
    counts = np.bincount(o.flatten().numpy(), minlength=5)
    assert len(counts) == 5  # 0..R-s inclusive, nothing beyond
    assert stats.chisquare(counts).pvalue > 1e-4


# ---------------------------------------------------------------- patch-size schedule

def test_stochastic_schedule_frequencies_chi_square():
    seed = int(torch.randint(0, 2**31, ()))
    sch = StochasticSchedule(64, batch=8, real_p=0.5, seed=seed)
    assert sch.sizes == [16, 32, 64]
    draws = [sch.size_at(i) for i in range(20000)]
    counts = np.array([draws.count(s) for s in sch.sizes])
    expect = np.array([0.2, 0.3, 0.5]) * 20000
    assert stats.chisquare(counts, expect).pvalue > 1e-4, counts


def test_default_patch_sets_by_resolution():
    """{R/4, R/2, R} with (2/5 (1-p), 3/5 (1-p), p) where R/4 is at least 16 px; {R/2, R} with
    (1-p, p) below (docs/patch_defaults.md)."""
    p = float(np.random.default_rng().uniform(0.05, 0.95))
    for r in (64, 128, 256, 512):
        sch = StochasticSchedule(r, 8, real_p=p)
        assert sch.sizes == [r // 4, r // 2, r] and sch.probs == pytest.approx([0.4 * (1 - p), 0.6 * (1 - p), p])
    for r in (8, 16, 32, 48):
        sch = StochasticSchedule(r, 8, real_p=p)
        assert sch.sizes == [r // 2, r] and sch.probs == pytest.approx([1 - p, p])
    assert ProgressiveSchedule(32, 8, real_p=p, duration_images=1000).sizes == [16, 32]


def test_schedule_is_a_function_of_seed_and_images_seen():
    a, b = StochasticSchedule(64, 8, seed=3), StochasticSchedule(64, 8, seed=3)
    assert [a.size_at(i) for i in range(0, 5000, 7)] == [b.size_at(i) for i in range(0, 5000, 7)]
    c = StochasticSchedule(64, 8, seed=4)
    assert [a.size_at(i) for i in range(500)] != [c.size_at(i) for i in range(500)]


def test_custom_sizes_full_and_progressive():
    lat = StochasticSchedule(32, 8, sizes=[16, 32], probs=[0.5, 0.5])
    assert lat.sizes == [16, 32]
    full = FullImageSchedule(64, 8)
    assert {full.size_at(i) for i in range(100)} == {64}
    p = 0.5
    prog = ProgressiveSchedule(64, 8, real_p=p, duration_images=1000)
    b1, b2 = 0.4 * (1 - p) * 1000, 1000 * (1 - p)
    assert prog.size_at(0) == 16 and prog.size_at(int(b1) - 1) == 16
    assert prog.size_at(int(b1)) == 32 and prog.size_at(int(b2) - 1) == 32
    assert prog.size_at(int(b2)) == 64 and prog.size_at(999) == 64
    with pytest.raises(ValueError, match="divide"):
        StochasticSchedule(64, 8, sizes=[24, 64], probs=[0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        StochasticSchedule(64, 8, sizes=[32, 64], probs=[0.5, 0.6])


def test_images_seen_accounting_uses_batch_multiplier():
    sch = StochasticSchedule(64, batch=8, seed=0)
    seen = 0
    for step in sch.steps(0, until=5000):
        assert step.images_seen == seen
        assert step.batch == 8 * 64 // step.patch_size
        seen += step.batch
    assert seen >= 5000
    # The default schedule costs about 0.37 of full images per image when cost ~ pixels.
    ratio = sch.expected_cost_ratio({16: 16**2, 32: 32**2, 64: 64**2})
    assert math.isclose(ratio, (0.2 * 4 / 16 + 0.3 * 2 / 4 + 0.5) / (0.8 + 0.6 + 0.5), rel_tol=1e-9)
    assert 0.36 < ratio < 0.38


# ---------------------------------------------------------------- config

def test_config_yaml_overrides_and_errors(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("base: tiny\ntrain: {batch: 16}\npatch: {real_p: 0.25}\n")
    cfg = C.load_config(f, ["train.seed=7", "network.channel_mult=[1,2]", "sample.s_max=inf"])
    assert cfg.train.batch == 16 and cfg.patch.real_p == 0.25 and cfg.train.seed == 7
    assert cfg.network.channel_mult == [1, 2] and cfg.sample.s_max == float("inf")
    assert cfg.network.model_channels == 32  # from the tiny preset underneath
    # Round trip through the saved YAML.
    saved = tmp_path / "resolved.yaml"
    C.save_config(cfg, saved)
    assert C.load_config(saved) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batchh: 3}\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml.*train.*unknown key 'batchh'"):
        C.load_config(bad)
    bad.write_text("train: {batch: many}\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml.*train.batch.*integer"):
        C.load_config(bad)
    with pytest.raises(C.ConfigError, match=r"patch.mode"):
        C.load_config(f, ["patch.mode=random"])
    with pytest.raises(C.ConfigError, match=r"override"):
        C.load_config(f, ["train.batch"])
    with pytest.raises(C.ConfigError, match="no such preset"):
        C.load_config("nonexistent_preset")


def test_config_choices_are_checked_once_with_the_key_file_value_and_choices(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("base: tiny\ndata: {backend: gpu}\n")
    with pytest.raises(C.ConfigError, match=r"run.yaml.*data.backend: 'gpu' is not one of auto, dali, torch"):
        C.load_config(f)
    with pytest.raises(C.ConfigError, match=r"train.kernels: 'cuda' is not one of auto, triton, torch"):
        C.load_config("tiny", ["train.kernels=cuda"])
    with pytest.raises(C.ConfigError, match=r"network.arch: 'unet' is not a registered network \(registered: ddpmpp, "
                                            r"ncsnpp, adm"):
        C.load_config("tiny", ["network.arch=unet"])
    with pytest.raises(C.ConfigError, match=r"network.label_dropout: must lie in \[0, 1\)"):
        C.load_config("tiny", ["network.label_dropout=1.0"])
    cfg = C.load_config("tiny", ["train.precision=bf16", "optim.nonfinite=skip", "network.coord_embed=fourier"])
    assert (cfg.train.precision, cfg.optim.nonfinite, cfg.network.coord_embed) == ("bf16", "skip", "fourier")
