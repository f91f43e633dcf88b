"""`pdiff ema reconstruct|sweep`: post-hoc EMA (EDM2) from the snapshots of a run trained with
ema.mode=power.

    pdiff ema reconstruct --run runs/celeba64 --std 0.07 [--at IMAGES] [--out FILE]
    pdiff ema sweep --run runs/celeba64 --stds 0.03:0.15:0.01 --fid-ref refs/celeba64.npz --inception WEIGHTS

reconstruct writes the average of width sigma_rel (--std) at a snapshot time (default: the newest)
as a snapshot (RUN/posthoc/ema-<images>-<std>.safetensors) that `pdiff sample --snapshot` and
`pdiff fid gen --snapshot` take. sweep reconstructs every std of a range in memory, scores each by
FID (the same seeds for every std), prints the table, writes the best one's snapshot and, with
--json, the scores. See docs/posthoc_ema.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from pdiff import distributed
from pdiff.fid import NO_VAE_GIVEN, FIDEvaluator, load_inception, load_stats
from pdiff.helpformat import HelpFormatter
from pdiff.posthoc import (parse_stds, power_snapshots, reconstruct, reconstruction_path, save_reconstruction,
                           snapshots_until)
from pdiff.snapshot import _build
from pdiff.tools.fid import add_inception_arg
from pdiff.tools.sample import add_sampler_args, progress_bar, sample_options
from pdiff.vae import load_run_vae


def cmd_reconstruct(args) -> int:
    snaps = power_snapshots(args.run)
    start = time.perf_counter()
    rec = reconstruct(snaps, args.std, args.at)
    path = save_reconstruction(rec, args.out or reconstruction_path(args.run, rec.images_seen, rec.std))
    print(f"pdiff ema reconstruct: sigma_rel {rec.std:g} (gamma {rec.gamma:.3f}) at {rec.images_seen:,} images "
          f"from {len(rec.sources)} snapshot(s) in {time.perf_counter() - start:.1f}s -> {path}")
    return 0


def cmd_sweep(args) -> int:
    stds = parse_stds(args.stds)
    snaps = power_snapshots(args.run)
    _, at = snapshots_until(snaps, args.at)
    ref = load_stats(args.fid_ref)
    info = distributed.init(args.device)
    try:
        net = load_inception(args.inception, info.device)
        rows, best, vae = [], None, None
        for std in stds:
            rec = reconstruct(snaps, std, at)
            model = _build(rec.cfg, rec.state, f"sigma_rel {std:g}", info.device)
            if vae is None:
                vae = load_run_vae(rec.cfg, args.vae, info.device)         # a latent model's decoder
            ev = FIDEvaluator(ref, net, args.num, args.batch, args.first_seed, sample_options(args, rec.cfg),
                              info.device, args.allow_resolution_mismatch, vae)
            bar = progress_bar(len(range(args.num)[info.rank::info.world_size]), info.is_main and not args.no_progress,
                               f"std {std:g}")
            try:
                fid = ev.compute(model, rec.cfg, bar, NO_VAE_GIVEN)
            finally:
                bar.close()
            rows.append({"std": std, "gamma": rec.gamma, "fid": fid})
            if info.is_main:
                print(f"pdiff ema sweep: sigma_rel {std:.3f} (gamma {rec.gamma:7.3f}): FID {fid:.4f}", flush=True)
            if best is None or fid < best[1]["fid"]:
                best = (rec, rows[-1])
        if info.is_main:
            rec, row = best
            path = save_reconstruction(rec, args.out or reconstruction_path(args.run, rec.images_seen, rec.std))
            print(f"pdiff ema sweep: best sigma_rel {row['std']:g} (FID {row['fid']:.4f} over {args.num} images at "
                  f"{at:,} images seen) -> {path}")
            if args.json:
                result = {"run": str(args.run), "images_seen": at, "num": args.num, "ref": args.fid_ref,
                          "results": rows, "best": row, "snapshot": str(path)}
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        distributed.shutdown()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pdiff ema", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{reconstruct,sweep}")
    sub_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)

    r = sub_parser("reconstruct", help="the average of any sigma_rel as a snapshot",
                   description="The power-function EMA of width --std at a snapshot time, rebuilt from the run's "
                               "power-EMA snapshots, written as a snapshot pdiff sample and pdiff fid take.")
    r.add_argument("--std", type=float, required=True, help="sigma_rel of the average to make, in (0, 0.2887)")
    r.add_argument("--out", help="snapshot to write (default RUN/posthoc/ema-<images>-<std>.safetensors)")

    s = sub_parser("sweep", help="FID of a range of sigma_rel; the best one's snapshot",
                   description="Every sigma_rel of --stds rebuilt in turn and scored by FID on the same seeds; "
                               "the table, the best one's snapshot and (--json) the scores.")
    s.add_argument("--stds", required=True,
                   help="start:stop:step (stop included), e.g. 0.03:0.15:0.01, or a comma list")
    s.add_argument("--fid-ref", required=True, help="reference statistics (pdiff fid ref)")
    s.add_argument("--num", type=int, default=10000, help="images per sigma_rel")
    s.add_argument("--first-seed", type=int, default=0, help="seeds first .. first+num-1, the same for every sigma_rel")
    s.add_argument("--out", help="where to write the best snapshot (default RUN/posthoc/...)")
    s.add_argument("--json", help="also write the scores here")
    s.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    s.add_argument("--allow-resolution-mismatch", action="store_true",
                   help="score against a reference of another image size anyway")
    s.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    s.add_argument("--vae", help="latent models: the VAE that decodes the samples (default: the run's)")
    add_inception_arg(s)
    add_sampler_args(s, seeds=False)
    for sp in (r, s):
        sp.add_argument("--run", required=True, help="run folder of a run trained with ema.mode=power")
        sp.add_argument("--at", type=int,
                        help="images seen of the snapshot time to reconstruct at (default: the newest)")
    args = p.parse_args(argv)
    return {"reconstruct": cmd_reconstruct, "sweep": cmd_sweep}[args.cmd](args)
