"""Which patch size each training step uses (Patch Diffusion Sec. 3.3).

Every step uses ONE patch size s and carries batch * (R / s) patches; the images seen by a step are
counted as that many patches. The choice is a pure function of (seed, images seen), so every rank
draws the same size for the same step and a resumed run draws the same sizes again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

MODES = ("stochastic", "progressive", "full")


def default_patch_sizes(resolution: int, real_p: float) -> tuple[list[int], list[float]]:
    """{R/4, R/2, R} with probabilities (2/5 (1-p), 3/5 (1-p), p), the paper's pixel-space default."""
    return ([resolution // 4, resolution // 2, resolution],
            [0.4 * (1 - real_p), 0.6 * (1 - real_p), real_p])


@dataclass(frozen=True)
class Step:
    patch_size: int
    batch: int          # patches in this step (global, all ranks together)
    images_seen: int    # images seen before this step


class PatchSchedule:
    def __init__(self, resolution: int, batch: int, mode: str = "stochastic", real_p: float = 0.5,
                 sizes: Sequence[int] | None = None, probs: Sequence[float] | None = None,
                 seed: int = 0, duration_images: int | None = None):
        if mode not in MODES:
            raise ValueError(f"patch.mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= real_p <= 1.0:
            raise ValueError(f"patch.real_p must lie in [0, 1], got {real_p}")
        if mode == "full":
            sizes, probs = [resolution], [1.0]
        elif not sizes:
            if probs:
                raise ValueError("patch.probs given without patch.sizes")
            sizes, probs = default_patch_sizes(resolution, real_p)
        elif not probs:
            raise ValueError("patch.sizes given without patch.probs")
        if len(sizes) != len(probs):
            raise ValueError(f"patch.sizes {list(sizes)} and patch.probs {list(probs)} differ in length")
        for s in sizes:
            if s <= 0 or s > resolution or resolution % s:
                raise ValueError(f"patch size {s} must divide the resolution {resolution}")
        if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise ValueError(f"patch.probs {list(probs)} must be non-negative and sum to 1")
        if mode == "progressive" and not duration_images:
            raise ValueError("progressive patch schedule needs the run's duration in images")
        order = sorted(range(len(sizes)), key=lambda i: sizes[i])
        # Sizes with probability 0 are never drawn; keep them out so nothing (compile warm-up,
        # the data pipeline) prepares for them.
        self.sizes = [int(sizes[i]) for i in order if probs[i] > 0]
        self.probs = [float(probs[i]) for i in order if probs[i] > 0]
        self.resolution, self.batch, self.mode = resolution, batch, mode
        self.seed, self.duration_images = seed, duration_images
        self._cum = np.cumsum(self.probs)

    def multiplier(self, patch_size: int) -> int:
        return self.resolution // patch_size

    def batch_for(self, patch_size: int) -> int:
        return self.batch * self.multiplier(patch_size)

    def size_at(self, images_seen: int) -> int:
        """The patch size of the step that starts after ``images_seen`` images."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        if self.mode == "progressive":
            # R/4 for the first 2/5 (1-p) of training, R/2 for the next 3/5 (1-p), then R.
            u = images_seen / self.duration_images
        else:
            u = np.random.default_rng([self.seed, images_seen, 0x9A7C]).random()
        i = int(np.searchsorted(self._cum, u, side="right"))
        return self.sizes[min(i, len(self.sizes) - 1)]

    def step_at(self, images_seen: int) -> Step:
        s = self.size_at(images_seen)
        return Step(s, self.batch_for(s), images_seen)

    def steps(self, images_seen: int = 0, until: int | None = None) -> Iterator[Step]:
        """The steps from ``images_seen`` on (until ``until`` images, if given)."""
        while until is None or images_seen < until:
            step = self.step_at(images_seen)
            yield step
            images_seen += step.batch

    def expected_cost_ratio(self, cost_per_patch: dict[int, float]) -> float:
        """Expected compute per image seen, relative to full images, given the cost of one patch of
        each size.

        Stochastic: a step of size s is drawn with probability p(s), costs B (R/s) cost(s) and
        counts B (R/s) images, so the ratio is sum p m cost / sum p m over cost(R), m = R/s.
        Progressive: the probabilities are shares of the images seen, so it is sum p cost."""
        full = cost_per_patch[self.resolution]
        if self.mode == "progressive":
            return float(sum(p * cost_per_patch[s] for s, p in zip(self.sizes, self.probs)) / full)
        m = [self.multiplier(s) for s in self.sizes]
        num = sum(p * k * cost_per_patch[s] for s, p, k in zip(self.sizes, self.probs, m))
        return float(num / sum(p * k for p, k in zip(self.probs, m)) / full)
