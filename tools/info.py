"""`pdiff info CONFIG [key=value ...]`: parameters, FLOPs per image at each patch size, and the
expected training cost per image of the patch schedule relative to full images."""
from __future__ import annotations

import argparse
import json

from pdiff.bench.flops import describe
from pdiff.config import load_config


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
    labels = (f" ({d['parameters_unconditional']:,} unconditional + {d['label_embedding_parameters']:,} in the "
              f"{d['label_dim']}-class label embedding)" if d["label_embedding_parameters"] else "")
    print(f"{d['config']}: {d['arch']} at {d['resolution']}x{d['resolution']}x{d['channels']}, "
          f"{d['parameters']:,} parameters{labels}")
    print(f"{'patch':>6} {'fwd GFLOP/img':>14} {'train GFLOP/img':>16} {'share':>6} {'x batch':>8}")
    sch = d["schedule"]
    for s, f in d["forward_gflops_per_image"].items():
        share = dict(zip(sch["sizes"], sch["probs"])).get(s, 0.0)
        mult = sch["batch_multiplier"].get(s, "-")
        print(f"{s:>6} {f:>14.3f} {3 * f:>16.3f} {share:>6.2f} {mult!s:>8}")
    print(f"schedule ({sch['mode']}): expected cost per image = {d['cost_per_image_vs_full']:.3f} x full images")
    return 0
