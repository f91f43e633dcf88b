"""The shard format: what `pdiff shard` writes and the reader, verify and resume rely on. Every
member extension, index line and manifest field of a shard is named here and nowhere else.

A folder holds ``NAME-000000.tar``, ``NAME-000001.tar``, ... (plain ustar archives), next to each a
``NAME-00000K.idx`` in DALI's webdataset index format (v1.2: a header line ``v1.2 N``, then per sample
``ext offset size name`` for each member, as DALI's `wds2idx` writes), and ``manifest.json``, written
last. Sample k (a global index, zero-padded to 9 digits, no dots) has the members

* ``KKKKKKKKK.<ext>``, ext = ``IMAGE_EXTS[encoding]``: the sample in its encoding (see
  pipelines/sample_source.py): png, jpg, webp, raw (R x R x C uint8) or lat (R x R x C little-endian
  float16/float32; see "Latent shards" below);
* ``KKKKKKKKK.cls``: the label as decimal text (WebDataset's convention: the `webdataset` library
  decodes it to an int), ``-1`` when the dataset has none;
* ``KKKKKKKKK.feat`` (`pdiff shard --encode-features` only): a frozen encoder's feature grid of the
  image, C_f x g x g little-endian float16 (channels first); the manifest's ``features`` record names
  the encoder (its spec and the sha256 of its weights), ``grid``, ``channels``, ``dtype``, ``layout``.
  It is a member like the others: checked by its own CRC-32 (version 4; version 3: the sample's CRC-32
  covers it), docs/representation.md.

The manifest lists each shard as ``SHARD_FIELDS`` (file names, sample count, byte sizes, sha256s). From
version 4 on each shard has a third file, ``NAME-00000K.crc`` (its name, size and sha256 in the
manifest), that makes every read checkable: one fixed-size little-endian record per sample
(``crc_record_dtype``) with where its members lie in the tar, its label, a CRC-32 of each member (data,
label and, with --encode-features, the .feat grid, whose place and size the record holds too) and, for
raw and latent samples, a CRC-32 of each of the R rows (R x C values each), so a patch read by its rows
is checked on exactly the rows read. Each record ends with a CRC-32 of its own bytes: a reader
reads the records of the samples it uses (one ``pread`` each, when a shard is first used), never a
whole CRC file, and a damaged record is named as damage of the CRC file, not of the sample.
Version 3 kept one CRC-32 per sample (over data and label) in the manifest as text (``crc32``: 8 hex
digits a sample, 800 MB of JSON for 100M samples, parsed by every rank). The reader checks a sample's
CRCs before its bytes reach a decoder, so a damaged sample is named (shard, key, byte offset) instead of
crashing a decoder or training on garbage.

Latent shards (encoding "latent") hold R x R x C float samples; the manifest gives their ``dtype``,
``scale`` and ``shift`` (the network sees (z - shift) * scale) and ``stores``, what a sample is:

* ``"latents"``: latents as the network sees them, as the user gave them (`pdiff shard --format latent`);
* ``"posterior"``: an autoencoder's posterior N(mean, std^2) of one image, mean | std along the channels
  (C = 2 x the latent channels), written by `pdiff shard --encode-vae`; training draws a fresh latent
  from it at every read. ``vae`` records the autoencoder (source, sha256 of its weights, scale, shift,
  downsampling factor, channels) and ``image_resolution`` / ``image_channels`` the images it encoded.

Versions: 1 (images, 4-byte little-endian ``.lbl`` labels), 2 (adds the "latent" encoding), 3 (``.cls``
labels, per-sample CRC-32s, samples in a seeded random order, and for latent shards the ``stores`` and
``shift`` fields: posterior shards exist from version 3 on, so no reader of an older version can mistake
mean | std for latents: it refuses the version), 4 (the CRC-32s move into a ``.crc`` file per shard, one
per member and per row). This pdiff writes 4, for every encoding, and reads all four: version 3 as
before (whole reads checked, a raw patch read by its rows not), versions 1 and 2 without the per-sample
check (version 2 latent shards store latents, shift 0).
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path

import numpy as np

from pdiff.pipelines.sample_source import LATENT_DTYPES, LatentSpace, SourceError

MANIFEST = "manifest.json"
FORMAT = "pdiff-webdataset"
FORMAT_VERSION = 4
INDEX_VERSION = "v1.2"
# encoding -> member extension
IMAGE_EXTS = {"png": "png", "jpeg": "jpg", "webp": "webp", "raw": "raw", "latent": "lat"}
LABEL_EXT = "cls"
FEATURE_EXT = "feat"                     # a stored feature grid (--encode-features), after the label
LEGACY_LABEL_EXT = "lbl"                 # versions 1 and 2: a 4-byte little-endian int32
_LEGACY_LABEL_DTYPE = np.dtype("<i4")
_MAX_LABEL_BYTES = 20                    # "-1" .. the largest int64 in decimal
KEY_DIGITS = 9
CRC_EXT = "crc"                          # version 4: a shard's CRC file, NAME-00000K.crc
# One shard's entry in manifest["shards"]: its tar and index, their sizes and sha256s, and (version 4)
# its CRC file's; version 3 had the samples' CRC-32s as text instead (``crc32``).
SHARD_FIELDS = ("tar", "index", "count", "bytes", "sha256", "index_bytes", "index_sha256", "crc", "crc_bytes",
                "crc_sha256")
_SHARD_TYPES = {"tar": str, "index": str, "count": int, "bytes": int, "sha256": str, "index_bytes": int,
                "index_sha256": str}
_SHARD_TYPES_BY_VERSION = {3: {"crc32": str}, 4: {"crc": str, "crc_bytes": int, "crc_sha256": str}}
_MANIFEST_TYPES = {"format": str, "encoding": str, "resolution": int, "channels": int, "count": int, "shards": list}


class ShardError(SourceError):
    """A shard folder that does not match its manifest, or a sample that cannot be read."""


def verify_hint(root: str | Path) -> str:
    """What to run when a shard folder looks damaged."""
    return f"run `pdiff shard verify {root}` to check every sample, and re-create the shards if it finds damage"


# ---------------------------------------------------------------------------------------------
# Samples

def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def encode_label(label: int) -> bytes:
    return str(int(label)).encode("ascii")


def decode_label(ext: str, data: bytes) -> int:
    """A label member's value; ValueError (saying what is wrong) for bytes no writer of the format makes."""
    if ext == LEGACY_LABEL_EXT:
        if len(data) != _LEGACY_LABEL_DTYPE.itemsize:
            raise ValueError(f"a {len(data)}-byte .{ext} label, expected {_LEGACY_LABEL_DTYPE.itemsize}")
        return int(np.frombuffer(data, _LEGACY_LABEL_DTYPE)[0])
    if not re.fullmatch(rb"-1|0|[1-9][0-9]*", data):
        raise ValueError(f".{ext} label {bytes(data[:_MAX_LABEL_BYTES])!r} is not a decimal class number")
    return int(data)


def sample_members(encoding: str, data: bytes, label: int, features: bytes | None = None) -> list[tuple[str, bytes]]:
    """The tar members of one sample, as (extension, bytes), in the order they are written."""
    members = [(IMAGE_EXTS[encoding], data), (LABEL_EXT, encode_label(label))]
    return members + ([(FEATURE_EXT, features)] if features is not None else [])


def member_exts(manifest: dict) -> tuple[str, ...]:
    """The members a sample has after its data and label, in the order written (and CRC-checked)."""
    return (FEATURE_EXT,) if manifest.get("features") else ()


def feature_record(manifest: dict, path) -> dict | None:
    """The ``features`` record of a folder written with --encode-features (None without), checked."""
    rec = manifest.get("features")
    if rec is None:
        return None
    ok = (isinstance(rec, dict) and all(isinstance(rec.get(k), int) and rec[k] > 0 for k in ("grid", "channels"))
          and rec.get("dtype") == "float16" and rec.get("layout") == "chw" and isinstance(rec.get("sha256"), str))
    if not ok:
        raise ShardError(f"{path}: the 'features' record is damaged (expected grid, channels, dtype float16, layout "
                         f"chw and the encoder's sha256); restore {MANIFEST} or re-create the shards")
    return rec


def sample_crc(*member_bytes) -> int:
    """The CRC-32 stored for a sample: over its members' bytes, in the order written."""
    crc = 0
    for data in member_bytes:
        crc = zlib.crc32(data, crc)
    return crc


def parse_crcs(rec: dict, where: str | Path) -> np.ndarray | None:
    """The (count,) uint32 CRC-32s of a shard's samples from its manifest record; None before version 3."""
    text = rec.get("crc32")
    if text is None:
        return None
    try:
        if len(text) != 8 * rec["count"]:
            raise ValueError(f"{len(text) // 8} values for {rec['count']} samples")
        return np.frombuffer(bytes.fromhex(text), ">u4").astype(np.uint32)
    except ValueError as e:
        raise ShardError(f"{where}: the crc32 entry of {rec['tar']} is damaged ({e}); restore {MANIFEST} "
                         f"or re-create the shards") from None


# ---------------------------------------------------------------------------------------------
# CRC files (version 4)

CRC_MAGIC = b"PDIFFCRC"
_CRC_HEADER = np.dtype([("magic", "S8"), ("count", "<u4"), ("rows", "<u4")])     # 16 bytes


def crc_rows(manifest: dict) -> int:
    """Row CRC-32s per sample in a shard's CRC file: R for raw and latent samples (read by rows), 0 for
    encoded images (always read whole)."""
    return int(manifest["resolution"]) if manifest["encoding"] in ("raw", "latent") else 0


def crc_features(manifest: dict) -> bool:
    """Whether a shard's CRC records hold a feature member's place and CRC-32 (--encode-features)."""
    return bool(manifest.get("features"))


def crc_record_dtype(rows: int, features: bool = False) -> np.dtype:
    """One sample's record in a CRC file: where its members lie in the tar, its label, the CRC-32 of each
    member and of each of its ``rows`` rows, with ``features`` the place and CRC-32 of its .feat member,
    and ``check``, the CRC-32 of the record's other bytes."""
    feat = [("feat_offset", "<u8"), ("feat_size", "<u4"), ("feat_crc", "<u4")] if features else []
    return np.dtype([("data_offset", "<u8"), ("label_offset", "<u8"), ("data_size", "<u4"), ("label_size", "<u4"),
                     ("label", "<i4"), ("data_crc", "<u4"), ("label_crc", "<u4"), ("row_crc", "<u4", (rows,)),
                     *feat, ("check", "<u4")])


def sample_record(rows: int, data_offset: int, data: bytes, label_offset: int, label_bytes: bytes,
                  label: int, feature: tuple[int, bytes] | None = None) -> tuple:
    """The fields of a sample's CRC record but ``check`` (see `crc_file_bytes`); ``feature`` is the .feat
    member's (offset, bytes) in a folder written with --encode-features."""
    row = len(data) // rows if rows else 0
    row_crcs = [zlib.crc32(data[k * row:(k + 1) * row]) for k in range(rows)]
    feat = (feature[0], len(feature[1]), zlib.crc32(feature[1])) if feature is not None else ()
    return (data_offset, label_offset, len(data), len(label_bytes), label, zlib.crc32(data), zlib.crc32(label_bytes),
            row_crcs, *feat, 0)


def _record_check(record: np.ndarray) -> int:
    return zlib.crc32(record.tobytes()[:-4])


def crc_file_bytes(records: list[tuple], rows: int, features: bool = False) -> bytes:
    """A CRC file: the header, then the records with their ``check``."""
    table = np.array(records, crc_record_dtype(rows, features))
    return crc_table_bytes(table, rows)


def crc_table_bytes(table: np.ndarray, rows: int) -> bytes:
    """A CRC file of the records ``table`` (of `crc_record_dtype`), their ``check`` filled in."""
    size, data = table.dtype.itemsize, memoryview(table.tobytes())
    table["check"] = np.fromiter((zlib.crc32(data[k * size:(k + 1) * size - 4]) for k in range(len(table))),
                                 np.uint32, len(table))
    return crc_header(len(table), rows) + table.tobytes()


def crc_header(count: int, rows: int) -> bytes:
    """The 16 bytes a CRC file of ``count`` records with ``rows`` row CRC-32s begins with."""
    return np.array([(CRC_MAGIC, count, rows)], _CRC_HEADER).tobytes()


def crc_file_error(path: str | Path, tar: str, what: str) -> ShardError:
    return ShardError(f"{path}: the CRC file of {tar} is {what}; no sample of that shard can be checked without "
                      f"it: restore it, or re-create the shards (`pdiff shard verify {Path(path).parent}` lists all "
                      f"the damage)")


def check_crc_header(path: str | Path, head: bytes, size: int, rec: dict, rows: int,
                     features: bool = False) -> np.dtype:
    """A CRC file's header and size against its manifest record; -> the record dtype."""
    dtype = crc_record_dtype(rows, features)
    if size != rec["crc_bytes"]:
        raise crc_file_error(path, rec["tar"], f"{size} bytes, the manifest says {rec['crc_bytes']} (truncated or "
                                               f"replaced)")
    h = np.frombuffer(head[:_CRC_HEADER.itemsize].ljust(_CRC_HEADER.itemsize, b"\0"), _CRC_HEADER)[0]
    want = _CRC_HEADER.itemsize + rec["count"] * dtype.itemsize
    if h["magic"] != CRC_MAGIC or int(h["count"]) != rec["count"] or int(h["rows"]) != rows or size != want:
        raise crc_file_error(path, rec["tar"], f"damaged (its header says {int(h['count'])} samples of "
                                               f"{int(h['rows'])} rows, expected {rec['count']} of {rows})")
    return dtype


def crc_record_at(path: str | Path, tar: str, data: bytes, k: int, dtype: np.dtype) -> np.void:
    """Record ``k`` from its bytes, held against its own CRC-32."""
    record = np.frombuffer(data, dtype) if len(data) == dtype.itemsize else None
    if record is None or _record_check(record) != int(record["check"][0]):
        raise crc_file_error(path, tar, f"damaged at the record of sample #{k} of the shard (byte "
                                        f"{_CRC_HEADER.itemsize + k * dtype.itemsize})")
    return record[0]


def read_crc_file(root: Path, rec: dict, rows: int, features: bool = False) -> np.ndarray:
    """All the records of a shard's CRC file, each checked; ShardError naming the file if it is missing
    or damaged."""
    path = root / rec["crc"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise crc_file_error(path, rec["tar"], f"missing (listed in {root / MANIFEST})") from None
    dtype = check_crc_header(path, data, len(data), rec, rows, features)
    start = _CRC_HEADER.itemsize
    for k in range(rec["count"]):
        crc_record_at(path, rec["tar"], data[start + k * dtype.itemsize:start + (k + 1) * dtype.itemsize], k, dtype)
    return np.frombuffer(data, dtype, offset=start).copy()


CRC_HEADER_BYTES = _CRC_HEADER.itemsize


def sample_place(tar: str | Path, index: int, number_in_shard: int, ext: str, offset: int, size: int) -> str:
    """How a sample is named in every message: shard, key, place in the archive."""
    return (f"{tar}: sample {sample_key(index)} (#{number_in_shard} of the shard; its .{ext} member at byte "
            f"{offset}, {size} bytes)")


def sample_dtype(manifest: dict) -> np.dtype:
    """The element type of a decoded sample: uint8 for images, the stored float type for latents."""
    if manifest.get("encoding") != "latent":
        return np.dtype(np.uint8)
    name = manifest.get("dtype")
    if name not in LATENT_DTYPES:
        raise ShardError(f"latent shards with dtype {name!r}; expected one of {', '.join(LATENT_DTYPES)}")
    return LATENT_DTYPES[name]


def label_ext(manifest: dict) -> str:
    """The label member's extension: .cls from version 3 on, .lbl before."""
    return manifest.get("label_ext") or (LABEL_EXT if manifest.get("version", 1) >= 3 else LEGACY_LABEL_EXT)


def latent_space(manifest: dict) -> LatentSpace | None:
    """What the samples of a latent shard folder are (None for images); `load_manifest` checked the fields."""
    if manifest.get("encoding") != "latent":
        return None
    stores = manifest.get("stores", "latents")
    return LatentSpace(scale=float(manifest.get("scale", 1.0)), shift=float(manifest.get("shift", 0.0)),
                       posterior=stores == "posterior", vae=manifest.get("vae"))


# ---------------------------------------------------------------------------------------------
# Indexes

def write_index(path: str | Path, samples: list[list[tuple[str, int, int, str]]]) -> None:
    """One ``(ext, offset, size, member name)`` per member of each sample."""
    Path(path).write_text(index_text(samples))


def index_text(samples: list[list[tuple[str, int, int, str]]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in comps) for comps in samples]
    return "\n".join(lines) + "\n"


def read_index(path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Parse an index into one ``{ext: (offset, size)}`` per sample."""
    return parse_index(Path(path).read_bytes(), path)


def parse_index(data: bytes, path: str | Path) -> list[dict[str, tuple[int, int]]]:
    try:
        text = data.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise ShardError(f"{path}: not a DALI webdataset index (not ASCII text)") from None
    head = text[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardError(f"{path}: not a DALI webdataset index {INDEX_VERSION} (first line {text[0]!r})")
    n = int(head[1])
    out = []
    for lineno, line in enumerate(text[1:1 + n], start=2):
        tok = line.split()
        if not tok or len(tok) % 4 or not all(t.isdigit() for k in range(0, len(tok), 4) for t in tok[k + 1:k + 3]):
            raise ShardError(f"{path}:{lineno}: malformed index line {line!r}")
        out.append({tok[i]: (int(tok[i + 1]), int(tok[i + 2])) for i in range(0, len(tok), 4)})
    if len(out) != n:
        raise ShardError(f"{path}: header says {n} samples, found {len(out)} lines")
    return out


def sample_offsets(root: Path, rec: dict, encoding: str, label: str, extra: tuple[str, ...] = ()) -> np.ndarray:
    """(count, 4 + 2 len(extra)) int64: offset and size of each sample's data member, of its label member
    (extension ``label``) and of each ``extra`` member (member_exts) in the shard's tar, from its index.
    The index is checked against the manifest's sha256 first (it is small next to its tar): a damaged
    offset would hand a decoder the wrong bytes."""
    path, ext = root / rec["index"], IMAGE_EXTS[encoding]
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != rec["index_sha256"]:
        raise ShardError(f"{path}: sha256 differs from {root / MANIFEST} (the index is damaged, so no offset in it "
                         f"can be trusted); {verify_hint(root)}")
    entries = parse_index(data, path)
    if len(entries) != rec["count"]:
        raise ShardError(f"{path}: {len(entries)} samples, the manifest says {rec['count']}")
    out = np.empty((len(entries), 4 + 2 * len(extra)), np.int64)
    for k, e in enumerate(entries):
        if ext not in e or label not in e or any(x not in e for x in extra):
            raise ShardError(f"{path}: sample #{k} lacks .{ext}, .{label}" + "".join(f" or .{x}" for x in extra))
        size = e[label][1]
        fits = size == _LEGACY_LABEL_DTYPE.itemsize if label == LEGACY_LABEL_EXT else 1 <= size <= _MAX_LABEL_BYTES
        if not fits:
            raise ShardError(f"{path}: sample #{k} has a {size}-byte .{label} label")
        out[k] = *e[ext], *e[label], *(v for x in extra for v in e[x])
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


def shard_record(tar: Path, index: Path, crc: Path, count: int, names: tuple[str, str, str]) -> dict:
    """The manifest entry of a shard of ``count`` samples whose files are ``tar``, ``index`` and ``crc``
    (temporary names as written; ``names`` are their final names)."""
    return {"tar": names[0], "index": names[1], "count": count,
            "bytes": tar.stat().st_size, "sha256": sha256_file(tar),
            "index_bytes": index.stat().st_size, "index_sha256": sha256_file(index),
            "crc": names[2], "crc_bytes": crc.stat().st_size, "crc_sha256": sha256_file(crc)}


def shard_files(rec: dict) -> list[tuple[str, int, str]]:
    """The files of one shard as (name, bytes, sha256), its tar first: what a copy of the shard (a
    fetch from object storage, pipelines/remote.py) must bring along."""
    crc = [(rec["crc"], rec["crc_bytes"], rec["crc_sha256"])] if "crc" in rec else []      # version 4
    return [(rec["tar"], rec["bytes"], rec["sha256"]), (rec["index"], rec["index_bytes"], rec["index_sha256"])] + crc


def check_shard(root: Path, rec: dict, checksums: bool = False) -> None:
    """The shard's tar and index exist with the manifest's byte sizes (and sha256s if ``checksums``).
    A truncated tar can crash DALI's reader, so this runs before any pipeline is built. From version 4 on
    the CRC file too."""
    files = [("tar", "bytes", "sha256"), ("index", "index_bytes", "index_sha256")]
    for key, size_key, sha_key in files + ([("crc", "crc_bytes", "crc_sha256")] if "crc" in rec else []):
        p = root / rec[key]
        if not p.exists():
            if key == "crc":
                raise crc_file_error(p, rec["tar"], f"missing (listed in {root / MANIFEST})")
            raise ShardError(f"{p}: missing (listed in {root / MANIFEST})")
        size = p.stat().st_size
        if size != rec[size_key]:
            raise ShardError(f"{p}: {size} bytes, the manifest says {rec[size_key]} (truncated or "
                             f"replaced; run `pdiff shard verify {root}` and re-create the shards)")
        if checksums and sha256_file(p) != rec[sha_key]:
            if key == "crc":
                raise crc_file_error(p, rec["tar"], "damaged (its sha256 differs from the manifest)")
            raise ShardError(f"{p}: sha256 differs from the manifest (corrupted; re-create the shards)")


def check_files(root: str | Path, manifest: dict, checksums: bool = False) -> None:
    for rec in manifest["shards"]:
        check_shard(Path(root), rec, checksums)


def read_json(path: Path, what: str) -> dict:
    """A JSON object this tool wrote at ``path``; a clear error naming the file when it is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: the {what} is not valid JSON ({e}); it is damaged") from None
    if not isinstance(data, dict):
        raise ShardError(f"{path}: the {what} is not a JSON object; it is damaged")
    return data


def read_manifest(root: str | Path) -> dict:
    """The JSON of ``root/manifest.json``, whatever its format."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise ShardError(f"{root}: no {MANIFEST} (not written by `pdiff shard`, or the run did not "
                         f"finish; re-run the same `pdiff shard` command to complete it)")
    try:
        return read_json(path, "shard manifest")
    except ShardError as e:
        raise ShardError(f"{e}: restore it, or re-create the shards with `pdiff shard ... --overwrite`") from None


def _check_fields(manifest: dict, path: Path) -> None:
    """Every field the reader uses is there with its type (a hand-edited or damaged manifest is named,
    not a KeyError)."""
    def need(record: dict, key: str, tp: type, where: str) -> None:
        value = record.get(key)
        if not isinstance(value, tp) or isinstance(value, bool):
            raise ShardError(f"{path}: {where}{key!r} is {'missing' if value is None else repr(value)[:40]}, expected "
                             f"a{'n' if tp is int else ''} {tp.__name__} (the manifest is damaged; restore it or "
                             f"re-create the shards)")
    for key, tp in _MANIFEST_TYPES.items():
        need(manifest, key, tp, "")
    for k, rec in enumerate(manifest["shards"]):
        if not isinstance(rec, dict):
            raise ShardError(f"{path}: shards[{k}] is not an object (the manifest is damaged)")
        for key, tp in {**_SHARD_TYPES, **_SHARD_TYPES_BY_VERSION.get(manifest.get("version", 1), {})}.items():
            need(rec, key, tp, f"shards[{k}].")


STORES = ("latents", "posterior")      # what a latent sample is (see the module's docstring)


def _check_latent_fields(manifest: dict, path: Path) -> None:
    """A latent manifest says what its samples are: from version 3 on ``stores`` is always written, and
    a posterior names its autoencoder; before, the samples were latents."""
    version = manifest.get("version", 1)
    stores = manifest.get("stores", None if version >= 3 else "latents")
    if stores not in STORES or (stores == "posterior" and version < 3):
        raise ShardError(f"{path}: latent shards of version {version} whose 'stores' is {stores!r}, expected "
                         f"{' or '.join(map(repr, STORES)) if version >= 3 else repr('latents')} (the manifest is "
                         f"damaged: restore it or re-create the shards)")
    for key in ("scale", "shift"):
        value = manifest.get(key, 1.0 if key == "scale" else 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ShardError(f"{path}: {key!r} is {value!r}, expected a number (the manifest is damaged)")
    if stores == "posterior":
        vae, image = manifest.get("vae"), manifest.get("image_resolution")
        if manifest["channels"] % 2 or not isinstance(vae, dict) or not isinstance(vae.get("sha256"), str) \
                or not isinstance(vae.get("source"), str) or not isinstance(image, int):
            raise ShardError(f"{path}: posterior latents need an even channel count (mean | std), a 'vae' record "
                             f"with source and sha256, and 'image_resolution' (the manifest is damaged: restore it "
                             f"or re-create the shards)")


def load_manifest(root: str | Path) -> dict:
    """The manifest of a shard folder this pdiff can read."""
    manifest = read_manifest(root)
    path = Path(root) / MANIFEST
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    version = manifest.get("version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {version!r} is newer than this "
                         f"pdiff reads ({FORMAT_VERSION}); update pdiff")
    if manifest.get("encoding") not in IMAGE_EXTS:
        raise ShardError(f"{path}: unknown encoding {manifest.get('encoding')!r} (expected one of "
                         f"{', '.join(IMAGE_EXTS)}); update pdiff or re-create the shards")
    _check_fields(manifest, path)
    if manifest["encoding"] == "latent":
        _check_latent_fields(manifest, path)
    feature_record(manifest, path)
    if label_ext(manifest) not in (LABEL_EXT, LEGACY_LABEL_EXT):
        raise ShardError(f"{path}: label member .{label_ext(manifest)} is neither .{LABEL_EXT} nor .{LEGACY_LABEL_EXT}")
    return manifest
