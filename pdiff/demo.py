"""`make demo`: the whole user path on real images an installed package ships.

scikit-learn's digits (1,797 scanned 8x8 handwritten digits) are upscaled (bicubic), written as
WebDataset shards with `pdiff shard` (as users shard their data), a small DDPM++ is trained on them
with the patch schedule for a few minutes on the CPU, conditioned on the digit, and the EMA model
samples a grid (a row per digit), written next to a grid of real digits for comparison. Nothing is
downloaded.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pdiff.config import load_config
from pdiff.model import one_hot_labels
from pdiff.monitor import image_grid, save_png
from pdiff.sampler import SeedNoise, sample_images
from pdiff.snapshot import load_snapshot
from pdiff.tools.shard import main as shard_main
from pdiff.train import train


def digits_npz(path: Path, resolution: int) -> Path:
    from sklearn.datasets import load_digits    # scikit-learn: the demo's extra, needed here only
    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC))
                    for im in imgs])
    np.savez(path, images=big, labels=d.target.astype(np.int64))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdiff demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="folder for the data, shards, run and grids")
    ap.add_argument("--config", default="digits", help="preset or YAML file (default: the digits preset)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.duration_images=20000")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # the demo always starts from scratch
    out.mkdir(parents=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.time()
    cfg = load_config(args.config, [f"data.path={out / 'shards'}", f"train.run_dir={out / 'run'}",
                                    *args.overrides])
    r = cfg.data.resolution
    npz = digits_npz(out / "digits.npz", r)
    print(f"[demo] wrote {npz}: scikit-learn digits upscaled to {r}x{r}", flush=True)
    rc = shard_main([str(npz), str(out / "shards"), "--resolution", str(r), "--channels", "1",
                     "--max-count", "400", "--quiet"])
    if rc:
        return rc
    train(cfg, device_preference="cpu")

    # The shards carry the digits' labels, so the model is class-conditional (network.label_dim is
    # taken from them): a row of 8 seeds per digit in one batch (seed s of row c is the image
    # `pdiff sample --seeds s --class c` draws).
    model, cfg, _ = load_snapshot(out / "run")
    n = 80
    noise = SeedNoise(range(n))
    labels = one_hot_labels(torch.arange(n) // 8, cfg.network.label_dim)
    x = sample_images(model, noise.randn((n, 1, r, r)), r, labels, steps=cfg.sample.steps, randn_like=noise.randn_like)
    save_png(image_grid(x, 8), out / "samples.png", scale=4)
    d = np.load(npz)
    real = [d["images"][d["labels"] == c][:8] for c in range(10)]
    real = np.concatenate(real).astype(np.float32) / 127.5 - 1
    save_png(image_grid(torch.from_numpy(real)[:, None], 8), out / "data.png", scale=4)
    print(f"[demo] done in {time.time() - t0:.0f} s", flush=True)
    print(f"[demo] samples: {(out / 'samples.png').resolve()}")
    print(f"[demo] real digits for comparison: {(out / 'data.png').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
