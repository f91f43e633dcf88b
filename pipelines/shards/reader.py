"""Random access to the samples of a shard folder by global index: the pipelines' first sample source.
The indexes give each sample's offset in its tar, so a sample is one ``pread`` (no tar parsing)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pdiff.pipelines.sample_source import SampleSource
from pdiff.pipelines.shards.format import (IMAGE_EXTS, ShardError, check_files, decode_label, load_manifest,
                                           sample_dtype, sample_offsets)


class ShardSet(SampleSource):
    """The samples of a folder written by `pdiff shard`, checked against its manifest on opening
    (sizes always, sha256s if ``checksums``). Opens file descriptors lazily and per process (safe to
    pickle into DataLoader workers)."""

    def __init__(self, root: str | Path, checksums: bool = False):
        self.root = Path(root)
        self.manifest = m = load_manifest(self.root)
        check_files(self.root, m, checksums)
        self.resolution, self.channels = int(m["resolution"]), int(m["channels"])
        self.encoding, self.count = m["encoding"], int(m["count"])
        self.dtype = sample_dtype(m)
        self.num_classes = int(m.get("num_classes") or 0)
        self.image_ext = IMAGE_EXTS[self.encoding]
        self.tars = [str(self.root / rec["tar"]) for rec in m["shards"]]
        tables = [sample_offsets(self.root, rec, self.encoding) for rec in m["shards"]]
        self.shard = np.concatenate([np.full(len(t), s, np.int32) for s, t in enumerate(tables)])
        self.first = np.cumsum([0] + [len(t) for t in tables])[:-1]      # global index of each shard's sample #0
        if len(self.shard) != self.count:
            raise ShardError(f"{self.root}: indexes list {len(self.shard)} samples, the manifest says {self.count}")
        self.img_off, self.img_size, self.lbl_off, self.lbl_size = np.concatenate(tables).T.copy()
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._labels: np.ndarray | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():   # forked or unpickled: descriptors are not ours
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.tars[shard], os.O_RDONLY)
        return fd

    def describe(self, i: int) -> str:
        s = int(self.shard[i])
        return f"{self.tars[s]}: sample #{i - int(self.first[s])} (global {i})"

    def _read(self, i: int, offset: int, size: int, what: str) -> bytes:
        data = os.pread(self._fd(int(self.shard[i])), size, offset)
        if len(data) != size:
            raise ShardError(f"{self.describe(i)}: {what} cut short ({len(data)} of {size} bytes; the index "
                             f"points outside the archive)")
        return data

    def read(self, i: int) -> bytes:
        return self._read(i, int(self.img_off[i]), int(self.img_size[i]), "data")

    def read_into(self, i: int, out: np.ndarray) -> None:
        """One ``preadv`` straight into ``out``: no copy (raw and latent encodings)."""
        size = int(self.img_size[i])
        if out.nbytes != size:
            raise ShardError(f"{self.describe(i)}: {size} bytes, expected {out.nbytes}")
        got = os.preadv(self._fd(int(self.shard[i])), [memoryview(out).cast("B")], int(self.img_off[i]))
        if got != size:
            raise ShardError(f"{self.describe(i)}: data cut short ({got} of {size} bytes)")

    @property
    def labels(self) -> np.ndarray:
        """All labels as int64 (read once: one small member per sample)."""
        if self._labels is None:
            self._labels = np.array([decode_label(self._read(i, int(self.lbl_off[i]), int(self.lbl_size[i]), "label"))
                                     for i in range(self.count)], np.int64)
        return self._labels

    def fingerprint(self) -> str:
        """The shards' sha256s, hashed."""
        h = hashlib.sha256()
        for rec in self.manifest["shards"]:
            h.update(rec["sha256"].encode())
        return h.hexdigest()[:16]

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}
