"""EDM preconditioning (Karras et al. 2022, Table 1) around an inner network F.

D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s)), and for Patch Diffusion the coordinate
channels are concatenated to c_in(s) x unscaled and un-noised before F sees them.
"""
from __future__ import annotations

import torch
from torch import nn

SIGMA_DATA = 0.5


def c_skip(sigma, sigma_data: float = SIGMA_DATA):
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma, sigma_data: float = SIGMA_DATA):
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma, sigma_data: float = SIGMA_DATA):
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma):
    return sigma.log() / 4


def loss_weight(sigma, sigma_data: float = SIGMA_DATA):
    """lambda(s) = (s^2 + sd^2) / (s sd)^2 (EDM eq. 8 with Table 1's choice)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class EDMPrecond(nn.Module):
    """Denoiser wrapper. ``net(net_input, c_noise, class_labels)`` is the raw network F, whose input
    has C + 2 channels (image + coordinates) and whose output has C. ``logvar``: the learned loss
    weighting's u (None for EDM's weighting)."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA, logvar: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        # loss.weighting=learned: u(c_noise), the loss's learned uncertainty (pdiff.loss.Uncertainty);
        # trained and saved with the network, unused when sampling.
        self.logvar = logvar

    def net_input(self, x: torch.Tensor, sigma: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """[c_in(s) x, coords]: what F sees."""
        s = _bcast(sigma, x)
        return torch.cat([x * c_in(s, self.sigma_data), coords.to(x.dtype)], dim=1)

    def raw(self, net_input: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        """F(net_input; c_noise(s)) for a pre-built network input (the fused kernels build it)."""
        return self.net(net_input, c_noise(sigma.reshape(-1)), class_labels)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, coords: torch.Tensor,
                class_labels=None) -> torch.Tensor:
        sigma = (sigma.to(torch.float32).reshape(-1).expand(x.shape[0]) if sigma.numel() == 1
                 else sigma.to(torch.float32).reshape(-1))
        s = _bcast(sigma, x)
        f = self.raw(self.net_input(x, sigma, coords), sigma, class_labels)
        return c_skip(s, self.sigma_data) * x + c_out(s, self.sigma_data) * f.to(x.dtype)
