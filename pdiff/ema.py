"""Exponential moving average of the weights, its half-life counted in images (EDM / EDM2)."""
from __future__ import annotations

import copy

import torch


class EMA:
    """beta = 0.5 ** (images_per_step / half_life), with the half-life capped at
    ``rampup_ratio * images_seen`` early in training (EDM's ramp-up).

    Patch Diffusion counts a step's images as batch * average batch multiplier when it updates the
    EMA (the paper's code does this), so ``images_per_step`` is that average, not the step's own."""

    def __init__(self, model: torch.nn.Module, halflife_images: float, rampup_ratio: float = 0.05):
        # The plain memory layout whatever training uses (train.channels_last): in-training samples
        # and FID run the weights as `pdiff sample` loads them.
        self.model = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
        self.halflife_images = float(halflife_images)
        self.rampup_ratio = float(rampup_ratio)

    def beta(self, images_seen: float, images_per_step: float) -> float:
        halflife = self.halflife_images
        if self.rampup_ratio > 0:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (images_per_step / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, images_seen: float, images_per_step: float) -> None:
        beta = self.beta(images_seen, images_per_step)
        ema_p = list(self.model.parameters())
        src_p = list(model.parameters())
        # Parameters only, as EDM: the networks' buffers (resampling filters, Fourier
        # frequencies) are constants the deep copy already holds.
        torch._foreach_lerp_(ema_p, src_p, 1.0 - beta)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
