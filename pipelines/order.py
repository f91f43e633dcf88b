"""What every step reads: which samples, where each is cropped, all as pure functions.

* Epoch e visits the samples in the order ``permutation(seed, e)``. The epochs, one after another,
  make one endless global stream of sample indices: position k is entry k mod N of epoch k // N.
* The global step that starts after ``images_seen`` images reads stream positions ``images_seen ..
  images_seen + batch_for(s) - 1`` in row order; rank r of W keeps rows r, r+W, ... So where each
  rank stands needs no state beyond images seen, and it does not depend on W: W ranks read exactly
  what one process with the same global batch reads, and a run checkpointed on W processes goes on
  on W' processes with the same samples in the same rows (elastic resume).
* Crop positions and flips of a step are drawn for the whole global step from a generator seeded
  with (seed, images_seen), uniform over 0..R-s with both ends included; rank r keeps rows r, r+W, ...
* Posterior latents (pipelines/base.py) draw their noise for the global step from
  ``latent_noise_seed(seed, images_seen)`` and rank r keeps the same rows.

(Before elastic resume each rank read a part of every epoch padded by wrapping around to ceil(N/W)
samples; the stream is the same as that one whenever W divides N.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ORDER_TAG, _CROP_TAG, _LATENT_TAG = 0x5EED, 0xC809, 0x1A7E


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """``Generator.permutation(num_samples)``, shuffled in place and as int32 below 2^31 samples: the same
    order (the shuffle's draws depend on the length only) in a quarter of the peak memory (400 MB, not
    1.6 GB, at 100M samples)."""
    perm = np.arange(num_samples, dtype=np.int32 if num_samples < 2 ** 31 else np.int64)
    np.random.default_rng([seed, epoch, _ORDER_TAG]).shuffle(perm)
    return perm


def stream_indices(num_samples: int, seed: int, positions: np.ndarray, cache: dict | None = None) -> np.ndarray:
    """The sample indices at ``positions`` of the global stream (epoch k // N, entry k mod N); ``cache``
    keeps the two newest epochs' permutations (readers move forward, a look-ahead a little further)."""
    epochs, at = np.divmod(positions, num_samples)
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs).tolist():
        perm = cache.get(epoch) if cache is not None else None
        if perm is None:
            perm = epoch_permutation(num_samples, seed, epoch)
            if cache is not None:
                if len(cache) >= 2:
                    del cache[min(cache)]
                cache[epoch] = perm
        mine = epochs == epoch
        out[mine] = perm[at[mine]]
    return out


def rank_rows(images_seen: int, global_batch: int, rank: int, world_size: int) -> np.ndarray:
    """The stream positions rank ``rank`` of ``world_size`` reads in the global step of ``global_batch``
    samples that starts after ``images_seen`` images: rows r, r+W, ... of the step."""
    return images_seen + np.arange(rank, global_batch, world_size, dtype=np.int64)


def rank_stream(num_samples: int, seed: int, rank: int, world_size: int, start: int, count: int,
                cache: dict | None = None) -> np.ndarray:
    """Entries ``start .. start+count-1`` of the rank's endless stream: the global stream's positions
    r, r+W, r+2W, ..., the rows the rank reads step after step (every step's global batch is a
    multiple of W), so after ``images_seen`` images the rank stands at entry images_seen / W."""
    positions = rank + world_size * np.arange(start, start + count, dtype=np.int64)
    return stream_indices(num_samples, seed, positions, cache)


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
    """The steps of one rank: a pure function of (dataset size, schedule, seed, rank, world size) and the
    images seen."""

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
        s = self.schedule.size_at(images_seen)
        positions = rank_rows(images_seen, self.schedule.batch_for(s), self.rank, self.world_size)
        idx = stream_indices(self.num_samples, self.seed, positions, self._cache)
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
