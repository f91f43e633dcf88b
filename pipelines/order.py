"""What every step reads: which samples, where each is cropped, all as pure functions.

* Epoch e visits the samples in the order ``permutation(seed, e)``, shared by all ranks. Rank r of
  W takes every W-th entry starting at r; when W does not divide N the permutation is padded by
  wrapping around (as torch's DistributedSampler), so every rank has ceil(N / W) samples per epoch.
* Each rank reads its part as one endless stream (epochs roll over). Every step consumes
  ``batch_for(s) / W`` entries of each rank's stream, so after ``images_seen`` global images a rank
  stands at position ``images_seen / W``: the position needs no state beyond images seen.
* Crop positions and flips of a step are drawn for the whole global step from a generator seeded
  with (seed, images_seen), uniform over 0..R-s with both ends included; rank r keeps rows r, r+W, ...
  Its samples are rows r, r+W, ... of the global step too (within an epoch), so W ranks read exactly
  what one process with the same global batch would read (when W divides the dataset size).
* Posterior latents (pipelines/base.py) draw their noise for the global step from
  ``latent_noise_seed(seed, images_seen)`` and rank r keeps the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ORDER_TAG, _CROP_TAG, _LATENT_TAG = 0x5EED, 0xC809, 0x1A7E


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, _ORDER_TAG]).permutation(num_samples)


def rank_part(num_samples: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """The samples rank ``rank`` reads in epoch ``epoch`` (ceil(N / W) of them, in order)."""
    perm = epoch_permutation(num_samples, seed, epoch)
    per_rank = -(-num_samples // world_size)
    pad = per_rank * world_size - num_samples
    if pad:
        perm = np.concatenate([perm, np.resize(perm, pad)])
    return perm[rank::world_size]


def rank_stream(num_samples: int, seed: int, rank: int, world_size: int, start: int, count: int,
                cache: dict | None = None) -> np.ndarray:
    """Entries ``start .. start+count-1`` of the rank's endless stream of sample indices."""
    per_rank = -(-num_samples // world_size)
    out = np.empty(count, np.int64)
    done = 0
    while done < count:
        epoch, at = divmod(start + done, per_rank)
        part = cache.get(epoch) if cache is not None else None
        if part is None:
            part = rank_part(num_samples, seed, epoch, rank, world_size)
            if cache is not None:
                cache.clear()           # the stream only moves forward: keep the current epoch
                cache[epoch] = part
        take = min(count - done, per_rank - at)
        out[done:done + take] = part[at:at + take]
        done += take
    return out


def crop_positions(seed: int, images_seen: int, count: int, patch_size: int, resolution: int,
                   xflip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(count, 2) int64 offsets (x0, y0), uniform over 0..R-s inclusive, and (count,) flips, for the
    ``count`` patches of the global step that starts after ``images_seen`` images."""
    n = resolution - patch_size + 1
    if n < 1:
        raise ValueError(f"patch size {patch_size} exceeds resolution {resolution}")
    rng = np.random.default_rng([seed, images_seen, _CROP_TAG])
    offsets = rng.integers(0, n, size=(count, 2), dtype=np.int64)
    flips = rng.random(count) < 0.5 if xflip else np.zeros(count, bool)
    return offsets, flips


def latent_noise_seed(seed: int, images_seen: int) -> int:
    """The seed of the posterior draws of the global step that starts after ``images_seen`` images."""
    return int(np.random.SeedSequence([seed, images_seen, _LATENT_TAG]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class RankStep:
    images_seen: int        # global images seen before this step
    patch_size: int
    indices: np.ndarray     # (b,) global sample indices
    offsets: np.ndarray     # (b, 2) (x0, y0) reported with the patch (in the possibly flipped image)
    read_xy: np.ndarray     # (b, 2) (x0, y0) of the region read from the stored image
    flips: np.ndarray       # (b,) bool: the patch is mirrored left-right after reading
    labels: np.ndarray      # (b,) int64


class SamplePlan:
    """The steps of one rank: a pure function of (dataset size, schedule, seed, rank, world size)."""

    def __init__(self, num_samples: int, labels: np.ndarray, schedule, seed: int, rank: int,
                 world_size: int, xflip: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if num_samples < 1:
            raise ValueError("the dataset has no samples")
        for s in schedule.sizes:
            if schedule.batch_for(s) % world_size:
                raise ValueError(f"a step of patch size {s} carries {schedule.batch_for(s)} patches, which "
                                 f"{world_size} ranks cannot share evenly; make train.batch * R/s divisible "
                                 f"by the world size")
        self.num_samples, self.labels, self.schedule = num_samples, labels, schedule
        self.seed, self.rank, self.world_size, self.xflip = seed, rank, world_size, xflip
        self.resolution = schedule.resolution
        self._cache: dict = {}

    def per_rank(self, patch_size: int) -> int:
        return self.schedule.batch_for(patch_size) // self.world_size

    @property
    def max_per_rank(self) -> int:
        return max(self.per_rank(s) for s in self.schedule.sizes)

    def step(self, images_seen: int) -> RankStep:
        if images_seen % self.world_size:
            raise ValueError(f"images_seen {images_seen} is not a multiple of the world size {self.world_size}")
        s = self.schedule.size_at(images_seen)
        b = self.per_rank(s)
        idx = rank_stream(self.num_samples, self.seed, self.rank, self.world_size,
                          images_seen // self.world_size, b, self._cache)
        offsets, flips = crop_positions(self.seed, images_seen, self.schedule.batch_for(s), s, self.resolution,
                                        self.xflip)
        offsets, flips = offsets[self.rank::self.world_size], flips[self.rank::self.world_size]
        read_xy = offsets.copy()
        read_xy[flips, 0] = self.resolution - s - offsets[flips, 0]
        return RankStep(images_seen, s, idx, offsets, read_xy, flips, self.labels[idx])

    def steps(self, images_seen: int):
        while True:
            step = self.step(images_seen)
            yield step
            images_seen += self.schedule.batch_for(step.patch_size)
