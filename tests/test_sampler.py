"""The EDM sampler against an exact answer: Gaussian data and its ideal denoiser (SPEC)."""
import math

import pytest
import torch

from pdiff.sampler import SeedNoise, edm_sample, edm_sigmas, network_evaluations, patch_denoiser, sample_images


def gaussian_denoiser(mu: torch.Tensor, var: torch.Tensor, calls: list):
    """Ideal denoiser for data ~ N(mu, var I): D(x; s) = mu + var / (var + s^2) (x - mu)."""
    def d(x, sigma):
        calls.append(1)
        return mu + var / (var + sigma**2) * (x - mu)
    return d


def test_sigma_schedule_matches_formula():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    s = edm_sigmas(n, smin, smax, rho)
    assert s.shape == (n + 1,) and s[-1] == 0
    for i in (0, 5, n - 1):
        expect = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert math.isclose(float(s[i]), expect, rel_tol=1e-12)
    assert math.isclose(float(s[0]), smax) and math.isclose(float(s[n - 1]), smin, rel_tol=1e-9)


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_sampler_recovers_gaussian(churn):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    dim, n = 8, 20000
    mu = torch.randn(dim, generator=g, dtype=torch.float64) * 0.5
    var = (torch.rand(dim, generator=g, dtype=torch.float64) * 0.5 + 0.05)
    calls = []
    noise = torch.randn(n, dim, generator=g, dtype=torch.float64)
    steps = 128  # enough that the discretisation error (1.8% in std at 32 steps) is negligible
    out = edm_sample(gaussian_denoiser(mu, var, calls), noise, edm_sigmas(steps),
                     s_churn=churn, s_min=0.05, s_max=50.0, s_noise=1.0,
                     randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    assert len(calls) == 2 * steps - 1
    # Mean: 5 standard errors; variance: 5% relative (the sampling error of a variance over 20k
    # samples is ~1%, and the discretisation error of 128 Heun steps is ~0.1%).
    se = (var / n).sqrt()
    assert ((out.mean(0) - mu).abs() < 5 * se + 1e-3).all(), (out.mean(0) - mu)
    assert ((out.var(0) / var - 1).abs() < 0.05).all(), out.var(0) / var


def test_euler_single_step_is_exact_denoise():
    # One step from sigma_max straight to 0: Euler gives D(x; s_max), the posterior mean.
    mu, var = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    noise = torch.randn(5, 1, dtype=torch.float64)
    calls = []
    out = edm_sample(gaussian_denoiser(mu, var, calls), noise, edm_sigmas(1))
    x = noise * 80.0
    assert torch.allclose(out, mu + var / (var + 80.0**2) * (x - mu))
    assert len(calls) == 1


class _ShiftModel(torch.nn.Module):
    """D(x; s, coords, labels) with a known dependence on coordinates and labels."""
    def forward(self, x, sigma, coords, labels=None):
        out = 0.1 * x + coords[:, :1].mean() * 0 + coords[:, 1:2]
        if labels is not None:
            out = out + labels[:, :1, None, None]
        return out


def test_guidance_mixes_conditional_and_unconditional():
    m = _ShiftModel()
    x = torch.randn(2, 1, 4, 4)
    coords = torch.randn(2, 2, 4, 4)
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w = 1.3
    d = patch_denoiser(m, coords, labels, guidance=w)(x.double(), torch.tensor(1.0, dtype=torch.float64))
    cond, uncond = m(x, None, coords, labels), m(x, None, coords, torch.zeros_like(labels))
    assert torch.allclose(d, uncond + w * (cond - uncond), atol=1e-6)


def test_seed_noise_is_independent_of_batch_composition():
    a = SeedNoise([3, 7, 11]).randn((3, 2, 4, 4))
    b = SeedNoise([7]).randn((1, 2, 4, 4))
    assert torch.equal(a[1], b[0])


def test_sample_images_extrapolates_with_extended_grid():
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, sigma, coords, labels=None):
            seen["coords"] = coords
            return torch.zeros_like(x)
    out = sample_images(Spy(), torch.randn(1, 3, 48, 48), resolution=32, steps=2)
    c = seen["coords"]
    assert out.shape == (1, 3, 48, 48)
    # The training canvas (32 px) sits in the middle: pixel 8 is the training canvas's column 0.
    assert torch.isclose(c[0, 0, 0, 8], torch.tensor(-1.0)) and torch.isclose(c[0, 0, 0, 39], torch.tensor(1.0))
    assert c[0, 0, 0, 0] < -1 and c[0, 1, -1, 0] > 1


class _GaussianClasses(torch.nn.Module):
    """The ideal denoiser of data ~ N(mu * label, v I) (label 1: class "mu", all-zero label: the
    unconditional N(0, v I)), as a patch model D(x; sigma, coords, labels). Counts rows evaluated."""
    def __init__(self, mu: float, var: float):
        super().__init__()
        self.mu, self.var, self.rows = mu, var, []

    def forward(self, x, sigma, coords, labels=None):
        self.rows.append(x.shape[0])
        a = (self.var / (self.var + sigma.double() ** 2)).reshape(-1, 1, 1, 1)
        target = self.mu * labels.double()[:, :1, None, None]
        return (a * x.double() + (1 - a) * target).float()


def exact_guided_flow(x_max, mu, var, w, lo, hi, sigma_max):
    """The probability-flow ODE of D = a x + (1 - a) m, a = v / (v + s^2), solved exactly: between the
    points where m jumps, (x - m) / sqrt(v + s^2) is constant. Guided, m = w mu for s in (lo, hi];
    else the conditional model alone, m = mu."""
    x, s = x_max, sigma_max
    for s_next, m in ((hi, mu), (lo, w * mu), (0.0, mu)):
        s_next = min(s_next, s)
        x = m + (x - m) * math.sqrt(var + s_next ** 2) / math.sqrt(var + s ** 2)
        s = s_next
    return x


@pytest.mark.parametrize("interval", [(0.0, math.inf), (0.3, 3.0), (1.0, 1e3)])
def test_guidance_interval_against_the_exact_flow(interval):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    mu, var, w = float(torch.rand((), generator=g)) + 0.5, float(torch.rand((), generator=g)) * 0.3 + 0.1, 2.5
    lo, hi = interval
    model = _GaussianClasses(mu, var)
    noise = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    steps = 3000     # the jumps of m at lo and hi cost Heun O(step) there: about 1e-3 at 3000 steps
    out = sample_images(model, noise, 2, torch.ones(3, 1), steps=steps, guidance=w, guidance_interval=interval)
    want = torch.tensor([[exact_guided_flow(float(x) * 80.0, mu, var, w, lo, hi, 80.0) for x in row.flatten()]
                         for row in noise], dtype=torch.float64).reshape(noise.shape)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=4e-3)
    # guidance that is everywhere, or nowhere, would land elsewhere
    for other in ((0.0, math.inf), (0.0, 1e-9)):
        if other != interval:
            far = exact_guided_flow(float(noise[0, 0, 0, 0]) * 80, mu, var, w, *other, 80.0)
            assert abs(far - float(want[0, 0, 0, 0])) > 0.05
    # two network rows per image inside the interval, one outside
    from pdiff.config import SamplerConfig
    expect = network_evaluations(SamplerConfig(steps=steps, guidance=w, guidance_interval=list(interval)), True)
    assert sum(model.rows) == 3 * expect


def test_guidance_interval_bounds_and_single_evaluation_outside():
    model = _GaussianClasses(1.0, 0.5)
    x, coords, labels = torch.randn(2, 1, 2, 2), torch.zeros(2, 2, 2, 2), torch.ones(2, 1)
    d = patch_denoiser(model, coords, labels, guidance=3.0, guidance_interval=(0.5, 2.0))
    cond = model(x, torch.full((2,), 1.0), coords, labels)
    uncond = model(x, torch.full((2,), 1.0), coords, torch.zeros_like(labels))
    model.rows.clear()
    for sigma, guided in ((0.5, False), (0.50001, True), (1.0, True), (2.0, True), (2.00001, False)):
        s = torch.tensor(sigma, dtype=torch.float64)
        got = d(x.double(), s)
        c = model(x, s.float().expand(2), coords, labels)
        u = model(x, s.float().expand(2), coords, torch.zeros_like(labels))
        torch.testing.assert_close(got, u + 3.0 * (c - u) if guided else c, rtol=1e-6, atol=1e-6)
        assert model.rows[-3] == (4 if guided else 2)      # the denoiser's own call, before the two checks
    assert not torch.allclose(cond, uncond)


def test_guidance_interval_config_and_cli_checks():
    from pdiff.config import ConfigError, load_config
    from pdiff.tools.sample import _interval
    assert load_config(None, ["sample.guidance_interval=[0.28, 5.42]"]).sample.guidance_interval == [0.28, 5.42]
    assert load_config(None).sample.guidance_interval == [0.0, math.inf]
    for bad in ("[3, 1]", "[-1, 2]", "[1]"):
        with pytest.raises(ConfigError, match="sample.guidance_interval"):
            load_config(None, [f"sample.guidance_interval={bad}"])
    assert _interval("0.28,inf") == [0.28, math.inf]
    with pytest.raises(Exception, match="LO,HI"):
        _interval("0.28")


def test_edm_reference_loop_matches_the_sampler_without_churn():
    """The benchmark's re-implementation of EDM's edm_sampler and pdiff's sampler take the same
    steps (deterministic Heun): the same samples from the same noise, through a real network."""
    from pdiff.bench.runs import edm_reference_sampler
    from pdiff.config import load_config
    from pdiff.coords import canvas_grid
    from pdiff.model import build_model
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = load_config("tiny", ["network.model_channels=8", "network.channel_mult=[1,2]", "network.attn_resolutions=[]",
                               "data.resolution=16"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    seeds = SeedNoise([int(s) for s in torch.randint(0, 2**40, (3,))])
    noise = seeds.randn((3, 3, 16, 16))
    ours = sample_images(model, noise, 16, steps=4)
    den = patch_denoiser(model, canvas_grid(3, 16, 16))
    drawn = []
    ref = edm_reference_sampler(den, noise, lambda x: drawn.append(1) or torch.randn_like(x), num_steps=4)
    torch.testing.assert_close(ref.float(), ours, rtol=0, atol=1e-5)
    assert len(drawn) == 4          # EDM draws churn noise at every step, even with no churn
