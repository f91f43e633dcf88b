"""The paper's schedule: each step draws its patch size with the given probabilities."""
from __future__ import annotations

import numpy as np

from .base import PatchSchedule

_TAG = 0x9A7C       # keeps this draw apart from the other draws made from (seed, images seen)


class StochasticSchedule(PatchSchedule):
    mode = "stochastic"

    def size_at(self, images_seen: int) -> int:
        return self.size_for(np.random.default_rng([self.seed, images_seen, _TAG]).random())
