"""End-to-end training throughput: full-image EDM (p = 1) against the patch schedule (p = 0.5 over
{R/4, R/2, R}) on the same network and global batch, eager and compiled, with the real data pipeline
feeding the real training loop (pdiff.train.train, run in this process with its log read back).

Per run: images/s and ms per image and per step over the log intervals after the first (which holds
the pipeline start), achieved TFLOP/s and MFU (from the trainer's log), the data-wait share, peak
memory and recompiles after the warm-up. Per mode: the schedule's cost per image relative to full
images. Targets: the schedule >= 2.5x cheaper per image than full images; data wait < 2% of step
time; the schedule at >= 40% MFU (where the card's peak is known).

    python benchmarks/bench_train.py --device cuda --batch 64 --synthetic 2048 --set data.workers=8
    python benchmarks/bench_train.py --config my.yaml --data shards/celeba64 --modes compile
    python benchmarks/bench_train.py --quick --device cpu      # seconds: tiny net, 16x16, checks it runs
    # the patch schedule only, compiled, streaming and then with the dataset on the GPU (data.cache):
    python benchmarks/bench_train.py --device cuda --modes compile --runs patch --cache none,device --synthetic 4096

Data: --data DIR (shards from `pdiff shard`), else data.path from the config, else --synthetic N
random images (written as shards in a temporary folder). The JSON (--out: a .json path or a folder,
default benchmarks/results/) is rewritten after every run, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdiff.config import load_config, to_dict
from pdiff.bench import (FULL_OVERRIDES, BenchInterrupted, bench_train, compare_train, default_interval_images,
                         machine, machine_name, paper_schedule_overrides, print_train, resolve_device, save_json,
                         synthetic_shards, variant)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SPEEDUP = 2.5          # schedule cheaper per image than full images, at least
TARGET_DATA_WAIT = 0.02       # share of step time spent waiting for data, at most
TARGET_MFU = 0.40             # the patch schedule's model FLOP utilisation (bf16), at least
QUICK = ["network.model_channels=8", "network.channel_mult=[1,2]", "network.num_blocks=1",
         "network.attn_resolutions=[8]", "data.resolution=16", "data.workers=0"]


def targets(modes: dict) -> list[dict]:
    out = []
    for mode, res in modes.items():
        if "comparison" in res:
            v = res["comparison"]["speedup_per_image_vs_full"]
            out.append({"target": f"{mode}: schedule >= {TARGET_SPEEDUP}x cheaper per image than full images",
                        "value": round(v, 3), "met": v >= TARGET_SPEEDUP})
        for run in ("full", "patch"):
            if run in res:
                v = res[run]["data_wait_share"]
                out.append({"target": f"{mode} {run}: data wait < {TARGET_DATA_WAIT:.0%} of step time",
                            "value": round(v, 4), "met": v < TARGET_DATA_WAIT})
        if res.get("patch", {}).get("mfu") is not None:
            v = res["patch"]["mfu"]
            out.append({"target": f"{mode} patch: >= {TARGET_MFU:.0%} MFU", "value": round(v, 4),
                        "met": v >= TARGET_MFU})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="celeba64", help="YAML file or preset (default celeba64: DDPM++ 64x64)")
    ap.add_argument("--batch", type=int, default=None,
                    help="global batch of full images (default: the config's; --quick: 4)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", default="eager,compile", help="comma list of eager,compile")
    ap.add_argument("--runs", default="full,patch",
                    help="full,patch (both: the comparison), or one of them: full-image EDM or the patch schedule")
    ap.add_argument("--cache", default="none",
                    help="comma list of data.cache modes to run each mode with (none,host,device)")
    ap.add_argument("--intervals", type=int, default=10,
                    help="measured log intervals per run (after one warm-up interval)")
    ap.add_argument("--interval-steps", type=int, default=3,
                    help="log interval = this many steps of the smallest patch size (4x as many full-image steps)")
    ap.add_argument("--wall-budget", type=float, default=0.0,
                    help="seconds per run at most, compile included (0 = none)")
    ap.add_argument("--data", default=None, help="shard folder (default: the config's data.path)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N", help="use N random images as shards instead")
    ap.add_argument("--encoding", default="png", help="encoding of the --synthetic shards")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", default=None, help=".json path or folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny network at 16x16, 2 short intervals: checks that it runs")
    args = ap.parse_args(argv)

    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("eager", "compile"):
            ap.error(f"--modes: {m!r} is not eager or compile")
    runs = [r for r in args.runs.split(",") if r]
    if not runs or any(r not in ("full", "patch") for r in runs):
        ap.error(f"--runs {args.runs!r}: give full, patch or full,patch")
    caches = [c for c in args.cache.split(",") if c]
    if not caches or any(c not in ("none", "host", "device") for c in caches):
        ap.error(f"--cache {args.cache!r}: give a comma list of none, host, device")
    overrides = (QUICK if args.quick else []) + list(args.set)
    batch = args.batch or (4 if args.quick else None)
    if batch:
        overrides.append(f"train.batch={batch}")
    if args.data:
        overrides.append(f"data.path={args.data}")
    cfg = load_config(args.config, overrides)
    device = resolve_device(args.device)
    if args.quick:
        args.intervals, args.interval_steps = min(args.intervals, 2), 1
    info = machine()
    payload = {"benchmark": "bench_train", "machine": info, "device": str(device), "config": cfg.name,
               "config_file": args.config, "overrides": overrides, "quick": args.quick,
               "batch_full_images": cfg.train.batch, "synthetic_images": args.synthetic or None,
               "patch_overrides": paper_schedule_overrides(cfg.data.resolution), "modes": {}, "errors": [],
               "targets": []}
    out, t0 = args.out or RESULTS, time.perf_counter()
    state = {"path": None}

    def save():
        payload["targets"] = targets(payload["modes"])
        payload["seconds"] = round(time.perf_counter() - t0, 1)
        state["path"] = save_json(payload, state["path"] or out, "train")

    print(f"bench_train: {cfg.name} on {machine_name(info)} ({device}), batch {cfg.train.batch} full images",
          flush=True)
    rc = 0
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        if args.synthetic:
            t = time.perf_counter()
            shards = synthetic_shards(tmp / "data", args.synthetic, cfg.data.resolution, cfg.data.channels,
                                      args.encoding, cfg.train.seed, workers=0 if not args.quick else 1)
            cfg = variant(cfg, [f"data.path={shards}"])
            print(f"synthetic data: {args.synthetic} {args.encoding} images in {time.perf_counter() - t:.1f} s",
                  flush=True)
        if not cfg.data.path:
            print("bench_train: no data: give --data DIR (or data.path in the config) or --synthetic N",
                  file=sys.stderr)
            return 2
        patch_cfg = variant(cfg, paper_schedule_overrides(cfg.data.resolution))
        interval_images = default_interval_images(patch_cfg, args.interval_steps)
        payload.update(interval_images=interval_images, intervals=args.intervals, data_backend=cfg.data.backend,
                       data_workers=cfg.data.workers, resolved_config=to_dict(cfg))
        for mode, cache in [(m, c) for m in modes for c in caches]:
            key = mode if cache == "none" else f"{mode} cache={cache}"
            mode_cfg = variant(cfg, [f"train.compile={'true' if mode == 'compile' else 'false'}",
                                     f"data.cache={cache}"])
            entry = payload["modes"].setdefault(key, {})

            def on_result(name, figures, entry=entry):
                entry[name] = figures
                save()
            try:
                if len(runs) == 2:
                    res = compare_train(mode_cfg, device, tmp / key, args.intervals, interval_images, args.wall_budget,
                                        paper_schedule_overrides(cfg.data.resolution), on_result=on_result)
                    entry["comparison"] = res["comparison"]
                else:
                    run_cfg = variant(mode_cfg, FULL_OVERRIDES if runs == ["full"]
                                      else paper_schedule_overrides(cfg.data.resolution))
                    on_result(runs[0], bench_train(run_cfg, device, tmp / key, args.intervals, interval_images,
                                                   args.wall_budget, label=runs[0]))
            except BenchInterrupted as e:
                payload["errors"].append({"mode": key, "error": f"interrupted: {e}"})
                save()
                print(f"bench_train: {e}; saved what was measured to {state['path']}", file=sys.stderr)
                return 3
            except Exception as e:        # one mode failing (compile, memory) must not lose the other
                payload["errors"].append({"mode": key, "error": f"{type(e).__name__}: {e}"})
                print(f"bench_train: {key} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                rc = 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            save()
            print(f"\n{key}:")
            print_train(entry)
            sys.stdout.flush()
    save()
    print("\ntargets:")
    for t in payload["targets"]:
        print(f"  [{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['value']}")
    print(f"wrote {state['path']}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
