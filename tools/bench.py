"""`pdiff bench data|step|train|sample|compare --config FILE [key=value ...]`: throughput on this
machine, with this config and these shards, before a cluster is committed to a run.

    pdiff bench data   --config my.yaml                   # pipeline patches/s per patch size and for the schedule
    pdiff bench step   --config my.yaml --compile         # training step images/s per patch size, the schedule's cost
    pdiff bench train  --config my.yaml --compare         # the real training loop: images/s, data-wait share,
                                                          # full-image EDM (p = 1) next to the patch schedule
    pdiff bench sample --config my.yaml                   # sampler images/s at sample.steps
    pdiff bench compare --config my.yaml                  # = train --compare

Warm-up (pipeline start, compilation) is excluded and figures are medians over repeats. Each command
prints a short table and writes a JSON file naming the machine (CPU model, cores, GPU and its memory,
library versions). ``--synthetic N`` writes N random images as shards in a temporary folder and uses
them when the config has no data (or to leave the user's data out of it). ``--quick`` runs a few
steps only (seconds on a CPU with a small network): a check that everything runs, not a measurement.

The measuring code lives here as functions; benchmarks/bench_step.py and benchmarks/bench_train.py
call them.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import torch

KINDS = ("data", "step", "train", "sample", "compare")

# Overrides that turn a config into its full-image EDM twin (p = 1) and into the paper's default
# patch schedule (p = 0.5 over {R/4, R/2, R}).
FULL_OVERRIDES = ["patch.mode=full"]
PAPER_SCHEDULE_OVERRIDES = ["patch.mode=stochastic", "patch.real_p=0.5", "patch.sizes=[]", "patch.probs=[]"]
NEVER = 10 ** 15      # an image interval that a benchmark run never reaches


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (too few log intervals, no data, ...)."""


class BenchInterrupted(RuntimeError):
    """SIGTERM/SIGUSR1 arrived during a training run: stop the remaining runs."""


# ------------------------------------------------------------------------------------------
# The machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return str(getattr(mod, "__version__", None))
    except Exception:       # missing or broken installs (DALI without its CUDA libs) count as absent
        return None


def machine() -> dict:
    """What the figures were measured on."""
    info = {"host": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": None, "gpu_memory_gb": None, "gpu_count": 0,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "triton": _version("triton"), "numpy": _version("numpy"),
                         "pillow": _version("PIL"), "dali": None}}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2 ** 30, 1), gpu_count=torch.cuda.device_count())
    from pdiff.pipelines import dali_available
    if dali_available():
        info["versions"]["dali"] = _version("nvidia.dali")
    return info


def machine_name(info: dict) -> str:
    return info.get("gpu") or f"{info.get('cpu')} ({info.get('cores')} cores)"


# ------------------------------------------------------------------------------------------
# Timing and the arithmetic (pure functions: tests check them with a fake clock)

def timed(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
          clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of ``fn``; ``warmup`` calls first, not counted."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t = clock()
        fn()
        if sync:
            sync()
        out.append(clock() - t)
    return out


def per_size_figures(patches: int, seconds: list[float]) -> dict:
    """One patch size's training-step figures from its timed steps (each patch counts as an image)."""
    t = statistics.median(seconds)
    return {"patches": patches, "ms_per_step": 1e3 * t, "images_per_s": patches / t,
            "ms_per_image": 1e3 * t / patches, "repeats": len(seconds),
            "ms_per_step_min": 1e3 * min(seconds), "ms_per_step_max": 1e3 * max(seconds)}


def schedule_figures(schedule, per_size: dict[int, dict]) -> dict:
    """The schedule's cost from per-patch-size step costs: cost per image relative to full images
    (PatchSchedule.expected_cost_ratio on seconds per patch), its images/s, and ms per step."""
    r = schedule.resolution
    if r not in per_size:
        raise BenchError(f"the full size {r} was not measured; it is the reference for the cost ratio")
    ratio = schedule.expected_cost_ratio({s: v["ms_per_image"] for s, v in per_size.items()})
    ms_img = ratio * per_size[r]["ms_per_image"]
    if schedule.mode == "progressive":     # probabilities are shares of images: steps follow from them
        steps_per_image = sum(p / schedule.batch_for(s) for s, p in zip(schedule.sizes, schedule.probs))
        ms_step = ms_img / steps_per_image
    else:
        ms_step = sum(p * per_size[s]["ms_per_step"] for s, p in zip(schedule.sizes, schedule.probs))
    return {"mode": schedule.mode, "sizes": list(schedule.sizes), "probs": list(schedule.probs),
            "cost_per_image_vs_full": ratio, "speedup_per_image_vs_full": 1 / ratio,
            "ms_per_image": ms_img, "images_per_s": 1e3 / ms_img, "ms_per_step": ms_step,
            "full_images_per_s": per_size[r]["images_per_s"]}


def time_sizes(make_step: Callable[[int], tuple[Callable[[], object], int]], sizes: Iterable[int],
               repeats: int, warmup: int = 1, sync=None, clock=time.perf_counter) -> dict[int, dict]:
    """``make_step(size) -> (step, patches)``; each step timed ``repeats`` times after ``warmup``."""
    out = {}
    for s in sorted(set(sizes)):
        step, patches = make_step(s)
        out[s] = per_size_figures(patches, timed(step, repeats, warmup, sync, clock))
        del step
    return out


def compare_figures(full: dict, patch: dict) -> dict:
    """Full-image EDM (p = 1) against the patch schedule, from two measured runs: cost per image
    of the schedule relative to full images (< 1: cheaper) and its inverse."""
    ratio = patch["ms_per_image"] / full["ms_per_image"]
    out = {"cost_per_image_vs_full": ratio, "speedup_per_image_vs_full": 1 / ratio,
           "full_ms_per_image": full["ms_per_image"], "patch_ms_per_image": patch["ms_per_image"],
           "full_images_per_s": full["images_per_s"], "patch_images_per_s": patch["images_per_s"],
           "cost_per_image_vs_full_expected_mix": None}
    if patch.get("expected_mix"):
        # the schedule's probabilities instead of the sizes this run drew (see expected_mix)
        out["cost_per_image_vs_full_expected_mix"] = patch["expected_mix"]["ms_per_image"] / full["ms_per_image"]
    return out


def expected_mix(intervals: list[dict], schedule) -> dict | None:
    """Per-step seconds of each patch size, fitted by least squares to the intervals' lengths and
    their step counts per size, and the cost per image with the schedule's own probabilities in
    place of the mix a short run happened to draw. None when the fit is not determined (a size never
    drawn, too few intervals) or not meaningful (a non-positive fitted cost, progressive schedules)."""
    import numpy as np
    sizes = list(schedule.sizes)
    if schedule.mode == "progressive" or not intervals:
        return None
    a = np.array([[i["sizes"].get(s, 0) for s in sizes] for i in intervals], dtype=float)
    y = np.array([i["seconds"] for i in intervals], dtype=float)
    if np.linalg.matrix_rank(a) < len(sizes):
        return None
    tau = np.linalg.lstsq(a, y, rcond=None)[0]
    if (tau <= 0).any():
        return None
    probs = np.array(schedule.probs)
    images = np.array([schedule.batch_for(s) for s in sizes], dtype=float)
    ms_img = 1e3 * float(probs @ tau) / float(probs @ images)
    return {"ms_per_image": ms_img, "images_per_s": 1e3 / ms_img,
            "ms_per_step_by_patch_size": {s: 1e3 * float(t) for s, t in zip(sizes, tau)}}


def summarize_log(rows: list[dict], schedule, skip: int = 1, start_images: int = 0) -> dict:
    """Figures of a training run from its log.jsonl rows (pdiff.train writes one per log interval).

    The first ``skip`` intervals (pipeline start, first steps) are left out. Each interval's length
    is its images over its images/s; its steps are recounted from the schedule (a pure function of
    images seen), so ms per step needs nothing the trainer does not log."""
    intervals, prev = [], start_images
    for row in rows:
        if "images_per_s" not in row:
            continue
        a, b = prev, int(row["images_seen"])
        prev = b
        seconds = (b - a) / row["images_per_s"]
        sizes: dict[int, int] = {}
        for st in schedule.steps(a, until=b):
            sizes[st.patch_size] = sizes.get(st.patch_size, 0) + 1
        intervals.append({"images": b - a, "seconds": seconds, "steps": sum(sizes.values()), "sizes": sizes,
                          "images_per_s": row["images_per_s"], "data_wait_share": row.get("data_wait_share", 0.0),
                          "peak_memory_gb": row.get("peak_memory_gb"),
                          "recompiles_after_warmup": row.get("recompiles_after_warmup"), "loss": row.get("loss")})
    measured = intervals[skip:]
    if not measured:
        raise BenchError(f"the run logged {len(intervals)} interval(s) and the first {skip} are warm-up: "
                         f"nothing left to measure (raise --intervals, or the wall-clock budget)")
    images = sum(i["images"] for i in measured)
    seconds = sum(i["seconds"] for i in measured)
    steps = sum(i["steps"] for i in measured)
    by_size: dict[int, int] = {}
    for i in measured:
        for s, n in i["sizes"].items():
            by_size[s] = by_size.get(s, 0) + n
    peaks = [i["peak_memory_gb"] for i in intervals if i["peak_memory_gb"] is not None]
    recompiles = [i["recompiles_after_warmup"] for i in intervals if i["recompiles_after_warmup"] is not None]
    return {
        "images_per_s": images / seconds, "ms_per_image": 1e3 * seconds / images,
        "images_per_s_median": statistics.median(i["images_per_s"] for i in measured),
        "ms_per_step": 1e3 * seconds / max(steps, 1),
        "data_wait_share": sum(i["data_wait_share"] * i["seconds"] for i in measured) / seconds,
        "data_wait_share_median": statistics.median(i["data_wait_share"] for i in measured),
        "intervals": len(measured), "warmup_intervals": len(intervals) - len(measured),
        "warmup_seconds": sum(i["seconds"] for i in intervals[:skip]),
        "images": images, "steps": steps, "seconds": seconds,
        "steps_by_patch_size": {s: by_size[s] for s in sorted(by_size)},
        "peak_memory_gb": max(peaks) if peaks else None,
        "recompiles_after_warmup": max(recompiles) if recompiles else None,
        "final_loss": measured[-1]["loss"],
        "expected_mix": expected_mix(measured, schedule),
    }


# ------------------------------------------------------------------------------------------
# Configs and data

def variant(cfg, overrides: list[str]):
    """A copy of ``cfg`` with dotted overrides applied (checked like the command line's)."""
    from pdiff.config import apply_overrides, from_dict, to_dict, validate
    out = from_dict(apply_overrides(to_dict(cfg), list(overrides)), "<bench>")
    validate(out, "<bench>")
    return out


def synthetic_shards(out_dir: str | Path, count: int, resolution: int, channels: int = 3,
                     encoding: str = "png", seed: int = 0, min_shards: int = 4, workers: int = 1) -> Path:
    """``count`` random images (smooth colour fields plus noise, so PNG/JPEG sizes are natural)
    written as pdiff shards in ``out_dir``."""
    import numpy as np
    from PIL import Image
    from pdiff.pipelines.shards import write_shards
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = np.empty((count, resolution, resolution, channels), np.uint8)
    for i in range(count):
        low = rng.integers(0, 256, (6, 6, channels), dtype=np.uint8)
        im = Image.fromarray(low[..., 0] if channels == 1 else low).resize((resolution, resolution), Image.BICUBIC)
        smooth = np.asarray(im, np.int16).reshape(resolution, resolution, channels)
        images[i] = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    np.savez(out_dir / "images.npz", images=images[..., 0] if channels == 1 else images)
    write_shards(out_dir / "images.npz", out_dir / "shards", encoding=encoding, progress=False,
                 min_shards=min_shards, workers=workers, quality=90)
    return out_dir / "shards"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: no CUDA device on this machine")
    return dev


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------
# bench data: the patch pipeline over the config's shards

def bench_data(cfg, device: torch.device, steps: int = 20, repeats: int = 3, warmup_steps: int = 3,
               clock=time.perf_counter) -> dict:
    """Patches/s and images/s of the pipeline (pipelines.build_pipeline on cfg.data.path) for each
    patch size alone and for the config's schedule: ``warmup_steps`` steps first, then ``repeats``
    runs of ``steps`` steps each; medians. Every patch is cut from its own image (decoded whole)
    and counts as one image seen, so images/s (images seen, as the trainer counts them) equals
    patches/s on one process; both are reported under their own names."""
    from pdiff.schedule import PatchSchedule
    from pdiff.train import make_schedule
    from pdiff.pipelines import build_pipeline
    sched = make_schedule(cfg)
    r, batch = cfg.data.resolution, cfg.train.batch
    sync = _sync(device)
    plans = [(f"s={s}", s, PatchSchedule(r, batch, "stochastic", sizes=[s], probs=[1.0], seed=cfg.train.seed))
             for s in sorted(set(sched.sizes) | {r})]
    plans.append(("schedule", None, sched))
    results, backend = {}, None
    for label, size, schedule in plans:
        pipe = build_pipeline(cfg, schedule, 0, 1, device)
        backend = pipe.backend
        runs = []
        try:
            for _ in range(warmup_steps):
                next(pipe)
            if sync:
                sync()
            for _ in range(repeats):
                t0, n, counted = clock(), 0, 0
                for _ in range(steps):
                    b = next(pipe)
                    n += b.patches.shape[0]
                    counted += schedule.batch_for(b.patch_size)
                if sync:
                    sync()
                dt = clock() - t0
                runs.append((n / dt, counted / dt, steps / dt, 1e3 * dt / steps))
        finally:
            pipe.close()
        med = [statistics.median(x) for x in zip(*runs)]
        results[label] = {"patch_size": size, "patches_per_step": None if size is None else schedule.batch_for(size),
                          "patches_per_s": med[0], "images_per_s": med[1], "steps_per_s": med[2],
                          "ms_per_step": med[3], "steps": steps, "repeats": repeats}
    return {"backend": backend, "workers": cfg.data.workers, "batch": batch, "resolution": r,
            "schedule": {"mode": sched.mode, "sizes": sched.sizes, "probs": sched.probs}, "results": results}


# ------------------------------------------------------------------------------------------
# bench step: forward + backward + Adam per patch size on synthetic patches

def bench_step(cfg, device: torch.device, compile_: bool = False, precision: str | None = None,
               kernels: str = "auto", repeats: int = 3, warmup: int | None = None, clock=time.perf_counter) -> dict:
    """Training-step cost at each patch size of the config's schedule (and R) with its batch
    multiplier (B full images -> B R/s patches), PatchLoss forward + backward + Adam, and the
    schedule's cost per image against full images, measured and from the FLOP model."""
    from pdiff.kernels import resolve_backend
    from pdiff.coords import random_offsets
    from pdiff.loss import sample_sigma
    from pdiff.model import build_model, count_parameters
    from pdiff.step import PatchLoss, net_dtype, resolve_precision
    from pdiff.train import make_schedule
    from pdiff.tools.info import describe
    r, c, label_dim = cfg.data.resolution, cfg.data.channels, cfg.network.label_dim
    precision = precision or resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device).train()
    if cfg.train.channels_last:   # --set train.channels_last=true measures the other layout
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=device.type == "cuda")  # as the trainer
    backend = resolve_backend(kernels, device)
    loss_module = PatchLoss(model, r, backend, net_dtype(precision), cfg.train.channels_last)
    if compile_:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        loss_module.use_network(torch.compile(model.net, dynamic=False))
    sched = make_schedule(cfg)

    def make_step(s: int):
        n = sched.batch_for(s)
        y = torch.rand(n, c, s, s, device=device) * 2 - 1
        off = random_offsets(n, s, r, device=device)
        sigma = sample_sigma(n, device=device)
        noise = torch.randn_like(y) if backend == "torch" else None
        labels = None
        if label_dim:
            labels = torch.nn.functional.one_hot(torch.randint(0, label_dim, (n,), device=device), label_dim).float()

        def step():
            loss = loss_module(y, off, sigma, noise, labels, 1, 2)
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, n

    per_size = time_sizes(make_step, set(sched.sizes) | {r}, repeats, warmup if warmup is not None else
                          (2 if compile_ else 1), _sync(device), clock)
    figures = schedule_figures(sched, per_size)
    flops = describe(cfg)
    return {"config": cfg.name, "arch": cfg.network.arch, "resolution": r, "channels": c,
            "parameters": count_parameters(model), "batch_full_images": cfg.train.batch, "compile": compile_,
            "precision": precision, "kernels": backend, "device": str(device),
            "per_patch_size": per_size, "schedule": figures,
            "flop_model": {"cost_per_image_vs_full": flops["cost_per_image_vs_full"],
                           "train_gflops_per_image": flops["train_gflops_per_image"]},
            # the names bench_step.py has always written
            "schedule_cost_per_image_vs_full": {"measured": figures["cost_per_image_vs_full"],
                                                "flop_model": flops["cost_per_image_vs_full"]},
            "speedup_per_image_vs_full": figures["speedup_per_image_vs_full"]}


# ------------------------------------------------------------------------------------------
# bench train: the real training loop (pdiff.train.train) with the real pipeline

def measuring_overrides(run_dir: str | Path, interval_images: int, intervals: int, warmup_intervals: int = 1,
                        wall_budget_s: float = 0.0) -> list[str]:
    """Overrides that make a training run a measurement: a fresh run folder, a log row every
    ``interval_images``, warm-up plus measured intervals, and no checkpoints, snapshots or sample
    grids on the way (the run's end still writes one of each, after its last log row)."""
    return [f"train.run_dir={run_dir}", f"train.duration_images={(intervals + warmup_intervals) * interval_images}",
            f"train.log_every_images={interval_images}", f"train.ckpt_every_images={NEVER}",
            f"train.snapshot_every_images={NEVER}", f"train.sample_every_images={NEVER}",
            "train.keep_checkpoints=1", f"train.wall_budget_s={wall_budget_s}", "sample.steps=2"]


def prewarm_kernels(cfg, device: torch.device, force: bool = False) -> float:
    """Eager runs on CUDA: one forward + backward of the training step at every patch size and batch
    of the schedule (on a throwaway copy of the network), so that Triton's JIT and the cuBLAS/cuDNN
    set-up for each shape happen before the run instead of inside a measured interval. (Compiled
    runs get this from the trainer's own warm-up.) Returns the seconds it took."""
    if not force and (device.type != "cuda" or cfg.train.compile):
        return 0.0
    from pdiff.kernels import resolve_backend
    from pdiff.model import build_model
    from pdiff.step import PatchLoss, net_dtype, resolve_precision
    from pdiff.train import make_schedule, warm_up
    t = time.perf_counter()
    model = build_model(cfg).to(device)
    lm = PatchLoss(model, cfg.data.resolution, resolve_backend(cfg.train.kernels, device),
                   net_dtype(resolve_precision(cfg.train.precision, device)), cfg.train.channels_last)
    warm_up(lm, make_schedule(cfg), cfg, 1, device)
    del lm, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def run_training(cfg, device: torch.device) -> list[dict]:
    """One run of pdiff.train.train in this process; its log rows. A SIGTERM/SIGUSR1 during the run
    stops the run cleanly (the trainer's handler) and then raises BenchInterrupted here."""
    from pdiff.train import StopSignal, train
    try:
        prewarm_kernels(cfg, device)
    except Exception as e:            # only a warm-up: the run itself says what is wrong, if anything
        print(f"pdiff bench: kernel warm-up skipped ({type(e).__name__}: {e})", file=sys.stderr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stop = StopSignal()                # the trainer installs it for the run and restores the old handlers
    try:
        rc = train(cfg, "cpu" if device.type == "cpu" else "auto", stop=stop)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rc != 0:
        raise BenchError(f"pdiff train returned {rc} for {cfg.train.run_dir}")
    log = Path(cfg.train.run_dir) / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if stop.requested:
        raise BenchInterrupted(f"stop signal during the run in {cfg.train.run_dir}")
    return rows


def default_interval_images(cfg, steps: int = 3) -> int:
    """Images per log interval: ``steps`` steps of the schedule's smallest patch size (its steps
    carry the most images), so that every interval holds several steps whatever sizes are drawn:
    4 * steps full-image steps for {R/4, R/2, R}."""
    from pdiff.train import make_schedule
    return cfg.train.batch * max(make_schedule(cfg).multiplier(s) for s in make_schedule(cfg).sizes) * steps


def bench_train(cfg, device: torch.device, work_dir: str | Path, intervals: int = 10, interval_images: int | None = None,
                wall_budget_s: float = 0.0, label: str = "run", runner=run_training) -> dict:
    """End-to-end figures of ``cfg`` (its schedule) with the real pipeline: images/s, ms per image
    and per step, data-wait share, peak memory, recompiles, from the log intervals after the first."""
    from pdiff.train import make_schedule
    if not cfg.data.path:
        raise BenchError("data.path is empty: point it at shards from `pdiff shard`, or pass --synthetic N")
    interval_images = interval_images or default_interval_images(cfg)
    run_cfg = variant(cfg, measuring_overrides(Path(work_dir) / label, interval_images, intervals,
                                               wall_budget_s=wall_budget_s))
    t = time.perf_counter()
    rows = runner(run_cfg, device)
    out = summarize_log(rows, make_schedule(run_cfg))
    sched = make_schedule(run_cfg)
    out.update(wall_seconds=time.perf_counter() - t, interval_images=interval_images, compile=run_cfg.train.compile,
               schedule={"mode": sched.mode, "sizes": sched.sizes, "probs": sched.probs})
    return out


def compare_train(cfg, device: torch.device, work_dir: str | Path, intervals: int = 10,
                  interval_images: int | None = None, wall_budget_s: float = 0.0,
                  patch_overrides: list[str] = (), runner=run_training, on_result=None) -> dict:
    """Full-image EDM (p = 1) and the patch schedule (``cfg`` with ``patch_overrides``) on the same
    network, global batch and data, one after the other in this process, and the cost ratio per
    image from the two measured runs. ``on_result(name, figures)`` is called after each run."""
    interval_images = interval_images or default_interval_images(variant(cfg, list(patch_overrides)))
    runs = {}
    for name, extra in (("full", FULL_OVERRIDES), ("patch", list(patch_overrides))):
        runs[name] = bench_train(variant(cfg, extra), device, work_dir, intervals, interval_images,
                                 wall_budget_s, label=name, runner=runner)
        if on_result:
            on_result(name, runs[name])
    return {"full": runs["full"], "patch": runs["patch"], "comparison": compare_figures(runs["full"], runs["patch"])}


# ------------------------------------------------------------------------------------------
# bench sample

@torch.no_grad()
def bench_sample(cfg, device: torch.device, batch: int = 16, repeats: int = 3, clock=time.perf_counter) -> dict:
    """Images/s of the sampler (pdiff.sampler.sample_images, Heun at cfg.sample.steps, fp32) on the
    config's network with random weights (throughput does not depend on them); one warm-up batch
    of 2 steps first."""
    from pdiff.model import build_model, count_parameters, one_hot_labels
    from pdiff.sampler import SeedNoise, sample_images
    r, c, s = cfg.data.resolution, cfg.data.channels, cfg.sample
    canvas = s.canvas or r
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device).eval().requires_grad_(False)
    seeds = list(range(batch))
    rng = SeedNoise(seeds, device)
    noise = rng.randn((batch, c, canvas, canvas))
    labels = None
    if cfg.network.label_dim:
        labels = one_hot_labels(torch.tensor(seeds, device=device) % cfg.network.label_dim, cfg.network.label_dim)

    def run(steps):
        return lambda: sample_images(model, noise, r, labels, steps, s.sigma_min, s.sigma_max, s.rho, s.guidance,
                                     s.s_churn, s.s_min, s.s_max, s.s_noise, randn_like=rng.randn_like)
    run(2)()
    times = timed(run(s.steps), repeats, warmup=0, sync=_sync(device), clock=clock)
    t = statistics.median(times)
    evals = (2 * s.steps - 1) * (2 if (labels is not None and s.guidance != 1) else 1)
    return {"config": cfg.name, "parameters": count_parameters(model), "resolution": r, "canvas": canvas,
            "steps": s.steps, "network_evaluations": evals, "batch": batch, "repeats": repeats,
            "seconds_per_batch": t, "images_per_s": batch / t, "ms_per_image": 1e3 * t / batch,
            "precision": "fp32", "device": str(device)}


# ------------------------------------------------------------------------------------------
# Output

def save_json(payload: dict, out: str | Path | None, kind: str) -> Path:
    """``out``: a .json path, a folder (a timestamped name inside it), or None (the current folder)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = f"bench-{kind}-{platform.node() or 'host'}-{stamp}.json"
    path = Path(out) if out else Path(name)
    if out and not str(out).endswith(".json"):
        path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(x):
    if isinstance(x, torch.device):
        return str(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x)}")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_data(res: dict) -> None:
    print(f"pipeline ({res['backend']}, {res['workers']} workers), batch {res['batch']} full images")
    print(f"{'plan':>9} {'patches/step':>12} {'patches/s':>11} {'images/s':>10} {'ms/step':>9}")
    for label, v in res["results"].items():
        pps = "-" if v["patches_per_step"] is None else v["patches_per_step"]
        print(f"{label:>9} {pps!s:>12} {v['patches_per_s']:>11.0f} {v['images_per_s']:>10.0f} {v['ms_per_step']:>9.2f}")


def print_step(res: dict) -> None:
    print(f"{res['config']} ({res['parameters']:,} params), {res['precision']}, compile={res['compile']}, "
          f"kernels {res['kernels']}, batch {res['batch_full_images']} full images")
    print(f"{'patch':>6} {'patches':>8} {'ms/step':>10} {'images/s':>10} {'ms/image':>9}")
    for s, v in res["per_patch_size"].items():
        print(f"{s:>6} {v['patches']:>8} {v['ms_per_step']:>10.2f} {v['images_per_s']:>10.1f} {v['ms_per_image']:>9.3f}")
    sc = res["schedule"]
    print(f"{'sched':>6} {'':>8} {sc['ms_per_step']:>10.2f} {sc['images_per_s']:>10.1f} {sc['ms_per_image']:>9.3f}")
    print(f"schedule ({sc['mode']}) cost per image vs full images: measured {sc['cost_per_image_vs_full']:.3f} "
          f"(speed-up {sc['speedup_per_image_vs_full']:.2f}x), FLOP model {res['flop_model']['cost_per_image_vs_full']:.3f}")


def print_train(res: dict) -> None:
    runs = {k: v for k, v in res.items() if k in ("full", "patch", "run")}
    print(f"{'run':>6} {'images/s':>10} {'ms/image':>9} {'ms/step':>9} {'data wait':>10} {'peak GB':>8} {'intervals':>9}")
    for name, v in runs.items():
        peak = "-" if v["peak_memory_gb"] is None else f"{v['peak_memory_gb']:.2f}"
        print(f"{name:>6} {v['images_per_s']:>10.1f} {v['ms_per_image']:>9.3f} {v['ms_per_step']:>9.2f} "
              f"{_pct(v['data_wait_share']):>10} {peak:>8} {v['intervals']:>9}")
    if "comparison" in res:
        c = res["comparison"]
        print(f"patch schedule vs full-image EDM, measured end to end: cost per image {c['cost_per_image_vs_full']:.3f} "
              f"of full images (speed-up {c['speedup_per_image_vs_full']:.2f}x)")
        if c.get("cost_per_image_vs_full_expected_mix"):
            steps = res["patch"]["steps_by_patch_size"]
            print(f"  with the schedule's probabilities in place of the sizes drawn ({steps}): "
                  f"{c['cost_per_image_vs_full_expected_mix']:.3f} of full images")


def print_sample(res: dict) -> None:
    print(f"{res['config']} ({res['parameters']:,} params), {res['canvas']}x{res['canvas']}, {res['steps']} steps "
          f"({res['network_evaluations']} network evaluations), batch {res['batch']}: "
          f"{res['images_per_s']:.2f} images/s ({res['seconds_per_batch']:.2f} s per batch)")


# ------------------------------------------------------------------------------------------
# CLI

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdiff bench", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--config", required=True, help="YAML file or preset name")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch=64 data.workers=8")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    ap.add_argument("--out", default=None, help="JSON file, or a folder for a timestamped one (default: the current folder)")
    ap.add_argument("--quick", action="store_true", help="a few steps only: checks that it runs (seconds on a CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (data, step, sample); medians are reported")
    ap.add_argument("--steps", type=int, default=None, help="data: pipeline steps per repeat")
    ap.add_argument("--compile", action="store_true",
                    help="step: torch.compile the network; train: force train.compile=true (else the config's "
                         "train.compile decides; train.compile=false forces eager)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="step: default train.precision")
    ap.add_argument("--kernels", choices=["auto", "triton", "torch"], default=None, help="step: default train.kernels")
    ap.add_argument("--compare", action="store_true",
                    help="train: also run full-image EDM (patch.mode=full) and print the cost ratio per image")
    ap.add_argument("--intervals", type=int, default=None, help="train: measured log intervals (after one warm-up interval)")
    ap.add_argument("--interval-images", type=int, default=None, help="train: images per log interval (default: 3 steps of the smallest patch size)")
    ap.add_argument("--wall-budget", type=float, default=0.0, help="train: seconds per run at most (0 = none)")
    ap.add_argument("--batch", type=int, default=None, help="sample: images per batch (default min(train.batch, 16))")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="data/train: use N random images written as shards in a temporary folder")
    ap.add_argument("--encoding", default="png", help="--synthetic shards' encoding (png, jpeg, webp, raw)")
    return ap


def run(kind: str, cfg, args, device: torch.device, work_dir: Path) -> dict:
    quick = args.quick
    if kind == "data":
        res = bench_data(cfg, device, steps=args.steps or (3 if quick else 20), repeats=args.repeats or (1 if quick else 3),
                         warmup_steps=1 if quick else 3)
        print_data(res)
    elif kind == "step":
        res = bench_step(cfg, device, args.compile,
                         args.precision, args.kernels or cfg.train.kernels, repeats=args.repeats or (1 if quick else 5))
        print_step(res)
    elif kind in ("train", "compare"):
        if device.type == "cuda" and (device.index or 0) != int(os.environ.get("LOCAL_RANK", "0")):
            raise BenchError(f"--device {device}: the trainer runs on cuda:LOCAL_RANK; pick the GPU with "
                             f"CUDA_VISIBLE_DEVICES instead")
        if args.compile:
            cfg = variant(cfg, ["train.compile=true"])
        kw = dict(intervals=args.intervals or (2 if quick else 10), interval_images=args.interval_images
                  or default_interval_images(cfg, 1 if quick else 3), wall_budget_s=args.wall_budget)
        if args.compare or kind == "compare":
            res = compare_train(cfg, device, work_dir, **kw)
        else:
            res = {"run": bench_train(cfg, device, work_dir, **kw)}
        print_train(res)
    else:
        res = bench_sample(cfg, device, batch=args.batch or (2 if quick else min(cfg.train.batch, 16)),
                           repeats=args.repeats or (1 if quick else 3))
        print_sample(res)
    return res


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    from pdiff.config import load_config, to_dict
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    info = machine()
    print(f"pdiff bench {args.kind}: {cfg.name} on {machine_name(info)} ({device})", flush=True)
    with tempfile.TemporaryDirectory(prefix="pdiff-bench-") as tmp:
        tmp = Path(tmp)
        if args.synthetic:
            cfg = variant(cfg, [f"data.path={synthetic_shards(tmp / 'data', args.synthetic, cfg.data.resolution, cfg.data.channels, args.encoding, cfg.train.seed)}"])
        if args.kind in ("data", "train", "compare") and not cfg.data.path:
            print("pdiff bench: data.path is empty: give the shards (data.path=DIR) or --synthetic N", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        try:
            res = run(args.kind, cfg, args, device, tmp / "runs")
        except BenchError as e:
            print(f"pdiff bench {args.kind}: {e}", file=sys.stderr)
            return 1
    payload = {"benchmark": f"pdiff bench {args.kind}", "kind": args.kind, "machine": info, "config": cfg.name,
               "config_file": str(args.config), "overrides": args.overrides, "quick": args.quick,
               "synthetic_images": args.synthetic or None, "device": str(device),
               "seconds": round(time.perf_counter() - t0, 2), "resolved_config": to_dict(cfg), "results": res}
    path = save_json(payload, args.out, args.kind)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
