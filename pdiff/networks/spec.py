"""How a network is registered: its config dataclass and its builder, kept together (``NetworkSpec``).
The config derives from ``NetworkConfig`` (pdiff/network_config.py: the keys every network shares)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from torch import nn

from pdiff.network_config import NetworkConfig, Rule, common_keys  # noqa: F401  (re-exported)

Builder = Callable[..., nn.Module]        # (its config, resolution, channels) -> the network


@dataclass(frozen=True)
class NetworkSpec:
    """A registered network: the dataclass its ``network:`` keys load into, and its builder."""
    config: type
    build: Builder

    def __post_init__(self):
        if not (isinstance(self.config, type) and issubclass(self.config, NetworkConfig)):
            raise TypeError(f"a network's config must be a dataclass deriving from "
                            f"pdiff.networks.NetworkConfig, got {self.config!r}")

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]
