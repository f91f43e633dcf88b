"""Denoiser networks F for EDM preconditioning, taking image + coordinate channels.

    net = build_network(cfg.network, resolution=64, channels=3)
    out = net(x, noise_labels, class_labels)   # x: (B, 3 + 2, s, s) -> (B, 3, s, s)

``noise_labels`` is EDM's c_noise(sigma) = ln(sigma) / 4, one per sample; ``class_labels`` one-hot
(B, label_dim) or None (= unconditional). ``net.downsample`` is the factor every patch size must be a
multiple of.

Adding a network: write pdiff/networks/<file>.py with its config, a dataclass deriving from
``NetworkConfig`` (pdiff/network_config.py: the keys every network shares) that adds the network's own knobs, and a
builder

    def build(cfg: MyConfig, resolution: int, channels: int) -> nn.Module

whose module has the forward above and a ``downsample`` attribute, and add one line for the pair to
NETWORKS below; ``network.arch=<name>`` then selects it and the ``network:`` section takes the keys of
its config (pdiff/config.py loads it by arch, `pdiff config` lists the keys per arch). Code outside
the package registers with ``register_network``.

Blocks: every network names its blocks for forward hooks (representation losses, probes):
``net.block_names()`` lists them in forward order as paths for ``net.get_submodule`` (the U-Nets:
"enc.16x16_block0", "dec.8x8_in0", ...; layers.UNetBase). Any module is also addressed by its
``named_modules()`` name (``pdiff info --blocks`` lists them); the representation losses
(pdiff/repr.py, ``repr.block``) hook one. ``find_block`` resolves a name or says which are close.
"""
from __future__ import annotations

import difflib

import torch

from torch import nn

from . import adm, dit, edm2, songunet
from .adm import ADMConfig, DhariwalUNet
from .dit import DiT, DiTConfig
from .edm2 import EDM2Config, EDM2UNet
from pdiff.network_config import NetworkConfig, UNetConfig, common_keys

from .songunet import SongUNet, SongUNetConfig
from .spec import Builder, NetworkSpec

# network.arch -> (its config dataclass, its builder): the one place a network is registered.
NETWORKS: dict[str, NetworkSpec] = {
    "ddpmpp": NetworkSpec(SongUNetConfig, songunet.build_ddpmpp),
    "ncsnpp": NetworkSpec(SongUNetConfig, songunet.build_ncsnpp),
    "adm": NetworkSpec(ADMConfig, adm.build),
    "edm2": NetworkSpec(EDM2Config, edm2.build),
    "dit": NetworkSpec(DiTConfig, dit.build),
}


def register_network(name: str, build: Builder, config: type = UNetConfig) -> None:
    """Add a network from outside this package (a plugin, a test) to NETWORKS under ``name``, with
    its config dataclass (a ``NetworkConfig`` subclass; default: the U-Nets' keys, which every
    network had before networks had their own configs)."""
    if name in NETWORKS:
        raise ValueError(f"network {name!r} is already registered (to {NETWORKS[name].build.__module__}); "
                         "pick another name")
    NETWORKS[name] = NetworkSpec(config, build)


def network_config(arch: str, **keys) -> NetworkConfig:
    """The config of network ``arch`` with ``keys`` set and the arch's defaults elsewhere."""
    if arch not in NETWORKS:
        raise ValueError(f"network.arch: {arch!r} is not a registered network ({', '.join(NETWORKS)})")
    return NETWORKS[arch].config(arch=arch, **keys)


def build_network(cfg, resolution: int, channels: int) -> nn.Module:
    """The network ``cfg.arch`` (its config, checked by pdiff.config) for ``resolution`` x
    ``resolution`` training images with ``channels`` channels; its input has ``channels + 2`` channels."""
    try:
        build = NETWORKS[cfg.arch].build
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


__all__ = ["NETWORKS", "ADMConfig", "BlockError", "DhariwalUNet", "DiT", "DiTConfig", "EDM2Config", "EDM2UNet",
           "NetworkConfig",
           "NetworkSpec", "SongUNet", "SongUNetConfig", "UNetConfig", "block_names", "build_network", "common_keys",
           "find_block", "network_blocks", "network_config", "register_network"]
