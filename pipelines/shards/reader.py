"""Random access to the samples of a shard folder by global index: the pipelines' first sample source.
The indexes give each sample's offset in its tar, so a sample is one ``pread`` (no tar parsing).

Format version 4: nothing per sample is read at opening (the manifest holds per-shard facts only). A
sample's record in its shard's CRC file (its offsets, its label, a CRC-32 of each member and of each
row; format.py) is read when the sample is first used, and every read holds what it read against it:
a whole read the data and label members (and a stored feature grid, --encode-features), a raw or latent
patch read by its rows exactly those rows and the label member, `read_features` the feature member.
So a damaged sample raises `CorruptSample` naming its shard, key and byte offset before any decoder
sees its bytes or a damaged label or grid reaches the step; a damaged or missing CRC file is a
`ShardError` naming it. Versions 1-3 are read as before: the indexes and labels at opening, and
(version 3) one CRC-32 per sample from the manifest, checked on whole reads."""
from __future__ import annotations

import hashlib
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pdiff.pipelines.sample_source import CorruptSample, SampleSource
from pdiff.pipelines.shards.format import (CRC_HEADER_BYTES, FEATURE_EXT, IMAGE_EXTS, MANIFEST, ShardError,
                                           check_crc_header, check_files, crc_file_error, crc_record_at,
                                           crc_record_dtype, crc_rows, decode_label, feature_record, label_ext,
                                           latent_space, load_manifest, member_exts, parse_crcs, read_crc_file,
                                           sample_crc, sample_dtype, sample_offsets, sample_place, verify_hint)

MAX_OPEN_SHARDS = 256        # file descriptors kept open per process (tars and CRC files, least recently used go)


class ShardSet(SampleSource):
    """The samples of a folder written by `pdiff shard`, checked against its manifest on opening: the
    manifest's fields always; versions 1-3 also the files' sizes and the indexes' sha256s (version 4:
    each shard's files when it is first used); the files' sha256s if ``checksums``. Opens file
    descriptors lazily and per process (safe to pickle into DataLoader workers)."""

    def __init__(self, root: str | Path, checksums: bool = False):
        self.root = Path(root)
        self.manifest = m = load_manifest(self.root)
        self.version = int(m.get("version", 1))
        self.crc_files = self.version >= 4
        if checksums or not self.crc_files:
            self._check_files(checksums)
        self.resolution, self.channels = int(m["resolution"]), int(m["channels"])
        self.encoding, self.count = m["encoding"], int(m["count"])
        self.dtype = sample_dtype(m)
        self.latent = latent_space(m)
        self.num_classes = int(m.get("num_classes") or 0)
        self.image_ext, self.label_ext = IMAGE_EXTS[self.encoding], label_ext(m)
        self.tars = [str(self.root / rec["tar"]) for rec in m["shards"]]
        # --encode-features: each sample's stored feature grid (format.py); version 4 gives it its own CRC-32
        # in the sample's record, version 3's sample CRC-32 spans it
        self.features = feature_record(m, self.root / MANIFEST)
        counts = np.array([rec["count"] for rec in m["shards"]], np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)   # each shard's sample #0
        if int(counts.sum()) != self.count:
            raise ShardError(f"{self.root / MANIFEST}: the shards hold {int(counts.sum())} samples, the manifest says "
                             f"{self.count} (the manifest is damaged; restore it or re-create the shards)")
        self._crc = self._places = self._shard = None
        if self.crc_files:
            self.rows = crc_rows(m)
            self._record_dtype = crc_record_dtype(self.rows, self.features is not None)
            self.checksummed = True
        else:
            tables = [sample_offsets(self.root, rec, self.encoding, self.label_ext, member_exts(m))
                      for rec in m["shards"]]
            if sum(map(len, tables)) != self.count:
                raise ShardError(f"{self.root}: indexes list {sum(map(len, tables))} samples, the manifest says "
                                 f"{self.count}")
            self._places = np.concatenate(tables)        # data, label (and .feat) offset and size per sample
            crcs = [parse_crcs(rec, self.root / MANIFEST) for rec in m["shards"]]
            self.checksummed = all(c is not None for c in crcs)
            self._crc = np.concatenate(crcs) if self.checksummed else None
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._pid = os.getpid()
        self._labels: np.ndarray | None = None

    def _check_files(self, checksums: bool) -> None:
        """Every shard's files against the manifest, before any is read (a remote set checks each as it
        is fetched instead)."""
        check_files(self.root, self.manifest, checksums)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = OrderedDict(), -1
        return state

    # -- where samples are
    def shard_of(self, i: int) -> tuple[int, int]:
        """(shard, number in the shard) of sample ``i``."""
        s = int(np.searchsorted(self.first, i, side="right")) - 1
        return s, i - int(self.first[s])

    def _fd(self, shard: int) -> int:
        """The open tar of ``shard``."""
        return self._open_fd(shard, False)

    def _crc_fd(self, shard: int) -> int:
        """The open CRC file of ``shard`` (version 4)."""
        return self._open_fd(shard, True)

    def _check_tar(self, shard: int) -> None:
        """Version 4, when a shard's CRC file is first opened: its tar is there with the manifest's size
        (the plan reads CRC records in the pipeline's own process, before a worker reads the tar)."""
        rec = self.manifest["shards"][shard]
        tar = self.root / rec["tar"]
        size = tar.stat().st_size if tar.exists() else None
        if size != rec["bytes"]:
            what = "missing" if size is None else \
                f"{size} bytes, the manifest says {rec['bytes']} (truncated or replaced)"
            raise ShardError(f"{tar}: {what}; {self.damage_hint()}")

    def _open_fd(self, shard: int, crc: bool) -> int:
        """The open tar (or, ``crc``, CRC file) of ``shard``. Version 4 checks a shard's files against the
        manifest when it first opens them: the tar's size (also when it opens the CRC file), the CRC file's
        size and header."""
        if self._pid != os.getpid():   # forked or unpickled: descriptors are not ours
            self._fds, self._pid = OrderedDict(), os.getpid()
        key = (shard, int(crc))
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        rec = self.manifest["shards"][shard]
        path = self.root / rec["crc" if crc else "tar"]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if crc:
                raise crc_file_error(path, rec["tar"], f"missing (listed in {self.root / MANIFEST})") from None
            raise ShardError(f"{path}: missing (listed in {self.root / MANIFEST}); {self.damage_hint()}") from None
        try:
            if self.crc_files:
                if crc:     # the plan reads the CRC records in the main process: the tar is checked there too
                    check_crc_header(path, os.pread(fd, CRC_HEADER_BYTES, 0), os.fstat(fd).st_size, rec, self.rows,
                                     self.features is not None)
                    self._check_tar(shard)
                elif os.fstat(fd).st_size != rec["bytes"]:
                    raise ShardError(f"{path}: {os.fstat(fd).st_size} bytes, the manifest says {rec['bytes']} "
                                     f"(truncated or replaced); {self.damage_hint()}")
        except BaseException:
            os.close(fd)
            raise
        self._fds[key] = fd
        while len(self._fds) > MAX_OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def record(self, i: int) -> np.void:
        """Version 4: sample ``i``'s record in its shard's CRC file, held against its own CRC-32."""
        s, k = self.shard_of(i)
        size = self._record_dtype.itemsize
        data = os.pread(self._crc_fd(s), size, CRC_HEADER_BYTES + k * size)
        return crc_record_at(self.root / self.manifest["shards"][s]["crc"], self.manifest["shards"][s]["tar"], data,
                             k, self._record_dtype)

    def _place(self, i: int) -> tuple[int, int, int, int, np.void | None]:
        """(data offset, data size, label offset, label size, the CRC record or None) of sample ``i``."""
        if self.crc_files:
            r = self.record(i)
            return int(r["data_offset"]), int(r["data_size"]), int(r["label_offset"]), int(r["label_size"]), r
        off, size, loff, lsize = (int(v) for v in self._places[i, :4])
        return off, size, loff, lsize, None

    def _all_records(self) -> np.ndarray:
        """Version 4: every sample's record (each CRC file read whole): for tools and tests, not the loaders."""
        if self._places is None:
            tables = [read_crc_file(self.root, rec, self.rows, self.features is not None)
                      for rec in self.manifest["shards"]]
            t = np.concatenate(tables)
            fields = ["data_offset", "data_size", "label_offset", "label_size"]
            fields += ["feat_offset", "feat_size"] if self.features is not None else []
            self._places = np.stack([t[f] for f in fields], 1)
            self._places = self._places.astype(np.int64)
            self._labels = t["label"].astype(np.int64)
        return self._places

    # Every sample's place, as arrays (versions 1-3 keep them; version 4 reads every CRC file for them).
    def _place_column(self, i: int) -> np.ndarray:
        return (self._all_records() if self.crc_files else self._places)[:, i]

    img_off = property(lambda self: self._place_column(0))
    img_size = property(lambda self: self._place_column(1))
    lbl_off = property(lambda self: self._place_column(2))
    lbl_size = property(lambda self: self._place_column(3))
    feat_off = property(lambda self: self._place_column(4))
    feat_size = property(lambda self: self._place_column(5))

    @property
    def shard(self) -> np.ndarray:
        """(count,) the shard of each sample."""
        if self._shard is None:
            counts = [rec["count"] for rec in self.manifest["shards"]]
            self._shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        return self._shard

    def describe(self, i: int) -> str:
        s, k = self.shard_of(i)
        off, size, _, _, _ = self._place(i)
        return sample_place(self.tars[s], i, k, self.image_ext, off, size)

    def damage_hint(self) -> str:
        return verify_hint(self.root)

    def _pread(self, i: int, offset: int, size: int, what: str) -> bytes:
        data = os.pread(self._fd(self.shard_of(i)[0]), size, offset)
        if len(data) != size:
            raise CorruptSample(i, f"{self.describe(i)}: {what} cut short ({len(data)} of {size} bytes; the index "
                                   f"points outside the archive); {self.damage_hint()}")
        return data

    def _check(self, i: int, crc: int) -> None:
        """Version 3: the sample's CRC-32 (over data and label)."""
        if crc != int(self._crc[i]):
            raise CorruptSample(i, f"{self.describe(i)}: fails its CRC-32 check (stored {int(self._crc[i]):08x}, read "
                                   f"{crc:08x}): the shard is damaged here; {self.damage_hint()}")

    def _check_member(self, i: int, what: str, stored: int, data) -> None:
        """Version 4: one member (or row) of sample ``i`` against its CRC-32 from ``record``."""
        read = zlib.crc32(data)
        if read != stored:
            raise CorruptSample(i, f"{self.describe(i)}: {what} fails its CRC-32 check (stored {stored:08x}, read "
                                   f"{read:08x}): the shard is damaged here; {self.damage_hint()}")

    def _check_label(self, i: int, record: np.void, label: bytes) -> None:
        self._check_member(i, f"its .{self.label_ext} label (at byte {int(record['label_offset'])})",
                           int(record["label_crc"]), label)

    def _check_features(self, i: int, record: np.void, feat: bytes) -> None:
        self._check_member(i, f"its .{FEATURE_EXT} features (at byte {int(record['feat_offset'])})",
                           int(record["feat_crc"]), feat)

    def _label_bytes(self, i: int, place=None) -> bytes:
        _, _, loff, lsize, _ = place or self._place(i)
        return self._pread(i, loff, lsize, "label")

    def _feature_bytes(self, i: int, place=None) -> bytes:
        record = (place or self._place(i))[4]
        if record is not None:
            return self._pread(i, int(record["feat_offset"]), int(record["feat_size"]), "features")
        return self._pread(i, int(self._places[i, 4]), int(self._places[i, 5]), "features")

    def read(self, i: int) -> bytes:
        place = off, size, loff, lsize, record = self._place(i)
        if not self.checksummed:
            return self._pread(i, off, size, "data")
        if self.features is not None and record is None:     # version 3: the CRC spans the feature member too
            data, label = self._pread(i, off, size, "data"), self._label_bytes(i, place)
            self._check(i, sample_crc(data, label, self._feature_bytes(i, place)))
            return data
        gap = loff - (off + size)
        if gap < 0:                      # not the order this writer uses: two reads
            data, label = self._pread(i, off, size, "data"), self._label_bytes(i, place)
        else:
            span = self._pread(i, off, size + gap + lsize, "data")
            data, label = span[:size], span[size + gap:]
        if record is None:
            self._check(i, sample_crc(data, label))
        else:
            self._check_member(i, "its data", int(record["data_crc"]), data)
            self._check_label(i, record, label)
            if self.features is not None:   # a whole read checks the whole sample, its feature grid included
                self._check_features(i, record, self._feature_bytes(i, place))
        return data

    def read_into(self, i: int, out: np.ndarray) -> None:
        """One ``preadv`` straight into ``out``: no copy (raw and latent encodings)."""
        place = off, size, loff, lsize, record = self._place(i)
        gap = loff - (off + size)
        if out.nbytes != size:
            raise ShardError(f"{self.describe(i)}: {size} bytes, expected {out.nbytes}")
        view = memoryview(out).cast("B")
        v3_features = self.features is not None and record is None
        tail = bytearray(gap + lsize if self.checksummed and gap >= 0 and not v3_features else 0)
        want = size + len(tail)
        got = os.preadv(self._fd(self.shard_of(i)[0]), [view, tail] if tail else [view], off)
        if got != want:
            raise CorruptSample(i, f"{self.describe(i)}: data cut short ({min(got, size)} of {size} bytes; the index "
                                   f"points outside the archive); {self.damage_hint()}")
        if self.checksummed:
            label = bytes(tail[gap:]) if tail else self._label_bytes(i, place)
            if record is None:
                extra = (self._feature_bytes(i, place),) if self.features is not None else ()
                self._check(i, sample_crc(view, label, *extra))
            else:
                self._check_member(i, "its data", int(record["data_crc"]), view)
                self._check_label(i, record, label)
                if self.features is not None:
                    self._check_features(i, record, self._feature_bytes(i, place))

    def read_features(self, i: int) -> np.ndarray:
        """The stored feature grid of sample ``i``, float16 (C_f, g, g), checked before it is used: version 4
        against the .feat member's own CRC-32 (only that member is read); version 3 against the sample's
        CRC-32, which spans its data, label and features (all three are read)."""
        if self.features is None:
            raise ShardError(f"{self.root}: written without --encode-features: no feature grids stored")
        off, size, _, _, record = place = self._place(i)
        feat = self._feature_bytes(i, place)
        if record is not None:
            self._check_features(i, record, feat)
        elif self._crc is not None:
            self._check(i, sample_crc(self._pread(i, off, size, "data"), self._label_bytes(i, place), feat))
        g, c = self.features["grid"], self.features["channels"]
        if len(feat) != 2 * c * g * g:
            raise CorruptSample(i, f"{self.describe(i)}: its feature member holds {len(feat)} bytes, expected "
                                   f"{2 * c * g * g} ({c} x {g} x {g} float16); {self.damage_hint()}")
        return np.frombuffer(feat, "<f2").reshape(c, g, g)

    def read_region(self, i: int, x0: int, y0: int, size: int, out: np.ndarray) -> None:
        """Raw and latent: only the rows the region spans, one ``pread``, then its columns into ``out``.
        Version 4 holds each row read against its CRC-32, and the label member against its own (a second,
        small ``pread``). Version 3's CRC-32 covers the whole sample, which a part cannot be held against:
        such a raw patch is read unchecked (wrong pixels in [0, 255], not a decoder crash; `pdiff shard
        verify`, data.verify_checksums and data.cache catch it), and a version 3 latent is read whole and
        checked (a damaged float can be inf or NaN; a latent sample is small)."""
        r, c, item = self.resolution, self.channels, np.dtype(self.dtype).itemsize
        if size == r:
            self.read_into(i, out)
            return
        if self.encoding == "latent" and self._crc is not None:
            whole = np.empty((r, r, c), self.dtype)
            self.read_into(i, whole)
            out[...] = whole[y0:y0 + size, x0:x0 + size]
            return
        place = off, _, _, _, record = self._place(i)
        row = r * c * item
        span = self._pread(i, off + y0 * row, size * row, "data")
        if record is not None:
            stored = record["row_crc"]
            for y in range(size):
                self._check_member(i, f"its row {y0 + y}", int(stored[y0 + y]), span[y * row:(y + 1) * row])
            self._check_label(i, record, self._label_bytes(i, place))
        out[...] = np.frombuffer(span, self.dtype).reshape(size, r, c)[:, x0:x0 + size]

    @property
    def plan_labels(self):
        """Version 4: `ShardLabels`, read from the samples' CRC records as the plan asks for them (the label
        member itself is held against its CRC-32 whenever its sample is read); else ``labels``."""
        return ShardLabels(self) if self.crc_files else self.labels

    @property
    def labels(self) -> np.ndarray:
        """All labels as int64. Version 4: from the CRC files (each read whole, once). Versions 1-3: read
        once from the label members; with checksums, a label that does not parse stands as -1 here: its
        sample fails the CRC check when read."""
        if self.crc_files:
            self._all_records()
            return self._labels
        if self._labels is None:
            self._labels = np.array([self._label(i) for i in range(self.count)], np.int64)
        return self._labels

    def _label(self, i: int) -> int:
        """Versions 1-3: sample ``i``'s label member, decoded."""
        try:
            return decode_label(self.label_ext, self._label_bytes(i))
        except (ValueError, CorruptSample) as e:
            if self._crc is None:
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
        self._fds = OrderedDict()


class ShardLabels:
    """The labels of a version 4 shard set, read per sample from its CRC record when asked for: the plan
    asks for a step's samples only, so opening 100M samples reads none. Indexed like the int64 array
    ``ShardSet.labels`` (by an int or an integer array)."""

    def __init__(self, shards: ShardSet):
        self.shards = shards

    def __len__(self) -> int:
        return self.shards.count

    def __getitem__(self, index):
        if np.ndim(index) == 0:
            return np.int64(self.shards.record(int(index))["label"])
        index = np.asarray(index)
        return np.fromiter((self.shards.record(int(i))["label"] for i in index.reshape(-1)), np.int64,
                           index.size).reshape(index.shape)

    def __array__(self, dtype=None, copy=None):
        return self.shards.labels if dtype is None else self.shards.labels.astype(dtype)
