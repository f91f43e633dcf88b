"""`pdiff shard`'s writer: list the inputs (inputs.py), preprocess every sample in worker processes
(preprocess.py), write tar shards with their DALI indexes, then the manifest (last). The format is
pipelines/shards/format.py.

Latents (``encoding="latent"``, ``pdiff shard X.npy OUT --format latent``): a float array (N, H, W, C)
or, with ``layout="nchw"``, (N, C, H, W), any C, already encoded by the user (e.g. Stable Diffusion VAE
latents multiplied by 0.18215). Each sample is stored as H x W x C little-endian float16 or float32
bytes (``dtype``), as given: no transform, no scaling. The choice is explicit, not made from the
array's dtype, so that float images in 0..1 are never mistaken for latents. ``latent_scale`` is
recorded in the manifest (the factor the latents already carry); nothing applies it. A sample with
a NaN or an infinity (also after a cast to float16 overflows) is a bad input like any other.

Resumable: after each complete shard, ``NAME.progress.json`` records the shard (size, sha256, the
input range it covers and a hash of the keys in it). A re-run with the same options keeps the shards
that still match and goes on from the first one that does not. Shards are written as ``*.tmp`` and
renamed, so a final name never holds a half-written file.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pdiff.pipelines.sample_source import ENCODINGS, LATENT_DTYPES
from pdiff.pipelines.shards.format import (FORMAT, FORMAT_VERSION, IMAGE_EXTS, LABEL_DTYPE, LABEL_EXT, MANIFEST,
                                           SHARD_FIELDS, ShardError, check_files, check_shard, sample_key,
                                           sample_members, shard_record, write_index)
from pdiff.pipelines.shards.inputs import Item, ShardInputError, duplicate_keys, open_inputs
from pdiff.pipelines.shards.preprocess import TRANSFORMS, init_worker, probe, process_chunk

TOOL_VERSION = "1"
LAYOUTS = ("nhwc", "nchw")


@dataclass
class Options:
    resolution: int | None = None         # None: taken from the first image (transform 'none' only)
    transform: str = "none"
    channels: int | str = "auto"          # 1, 3 or auto (the first image's: gray -> 1, else 3)
    encoding: str = "png"                 # png | jpeg | webp | raw | latent (float arrays only)
    layout: str = "nhwc"                  # latent: the array's axes, nhwc or nchw
    dtype: str = "float16"                # latent: stored as float16 or float32
    latent_scale: float = 1.0             # latent: the factor the latents already carry (recorded only)
    quality: int = 95                     # jpeg / webp (webp 100 = lossless)
    max_count: int = 10_000               # samples per shard at most
    max_bytes: int = 1 << 30              # bytes per shard at most (one sample larger than this still gets a shard)
    min_shards: int = 1                   # at least this many shards (ranks x workers)
    name: str = "data"
    on_error: str = "stop"                # stop | skip
    workers: int = 0                      # 0: all cores
    images_key: str | None = None         # .npz: the array of images (default: 'images', 'x' or the only 3/4-d array)
    labels_key: str | None = None         # .npz: the labels (default: 'labels' or 'y' if present)
    labels_file: str | None = None        # .npy source: labels in a separate .npy
    overwrite: bool = False
    progress: bool | None = None          # None: when stderr is a terminal
    command: list[str] | None = None

    def check(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ShardInputError(f"transform {self.transform!r} is not one of {', '.join(TRANSFORMS)}")
        if self.encoding not in ENCODINGS:
            raise ShardInputError(f"format {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        if self.channels not in (1, 3, "auto"):
            raise ShardInputError(f"channels must be 1, 3 or auto, got {self.channels!r}")
        if self.on_error not in ("stop", "skip"):
            raise ShardInputError(f"on-error must be stop or skip, got {self.on_error!r}")
        if self.layout not in LAYOUTS:
            raise ShardInputError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.dtype not in LATENT_DTYPES:
            raise ShardInputError(f"dtype {self.dtype!r} is not one of {', '.join(LATENT_DTYPES)}")
        if self.encoding == "latent":
            if self.transform != "none":
                raise ShardInputError(f"--transform {self.transform}: latents are stored as given (no image "
                                      f"transforms); resize the images before encoding them, or drop --transform")
            if not (isinstance(self.latent_scale, (int, float)) and math.isfinite(self.latent_scale)
                    and self.latent_scale > 0):
                raise ShardInputError(f"latent scale must be a positive number, got {self.latent_scale!r}")
        if self.transform != "none" and not self.resolution:
            raise ShardInputError(f"--transform {self.transform} needs --resolution")
        if self.resolution is not None and self.resolution < 2:
            raise ShardInputError(f"resolution must be at least 2, got {self.resolution}")
        if not 1 <= self.quality <= 100:
            raise ShardInputError(f"quality must lie in 1..100, got {self.quality}")
        if self.max_count < 1 or self.max_bytes < 1 or self.min_shards < 1:
            raise ShardInputError("max-count, max-bytes and min-shards must be positive")
        if not self.name or any(c in self.name for c in "./\\ "):
            raise ShardInputError(f"shard name {self.name!r} must be non-empty without dots, slashes or spaces")


def write_shards(source: str | Path, out_dir: str | Path, **options) -> dict:
    """Shard ``source`` into ``out_dir``; returns the manifest. See `Options` for the options."""
    opts = Options(**options)
    opts.check()
    log = _Log(opts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = open_inputs(source, opts)
    items = src.items
    if not items:
        raise ShardInputError(f"{source}: the source is empty (no files or no array rows)")
    resolution, channels = probe(src, opts)
    per_shard = min(opts.max_count, max(1, math.ceil(len(items) / opts.min_shards)))
    settings = {"resolution": resolution, "channels": channels, "transform": opts.transform,
                "encoding": opts.encoding, "quality": opts.quality if opts.encoding in ("jpeg", "webp") else None}
    if opts.encoding == "latent":
        settings.update(layout=opts.layout, dtype=opts.dtype, scale=float(opts.latent_scale))
    fingerprint = dict(settings, source=str(Path(source).resolve()), kind=src.kind, per_shard=per_shard,
                       max_bytes=opts.max_bytes, name=opts.name, n_items=len(items), tool_version=TOOL_VERSION)
    journal = _Journal(out / f"{opts.name}.progress.json", fingerprint)
    manifest_path = out / MANIFEST

    if opts.overwrite:
        _remove_outputs(out, opts.name)
    elif manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fingerprint:
            check_files(out, old, checksums=True)
            log.info(f"{out}: already complete ({old['count']} samples in {len(old['shards'])} shards)")
            return old
        raise ShardInputError(f"{out} already holds shards written with other options or another source; "
                              f"pass --overwrite to replace them, or choose another folder")

    t0 = time.time()
    done = journal.resume(out, opts.name, items, log)
    _write_samples(src, settings, opts, out, per_shard, journal, done, log)
    skipped = [s for rec in done for s in rec["skipped"]]
    manifest = _manifest(source, out_dir, opts, src, settings, done, skipped, fingerprint)
    if len(done) < opts.min_shards:
        log.warn(f"only {len(done)} shards for --min-shards {opts.min_shards} (bad inputs were skipped)")
    _atomic_json(manifest_path, manifest)
    journal.path.unlink(missing_ok=True)
    log.info(summary(manifest, time.time() - t0))
    return manifest


def _write_samples(src, settings: dict, opts: Options, out: Path, per_shard: int, journal: _Journal,
                   done: list[dict], log) -> None:
    """Preprocess the items after the resumed shards (in a pool of workers) and write them in input
    order, a shard at a time; ``done`` grows by the record of each finished shard."""
    items = src.items
    start = done[-1]["input_end"] if done else 0
    listing_bad = {pos: (path, reason) for pos, path, reason in src.bad}
    dup = duplicate_keys(items)
    written = sum(r["count"] for r in done)

    todo = list(range(start, len(items)))
    step = max(1, min(32, per_shard // 4))         # work units for the pool, small next to a shard
    chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
    workers = opts.workers or os.cpu_count() or 1
    shard: _TarShard | None = None
    shard_start, shard_skipped = start, []
    bar = log.bar(len(items), start)
    pool = None
    try:
        if workers > 1 and len(chunks) > 1:
            pool = _pool_context().Pool(workers, initializer=init_worker, initargs=(src, settings))
            results = pool.imap(process_chunk, chunks)
        else:
            init_worker(src, settings)
            results = map(process_chunk, chunks)
        for chunk_result in results:
            for pos, data, reason in chunk_result:
                bar.update(1)
                item = items[pos]
                if pos in listing_bad:
                    reason = listing_bad[pos][1]
                elif pos in dup:
                    reason = f"duplicate key: {item.key!r} also names {items[dup[pos]].path}"
                if reason is not None:
                    if opts.on_error == "stop":
                        raise ShardInputError(f"{item.path}: {reason} (fix or remove it, or pass --on-error skip "
                                              f"to skip bad inputs and count them)")
                    log.warn(f"skipped {item.path}: {reason}")
                    shard_skipped.append({"path": item.path, "reason": reason})
                    continue
                members = sample_members(opts.encoding, data, item.label)
                sizes = [len(d) for _, d in members]
                if shard is not None and (len(shard.entries) >= per_shard or shard.projected(sizes) > opts.max_bytes):
                    done.append(journal.close_shard(shard, out, items, shard_start, pos, shard_skipped, done))
                    shard, shard_start, shard_skipped = None, pos, []
                if shard is None:
                    shard = _TarShard(out / f"{opts.name}-{len(done):06d}.tar")
                shard.add(sample_key(written), members)
                written += 1
        if shard is not None:
            done.append(journal.close_shard(shard, out, items, shard_start, len(items), shard_skipped, done))
            shard = None
        elif shard_skipped and done:       # bad inputs after the last shard: account them to it
            done[-1]["skipped"].extend(shard_skipped)
            done[-1]["input_end"] = len(items)
            journal.save(done)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        if shard is not None:
            shard.abandon()
    if written == 0:
        raise ShardInputError(f"{src.root}: every input was skipped ({len(shard_skipped)} bad); nothing to write")


def _manifest(source, out_dir, opts: Options, src, settings: dict, done: list[dict], skipped: list[dict],
              fingerprint: dict) -> dict:
    latent = opts.encoding == "latent"
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION if latent else 1, "tool": "pdiff shard", "tool_version": TOOL_VERSION,
        "command": opts.command or ["write_shards", str(source), str(out_dir)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(source), "resolution": settings["resolution"], "channels": settings["channels"],
        "encoding": opts.encoding, "image_ext": IMAGE_EXTS[opts.encoding], "label_ext": LABEL_EXT,
        "label_dtype": LABEL_DTYPE.str, "quality": settings["quality"], "transform": opts.transform,
        "count": sum(r["count"] for r in done), "labeled": src.labeled, "num_classes": len(src.classes),
        "classes": src.classes,
        "shards": [{k: r[k] for k in SHARD_FIELDS} for r in done],
        "bytes": sum(r["bytes"] for r in done),
        "skipped": {"count": len(skipped), "by_reason": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
                    "items": skipped},
        "fingerprint": fingerprint,
    }
    if latent:      # samples are H x W x C (the input's layout was converted); values as given
        r, c = settings["resolution"], settings["channels"]
        manifest.update(dtype=opts.dtype, shape=[r, r, c], layout="hwc", scale=float(opts.latent_scale),
                        input_layout=opts.layout)
    return manifest


# --------------------------------------------------------------------------------------------
# Shards, the journal, resuming

class _TarShard:
    """One shard being written: a ``.tar.tmp`` and the index entries of its samples."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.entries: list[list[tuple[str, int, int, str]]] = []

    @staticmethod
    def cost(sizes) -> int:
        return sum(512 + -(-s // 512) * 512 for s in sizes)

    def projected(self, sizes) -> int:
        end = self.tar.offset + self.cost(sizes) + 2 * tarfile.BLOCKSIZE     # two zero blocks close a tar
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE            # padded to whole records

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        comps = []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            offset = self.tar.offset + tarfile.BLOCKSIZE      # ustar header = one block for short names
            self.tar.addfile(info, io.BytesIO(data))
            comps.append((ext, offset, len(data), info.name))
        self.entries.append(comps)

    def finish(self, index_path: Path) -> dict:
        """Close the tar, write the index, rename both to their final names; -> the shard's record."""
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        idx_tmp = index_path.with_name(index_path.name + ".tmp")
        write_index(idx_tmp, self.entries)
        rec = shard_record(self.tmp, idx_tmp, len(self.entries), self.final.name, index_path.name)
        os.replace(idx_tmp, index_path)
        os.replace(self.tmp, self.final)
        return rec

    def abandon(self) -> None:
        try:
            self.tar.close()
        except Exception:
            pass
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _keys_hash(items: list[Item], start: int, end: int) -> str:
    h = hashlib.sha256()
    for it in items[start:end]:
        h.update(f"{it.key}\0{it.label}\n".encode())
    return h.hexdigest()[:16]


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class _Journal:
    """``NAME.progress.json``: the fingerprint of the run and the record of every finished shard (its
    manifest entry plus the input range it covers, a hash of those keys and the inputs skipped)."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path, self.fingerprint = path, fingerprint

    def save(self, shards: list[dict]) -> None:
        _atomic_json(self.path, {"fingerprint": self.fingerprint, "shards": shards})

    def close_shard(self, shard: _TarShard, out: Path, items: list[Item], start: int, end: int,
                    skipped: list[dict], done: list[dict]) -> dict:
        rec = shard.finish(out / shard.final.name.replace(".tar", ".idx"))
        rec.update(input_start=start, input_end=end, keys=_keys_hash(items, start, end), skipped=skipped)
        self.save(done + [rec])
        return rec

    def resume(self, out: Path, name: str, items: list[Item], log) -> list[dict]:
        """Keep the journal's shards that still match (in order); remove every other shard file."""
        done: list[dict] = []
        if self.path.exists():
            journal = json.loads(self.path.read_text())
            if journal.get("fingerprint") != self.fingerprint and not journal.get("shards"):
                journal = {"shards": []}              # nothing was finished: nothing to protect
            elif journal.get("fingerprint") != self.fingerprint:
                raise ShardInputError(f"{out} holds an unfinished run with other options or another source; "
                                      f"pass --overwrite to start again, or re-run the original command")
            for rec in journal["shards"]:
                try:
                    check_shard(out, rec, checksums=True)
                    ok = rec["keys"] == _keys_hash(items, rec["input_start"], rec["input_end"])
                except ShardError:
                    ok = False
                if not ok:
                    log.warn(f"{out / rec['tar']}: does not match the progress record; writing it again from there")
                    break
                done.append(rec)
            if done:
                log.info(f"{out}: resuming after {len(done)} complete shards")
        keep = {out / r["tar"] for r in done} | {out / r["index"] for r in done}
        for p in _shard_files(out, name):
            if p not in keep:
                p.unlink()
        self.save(done)
        return done


def _shard_files(out: Path, name: str) -> list[Path]:
    return [p for p in out.glob(f"{name}-*") if p.name.endswith((".tar", ".idx", ".tmp"))]


def _remove_outputs(out: Path, name: str) -> None:
    for p in _shard_files(out, name) + [out / MANIFEST, out / f"{name}.progress.json"]:
        p.unlink(missing_ok=True)


def _pool_context():
    """fork while this process runs a single thread (the CLI): fast, and the workers share the item
    list. A process with other threads (a trainer's writers, DALI, a test runner) gets forkserver:
    a thread holding a lock at fork time would leave that lock held forever in the child."""
    methods = multiprocessing.get_all_start_methods()
    try:
        threads = len(os.listdir("/proc/self/task"))      # native threads too, on Linux
    except OSError:
        threads = threading.active_count()
    if "fork" in methods and threads == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# --------------------------------------------------------------------------------------------
# Reporting

class _Log:
    def __init__(self, opts: Options):
        self.show = sys.stderr.isatty() if opts.progress is None else opts.progress
        self.quiet = opts.progress is False

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

    def warn(self, msg: str) -> None:
        print(msg, file=sys.stderr)

    def bar(self, total: int, initial: int):
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, disable=not self.show, unit="img", desc="shard")


def summary(manifest: dict, seconds: float | None = None) -> str:
    m = manifest
    lines = [f"{m['count']} samples in {len(m['shards'])} shards, {m['bytes'] / 1e6:.1f} MB"
             + (f", {seconds:.1f} s" if seconds is not None else "")]
    sk = m["skipped"]
    if sk["count"]:
        lines.append(f"skipped {sk['count']} inputs: " + ", ".join(f"{r} {n}" for r, n in sorted(sk["by_reason"].items())))
    else:
        lines.append("skipped 0 inputs")
    return "\n".join(lines)
