"""EDM sampling (Karras et al. 2022, Algorithm 2): Heun's 2nd-order method with optional churn.

Samplers are pure functions of (denoiser, noise, sigmas, ...): ``denoiser(x, sigma) -> D`` where
sigma is a scalar tensor. Patch Diffusion samples exactly as EDM, on the whole canvas, with the full
coordinate grid bound into the denoiser (``patch_denoiser``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .coords import canvas_grid

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device=None) -> torch.Tensor:
    """s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < N, and s_N = 0 (EDM eq. 5)."""
    if steps < 1:
        raise ValueError(f"sampler steps must be at least 1, got {steps}")
    i = torch.arange(steps, dtype=torch.float64, device=device)
    denom = max(steps - 1, 1)
    s = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64, device=device)])


class SeedNoise:
    """Per-image random streams: row i of every draw comes from seed i alone, so an image depends on
    its seed and not on the batch it was sampled in (what EDM's StackedRandomGenerator does)."""

    def __init__(self, seeds: Sequence[int], device=None):
        self.device = device
        self.generators = [torch.Generator(device=device or "cpu").manual_seed(int(s) % (1 << 63))
                           for s in seeds]

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, x.dtype)

    def randint(self, high: int, shape: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.randint(high, tuple(shape[1:]), generator=g, device=self.device)
                            for g in self.generators])


@torch.no_grad()
def edm_sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor,
               s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"),
               s_noise: float = 1.0, randn_like: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor:
    """Deterministic Heun (churn 0) or the stochastic sampler; 2N - 1 denoiser evaluations.

    ``noise`` is unit Gaussian noise of the output shape; ``sigmas`` ends with 0 (``edm_sigmas``).
    Computation is in float64 as in EDM's reference sampler."""
    randn_like = randn_like or torch.randn_like
    n = len(sigmas) - 1
    sigmas = sigmas.to(torch.float64)
    x = noise.to(torch.float64) * sigmas[0]
    for i in range(n):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= float(t_cur) <= s_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:  # raise the noise level to t_hat (EDM Alg. 2, lines 5-6)
            x = x + (t_hat**2 - t_cur**2).sqrt() * s_noise * randn_like(x)
        d_cur = (x - denoiser(x, t_hat).to(torch.float64)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if i < n - 1:  # Heun correction; Euler on the last step (t_next = 0)
            d_prime = (x_next - denoiser(x_next, t_next).to(torch.float64)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def patch_denoiser(model, coords: torch.Tensor, class_labels: torch.Tensor | None = None,
                   guidance: float = 1.0, guidance_interval: Sequence[float] = (0.0, math.inf)) -> Denoiser:
    """Bind the coordinate grid (and labels) into ``model(x, sigma, coords, labels)``.

    With guidance w != 1 and labels, D = D_uncond + w (D_cond - D_uncond) (classifier-free
    guidance); the unconditional branch gets all-zero labels, as dropped labels are in training.
    Guidance acts only for sigma in ``guidance_interval`` = (lo, hi] (Kynkaanniemi et al. 2024,
    "Applying guidance in a limited interval"); elsewhere D = D_cond, one network evaluation."""
    lo, hi = (float(v) for v in guidance_interval)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        s = sigma.to(torch.float32).reshape(1).expand(x.shape[0])
        if class_labels is None or guidance == 1.0 or not lo < float(sigma) <= hi:
            return model(x32, s, coords, class_labels)
        both = model(torch.cat([x32, x32]), torch.cat([s, s]), torch.cat([coords, coords]),
                     torch.cat([class_labels, torch.zeros_like(class_labels)]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)
    return denoise


def sample_images(model, noise: torch.Tensor, resolution: int, class_labels=None, steps: int = 18,
                  sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  guidance: float = 1.0, s_churn: float = 0.0, s_min: float = 0.0,
                  s_max: float = float("inf"), s_noise: float = 1.0, randn_like=None,
                  guidance_interval: Sequence[float] = (0.0, math.inf)) -> torch.Tensor:
    """Sample whole canvases of the noise's size (larger than ``resolution`` extrapolates)."""
    b, _, h, w = noise.shape
    if h != w:
        raise ValueError(f"canvas must be square, got {h}x{w}")
    coords = canvas_grid(b, h, resolution, device=noise.device)
    den = patch_denoiser(model, coords, class_labels, guidance, guidance_interval)
    sig = edm_sigmas(steps, sigma_min, sigma_max, rho, device=noise.device)
    return edm_sample(den, noise, sig, s_churn, s_min, s_max, s_noise, randn_like).to(torch.float32)


def network_evaluations(cfg, guided: bool) -> int:
    """Network evaluations per image of the deterministic sampler ``cfg`` (a SamplerConfig) describes:
    2N - 1, plus one more for each evaluation inside the guidance interval when ``guided``."""
    sigmas = edm_sigmas(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()
    n = len(sigmas) - 1
    at = sigmas[:n] + sigmas[1:n]          # Heun: D at t_i for every step, at t_{i+1} for all but the last
    lo, hi = cfg.guidance_interval
    return len(at) + (sum(lo < s <= hi for s in at) if guided else 0)
