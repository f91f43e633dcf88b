"""Denoiser networks F for EDM preconditioning, taking image + coordinate channels.

    net = build_network(cfg.network, resolution=64, channels=3)
    out = net(x, noise_labels, class_labels)   # x: (B, 3 + 2, s, s) -> (B, 3, s, s)

``noise_labels`` is EDM's c_noise(sigma) = ln(sigma) / 4, one per sample; ``class_labels`` one-hot
(B, label_dim) or None (= unconditional). ``net.downsample`` is the factor every patch size must be a
multiple of.
"""
from __future__ import annotations

from torch import nn

from .adm import DhariwalUNet
from .songunet import SongUNet

ARCHS = ("ddpmpp", "ncsnpp", "adm")

# EDM's train.py settings that tell DDPM++ and NCSN++ apart (both use the standard decoder).
_SONG_VARIANTS = {
    "ddpmpp": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   resample_filter=(1, 1)),
    "ncsnpp": dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   resample_filter=(1, 3, 3, 1)),
}


def build_network(cfg, resolution: int, channels: int) -> nn.Module:
    """The network ``cfg.arch`` (a ``pdiff.config.NetworkConfig``) for ``resolution`` x ``resolution``
    training images with ``channels`` channels; its input has ``channels + 2`` channels."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"network.arch: {cfg.arch!r} is not one of {', '.join(ARCHS)}")
    if cfg.coord_embed not in ("none", "fourier"):
        raise ValueError(f"network.coord_embed: {cfg.coord_embed!r} is not one of none, fourier")
    levels = len(cfg.channel_mult)
    if levels < 1:
        raise ValueError("network.channel_mult: needs at least one level")
    downsample = 2 ** (levels - 1)
    if resolution % downsample:
        raise ValueError(f"data.resolution {resolution} is not a multiple of the network's downsampling "
                         f"factor {downsample} (2 ** (len(network.channel_mult) - 1)); use fewer levels")
    if cfg.label_dim < 0:
        raise ValueError(f"network.label_dim must be >= 0, got {cfg.label_dim}")
    if not 0 <= cfg.label_dropout <= 1:
        raise ValueError(f"network.label_dropout must lie in [0, 1], got {cfg.label_dropout}")
    coord_freqs = cfg.coord_freqs if cfg.coord_embed == "fourier" else 0
    if cfg.coord_embed == "fourier" and coord_freqs < 1:
        raise ValueError(f"network.coord_freqs must be >= 1 with coord_embed fourier, got {cfg.coord_freqs}")
    common = dict(img_resolution=resolution, img_channels=channels, label_dim=cfg.label_dim,
                  model_channels=cfg.model_channels, channel_mult=tuple(cfg.channel_mult),
                  num_blocks=cfg.num_blocks, attn_resolutions=tuple(cfg.attn_resolutions),
                  dropout=cfg.dropout, label_dropout=cfg.label_dropout, coord_freqs=coord_freqs)
    if cfg.arch == "adm":
        return DhariwalUNet(**common)
    return SongUNet(**common, **_SONG_VARIANTS[cfg.arch])


__all__ = ["ARCHS", "DhariwalUNet", "SongUNet", "build_network"]
