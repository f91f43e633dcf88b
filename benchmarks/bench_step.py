"""Training-step cost per patch size, and the patch schedule's cost per image against full images.

For each config: ms per training step (PatchLoss forward, backward, Adam on synthetic patches) and
images/s at each patch size with its batch multiplier (B full images -> B * R/s patches), then the
measured cost per image of the config's schedule (p = 0.5 in the presets) relative to full images
(p = 1), from the same run, next to the FLOP model's (about 0.37 for {R/4, R/2, R} with
(0.2, 0.3, 0.5)). The measuring code is pdiff.bench's (`pdiff bench step` runs the same).

    python benchmarks/bench_step.py                              # DDPM++ 32x32 and 64x64, this CPU
    python benchmarks/bench_step.py --device cuda --compile --batch 64 --configs celeba64
    python benchmarks/bench_step.py --device cuda --modes eager,compile --batch 64 --configs celeba64 --out step.json

--out is a folder (a timestamped step-*.json inside) or a .json path, rewritten after each result
so that a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pdiff.config import load_config
from pdiff.step import resolve_precision
from pdiff.bench import bench_step, machine, machine_name, print_step, resolve_device, save_json

RESULTS = Path(__file__).resolve().parent / "results"


def bench_config(name: str, batch: int, device: torch.device, compile_: bool, repeats: int,
                 precision: str, kernels: str, overrides: list[str] = ()) -> dict:
    cfg = load_config(name, [f"train.batch={batch}", *overrides])
    res = bench_step(cfg, device, compile_, precision, kernels, repeats)
    res["config"] = name
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="cifar10_32,celeba64")
    ap.add_argument("--batch", type=int, default=2, help="full images per step (patch steps carry B * R/s)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (= --modes compile)")
    ap.add_argument("--modes", default=None,
                    help="comma list of eager,compile (default: compile with --compile, else eager)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every config, e.g. --set network.model_channels=8")
    ap.add_argument("--out", default=None, help="results folder or .json path (default benchmarks/results)")
    ap.add_argument("--append", action="store_true", help="--out is a .json from an earlier run: add to its results")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision or "auto", device)
    modes = [m for m in (args.modes or ("compile" if args.compile else "eager")).split(",") if m]
    for m in modes:
        if m not in ("eager", "compile"):
            ap.error(f"--modes: {m!r} is not eager or compile")
    info = machine()
    payload = {"benchmark": "bench_step", "machine": info, "device": str(device), "batch": args.batch,
               "precision": precision, "results": [], "errors": []}
    out = args.out or RESULTS
    path = None
    if args.append:
        if not (args.out and args.out.endswith(".json")):
            ap.error("--append needs --out FILE.json")
        if Path(args.out).exists():
            earlier = json.loads(Path(args.out).read_text())
            payload["results"] = earlier.get("results", []) + payload["results"]
            payload["errors"] = earlier.get("errors", []) + payload["errors"]
    t0 = time.perf_counter()
    for name in args.configs.split(","):
        for mode in modes:
            try:
                res = bench_config(name, args.batch, device, mode == "compile", args.repeats, precision,
                                   args.kernels, args.set)
            except Exception as e:        # one config failing (memory, compile) must not lose the rest
                payload["errors"].append({"config": name, "mode": mode, "error": f"{type(e).__name__}: {e}"})
                print(f"\n{name} ({mode}) failed: {type(e).__name__}: {e}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            payload["results"].append(res)
            print(f"\non {machine_name(info)}:")
            print_step(res)
            payload["seconds"] = round(time.perf_counter() - t0, 1)
            path = save_json(payload, path or out, "step")
            sys.stdout.flush()
    path = save_json(payload, path or out, "step")
    print(f"\nsaved {path}")
    return 0 if payload["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
