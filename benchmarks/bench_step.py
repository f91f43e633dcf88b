"""Training-step cost per patch size, and the patch schedule's cost per image against full images.

For each config: ms per training step (forward, backward, Adam) and images/s at each patch size
with its batch multiplier (B full images -> B * R/s patches), then the measured cost per image of
the default schedule (p = 0.5) relative to full images (p = 1), from the same run. The FLOP count
predicts about 0.37 for {R/4, R/2, R} with (0.2, 0.3, 0.5). JSON under benchmarks/results/.

    python benchmarks/bench_step.py                              # DDPM++ 32x32 and 64x64, this CPU
    python benchmarks/bench_step.py --device cuda --compile --batch 64 --configs celeba64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, machine_name, median, save, timed  # noqa: E402
from pdiff.config import load_config  # noqa: E402
from pdiff.coords import random_offsets  # noqa: E402
from pdiff.loss import sample_sigma  # noqa: E402
from pdiff.model import build_model, count_parameters  # noqa: E402
from pdiff.schedule import PatchSchedule  # noqa: E402
from pdiff.step import PatchLoss  # noqa: E402
from tools.info import describe  # noqa: E402


def bench_config(name: str, batch: int, device: torch.device, compile_: bool, repeats: int,
                 precision: str, kernels: str) -> dict:
    from kernels import resolve_backend
    cfg = load_config(name, [f"train.batch={batch}"])
    r, c = cfg.data.resolution, cfg.data.channels
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    backend = resolve_backend(kernels, device)
    net_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    step_module = PatchLoss(model, r, backend, net_dtype)
    if compile_:
        step_module.use_network(torch.compile(model.net, dynamic=False))
    full = PatchSchedule(r, batch, mode="full")
    patch = PatchSchedule(r, batch, real_p=0.5)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    per_size = {}
    for s in sorted(set(patch.sizes) | {r}):
        n = patch.batch_for(s)
        y = torch.rand(n, c, s, s, device=device) * 2 - 1
        off = random_offsets(n, s, r, device=device)
        sigma = sample_sigma(n, device=device)
        noise = torch.randn_like(y) if backend == "torch" else None

        def step():
            loss = step_module(y, off, sigma, noise, None, 1, 2)
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times = timed(step, repeats, warmup=2 if compile_ else 1, sync=sync)
        t = median(times)
        per_size[s] = {"patches": n, "ms_per_step": 1e3 * t, "images_per_s": n / t,
                       "ms_per_image": 1e3 * t / n}
    t_img = {s: v["ms_per_image"] for s, v in per_size.items()}
    measured = patch.expected_cost_ratio(t_img)
    flops = describe(cfg)
    return {"config": name, "arch": cfg.network.arch, "resolution": r, "parameters": count_parameters(model),
            "batch_full_images": batch, "compile": compile_, "precision": precision, "kernels": backend,
            "per_patch_size": per_size,
            "schedule_cost_per_image_vs_full": {"measured": measured, "flop_model": flops["cost_per_image_vs_full"]},
            "speedup_per_image_vs_full": 1 / measured}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="cifar10_32,celeba64")
    ap.add_argument("--batch", type=int, default=2, help="full images per step (patch steps carry B * R/s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    info = machine()
    results = []
    for name in args.configs.split(","):
        res = bench_config(name, args.batch, device, args.compile, args.repeats, precision, args.kernels)
        results.append(res)
        print(f"\n{name} ({res['parameters']:,} params) on {machine_name(info)}, {precision}, "
              f"compile={args.compile}, batch {args.batch} full images")
        print(f"{'patch':>6} {'patches':>8} {'ms/step':>10} {'img/s':>10} {'ms/img':>9}")
        for s, v in res["per_patch_size"].items():
            print(f"{s:>6} {v['patches']:>8} {v['ms_per_step']:>10.1f} {v['images_per_s']:>10.1f} {v['ms_per_image']:>9.2f}")
        c = res["schedule_cost_per_image_vs_full"]
        print(f"schedule p=0.5 cost per image vs full images: measured {c['measured']:.3f}, "
              f"FLOP model {c['flop_model']:.3f} ({res['speedup_per_image_vs_full']:.2f}x cheaper)")
    path = save("step", {"machine": info, "device": str(device), "results": results}, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
