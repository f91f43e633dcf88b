"""Sampler throughput: images/s of `pdiff sample`'s path (seed-addressed noise, deterministic Heun,
fp32 as in EDM) at 35 and 79 network evaluations (18 and 40 steps), with the TFLOP/s that rate
means (forward FLOPs of the network on the full canvas x evaluations) and its MFU against the card's
dense TF32 peak (pdiff.flops; "n/a" on a CPU).

    python benchmarks/bench_sample.py --out benchmarks/results [--quick] [--device cpu|cuda]

Models: the tiny preset (32x32) and DDPM++ at 64x64 (the celeba64 preset, 61.8M parameters), with
random weights (throughput does not depend on them). One warm-up batch, then timed batches; on
CUDA the clock is synchronised. --quick times one batch per setting (under a minute on an H100);
on a CPU it skips DDPM++-64, which needs minutes per batch there. Prints a table and writes
sample_<machine>[_quick].json into --out, naming the CPU and GPU.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from pdiff.bench import machine_name, resolve_device, save_json

NFE_STEPS = {35: 18, 79: 40}   # Heun: 2N - 1 evaluations


def machine(device: torch.device) -> dict:
    from pdiff.bench import machine as describe_machine
    return {**describe_machine(), "device": str(device)}


def build(preset: str, device):
    from pdiff.config import load_config
    from pdiff.model import build_model, count_parameters
    cfg = load_config(preset)
    model = build_model(cfg).to(device).eval().requires_grad_(False)
    return model, cfg, count_parameters(model)


def bench_one(model, cfg, nfe: int, batch: int, batches: int, device) -> dict:
    from pdiff.generate import SampleOptions, generate
    from pdiff.config import SamplerConfig
    opts = SampleOptions(SamplerConfig(steps=NFE_STEPS[nfe]))
    res, ch = cfg.data.resolution, cfg.data.channels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generate(model, list(range(batch)), res, ch, cfg.network.label_dim,
             SampleOptions(SamplerConfig(steps=2)), device)  # warm-up: cuDNN autotuning, allocator
    sync()
    start = time.perf_counter()
    for b in range(batches):
        seeds = list(range(b * batch, (b + 1) * batch))
        generate(model, seeds, res, ch, cfg.network.label_dim, opts, device)
    sync()
    seconds = time.perf_counter() - start
    n = batch * batches
    from pdiff.flops import device_card, forward_flops_by_size, mfu
    tflop_per_s = forward_flops_by_size(cfg, [res])[res] * nfe * n / seconds / 1e12
    return {"nfe": nfe, "steps": NFE_STEPS[nfe], "batch": batch, "images": n, "seconds": round(seconds, 4),
            "images_per_s": round(n / seconds, 3), "tflop_per_s": tflop_per_s,
            "mfu": mfu(tflop_per_s, device_card(device), "fp32")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    p.add_argument("--quick", action="store_true", help="one timed batch per setting")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, help="images per batch (default: 256 tiny / 64 DDPM++ on CUDA, 8 / 2 on CPU)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    info = machine(device)
    gpu = device.type == "cuda"
    plan = [("tiny", "tiny", args.batch or (256 if gpu else 8)),
            ("ddpmpp64", "celeba64", args.batch or (64 if gpu else 2))]
    batches = 1 if args.quick else (3 if gpu else 1)
    results, skipped = [], []
    print(f"bench_sample on {machine_name(info)} (torch {torch.__version__}, {device})")
    print(f"{'model':<10} {'params':>11} {'NFE':>4} {'batch':>6} {'images/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for name, preset, batch in plan:
        if name == "ddpmpp64" and not gpu and args.quick:
            skipped.append({"model": name, "why": "CPU with --quick: minutes per batch"})
            print(f"{name:<10} skipped (CPU, --quick)")
            continue
        try:
            model, cfg, params = build(preset, device)
        except Exception as e:  # a missing network must not fail the suite
            skipped.append({"model": name, "why": f"cannot build: {e}"})
            print(f"{name:<10} skipped: {e}")
            continue
        for nfe in NFE_STEPS:
            r = bench_one(model, cfg, nfe, batch, batches, device)
            r |= {"model": name, "preset": preset, "params": params, "resolution": cfg.data.resolution}
            results.append(r)
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"{name:<10} {params:>11,} {nfe:>4} {batch:>6} {r['images_per_s']:>10.2f} {r['tflop_per_s']:>8.3g} "
                  f"{mfu:>6}", flush=True)
        del model
        if gpu:
            torch.cuda.empty_cache()
    report = {"benchmark": "bench_sample", "machine": info, "quick": args.quick,
              "precision": "fp32 (torch defaults, as pdiff sample)",
              "sampler": "deterministic Heun, seed-addressed noise",
              "results": results, "skipped": skipped}
    tag = re.sub(r"[^A-Za-z0-9]+", "_", info.get("gpu") or info["cpu"]).strip("_")[:60]
    path = save_json(report, Path(args.out) / f"sample_{tag}{'_quick' if args.quick else ''}.json", "sample")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
