"""Build the denoiser D = EDMPrecond(F) that a config describes."""
from __future__ import annotations

import torch

from .config import Config
from .precond import EDMPrecond


def build_model(cfg: Config) -> EDMPrecond:
    from .networks import build_network
    net = build_network(cfg.network, cfg.data.resolution, cfg.data.channels)
    return EDMPrecond(net, cfg.loss.sigma_data)


def one_hot_labels(labels: torch.Tensor | None, label_dim: int) -> torch.Tensor | None:
    """Integer class indices (B,) -> one-hot (B, label_dim) floats; index -1 (no label) -> zeros.
    Returns None for unconditional models."""
    if label_dim == 0 or labels is None:
        return None
    if (labels >= label_dim).any():
        raise ValueError(f"class label {int(labels.max())} out of range for network.label_dim={label_dim}")
    out = torch.zeros(labels.shape[0], label_dim, device=labels.device)
    known = labels >= 0
    out[known.nonzero().squeeze(1), labels[known]] = 1.0
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
