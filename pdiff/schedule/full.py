"""Plain EDM: every step on full images (the reference patch schedules are measured against)."""
from __future__ import annotations

from .base import PatchSchedule


class FullImageSchedule(PatchSchedule):
    mode = "full"

    def sizes_and_probs(self, resolution, real_p, sizes, probs):
        return [resolution], [1.0]

    def size_at(self, images_seen: int) -> int:
        return self.resolution
