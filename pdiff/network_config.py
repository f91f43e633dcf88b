"""The keys every network's config shares (``NetworkConfig``) and the U-Nets' (``UNetConfig``: DDPM++,
NCSN++ and ADM derive theirs from it in their modules), with no torch: pdiff.config imports this at
its top and stays importable without torch (the shard writer's processes read it).

Each network module under pdiff/networks/ defines a subclass of ``NetworkConfig`` holding its own
knobs (the U-Nets' ``model_channels``, ``channel_mult``...; a transformer's patch size, depth,
heads...) and registers it with its builder (pdiff.networks.NETWORKS); the ``network:`` section of a
run's YAML is ``arch`` plus the keys of that arch's class. A class may list ``rules``: (key, test,
what it must be), checked by pdiff.config.validate like its VALUE_RULES.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

from .knobs import knob

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



@dataclass
class UNetConfig(NetworkConfig):
    """The knobs of EDM's U-Nets (DDPM++, NCSN++, ADM: songunet.py and adm.py derive their configs from
    it), with DDPM++'s values as defaults."""
    model_channels: int = knob(128, "base channels")
    channel_mult: list[int] = knob([1, 2, 2, 2], "channels of each resolution level, in multiples of model_channels")
    num_blocks: int = knob(4, "residual blocks per resolution")
    attn_resolutions: list[int] = knob([16], "resolutions (feature map sides) with self-attention")
    dropout: float = knob(0.10, "dropout probability in the residual blocks")

    rules: ClassVar[tuple[Rule, ...]] = (
        ("model_channels", lambda v: v >= 1, "must be at least 1"),
        ("channel_mult", lambda v: len(v) >= 1 and min(v) >= 1,
         "must list at least one positive channel multiplier (one per resolution level)"),
        ("num_blocks", lambda v: v >= 1, "must be at least 1"),
        ("attn_resolutions", lambda v: all(r >= 1 for r in v), "must list positive resolutions"),
        ("dropout", lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    )
