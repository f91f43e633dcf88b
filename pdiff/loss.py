"""The patch EDM loss of one training step, and its noise levels.

One training step on patches y (B, C, s, s) at offsets (B, 2):
  sigma ~ exp(Normal(P_mean, P_std)) per sample,  n ~ Normal(0, I)
  net_input = [c_in(sigma) (y + sigma n), coord_grid(offsets)]           (B, C + 2, s, s)
  F = net(net_input, c_noise(sigma), labels)
  D = c_skip(sigma) (y + sigma n) + c_out(sigma) F
  per-sample loss = mean over C*s*s of lambda(sigma) (D - y)^2

The per-sample loss is a mean over elements (not EDM's sum) so that steps of different patch sizes
weigh the same; the batch loss is the mean of the per-sample losses. The two memory-bound ends are
fused kernels (pdiff.kernels.build_net_input, pdiff.kernels.edm_patch_loss); their plain-torch
references, net_input_ref and edm_loss_ref, sit beside them in kernels/net_input.py and
kernels/edm_loss.py. pdiff.step.PatchLoss puts the step together.

loss.weighting=learned (EDM2, eq. 21): a small MLP u(sigma) over c_noise (``Uncertainty``, kept on the
model as ``model.logvar`` so it trains, checkpoints and resumes with it) turns each per-sample loss L
into L / exp(u) + u. It is applied to the fused kernel's per-sample output: the kernel's backward
scales its saved dL/dF by the per-sample gradient it receives (exp(-u) here), so the weighting
composes with it exactly and the kernels need no second variant. EDM2 sums the elements where pdiff
takes their mean; mean(w (D - y)^2) / exp(u) + u is its per-element loss averaged, the same optimum.
"""
from __future__ import annotations

import torch
from torch import nn

from .networks.edm2 import MPConv, MPFourier
from .precond import c_in, c_out, c_skip, loss_weight


def sample_sigma(batch: int, p_mean: float = -1.2, p_std: float = 1.2,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """ln(sigma) ~ Normal(P_mean, P_std), one sigma per sample (EDM Sec. 5)."""
    return (torch.randn(batch, generator=generator, device=device) * p_std + p_mean).exp()


def noise_distribution(cfg, patch_size: int) -> tuple[float, float]:
    """(P_mean, P_std) of ln(sigma) for a step of ``patch_size``: patch.p_mean / patch.p_std where given
    (one per patch.sizes entry), else loss.p_mean / loss.p_std."""
    p, i = cfg.patch, None
    if (p.p_mean or p.p_std) and patch_size in p.sizes:
        i = p.sizes.index(patch_size)
    mean = p.p_mean[i] if i is not None and p.p_mean else cfg.loss.p_mean
    std = p.p_std[i] if i is not None and p.p_std else cfg.loss.p_std
    return mean, std


class Uncertainty(nn.Module):
    """EDM2's learned uncertainty u(sigma) (its Precond's logvar): magnitude-preserving Fourier
    features of c_noise into one bias-free, weight-normalized linear output."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.fourier = MPFourier(channels)
        self.linear = MPConv(channels, 1)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fourier(c_noise.to(torch.float32))).reshape(-1)


def learned_weighting(loss: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-sample loss L weighted by the learned uncertainty u: L / exp(u) + u (EDM2 eq. 21)."""
    return loss * torch.exp(-u.to(loss.dtype)) + u.to(loss.dtype)


def token_pixel_mask(keep: torch.Tensor, tokens_per_side: int, p: int) -> torch.Tensor:
    """(B, 1, s, s) float: 1 on the pixels of the tokens in ``keep`` (B, K) (row-major token
    indices of an n x n window of p x p tokens), 0 elsewhere."""
    b = keep.shape[0]
    kept = torch.zeros(b, tokens_per_side * tokens_per_side, device=keep.device)
    kept.scatter_(1, keep, 1.0)
    kept = kept.reshape(b, 1, tokens_per_side, tokens_per_side)
    return kept.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)


def masked_patch_loss(F: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                      kept: torch.Tensor, mae_weight: float, sigma_data: float = 0.5) -> torch.Tensor:
    """MaskDiT's per-sample loss (Zheng et al. 2024) on a window whose tokens were partly dropped:
    the EDM loss lambda (D - y)^2 averaged over the KEPT pixels, plus ``mae_weight`` times the
    masked tokens' reconstruction of the network's noisy input c_in (y + sigma n) averaged over the
    DROPPED pixels. ``kept``: (B, 1, s, s) 0/1 (token_pixel_mask); y, noise float32 (B, C, s, s)."""
    s = sigma.float().reshape(-1, 1, 1, 1)
    x = y + s * noise.float()
    d = c_skip(s, sigma_data) * x + c_out(s, sigma_data) * F.float()
    channels = y.shape[1]
    per_pixel = loss_weight(s, sigma_data) * (d - y) ** 2
    dsm = (per_pixel * kept).flatten(1).sum(1) / (kept.flatten(1).sum(1) * channels).clamp_min(1)
    dropped = 1 - kept
    mae = ((F.float() - c_in(s, sigma_data) * x) ** 2 * dropped).flatten(1).sum(1)
    mae = mae / (dropped.flatten(1).sum(1) * channels).clamp_min(1)
    return dsm + mae_weight * mae
