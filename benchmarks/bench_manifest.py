"""What opening a large shard set costs one rank: start-up time and resident memory (peak RSS) of
``ShardSet`` (the manifest, no per-sample data) plus the first step's plan (its samples' labels, read
from their records in the shards' CRC files), for 1M, 10M and 100M samples.

The shard metadata is synthetic: a format version 4 manifest and one real CRC file per shard (records
with plausible offsets, random labels and CRC-32s, each record's own check and each file's sha256
correct), sparse tars of the listed sizes (the reader checks a shard's tar size when it first uses the
shard) and no indexes or image data: opening and planning read no tar byte. Each size is
measured in a fresh process (RSS is per process), as rank 0 of ``--world`` ranks: resident memory
before (the imports: numpy, and torch through pdiff.bench as in a trainer) and after, and the peak. For comparison,
version 3's manifest of the same set (a CRC-32 per sample as 8 hex digits) is written and parsed (the
JSON and the CRC-32s, what every rank did at start before the indexes and labels), where it fits
(``--v3-max``).

    python benchmarks/bench_manifest.py [--sizes 1000000,10000000,100000000] [--keep DIR]

Goal (issue 22): 100M samples in 100k shards open in < 10 s and < 1 GB per rank. Writes JSON naming
the machine under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pdiff.bench import machine, machine_name, save_json
from pdiff.pipelines.order import SamplePlan
from pdiff.pipelines.shards import ShardSet
from pdiff.pipelines.shards.format import (CRC_EXT, FORMAT, FORMAT_VERSION, crc_header, crc_record_dtype,
                                           load_manifest, parse_crcs)
from pdiff.schedule import StochasticSchedule

PER_SHARD = 1000                 # samples per shard: 100M samples in 100k shards
RESOLUTION = 64
SAMPLE_BYTES = 6000              # a 64x64 PNG, about


def _records(count: int, rng: np.random.Generator) -> np.ndarray:
    table = np.zeros(count, crc_record_dtype(0))
    step = 512 + -(-SAMPLE_BYTES // 512) * 512 + 1024          # header + data + label member, in tar blocks
    table["data_offset"] = 512 + step * np.arange(count, dtype=np.uint64)
    table["data_size"] = SAMPLE_BYTES
    table["label_offset"] = table["data_offset"] + step - 512
    table["label_size"] = 1
    table["label"] = rng.integers(0, 10, count)
    table["data_crc"], table["label_crc"] = rng.integers(0, 2 ** 32, (2, count), dtype=np.uint32)
    return table


def _crc_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, np.uint32(0xEDB88320) ^ (t >> 1), t >> 1).astype(np.uint32)
    return t


_TABLE = _crc_table()


def crc32_each(rows: np.ndarray) -> np.ndarray:
    """zlib.crc32 of each row of an (n, k) uint8 array, vectorized over the rows (writing 100M records
    one zlib call at a time takes most of an hour on 2 cores)."""
    crc = np.full(len(rows), 0xFFFFFFFF, np.uint32)
    for j in range(rows.shape[1]):
        crc = _TABLE[(crc ^ rows[:, j]) & 0xFF] ^ (crc >> 8)
    return crc ^ np.uint32(0xFFFFFFFF)


def _shard_tables(count: int, rng: np.random.Generator, chunk_shards: int = 1000):
    """(shard number, its records with their checks) for every shard, a chunk of shards at a time."""
    shards = -(-count // PER_SHARD)
    for a in range(0, shards, chunk_shards):
        b = min(shards, a + chunk_shards)
        sizes = [min(PER_SHARD, count - s * PER_SHARD) for s in range(a, b)]
        tables = [_records(n, rng) for n in sizes]
        flat = np.concatenate(tables)
        size = flat.dtype.itemsize
        flat["check"] = crc32_each(flat.view(np.uint8).reshape(len(flat), size)[:, :size - 4])
        start = 0
        for s, n in zip(range(a, b), sizes):
            yield s, flat[start:start + n]
            start += n


def _sparse_tar(path: Path, size: int) -> None:
    """A tar of the manifest's size holding no data (a sparse file: no blocks on disk). The reader checks
    a shard's tar size when it first opens its CRC file; it reads no tar byte to open or plan."""
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(size)


def build(root: Path, count: int, v3: bool, seed: int = 0) -> dict:
    """Version 4 metadata of ``count`` samples in ``root`` (and, ``v3``, version 3's manifest beside it)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    shards, crc_text = [], []
    t = time.perf_counter()
    for s, table in _shard_tables(count, rng):
        n = len(table)
        name = f"data-{s:06d}"
        data = crc_header(n, 0) + table.tobytes()
        (root / f"{name}.{CRC_EXT}").write_bytes(data)
        tar_bytes = int(table["label_offset"][-1]) + 512 + 1024
        _sparse_tar(root / f"{name}.tar", tar_bytes)
        fake = hashlib.sha256(name.encode()).hexdigest()          # no tar or index is written
        shards.append({"tar": f"{name}.tar", "index": f"{name}.idx", "count": n, "bytes": tar_bytes, "sha256": fake,
                       "index_bytes": 60 * n, "index_sha256": fake, "crc": f"{name}.{CRC_EXT}",
                       "crc_bytes": len(data), "crc_sha256": hashlib.sha256(data).hexdigest()})
        if v3:
            crc_text.append(np.asarray(table["data_crc"], ">u4").tobytes().hex())
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "encoding": "png", "image_ext": "png", "label_ext": "cls",
                "resolution": RESOLUTION, "channels": 3, "count": count, "labeled": True, "num_classes": 10,
                "classes": [str(c) for c in range(10)], "shards": shards,
                "bytes": sum(r["bytes"] for r in shards)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if v3:
        for rec, text in zip(shards, crc_text):
            for key in ("crc", "crc_bytes", "crc_sha256"):
                del rec[key]
            rec["crc32"] = text
        (root / "v3").mkdir()
        (root / "v3" / "manifest.json").write_text(json.dumps(dict(manifest, version=3), indent=1))
    return {"write_s": round(time.perf_counter() - t, 1),
            "manifest_mb": round((root / "manifest.json").stat().st_size / 1e6, 1),
            "crc_files_mb": round(sum(r.get("crc_bytes", 0) for r in shards) / 1e6, 1) if not v3 else
            round(sum((root / f"{r['tar'][:-4]}.{CRC_EXT}").stat().st_size for r in shards) / 1e6, 1),
            "v3_manifest_mb": round((root / "v3" / "manifest.json").stat().st_size / 1e6, 1) if v3 else None}


def _rss_mb() -> float:
    """Resident memory now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mb() -> float:
    """This process's peak resident memory, MB: VmHWM (getrusage's ru_maxrss survives exec, so a child
    would report its parent's peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure(root: Path, world: int, batch: int) -> dict:
    """In this (fresh) process: open the set and plan rank 0's first step."""
    before = _rss_mb()
    t0 = time.perf_counter()
    source = ShardSet(root)
    t1 = time.perf_counter()
    schedule = StochasticSchedule(RESOLUTION, batch, sizes=[16, 32, 64], probs=[0.5, 0.3, 0.2], seed=0)
    plan = SamplePlan(source.count, source.plan_labels, schedule, 0, 0, world)
    step = plan.step(0)
    t2 = time.perf_counter()
    return {"open_s": round(t1 - t0, 3), "first_plan_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
            "rss_before_mb": round(before, 1), "rss_after_mb": round(_rss_mb(), 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "step_samples": len(step.indices),
            "shards_touched": len({source.shard_of(int(i))[0] for i in step.indices})}


def measure_v3(root: Path) -> dict:
    """Version 3's start: the manifest and every shard's CRC-32s parsed."""
    before = _rss_mb()
    t0 = time.perf_counter()
    m = load_manifest(root)
    crcs = [parse_crcs(rec, root) for rec in m["shards"]]
    t1 = time.perf_counter()
    return {"parse_s": round(t1 - t0, 3), "rss_before_mb": round(before, 1), "rss_after_mb": round(_rss_mb(), 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "crcs": int(sum(len(c) for c in crcs))}


def _child(*args: str) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000000,10000000,100000000", help="sample counts, comma-separated")
    p.add_argument("--world", type=int, default=8, help="ranks (the plan is rank 0's)")
    p.add_argument("--batch", type=int, default=512, help="global batch (train.batch)")
    p.add_argument("--v3-max", type=int, default=10_000_000, help="largest size also written as version 3")
    p.add_argument("--keep", help="build the metadata in this folder and keep it (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="with --keep: measure the metadata already there")
    p.add_argument("--out", default="benchmarks/results", help="JSON file or folder")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--measure-v3", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.world, args.batch)))
        return
    if args.measure_v3:
        print(json.dumps(measure_v3(Path(args.measure_v3))))
        return
    info = machine()
    print(f"bench_manifest on {machine_name(info)}: rank 0 of {args.world}, global batch {args.batch}", flush=True)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-manifest-"))
    results = []
    try:
        for count in (int(c) for c in args.sizes.split(",")):
            root = base / f"n{count}"
            if args.reuse and (root / "manifest.json").exists():
                built = {"reused": str(root)}
                for rec in json.loads((root / "manifest.json").read_text())["shards"]:
                    _sparse_tar(root / rec["tar"], rec["bytes"])
            else:
                shutil.rmtree(root, ignore_errors=True)
                built = build(root, count, v3=count <= args.v3_max)
            os.sync()                    # the files written are on disk: no writeback in the measured window
            row = {"samples": count, "shards": -(-count // PER_SHARD), **built, "load_avg": os.getloadavg(),
                   "v4": _child("--measure", str(root), "--world", str(args.world), "--batch", str(args.batch))}
            if (root / "v3").exists():
                row["v3"] = _child("--measure-v3", str(root / "v3"))
            results.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(root)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    big = [r for r in results if r["samples"] >= 100_000_000]
    payload = {"benchmark": "bench_manifest", "machine": info, "note": "a 2-core VM shared with other jobs: "
               "load_avg (1, 5, 15 min) is recorded with each size; times scale with it",
               "world": args.world, "batch": args.batch,
               "per_shard": PER_SHARD, "encoding": "png (no row CRC-32s)", "results": results,
               "goal": "100M samples in 100k shards: open + first plan < 10 s and < 1 GB peak RSS per rank",
               "goal_met": (big[0]["v4"]["total_s"] < 10 and big[0]["v4"]["peak_rss_mb"] < 1024) if big else None}
    print(f"wrote {save_json(payload, args.out, 'manifest')}")


if __name__ == "__main__":
    main()
