"""The shard format: what `pdiff shard` writes and the reader, verify and resume rely on. Every
member extension, index line and manifest field of a shard is named here and nowhere else.

A folder holds ``NAME-000000.tar``, ``NAME-000001.tar``, ... (plain ustar archives), next to each a
``NAME-00000K.idx`` in DALI's webdataset index format (v1.2: a header line ``v1.2 N``, then per sample
``ext offset size name`` for each member, as DALI's `wds2idx` writes), and ``manifest.json``, written
last. Sample k (a global index, zero-padded to 9 digits, no dots) has the members

* ``KKKKKKKKK.<ext>``, ext = ``IMAGE_EXTS[encoding]``: the sample in its encoding (see
  pipelines/sample_source.py): png, jpg, webp, raw (R x R x C uint8) or lat (R x R x C little-endian
  float16/float32; dtype and scale in the manifest);
* ``KKKKKKKKK.lbl``: the label, a 4-byte little-endian int32, -1 when the dataset has none.

The manifest lists each shard as ``SHARD_FIELDS`` (file names, sample count, byte sizes, sha256s).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pdiff.pipelines.sample_source import LATENT_DTYPES, SourceError

MANIFEST = "manifest.json"
FORMAT = "pdiff-webdataset"
FORMAT_VERSION = 2      # 2 added the "latent" encoding; image shards are still written as version 1
INDEX_VERSION = "v1.2"
IMAGE_EXTS = {"png": "png", "jpeg": "jpg", "webp": "webp", "raw": "raw", "latent": "lat"}   # encoding -> member extension
LABEL_EXT = "lbl"
LABEL_DTYPE = np.dtype("<i4")
KEY_DIGITS = 9
# One shard's entry in manifest["shards"]: its tar and index, and their sizes and sha256s.
SHARD_FIELDS = ("tar", "index", "count", "bytes", "sha256", "index_bytes", "index_sha256")


class ShardError(SourceError):
    """A shard folder that does not match its manifest, or a sample that cannot be read."""


# ---------------------------------------------------------------------------------------------
# Samples

def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def sample_members(encoding: str, data: bytes, label: int) -> list[tuple[str, bytes]]:
    """The tar members of one sample, as (extension, bytes), in the order they are written."""
    return [(IMAGE_EXTS[encoding], data), (LABEL_EXT, np.asarray([label], LABEL_DTYPE).tobytes())]


def decode_label(data: bytes) -> int:
    return int(np.frombuffer(data, LABEL_DTYPE)[0])


def sample_dtype(manifest: dict) -> np.dtype:
    """The element type of a decoded sample: uint8 for images, the stored float type for latents."""
    if manifest.get("encoding") != "latent":
        return np.dtype(np.uint8)
    name = manifest.get("dtype")
    if name not in LATENT_DTYPES:
        raise ShardError(f"latent shards with dtype {name!r}; expected one of {', '.join(LATENT_DTYPES)}")
    return LATENT_DTYPES[name]


# ---------------------------------------------------------------------------------------------
# Indexes

def write_index(path: str | Path, samples: list[list[tuple[str, int, int, str]]]) -> None:
    """One ``(ext, offset, size, member name)`` per member of each sample."""
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


def sample_offsets(root: Path, rec: dict, encoding: str) -> np.ndarray:
    """(count, 4) int64: offset and size of each sample's data member and of its label member in the
    shard's tar, from its index (checked against the manifest record ``rec``)."""
    path, ext = root / rec["index"], IMAGE_EXTS[encoding]
    entries = read_index(path)
    if len(entries) != rec["count"]:
        raise ShardError(f"{path}: {len(entries)} samples, the manifest says {rec['count']}")
    out = np.empty((len(entries), 4), np.int64)
    for k, e in enumerate(entries):
        if ext not in e or LABEL_EXT not in e:
            raise ShardError(f"{path}: sample #{k} lacks .{ext} or .{LABEL_EXT}")
        if e[LABEL_EXT][1] != LABEL_DTYPE.itemsize:
            raise ShardError(f"{path}: sample #{k} has a {e[LABEL_EXT][1]}-byte label, expected {LABEL_DTYPE.itemsize}")
        out[k] = *e[ext], *e[LABEL_EXT]
    return out


# ---------------------------------------------------------------------------------------------
# Manifest and files

def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def shard_record(tar: Path, index: Path, count: int, tar_name: str, index_name: str) -> dict:
    """The manifest entry of a shard whose files are ``tar`` and ``index`` (temporary names as written;
    ``tar_name`` and ``index_name`` are their final names)."""
    return {"tar": tar_name, "index": index_name, "count": count,
            "bytes": tar.stat().st_size, "sha256": sha256_file(tar),
            "index_bytes": index.stat().st_size, "index_sha256": sha256_file(index)}


def check_shard(root: Path, rec: dict, checksums: bool = False) -> None:
    """The shard's tar and index exist with the manifest's byte sizes (and sha256s if ``checksums``).
    A truncated tar can crash DALI's reader, so this runs before any pipeline is built."""
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


def check_files(root: str | Path, manifest: dict, checksums: bool = False) -> None:
    for rec in manifest["shards"]:
        check_shard(Path(root), rec, checksums)


def read_manifest(root: str | Path) -> dict:
    """The JSON of ``root/manifest.json``, whatever its format."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise ShardError(f"{root}: no {MANIFEST} (not written by `pdiff shard`, or the run did not "
                         f"finish; re-run the same `pdiff shard` command to complete it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON: {e}") from None


def load_manifest(root: str | Path) -> dict:
    """The manifest of a shard folder this pdiff can read."""
    manifest = read_manifest(root)
    path = Path(root) / MANIFEST
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {manifest['version']} is newer than this "
                         f"pdiff reads ({FORMAT_VERSION}); update pdiff")
    if manifest.get("encoding") not in IMAGE_EXTS:
        raise ShardError(f"{path}: unknown encoding {manifest.get('encoding')!r} (expected one of "
                         f"{', '.join(IMAGE_EXTS)}); update pdiff or re-create the shards")
    return manifest
