"""Latent training data: `pdiff bench data` on posterior latent shards (`pdiff shard --encode-vae`:
the encoder runs once, offline) against pixel shards with the VAE encoder run on every batch, as
the official Patch Diffusion code does. Images/s and images per CPU-second of each data path, their
ratio, and what the one offline encoding cost. Writes JSON naming the machine under
benchmarks/results/ (docs/benchmarks.md's table reads it: benchmarks/make_table.py).

    python benchmarks/bench_latent_data.py                     # 256x256 images, the SD VAE's architecture
    python benchmarks/bench_latent_data.py --vae stabilityai/sd-vae-ft-mse --device cuda
    python benchmarks/bench_latent_data.py --quick             # a tiny VAE at 32x32: checks that it runs

Without --vae the encoder is an AutoencoderKL with the Stable Diffusion VAE's architecture (83.7M
parameters, 256x256x3 -> 32x32x4) and random weights: its cost does not depend on the weights, and
nothing is downloaded. Images are synthetic (smooth colour fields plus noise). Both data paths run
the torch backend with data.workers=0, so the process's CPU time is all the CPU time they take.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pdiff.bench import bench_data, bench_data_online_vae, machine, machine_name, resolve_device, save_json, variant
from pdiff.bench import synthetic_shards
from pdiff.config import load_config
from pdiff.latent import with_data_defaults
from pdiff.pipelines.shards import write_shards
from pdiff.vae import load_vae

# The Stable Diffusion VAE (sd-vae-ft-mse, SD 1.x/2.x): what diffusers' config.json of those models says.
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.18215)


def random_vae_folder(folder: Path, config: dict, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    AutoencoderKL(**config).save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", help="a diffusers AutoencoderKL (folder or hub id); default: the SD VAE's architecture, "
                                 "random weights")
    p.add_argument("--resolution", type=int, default=256, help="image side (default 256)")
    p.add_argument("--images", type=int, default=24, help="synthetic images (default 24)")
    p.add_argument("--batch", type=int, default=4, help="full images per step (default 4)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of the online path (the latent path runs 10x)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a tiny VAE at 32x32: checks that everything runs")
    p.add_argument("--out", default="benchmarks/results", help="JSON file or folder")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    resolution = 32 if args.quick else args.resolution
    info = machine()
    print(f"bench_latent_data: {resolution}x{resolution} on {machine_name(info)} ({device})", flush=True)
    with tempfile.TemporaryDirectory(prefix="pdiff-latent-") as tmp:
        tmp = Path(tmp)
        vae_source = args.vae or str(random_vae_folder(tmp / "vae", TINY_VAE if args.quick else SD_VAE))
        vae = load_vae(vae_source, device)
        pixels = synthetic_shards(tmp / "data", args.images, resolution, 3, "png", min_shards=2)

        # offline: the encoder once per image (what `pdiff shard --encode-vae` costs)
        t, c = time.perf_counter(), time.process_time()
        m = write_shards(tmp / "data" / "images.npz", tmp / "latents", encode_vae=vae_source, device=str(device),
                         vae_batch=args.batch, workers=1, min_shards=2, progress=False)
        offline = {"seconds_per_image": (time.perf_counter() - t) / m["count"],
                   "cpu_s_per_image": (time.process_time() - c) / m["count"], "images": m["count"]}
        print(f"offline encoding: {offline['cpu_s_per_image']:.3f} CPU-s per image, once", flush=True)

        base = ["data.backend=torch", "data.workers=0", f"train.batch={args.batch}", "train.seed=0"]
        latent_cfg = with_data_defaults(variant(load_config("tiny_latent", base), [
            f"data.path={tmp / 'latents'}", f"data.resolution={m['resolution']}", "data.channels=4",
            "patch.sizes=[]", "patch.probs=[]"]))
        latent = bench_data(latent_cfg, device, steps=10 * args.steps, repeats=3, warmup_steps=2)
        pixel_cfg = variant(load_config("tiny_latent", base), [f"data.path={pixels}", f"data.resolution={resolution}",
                                                               "data.channels=3"])
        online = bench_data_online_vae(pixel_cfg, vae, device, steps=args.steps, repeats=1, warmup_steps=1)

    lat, onl = latent["results"]["schedule"], online["results"]["online-vae"]
    record = dict(vae.record, source=args.vae or ("tiny AutoencoderKL, random weights" if args.quick else
                                                  "the SD VAE's architecture (sd-vae-ft-mse), random weights"))
    ratio_cpu = lat["images_per_cpu_s"] / onl["images_per_cpu_s"]
    ratio_wall = lat["images_per_s"] / onl["images_per_s"]
    print(f"latent shards:      {lat['images_per_s']:10.4g} images/s, {lat['images_per_cpu_s']:10.4g} images per CPU-s")
    print(f"pixels + online VAE:{onl['images_per_s']:10.4g} images/s, {onl['images_per_cpu_s']:10.4g} images per CPU-s")
    print(f"latent shards vs online encoding: {ratio_cpu:.0f}x images per CPU-second ({ratio_wall:.0f}x images/s); "
          f"the offline encoding costs {offline['cpu_s_per_image'] / onl['cpu_s_per_image']:.2f} of one online epoch")
    payload = {"benchmark": "bench_latent_data", "machine": info, "device": str(device), "quick": args.quick,
               "image_resolution": resolution, "latent_resolution": m["resolution"], "images": args.images,
               "batch": args.batch, "vae": record, "parameters": sum(p.numel() for p in vae.model.parameters()),
               "latent_shards": latent, "online_vae": online, "offline_encoding": offline,
               "ratio_images_per_cpu_s": ratio_cpu, "ratio_images_per_s": ratio_wall,
               "note": "CPU seconds are the process's (all threads); both paths ran in-process (data.workers=0)"}
    out = Path(args.out)
    path = save_json(payload, out, "latent-data" + ("-quick" if args.quick else ""))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
