"""`pdiff fid ref|calc|gen`: FID with the TF-FID Inception-v3 (numbers comparable with EDM's fid.py,
pytorch-fid and torch-fidelity).

    pdiff fid ref  --data shards/celeba64 --out refs/celeba64.npz
    pdiff fid calc --images out/celeba --ref refs/celeba64.npz
    pdiff fid gen  --snapshot SNAP --ref refs/celeba64.npz --num 50000 --sets 3

The Inception weights are pytorch-fid's pt_inception-2015-12-05-6726825d.pth: downloaded once into
the cache ($PDIFF_CACHE, default ~/.cache/pdiff) and taken from there after that; offline, put the
file there yourself or pass --inception FILE. Image sources: a folder of images (searched
recursively), an .npz with 'images' or 'x' (N, H, W, C) uint8, or a folder of WebDataset shards
written by `pdiff shard`.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pdiff import distributed
from pdiff.distributed import resolve_device
from pdiff.fid import (NO_VAE_GIVEN, FeatureStats, FIDError, FIDEvaluator, check_resolution, frechet_distance,
                       inception_features, load_inception, load_stats, save_stats, seed_sets, summarize)
from pdiff.helpformat import HelpFormatter
from pdiff.pipelines.sample_source import SourceError
from pdiff.pipelines.shards.encode_vae import EncodedImages
from pdiff.pipelines.shards.inputs import ShardInputError
from pdiff.pipelines.sources import open_source
from pdiff.snapshot import load_model
from pdiff.tools.sample import add_model_args, add_sampler_args, progress_bar, sample_options
from pdiff.vae import load_run_vae

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------
# Image sources: each yields uint8 NHWC arrays in a fixed order.

@dataclass
class ImageSource:
    description: str
    count: int
    side: int | None                      # image size when square (from the first image)
    batches: Callable[[int], Iterator[np.ndarray]]


def _decode(data: bytes | Path) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _stack(arrays: list[np.ndarray], where: Callable[[int], str]) -> np.ndarray:
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise FIDError(f"{where(i)} is {a.shape[1]}x{a.shape[0]} but earlier images are "
                             f"{shape[1]}x{shape[0]}; FID needs images of one size")
    return np.stack(arrays)


def folder_source(root: Path, limit: int | None) -> ImageSource:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise FIDError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    files = files[:limit] if limit else files
    from PIL import Image
    with Image.open(files[0]) as im:   # reads the header only
        w, h = im.size

    def batches(n: int):
        with ThreadPoolExecutor(4) as pool:
            for i in range(0, len(files), n):
                part = files[i:i + n]
                yield _stack(list(pool.map(_decode, part)), lambda j: str(part[j]))
    return ImageSource(f"{root} ({len(files)} images)", len(files), w if w == h else None, batches)


def npz_source(path: Path, limit: int | None) -> ImageSource:
    with np.load(path) as z:
        key = next((k for k in ("images", "x") if k in z.files), None)
        if key is None:
            raise FIDError(f"{path} has no 'images' or 'x' array (found {z.files}); "
                             f"expected (N, H, W, C) uint8 images")
        arr = z[key]
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise FIDError(f"{path}['{key}'] is {arr.dtype} {arr.shape}; expected (N, H, W, C) uint8")
    if arr.shape[3] not in (1, 3) and arr.shape[1] in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)   # NCHW files work too
    arr = arr[:limit] if limit else arr

    def batches(n: int):
        for i in range(0, len(arr), n):
            yield arr[i:i + n]
    side = arr.shape[1] if arr.shape[1] == arr.shape[2] else None
    return ImageSource(f"{path} ({len(arr)} images)", len(arr), side, batches)


def shard_source(root: Path, limit: int | None) -> ImageSource:
    """A `pdiff shard` folder (or another registered sample source), every image in index order,
    decoded by the pipelines' reader."""
    try:
        source = open_source(root)
    except (SourceError, KeyError) as e:
        raise FIDError(f"{root}: cannot read the shards: {e}") from None
    if source.latent is not None and source.latent.vae:        # pdiff encoded them: FID wants those images
        return encoded_images_source(root, source.manifest, limit)
    if source.encoding == "latent":
        raise FIDError(f"{root} holds latents, not images; decode them with your autoencoder and "
                         f"give the images (a folder or an .npz) as the FID reference")
    count = min(source.count, limit) if limit else source.count

    def batches(n: int):
        with ThreadPoolExecutor(4) as pool:
            for i in range(0, count, n):
                yield np.stack(list(pool.map(source.decode, range(i, min(i + n, count)))))
    return ImageSource(f"{root} ({source.count} images)", count, source.resolution, batches)


def encoded_images_source(root: Path, manifest: dict, limit: int | None) -> ImageSource:
    """The images a `pdiff shard --encode-vae` folder was encoded from, as the encoder saw them (its
    manifest's source through the same transform): reference statistics come from images, not latents."""
    try:
        images = EncodedImages(manifest)
    except ShardInputError as e:
        raise FIDError(f"{root}: {e}") from None
    count = min(images.count, limit) if limit else images.count

    def batches(n: int):
        try:
            yield from images.batches(n, count)
        except ShardInputError as e:
            raise FIDError(f"{root}: {e}") from None
    return ImageSource(f"{root} (the {images.count} images of {images.root} it encoded)", count,
                       images.resolution, batches)


def open_images(path: str, limit: int | None = None) -> ImageSource:
    p = Path(path)
    if p.is_dir() and (p / "manifest.json").exists():
        return shard_source(p, limit)
    if p.is_dir():
        return folder_source(p, limit)
    if p.is_file() and p.suffix == ".npz":
        return npz_source(p, limit)
    raise FIDError(f"{path} is neither an image folder, a shard folder with manifest.json, "
                     f"nor an .npz of images")


# --------------------------------------------------------------------------------------------

def add_inception_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", help="TF-FID Inception weights, a file or a URL (downloaded once into the cache); "
                                       "default: pytorch-fid's pt_inception-2015-12-05-6726825d.pth from the cache "
                                       "($PDIFF_CACHE, ~/.cache/pdiff), downloaded there the first time")
    p.add_argument("--fid-batch", type=int, default=100, help="images per Inception batch")


def source_stats(src: ImageSource, net, batch: int, device, progress: bool):
    """FeatureStats of every image of a source."""
    stats = FeatureStats(device=device)
    bar = progress_bar(src.count, progress, "features")
    try:
        for arr in src.batches(batch):
            x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
            stats.update(inception_features(net, x))
            bar.update(len(arr))
    finally:
        bar.close()
    return stats


def cmd_ref(args) -> int:
    device = resolve_device(args.device)
    net = load_inception(args.inception, device)
    src = open_images(args.data, args.max_images)
    start = time.perf_counter()
    stats, side = source_stats(src, net, args.fid_batch, device, not args.no_progress), src.side
    mu, sigma = stats.mean_cov()
    save_stats(args.out, mu, sigma, stats.count, side, source=str(args.data))
    print(f"pdiff fid ref: {stats.count} images of {side}x{side} from {src.description} -> {args.out} "
          f"({time.perf_counter() - start:.1f}s)")
    return 0


def cmd_calc(args) -> int:
    device = resolve_device(args.device)
    ref = load_stats(args.ref)
    p = Path(args.images)
    is_stats = False
    if p.suffix == ".npz" and p.is_file():
        with np.load(p) as z:
            is_stats = "mu" in z.files
    if is_stats:  # two statistics files
        cur = load_stats(p)
        if cur.resolution is not None:
            check_resolution(ref, cur.resolution, args.allow_resolution_mismatch)
        fid, count = frechet_distance(cur.mu, cur.sigma, ref.mu, ref.sigma), cur.count
    else:
        src = open_images(args.images, args.num)
        if src.side is not None:  # before any feature is computed
            check_resolution(ref, src.side, args.allow_resolution_mismatch)
        net = load_inception(args.inception, device)
        stats = source_stats(src, net, args.fid_batch, device, not args.no_progress)
        fid, count = stats.fid_against(ref), stats.count
    result = {"fid": fid, "images": args.images, "count": count, "ref": args.ref}
    print(f"pdiff fid calc: FID {fid:.4f} ({count} images of {args.images} vs {args.ref})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_gen(args) -> int:
    ref = load_stats(args.ref)
    info = distributed.init(args.device)
    try:
        net = load_inception(args.inception, info.device)
        model, cfg, meta = load_model(args.snapshot, args.checkpoint, info.device)
        options = sample_options(args, cfg)
        vae = load_run_vae(cfg, args.vae, info.device)         # a latent model's decoder
        fids = []
        for k, seeds in enumerate(seed_sets(args.first_seed, args.num, args.sets)):
            ev = FIDEvaluator(ref, net, len(seeds), args.batch, seeds[0], options, info.device,
                              args.allow_resolution_mismatch, vae)
            bar = progress_bar(len(seeds[info.rank::info.world_size]), info.is_main and not args.no_progress,
                               f"set {k + 1}/{args.sets}")
            try:
                fids.append(ev.compute(model, cfg, bar, NO_VAE_GIVEN))
            finally:
                bar.close()
            if info.is_main:
                print(f"pdiff fid gen: set {k + 1} (seeds {seeds[0]}-{seeds[-1]}): FID {fids[-1]:.4f}", flush=True)
        if info.is_main:
            result = summarize(fids) | {"num": args.num, "sets": args.sets, "ref": args.ref,
                                        "model": args.snapshot or meta.get("source"),
                                        "images_seen": meta.get("images_seen"),
                                        "sampler": {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v)
                                                    for k, v in vars(options.sampler).items()},
                                        "class": options.class_label, "canvas": options.canvas}
            print(f"pdiff fid gen: FID mean {result['mean']:.4f}, min {result['min']:.4f} over "
                  f"{args.sets} set(s) of {args.num} images")
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    finally:
        distributed.shutdown()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pdiff fid", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{ref,calc,gen}")
    sub_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)

    r = sub_parser("ref", help="reference statistics (mu, sigma) of a dataset",
                   description="Reference statistics (mu, sigma of the Inception features) of a dataset.")
    r.add_argument("--data", required=True, help="shard folder (manifest.json), image folder or .npz")
    r.add_argument("--out", required=True, help="statistics file to write (.npz)")
    r.add_argument("--max-images", type=int, help="use only the first N images")
    r.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")

    c = sub_parser("calc", help="FID of an image folder or .npz against a reference",
                   description="FID of an image folder, an .npz of images or a statistics .npz against a reference.")
    c.add_argument("--images", required=True, help="image folder, .npz of images, or a statistics .npz")
    c.add_argument("--ref", required=True, help="reference statistics (.npz from 'fid ref', EDM's or pytorch-fid's)")
    c.add_argument("--num", type=int, help="use only the first N images")
    c.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    c.add_argument("--json", help="also write the result here")

    g = sub_parser("gen", help="sample and score without writing images",
                   description="Sample from a snapshot or checkpoint and score the samples without writing "
                               "images: --sets seed sets of --num images, their mean and min FID.")
    add_model_args(g)
    add_sampler_args(g, seeds=False)
    g.add_argument("--ref", required=True, help="reference statistics (.npz from 'fid ref', EDM's or pytorch-fid's)")
    g.add_argument("--num", type=int, default=50000, help="images per seed set (default 50000)")
    g.add_argument("--sets", type=int, default=3, help="seed sets: report mean and min (default 3, as EDM)")
    g.add_argument("--first-seed", type=int, default=0, help="set k uses seeds first + k*num ... ")
    g.add_argument("--json", help="also write the result here")

    for sp in (r, c, g):
        add_inception_arg(sp)
        sp.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    for sp in (c, g):
        sp.add_argument("--allow-resolution-mismatch", action="store_true",
                        help="score against a reference of another image size anyway")
    args = p.parse_args(argv)
    return {"ref": cmd_ref, "calc": cmd_calc, "gen": cmd_gen}[args.cmd](args)
