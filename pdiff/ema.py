"""Moving averages of the weights, counted in images seen: EDM's half-life EMA, and EDM2's
power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3) whose snapshots let any averaging length be chosen after training
(``pdiff.posthoc``).

Power-function EMA. At time t (images seen) the average weighs the weights of time tau in [0, t] by
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1). Its width is given as sigma_rel, the standard deviation
of that profile relative to t: sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (EDM2 eq. 123);
EDM2's defaults sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94. The update after a step that
took images seen from t0 to t1 is ema <- beta ema + (1 - beta) weights with
beta = (t0 / t1)^(gamma + 1) (EDM2 eq. 127, written with t0 = t1 - images of the step): this puts
exactly the integral of p over (t0, t1] on the step's weights, so the average of a run is the
continuous profile over the piecewise-constant weights, whatever the images per step (patch
steps carry batch R/s images).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

from .config import STD_MAX
from .snapshot import save_snapshot, snapshot_name


def gamma_to_std(gamma: float) -> float:
    """sigma_rel of the power profile with exponent gamma (EDM2 eq. 123)."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def std_to_gamma(std: float) -> float:
    """The exponent gamma > 0 of the power profile of relative width ``std``: the largest real root
    of (g + 2)^2 (g + 3) - (g + 1) / std^2 = g^3 + 7 g^2 + (16 - 1/std^2) g + (12 - 1/std^2)."""
    std = float(std)
    if not 0 < std < STD_MAX:
        raise ValueError(f"EMA std (sigma_rel) {std} must lie in (0, {STD_MAX:.4f})")
    k = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_beta(gamma: float, images_before: float, images_after: float) -> float:
    """beta of the power EMA for a step from ``images_before`` to ``images_after`` images seen."""
    return (images_before / images_after) ** (gamma + 1) if images_after > 0 else 0.0


def _average_copy(model: torch.nn.Module) -> torch.nn.Module:
    # The plain memory layout whatever training uses (train.channels_last): in-training samples
    # and FID run the weights as `pdiff sample` loads them.
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval().requires_grad_(False)


def _listed(average: torch.nn.Module, held: list, i: int) -> list[torch.nn.Parameter]:
    """``average``'s parameters, listed once and kept in ``held[i]`` as (module, list): load_state_dict
    copies into them in place, so they stay the module's; a module put in its place is listed anew."""
    if held[i] is None or held[i][0] is not average:
        held[i] = (average, list(average.parameters()))
    return held[i][1]


@torch.no_grad()
def _lerp_parameters(averages: list[list[torch.nn.Parameter]], model: torch.nn.Module, betas: list[float]) -> None:
    # Parameters only, as EDM: the networks' buffers (resampling filters, Fourier frequencies) are
    # constants the deep copy already holds. The source model's module tree is walked once per step,
    # for all the averages.
    source = list(model.parameters())
    for average, beta in zip(averages, betas):
        torch._foreach_lerp_(average, source, 1.0 - beta)


class EMA:
    """EDM's EMA: beta = 0.5 ** (images_per_step / half_life), with the half-life capped at
    ``rampup_ratio * images_seen`` early in training (EDM's ramp-up).

    Patch Diffusion counts a step's images as batch * average batch multiplier when it updates the
    EMA (the paper's code does this), so ``images_per_step`` is that average, not the step's own."""

    mode = "halflife"

    def __init__(self, model: torch.nn.Module, halflife_images: float, rampup_ratio: float = 0.05,
                 images_per_step: float = 1.0):
        self.model = _average_copy(model)
        self.halflife_images = float(halflife_images)
        self.rampup_ratio = float(rampup_ratio)
        self.images_per_step = float(images_per_step)
        self._held = [None]

    def beta(self, images_seen: float, images_per_step: float) -> float:
        halflife = self.halflife_images
        if self.rampup_ratio > 0:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (images_per_step / max(halflife, 1e-8))

    def update(self, model: torch.nn.Module, images_before: int, images_after: int) -> None:
        """After the step that took images seen from ``images_before`` to ``images_after``."""
        _lerp_parameters([_listed(self.model, self._held, 0)], model, [self.beta(images_after, self.images_per_step)])

    def snapshots(self) -> list[tuple[str, torch.nn.Module, dict]]:
        """(file name suffix, averaged model, snapshot metadata) of each average to snapshot."""
        return [("", self.model, {"ema_mode": self.mode, "ema_halflife_images": str(self.halflife_images)})]

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        if "profiles" in state:
            raise ValueError("the checkpoint holds power-function EMAs (ema.mode=power) and this run "
                             "tracks a half-life EMA: resume with ema.mode=power, or start a new run")
        self.model.load_state_dict(state)


class PowerEMA:
    """EDM2's power-function EMAs, one per sigma_rel in ``stds`` (module docstring). ``model`` is the
    first: the average the run's sample grids, in-training FID and a checkpoint's EMA weights use."""

    mode = "power"

    def __init__(self, model: torch.nn.Module, stds: list[float]):
        if not stds:
            raise ValueError("ema.stds is empty: give the sigma_rel of each power EMA to track, e.g. [0.05, 0.1]")
        self.stds = [float(s) for s in stds]
        self.gammas = [std_to_gamma(s) for s in self.stds]
        self.models = [_average_copy(model) for _ in self.stds]
        self._held = [None] * len(self.models)

    @property
    def model(self) -> torch.nn.Module:
        return self.models[0]

    def update(self, model: torch.nn.Module, images_before: int, images_after: int) -> None:
        """After the step that took images seen from ``images_before`` to ``images_after``."""
        _lerp_parameters([_listed(average, self._held, i) for i, average in enumerate(self.models)], model,
                         [power_beta(gamma, images_before, images_after) for gamma in self.gammas])

    def snapshots(self) -> list[tuple[str, torch.nn.Module, dict]]:
        return [(f"-{std:.3f}", average, power_metadata(std, gamma))
                for std, gamma, average in zip(self.stds, self.gammas, self.models)]

    def state_dict(self) -> dict:
        return {"stds": list(self.stds), "profiles": [m.state_dict() for m in self.models]}

    def load_state_dict(self, state: dict) -> None:
        if "profiles" not in state:
            raise ValueError("the checkpoint holds a half-life EMA (ema.mode=halflife) and this run tracks "
                             "power-function EMAs: resume with ema.mode=halflife, or start a new run")
        if [float(s) for s in state["stds"]] != self.stds:
            raise ValueError(f"the checkpoint tracks power EMAs of ema.stds {list(state['stds'])} and this run "
                             f"asks for {self.stds}: resume with the checkpoint's ema.stds, or start a new run")
        for average, profile in zip(self.models, state["profiles"]):
            average.load_state_dict(profile)


def power_metadata(std: float, gamma: float) -> dict:
    """The metadata a power-EMA snapshot carries besides the config and images seen."""
    return {"ema_mode": "power", "ema_std": f"{std:.6g}", "ema_gamma": repr(float(gamma))}


def build_ema(cfg, model: torch.nn.Module, images_per_step: float) -> EMA | PowerEMA:
    """The average cfg.ema asks for; ``images_per_step`` is the schedule's EMA count (half-life mode)."""
    if cfg.ema.mode == "power":
        return PowerEMA(model, cfg.ema.stds)
    return EMA(model, cfg.ema.halflife_images, cfg.ema.rampup_ratio, images_per_step)


def save_snapshots(ema: EMA | PowerEMA, folder: str | Path, cfg, images_seen: int) -> list[Path]:
    """Each average of ``ema`` as a snapshot: ``ema-<images>.safetensors`` (half-life) or
    ``ema-<images>-<std>.safetensors`` per power EMA, written by ``pdiff.snapshot.save_snapshot``.
    Returns the files written, one per average."""
    return [save_snapshot(Path(folder) / snapshot_name(images_seen, suffix), average, cfg, images_seen, meta)
            for suffix, average, meta in ema.snapshots()]
