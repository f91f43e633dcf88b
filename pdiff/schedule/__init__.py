"""Which patch size each training step uses (Patch Diffusion Sec. 3.3).

Every step uses ONE patch size s and carries batch * (R / s) patches; the images seen by a step are
counted as that many patches. The choice is a pure function of (seed, images seen), so every rank
draws the same size for the same step and a resumed run draws the same sizes again.

    schedule = PatchSchedule.from_config(cfg)      # the class SCHEDULES[cfg.patch.mode]
    schedule.size_at(images_seen), schedule.batch_for(size), schedule.expected_cost_ratio(costs)

Adding a schedule: write pdiff/schedule/<file>.py with a PatchSchedule subclass (see base.py) whose
``mode`` is its name, and add it to the tuple SCHEDULES is built from below; ``patch.mode=<mode>`` then
selects it (pdiff/config.py checks names against SCHEDULES). Code outside the package registers with
``register_schedule``.
"""
from __future__ import annotations

from .base import SCHEDULES, PatchSchedule, Step, default_patch_sizes, latent_patch_sizes
from .full import FullImageSchedule
from .progressive import ProgressiveSchedule
from .stochastic import StochasticSchedule

# patch.mode -> schedule class (the dict is base.py's, which from_config reads): the one place a
# schedule is registered.
SCHEDULES.update({s.mode: s for s in (StochasticSchedule, ProgressiveSchedule, FullImageSchedule)})


def register_schedule(schedule: type[PatchSchedule]) -> None:
    """Add a schedule from outside this package (a plugin, a test) to SCHEDULES under its ``mode``."""
    if not schedule.mode:
        raise ValueError(f"{schedule.__name__} has no mode: set the name patch.mode selects it by")
    if schedule.mode in SCHEDULES:
        raise ValueError(f"patch schedule {schedule.mode!r} is already registered (to "
                         f"{SCHEDULES[schedule.mode].__module__}); pick another mode")
    SCHEDULES[schedule.mode] = schedule


__all__ = ["SCHEDULES", "FullImageSchedule", "PatchSchedule", "ProgressiveSchedule", "Step",
           "StochasticSchedule", "default_patch_sizes", "latent_patch_sizes", "register_schedule"]
