"""Which patch size each training step uses (Patch Diffusion Sec. 3.3).

Every step uses ONE patch size s and carries batch * (R / s) patches; the images seen by a step are
counted as that many patches. The choice is a pure function of (seed, images seen), so every rank
draws the same size for the same step and a resumed run draws the same sizes again.

    schedule = PatchSchedule.from_config(cfg)      # the class SCHEDULES[cfg.patch.mode]
    schedule.size_at(images_seen), schedule.batch_for(size), schedule.expected_cost_ratio(costs)

A new schedule is one module in this folder with a PatchSchedule subclass (see base.py) and one
entry in SCHEDULES below; patch.mode then selects it by its ``mode``.
"""
from __future__ import annotations

from .base import PatchSchedule, Step, default_patch_sizes
from .full import FullImageSchedule
from .progressive import ProgressiveSchedule
from .stochastic import StochasticSchedule

# patch.mode -> schedule class: the one place a schedule is registered.
SCHEDULES: dict[str, type[PatchSchedule]] = {
    s.mode: s for s in (StochasticSchedule, ProgressiveSchedule, FullImageSchedule)}

__all__ = ["SCHEDULES", "FullImageSchedule", "PatchSchedule", "ProgressiveSchedule", "Step",
           "StochasticSchedule", "default_patch_sizes"]
