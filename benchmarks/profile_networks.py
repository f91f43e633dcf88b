"""Where a network's training step spends its time at each patch size (torch.profiler, eager).

    python benchmarks/profile_networks.py --net ddpmpp64 --out-dir DIR

Writes one kernel table per patch size (top CUDA kernels by total time) to DIR/profile_<net>_<s>.txt
and prints the top rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_networks import NETS, inputs, net_cfg, step
from pdiff.distributed import resolve_device
from pdiff.networks import build_network


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="ddpmpp64")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out-dir", default=".")
    args = ap.parse_args()
    device = resolve_device("auto")
    spec = NETS[args.net]
    torch.manual_seed(0)
    net = build_network(net_cfg(spec["cfg"]), spec["resolution"], spec["channels"]).to(device).train()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for size in spec["sizes"]:
        b = spec["batch"] * spec["resolution"] // size
        x, noise, labels = inputs(b, size, spec, device)
        for _ in range(2):
            step(net, x, noise, labels, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            for _ in range(3):
                net.zero_grad(set_to_none=True)
                step(net, x, noise, labels, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70)
        Path(args.out_dir, f"profile_{args.net}_{size}.txt").write_text(table)
        print(f"== {args.net} s={size} B={b} (3 steps)\n" + "\n".join(table.splitlines()[:14]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
