"""The Patch Diffusion training loop: `pdiff train --config FILE [section.key=value ...]`.

Each step takes one patch-size batch from the pipeline, builds the network input and the weighted
EDM loss (fused kernels on CUDA), runs forward/backward under DDP, steps Adam with a warm-up counted
in images, and updates the EMA. Re-running the same command resumes from the newest complete
checkpoint; SIGTERM/SIGUSR1 or the wall-clock budget finish the step, checkpoint and exit 0.
Everything is counted in images seen: a step of patch size s counts batch * R/s images.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path

import torch

from . import distributed as dist
from .checkpoint import CheckpointManager
from .config import Config, dump_yaml, load_config, save_config, to_dict
from .ema import EMA
from .loss import sample_sigma
from .model import build_model, count_parameters, one_hot_labels
from .monitor import Monitor, StepStats, image_grid, peak_memory_bytes, save_png
from .schedule import PatchSchedule
from .step import PatchLoss, derive_seed, net_dtype, resolve_precision

# Settings a resumed run must share with its checkpoint (the rest, e.g. intervals or duration,
# may change between runs).
STOP_CHECK_EVERY = 16   # steps between the ranks' agreement on a stop request (world > 1)
RESUME_KEYS = ["network", "data.resolution", "data.channels", "patch", "loss", "train.batch", "train.seed"]


def make_schedule(cfg: Config) -> PatchSchedule:
    p = cfg.patch
    return PatchSchedule(cfg.data.resolution, cfg.train.batch, p.mode, p.real_p, p.sizes or None,
                         p.probs or None, cfg.train.seed, cfg.train.duration_images)


def micro_batches(b: int, accum: int) -> list[slice]:
    """Slices (views, no copies) splitting a batch of b into at most ``accum`` micro-batches."""
    size = -(-b // max(1, accum))
    return [slice(i, min(i + size, b)) for i in range(0, b, size)]


def crossed(before: int, after: int, every: int) -> bool:
    """True when an image-count interval boundary lies in (before, after]."""
    return every > 0 and after // every > before // every


class StopSignal:
    """While training, SIGTERM / SIGUSR1 ask for a clean stop: finish the step, checkpoint, exit 0.

    A context manager: on leaving, the previous handlers come back, so a process that goes on after
    training (the demo samples, tests, notebooks) can be terminated again, and processes it forks
    later (a multiprocessing pool's workers) do not inherit a handler that ignores terminate()."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.requested = True


def check_resume_compatible(saved: dict, cfg: Config, world_size: int, where: Path) -> None:
    current = to_dict(cfg)
    for key in RESUME_KEYS:
        a, b = saved["config"], current
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            raise SystemExit(f"cannot resume from {where}: {key} was {a} and is now {b}. Use the "
                             f"checkpoint's setting, or start a new run in another train.run_dir.")
    if saved["world_size"] != world_size:
        raise SystemExit(f"cannot resume from {where}: it was written by {saved['world_size']} "
                         f"processes and this run has {world_size}. Restart with the same number "
                         f"of processes (global batch and data order depend on it).")


@torch.no_grad()
def sample_grid(ema_model, cfg: Config, device, count: int = 36):
    """Seeds 0..count-1 exactly as `pdiff sample --seeds 0-(count-1)` draws them."""
    from .generate import SampleOptions, generate
    x, _ = generate(ema_model, list(range(count)), cfg.data.resolution, cfg.data.channels,
                    cfg.network.label_dim, SampleOptions(sampler=cfg.sample), device)
    return image_grid(x[:, :3] if cfg.data.channels > 3 else x)


def train(cfg: Config, device_preference: str = "auto", stop: StopSignal | None = None) -> int:
    """Train (or resume) the run cfg describes; 0 when it finished or stopped cleanly. Pass ``stop``
    to learn afterwards whether a signal stopped it (``stop.requested``)."""
    with stop or StopSignal() as stop:
        return _train(cfg, device_preference, stop)


def _train(cfg: Config, device_preference: str, stop: StopSignal) -> int:
    info = dist.init(device_preference)
    device, rank, world = info.device, info.rank, info.world_size
    t_start = time.time()
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Model, EMA, optimizer, schedule, data.
    model = build_model(cfg).to(device)
    ema = EMA(model, cfg.ema.halflife_images, cfg.ema.rampup_ratio)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                           fused=device.type == "cuda")   # one kernel for the whole update on CUDA
    schedule = make_schedule(cfg)
    # The paper's EMA rule counts every step as batch * (average batch multiplier) images.
    ema_images_per_step = cfg.train.batch * sum(p * schedule.multiplier(s) for s, p in zip(schedule.sizes, schedule.probs))
    from pdiff.pipelines import build_pipeline
    pipe = build_pipeline(cfg, schedule, rank=rank, world_size=world, device=device)
    classes = pipe.source.num_classes
    if cfg.network.label_dim and classes > cfg.network.label_dim:
        raise SystemExit(f"{cfg.data.path}: the shards have {classes} classes but network.label_dim is "
                         f"{cfg.network.label_dim}; set network.label_dim={classes}")

    # Resume from the newest complete checkpoint, if any.
    ckpts = CheckpointManager(run_dir, cfg.train.keep_checkpoints)
    images_seen, latest = 0, ckpts.latest()
    if latest is not None:
        state = ckpts.load(latest)
        check_resume_compatible(state, cfg, world, latest)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        pipe.load_state_dict(state["pipeline"][rank])
        images_seen = int(state["images_seen"])
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        print(f"pdiff train: {cfg.name}, {count_parameters(model):,} parameters, {world} process(es) on "
              f"{device.type}, data backend {pipe.backend}, "
              + (f"resuming at {images_seen:,} images from {latest}" if latest else "starting fresh"),
              file=sys.stderr, flush=True)
    if images_seen >= cfg.train.duration_images:
        print(f"pdiff train: {run_dir} already reached {images_seen:,} images; nothing to do", file=sys.stderr)
        pipe.close()
        return 0

    # The compiled differentiable step: one static-shape graph per patch size.
    from pdiff.kernels import resolve_backend
    backend = resolve_backend(cfg.train.kernels, device)
    dtype = net_dtype(resolve_precision(cfg.train.precision, device))
    loss_module = PatchLoss(model, cfg.data.resolution, backend, dtype, cfg.train.channels_last)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # One graph per (patch size, micro-batch size): allow them all without evictions.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(schedule.sizes))
        loss_module.use_network(torch.compile(model.net, dynamic=False))
    ddp = torch.nn.parallel.DistributedDataParallel(loss_module) if world > 1 else loss_module
    compiles_after_warmup = warm_up(loss_module, schedule, cfg, world, device) if cfg.train.compile else None

    fid = None
    if cfg.eval.fid_every_images > 0:
        from .fid import FIDEvaluator
        fid = FIDEvaluator.maybe(cfg.eval.fid_ref, cfg.eval.inception, num_images=cfg.eval.fid_images,
                                 batch=cfg.eval.fid_batch, device=device)
    stats = StepStats(schedule.sizes, device)
    monitor = Monitor(run_dir, info.is_main, cfg.train.duration_images, images_seen)
    params = [p for p in model.parameters() if p.requires_grad]
    t_interval, data_wait, interval_images = time.perf_counter(), 0.0, 0
    images_at_start, steps_this_run = images_seen, 0

    while images_seen < cfg.train.duration_images:
        # 1. Data: one patch size per step, this rank's share of batch * R/s patches.
        t0 = time.perf_counter()
        batch = next(pipe)
        data_wait += time.perf_counter() - t0
        if batch.images_seen != images_seen:
            raise RuntimeError(f"data pipeline is at {batch.images_seen} images, the trainer at {images_seen}")
        size, b = batch.patch_size, batch.patches.shape[0]
        global_b = schedule.batch_for(size)

        # 2. Randomness from (seed, images seen): a resumed run draws the same sigmas and noise.
        # Sigma and noise are drawn for the global batch and rank r takes rows r, r+W, ... (the
        # rows its samples hold in the global step, as the pipeline deals them out), so N
        # processes train like one process with the same global batch (on the torch path).
        torch.manual_seed(derive_seed(cfg.train.seed, rank, images_seen, 1))   # dropout, label dropout
        gen = torch.Generator(device).manual_seed(derive_seed(cfg.train.seed, images_seen, 2))
        sigma = sample_sigma(global_b, cfg.loss.p_mean, cfg.loss.p_std, gen, device)[rank::world]
        noise = None
        if backend == "torch":
            shape = (global_b, *batch.patches.shape[1:])
            noise = torch.randn(shape, generator=gen, device=device)[rank::world]
        labels = one_hot_labels(batch.labels.to(device), cfg.network.label_dim)

        # 3. Forward/backward in micro-batches; DDP all-reduces on the last one only.
        lr = cfg.optim.lr * min(1.0, (images_seen + global_b) / max(cfg.optim.warmup_images, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        chunks = micro_batches(b, cfg.train.grad_accum)
        per_sample = []
        for j, idx in enumerate(chunks):
            sync = contextlib.nullcontext() if (world == 1 or j == len(chunks) - 1) else ddp.no_sync()
            with sync:
                loss = ddp(batch.patches[idx], batch.offsets[idx], sigma[idx],
                           None if noise is None else noise[idx], None if labels is None else labels[idx],
                           derive_seed(cfg.train.seed, rank, j), images_seen)
                (loss.sum() / b).backward()
            per_sample.append(loss.detach())

        # 4. Guard, clip, step, EMA: all on the device (no host sync unless nonfinite=skip).
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        finite = torch.isfinite(grad_norm)
        skip = cfg.optim.nonfinite == "skip" and not bool(finite)
        if cfg.optim.nonfinite == "zero":
            for g in grads:
                g.nan_to_num_(0.0, 0.0, 0.0).mul_(finite)
        if cfg.optim.grad_clip > 0:
            torch._foreach_mul_(grads, (cfg.optim.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0).nan_to_num(0.0))
        if not skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, images_seen + global_b, ema_images_per_step)
        stats.add(size, torch.cat(per_sample), sigma, grad_norm, finite)
        before, images_seen = images_seen, images_seen + global_b
        interval_images += global_b

        # 5. Stop requests (signal, wall-clock budget). Several ranks must agree, which costs a
        # host sync, so they compare notes every STOP_CHECK_EVERY steps only.
        steps_this_run += 1
        over_budget = cfg.train.wall_budget_s > 0 and time.time() - t_start > cfg.train.wall_budget_s
        stopping = stop.requested or over_budget
        if world > 1:
            stopping = steps_this_run % STOP_CHECK_EVERY == 0 and dist.any_rank(stopping, device)
        done = images_seen >= cfg.train.duration_images

        # 6. Log, snapshot, sample and checkpoint at their image intervals.
        if crossed(before, images_seen, cfg.train.log_every_images) or done or stopping:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t_interval
            figures = stats.reduce()
            figures.update(lr=lr, images_per_s=interval_images / elapsed, ms_per_image=1e3 * elapsed / interval_images,
                           data_wait_share=data_wait / elapsed, peak_memory_gb=peak_memory_bytes(device) / 2**30,
                           images_seen_this_run=images_seen - images_at_start)
            if compiles_after_warmup is not None:
                figures["recompiles_after_warmup"] = compiled_graphs() - compiles_after_warmup
            monitor.scalars(images_seen, figures)
            t_interval, data_wait, interval_images = time.perf_counter(), 0.0, 0
        if info.is_main and (crossed(before, images_seen, cfg.train.snapshot_every_images) or done):
            from .snapshot import save_snapshot
            (run_dir / "snapshots").mkdir(exist_ok=True)
            save_snapshot(run_dir / "snapshots" / f"ema-{images_seen:012d}.safetensors", ema.model, cfg, images_seen)
        if info.is_main and (crossed(before, images_seen, cfg.train.sample_every_images) or done):
            grid = sample_grid(ema.model, cfg, device)
            (run_dir / "samples").mkdir(exist_ok=True)
            save_png(grid, run_dir / "samples" / f"samples-{images_seen:012d}.png")
            monitor.image("samples/ema", images_seen, grid)
        if fid is not None and (crossed(before, images_seen, cfg.eval.fid_every_images) or done):
            score = fid.compute(ema.model, cfg)       # every rank samples its share of the seeds
            monitor.scalars(images_seen, {f"fid/{cfg.eval.fid_images}": score})
        if crossed(before, images_seen, cfg.train.ckpt_every_images) or done or stopping:
            save_checkpoint(ckpts, model, ema, opt, pipe, cfg, images_seen, info)
            drift = dist.check_replicas_agree(model, device)
            if drift > 0:
                monitor.scalars(images_seen, {"replica_max_param_diff": drift})
                print(f"pdiff train: WARNING replicas differ by up to {drift:.3g} after the checkpoint",
                      file=sys.stderr)
            monitor.flush()
        if stopping:
            if info.is_main:
                why = "stop signal" if stop.requested else "wall-clock budget"
                print(f"pdiff train: {why}: checkpointed at {images_seen:,} images; run the same "
                      f"command to resume", file=sys.stderr, flush=True)
            break

    monitor.close()
    pipe.close()
    del ddp, loss_module   # DDP's reducer holds communication work: release it before the group
    dist.shutdown()
    return 0


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def warm_up(loss_module: PatchLoss, schedule: PatchSchedule, cfg: Config, world: int, device) -> int:
    """Compile every shape the run will see (one per patch size and micro-batch size) before the
    first real step, so no step stalls on a compile; returns the graph count afterwards, against
    which the log reports recompiles (there should be none)."""
    c, label_dim = cfg.data.channels, cfg.network.label_dim
    for size in schedule.sizes:
        b = schedule.batch_for(size) // world
        for n in sorted({sl.stop - sl.start for sl in micro_batches(b, cfg.train.grad_accum)}):
            patches = torch.zeros(n, c, size, size, device=device)
            offsets = torch.zeros(n, 2, dtype=torch.long, device=device)
            sigma = torch.ones(n, device=device)
            noise = torch.zeros_like(patches) if loss_module.backend == "torch" else None
            labels = torch.zeros(n, label_dim, device=device) if label_dim else None
            loss_module(patches, offsets, sigma, noise, labels, 0, 0).sum().backward()
    loss_module.model.zero_grad(set_to_none=True)
    return compiled_graphs()


def save_checkpoint(ckpts: CheckpointManager, model, ema, opt, pipe, cfg: Config, images_seen: int, info) -> None:
    """Gather every rank's data-pipeline state to rank 0, which writes the checkpoint atomically."""
    pipe_state = pipe.state_dict()
    if dist.active():
        import torch.distributed as tdist
        states = [None] * info.world_size
        tdist.all_gather_object(states, pipe_state)
    else:
        states = [pipe_state]
    if info.is_main:
        ckpts.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    "images_seen": images_seen, "world_size": info.world_size, "config": to_dict(cfg),
                    "pipeline": states, "torch_rng": torch.get_rng_state()}, images_seen)
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdiff train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML file or preset name (tiny, celeba64, ...)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch=64 patch.real_p=0.25")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    ap.add_argument("--device", choices=["auto", "cpu"], default="auto")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg))
        sch = make_schedule(cfg)
        plan = ", ".join(f"{s}px p={p:.2f} x{sch.multiplier(s)} ({sch.batch_for(s)} patches)"
                         for s, p in zip(sch.sizes, sch.probs))
        print(f"# patch schedule ({cfg.patch.mode}): {plan}")
        return 0
    return train(cfg, args.device)


if __name__ == "__main__":
    sys.exit(main())
