"""Data wait of training from object storage (pipelines/remote.py) against the same shards on local disk.

A stand-in training step (a sleep of --step-ms) follows every batch; data wait is the time spent in
next(pipeline), as a share of the run (with raw shards and data.workers=0 the reading itself happens
there, so the local folder's share is not 0). The store is moto's S3 server on 127.0.0.1 in another
process (its throughput is this machine's, not a cloud's), reached through s3fs as any S3 endpoint
would be. The cache starts empty and holds the dataset (data.cache_limit_gb=0), so the first steps
wait for the shards they read (every step draws from a shuffle of the whole set); the share is
reported for the whole run, for the steps after the first, and for the second half (every shard
fetched by then). Writes JSON naming the machine under benchmarks/results/.

    python benchmarks/bench_remote.py                  # 4096 raw 64x64 images in 32 shards, 300 steps
    python benchmarks/bench_remote.py --quick          # checks that it runs
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pdiff.bench import machine, machine_name, save_json, synthetic_shards
from pdiff.config import load_config
from pdiff.pipelines import build_pipeline
from pdiff.schedule import PatchSchedule


def run(path: str, cache: Path, args) -> dict:
    cfg = load_config("tiny", [f"data.path={path}", f"data.resolution={args.resolution}", "data.channels=3",
                               "data.backend=torch", "data.workers=0", f"train.batch={args.batch}",
                               f"data.cache_dir={cache}", "patch.mode=stochastic"])
    pipe = build_pipeline(cfg, PatchSchedule.from_config(cfg))
    waits = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        next(pipe)
        waits.append(time.perf_counter() - t)
        time.sleep(args.step_ms / 1000)
    total = time.perf_counter() - t0
    pipe.close()
    pipe.source.close()
    after = sum(waits[1:]) / (total - waits[0])
    half = waits[len(waits) // 2:]
    return {"data_wait_share_second_half": round(sum(half) / (sum(half) + len(half) * args.step_ms / 1000), 4),
            "seconds": round(total, 3), "data_wait_share": round(sum(waits) / total, 4),
            "data_wait_share_after_first_step": round(after, 4), "first_step_wait_s": round(waits[0], 3),
            "longest_wait_after_first_s": round(max(waits[1:]), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=4096)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--step-ms", type=float, default=50.0, help="the stand-in training step")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.quick:
        args.count, args.shards, args.steps, args.resolution, args.batch = 256, 8, 20, 32, 16
    import fsspec  # optional: object storage
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        for _ in range(300):                # the server's start
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            local = synthetic_shards(tmp / "shards", args.count, args.resolution, 3, "raw", min_shards=args.shards)
            fs = fsspec.filesystem("s3")
            fs.mkdir("bench")
            for p in sorted(local.iterdir()):
                fs.put_file(str(p), f"s3://bench/shards/{p.name}")
            results = {"local": run(str(local), tmp / "cache-local", args),
                       "s3": run("s3://bench/shards", tmp / "cache-s3", args)}
            size = sum(p.stat().st_size for p in local.glob("*.tar"))
    finally:
        server.terminate()
        server.wait()
    info = machine()
    payload = {"benchmark": "remote", "machine": info, "settings": vars(args), "dataset_bytes": size,
               "store": "moto S3 server on 127.0.0.1 (another process)", "results": results}
    print(f"on {machine_name(info)}: {args.count} raw {args.resolution}x{args.resolution} images in "
          f"{args.shards} shards ({size / 2 ** 20:.1f} MiB), {args.steps} steps of {args.step_ms:g} ms")
    for where, r in results.items():
        print(f"  {where:5s}: data wait {100 * r['data_wait_share']:.2f}% of the run, "
              f"{100 * r['data_wait_share_after_first_step']:.2f}% after the first step, "
              f"{100 * r['data_wait_share_second_half']:.2f}% in the second half "
              f"(first step waited {r['first_step_wait_s']:.2f} s)")
    if not args.quick:
        print("saved", save_json(payload, args.out, "remote"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    np.seterr(all="ignore")
    main()
