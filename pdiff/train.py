"""The Patch Diffusion training loop: `pdiff train --config FILE [section.key=value ...]`.

Each step takes one patch-size batch from the pipeline, builds the network input and the weighted
EDM loss (fused kernels on CUDA), runs forward/backward under DDP, steps Adam with a warm-up counted
in images, and updates the EMA. One trainer holds the run folder (pdiff/runlock.py). Re-running the
same command resumes from the newest good checkpoint; SIGTERM/SIGINT/SIGUSR1 or the wall-clock budget
finish the step, checkpoint and exit 0 (a second SIGTERM/SIGINT exits at once).
Everything is counted in images seen: a step of patch size s counts batch * R/s images.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from pdiff.kernels import resolve_backend
from pdiff.pipelines import build_pipeline

from . import distributed
from .checkpoint import EveryRank, RunState, config_changes
from .config import Config, ConfigError, advice, dump_yaml, load_config, save_config, to_dict
from .dataset import open_dataset
from .distributed import StopSignal, hold_run
from .ema import build_ema, save_snapshots
from .fid import FIDEvaluator
from .flops import FlopCounter, device_card, train_flops_by_size
from .generate import sample_grid
from .helpformat import HelpFormatter
from .latent import training_vae
from .loss import noise_distribution, sample_sigma
from .model import build_model, count_parameters, one_hot_labels
from .monitor import Monitor, StepStats, peak_memory_bytes, run_summary, save_png
from .schedule import PatchSchedule
from .step import build_step, compiled_graphs, derive_seed, learning_rate, micro_batches


def crossed(before: int, after: int, every: int) -> bool:
    """True when an image-count interval boundary lies in (before, after]."""
    return every > 0 and after // every > before // every


def check_batch_splits(cfg: Config, world: int) -> None:
    """Every step's global batch (train.batch * R/s patches) must split evenly over the processes:
    each takes global / world of them, whatever number of processes the run started on."""
    schedule = PatchSchedule.from_config(cfg)
    for s in sorted(schedule.sizes, reverse=True):       # the full size first: it carries train.batch itself
        if schedule.batch_for(s) % world:
            raise ConfigError(f"train.batch: a step of {s} px carries {schedule.batch_for(s)} patches (train.batch="
                              f"{cfg.train.batch} x {schedule.multiplier(s)}), which {world} processes cannot share "
                              f"evenly; run on a number of processes that divides {schedule.batch_for(s)}, or start "
                              f"a new run with train.batch a multiple of {world}")


def train(cfg: Config, device_preference: str = "auto", stop: StopSignal | None = None) -> int:
    """Train (or resume) the run cfg describes; 0 when it finished or stopped cleanly. Pass ``stop``
    to learn afterwards whether a signal stopped it (``stop.requested``). RunLocked when another
    trainer holds the run folder."""
    t_start = time.time()
    with stop or StopSignal() as stop:
        # The inputs first, so that a mistake is reported before anything is created: the data, and
        # the config completed from what it knows (resolution, channels, classes; latent shards:
        # their patch sizes and autoencoder).
        cfg, source, notes = open_dataset(cfg)
        info = distributed.init(device_preference)
        check_batch_splits(cfg, info.world_size)
        check_fits(cfg, info.device)
        if info.is_main:
            for line in notes + conditioning(cfg, source) + advice(cfg):
                print(f"pdiff train: {line}", file=sys.stderr, flush=True)
        with hold_run(cfg.train.run_dir):
            code = _train(cfg, info, stop, source, t_start)
        distributed.shutdown()    # after _train's DDP (its reducer holds communication work) is gone
        return code


def check_fits(cfg: Config, device: torch.device) -> None:
    """What would otherwise fail at the first step, checked before anything is created (the run
    and --dry-run): the kernels backend on this device, and the patch sizes against the network."""
    resolve_backend(cfg.train.kernels, device)
    with torch.device("meta"):          # the network's shape facts without allocating its weights
        try:
            net = build_model(cfg).net
        except ValueError as e:         # a resolution the network cannot take
            raise ConfigError(str(e)) from None
    sizes = PatchSchedule.from_config(cfg).sizes
    bad = [s for s in sizes if s % net.downsample]
    if bad:
        raise ConfigError(f"patch sizes {bad} are not multiples of the {cfg.network.arch} network's downsampling "
                          f"factor {net.downsample}: give patch.sizes that are (with patch.probs), or a network "
                          f"with fewer resolution levels (network.channel_mult)")


def record_config(cfg: Config, run_dir: Path, images_seen: int, before: dict | None) -> None:
    """config.yaml: the config in effect now. Its history: config-<images seen>.yaml, the config that
    took effect at that count (a fresh start, and each resume that changes a setting), and for a
    change a log.jsonl row and a console line per key with both values."""
    now = to_dict(cfg)
    changes = config_changes(before, now) if before is not None else []
    save_config(cfg, run_dir / "config.yaml")
    if before is not None and not changes:
        return
    save_config(cfg, run_dir / f"config-{images_seen:012d}.yaml")
    if changes:
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"images_seen": images_seen, "time": time.time(),
                                "config_changed": {k: [a, b] for k, a, b in changes}}) + "\n")
        print(f"pdiff train: resuming with {len(changes)} changed setting(s), in effect from {images_seen:,} images "
              f"(recorded in {run_dir / f'config-{images_seen:012d}.yaml'} and log.jsonl):", file=sys.stderr)
        for k, a, b in changes:
            print(f"pdiff train:   {k}: {a!r} -> {b!r}", file=sys.stderr, flush=True)


def conditioning(cfg: Config, source) -> list[str]:
    """A start line saying that labelled data makes a class-conditional model, when the classes came
    from the data (network.label_dim not given)."""
    n = cfg.network.label_dim
    if not n or "network.label_dim" in cfg.given:
        return []
    names = [str(c) for c in (getattr(source, "manifest", None) or {}).get("classes") or []]
    where = (f"from the folder names ({', '.join(names[:4])}{', ...' if n > 4 else ''})"
             if names and names != [str(i) for i in range(len(names))] else f"in the labels of {cfg.data.path}")
    return [f"{n} classes {where}: training class-conditional; network.label_dim=0 for unconditional"]


def _train(cfg: Config, info: distributed.DistInfo, stop: StopSignal, source, t_start: float) -> int:
    device, rank, world = info.device, info.rank, info.world_size
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # The step (model, kernels, precision, PatchLoss, compile, Adam), the EMA, the data.
    step = build_step(cfg, device)
    model, opt, schedule = step.model, step.optimizer, step.schedule
    ema = build_ema(cfg, model, schedule.ema_images_per_step())
    pipe = build_pipeline(cfg, schedule, rank=rank, world_size=world, device=device, source=source)

    # Resume from the newest good checkpoint, if any. No random-number state is saved: every
    # random draw of a step (patch size, samples, crops, sigma, noise, dropout) is derived from
    # (seed, images seen[, rank]), so the parts below are all a run needs to go on exactly.
    # The repr projection head (repr.loss=align) trains with the model and is saved beside it.
    head = {"repr_head": step.loss.repr_term} if step.loss.repr_term is not None and cfg.repr.loss == "align" else {}
    run_state = RunState(run_dir, to_dict(cfg), cfg.train.keep_checkpoints,
                         model=model, ema=ema, optimizer=opt, pipeline=EveryRank(pipe), **head)
    images_seen, latest = run_state.resume()
    if info.is_main:
        record_config(cfg, run_dir, images_seen, run_state.resumed_config)
        print(f"pdiff train: {cfg.name}, {count_parameters(model):,} parameters, {world} process(es) on "
              f"{device.type}, data backend {pipe.backend}, "
              + (f"resuming at {images_seen:,} images from {latest}" if latest else "starting fresh")
              + (f"; resumed on {world} process{'es' if world > 1 else ''} (written by {run_state.written_by})"
                 if latest and run_state.written_by != world else ""),
              file=sys.stderr, flush=True)
    if images_seen >= cfg.train.duration_images:
        print(f"pdiff train: {run_dir} already reached {images_seen:,} images; nothing to do", file=sys.stderr)
        pipe.close()
        return 0

    ddp = torch.nn.parallel.DistributedDataParallel(step.loss) if world > 1 else step.loss
    compiles_after_warmup = step.warm_up(world, stop, pipe.patch_dtype) if cfg.train.compile else None
    if distributed.any_rank(stop.requested, device):    # a signal during the warm-up: nothing to save
        if info.is_main:
            print(f"pdiff train: stop signal during the compile warm-up: stopped before the first step; "
                  f"run the same command to {'resume' if latest else 'start'}", file=sys.stderr, flush=True)
        pipe.close()
        return 0
    vae = training_vae(cfg, device, needed=info.is_main or cfg.eval.fid_every_images > 0)   # latents -> images
    fid = None
    if cfg.eval.fid_every_images > 0:
        fid = FIDEvaluator.maybe(cfg.eval.fid_ref, cfg.eval.inception, num_images=cfg.eval.fid_images,
                                 batch=cfg.eval.fid_batch, device=device, vae=vae,
                                 channels=cfg.data.channels)
    stats = StepStats(schedule.sizes, device)
    # Training FLOPs per patch of each size, counted once: TFLOP/s and MFU in the log cost no sync.
    flops = FlopCounter(train_flops_by_size(cfg), device_card(device), step.precision, world)
    monitor = Monitor(run_dir, info.is_main, cfg.train.duration_images, images_seen,
                      wall_budget_s=cfg.train.wall_budget_s, started=t_start)
    monitor.describe_run(to_dict(cfg), dump_yaml(cfg))
    clock = monitor.clock
    params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]   # with the repr head
    repr_sum, repr_rows = torch.zeros((), device=device), 0      # the weighted repr term over the log interval
    images_at_start, steps_this_run = images_seen, 0
    snapshot = None

    while images_seen < cfg.train.duration_images:
        # 1. Data: one patch size per step, this rank's share of batch * R/s patches.
        with clock.waiting():
            batch = next(pipe)
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
        sigma = sample_sigma(global_b, *noise_distribution(cfg, size), gen, device)[rank::world]
        noise = None
        if step.loss.backend == "torch":
            shape = (global_b, step.channels, size, size)
            noise = torch.randn(shape, generator=gen, device=device)[rank::world]
        labels = one_hot_labels(batch.labels.to(device), cfg.network.label_dim)

        # 3. Forward/backward in micro-batches; DDP all-reduces on the last one only.
        lr = learning_rate(cfg.optim, images_seen + global_b)
        for group in opt.param_groups:
            group["lr"] = lr
        chunks = micro_batches(b, cfg.train.grad_accum)
        per_sample = []
        # The repr term (repr.loss) at its weight until repr.until_images, then 0.
        repr_weight = cfg.repr.weight if not cfg.repr.until_images or images_seen < cfg.repr.until_images else 0.0
        for j, idx in enumerate(chunks):
            sync = contextlib.nullcontext() if (world == 1 or j == len(chunks) - 1) else ddp.no_sync()
            with sync:
                loss = ddp(batch.patches[idx], batch.offsets[idx], sigma[idx],
                           None if noise is None else noise[idx], None if labels is None else labels[idx],
                           derive_seed(cfg.train.seed, rank, j), images_seen,
                           None if batch.features is None else batch.features[idx], repr_weight)
                term = 0
                if isinstance(loss, tuple):
                    loss, term = loss
                    repr_sum += term.detach().sum()
                    repr_rows += term.shape[0]
                    term = term.sum()
                ((loss.sum() + term) / b).backward()
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
            step.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, images_seen, images_seen + global_b)
        stats.add(size, torch.cat(per_sample), sigma, grad_norm, finite)
        if latest is not None and steps_this_run == 0:
            report_nonfinite_after_resume(torch.cat(per_sample), latest, cfg.optim.nonfinite, device, info.is_main)
        flops.add(size, global_b)
        before, images_seen = images_seen, images_seen + global_b
        clock.images += global_b

        # 5. Stop requests (signal, wall-clock budget), agreed by every rank.
        steps_this_run += 1
        over_budget = cfg.train.wall_budget_s > 0 and time.time() - t_start > cfg.train.wall_budget_s
        stopping = stop.should_stop(over_budget, steps_this_run, device)
        done = images_seen >= cfg.train.duration_images

        # 6. Log, checkpoint, snapshot, sample and FID at their image intervals; the time these take
        # is kept out of images/s and logged on its own (perf/<what>_s).
        if crossed(before, images_seen, cfg.train.log_every_images) or done or stopping:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            figures = stats.reduce()
            speed, seconds = clock.lap()      # the interval's time without its pauses
            figures.update(speed, lr=lr, peak_memory_gb=peak_memory_bytes(device) / 2**30,
                           images_seen_this_run=images_seen - images_at_start, **flops.figures(seconds))
            if compiles_after_warmup is not None:
                figures["recompiles_after_warmup"] = compiled_graphs() - compiles_after_warmup
            if repr_rows:
                figures["repr/weighted_term"] = float(repr_sum) / repr_rows
                repr_sum.zero_()
                repr_rows = 0
            # Damaged samples met so far (replaced under data.on_corrupt=skip), counted once over all ranks.
            figures["data/corrupt_samples"] = len(set().union(*distributed.all_gather_object(pipe.corrupt.found)))
            monitor.scalars(images_seen, figures)
        monitor.heartbeat(images_seen)
        if done or stopping:
            monitor.say(f"{'reached' if done else 'stopping at'} {images_seen:,} images: writing the last "
                        + ("checkpoint, snapshot and sample grid" if done and cfg.train.sample_every_images != 0
                           else "checkpoint and snapshot"))
        # The checkpoint first: a snapshot, sample grid or FID that fails loses no training.
        if crossed(before, images_seen, cfg.train.ckpt_every_images) or done or stopping:
            with monitor.pause("checkpoint", images_seen) as said:
                said.detail = str(run_state.save(images_seen))     # rank 0's folder (the others print nothing)
            drift = distributed.check_replicas_agree(model, device)
            if drift > 0:
                monitor.scalars(images_seen, {"replica_max_param_diff": drift})
                print(f"pdiff train: WARNING replicas differ by up to {drift:.3g} after the checkpoint",
                      file=sys.stderr)
            monitor.flush()
        if info.is_main and (crossed(before, images_seen, cfg.train.snapshot_every_images) or done or stopping):
            with monitor.pause("snapshot", images_seen) as said:
                paths = save_snapshots(ema, run_dir / "snapshots", cfg, images_seen)     # power EMAs: one per sigma_rel
                said.detail, snapshot = ", ".join(map(str, paths)), paths[0]
        if info.is_main and (crossed(before, images_seen, cfg.train.sample_every_images)
                             or (done and cfg.train.sample_every_images != 0)):
            grid_file = run_dir / "samples" / f"samples-{images_seen:012d}.png"
            monitor.say(f"sampling a grid of 36 images ({2 * cfg.sample.steps - 1} network evaluations each) on "
                        f"{device.type} for {grid_file.name}; train.sample_every_images=0 turns grids off")
            with monitor.pause("sample", images_seen, f"grid {grid_file}"):
                grid = sample_grid(ema.model, cfg, device, vae=vae)
                grid_file.parent.mkdir(exist_ok=True)
                save_png(grid, grid_file)
                monitor.image("samples/ema", images_seen, grid)
        if fid is not None and (crossed(before, images_seen, cfg.eval.fid_every_images) or done):
            with monitor.pause("fid", images_seen, f"of {cfg.eval.fid_images} samples"):
                score = fid.compute(ema.model, cfg)       # every rank samples its share of the seeds
            monitor.scalars(images_seen, {f"fid/{cfg.eval.fid_images}": score})
        if stopping:
            why = "stop signal" if stop.requested else "wall-clock budget"
            monitor.say(f"{why}: stopped at {images_seen:,} images; run the same command to resume")
            break

    monitor.say(run_summary(images_seen, images_seen - images_at_start, time.time() - t_start,
                            snapshot, run_state.checkpoints.latest()))
    monitor.close()
    pipe.close()
    return 0


def report_nonfinite_after_resume(loss: torch.Tensor, latest: Path, policy: str, device, is_main: bool) -> None:
    """Warn when the first step after a resume has a non-finite loss (one host sync, once): the
    checkpoint verified, so its values, not its bytes, are suspect."""
    if distributed.any_rank(not bool(torch.isfinite(loss).all()), device) and is_main:
        print(f"pdiff train: WARNING the first step after resuming from {latest} has a non-finite loss; the step "
              f"{'was skipped' if policy == 'skip' else 'had its gradient zeroed'} (optim.nonfinite={policy}). Its "
              "weights or "
              f"optimizer state may be unusable: if the loss stays non-finite, stop and move {latest.name} out "
              f"of {latest.parent} to resume from the checkpoint before it", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdiff train", description=__doc__.split("\n\n")[0],
                                 epilog="Every config key, its type, default and meaning: `pdiff config`.",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file or preset name (tiny, celeba64, ...)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch=64 patch.real_p=0.25")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the inputs, print the resolved config and the plan, then exit")
    ap.add_argument("--device", default="auto",
                    help="auto (CUDA where there is a GPU) | cpu | cuda | cuda:N (cuda:LOCAL_RANK under torchrun)")
    args = ap.parse_intermixed_args(argv)     # overrides before and after the flags
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:        # what the run checks before its first step, without creating anything
        cfg, source, notes = open_dataset(cfg)
        source.close()
        check_fits(cfg, distributed.resolve_device(args.device, 0))     # as the run (one process) resolves it
        print(dump_yaml(cfg))
        for line in notes + conditioning(cfg, source) + advice(cfg):
            print(f"# {line}")
        sch = PatchSchedule.from_config(cfg)
        plan = ", ".join(f"{s}px p={p:.2f} x{sch.multiplier(s)} ({sch.batch_for(s)} patches)"
                         for s, p in zip(sch.sizes, sch.probs))
        print(f"# patch schedule ({cfg.patch.mode}): {plan}")
        return 0
    return train(cfg, args.device)
