"""`pdiff sample`: images from an EMA snapshot or a training checkpoint.

    pdiff sample --snapshot runs/celeba64/snapshots/ema-000200000000.safetensors
        --seeds 0-49999 --batch 256 --outdir out/celeba --subdirs
    pdiff sample --snapshot runs/celeba64 --seeds 0-63 --grid grid.png    # the run's newest snapshot
    torchrun --nproc-per-node 8 -m pdiff.cli sample --checkpoint runs/celeba64
        --seeds 0-63 --grid grid.png --npz samples.npz

Seed s always gives the same image, whatever --batch and the number of processes (each rank
samples seeds[rank::world]). Sampler settings default to the run's ``sample`` config section.
A latent model's samples are decoded by the run's VAE (the one its shards were encoded with, or
--vae, which must have the same weights) and written like a pixel model's.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

from pdiff import distributed
from pdiff.errors import UserError
from pdiff.generate import SampleOptions, iter_uint8, parse_seeds
from pdiff.helpformat import HelpFormatter
from pdiff.progress import Progress
from pdiff.snapshot import load_model
from pdiff.vae import load_run_vae
from pdiff.pipelines.shards.format import load_manifest


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--snapshot", help="EMA snapshot written by pdiff train (RUN/snapshots/ema-<images>.safetensors), "
                                        "or a run or snapshots folder: its newest snapshot")
    src.add_argument("--checkpoint",
                     help="checkpoint folder ckpt-*/ or a run folder (its newest complete checkpoint, EMA weights)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    p.add_argument("--vae", help="latent models: the VAE that decodes the samples (a diffusers folder or hub id; "
                                 "default: the run's, the one its shards were encoded with)")


def add_sampler_args(p: argparse.ArgumentParser, seeds: bool = True) -> None:
    g = p.add_argument_group("sampler (defaults: the run's sample section)")
    if seeds:
        g.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-49999 or 0,5,10-19 (default 0-63)")
    g.add_argument("--batch", type=int, default=64, help="images per batch and process (default 64)")
    g.add_argument("--steps", type=int, help="Heun steps N (2N-1 network evaluations; 18 -> 35 NFE)")
    g.add_argument("--sigma-min", type=float, help="lowest noise level")
    g.add_argument("--sigma-max", type=float, help="highest noise level")
    g.add_argument("--rho", type=float, help="time-step exponent")
    g.add_argument("--churn", type=float, help="S_churn (0 = deterministic Heun)")
    g.add_argument("--s-min", type=float, help="S_tmin: churn only for sigma >= this")
    g.add_argument("--s-max", type=float, help="S_tmax: churn only for sigma <= this")
    g.add_argument("--s-noise", type=float, help="S_noise")
    g.add_argument("--class", dest="class_label",
                   help="class for every seed, a number or a name in the shards' manifest (class folders); "
                        "class-conditional models; default: random per seed")
    g.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (1 = off; class-conditional models trained with label dropout)")
    g.add_argument("--guidance-interval", type=_interval, metavar="LO,HI",
                   help="guide only for sigma in (LO, HI] (Kynkaanniemi et al. 2024), e.g. 0.28,5.42; "
                        "default: the run's sample.guidance_interval")
    g.add_argument("--canvas", type=int, help="output size; larger than the training resolution extrapolates")


def _interval(text: str) -> list[float]:
    parts = text.split(",")
    try:
        lo, hi = (float(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI, two numbers such as 0.28,5.42 "
                                         "(inf allowed)") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LO < HI")
    return [lo, hi]


def sample_options(args, cfg):
    """The sampler settings: the run's ``sample`` section with the flags given on top, checked
    against the model (a UserError names the flag and says what to do)."""
    s = cfg.sample
    updates = {"steps": args.steps, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max,
               "rho": args.rho, "s_churn": args.churn, "s_min": args.s_min, "s_max": args.s_max,
               "s_noise": args.s_noise, "guidance": args.guidance, "guidance_interval": args.guidance_interval}
    s = dataclasses.replace(s, **{k: v for k, v in updates.items() if v is not None})
    canvas = args.canvas if args.canvas is not None else s.canvas
    label_dim = cfg.network.label_dim
    label = class_index(args.class_label, cfg)
    if canvas and canvas < cfg.data.resolution:
        raise UserError(f"--canvas {canvas} is smaller than the training resolution "
                        f"{cfg.data.resolution}; use 0 or a size >= {cfg.data.resolution}")
    if s.steps < 1:
        raise UserError(f"--steps must be at least 1, got {s.steps}")
    if label is not None and label_dim == 0:
        raise UserError(f"--class {args.class_label}: the model is unconditional (network.label_dim=0 "
                        f"in its config); leave --class out")
    if label is not None and not 0 <= label < label_dim:
        raise UserError(f"--class {args.class_label}: the model has {label_dim} classes; give one "
                        f"of 0..{label_dim - 1}")
    if args.guidance is not None and args.guidance != 1 and label_dim == 0:
        raise UserError(f"--guidance {args.guidance:g}: classifier-free guidance needs a class-conditional "
                        f"model trained with label dropout; this one is unconditional (network.label_dim=0): "
                        f"leave --guidance out")
    if args.guidance is not None and args.guidance != 1 and cfg.network.label_dropout == 0:
        print(f"pdiff: WARNING --guidance {args.guidance:g}: the model was trained without label dropout "
              f"(network.label_dropout=0), so its unconditional branch, which guidance mixes in, never trained; "
              f"expect poor samples (train with network.label_dropout=0.1 for guidance)", file=sys.stderr)
    return SampleOptions(sampler=s, class_label=label, canvas=canvas or 0)


def class_index(text: str | None, cfg) -> int | None:
    """--class as a number, or as a class name looked up in the manifest of the run's shards
    (data.path: the class folders' names)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        names = [str(c) for c in load_manifest(cfg.data.path).get("classes") or []]
    except (UserError, OSError, ValueError) as e:
        raise UserError(f"--class {text}: not a number, and the class names of the run's shards cannot be read "
                        f"(data.path={cfg.data.path!r}: {e}); give the class number") from None
    if text not in names:
        raise UserError(f"--class {text}: not a class of the run's shards ({cfg.data.path}: "
                        f"{', '.join(f'{i}={n}' for i, n in enumerate(names)) or 'no class names'})")
    return names.index(text)


def progress_bar(total: int, enabled: bool, desc: str):
    """A bar on a terminal; a line every PDIFF_PROGRESS_SECONDS in a log (pdiff.progress)."""
    return Progress(total, desc, "img", enabled=enabled)


def png_path(outdir: Path, seed: int, subdirs: bool) -> Path:
    return outdir / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png" if subdirs else outdir / f"{seed:06d}.png"


def save_png(image_hwc: np.ndarray, path: Path) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc
    Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").save(path)


def make_grid(images_nhwc: np.ndarray, cols: int = 0) -> np.ndarray:
    n, h, w, c = images_nhwc.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images_nhwc):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pdiff sample", description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    add_sampler_args(p)
    o = p.add_argument_group("outputs (at least one)")
    o.add_argument("--outdir", help="write one PNG per seed here (NNNNNN.png)")
    o.add_argument("--subdirs", action="store_true", help="PNGs in sub-folders of 1000 seeds (000000/, 001000/...)")
    o.add_argument("--npz", help="write all images to this .npz: images (N,H,W,C) uint8 (latents without a VAE: "
                                 "float32), seeds, labels")
    o.add_argument("--grid", help="write a grid PNG of the first --grid-count seeds")
    o.add_argument("--grid-count", type=int, default=64, help="seeds in the grid (the first ones)")
    o.add_argument("--grid-cols", type=int, default=0, help="grid columns (default: about square)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    args = p.parse_args(argv)
    if not (args.outdir or args.npz or args.grid):
        p.error("nothing to write: give --outdir, --npz and/or --grid")

    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    info = distributed.init(args.device)
    try:
        model, cfg, meta = load_model(args.snapshot, args.checkpoint, info.device)
        if info.is_main and meta.get("found_in"):
            print(f"pdiff sample: the newest snapshot in {meta['found_in']}: {meta['source']}", file=sys.stderr)
        options = sample_options(args, cfg)
        vae = load_run_vae(cfg, args.vae, info.device)     # None for pixel models
        latent = cfg.data.channels not in (1, 3) and vae is None
        if latent and (args.outdir or args.grid):
            print(f"pdiff sample: the model makes {cfg.data.channels}-channel latents and its run names no VAE; "
                  f"give the one its latents came from with --vae to get images, or write the latents "
                  f"(float32) with --npz only", file=sys.stderr)
            return 2
        mine = seeds[info.rank::info.world_size]
        grid_seeds = set(seeds[:args.grid_count]) if args.grid else set()
        keep_all = bool(args.npz)
        kept: dict[int, tuple[np.ndarray, int]] = {}
        outdir = Path(args.outdir) if args.outdir else None
        start = time.perf_counter()
        bar = progress_bar(len(seeds), info.is_main and not args.no_progress, "sample")
        try:
            for chunk, images, labels in iter_uint8(model, mine, args.batch, cfg.data.resolution,
                                                    cfg.data.channels, cfg.network.label_dim,
                                                    options, info.device, raw=latent, vae=vae):
                nhwc = images.permute(0, 2, 3, 1).cpu().numpy()
                labs = labels.cpu().numpy() if labels is not None else np.full(len(chunk), -1)
                for seed, img, lab in zip(chunk, nhwc, labs):
                    if outdir is not None:
                        save_png(img, png_path(outdir, seed, args.subdirs))
                    if keep_all or seed in grid_seeds:
                        kept[seed] = (img, int(lab))
                bar.update(min(len(chunk) * info.world_size, bar.total - bar.done))  # ranks advance alike
        finally:
            bar.close()
        if args.npz or args.grid:
            kept = gather_kept(kept, info, Path(args.npz or args.grid))
        if info.is_main:
            order = [s for s in seeds if s in kept]
            if args.npz:
                Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
                np.savez(args.npz, **{"latents" if latent else "images": np.stack([kept[s][0] for s in order])},
                         seeds=np.asarray(order, np.int64),
                         labels=np.asarray([kept[s][1] for s in order], np.int64))
            if args.grid:
                first = [s for s in seeds[:args.grid_count] if s in kept]
                grid = make_grid(np.stack([kept[s][0] for s in first]), args.grid_cols)
                save_png(grid, Path(args.grid))
            elapsed = time.perf_counter() - start
            where = ", ".join(x for x in (args.outdir, args.npz, args.grid) if x)
            print(f"pdiff sample: {len(seeds)} images from {meta.get('source')} "
                  f"(images_seen {meta.get('images_seen')}) in {elapsed:.1f}s on {info.world_size} "
                  f"process(es) -> {where}")
    finally:
        distributed.shutdown()
    return 0


def gather_kept(kept: dict, info, near: Path) -> dict:
    """Bring every rank's kept images to rank 0 through files beside the output (the output
    folder is shared by all ranks anyway), which keeps 50k images out of collective buffers."""
    if info.world_size == 1:
        return kept
    near.parent.mkdir(parents=True, exist_ok=True)
    part = near.parent / f".{near.name}.rank{info.rank}.npz"
    seeds = np.asarray(list(kept), np.int64)
    imgs = np.stack([kept[s][0] for s in seeds]) if len(seeds) else np.zeros((0, 1, 1, 1), np.uint8)
    np.savez(part, seeds=seeds, images=imgs, labels=np.asarray([kept[s][1] for s in seeds], np.int64))
    distributed.barrier()
    merged = {}
    if info.is_main:
        for r in range(info.world_size):
            f = near.parent / f".{near.name}.rank{r}.npz"
            with np.load(f) as z:
                for s, img, lab in zip(z["seeds"], z["images"], z["labels"]):
                    merged[int(s)] = (img, int(lab))
            f.unlink()
    distributed.barrier()
    return merged
