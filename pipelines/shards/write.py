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

Posterior latents (``encode_vae=VAE``, ``pdiff shard SRC OUT --encode-vae VAE``): images, transformed to
R x R as for pixel shards, are encoded by diffusers' AutoencoderKL (a local folder or a hub id) in
batches on the GPU where there is one (encode_vae.py), and each sample stores the posterior's mean and
std, (R/f) x (R/f) x 2C (8 channels for the SD VAE), so that training draws a fresh latent from it
every time. The manifest records the VAE (source, sha256 of its weights), its scale and shift. The
samples are written like any others: in the seeded order below, with .cls labels and CRC-32s.

Order: the inputs are written in a seeded random order (``shuffle_seed``, `write_order`; None keeps
the source order), so that a reader streaming the shards in order sees mixed classes, not shard 0
holding class 0 only. Each shard's CRC file holds a CRC-32 of each member and of each row of its samples
(format.py).

Resumable: after each complete shard, ``NAME.progress.json`` records the shard (size, sha256, the
input range it covers and a hash of the keys in it), and before a shard is begun, its name. A re-run
with the same options keeps the shards that still match and goes on from the first one that does
not. Shards are written as ``*.tmp`` and renamed, so a final name never holds a half-written file.
Only files this journal (or, with ``overwrite``, the old manifest) names are ever deleted: a file of
the user's in OUT that merely looks like a shard is left alone, and one in the way of a shard about
to be written stops the run with its name.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

from pdiff.pipelines.shards.format import (CRC_EXT, CRC_MAGIC, FORMAT, FORMAT_VERSION, IMAGE_EXTS, KEY_DIGITS,
                                           LABEL_EXT, MANIFEST, SHARD_FIELDS, ShardError, check_files, check_shard,
                                           crc_file_bytes, read_json, sample_key, sample_members, sample_record,
                                           shard_record, write_index)
from pdiff.pipelines.shards.inputs import Inputs, Item, ShardInputError, ShardUsageError, duplicate_keys, open_inputs
from pdiff.pipelines.shards.options import Options, write_order
from pdiff.pipelines.shards.preprocess import init_worker, probe, process_chunk
from pdiff.progress import Progress
from pdiff.runlock import HEARTBEAT_THREAD, STALE_AFTER_S, RunLock, RunLocked, describe

TOOL_VERSION = "3"        # 2: format version 3 (.cls labels, per-sample CRC-32s, seeded order); 3: version 4
_SHARD_FILE = re.compile(r"[^/\\]+-[0-9]{6}\.(tar|idx|crc)")   # NAME-000123.tar / .idx / .crc, no folder
LOCK_FILE = ".pdiff-shard.lock"   # one writer per OUT (hidden: the folder is a dataset that gets copied)
SHOW_IGNORED = 10         # ignored files named in the summary (the manifest keeps up to MAX_IGNORED)
MAX_IGNORED = 1000


def write_shards(source: str | Path, out_dir: str | Path, on_shard=None, **options) -> dict:
    """Shard ``source`` into ``out_dir``; returns the manifest. See `Options` for the options. One
    writer at a time per ``out_dir``: a second is refused (`OutputLocked`) naming the first.
    ``on_shard(out_dir, record)`` is called as each shard is finished (pipelines/remote.py uploads it)."""
    opts = Options(**options)
    try:
        opts.check()
    except ShardInputError as e:        # options that cannot work: a usage error
        raise ShardUsageError(str(e)) from None
    out = Path(out_dir)
    _check_source_and_out(source, out)
    created = not out.exists()
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
    with _writing(out / LOCK_FILE):
        lock = _OutLock(out).acquire()
    try:
        return _write_locked(source, out_dir, opts, on_shard)
    finally:
        if created:
            _remove_if_only_lock(out)
        lock.release()


def _write_locked(source: str | Path, out_dir: str | Path, opts: Options, on_shard=None) -> dict:
    log = _Log(opts)
    out = Path(out_dir)
    vae = encoder = None
    if opts.encode_vae:        # images in, as for pixel shards: RGB, through the transform
        opts.channels = 3
        vae = _load_vae(opts)
    src, resolution, channels = _inputs_in_write_order(source, opts)
    items = src.items
    per_shard = min(opts.max_count, max(1, math.ceil(len(items) / opts.min_shards)))
    settings = {"resolution": resolution, "channels": channels, "transform": opts.transform,
                "encoding": opts.encoding, "quality": opts.quality if opts.encoding in ("jpeg", "webp") else None,
                "auto_channels": opts.channels == "auto" and src.kind != "array"}
    if vae is not None:
        from pdiff.pipelines.shards.encode_vae import PosteriorEncoder   # torch: --encode-vae only
        if resolution % vae.downsample:
            raise ShardInputError(f"{source}: images of {resolution}x{resolution} do not divide into the VAE's "
                                  f"{vae.downsample}x{vae.downsample} latent pixels; pick a --resolution that "
                                  f"is a multiple of {vae.downsample}")
        encoder = PosteriorEncoder(vae, resolution, opts.dtype, opts.vae_batch)
        settings.update(dtype=opts.dtype, vae=vae.record)
    elif opts.encoding == "latent":
        settings.update(layout=opts.layout, dtype=opts.dtype, scale=float(opts.latent_scale))
    if opts.encode_features:
        from pdiff.pipelines.shards.encode_features import FeatureEncoder, load_feature_encoder  # torch: only here
        encoder = FeatureEncoder(load_feature_encoder(opts.encode_features, opts.device), opts.encode_features,
                                 resolution, channels, opts.encoding, opts.features_batch)
        settings.update(features=encoder.record)
    fingerprint = dict(settings, source=str(Path(source).resolve()), kind=src.kind, per_shard=per_shard,
                       max_bytes=opts.max_bytes, name=opts.name, n_items=len(items), shuffle_seed=opts.shuffle_seed,
                       tool_version=TOOL_VERSION)
    journal = _Journal(out / f"{opts.name}.progress.json", fingerprint, on_shard)
    manifest_path = out / MANIFEST

    if opts.overwrite:
        _remove_outputs(out, opts.name)
    elif manifest_path.exists():
        try:
            old = read_json(manifest_path, "shard manifest")
        except ShardError as e:
            raise ShardInputError(f"{e}; pass --overwrite to replace the shards in {out}, or choose another "
                                  f"folder") from None
        if old.get("fingerprint") == fingerprint:
            check_files(out, old, checksums=True)
            log.info(f"{out}: already complete ({old['count']} samples in {len(old['shards'])} shards)")
            return old
        raise ShardInputError(f"{out} already holds shards written with other options or another source; "
                              f"pass --overwrite to replace them, or choose another folder")

    t0 = time.time()
    done = journal.resume(out, items, log)
    resumed_at = done[-1]["input_end"] if done else 0
    _write_samples(src, settings, opts, out, per_shard, journal, done, log, encoder)
    skipped = [s for rec in done for s in rec["skipped"]]
    manifest = _manifest(source, out_dir, opts, src, settings, done, skipped, fingerprint)
    if len(done) < opts.min_shards:
        log.warn(f"only {len(done)} shards for --min-shards {opts.min_shards} (bad inputs were skipped)")
    _atomic_json(manifest_path, manifest)
    journal.path.unlink(missing_ok=True)
    log.info(summary(manifest, time.time() - t0) + _source_notes(src, resolution, resumed_at))
    return manifest


class OutputLocked(RunLocked):
    """Another `pdiff shard` is writing into the same output folder."""


class _OutLock(RunLock):
    """The run folder's lock (runlock.py: a kernel lock and a record naming the holder, with its
    heartbeat) held on OUT/LOCK_FILE by its writer, with a refusal worded for `pdiff shard`."""

    def __init__(self, out: Path):
        super().__init__(out)
        self.path = out / LOCK_FILE

    def _refuse(self, holder: dict) -> OutputLocked:
        return OutputLocked(
            f"{self.path.parent} is being written by another `pdiff shard`: {describe(holder)}. Let it finish, "
            f"or stop it first (the shards it completed are kept, and its command resumes after them), or choose "
            f"another OUT. (The lock in {self.path} lapses by itself when its holder dies: at once on the same "
            f"host, after {STALE_AFTER_S:.0f} s without a heartbeat from another.)")


def _check_source_and_out(source: str | Path, out: Path) -> None:
    """Before OUT is created: SRC exists, and OUT is not SRC or a folder inside it (its shards would be
    mixed with the images, and the next run over SRC would list them as its own inputs)."""
    src = Path(source)
    if not src.exists():
        raise ShardInputError(f"{src}: no such file or folder")
    if src.is_dir():
        s, o = src.resolve(), out.resolve()
        if o == s or s in o.parents:
            where = "is the source folder" if o == s else f"lies inside the source folder {src}"
            raise ShardUsageError(f"{out}: the output folder {where}; choose an OUT outside it, e.g. "
                                  f"{s.parent / (s.name + '-shards')}")


def _remove_if_only_lock(out: Path) -> None:
    """Remove OUT, created by this run, when it holds nothing but its lock (the run stopped before it
    wrote anything), so that a mistake leaves no empty folder behind. Done while the lock is held: a
    writer that comes now makes a new lock file, and the folder stays."""
    try:
        if os.listdir(out) == [LOCK_FILE]:
            (out / LOCK_FILE).unlink()
            out.rmdir()
    except OSError:
        pass


def _noting_upscaled(results, src: Inputs):
    """The workers' results, passed on as they come, with the images the transform enlarged (each chunk's
    ``upscaled``) noted in ``src.upscaled`` for the summary."""
    for chunk in results:
        src.upscaled += getattr(chunk, "upscaled", [])
        yield chunk


def _source_notes(src: Inputs, resolution: int, resumed_at: int) -> str:
    """Summary lines about the inputs: images in nested class folders, and images the transform enlarged."""
    lines = []
    if src.nested:
        folders = sorted({n.rsplit("/", 1)[0] for n in src.nested})
        lines.append(f"{len(src.nested)} image(s) in {len(folders)} sub-folder(s) of class folders ("
                     f"{', '.join(folders[:SHOW_IGNORED])}{' ...' if len(folders) > SHOW_IGNORED else ''}) are "
                     f"labelled by their top folder; move a sub-folder to the top to make it a class of its own")
    bad = {pos for pos, _, _ in src.bad}
    upscaled = [(pos, size) for pos, size in src.upscaled if pos not in bad]
    if upscaled:
        pos, size = min(upscaled, key=lambda u: min(map(int, u[1].split("x"))))
        part = f" of the {len(src.items) - resumed_at} written by this run" if resumed_at else ""
        lines.append(f"upscaled {len(upscaled)} image(s){part} smaller than {resolution}x{resolution} "
                     f"(the smallest: {src.items[pos].path}, {size})")
    return "".join("\n" + line for line in lines)


def _inputs_in_write_order(source: str | Path, opts: Options) -> tuple[Inputs, int, int]:
    """The inputs, their resolution and channel count, in the order they are written; the bad inputs
    known before decoding (duplicate keys: the later one in the source's order) marked."""
    src = open_inputs(source, opts)
    items = src.items
    if not items:
        raise ShardInputError(f"{source}: the source is empty (no image files or no array rows)"
                              + (f"; {_ignored_text(src.ignored)}" if src.ignored else ""))
    resolution, channels = probe(src, opts)
    listed_bad = {pos for pos, _, _ in src.bad}
    src.bad += [(pos, items[pos].path, f"duplicate key: {items[pos].key!r} also names {items[first].path}")
                for pos, first in duplicate_keys(items).items() if pos not in listed_bad]
    src.reorder(write_order(len(items), opts.shuffle_seed))
    return src, resolution, channels


def _load_vae(opts: Options):
    from pdiff.vae import VAEError, load_vae     # torch and diffusers: --encode-vae only
    try:
        return load_vae(opts.encode_vae, opts.device)
    except VAEError as e:
        raise ShardInputError(str(e)) from None


def _write_samples(src, settings: dict, opts: Options, out: Path, per_shard: int, journal: _Journal,
                   done: list[dict], log, encoder=None) -> None:
    """Preprocess the items after the resumed shards (in a pool of workers), encode them with the VAE
    when ``encoder`` is given, and write them in input order, a shard at a time; ``done`` grows by the
    record of each finished shard."""
    items = src.items
    start = done[-1]["input_end"] if done else 0
    listing_bad = {pos: (path, reason) for pos, path, reason in src.bad}
    written = sum(r["count"] for r in done)

    todo = list(range(start, len(items)))
    step = max(1, min(32, per_shard // 4))         # work units for the pool, small next to a shard
    chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
    workers = opts.workers or os.cpu_count() or 1
    layout = _sample_rows(settings), bool(settings.get("features"))     # the CRC records' rows and .feat fields
    shard: _TarShard | None = None
    shard_start, shard_skipped = start, []
    progress = log.progress(len(items), start)
    pool = None
    try:
        if workers > 1 and len(chunks) > 1:
            pool = pool_context().Pool(workers, initializer=init_worker, initargs=(src, settings))
            results = pool.imap(process_chunk, chunks)
        else:
            init_worker(src, settings)
            results = map(process_chunk, chunks)
        results = _noting_upscaled(results, src)
        if encoder is not None:
            results = encoder.stream(results)
        for chunk_result in results:
            for pos, data, reason in chunk_result:
                progress.update(1)
                item = items[pos]
                if pos in listing_bad:
                    reason = listing_bad[pos][1]
                if reason is not None:
                    if opts.on_error == "stop":
                        raise ShardInputError(f"{item.path}: {reason} (fix or remove it, or pass --on-error skip "
                                              f"to skip bad inputs and count them)")
                    log.warn(f"skipped {item.path}: {reason}")
                    shard_skipped.append({"path": item.path, "reason": reason})
                    continue
                features = None
                if isinstance(data, tuple):      # --encode-features: (sample bytes, its feature grid's bytes)
                    data, features = data
                members = sample_members(opts.encoding, data, item.label, features)
                sizes = [len(d) for _, d in members]
                if shard is not None and (len(shard.entries) >= per_shard or shard.projected(sizes) > opts.max_bytes):
                    done.append(journal.close_shard(shard, out, items, shard_start, pos, shard_skipped, done))
                    shard, shard_start, shard_skipped = None, pos, []
                if shard is None:
                    shard = journal.open_shard(out, opts.name, len(done), done, layout)
                shard.add(sample_key(written), members, item.label)
                written += 1
        if shard is not None:
            done.append(journal.close_shard(shard, out, items, shard_start, len(items), shard_skipped, done))
            shard = None
        elif shard_skipped and done:       # bad inputs after the last shard: account them to it
            done[-1]["skipped"].extend(shard_skipped)
            done[-1]["input_end"] = len(items)
            journal.save(done)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
        if shard is not None:
            shard.abandon()
    if written == 0:
        raise ShardInputError(f"{src.root}: every input was skipped ({len(shard_skipped)} bad); nothing to write")


def _sample_rows(settings: dict) -> int:
    """Rows of a stored sample that get a CRC-32 each: R for raw and latent samples (a posterior's R is
    the image's over the VAE's downsampling), none for encoded images."""
    if settings["encoding"] not in ("raw", "latent"):
        return 0
    vae = settings.get("vae")
    return settings["resolution"] // vae["downsample"] if vae else settings["resolution"]


def _manifest(source, out_dir, opts: Options, src, settings: dict, done: list[dict], skipped: list[dict],
              fingerprint: dict) -> dict:
    latent = opts.encoding == "latent"
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "tool": "pdiff shard", "tool_version": TOOL_VERSION,
        "command": opts.command or ["write_shards", str(source), str(out_dir)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(source), "resolution": settings["resolution"], "channels": settings["channels"],
        "encoding": opts.encoding, "image_ext": IMAGE_EXTS[opts.encoding], "label_ext": LABEL_EXT,
        "quality": settings["quality"], "transform": opts.transform, "shuffle_seed": opts.shuffle_seed,
        "count": sum(r["count"] for r in done), "labeled": src.labeled, "num_classes": len(src.classes),
        "classes": src.classes,
        "shards": [{k: r[k] for k in SHARD_FIELDS} for r in done],
        "bytes": sum(r["bytes"] for r in done),
        "skipped": {"count": len(skipped), "by_reason": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
                    "items": skipped},
        "ignored": {"count": len(src.ignored), "files": src.ignored[:MAX_IGNORED]},
        "fingerprint": fingerprint,
    }
    if settings.get("features"):     # the stored feature grids' encoder and shape (format.py)
        manifest["features"] = settings["features"]
    if settings.get("vae"):      # the posterior of the images (R x R) in the VAE's latent space
        vae = settings["vae"]
        r, c = settings["resolution"] // vae["downsample"], 2 * vae["latent_channels"]
        manifest.update(resolution=r, channels=c, dtype=opts.dtype, shape=[r, r, c],
                        layout="hwc", stores="posterior", scale=vae["scale"], shift=vae["shift"], vae=vae,
                        image_resolution=settings["resolution"], image_channels=settings["channels"])
    elif latent:      # samples are H x W x C (the input's layout was converted); values as given
        r, c = settings["resolution"], settings["channels"]
        manifest.update(dtype=opts.dtype, shape=[r, r, c], layout="hwc", scale=float(opts.latent_scale),
                        shift=0.0, stores="latents", input_layout=opts.layout)
    return manifest


# --------------------------------------------------------------------------------------------
# Shards, the journal, resuming

@contextlib.contextmanager
def _writing(path: Path):
    """A failed write (disk full, no permission, read-only folder) names the file and what to do."""
    try:
        yield
    except OSError as e:
        raise ShardError(f"{path}: cannot write: {e.strerror or e}; free some space or fix the folder (or choose "
                         f"another OUT), then re-run the same command: it resumes after the last complete "
                         f"shard") from None


class _TarShard:
    """One shard being written: a ``.tar.tmp``, the index entries and the CRC records of its samples
    (``rows`` row CRC-32s each; with ``features`` the .feat member's place and CRC-32)."""

    def __init__(self, final: Path, rows: int, features: bool = False):
        self.final, self.rows, self.features = final, rows, features
        self.tmp = final.with_name(final.name + ".tmp")
        with _writing(self.tmp):
            self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.entries: list[list[tuple[str, int, int, str]]] = []
        self.records: list[tuple] = []

    @staticmethod
    def cost(sizes) -> int:
        return sum(512 + -(-s // 512) * 512 for s in sizes)

    def projected(self, sizes) -> int:
        end = self.tar.offset + self.cost(sizes) + 2 * tarfile.BLOCKSIZE     # two zero blocks close a tar
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE            # padded to whole records

    def add(self, key: str, members: list[tuple[str, bytes]], label: int) -> None:
        comps = []
        with _writing(self.tmp):
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                offset = self.tar.offset + tarfile.BLOCKSIZE      # ustar header = one block for short names
                self.tar.addfile(info, io.BytesIO(data))
                comps.append((ext, offset, len(data), info.name))
        self.entries.append(comps)
        (_, data), (_, label_bytes), *extra = members
        feature = (comps[2][1], extra[0][1]) if self.features else None
        self.records.append(sample_record(self.rows, comps[0][1], data, comps[1][1], label_bytes, label, feature))

    def finish(self, index_path: Path) -> dict:
        """Close the tar, write the index and the CRC file, rename the three to their final names; -> the
        shard's record."""
        with _writing(self.tmp):
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        idx_tmp = index_path.with_name(index_path.name + ".tmp")
        with _writing(idx_tmp):
            write_index(idx_tmp, self.entries)
        crc_path = self.final.with_suffix("." + CRC_EXT)
        crc_tmp = crc_path.with_name(crc_path.name + ".tmp")
        with _writing(crc_tmp):
            crc_tmp.write_bytes(crc_file_bytes(self.records, self.rows, self.features))
        rec = shard_record(self.tmp, idx_tmp, crc_tmp, len(self.records),
                           (self.final.name, index_path.name, crc_path.name))
        with _writing(index_path):
            os.replace(crc_tmp, crc_path)
            os.replace(idx_tmp, index_path)
            os.replace(self.tmp, self.final)
        return rec

    def abandon(self) -> None:
        try:
            self.tar.close()
        except Exception:
            pass
        try:
            self.file.close()
        except OSError:             # the disk that was full stays full: the temporary goes anyway
            pass
        self.tmp.unlink(missing_ok=True)


def _keys_hash(items: list[Item], start: int, end: int) -> str:
    h = hashlib.sha256()
    for it in items[start:end]:        # surrogateescape: a file name that is not UTF-8 hashes by its bytes
        h.update(f"{it.key}\0{it.label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _writing(tmp):
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


def _shard_files(out: Path, tar_name) -> list[Path]:
    """A shard's files, temporaries included, when ``tar_name`` is a shard's file name (a name read from
    a JSON file on disk is checked: nothing outside OUT is ever touched)."""
    if not isinstance(tar_name, str) or not _SHARD_FILE.fullmatch(tar_name):
        return []
    tar = out / tar_name
    idx, crc = tar.with_suffix(".idx"), tar.with_suffix("." + CRC_EXT)
    return [tar, idx, crc] + [p.with_name(p.name + ".tmp") for p in (tar, idx, crc)]


def _listed_files(out: Path, data: dict) -> list[Path]:
    """The shard files a manifest or a journal names (finished shards and the one being written)."""
    records = data.get("shards") if isinstance(data.get("shards"), list) else []
    names = [rec.get("tar") for rec in records if isinstance(rec, dict)] + [data.get("writing")]
    return [p for name in names for p in _shard_files(out, name)]


class _Journal:
    """``NAME.progress.json``: the fingerprint of the run, the record of every finished shard (its
    manifest entry plus the input range it covers, a hash of those keys and the inputs skipped) and
    the name of the shard being written."""

    def __init__(self, path: Path, fingerprint: dict, on_shard=None):
        self.path, self.fingerprint, self.on_shard = path, fingerprint, on_shard

    def save(self, shards: list[dict], writing: str | None = None) -> None:
        _atomic_json(self.path, {"fingerprint": self.fingerprint, "shards": shards, "writing": writing})

    def open_shard(self, out: Path, name: str, number: int, done: list[dict], layout: tuple[int, bool]) -> _TarShard:
        """Begin shard ``number``: its name goes into the journal first, so that a run killed while
        writing it knows the temporary files are its own."""
        final = out / f"{name}-{number:06d}.tar"
        for p in _shard_files(out, final.name):
            if p.exists():
                raise ShardInputError(f"{p} is in the way: it was not written by this `pdiff shard` run (its "
                                      f"journal {self.path.name} does not list it), so it is left alone; move it "
                                      f"away, or choose another --name or output folder")
        self.save(done, writing=final.name)
        return _TarShard(final, *layout)

    def close_shard(self, shard: _TarShard, out: Path, items: list[Item], start: int, end: int,
                    skipped: list[dict], done: list[dict]) -> dict:
        rec = shard.finish(out / shard.final.name.replace(".tar", ".idx"))
        rec.update(input_start=start, input_end=end, keys=_keys_hash(items, start, end), skipped=skipped)
        self.save(done + [rec])
        if self.on_shard is not None:
            self.on_shard(out, rec)
        return rec

    def resume(self, out: Path, items: list[Item], log) -> list[dict]:
        """Keep the journal's shards that still match (in order); remove the other files it names."""
        done: list[dict] = []
        remove: list[Path] = []
        if self.path.exists():
            try:
                journal = read_json(self.path, "progress journal of an unfinished run")
            except ShardError as e:
                raise ShardInputError(f"{e}; pass --overwrite to start again (only the shard files it named "
                                      f"would be kept safe, so check {out} afterwards)") from None
            remove = _listed_files(out, journal)
            if journal.get("fingerprint") != self.fingerprint and journal.get("shards"):
                raise ShardInputError(f"{out} holds an unfinished run with other options or another source; "
                                      f"pass --overwrite to start again, or re-run the original command")
            for rec in journal.get("shards") or []:
                try:
                    check_shard(out, rec, checksums=True)
                    ok = rec["keys"] == _keys_hash(items, rec["input_start"], rec["input_end"])
                except (ShardError, KeyError, TypeError):
                    ok = False
                if not ok:
                    log.warn(f"{out / rec['tar']}: does not match the progress record; writing it again from there")
                    break
                done.append(rec)
            if done:
                log.info(f"{out}: resuming after {len(done)} complete shards")
        keep = {out / r[key] for r in done for key in ("tar", "index", "crc")}
        for p in remove:
            if p not in keep:
                p.unlink(missing_ok=True)
        self.save(done)
        return done


def _remove_outputs(out: Path, name: str) -> None:
    """--overwrite: the shards the old manifest and journal name, and those two files. Where one is
    damaged (it names nothing), the ``NAME-NNNNNN`` files whose first bytes are a shard's or an
    index's go too; anything else left in the way stops the run by name."""
    remove = []
    for path, what in ((out / MANIFEST, "shard manifest"), (out / f"{name}.progress.json", "progress journal")):
        if path.exists():
            try:
                remove += _listed_files(out, read_json(path, what))
            except ShardError:
                remove += [p for p in out.glob(f"{name}-*") if _looks_written_here(out, p)]
            remove.append(path)
    for p in remove:
        p.unlink(missing_ok=True)


def _looks_written_here(out: Path, path: Path) -> bool:
    """A shard file name whose content begins as this writer's do: a tar whose first member is a sample
    (``KKKKKKKKK.ext``), a DALI index, or a CRC file."""
    base = path.name[:-4] if path.name.endswith(".tmp") else path.name
    if not _shard_files(out, base):
        return False
    with open(path, "rb") as f:
        head = f.read(512)
    if base.endswith(".idx"):
        return head.startswith(b"v1.2 ")
    if base.endswith("." + CRC_EXT):
        return head.startswith(CRC_MAGIC)
    return re.fullmatch(rb"[0-9]{%d}\.[a-z]+" % KEY_DIGITS, head[:100].rstrip(b"\0")) is not None


def pool_context():
    """fork while this process runs a single thread (the CLI): fast, and the workers share the item
    list. A process with other threads (a trainer's writers, DALI, a test runner) gets forkserver:
    a thread holding a lock at fork time would leave that lock held forever in the child."""
    methods = multiprocessing.get_all_start_methods()
    try:
        threads = len(os.listdir("/proc/self/task"))      # native threads too, on Linux
    except OSError:
        threads = threading.active_count()
    # The output lock's heartbeat (runlock.py) is safe to fork beside: it holds no lock a child could
    # need (it waits on its own Event or rewrites its record), and the child never touches it.
    threads -= sum(t.name == HEARTBEAT_THREAD for t in threading.enumerate())
    if "fork" in methods and threads == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# --------------------------------------------------------------------------------------------
# Reporting

class _Log:
    def __init__(self, opts: Options):
        self.quiet = opts.progress is False

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

    def warn(self, msg: str) -> None:
        print(msg, file=sys.stderr)

    def progress(self, total: int, initial: int) -> Progress:
        return Progress(total, "shard", "img", initial=initial, enabled=not self.quiet)


def _ignored_text(files: list[str], count: int | None = None) -> str:
    count = len(files) if count is None else count
    names = ", ".join(files[:SHOW_IGNORED]) + (f" and {count - SHOW_IGNORED} more" if count > SHOW_IGNORED else "")
    return f"ignored {count} file(s) that are not images: {names}"


def summary(manifest: dict, seconds: float | None = None) -> str:
    m = manifest
    lines = [f"{m['count']} samples in {len(m['shards'])} shards, {m['bytes'] / 1e6:.1f} MB"
             + (f", {seconds:.1f} s" if seconds is not None else "")]
    sk = m["skipped"]
    if sk["count"]:
        lines.append(f"skipped {sk['count']} inputs: " + ", ".join(f"{r} {n}" for r,
                                                                   n in sorted(sk["by_reason"].items())))
    else:
        lines.append("skipped 0 inputs")
    ignored = m.get("ignored") or {"count": 0}
    if ignored["count"]:
        lines.append(_ignored_text(ignored["files"], ignored["count"]))
    return "\n".join(lines)
