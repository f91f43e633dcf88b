"""`pdiff info CONFIG [key=value ...]`: parameters, FLOPs per image at each patch size, and the
expected training cost per image of the patch schedule relative to full images."""
from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from pdiff.config import load_config
from pdiff.model import build_model, count_parameters
from pdiff.schedule import PatchSchedule


def forward_flops(model, channels: int, patch_size: int, label_dim: int) -> int:
    """FLOPs of one forward pass of F on one patch (counted on the meta device: nothing is run)."""
    x = torch.zeros(1, channels + 2, patch_size, patch_size, device="meta")
    noise = torch.zeros(1, device="meta")
    labels = torch.zeros(1, label_dim, device="meta") if label_dim else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.net(x, noise, labels)
    return int(counter.get_total_flops())


def describe(cfg) -> dict:
    with torch.device("meta"):
        model = build_model(cfg)
    model.eval()
    r, c = cfg.data.resolution, cfg.data.channels
    p = cfg.patch
    sch = PatchSchedule(r, cfg.train.batch, p.mode, p.real_p, p.sizes or None, p.probs or None,
                        duration_images=cfg.train.duration_images)
    sizes = sorted(set(sch.sizes) | {r})
    flops = {s: forward_flops(model, c, s, cfg.network.label_dim) for s in sizes}
    return {
        "config": cfg.name, "arch": cfg.network.arch, "resolution": r, "channels": c,
        "parameters": count_parameters(model),
        "forward_gflops_per_image": {s: flops[s] / 1e9 for s in sizes},
        # Training is forward + backward, about 3x the forward FLOPs.
        "train_gflops_per_image": {s: 3 * flops[s] / 1e9 for s in sizes},
        "schedule": {"mode": sch.mode, "sizes": sch.sizes, "probs": sch.probs,
                     "batch_multiplier": {s: sch.multiplier(s) for s in sch.sizes}},
        "cost_per_image_vs_full": sch.expected_cost_ratio(flops),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pdiff info", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML file or preset name")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    d = describe(load_config(args.config, args.overrides))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['config']}: {d['arch']} at {d['resolution']}x{d['resolution']}x{d['channels']}, "
          f"{d['parameters']:,} parameters")
    print(f"{'patch':>6} {'fwd GFLOP/img':>14} {'train GFLOP/img':>16} {'share':>6} {'x batch':>8}")
    sch = d["schedule"]
    for s, f in d["forward_gflops_per_image"].items():
        share = dict(zip(sch["sizes"], sch["probs"])).get(s, 0.0)
        mult = sch["batch_multiplier"].get(s, "-")
        print(f"{s:>6} {f:>14.3f} {3 * f:>16.3f} {share:>6.2f} {mult!s:>8}")
    print(f"schedule ({sch['mode']}): expected cost per image = {d['cost_per_image_vs_full']:.3f} x full images")
    return 0
