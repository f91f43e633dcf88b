"""Denoiser networks F for EDM preconditioning, taking image + coordinate channels.

    net = build_network(cfg.network, resolution=64, channels=3)
    out = net(x, noise_labels, class_labels)   # x: (B, 3 + 2, s, s) -> (B, 3, s, s)

``noise_labels`` is EDM's c_noise(sigma) = ln(sigma) / 4, one per sample; ``class_labels`` one-hot
(B, label_dim) or None (= unconditional). ``net.downsample`` is the factor every patch size must be a
multiple of.

Adding a network: write pdiff/networks/<file>.py with a builder

    def build(cfg: pdiff.config.NetworkConfig, resolution: int, channels: int) -> nn.Module

whose module has the forward above and a ``downsample`` attribute, and add one line for it to
NETWORKS below; ``network.arch=<name>`` then selects it (pdiff/config.py checks names against
NETWORKS). Code outside the package registers with ``register_network``.

Blocks: any module of a network is addressed by its ``named_modules()`` name (the U-Nets':
``enc.16x16_block0``, ``dec.8x8_in0``, ...; ``pdiff info --blocks`` lists them); the representation
losses (pdiff/repr.py, ``repr.block``) hook one. ``find_block`` resolves a name or says which are close.
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch

from torch import nn

from . import adm, songunet
from .adm import DhariwalUNet
from .songunet import SongUNet

Builder = Callable[..., nn.Module]        # (NetworkConfig, resolution, channels) -> the network

# network.arch -> builder: the one place a network is registered.
NETWORKS: dict[str, Builder] = {
    "ddpmpp": songunet.build_ddpmpp,
    "ncsnpp": songunet.build_ncsnpp,
    "adm": adm.build,
}


def register_network(name: str, build: Builder) -> None:
    """Add a network from outside this package (a plugin, a test) to NETWORKS under ``name``."""
    if name in NETWORKS:
        raise ValueError(f"network {name!r} is already registered (to {NETWORKS[name].__module__}); "
                         "pick another name")
    NETWORKS[name] = build


def build_network(cfg, resolution: int, channels: int) -> nn.Module:
    """The network ``cfg.arch`` (a ``pdiff.config.NetworkConfig``, checked by pdiff.config) for
    ``resolution`` x ``resolution`` training images with ``channels`` channels; its input has
    ``channels + 2`` channels."""
    try:
        build = NETWORKS[cfg.arch]
    except KeyError:
        raise ValueError(f"network.arch: {cfg.arch!r} is not a registered network ({', '.join(NETWORKS)})") from None
    net = build(cfg, resolution, channels)
    if resolution % net.downsample:
        raise ValueError(f"data.resolution {resolution} is not a multiple of the {cfg.arch} network's "
                         f"downsampling factor {net.downsample} (the U-Nets': 2 ** (len(network.channel_mult) - 1); "
                         "use fewer levels)")
    return net


class BlockError(ValueError):
    """A block name that is no module of the network."""


def block_names(net: nn.Module) -> list[str]:
    """The addressable blocks of ``net``: every named submodule (the root, named '', excluded)."""
    return [name for name, _ in net.named_modules() if name]


def find_block(net: nn.Module, name: str) -> nn.Module:
    """The module ``name`` of ``net``; BlockError naming the closest names and the outer blocks."""
    modules = dict(net.named_modules())
    if name and name in modules:
        return modules[name]
    names = block_names(net)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    outer = [n for n in names if n.count(".") <= 1]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise BlockError(f"{name!r} is not a module of the network{hint}"
                     + f" (its blocks: {', '.join(outer)}; `pdiff info --blocks` lists every name)")


def network_blocks(cfg, resolution: int, channels: int, name: str | None = None) -> list[str]:
    """The block names of the network ``cfg`` describes (built on the meta device: no memory, no
    weights); with ``name``, BlockError unless it is one of them."""
    with torch.device("meta"):
        net = build_network(cfg, resolution, channels)
    if name is not None:
        find_block(net, name)
    return block_names(net)


__all__ = ["NETWORKS", "BlockError", "DhariwalUNet", "SongUNet", "block_names", "build_network", "find_block",
           "network_blocks", "register_network"]
