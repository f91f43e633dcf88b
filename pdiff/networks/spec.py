"""What every network's config shares, and how a network is registered: its config dataclass and
its builder, kept together (``NetworkSpec``).

Each network module defines a subclass of ``NetworkConfig`` holding its own knobs (the U-Nets'
``model_channels``, ``channel_mult``...; a transformer's patch size, depth, heads...); the
``network:`` section of a run's YAML is ``arch`` plus the keys of that arch's class. The common keys
here (class labels, label dropout, the coordinate channels' embedding) mean the same for every
network. A class may list ``rules``: (key, test, what it must be), checked by pdiff.config.validate
like its VALUE_RULES.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

from torch import nn

from pdiff.knobs import knob

Rule = tuple[str, Callable[[Any], bool], str]


@dataclass
class NetworkConfig:
    arch: str = knob("ddpmpp", "the network, a name in pdiff.networks.NETWORKS; the other network.* keys are its own")
    label_dim: int = knob(0, "number of classes (0 = unconditional); default: the shards' classes")
    label_dropout: float = knob(0.0, "probability of dropping the label in training (classifier-free guidance)")
    coord_embed: Literal["none", "fourier"] = knob("none", "coordinate channels as given, or sin/cos features of them")
    coord_freqs: int = knob(4, "fourier: frequencies 2^0 .. 2^(k-1)")

    rules: ClassVar[tuple[Rule, ...]] = (
        ("label_dim", lambda v: v >= 0, "must be >= 0 (0 = unconditional)"),
        ("label_dropout", lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    )

    @classmethod
    def all_rules(cls) -> list[Rule]:
        """The rules of this class and of every class it derives from."""
        seen, out = set(), []
        for klass in reversed(cls.__mro__):
            for rule in vars(klass).get("rules", ()):
                if rule[0] not in seen:
                    seen.add(rule[0])
                    out.append(rule)
        return out


def common_keys() -> set[str]:
    """The keys every network's config has (those of NetworkConfig)."""
    return {f.name for f in dataclasses.fields(NetworkConfig)}


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
