"""The patch EDM loss in plain torch: the reference the fused Triton kernels must match.

One training step on patches y (B, C, s, s) at offsets (B, 2):
  sigma ~ exp(Normal(P_mean, P_std)) per sample,  n ~ Normal(0, I)
  net_input = [c_in(sigma) (y + sigma n), coord_grid(offsets)]           (B, C + 2, s, s)
  F = net(net_input, c_noise(sigma), labels)
  D = c_skip(sigma) (y + sigma n) + c_out(sigma) F
  per-sample loss = mean over C*s*s of lambda(sigma) (D - y)^2

The per-sample loss is a mean over elements (not EDM's sum) so that steps of different patch sizes
weigh the same; the batch loss is the mean of the per-sample losses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .coords import coord_grid
from .precond import EDMPrecond, c_in, c_out, c_skip, loss_weight


def sample_sigma(batch: int, p_mean: float = -1.2, p_std: float = 1.2,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """ln(sigma) ~ Normal(P_mean, P_std), one sigma per sample (EDM Sec. 5)."""
    return (torch.randn(batch, generator=generator, device=device) * p_std + p_mean).exp()


def net_input_ref(patches: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                  offsets: torch.Tensor, resolution: int, sigma_data: float = 0.5,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[c_in(s) (y + s n), x-grid, y-grid] with patches y (B, C, s, s) already in [-1, 1]."""
    y = patches.to(torch.float32)
    s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    scaled = (y + s * noise.to(torch.float32)) * c_in(s, sigma_data)
    grid = coord_grid(offsets, y.shape[-1], resolution, torch.float32)
    return torch.cat([scaled, grid], dim=1).to(out_dtype)


def weighted_loss_ref(F: torch.Tensor, patches: torch.Tensor, noise: torch.Tensor,
                      sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample loss (B,): mean over elements of lambda(s) (D - y)^2, D = c_skip x + c_out F."""
    y = patches.to(torch.float32)
    s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    x = y + s * noise.to(torch.float32)
    d = c_skip(s, sigma_data) * x + c_out(s, sigma_data) * F.to(torch.float32)
    return (loss_weight(s, sigma_data) * (d - y) ** 2).flatten(1).mean(1)


@dataclass
class LossTerms:
    per_sample: torch.Tensor   # (B,) weighted loss per sample
    sigma: torch.Tensor        # (B,) the noise levels drawn


def patch_edm_loss(model: EDMPrecond, patches: torch.Tensor, offsets: torch.Tensor,
                   resolution: int, class_labels: torch.Tensor | None = None,
                   p_mean: float = -1.2, p_std: float = 1.2,
                   generator: torch.Generator | None = None,
                   sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> LossTerms:
    """The full training loss in plain torch (sigma and noise drawn unless given)."""
    b = patches.shape[0]
    if sigma is None:
        sigma = sample_sigma(b, p_mean, p_std, generator, patches.device)
    if noise is None:
        noise = torch.randn(patches.shape, generator=generator, device=patches.device)
    inp = net_input_ref(patches, noise, sigma, offsets, resolution, model.sigma_data)
    F = model.raw(inp, sigma, class_labels)
    return LossTerms(weighted_loss_ref(F, patches, noise, sigma, model.sigma_data), sigma)
