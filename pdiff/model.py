"""Build the denoiser D = EDMPrecond(F) that a config describes."""
from __future__ import annotations

import torch

from .config import Config
from .networks import build_network
from .loss import Uncertainty
from .precond import EDMPrecond


def build_model(cfg: Config) -> EDMPrecond:
    net = build_network(cfg.network, cfg.data.resolution, cfg.data.channels)
    logvar = Uncertainty(cfg.loss.logvar_channels) if cfg.loss.weighting == "learned" else None
    return EDMPrecond(net, cfg.loss.sigma_data, logvar)


def one_hot_labels(labels: torch.Tensor | None, label_dim: int) -> torch.Tensor | None:
    """Integer class indices (B,) -> one-hot (B, label_dim) floats; index -1 (no label) -> zeros.
    Returns None for unconditional models. No host sync (the trainer calls it every step): the
    range of the dataset's labels is checked once, against its manifest, before training."""
    if label_dim == 0 or labels is None:
        return None
    hot = torch.nn.functional.one_hot(labels.clamp(0, label_dim - 1), label_dim).float()
    return hot * (labels >= 0).unsqueeze(1)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
