"""`pdiff bench data|step|train|sample|compare|quality --config FILE [key=value ...]`: throughput
and quality per cost on this machine, with this config and these shards, before a cluster is
committed to a run.

    pdiff bench data   --config my.yaml                   # pipeline patches/s per patch size and for the schedule
    pdiff bench data   --config my.yaml data.path=PIXELS data.resolution=256 data.channels=3 --online-vae VAE
                                                          # pixel shards + the VAE encoder in every step
    pdiff bench step   --config my.yaml --compile         # training step images/s per patch size, the schedule's cost
    pdiff bench train  --config my.yaml --compare         # the real training loop: images/s, data-wait share,
                                                          # full-image EDM (p = 1) next to the patch schedule
    pdiff bench sample --config my.yaml                   # sampler images/s at sample.steps
    pdiff bench compare --config my.yaml                  # = train --compare
    pdiff bench quality --config my.yaml --budget-hours 2 # quality vs cost: full images, the schedule, other
                                                          # patch sets and p; table, JSON and PNG plot

Warm-up (pipeline start, compilation) is excluded and figures are medians over repeats. Each command
prints a short table and writes a JSON file naming the machine (CPU model, cores, GPU and its memory,
library versions). ``--synthetic N`` writes N random images as shards in a temporary folder and uses
them when the config has no data (or to leave the user's data out of it). ``--quick`` runs a few
steps only (seconds on a CPU with a small network): a check that everything runs, not a measurement.

The measuring library is pdiff.bench (machine probe, timing, runs, tables); this is its command line.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdiff.bench import (BenchError, bench_data, bench_data_online_vae, bench_sample, bench_step, bench_train,
                         compare_train, default_interval_images, machine, machine_name, print_data, print_quality,
                         print_sample, print_step, print_train, resolve_device, save_json, synthetic_shards, variant)
from pdiff.bench.quality import Budget, bench_quality, make_metric, parse_patch_sets, plot_quality, quality_arms
from pdiff.config import load_config, to_dict
from pdiff.dataset import open_dataset
from pdiff.vae import load_vae

KINDS = ("data", "step", "train", "sample", "compare", "quality")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdiff bench", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--config", required=True, help="YAML file or preset name")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch=64 data.workers=8")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    ap.add_argument("--out", default=None,
                    help="JSON file, or a folder for a timestamped one (default: the current folder)")
    ap.add_argument("--quick", action="store_true", help="a few steps only: checks that it runs (seconds on a CPU)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats (data, step, sample); medians are reported")
    ap.add_argument("--steps", type=int, default=None, help="data: pipeline steps per repeat")
    ap.add_argument("--compile", action="store_true",
                    help="step: torch.compile the network; train: force train.compile=true (else the config's "
                         "train.compile decides; train.compile=false forces eager)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="step: default train.precision")
    ap.add_argument("--kernels", choices=["auto", "triton", "torch"], default=None, help="step: default train.kernels")
    ap.add_argument("--compare", action="store_true",
                    help="train: also run full-image EDM (patch.mode=full) and print the cost ratio per image")
    ap.add_argument("--intervals", type=int, default=None,
                    help="train: measured log intervals (after one warm-up interval)")
    ap.add_argument("--interval-images", type=int, default=None,
                    help="train: images per log interval (default: 3 steps of the smallest patch size)")
    ap.add_argument("--wall-budget", type=float, default=0.0, help="train: seconds per run at most (0 = none)")
    ap.add_argument("--batch", type=int, default=None, help="sample: images per batch (default min(train.batch, 16))")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="data/train: use N random images written as shards in a temporary folder")
    ap.add_argument("--encoding", default="png", help="--synthetic shards' encoding (png, jpeg, webp, raw)")
    ap.add_argument("--online-vae", metavar="VAE",
                    help="data: data.path holds pixel shards; encode every batch with this VAE (diffusers folder or "
                         "hub id), as training that runs the encoder in every step does")
    q = ap.add_argument_group("quality (docs/patch_defaults.md)")
    budget = q.add_mutually_exclusive_group()
    budget.add_argument("--budget-hours", type=float,
                        help="device-hours per arm (GPU wall-clock; on a CPU its CPU time)")
    budget.add_argument("--budget-images", type=float, help="images seen per arm")
    budget.add_argument("--budget-flops", type=float, help="training FLOPs per arm (the FLOP model's)")
    q.add_argument("--evals", type=int, default=None,
                   help="evaluation points per arm, evenly spaced over the budget (default 6)")
    q.add_argument("--eval-images", type=int, default=None, help="samples per evaluation (default 1000)")
    q.add_argument("--eval-steps", type=int, default=None, help="sampler steps per evaluation (default sample.steps)")
    q.add_argument("--eval-batch", type=int, default=64, help="sampling batch per evaluation")
    q.add_argument("--patch-sets", default="R/4,R/2,R;R/2,R",
                   help="patch sets to compare, ';' between sets (default: %(default)s)")
    q.add_argument("--p-values", default="0.25",
                   help="other shares p of full-size steps to compare, comma list (default: %(default)s)")
    q.add_argument("--inception", help="TF-FID Inception weights: the metric is FID (else a learned-feature distance)")
    q.add_argument("--fid-ref", help="FID reference statistics of the data (default: computed from data.path)")
    q.add_argument("--feature-steps", type=int, default=None,
                   help="training steps of the feature network (default 1500)")
    q.add_argument("--work-dir", help="keep every arm's run folder here (default: a temporary folder)")
    q.add_argument("--plot", help="PNG to write (default: next to the JSON, same name)")
    return ap


def quality(cfg, args, device: torch.device, work_dir: Path) -> dict:
    quick = args.quick
    given = [(k, v) for k, v in (("hours", args.budget_hours), ("images", args.budget_images),
                                 ("flops", args.budget_flops))
             if v is not None]
    arms = quality_arms(cfg, parse_patch_sets(args.patch_sets, cfg.data.resolution),
                        [float(x) for x in args.p_values.split(",") if x.strip()])
    evals = args.evals or (2 if quick else 6)
    if given:
        budget = Budget(*given[0])
    elif quick:     # one step of the arms' smallest patches (their steps carry the most images) per point
        budget = Budget("images", evals * max(default_interval_images(variant(cfg, a.overrides), 1) for a in arms))
    else:
        raise BenchError("give the budget per arm: --budget-hours H, --budget-images N or --budget-flops F")
    eval_steps = args.eval_steps or (2 if quick else cfg.sample.steps)
    metric = make_metric(cfg, device, args.eval_images or (4 if quick else 1000), args.eval_batch, eval_steps,
                         args.inception, args.fid_ref, args.feature_steps or (5 if quick else 1500))
    print(f"metric: {metric.description}", flush=True)

    def on_point(arm, pt):
        print(f"  {arm.name:<22} {pt['images']:>10,} images {pt['hours']:>9.4f} h {pt['flops']:>10.3g} FLOPs "
              f"{metric.key} {pt['metric']:.4f}", flush=True)
    return bench_quality(cfg, device, Path(args.work_dir) if args.work_dir else work_dir, budget, evals, metric,
                         arms, on_point=on_point)


def run(kind: str, cfg, args, device: torch.device, work_dir: Path) -> dict:
    quick = args.quick
    if kind == "data" and args.online_vae:
        vae = load_vae(args.online_vae, device)
        res = bench_data_online_vae(cfg, vae, device, steps=args.steps or (1 if quick else 5),
                                    repeats=args.repeats or 1, warmup_steps=1)
        print_data(res)
    elif kind == "data":
        res = bench_data(cfg, device, steps=args.steps or (3 if quick else 20),
                         repeats=args.repeats or (1 if quick else 3),
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
    elif kind == "quality":
        res = quality(cfg, args, device, work_dir)
        print_quality(res)
    else:
        res = bench_sample(cfg, device, batch=args.batch or (2 if quick else min(cfg.train.batch, 16)),
                           repeats=args.repeats or (1 if quick else 3))
        print_sample(res)
    return res


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    info = machine()
    print(f"pdiff bench {args.kind}: {cfg.name} on {machine_name(info)} ({device})", flush=True)
    with tempfile.TemporaryDirectory(prefix="pdiff-bench-") as tmp:
        tmp = Path(tmp)
        if args.synthetic:
            shards = synthetic_shards(tmp / "data", args.synthetic, cfg.data.resolution, cfg.data.channels,
                                      args.encoding, cfg.train.seed)
            cfg = variant(cfg, [f"data.path={shards}"])
        if args.kind in ("data", "train", "compare", "quality") and not cfg.data.path:
            print("pdiff bench: data.path is empty: give the shards (data.path=DIR) or --synthetic N", file=sys.stderr)
            return 2
        if cfg.data.path and (args.kind != "data" or not args.online_vae):
            # what the shards know (resolution, channels, classes; latent shards: their patch sizes and
            # VAE), as pdiff train takes it; --online-vae's pixel shards describe the images, not the model
            cfg, source, notes = open_dataset(cfg)
            source.close()
            for line in notes:
                print(f"pdiff bench: {line}", file=sys.stderr)
        t0 = time.perf_counter()
        res = run(args.kind, cfg, args, device, tmp / "runs")
    payload = {"benchmark": f"pdiff bench {args.kind}", "kind": args.kind, "machine": info, "config": cfg.name,
               "config_file": str(args.config), "overrides": args.overrides, "quick": args.quick,
               "synthetic_images": args.synthetic or None, "device": str(device),
               "seconds": round(time.perf_counter() - t0, 2), "resolved_config": to_dict(cfg), "results": res}
    path = save_json(payload, args.out, args.kind)
    print(f"wrote {path}")
    if args.kind == "quality":
        print(f"wrote {plot_quality(res, args.plot or path.with_suffix('.png'))}")
    return 0
