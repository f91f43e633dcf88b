"""`pdiff shard`: write a dataset as WebDataset tar shards with DALI indexes and a manifest.

    pdiff shard SRC OUT [--resolution R] [--transform none|center-crop|center-crop-dhariwal|resize]
                        [--channels auto|1|3] [--format png|jpeg|webp|raw|latent] [--quality Q]
                        [--max-count N] [--max-bytes B] [--min-shards K] [--on-error stop|skip]
                        [--seed S | --source-order] [--encode-vae VAE [--vae-batch N] [--device D]] ...
    pdiff shard verify DIR [--workers N]   sizes, checksums, a decode of every sample; lists the damaged ones
    pdiff shard info DIR                   what the manifest holds

SRC: a folder of images (class sub-folders become labels; an image deeper down is labelled by its
top folder, and the summary counts those), a .zip of images (EDM dataset.json labels honoured), or a
.npz/.npy uint8 array (N, H, W[, C]) with optional labels. In a folder or a zip, files that are not
images (.DS_Store, Thumbs.db, LICENSE.txt, ...) and hidden files are ignored and named in the
summary; images that fail to decode follow --on-error. OUT lies outside SRC, and one `pdiff shard`
writes into an OUT at a time (OUT/.pdiff-shard.lock names it; a second is refused).

Sizes: without --resolution every image must be of one square size (images of several sizes are
named before anything is written: give --resolution R --transform center-crop). R must be one the
default patch sizes and network train: a multiple of 16 below 64 px and of 32 from 64 (16, 32, 48,
64, 96, 128, ...; docs/patch_defaults.md); images smaller than R are enlarged, and counted in the
summary. Exit status: 0 done, 1 a problem with the data or files, 2 a usage error.

Samples are written in a random order drawn from --seed (so that a reader streaming the shards sees
mixed classes), each with a CRC-32 in the manifest that training checks before decoding it. Labels
are WebDataset .cls members (decimal text). Progress: a bar on a terminal, else a line every 30 s
(PDIFF_PROGRESS_SECONDS).

Latent diffusion: --encode-vae VAE (diffusers' AutoencoderKL: a local folder or a hub id such as
stabilityai/sd-vae-ft-mse; needs `pip install 'pdiff[latent]'`) encodes the images, after the
--resolution/--transform step, in batches of --vae-batch on the GPU where there is one, and stores
each one's posterior mean and std (8 channels for the SD VAE, --dtype float16 by default); training
draws a fresh latent from it each time (pdiff train fills in the VAE's scale and patch sizes {R/2, R}).

    pdiff shard ~/imagenet/train shards/in256 --resolution 256 --transform center-crop-dhariwal \
        --encode-vae stabilityai/sd-vae-ft-mse

Your own latents: --format latent takes a .npy/.npz float array (N, H, W, C), or (N, C, H, W) with --layout
nchw, any number of channels, and stores each sample as float16 (default) or float32 (--dtype) bytes,
values as given (no transform). --latent-scale records the factor they already carry: multiply
Stable Diffusion VAE latents by 0.18215 before sharding and pass --latent-scale 0.18215.
"""
from __future__ import annotations

import argparse
import sys

from pdiff.helpformat import HelpFormatter
from pdiff.pipelines.sample_source import ENCODINGS
from pdiff.pipelines.remote import is_url, upload_shards
from pdiff.pipelines.shards import LAYOUTS, TRANSFORMS, info, verify, write_shards
from pdiff.pipelines.shards.inputs import ShardUsageError
from pdiff.pipelines.shards.preprocess import resolution_refusal

__all__ = ["main", "write_shards", "verify", "info"]


def _size(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    t = text.strip().lower().rstrip("b")
    try:
        for u in sorted(units, key=len, reverse=True):
            if t.endswith(u):
                return int(float(t[:-len(u)]) * units[u])
        return int(t)
    except ValueError:      # argparse names the option before this message
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with a unit k, M, G "
                                         f"(powers of 1000) or Ki, Mi, Gi (of 1024), e.g. 500M or 1Gi") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdiff shard", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("source", help="folder, .zip, .npz or .npy")
    p.add_argument("out", help="output folder (created), or an s3:// or gs:// URL (written locally, then uploaded "
                               "shard by shard, the manifest last)")
    p.add_argument("--resolution", type=int, help="R (a multiple of 16 below 64, of 32 from 64); default: the size "
                                                  "of the images (they must all match)")
    p.add_argument("--transform", choices=TRANSFORMS, default="none",
                   help="to R x R: none (sizes must match), center-crop (crop the centre square, Lanczos), "
                        "center-crop-dhariwal (ADM's: halve, bicubic, crop), or resize (stretch)")
    p.add_argument("--channels", choices=["auto", "1", "3"], default="auto",
                   help="1 = grayscale, 3 = RGB, auto = as the first image")
    p.add_argument("--format", dest="encoding", choices=ENCODINGS, default=None,
                   help="png (lossless, default), jpeg, webp, raw uint8 (no decode, larger), or latent (float "
                        "arrays; the default with --encode-vae)")
    p.add_argument("--encode-vae", metavar="VAE",
                   help="encode the images with this AutoencoderKL (diffusers folder or hub id) into posterior latents")
    p.add_argument("--vae-batch", type=int, default=32, help="--encode-vae: images per encoder pass")
    p.add_argument("--encode-features", metavar="ENCODER",
                   help="store a frozen encoder's feature grid per sample, for repr.loss=align: FILE.py:FACTORY, a "
                        "TorchScript FILE.pt, or dinov2_vits14/b14/l14/g14 (docs/representation.md)")
    p.add_argument("--features-batch", type=int, default=32, help="--encode-features: images per encoder pass")
    p.add_argument("--device", default="auto",
                   help="--encode-vae / --encode-features: the encoder's device (auto: the GPU if any)")
    p.add_argument("--layout", choices=LAYOUTS, default="nhwc", help="latent: the array's axis order")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="latent: stored element type")
    p.add_argument("--latent-scale", type=float, default=None,
                   help="latent: the scale factor the values already carry (recorded, not applied; default 1)")
    p.add_argument("--quality", type=int, default=95, help="jpeg/webp quality (webp 100 = lossless)")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most")
    p.add_argument("--max-bytes", type=_size, default=1 << 30, help="bytes per shard at most (e.g. 500M, 1Gi)")
    p.add_argument("--min-shards", type=int, default=1, help="at least this many shards (>= ranks x workers)")
    p.add_argument("--name", default="data", help="shard name prefix: NAME-000000.tar")
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                   help="bad inputs: stop at the first, or skip and count them (each is reported)")
    p.add_argument("--workers", type=int, default=0, help="processes; 0 = all cores")
    p.add_argument("--seed", dest="shuffle_seed", type=int, default=0, help="the random order samples are written in")
    p.add_argument("--source-order", action="store_true", help="write samples in the source's order instead")
    p.add_argument("--images-key", help=".npz: array holding the images")
    p.add_argument("--labels-key", help=".npz: array holding the labels")
    p.add_argument("--labels", dest="labels_file", help=".npy source: a .npy of integer labels")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdiff shard verify", description="Check a shard folder against its manifest: "
                                "sizes, sha256s, each sample's CRC-32, a decode of every sample and its label. "
                                "Every damaged sample is listed (shard, key, byte offset). Exit status 1 if any.",
                                formatter_class=HelpFormatter)
    p.add_argument("folder", help="a folder written by `pdiff shard`")
    p.add_argument("--workers", type=int, default=0, help="processes, one shard each at a time; 0 = all cores")
    p.add_argument("--quiet", action="store_true", help="no progress")
    return p


def _info_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdiff shard info", description="Say what a shard folder holds: samples, "
                                "resolution, channels, encoding, labels, shards, and the command that wrote it.",
                                formatter_class=HelpFormatter)
    p.add_argument("folder", help="a folder written by `pdiff shard`")
    return p


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "info":
        print(info(_info_parser().parse_args(argv[1:]).folder))
        return 0
    if argv and argv[0] == "verify":
        args = _verify_parser().parse_args(argv[1:])
        ok, msg = verify(args.folder, workers=max(0, args.workers), progress=not args.quiet)
        print(msg, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    args = _parser().parse_args(argv)
    opts = vars(args)
    quiet = opts.pop("quiet")
    src, out = opts.pop("source"), opts.pop("out")
    if opts.pop("source_order"):
        opts["shuffle_seed"] = None
    opts["channels"] = "auto" if opts["channels"] == "auto" else int(opts["channels"])
    if opts["resolution"] is not None and not opts["encode_vae"] and opts["encoding"] != "latent":
        refusal = resolution_refusal(opts["resolution"])     # pixel shards: what a default run trains on
        if refusal:
            raise ShardUsageError(refusal)
    write = upload_shards if is_url(out) else write_shards      # a URL: staged locally, uploaded shard by shard
    write(src, out, progress=False if quiet else None, command=["pdiff", "shard"] + argv, **opts)
    return 0
