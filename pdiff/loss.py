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
"""
from __future__ import annotations

import torch


def sample_sigma(batch: int, p_mean: float = -1.2, p_std: float = 1.2,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """ln(sigma) ~ Normal(P_mean, P_std), one sigma per sample (EDM Sec. 5)."""
    return (torch.randn(batch, generator=generator, device=device) * p_std + p_mean).exp()
