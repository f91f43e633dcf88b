"""The benchmark runs: the data pipeline, the training step per patch size, the real training loop
(full images against the patch schedule) and the sampler, each on the config's own settings."""
from __future__ import annotations

import gc
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pdiff.allocator import keep_freed_memory
from pdiff.config import apply_overrides, from_dict, parse_override, to_dict, validate
from pdiff.coords import canvas_grid, random_offsets
from pdiff.distributed import StopSignal
from pdiff.flops import describe, device_card, forward_flops_by_size, mfu
from pdiff.loss import sample_sigma
from pdiff.model import build_model, count_parameters, one_hot_labels
from pdiff.pipelines import build_pipeline, open_source
from pdiff.pipelines.shards import write_shards
from pdiff.sampler import SeedNoise, network_evaluations, patch_denoiser, sample_images
from pdiff.schedule import FullImageSchedule, PatchSchedule, StochasticSchedule
from pdiff.step import build_step, synthetic_patches
from pdiff.train import train

from .machine import device_sync
from .timing import (BenchError, add_flop_figures, compare_figures, schedule_figures, summarize_log, time_sizes,
                     timed)

# Overrides that turn a config into its full-image EDM twin (p = 1).
FULL_OVERRIDES = ["patch.mode=full"]


def paper_schedule_overrides(resolution: int) -> list[str]:
    """Overrides for the paper's pixel-space schedule, p = 0.5 over {R/4, R/2, R} (given explicitly:
    below 64 px pdiff's default sizes are {R/2, R})."""
    r = resolution
    return ["patch.mode=stochastic", "patch.real_p=0.5", f"patch.sizes=[{r // 4},{r // 2},{r}]",
            "patch.probs=[0.2,0.3,0.5]"]
NEVER = 10 ** 15      # an image interval that a benchmark run never reaches


class BenchInterrupted(RuntimeError):
    """SIGTERM/SIGUSR1 arrived during a training run: stop the remaining runs."""


def variant(cfg, overrides: list[str]):
    """A copy of ``cfg`` with dotted overrides applied (checked like the command line's)."""
    out = from_dict(apply_overrides(to_dict(cfg), list(overrides)), "<bench>")
    out.given = {**cfg.given, **{".".join(parse_override(o)[0]): "<bench>" for o in overrides}}
    validate(out, "<bench>")
    return out


def synthetic_shards(out_dir: str | Path, count: int, resolution: int, channels: int = 3,
                     encoding: str = "png", seed: int = 0, min_shards: int = 4, workers: int = 1) -> Path:
    """``count`` random images (smooth colour fields plus noise, so PNG/JPEG sizes are natural)
    written as pdiff shards in ``out_dir``."""
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


# ------------------------------------------------------------------------------------------
# bench data: the patch pipeline over the config's shards

def bench_data(cfg, device: torch.device, steps: int = 20, repeats: int = 3, warmup_steps: int = 3,
               clock=time.perf_counter, cpu_clock=time.process_time) -> dict:
    """Patches/s and images/s of the pipeline (pipelines.build_pipeline on cfg.data.path) for each
    patch size alone and for the config's schedule: ``warmup_steps`` steps first, then ``repeats``
    runs of ``steps`` steps each; medians. Every patch is cut from its own image
    and counts as one image seen, so images/s (images seen, as the trainer counts them) equals
    patches/s on one process; both are reported under their own names. CPU seconds are this
    process's (all its threads; DataLoader worker processes are not counted: use data.workers=0 to
    count everything)."""
    sched = PatchSchedule.from_config(cfg)
    r, batch = cfg.data.resolution, cfg.train.batch
    plans = [(f"s={s}", s, StochasticSchedule(r, batch, sizes=[s], probs=[1.0], seed=cfg.train.seed))
             for s in sorted(set(sched.sizes) | {r})]
    plans.append(("schedule", None, sched))
    results, backend = {}, None
    for label, size, schedule in plans:
        pipe = build_pipeline(cfg, schedule, 0, 1, device)
        backend = pipe.backend

        def step():
            b = next(pipe)
            return b.patches.shape[0], schedule.batch_for(b.patch_size)
        try:
            figures = _time_data_steps(step, device, steps, repeats, warmup_steps, clock, cpu_clock)
        finally:
            pipe.close()
        results[label] = {"patch_size": size, "patches_per_step": None if size is None else schedule.batch_for(size),
                          **figures}
    return {"backend": backend, "workers": cfg.data.workers, "batch": batch, "resolution": r,
            "schedule": sched.summary(), "results": results}


def bench_data_online_vae(cfg, vae, device: torch.device, steps: int = 5, repeats: int = 1, warmup_steps: int = 1,
                          clock=time.perf_counter, cpu_clock=time.process_time) -> dict:
    """The data path of latent training that runs the VAE encoder in every step (the official Patch
    Diffusion code): pixel shards (cfg.data.path, images at the encoder's input size) through the
    pipeline as full images, each batch of cfg.train.batch encoded by ``vae`` (a pdiff.vae.VAE) and
    one latent drawn per image. The latents' own patch schedule does not change the cost per image:
    every image is encoded whole. Figures as ``bench_data``'s, under "online-vae"."""
    r, batch = cfg.data.resolution, cfg.train.batch
    if r % vae.downsample:
        raise BenchError(f"images of {r}x{r} do not divide into the VAE's {vae.downsample}x{vae.downsample} pixels")
    schedule = FullImageSchedule(r, batch, seed=cfg.train.seed)
    pipe = build_pipeline(cfg, schedule, 0, 1, device)
    gen = torch.Generator(vae.device).manual_seed(cfg.train.seed)

    def step():
        b = next(pipe)
        mean, std = vae.encode(b.patches)
        latents = vae.to_latent(torch.addcmul(mean, std, torch.randn(std.shape, generator=gen, device=vae.device)))
        return latents.shape[0], latents.shape[0]
    try:
        figures = _time_data_steps(step, device, steps, repeats, warmup_steps, clock, cpu_clock)
    finally:
        pipe.close()
    return {"backend": pipe.backend, "workers": cfg.data.workers, "batch": batch, "resolution": r,
            "latent_resolution": r // vae.downsample, "vae": vae.record, "schedule": schedule.summary(),
            "results": {"online-vae": {"patch_size": r, "patches_per_step": batch, **figures}}}


def _time_data_steps(step, device, steps: int, repeats: int, warmup_steps: int, clock, cpu_clock) -> dict:
    """Medians over ``repeats`` runs of ``steps`` calls of ``step() -> (patches, images counted)``,
    after ``warmup_steps``: patches/s, images/s, steps/s, ms/step, and CPU seconds per image."""
    sync = device_sync(device)
    for _ in range(warmup_steps):
        step()
    if sync:
        sync()
    runs = []
    for _ in range(repeats):
        t0, c0, n, counted = clock(), cpu_clock(), 0, 0
        for _ in range(steps):
            patches, images = step()
            n += patches
            counted += images
        if sync:
            sync()
        dt, cpu = clock() - t0, cpu_clock() - c0
        runs.append((n / dt, counted / dt, steps / dt, 1e3 * dt / steps, cpu / counted))
    med = [statistics.median(x) for x in zip(*runs)]
    return {"patches_per_s": med[0], "images_per_s": med[1], "steps_per_s": med[2], "ms_per_step": med[3],
            "cpu_s_per_image": med[4], "images_per_cpu_s": 1 / med[4] if med[4] > 0 else None,
            "steps": steps, "repeats": repeats}


# ------------------------------------------------------------------------------------------
# bench step: forward + backward + Adam per patch size on synthetic patches

def delivered_patch_dtype(cfg) -> torch.dtype:
    """What the pipeline would hand the step: float32 for latent shards, uint8 for images. Read from
    the data's manifest when data.path is set; without data, images unless the channel count is not
    an image's (1 or 3)."""
    if cfg.data.path:
        return torch.float32 if open_source(cfg.data.path).encoding == "latent" else torch.uint8
    return torch.uint8 if cfg.data.channels in (1, 3) else torch.float32


def bench_step(cfg, device: torch.device, compile_: bool = False, precision: str | None = None,
               kernels: str = "auto", repeats: int = 3, warmup: int | None = None, clock=time.perf_counter) -> dict:
    """Training-step cost at each patch size of the config's schedule (and R) with its batch
    multiplier (B full images -> B R/s patches), PatchLoss forward + backward + Adam, and the
    schedule's cost per image against full images, measured and from the FLOP model."""
    overrides = [f"train.compile={str(compile_).lower()}", f"train.kernels={kernels}"]
    if precision:
        overrides.append(f"train.precision={precision}")
    step = build_step(variant(cfg, overrides), device)     # as the trainer builds it
    model, opt, sched, backend = step.model, step.optimizer, step.schedule, step.loss.backend
    r, c, label_dim = cfg.data.resolution, cfg.data.channels, cfg.network.label_dim

    dtype = delivered_patch_dtype(cfg)

    def make_step(s: int):
        n = sched.batch_for(s)
        y = synthetic_patches(n, c, s, dtype, device)
        off = random_offsets(n, s, r, device=device)
        sigma = sample_sigma(n, device=device)
        noise = torch.randn(n, c, s, s, device=device) if backend == "torch" else None
        labels = None
        if label_dim:
            labels = torch.nn.functional.one_hot(torch.randint(0, label_dim, (n,), device=device), label_dim).float()

        def train_step():
            step.loss(y, off, sigma, noise, labels, 1, 2).mean().backward()
            opt.step()
            step.after_optimizer_step()     # as the trainer (EDM2's forced weight normalization)
            opt.zero_grad(set_to_none=True)
        return train_step, n

    per_size = time_sizes(make_step, set(sched.sizes) | {r}, repeats, warmup if warmup is not None else
                          (2 if compile_ else 1), device_sync(device), clock)
    figures = schedule_figures(sched, per_size)
    flops = describe(cfg)
    card = device_card(device)
    peak = card.peak_tflops(step.precision) if card else None
    add_flop_figures(per_size, figures, sched, {s: g * 1e9 for s, g in flops["train_gflops_per_image"].items()}, peak)
    return {"config": cfg.name, "arch": cfg.network.arch, "resolution": r, "channels": c,
            "parameters": count_parameters(model), "batch_full_images": cfg.train.batch, "compile": compile_,
            "precision": step.precision, "kernels": backend, "device": str(device),
            "card": card.name if card else None, "peak_tflops": peak,
            "per_patch_size": per_size, "schedule": figures,
            "flop_model": {"cost_per_image_vs_full": flops["cost_per_image_vs_full"],
                           "train_gflops_per_image": flops["train_gflops_per_image"]},
            # the names bench_step.py has always written
            "schedule_cost_per_image_vs_full": {"measured": figures["cost_per_image_vs_full"],
                                                "flop_model": flops["cost_per_image_vs_full"]},
            "speedup_per_image_vs_full": figures["speedup_per_image_vs_full"]}


# ------------------------------------------------------------------------------------------
# bench train: the real training loop (pdiff.train.train) with the real pipeline

def base_overrides(run_dir: str | Path) -> list[str]:
    """What every benchmark training run shares: its own run folder, no checkpoints, snapshots,
    sample grids or in-training FID on the way (the run's end still writes one checkpoint and
    snapshot), and 2-step sample grids."""
    return [f"train.run_dir={run_dir}", f"train.ckpt_every_images={NEVER}", f"train.snapshot_every_images={NEVER}",
            f"train.sample_every_images={NEVER}", "train.keep_checkpoints=1", "sample.steps=2",
            "eval.fid_every_images=0"]


def measuring_overrides(run_dir: str | Path, interval_images: int, intervals: int, warmup_intervals: int = 1,
                        wall_budget_s: float = 0.0) -> list[str]:
    """Overrides that make a training run a measurement: a fresh run folder, a log row every
    ``interval_images``, warm-up plus measured intervals, and no checkpoints, snapshots, sample
    grids or FID on the way (the run's end still writes one of each, after its last log row)."""
    return [*base_overrides(run_dir), f"train.duration_images={(intervals + warmup_intervals) * interval_images}",
            f"train.log_every_images={interval_images}", f"train.wall_budget_s={wall_budget_s}"]


def prewarm_kernels(cfg, device: torch.device, force: bool = False) -> float:
    """Eager runs on CUDA: one forward + backward of the training step at every patch size and batch
    of the schedule (on a throwaway copy of the network), so that Triton's JIT and the cuBLAS/cuDNN
    set-up for each shape happen before the run instead of inside a measured interval. (Compiled
    runs get this from the trainer's own warm-up.) Returns the seconds it took."""
    if not force and (device.type != "cuda" or cfg.train.compile):
        return 0.0
    t = time.perf_counter()
    step = build_step(variant(cfg, ["train.compile=false"]), device)
    step.warm_up(1, patch_dtype=delivered_patch_dtype(cfg))
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def run_training(cfg, device: torch.device) -> list[dict]:
    """One run of pdiff.train.train in this process; its log rows. A SIGTERM/SIGUSR1 during the run
    stops the run cleanly (the trainer's handler) and then raises BenchInterrupted here."""
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
    sched = PatchSchedule.from_config(cfg)
    return cfg.train.batch * max(sched.multiplier(s) for s in sched.sizes) * steps


def bench_train(cfg, device: torch.device, work_dir: str | Path, intervals: int = 10,
                interval_images: int | None = None,
                wall_budget_s: float = 0.0, label: str = "run", runner=run_training) -> dict:
    """End-to-end figures of ``cfg`` (its schedule) with the real pipeline: images/s, ms per image
    and per step, data-wait share, peak memory, recompiles, from the log intervals after the first."""
    if not cfg.data.path:
        raise BenchError("data.path is empty: point it at shards from `pdiff shard`, or pass --synthetic N")
    interval_images = interval_images or default_interval_images(cfg)
    run_cfg = variant(cfg, measuring_overrides(Path(work_dir) / label, interval_images, intervals,
                                               wall_budget_s=wall_budget_s))
    t = time.perf_counter()
    rows = runner(run_cfg, device)
    sched = PatchSchedule.from_config(run_cfg)
    out = summarize_log(rows, sched)
    out.update(wall_seconds=time.perf_counter() - t, interval_images=interval_images, compile=run_cfg.train.compile,
               schedule=sched.summary())
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
# bench sample: pdiff's sampler and EDM's reference loop on the same network and noise

@torch.no_grad()
def edm_reference_sampler(net, latents: torch.Tensor, randn_like, num_steps: int = 18, sigma_min: float = 0.002,
                          sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
                          S_max: float = float("inf"), S_noise: float = 1.0) -> torch.Tensor:
    """EDM's ``edm_sampler`` (generate.py of NVlabs/edm) as its loop is written, the yardstick for
    pdiff's sampler: float64 state, ``net(x, sigma)`` cast back to float64, and the churn noise
    drawn at every step (``randn_like``, a per-seed stacked generator in EDM) even when gamma is 0.
    ``net`` is pdiff's denoiser with the coordinate grid bound (``patch_denoiser``); EDMPrecond's
    round_sigma is the identity, so it is left out."""
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def cpu_usage() -> dict:
    """This process's CPU seconds in user and kernel (system) mode and its minor page faults so far
    (every thread's): the kernel's share is where freshly mapped memory gets zeroed."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime, "minor_faults": r.ru_minflt}


def timed_with_cpu(fns: dict, repeats: int, sync=None, clock=time.perf_counter) -> dict:
    """Each of ``fns`` (name -> callable) called in turn ``repeats`` times, interleaved so that load
    from other processes falls on all alike: per name the median seconds per call, and the CPU time
    (user, system) and minor page faults per call."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    seconds = {name: [] for name in fns}
    usage = {name: {"user_s": 0.0, "sys_s": 0.0, "minor_faults": 0} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before = cpu_usage()
            seconds[name].extend(timed(fn, 1, warmup=0, sync=sync, clock=clock))
            after = cpu_usage()
            for k in usage[name]:
                usage[name][k] += after[k] - before[k]
    return {name: {"seconds_per_batch": statistics.median(seconds[name]), "repeats": repeats,
                   "cpu_user_s_per_batch": usage[name]["user_s"] / repeats,
                   "cpu_sys_s_per_batch": usage[name]["sys_s"] / repeats,
                   "minor_faults_per_batch": usage[name]["minor_faults"] / repeats} for name in fns}


@torch.no_grad()
def bench_sample(cfg, device: torch.device, batch: int = 16, repeats: int = 3, clock=time.perf_counter,
                 edm_reference: bool = True) -> dict:
    """Images/s of the sampler (pdiff.sampler.sample_images, Heun at cfg.sample.steps, fp32 network,
    seed-addressed noise as `pdiff sample` draws it) on the config's network with random weights
    (throughput does not depend on them), with the CPU time it spends in user and system mode, and
    EDM's reference loop (``edm_reference_sampler``) on the same network and noise, the two
    alternating batch by batch. One warm-up batch of 2 steps first."""
    r, c, s = cfg.data.resolution, cfg.data.channels, cfg.sample
    canvas = s.canvas or r
    if device.type == "cpu":
        keep_freed_memory()         # as pdiff.generate does (both samplers below run under it)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device).eval().requires_grad_(False)
    seeds = list(range(batch))
    rng = SeedNoise(seeds, device)
    noise = rng.randn((batch, c, canvas, canvas))
    labels = None
    if cfg.network.label_dim:
        labels = one_hot_labels(torch.tensor(seeds, device=device) % cfg.network.label_dim, cfg.network.label_dim)
    sync = device_sync(device)

    def ours(steps):
        return lambda: sample_images(model, noise, r, labels, steps, s.sigma_min, s.sigma_max, s.rho, s.guidance,
                                     s.s_churn, s.s_min, s.s_max, s.s_noise, randn_like=rng.randn_like,
                                     guidance_interval=s.guidance_interval)
    ours(2)()
    runs = {"pdiff": ours(s.steps)}
    if edm_reference:
        den = patch_denoiser(model, canvas_grid(batch, canvas, r, device=device), labels, s.guidance,
                             s.guidance_interval)
        runs["edm_reference"] = lambda: edm_reference_sampler(den, noise, rng.randn_like, s.steps, s.sigma_min,
                                                              s.sigma_max, s.rho, s.s_churn, s.s_min, s.s_max,
                                                              s.s_noise)
    measured = timed_with_cpu(runs, repeats, sync, clock)
    figures = measured["pdiff"]
    t = figures["seconds_per_batch"]
    evals = network_evaluations(s, guided=labels is not None and s.guidance != 1)
    tflop_per_s = forward_flops_by_size(cfg, [canvas])[canvas] * evals * batch / t / 1e12
    card = device_card(device)
    out = {"config": cfg.name, "parameters": count_parameters(model), "resolution": r, "canvas": canvas,
           "steps": s.steps, "network_evaluations": evals, "batch": batch, **figures,
           "images_per_s": batch / t, "ms_per_image": 1e3 * t / batch,
           "precision": "fp32", "device": str(device), "torch_threads": torch.get_num_threads(),
           "card": card.name if card else None, "tflop_per_s": tflop_per_s, "mfu": mfu(tflop_per_s, card, "fp32")}
    if edm_reference:
        edm = measured["edm_reference"]
        edm["images_per_s"] = batch / edm["seconds_per_batch"]
        out["edm_reference"] = edm
        out["speedup_vs_edm_reference"] = edm["seconds_per_batch"] / t
    return out

