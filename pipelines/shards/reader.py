"""Random access to the samples of a shard folder by global index: the pipelines' first sample source.
The indexes give each sample's offset in its tar, so a sample is one ``pread`` (no tar parsing). Shards
of format version 3 carry a CRC-32 per sample (over its data and label members): every read checks it,
so a damaged sample raises `CorruptSample` naming its shard, key and byte offset before any decoder
sees its bytes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pdiff.pipelines.sample_source import CorruptSample, SampleSource
from pdiff.pipelines.shards.format import (IMAGE_EXTS, ShardError, check_files, decode_label, feature_record,
                                           label_ext, latent_space, load_manifest, member_exts, parse_crcs, sample_crc,
                                           sample_dtype, sample_offsets, sample_place, verify_hint)


class ShardSet(SampleSource):
    """The samples of a folder written by `pdiff shard`, checked against its manifest on opening
    (sizes and index sha256s always, tar sha256s if ``checksums``). Opens file descriptors lazily and
    per process (safe to pickle into DataLoader workers)."""

    def __init__(self, root: str | Path, checksums: bool = False):
        self.root = Path(root)
        self.manifest = m = load_manifest(self.root)
        self._check_files(checksums)
        self.resolution, self.channels = int(m["resolution"]), int(m["channels"])
        self.encoding, self.count = m["encoding"], int(m["count"])
        self.dtype = sample_dtype(m)
        self.latent = latent_space(m)
        self.num_classes = int(m.get("num_classes") or 0)
        self.image_ext, self.label_ext = IMAGE_EXTS[self.encoding], label_ext(m)
        self.tars = [str(self.root / rec["tar"]) for rec in m["shards"]]
        # --encode-features: each sample's stored feature grid (format.py), covered by its CRC-32
        self.features = feature_record(m, self.root / "manifest.json")
        tables = [sample_offsets(self.root, rec, self.encoding, self.label_ext, member_exts(m)) for rec in m["shards"]]
        self.shard = np.concatenate([np.full(len(t), s, np.int32) for s, t in enumerate(tables)])
        self.first = np.cumsum([0] + [len(t) for t in tables])[:-1]      # global index of each shard's sample #0
        if len(self.shard) != self.count:
            raise ShardError(f"{self.root}: indexes list {len(self.shard)} samples, the manifest says {self.count}")
        self.img_off, self.img_size, self.lbl_off, self.lbl_size, *feat = np.concatenate(tables).T.copy()
        self.feat_off, self.feat_size = feat if feat else (None, None)
        crcs = [parse_crcs(rec, self.root / "manifest.json") for rec in m["shards"]]
        self.checksummed = all(c is not None for c in crcs)
        self.crc = np.concatenate(crcs) if self.checksummed else None
        # One read covers a sample's data and its label member (written right after it) when the index
        # says so: the CRC spans both.
        self._gap = self.lbl_off - (self.img_off + self.img_size)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._labels: np.ndarray | None = None

    def _check_files(self, checksums: bool) -> None:
        """Every shard's files against the manifest, before any is read (a remote set checks each as it
        is fetched instead)."""
        check_files(self.root, self.manifest, checksums)

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
        return sample_place(self.tars[s], i, i - int(self.first[s]), self.image_ext, int(self.img_off[i]),
                            int(self.img_size[i]))

    def damage_hint(self) -> str:
        return verify_hint(self.root)

    def _pread(self, i: int, offset: int, size: int, what: str) -> bytes:
        data = os.pread(self._fd(int(self.shard[i])), size, offset)
        if len(data) != size:
            raise CorruptSample(i, f"{self.describe(i)}: {what} cut short ({len(data)} of {size} bytes; the index "
                                   f"points outside the archive); {self.damage_hint()}")
        return data

    def _check(self, i: int, crc: int) -> None:
        if crc != int(self.crc[i]):
            raise CorruptSample(i, f"{self.describe(i)}: fails its CRC-32 check (stored {int(self.crc[i]):08x}, read "
                                   f"{crc:08x}): the shard is damaged here; {self.damage_hint()}")

    def _label_bytes(self, i: int) -> bytes:
        return self._pread(i, int(self.lbl_off[i]), int(self.lbl_size[i]), "label")

    def _feature_bytes(self, i: int) -> bytes:
        return self._pread(i, int(self.feat_off[i]), int(self.feat_size[i]), "features")

    def read(self, i: int) -> bytes:
        off, size = int(self.img_off[i]), int(self.img_size[i])
        if self.crc is None:
            return self._pread(i, off, size, "data")
        if self.features is not None:    # the CRC spans the feature member too
            data, label = self._pread(i, off, size, "data"), self._label_bytes(i)
            self._check(i, sample_crc(data, label, self._feature_bytes(i)))
            return data
        gap = int(self._gap[i])
        if gap < 0:                      # not the order this writer uses: two reads
            data, label = self._pread(i, off, size, "data"), self._label_bytes(i)
        else:
            span = self._pread(i, off, size + gap + int(self.lbl_size[i]), "data")
            data, label = span[:size], span[size + gap:]
        self._check(i, sample_crc(data, label))
        return data

    def read_into(self, i: int, out: np.ndarray) -> None:
        """One ``preadv`` straight into ``out``: no copy (raw and latent encodings)."""
        size, gap = int(self.img_size[i]), int(self._gap[i])
        if out.nbytes != size:
            raise ShardError(f"{self.describe(i)}: {size} bytes, expected {out.nbytes}")
        view = memoryview(out).cast("B")
        tail = bytearray(gap + int(self.lbl_size[i]) if self.crc is not None and gap >= 0 and self.features is None
                         else 0)
        want = size + len(tail)
        got = os.preadv(self._fd(int(self.shard[i])), [view, tail] if tail else [view], int(self.img_off[i]))
        if got != want:
            raise CorruptSample(i, f"{self.describe(i)}: data cut short ({min(got, size)} of {size} bytes; the index "
                                   f"points outside the archive); {self.damage_hint()}")
        if self.crc is not None:
            label = bytes(tail[gap:]) if tail else self._label_bytes(i)
            extra = (self._feature_bytes(i),) if self.features is not None else ()
            self._check(i, sample_crc(view, label, *extra))

    def read_features(self, i: int) -> np.ndarray:
        """The stored feature grid of sample ``i``, float16 (C_f, g, g), after the sample's CRC-32 check
        (which spans its data, label and features: all three are read)."""
        if self.features is None:
            raise ShardError(f"{self.root}: written without --encode-features: no feature grids stored")
        feat = self._feature_bytes(i)
        if self.crc is not None:
            data = self._pread(i, int(self.img_off[i]), int(self.img_size[i]), "data")
            self._check(i, sample_crc(data, self._label_bytes(i), feat))
        g, c = self.features["grid"], self.features["channels"]
        if len(feat) != 2 * c * g * g:
            raise CorruptSample(i, f"{self.describe(i)}: its feature member holds {len(feat)} bytes, expected "
                                   f"{2 * c * g * g} ({c} x {g} x {g} float16); {self.damage_hint()}")
        return np.frombuffer(feat, "<f2").reshape(c, g, g)

    def read_region(self, i: int, x0: int, y0: int, size: int, out: np.ndarray) -> None:
        """Raw (and latents in shards without CRC-32s): only the rows the region spans, one ``pread``,
        then its columns into ``out``. A part of a sample cannot be held against the sample's CRC-32:
        a damaged raw patch is wrong pixels in [0, 255], not a decoder crash, and `pdiff shard verify`,
        data.verify_checksums and data.cache (which read whole samples) catch it. Latents with CRC-32s
        are read whole and checked: a damaged float can be inf or NaN, which would reach the loss, and
        a latent sample is small (32x32x8 float16: 16 kB), so the rows would save little."""
        r, c, item = self.resolution, self.channels, np.dtype(self.dtype).itemsize
        if size == r:
            self.read_into(i, out)
            return
        if self.encoding == "latent" and self.crc is not None:
            whole = np.empty((r, r, c), self.dtype)
            self.read_into(i, whole)
            out[...] = whole[y0:y0 + size, x0:x0 + size]
            return
        row = r * c * item
        span = self._pread(i, int(self.img_off[i]) + y0 * row, size * row, "data")
        out[...] = np.frombuffer(span, self.dtype).reshape(size, r, c)[:, x0:x0 + size]

    @property
    def labels(self) -> np.ndarray:
        """All labels as int64 (read once: one small member per sample). With checksums, a label that
        does not parse stands as -1 here: its sample fails the CRC check when read."""
        if self._labels is None:
            self._labels = np.array([self._label(i) for i in range(self.count)], np.int64)
        return self._labels

    def _label(self, i: int) -> int:
        try:
            return decode_label(self.label_ext, self._label_bytes(i))
        except (ValueError, CorruptSample) as e:
            if self.crc is None:
                raise ShardError(f"{self.describe(i)}: {e}; {self.damage_hint()}") from None
            return -1

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
