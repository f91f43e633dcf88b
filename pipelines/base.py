"""The backend-independent half of a patch pipeline: the plan, the move to the device, the flips, the
damaged-sample policy, the draw from posterior latents and the resumable state. Image patches stay
uint8 HWC all the way to the device (the training step's kernels normalize them as they read);
latent patches arrive as float32 CHW, values as stored, and posterior ones (mean | std) become one
draw of the latent here, so latents never pass through uint8."""
from __future__ import annotations

import sys

import numpy as np
import torch

from pdiff.pipelines.batch import Batch, PipelineStateError
from pdiff.pipelines.corrupt import CorruptPolicy, Replaced
from pdiff.pipelines.order import RankStep, SamplePlan, latent_noise_seed
from pdiff.pipelines.sample_source import LatentSpace, SampleSource

# 2: the plan reads one global stream of epochs (pipelines/order.py); version 1 states padded each
# rank's part of an epoch, which reads the same samples whenever the world size divides the dataset.
STATE_VERSION = 2


def draw_latents(stored: torch.Tensor, eps: torch.Tensor, space: LatentSpace) -> torch.Tensor:
    """Posterior patches (b, 2C, s, s) = mean | std, unit noise (b, C, s, s) -> latents
    (mean + std * eps - shift) * scale (b, C, s, s)."""
    c = eps.shape[1]
    return (torch.addcmul(stored[:, :c], stored[:, c:], eps) - space.shift).mul_(space.scale)


class PatchPipeline:
    """Shared part: the plan, the damaged-sample policy, the state, the transfer and the flips.
    Backends implement ``_start(images_seen)``, ``_next_step() -> (RankStep, patches, replaced)`` and
    ``_stop()``; the patches are uint8 (b, s, s, C) for images and float32 (b, C, s, s) for latents
    (``patch_dtype``), on the host or already on the device; ``replaced`` lists the rows read from
    another sample than planned because the planned one was damaged (pipelines/corrupt.py). Posterior
    latents (mean | std, 2C channels) leave as one draw (mean + std * eps - shift) * scale, C channels."""
    backend = "?"
    follows_plan = True      # reads the source step by step (SampleSource.follow); the in-memory mode reads it once

    def __init__(self, cfg, schedule, rank: int, world_size: int, device: torch.device, source: SampleSource):
        self.cfg, self.schedule, self.rank, self.world_size = cfg, schedule, rank, world_size
        self.device = torch.device(device)
        self.source = source
        self.seed = int(cfg.train.seed)
        self.plan = SamplePlan(source.count, source.plan_labels, schedule, self.seed, rank, world_size,
                               xflip=bool(cfg.data.xflip))
        self.corrupt = CorruptPolicy(cfg.data.on_corrupt, cfg.data.max_corrupt)
        self.images_seen = 0
        self._running = False
        # what Batch.patches holds: uint8 HWC pixels, or the latents' float32 CHW values
        self.patch_dtype = torch.float32 if source.encoding == "latent" else torch.uint8
        # repr.loss=align: each row's stored feature grid goes with its patch (Batch.features)
        self.with_features = getattr(getattr(cfg, "repr", None), "loss", "none") == "align"

    # -- iteration
    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.follows_plan:
            self.source.follow(self.plan, self.images_seen)
        if not self._running:
            self._start(self.images_seen)
            self._running = True
        step, raw, replaced = self._next_step()
        if step.images_seen != self.images_seen:
            raise RuntimeError(f"pipeline out of step: got images_seen {step.images_seen}, expected {self.images_seen}")
        if replaced:
            self.corrupt.apply(step.indices, step.labels, self.plan.labels, replaced)
        patches = raw.to(self.device, non_blocking=True)
        if step.flips.any():             # mirror the width axis: 2 in uint8 (b, s, s, C), 3 in float (b, C, s, s)
            rows = torch.from_numpy(step.flips.nonzero()[0]).to(self.device)
            patches[rows] = patches[rows].flip(2 if patches.dtype == torch.uint8 else 3)
        if self.source.latent is not None and self.source.latent.posterior:
            patches = draw_latents(patches, self._latent_noise(step), self.source.latent)
        features = self._features(step) if self.with_features else None
        self.images_seen += self.schedule.batch_for(step.patch_size)
        return Batch(patches, torch.from_numpy(step.offsets).to(self.device),
                     torch.from_numpy(step.labels).to(self.device), step.patch_size, step.images_seen, features)

    def _features(self, step: RankStep) -> torch.Tensor:
        """The stored feature grids (b, C_f, g, g) of the samples the step's rows hold (a replacement's
        where one was damaged: ``step.indices`` says which), float32 on the device, mirrored where the
        patch is: the training step samples them over the patch's region at its offsets
        (pdiff.repr.feature_region), so a flipped patch meets the flip of the region it was read from."""
        grids = torch.from_numpy(np.stack([self.source.read_features(int(i)) for i in step.indices]))
        grids = grids.to(self.device, non_blocking=True).float()
        if step.flips.any():
            rows = torch.from_numpy(step.flips.nonzero()[0]).to(self.device)
            grids[rows] = grids[rows].flip(3)
        return grids

    def _latent_noise(self, step: RankStep) -> torch.Tensor:
        """Unit noise for this rank's posterior patches: drawn for the whole global step on the device
        from (seed, images seen), rows r, r+W, ... kept (the rows the plan deals this rank), so a
        resumed run and W ranks draw what one uninterrupted process draws. The noise belongs to the row:
        a row whose damaged sample was replaced (data.on_corrupt=skip) draws the replacement with it, and
        the replacement is itself a function of what is on disk, so a resume stays exact."""
        s, c = step.patch_size, self.source.sample_channels
        gen = torch.Generator(self.device).manual_seed(latent_noise_seed(self.seed, step.images_seen))
        eps = torch.randn((self.schedule.batch_for(s), c, s, s), generator=gen, device=self.device)
        return eps[self.rank::self.world_size]

    # -- state
    def _guards(self) -> dict:
        return {"batch": self.schedule.batch,
                "resolution": self.schedule.resolution, "seed": self.seed,
                "dataset": self.source.fingerprint(), "count": self.source.count}

    def state_dict(self) -> dict:
        """The position is global (images seen) and the same on every rank; the damaged samples met
        are this rank's. ``world_size`` is recorded, not checked: the plan derives every rank's
        samples from images seen, whatever the number of ranks (pipelines/order.py)."""
        return {"kind": "pdiff-patch-pipeline", "version": STATE_VERSION, "images_seen": int(self.images_seen),
                "backend": self.backend, "corrupt": self.corrupt.state_dict(), "world_size": self.world_size,
                **self._guards()}

    def regroup_states(self, states: list[dict]) -> dict:
        """This rank's state from the states of the W ranks that saved a checkpoint, when this run has
        another number of ranks (elastic resume): the position is theirs (the same on every rank), the
        damaged samples met are all of theirs, and their replacement count goes to rank 0."""
        if not states:
            raise PipelineStateError("the checkpoint holds no data pipeline state")
        positions = {s.get("images_seen") for s in states if isinstance(s, dict)}
        if len(positions) != 1:
            raise PipelineStateError(f"the {len(states)} ranks' pipeline states disagree on the images seen "
                                     f"({sorted(map(str, positions))}): the checkpoint is inconsistent")
        corrupt = [s.get("corrupt") or {} for s in states]
        found = sorted({int(i) for c in corrupt for i in c.get("found", ())})
        replaced = sum(int(c.get("replaced", 0)) for c in corrupt) if self.rank == 0 else 0
        return {**states[0], "corrupt": {"found": found, "replaced": replaced}}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "pdiff-patch-pipeline":
            raise PipelineStateError("not a pdiff pipeline state (expected the dict from pipe.state_dict())")
        if state.get("version") not in (1, STATE_VERSION):
            raise PipelineStateError(f"pipeline state version {state.get('version')} is not {STATE_VERSION}; "
                                     f"it was written by another pdiff version")
        if state["version"] == 1 and state.get("count", 0) % state.get("world_size", 1):
            print(f"pdiff: WARNING the data pipeline state was saved by an older pdiff with {state.get('world_size')} "
                  f"processes, which do not divide the {state.get('count')} samples: from here on the samples "
                  f"follow this version's order (each still read once per epoch from the next epoch on)",
                  file=sys.stderr, flush=True)
        what = {"batch": "global batch (train.batch)", "resolution": "resolution",
                "seed": "seed (train.seed)", "dataset": "dataset (its fingerprint)", "count": "dataset size"}
        for key, value in self._guards().items():
            if state.get(key) != value:
                raise PipelineStateError(
                    f"cannot resume the data pipeline: the {what[key]} was {state.get(key)!r} when the state was "
                    f"saved and is {value!r} now; resume with the same setting (or start a new run)")
        n = int(state["images_seen"])
        if n < 0:
            raise PipelineStateError(f"images_seen {n} in the state is negative")
        self.close()
        self.images_seen = n
        self.corrupt.load_state_dict(state.get("corrupt"))     # absent in states saved before the policy

    def close(self) -> None:
        if self._running:
            self._stop()
            self._running = False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- backend hooks
    def _start(self, images_seen: int) -> None:
        raise NotImplementedError

    def _next_step(self) -> tuple[RankStep, torch.Tensor, list[Replaced]]:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError
