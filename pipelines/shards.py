"""Reading a folder written by `pdiff shard`: the manifest, the DALI index files, and random access to
any sample by its global index.

Layout of one shard (a plain ustar archive): for sample k (a global index, zero-padded, no dots) the
members ``KKKKKKKKK.<ext>`` (the image: png, jpg, webp, or raw = the H x W x C uint8 bytes; or
``lat`` = a latent's H x W x C little-endian float16/float32 bytes, dtype and scale in the manifest) and
``KKKKKKKKK.lbl`` (the label as a 4-byte little-endian int32, -1 when the dataset has none). Next to
``NAME-000000.tar`` lies ``NAME-000000.idx`` in DALI's webdataset index format (v1.2), which is also
what gives the torch fallback its random access. ``manifest.json`` is written last.

This module imports numpy and Pillow only (no torch, no DALI), so the shard writer and its worker
processes stay light.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "pdiff-webdataset"
FORMAT_VERSION = 2      # 2 added the "latent" encoding; image shards are still written as version 1
INDEX_VERSION = "v1.2"
LABEL_EXT = "lbl"
LABEL_DTYPE = np.dtype("<i4")
IMAGE_EXTS = {"png": "png", "jpeg": "jpg", "webp": "webp", "raw": "raw", "latent": "lat"}   # encoding -> member extension
LATENT_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def sample_dtype(manifest: dict) -> np.dtype:
    """The element type of a decoded sample: uint8 for images, the stored float type for latents."""
    if manifest.get("encoding") != "latent":
        return np.dtype(np.uint8)
    name = manifest.get("dtype")
    if name not in LATENT_DTYPES:
        raise ShardError(f"latent shards with dtype {name!r}; expected one of {', '.join(LATENT_DTYPES)}")
    return LATENT_DTYPES[name]


class ShardError(RuntimeError):
    """A shard folder that does not match its manifest, or a sample that cannot be read."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def write_index(path: str | Path, samples: list[list[tuple[str, int, int, str]]]) -> None:
    """DALI webdataset index v1.2: a header line ``v1.2 N``, then one line per sample listing
    ``ext offset size name`` for each of its members (what `wds2idx` writes)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in comps) for comps in samples]
    Path(path).write_text("\n".join(lines) + "\n")


def read_index(path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Parse an index into one ``{ext: (offset, size)}`` per sample."""
    text = Path(path).read_text().split("\n")
    head = text[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ShardError(f"{path}: not a DALI webdataset index {INDEX_VERSION} (first line {text[0]!r})")
    n = int(head[1])
    out = []
    for lineno, line in enumerate(text[1:1 + n], start=2):
        tok = line.split()
        if not tok or len(tok) % 4:
            raise ShardError(f"{path}:{lineno}: malformed index line {line!r}")
        out.append({tok[i]: (int(tok[i + 1]), int(tok[i + 2])) for i in range(0, len(tok), 4)})
    if len(out) != n:
        raise ShardError(f"{path}: header says {n} samples, found {len(out)} lines")
    return out


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise ShardError(f"{root}: no {MANIFEST} (not written by `pdiff shard`, or the run did not "
                         f"finish; re-run the same `pdiff shard` command to complete it)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {manifest['version']} is newer than this "
                         f"pdiff reads ({FORMAT_VERSION}); update pdiff")
    return manifest


def check_files(root: str | Path, manifest: dict, checksums: bool = False) -> None:
    """Every shard and index exists with the manifest's byte size (and sha256 if ``checksums``).
    A truncated tar can crash DALI's reader, so this runs before any pipeline is built."""
    root = Path(root)
    for rec in manifest["shards"]:
        for key, size_key, sha_key in (("tar", "bytes", "sha256"), ("index", "index_bytes", "index_sha256")):
            p = root / rec[key]
            if not p.exists():
                raise ShardError(f"{p}: missing (listed in {root / MANIFEST})")
            size = p.stat().st_size
            if size != rec[size_key]:
                raise ShardError(f"{p}: {size} bytes, the manifest says {rec[size_key]} (truncated or "
                                 f"replaced; run `pdiff shard verify {root}` and re-create the shards)")
            if checksums and sha256_file(p) != rec[sha_key]:
                raise ShardError(f"{p}: sha256 differs from the manifest (corrupted; re-create the shards)")


def decode_image(data: bytes | memoryview, encoding: str, resolution: int, channels: int,
                 dtype: np.dtype | str | None = None) -> np.ndarray:
    """Bytes of one stored image -> (R, R, C) uint8; of one latent -> (R, R, C) in its stored ``dtype``."""
    if encoding == "latent":
        dt = np.dtype(dtype or "<f2")
        want = resolution * resolution * channels * dt.itemsize
        if len(data) != want:
            raise ShardError(f"latent has {len(data)} bytes, expected {want} "
                             f"({resolution}x{resolution}x{channels} {dt.name})")
        return np.frombuffer(data, dt).reshape(resolution, resolution, channels)
    if encoding == "raw":
        want = resolution * resolution * channels
        if len(data) != want:
            raise ShardError(f"raw image has {len(data)} bytes, expected {want} ({resolution}x{resolution}x{channels})")
        return np.frombuffer(data, np.uint8).reshape(resolution, resolution, channels)
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        want_mode = "L" if channels == 1 else "RGB"
        if im.mode != want_mode:
            im = im.convert(want_mode)
        arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (resolution, resolution, channels):
        raise ShardError(f"decoded image has shape {arr.shape}, expected {(resolution, resolution, channels)}")
    return arr


@dataclass
class SampleRef:
    shard: int
    image: tuple[int, int]
    label: tuple[int, int]


class ShardSet:
    """Random access to the samples of a shard folder by global index 0..count-1.

    Opens file descriptors lazily and per process (safe to pickle into DataLoader workers)."""

    def __init__(self, root: str | Path, checksums: bool = False):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        check_files(self.root, self.manifest, checksums)
        m = self.manifest
        self.resolution, self.channels = int(m["resolution"]), int(m["channels"])
        self.encoding, self.count = m["encoding"], int(m["count"])
        if self.encoding not in IMAGE_EXTS:
            raise ShardError(f"{self.root / MANIFEST}: unknown encoding {self.encoding!r} (expected one of "
                             f"{', '.join(IMAGE_EXTS)}); update pdiff or re-create the shards")
        self.dtype = sample_dtype(m)       # uint8, or the latents' float16/float32
        self.latent = self.encoding == "latent"
        self.image_ext = IMAGE_EXTS[self.encoding]
        self.tars = [str(self.root / rec["tar"]) for rec in m["shards"]]
        shard, img_off, img_size, lbl_off = [], [], [], []
        for s, rec in enumerate(m["shards"]):
            entries = read_index(self.root / rec["index"])
            if len(entries) != rec["count"]:
                raise ShardError(f"{self.root / rec['index']}: {len(entries)} samples, the manifest says {rec['count']}")
            for k, e in enumerate(entries):
                if self.image_ext not in e or LABEL_EXT not in e:
                    raise ShardError(f"{self.root / rec['index']}: sample {k} lacks .{self.image_ext} or .{LABEL_EXT}")
                shard.append(s)
                img_off.append(e[self.image_ext][0])
                img_size.append(e[self.image_ext][1])
                lbl_off.append(e[LABEL_EXT][0])
        if len(shard) != self.count:
            raise ShardError(f"{self.root}: indexes list {len(shard)} samples, the manifest says {self.count}")
        self.shard = np.asarray(shard, np.int32)
        self.img_off = np.asarray(img_off, np.int64)
        self.img_size = np.asarray(img_size, np.int64)
        self.lbl_off = np.asarray(lbl_off, np.int64)
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

    def _read(self, shard: int, offset: int, size: int, what: str, index: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise ShardError(f"{self.tars[shard]}: sample {index} {what} cut short ({len(data)} of {size} bytes)")
        return data

    def image_bytes(self, i: int) -> bytes:
        return self._read(int(self.shard[i]), int(self.img_off[i]), int(self.img_size[i]), "image", i)

    def read_into(self, i: int, out: np.ndarray) -> None:
        """Raw and latent encodings: read sample i straight into ``out`` (R x R x C of the stored dtype,
        contiguous)."""
        shard, size = int(self.shard[i]), int(self.img_size[i])
        if out.nbytes != size:
            raise ShardError(f"{self.tars[shard]}: sample {i} has {size} bytes, expected {out.nbytes}")
        got = os.preadv(self._fd(shard), [memoryview(out).cast("B")], int(self.img_off[i]))
        if got != size:
            raise ShardError(f"{self.tars[shard]}: sample {i} image cut short ({got} of {size} bytes)")

    def decode(self, i: int) -> np.ndarray:
        try:
            return decode_image(self.image_bytes(i), self.encoding, self.resolution, self.channels, self.dtype)
        except ShardError:
            raise
        except Exception as e:
            raise ShardError(f"{self.tars[self.shard[i]]}: sample {i} cannot be decoded: {e}") from None

    @property
    def labels(self) -> np.ndarray:
        """All labels as int64 (read once: 4 bytes per sample)."""
        if self._labels is None:
            out = np.empty(self.count, np.int64)
            for i in range(self.count):
                out[i] = np.frombuffer(self._read(int(self.shard[i]), int(self.lbl_off[i]), 4, "label", i), LABEL_DTYPE)[0]
            self._labels = out
        return self._labels

    def fingerprint(self) -> str:
        """Identifies the dataset (shard checksums), for guarding a pipeline state."""
        h = hashlib.sha256()
        for rec in self.manifest["shards"]:
            h.update(rec["sha256"].encode())
        return h.hexdigest()[:16]

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}
