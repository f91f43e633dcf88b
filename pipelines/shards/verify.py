"""`pdiff shard verify` and `pdiff shard info`: check a shard folder against its manifest, and say
what it holds.

Verify reads every shard once, front to back, a sample (or 256 KiB) at a time (a shard is 1 GiB by
default and is never held whole), in parallel over shards: the sha256 of the tar, the index and (format
version 4) the CRC file, which must agree with the index; each sample's CRC-32s (version 4: of each
member and each row, and the label the CRC file records; version 3: one per sample), a decode of each
sample and its label. It lists every damaged sample it finds (shard, key, byte offset), not just the
first, and names a damaged or missing CRC file as such.
"""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from pdiff.pipelines.sample_source import SourceError, decode_sample
from pdiff.pipelines.shards.format import (FEATURE_EXT, IMAGE_EXTS, MANIFEST, ShardError, check_shard, crc_features,
                                           crc_file_error, crc_rows, decode_label, label_ext, load_manifest,
                                           member_exts, parse_crcs, read_crc_file, sample_crc, sample_dtype,
                                           sample_offsets, sample_place)
from pdiff.pipelines.shards.write import pool_context
from pdiff.progress import Progress

SHOW_PROBLEMS = 50          # damaged samples listed in the message (all are counted)
_CHUNK = 1 << 18            # bytes read at a time between samples (a shard is never held whole)


def verify(root: str | Path, workers: int = 0, progress: bool = False) -> tuple[bool, str]:
    """Sizes, sha256s and (versions 3 and 4) CRC-32s against the manifest, the indexes, then a decode of every
    sample and a check of its label; ``workers`` processes (0: one per core, at most one per shard).
    Returns (ok, message); the message names every damaged shard and sample (the first SHOW_PROBLEMS)."""
    root = Path(root)
    try:
        manifest = load_manifest(root)
        for rec in manifest["shards"]:
            check_shard(root, rec)            # sizes first: a truncated shard is named without reading it
    except SourceError as e:
        return False, str(e)
    facts = {"encoding": manifest["encoding"], "resolution": int(manifest["resolution"]),
             "channels": int(manifest["channels"]), "dtype": sample_dtype(manifest).str,
             "label_ext": label_ext(manifest), "num_classes": int(manifest.get("num_classes") or 0),
             "extra": member_exts(manifest), "rows": crc_rows(manifest), "features": crc_features(manifest)}
    first = np.cumsum([0] + [rec["count"] for rec in manifest["shards"]])
    jobs = [(str(root), rec, facts, int(first[k])) for k, rec in enumerate(manifest["shards"])]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    problems: list[str] = []
    bad_samples = bad_shards = 0
    total = int(manifest["count"])
    with Progress(total, "verify", "samples", enabled=progress) as bar:
        pool = None
        try:
            if workers > 1:
                pool = pool_context().Pool(workers)
                results = pool.imap_unordered(_verify_job, jobs)
            else:
                results = map(_verify_job, jobs)
            for count, shard_problems, damaged in results:
                bar.update(count)
                problems += shard_problems
                bad_samples += damaged
                bad_shards += bool(shard_problems)
        finally:
            if pool is not None:
                pool.terminate()
    shards = len(jobs)
    checks = "sizes, sha256s, CRC files, CRC-32s (per member, and per row of raw and latent samples), decoding " \
        "and labels" \
        if "crc" in manifest["shards"][0] else "sizes, sha256s, CRC-32s, decoding and labels" \
        if "crc32" in manifest["shards"][0] else \
        f"sizes, sha256s, decoding and labels (format version {manifest.get('version', 1)} keeps no per-sample CRC-32s)"
    if not problems:
        return True, f"{root}: OK, {total} samples in {shards} shards: {checks} check out"
    shown = "\n".join(f"  {p}" for p in sorted(problems)[:SHOW_PROBLEMS])
    more = f"\n  ... and {len(problems) - SHOW_PROBLEMS} more" if len(problems) > SHOW_PROBLEMS else ""
    return False, (f"{root}: {bad_samples} damaged sample(s), {bad_shards} of {shards} shard(s) with problems:\n"
                   f"{shown}{more}\nRe-create the shards (the command is in {root / MANIFEST}), or train with "
                   f"data.on_corrupt=skip to replace each damaged sample with another")


def _verify_job(job) -> tuple[int, list[str], int]:
    root, rec, facts, first = job
    try:
        return _verify_shard(Path(root), rec, facts, first)
    except SourceError as e:
        return rec["count"], [str(e)], 0
    except OSError as e:
        return rec["count"], [f"{Path(root) / rec['tar']}: cannot read: {e.strerror or e}"], 0


def _verify_shard(root: Path, rec: dict, facts: dict, first: int) -> tuple[int, list[str], int]:
    """-> (samples, problems, damaged samples) of one shard, read front to back once."""
    tar = root / rec["tar"]
    encoding, ext, lab_ext = facts["encoding"], IMAGE_EXTS[facts["encoding"]], facts["label_ext"]
    table = sample_offsets(root, rec, encoding, lab_ext, facts["extra"])     # the index, against its sha256
    crcs = parse_crcs(rec, root / MANIFEST)
    if "crc" in rec:                                         # version 4: the CRC file, each record checked
        crcs = read_crc_file(root, rec, facts["rows"], facts["features"])
        if hashlib.sha256((root / rec["crc"]).read_bytes()).hexdigest() != rec["crc_sha256"]:   # small next to the tar
            raise crc_file_error(root / rec["crc"], rec["tar"], "damaged (its sha256 differs from the manifest)")
        fields = ["data_offset", "data_size", "label_offset", "label_size"]
        fields += ["feat_offset", "feat_size"] if facts["features"] else []
        places = np.stack([crcs[f] for f in fields], 1).astype(np.int64)
        if not np.array_equal(places, table):
            k = int(np.flatnonzero((places != table).any(1))[0])
            raise ShardError(f"{root / rec['index']} and {root / rec['crc']} place sample #{k} of the shard "
                             f"differently (one of them is damaged); re-create the shards")
    # Every member in the order it lies in the tar: (offset, size, sample number, 0 = data / 1 = label /
    # 2.. = the extra members, member_exts).
    n_members = table.shape[1] // 2
    members = sorted((int(row[2 * m]), int(row[2 * m + 1]), k, m) for k, row in enumerate(table)
                     for m in range(n_members))
    h = hashlib.sha256()
    problems: list[str] = []
    damaged: set[int] = set()
    parts: dict[int, list] = {}
    pos = 0
    with open(tar, "rb") as f:
        def take(n: int) -> bytes:
            nonlocal pos
            data = f.read(n)
            h.update(data)
            pos += len(data)
            return data

        for offset, size, k, which in members:
            if offset < pos:
                problems.append(f"{tar}: the index places sample #{k}'s members overlapping earlier ones")
                damaged.add(k)
                continue
            while pos < offset:
                take(min(_CHUNK, offset - pos))
            data = take(size)
            parts.setdefault(k, [None] * n_members)[which] = data
            if None not in parts[k]:
                problem = _check_sample(parts.pop(k), crcs, k, first, tar, table, facts, ext, lab_ext)
                if problem:
                    problems.append(problem)
                    damaged.add(k)
        while take(_CHUNK):
            pass
    if pos != rec["bytes"] or h.hexdigest() != rec["sha256"]:
        where = "" if damaged else " outside the samples (tar headers or padding; the samples themselves check out)"
        problems.append(f"{tar}: sha256 differs from the manifest{where}")
    return rec["count"], problems, len(damaged)


def _check_sample(members, crcs, k, first, tar, table, facts, ext, lab_ext) -> str | None:
    data, label = members[:2]
    where = sample_place(tar, first + k, k, ext, int(table[k, 0]), int(table[k, 1]))
    if any(len(m) != table[k, 2 * j + 1] for j, m in enumerate(members)):
        return f"{where}: cut short (the tar ends inside it)"
    if crcs is not None and crcs.dtype.names:            # version 4: each member, each row, the label's value
        problem = _check_record(members, crcs[k], facts["rows"], lab_ext)
        if problem:
            return f"{where}: {problem}"
    elif crcs is not None and sample_crc(*members) != int(crcs[k]):
        return f"{where}: fails its CRC-32 check (stored {int(crcs[k]):08x}, read {sample_crc(*members):08x})"
    try:
        sample = decode_sample(data, facts["encoding"], facts["resolution"], facts["channels"], facts["dtype"])
    except Exception as e:
        return f"{where}: cannot be decoded: {e}"
    if facts["encoding"] == "latent" and not np.isfinite(sample).all():
        return f"{where}: {int(np.count_nonzero(~np.isfinite(sample)))} non-finite value(s)"
    try:
        value = decode_label(lab_ext, label)
    except ValueError as e:
        return f"{where}: {e}"
    n = facts["num_classes"]
    if not (0 <= value < n if n else value == -1):
        return f"{where}: label {value} outside " + (f"0..{n - 1}" if n else "the unlabeled -1")
    return None


def _check_record(members: list[bytes], record, rows: int, lab_ext: str) -> str | None:
    data, label = members[:2]
    row = len(data) // rows if rows else 0
    parts = [("its data", data, int(record["data_crc"])), (f"its .{lab_ext} label", label, int(record["label_crc"]))]
    if "feat_crc" in record.dtype.names:
        parts.append((f"its .{FEATURE_EXT} features", members[2], int(record["feat_crc"])))
    parts += [(f"its row {y}", data[y * row:(y + 1) * row], int(record["row_crc"][y])) for y in range(rows)]
    for what, part, stored in parts:
        if zlib.crc32(part) != stored:
            return f"{what} fails its CRC-32 check (stored {stored:08x}, read {zlib.crc32(part):08x})"
    try:
        if decode_label(lab_ext, label) != int(record["label"]):
            return f"its label {decode_label(lab_ext, label)} differs from the CRC file's {int(record['label'])}"
    except ValueError:
        pass                             # named below, with the label's check
    return None


def info(root: str | Path) -> str:
    m = load_manifest(root)
    sizes = [r["bytes"] for r in m["shards"]]
    counts = [r["count"] for r in m["shards"]]
    classes = m["classes"]
    if m.get("stores") == "posterior":
        vae = m["vae"]
        c = m["channels"] // 2
        what = [f"latents     {m['count']} posteriors of {m['resolution']}x{m['resolution']}x{c} (mean | std: "
                f"{m['channels']} channels stored), from {m['image_resolution']}x{m['image_resolution']} images, "
                f"transform {m['transform']}",
                f"stored as   latent {m['dtype']}; training draws (mean + std * eps - {m['shift']:g}) * {m['scale']:g}",
                f"vae         {vae['source']} ({vae.get('class', 'class not recorded')}, weights sha256 "
                f"{vae['sha256'][:16]}..., downsamples {vae.get('downsample', '?')}x)"]
    elif m["encoding"] == "latent":
        what = [f"latents     {m['count']} of {m['resolution']}x{m['resolution']}x{m['channels']} (H x W x C)",
                f"stored as   latent {m['dtype']}, scale {m['scale']:g} (already applied by the user; "
                f"input layout {m.get('input_layout', 'nhwc')})"]
    else:
        what = [f"images      {m['count']} at {m['resolution']}x{m['resolution']}, {m['channels']} channel(s)",
                f"stored as   {m['encoding']}" + (f" (quality {m['quality']})" if m.get("quality") else "")
                + f", transform {m['transform']}"]
    lines = [
        f"folder      {root}",
        *what,
        "labels      " + (f"{m['num_classes']} classes: " + ", ".join(classes[:12])
                          + (" ..." if len(classes) > 12 else "")
                           if m["labeled"] else "none"),
        f"shards      {len(sizes)} ({m['shards'][0]['tar']} .. {m['shards'][-1]['tar']}), "
        f"{min(counts)}..{max(counts)} samples, {min(sizes) / 1e6:.2f}..{max(sizes) / 1e6:.2f} MB, "
        f"total {m['bytes'] / 1e6:.1f} MB",
        f"skipped     {m['skipped']['count']}" + ("" if not m["skipped"]["count"] else " ("
                                                  + ", ".join(f"{r} {n}" for r,
                                                              n in m["skipped"]["by_reason"].items()) + ")"),
        f"format      version {m.get('version', 1)}, labels .{label_ext(m)}"
        + (", a CRC file per shard (a CRC-32 per member and per row)" if m.get("version", 1) >= 4
           else ", a CRC-32 per sample" if m.get("version", 1) >= 3 else ", no per-sample CRC-32s")
        + (f", written in a random order (seed {m['shuffle_seed']})" if m.get("shuffle_seed") is not None else ""),
        f"source      {m['source']}",
        f"written     {m['created']} by {m['tool']} {m['tool_version']}",
        f"command     {' '.join(m['command'])}",
    ]
    return "\n".join(lines)
