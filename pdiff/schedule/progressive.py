"""Small patches first: R/4 for the first 2/5 (1-p) of training, R/2 for the next 3/5 (1-p), then R
(below 64 px, the default sizes are {R/2, R}: R/2 for the first 1-p; with patch.sizes /
patch.probs: each size for its share of the images, smallest first)."""
from __future__ import annotations

from .base import PatchSchedule


class ProgressiveSchedule(PatchSchedule):
    mode = "progressive"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.duration_images:
            raise ValueError("patch.mode=progressive needs the run's length: set train.duration_images")

    def size_at(self, images_seen: int) -> int:
        return self.size_for(images_seen / self.duration_images)

    def step_shares(self) -> list[float]:
        """The probabilities are shares of the images seen; a step of size s counts batch * R/s of
        them, so steps of s are in proportion to p(s) / (batch * R/s)."""
        steps = [p / self.batch_for(s) for s, p in zip(self.sizes, self.probs)]
        return [n / sum(steps) for n in steps]
