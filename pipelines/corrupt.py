"""``data.on_corrupt``: what the patch pipelines do with a damaged sample, one whose bytes fail their
checksum or cannot be read or decoded (a source raises `CorruptSample` for it, naming where it lives).

* ``stop`` (the default): the run ends with that message, which names the shard, the sample's key and
  byte offset and the `pdiff shard verify` command.
* ``skip``: the sample is replaced by the next good one (i+1, i+2, ... modulo the dataset size). That is
  a pure function of what is on disk, so a resumed run reads what an uninterrupted one read, and every
  rank still delivers its full share of the step (ranks stay in step). Each damaged sample is counted
  once (``found``; the trainer logs it), and more than ``data.max_corrupt`` of them end the run: that
  many is a failing disk or a bad copy, not bad luck.

The backends read through `read_checked`, where the bytes are read (DataLoader workers, DALI's feeding
callback): it never raises for a damaged sample but substitutes and reports it. The policy is applied
in the pipeline's own process when the step is delivered (`CorruptPolicy.apply`), so the counts and the
saved state follow the steps actually trained on.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import numpy as np

from pdiff.pipelines.sample_source import CorruptSample, SampleSource
from pdiff.pipelines.shards.format import ShardError

T = TypeVar("T")


@dataclass
class Replaced:
    """Row ``row`` of a step was read from sample ``used``: the samples in ``damaged`` (index, message)
    came first and were passed over."""
    row: int
    used: int
    damaged: list[tuple[int, str]]


def read_checked(source: SampleSource, i: int, row: int, fetch: Callable[[int], T],
                 replaced: list[Replaced], known: Mapping[int, str] = {}) -> T:
    """``fetch(i)``, or where sample i is damaged, ``fetch`` of the next good sample (appended to
    ``replaced``). ``known``: samples already known to be damaged (index -> message), passed over
    without a fetch."""
    damaged: list[tuple[int, str]] = []
    j = i
    for _ in range(source.count):
        try:
            if j in known:
                raise CorruptSample(j, known[j])
            result = fetch(j)
        except CorruptSample as e:
            damaged.append((j, str(e)))
            j = (j + 1) % source.count
            continue
        if damaged:
            replaced.append(Replaced(row, j, damaged))
        return result
    raise ShardError(f"every one of the {source.count} samples is damaged (the first: {damaged[0][1]})")


class CorruptPolicy:
    """One rank's record of damaged samples and the rule for them (``data.on_corrupt``, ``data.max_corrupt``)."""

    def __init__(self, on_corrupt: str, max_corrupt: int):
        self.skip, self.max_corrupt = on_corrupt == "skip", int(max_corrupt)
        self.found: set[int] = set()       # damaged samples this rank has met
        self.replaced = 0                  # rows delivered from another sample in their place

    def apply(self, indices: np.ndarray, labels: np.ndarray, all_labels: np.ndarray, replaced: list[Replaced]) -> None:
        """Stop, or let the step's rows carry the samples actually read (``indices`` and ``labels``
        are updated in place)."""
        for r in sorted(replaced, key=lambda r: r.row):
            if not self.skip:
                raise ShardError(f"{r.damaged[0][1]}\nThe run stops here (data.on_corrupt=stop); set "
                                 f"data.on_corrupt=skip to train on with another sample in place of each damaged "
                                 f"one (at most data.max_corrupt={self.max_corrupt} of them)")
            for j, message in r.damaged:
                if j not in self.found:
                    self.found.add(j)
                    print(f"pdiff: WARNING {message}\nTraining on with sample {r.used} in its place (data.on_corrupt="
                          f"skip; {len(self.found)} damaged so far, at most data.max_corrupt={self.max_corrupt})",
                          file=sys.stderr, flush=True)
            if len(self.found) > self.max_corrupt:
                raise ShardError(f"{len(self.found)} damaged samples found, more than data.max_corrupt="
                                 f"{self.max_corrupt}; the last: {r.damaged[-1][1]}\nThe data is badly damaged: "
                                 f"re-create or restore the shards (or raise data.max_corrupt)")
            indices[r.row], labels[r.row] = r.used, all_labels[r.used]
            self.replaced += 1

    def state_dict(self) -> dict:
        return {"found": sorted(self.found), "replaced": self.replaced}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.found = {int(i) for i in state.get("found", ())}
        self.replaced = int(state.get("replaced", 0))
