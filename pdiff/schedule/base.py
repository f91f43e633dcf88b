"""What every patch schedule shares: its sizes and probabilities, the batch multiplier, the walk over
steps, and the cost and EMA figures that follow from which sizes its steps use."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


# The smallest patch the paper trains on: R/4 at 64 px, R/2 on 32 x 32 latents.
SMALLEST_DEFAULT_PATCH = 16


def default_patch_sizes(resolution: int, real_p: float) -> tuple[list[int], list[float]]:
    """The default patch sets by resolution (docs/patch_defaults.md has the rule and its evidence):
    {R/4, R/2, R} with probabilities (2/5 (1-p), 3/5 (1-p), p), the paper's pixel-space default,
    where R/4 is at least 16 px (R >= 64); below that {R/2, R} with (1-p, p), as the paper's
    32 x 32 latents, because smaller patches lost to it on the measured data."""
    if resolution // 4 >= SMALLEST_DEFAULT_PATCH:
        return ([resolution // 4, resolution // 2, resolution],
                [0.4 * (1 - real_p), 0.6 * (1 - real_p), real_p])
    return [resolution // 2, resolution], [1 - real_p, real_p]


def latent_patch_sizes(resolution: int, real_p: float) -> tuple[list[int], list[float]]:
    """{R/2, R} with probabilities (1 - p, p): the paper's setting on a latent grid (R = 32 for
    256 x 256 images through the SD VAE), where R/4 patches would hold too little of the image."""
    return [resolution // 2, resolution], [1 - real_p, real_p]


@dataclass(frozen=True)
class Step:
    patch_size: int
    batch: int          # patches in this step (global, all ranks together)
    images_seen: int    # images seen before this step


class PatchSchedule:
    """Patch sizes with probabilities, and a rule for the size of the step that starts after
    ``images_seen`` images (``size_at``), which subclasses give. Every step of size s carries
    batch * R/s patches and counts that many images.

    A subclass sets ``mode`` (the patch.mode that selects it), implements ``size_at`` as a pure
    function of (seed, images seen) so that every rank and a resumed run draw the same sizes, and may
    override ``sizes_and_probs`` (its sizes when patch.sizes is empty) and ``step_shares`` (when its
    probabilities are not the share of steps of each size)."""

    mode = ""

    def __init__(self, resolution: int, batch: int, real_p: float = 0.5, sizes: Sequence[int] = (),
                 probs: Sequence[float] = (), seed: int = 0, duration_images: int | None = None):
        sizes, probs = self.sizes_and_probs(resolution, real_p, list(sizes), list(probs))
        if len(sizes) != len(probs):
            raise ValueError(f"patch.sizes {list(sizes)} and patch.probs {list(probs)} differ in length: "
                             f"give one probability per size")
        for s in sizes:
            if s <= 0 or s > resolution or resolution % s:
                raise ValueError(f"patch.sizes: {s} does not divide data.resolution {resolution}; use sizes "
                                 f"that divide it, e.g. {resolution // 4}, {resolution // 2}, {resolution}")
        if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise ValueError(f"patch.probs {list(probs)} must be non-negative and sum to 1")
        order = sorted(range(len(sizes)), key=lambda i: sizes[i])
        # Sizes with probability 0 are never drawn; keep them out so nothing (compile warm-up,
        # the data pipeline) prepares for them.
        self.sizes = [int(sizes[i]) for i in order if probs[i] > 0]
        self.probs = [float(probs[i]) for i in order if probs[i] > 0]
        self.resolution, self.batch = resolution, batch
        self.seed, self.duration_images = seed, duration_images
        self._cum = np.cumsum(self.probs)

    @staticmethod
    def from_config(cfg) -> "PatchSchedule":
        """The schedule cfg.patch.mode names (``pdiff.schedule.SCHEDULES``), for the run cfg describes."""
        p = cfg.patch
        return SCHEDULES[p.mode](cfg.data.resolution, cfg.train.batch, p.real_p, p.sizes, p.probs,
                                 cfg.train.seed, cfg.train.duration_images)

    def sizes_and_probs(self, resolution: int, real_p: float, sizes: list[int], probs: list[float]
                        ) -> tuple[list[int], list[float]]:
        """The sizes and probabilities to use: patch.sizes / patch.probs as given, or the paper's
        default when both are empty."""
        if not sizes:
            if probs:
                raise ValueError(f"patch.probs {probs} is given without patch.sizes: give the sizes they "
                                 "belong to, or neither for the default sizes for data.resolution "
                                 "(docs/patch_defaults.md)")
            return default_patch_sizes(resolution, real_p)
        if not probs:
            share = round(1 / len(sizes), 2)
            even = ",".join(f"{p:g}" for p in [share] * (len(sizes) - 1) + [round(1 - share * (len(sizes) - 1), 2)])
            raise ValueError(f"patch.sizes {sizes} is given without patch.probs: give one probability per "
                             f"size (e.g. patch.probs=[{even}]), or neither for the default sizes for data.resolution "
                             "(docs/patch_defaults.md)")
        return sizes, probs

    def size_at(self, images_seen: int) -> int:
        """The patch size of the step that starts after ``images_seen`` images."""
        raise NotImplementedError

    def size_for(self, u: float) -> int:
        """The size whose interval of the cumulative probabilities holds u in [0, 1)."""
        i = int(np.searchsorted(self._cum, u, side="right"))
        return self.sizes[min(i, len(self.sizes) - 1)]

    def multiplier(self, patch_size: int) -> int:
        return self.resolution // patch_size

    def batch_for(self, patch_size: int) -> int:
        return self.batch * self.multiplier(patch_size)

    def step_at(self, images_seen: int) -> Step:
        s = self.size_at(images_seen)
        return Step(s, self.batch_for(s), images_seen)

    def steps(self, images_seen: int = 0, until: int | None = None) -> Iterator[Step]:
        """The steps from ``images_seen`` on (until ``until`` images, if given)."""
        while until is None or images_seen < until:
            step = self.step_at(images_seen)
            yield step
            images_seen += step.batch

    # -- what follows from the mix of sizes: the cost model and the EMA's count

    def step_shares(self) -> list[float]:
        """The expected share of steps of each size (in ``sizes`` order): ``probs``, when they are
        the probabilities of a step's size."""
        return list(self.probs)

    def expected_cost_ratio(self, cost_per_patch: dict[int, float]) -> float:
        """Expected compute per image seen, relative to full images, given the cost of one patch of
        each size: a step of size s, with share q(s) of the steps, costs B (R/s) cost(s) and counts
        B (R/s) images, so the ratio is sum q m cost / sum q m over cost(R), m = R/s."""
        full = cost_per_patch[self.resolution]
        q, m = self.step_shares(), [self.multiplier(s) for s in self.sizes]
        num = sum(p * k * cost_per_patch[s] for s, p, k in zip(self.sizes, q, m))
        return float(num / sum(p * k for p, k in zip(q, m)) / full)

    def ema_images_per_step(self) -> float:
        """The images one step counts for the EMA: the paper's rule, batch * the average batch
        multiplier under ``probs``, the same for every step."""
        return self.batch * sum(p * self.multiplier(s) for s, p in zip(self.sizes, self.probs))

    def summary(self) -> dict:
        return {"mode": self.mode, "sizes": list(self.sizes), "probs": list(self.probs)}


# patch.mode -> schedule class. It lives beside the base class so that from_config needs no import of
# the package; pdiff/schedule/__init__.py registers the built-in schedules in it (``register_schedule``
# from outside the package).
SCHEDULES: dict[str, type[PatchSchedule]] = {}
