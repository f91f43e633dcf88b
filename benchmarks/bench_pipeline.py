"""Patch pipeline throughput: DALI and the torch fallback against a baseline loader built the way the
official Patch Diffusion / EDM code loads (a zip of PNGs, PIL in the Dataset, one DataLoader worker,
the crop after loading). Patches/s and images/s (each patch comes from its own image, so the two are
equal), CPU cores busy, and images/s per core, for PNG, JPEG and raw shards at each patch size and
for the default stochastic schedule. Writes JSON under benchmarks/results/, naming the machine and
the commit.

    python benchmarks/bench_pipeline.py                       # 64x64, all backends available
    python benchmarks/bench_pipeline.py --seconds 2 --images 1024 --device cuda
    python benchmarks/bench_pipeline.py --resolution 256 --formats jpeg,raw,png --backends dali,torch \
        --before results/pipeline-256-before.json             # per core against an earlier run (same machine)

--before takes the JSON of an earlier run (another commit, same machine and arguments) and adds the
ratio of images/s per core, this run over that one, for every backend, format and plan both ran.
For PNG and JPEG it also measures Pillow's decode alone: CPU time per patch with the header cut to
the patch's last row against decoding the whole image (what the torch loader saves by it).

Runs without DALI (the torch fallback and the baseline only). Images are synthetic (smooth colour
fields plus noise) so that PNG and JPEG sizes are in a natural range.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from pdiff.config import load_config
from pdiff.bench import save_json
from pdiff.coords import crop
from pdiff.distributed import resolve_device
from pdiff.schedule import StochasticSchedule
from pdiff.pipelines import build_pipeline, dali_available
from pdiff.pipelines.shards import write_shards

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids) -> float:
    """user + system time of the given processes (all their threads), from /proc."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


def synthetic_images(n: int, res: int, rng) -> np.ndarray:
    from PIL import Image
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((res, res), Image.BICUBIC), np.int16)
        out[i] = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    return out


# ---- the baseline: EDM's ImageFolderDataset over a zip, PIL per image, crop after load

class ZipPNGDataset(torch.utils.data.Dataset):
    def __init__(self, path):
        self.path, self._zip = path, None
        with zipfile.ZipFile(path) as z:
            self.names = sorted(n for n in z.namelist() if n.endswith(".png"))

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        from PIL import Image
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        with self._zip.open(self.names[i], "r") as f:
            image = np.array(Image.open(f))
        return image.transpose(2, 0, 1), 0        # HWC => CHW as EDM does


def bench_baseline(zip_path, res, patch_size, batch, seconds, device, seed):
    ds = ZipPNGDataset(zip_path)
    mul = res // patch_size                       # the official code loads batch * R/s images per step
    loader = torch.utils.data.DataLoader(ds, batch_size=batch * mul, shuffle=True, num_workers=1,
                                         drop_last=True, persistent_workers=True, prefetch_factor=2,
                                         generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)

    it = iter(loader)

    def step():
        nonlocal it
        try:
            images, _ = next(it)
        except StopIteration:                     # new epoch (the persistent worker stays)
            it = iter(loader)
            images, _ = next(it)
        images = images.to(device).float() / 127.5 - 1
        offsets = torch.randint(0, res - patch_size + 1, (images.shape[0], 2), generator=gen).to(device)
        return crop(images, offsets, patch_size).shape[0]

    step()
    workers = [w.pid for w in loader._iterator._workers]
    return measure(step, seconds, workers, device)


def measure(step, seconds, worker_pids, device):
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    pids = [os.getpid()] + list(worker_pids)
    c0, t0 = cpu_seconds(pids), time.perf_counter()
    n = steps = 0
    while time.perf_counter() - t0 < seconds or steps < 3:
        n += step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cores = (cpu_seconds(pids) - c0) / wall
    return {"images_per_s": n / wall, "patches_per_s": n / wall, "steps": steps, "seconds": wall,
            "cpu_cores_busy": cores, "images_per_s_per_core": n / wall / max(cores, 1e-9)}


def bench_pipeline(shard_dir, backend, res, sizes, probs, batch, seconds, device, workers, seed):
    cfg = load_config(None, [f"data.path={shard_dir}", f"data.resolution={res}", "data.channels=3",
                             f"data.backend={backend}", f"data.workers={workers}", f"train.batch={batch}",
                             f"train.seed={seed}", "data.prefetch=4"])
    sch = StochasticSchedule(res, batch, sizes=sizes, probs=probs, seed=seed)
    pipe = build_pipeline(cfg, sch, 0, 1, device)

    def step():
        b = next(pipe)
        return b.patches.shape[0]

    step()
    worker_pids = []
    it = getattr(pipe, "_iter", None)
    if it is not None:
        worker_pids = [w.pid for w in getattr(it, "_workers", [])]
    try:
        return measure(step, seconds, worker_pids, device)
    finally:
        pipe.close()


def decode_costs(shard_dir, res: int, schedule, samples: int, seed: int) -> dict:
    """What decoding only the crop saves with Pillow (the torch loader's decoder), apart from
    everything else a loader does: CPU seconds per patch of ``SampleSource.decode_region`` (header
    cut to the patch's last row, pipelines/regions.py) against ``decode`` + crop (the whole image),
    on ``samples`` images at crops drawn as the plan draws them, per patch size and for the schedule
    (weighted by its patches)."""
    from pdiff.pipelines.order import crop_positions
    from pdiff.pipelines.sources import open_source
    src = open_source(shard_dir)
    idx = np.arange(samples) % src.count
    out = {}
    for s in schedule.sizes:
        xy, _ = crop_positions(seed, s, samples, s, res)
        t = {}
        for how, fn in (("whole", lambda i, x, y: src.decode(i)[y:y + s, x:x + s]),
                        ("region", lambda i, x, y: src.decode_region(i, x, y, s))):
            c0 = time.process_time()
            for i, (x, y) in zip(idx, xy):
                fn(int(i), int(x), int(y))
            t[how] = (time.process_time() - c0) / samples
        out[s] = {"ms_whole": 1e3 * t["whole"], "ms_region": 1e3 * t["region"], "ratio": t["region"] / t["whole"]}
    patches = {s: q * schedule.batch_for(s) for s, q in zip(schedule.sizes, schedule.step_shares())}
    whole = sum(patches[s] * out[s]["ms_whole"] for s in patches)
    region = sum(patches[s] * out[s]["ms_region"] for s in patches)
    return {"per_patch_size": out, "schedule_ratio": region / whole}


def git_commit() -> str | None:
    import subprocess
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def compare_before(results: list[dict], before: dict, path: str) -> dict:
    """Images/s per core of this run over the earlier run's, per "backend-format plan" both measured."""
    earlier = {(r["backend"], r["format"], r["config"]): r for r in before.get("results", [])}
    ratio = {}
    for r in results:
        b = earlier.get((r["backend"], r["format"], r["config"]))
        if b and b.get("images_per_s_per_core"):
            ratio[f"{r['backend']}-{r['format']} "
                  f"{r['config']}"] = r["images_per_s_per_core"] / b["images_per_s_per_core"]
    m = before.get("machine", {})
    return {"file": str(path), "commit": m.get("commit"), "machine": m, "args": before.get("args"),
            "per_core_ratio": ratio}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2048, help="synthetic images in the dataset")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=64,
                   help="global batch of full images (a step of size s has batch*R/s patches)")
    p.add_argument("--seconds", type=float, default=3.0, help="measured time per configuration")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DALI threads / DataLoader workers")
    p.add_argument("--formats", default="png,jpeg,raw")
    p.add_argument("--backends", default="dali,torch,baseline")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pipeline-HOST-TIME.json)")
    p.add_argument("--before", default=None, help="JSON of an earlier run to compare images/s per core with")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    res = a.resolution
    sizes = [res // 4, res // 2, res]
    backends = [b for b in a.backends.split(",") if b]
    if "dali" in backends and not dali_available():
        print("DALI is not installed: running the torch fallback and the baseline only")
        backends.remove("dali")
    formats = [f for f in a.formats.split(",") if f]
    from pdiff.bench import machine as probe_machine
    machine = {**probe_machine(), "device": str(device), "commit": git_commit()}
    print(json.dumps(machine))
    rng = np.random.default_rng(a.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = synthetic_images(a.images, res, rng)
        np.savez(tmp / "images.npz", images=images)
        from PIL import Image
        with zipfile.ZipFile(tmp / "images.zip", "w", compression=zipfile.ZIP_STORED) as z:
            for i, im in enumerate(images):
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                z.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())
        shard_dirs = {}
        for fmt in formats:
            t = time.perf_counter()
            m = write_shards(tmp / "images.npz", tmp / fmt, encoding=fmt, quality=90, progress=False,
                             min_shards=8, workers=a.workers)
            shard_dirs[fmt] = tmp / fmt
            print(f"sharded {fmt}: {m['bytes'] / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")
        configs = [(f"s={s}", [s], [1.0]) for s in sizes]
        default = StochasticSchedule(res, a.batch)        # {R/4, R/2, R} with the paper's probabilities
        configs.append(("schedule", default.sizes, default.probs))
        for label, sz, pr in configs:
            if "baseline" in backends and label != "schedule":
                r = bench_baseline(tmp / "images.zip", res, sz[0], a.batch, a.seconds, device, a.seed)
                results.append({"backend": "baseline", "format": "png-zip", "config": label, **r})
                print(f"{'baseline':9} {'png-zip':6} {label:9} {r['images_per_s']:9.0f} img/s "
                      f"{r['cpu_cores_busy']:4.2f} cores {r['images_per_s_per_core']:9.0f} img/s/core")
            for backend in [b for b in backends if b != "baseline"]:
                for fmt in formats:
                    r = bench_pipeline(shard_dirs[fmt], backend, res, sz, pr, a.batch, a.seconds, device,
                                       a.workers, a.seed)
                    results.append({"backend": backend, "format": fmt, "config": label, **r})
                    print(f"{backend:9} {fmt:6} {label:9} {r['images_per_s']:9.0f} img/s "
                          f"{r['cpu_cores_busy']:4.2f} cores {r['images_per_s_per_core']:9.0f} img/s/core")
        decode = {}
        for fmt in (f for f in formats if f in ("png", "jpeg")):
            decode[fmt] = decode_costs(shard_dirs[fmt], res, default, min(a.images, 256), a.seed)
            print(f"Pillow decode per patch, header cut to the patch's last row vs the whole image, {fmt}: "
                  + ", ".join(f"s={k} {v['ratio']:.2f}" for k, v in decode[fmt]["per_patch_size"].items())
                  + f"; schedule {decode[fmt]['schedule_ratio']:.2f}")
    base = [r for r in results if r["backend"] == "baseline"]
    summary = {}
    if base:                                      # same patch sizes on both sides (no 'schedule' baseline)
        b = np.mean([r["images_per_s_per_core"] for r in base])
        sizes_measured = {r["config"] for r in base}
        for backend in ("dali", "torch"):
            for fmt in formats:
                rs = [r for r in results if r["backend"] == backend and r["format"] == fmt
                      and r["config"] in sizes_measured]
                if rs:
                    summary[f"{backend}-{fmt}"] = float(np.mean([r["images_per_s_per_core"] for r in rs]) / b)
        print("images/s per core relative to the baseline: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    payload = {"benchmark": "bench_pipeline", "machine": machine, "args": vars(a), "results": results,
               "per_core_vs_baseline": summary, "decode_cost_region_vs_whole": decode}
    if a.before:
        payload["before"] = compare_before(results, json.loads(Path(a.before).read_text()), a.before)
        print("images/s per core relative to the earlier run: "
              + ", ".join(f"{k} {v:.2f}x" for k, v
                          in payload["before"]["per_core_ratio"].items() if k.endswith("schedule")))
    out = Path(a.out) if a.out else (Path(__file__).parent / "results" /
                                     f"pipeline-{machine['host']}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out = save_json(payload, out, "pipeline")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
