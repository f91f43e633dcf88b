"""The EDM sampler against an exact answer: Gaussian data and its ideal denoiser (SPEC)."""
import math

import pytest
import torch

from pdiff.sampler import SeedNoise, edm_sample, edm_sigmas, patch_denoiser, sample_images


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
