"""`pdiff info [--config] CONFIG [key=value ...] [--card H100] [--mfu 0.4]`: parameters, FLOPs per image and per
step at each patch size, the expected training cost per image of the patch schedule relative to full
images, and the images/s a card would train at a given model FLOP utilisation (bf16). `--blocks`: the
names repr.block takes (every module of the network)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pdiff.config import load_config
from pdiff.dataset import open_dataset
from pdiff.flops import CARDS, describe, device_card, find_card
from pdiff.helpformat import HelpFormatter
from pdiff.networks import network_blocks


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pdiff info", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("config", nargs="?", help="YAML file or preset name (with data.path set to existing shards, "
                                              "their resolution, channels and classes); or --config")
    ap.add_argument("--config", dest="config_flag", metavar="CONFIG",
                    help="the same, as the other subcommands take it")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.resolution=32 patch.real_p=0.25")
    ap.add_argument("--card", default=None,
                    help=f"GPU for the images/s at --mfu: {', '.join(c.name for c in CARDS)} "
                         f"(default: this machine's GPU, else H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.4,
                    help="model FLOP utilisation for the images/s figure (default 0.4)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--blocks", action="store_true", help="list the network's block names (for repr.block)")
    args = ap.parse_intermixed_args(argv)
    if args.config_flag:        # then a positional word is the first override
        args.overrides = ([args.config] if args.config else []) + args.overrides
        args.config = args.config_flag
    elif not args.config:
        ap.error("give a config: pdiff info --config FILE|PRESET [key=value ...]")
    if not 0 < args.mfu <= 1:
        ap.error(f"--mfu {args.mfu}: give a share of the peak in (0, 1], e.g. 0.4")
    card = find_card(args.card) if args.card else (device_card("cuda") or find_card("H100 SXM"))
    if card is None:
        print(f"pdiff info: --card {args.card}: not a card in the table; known cards: "
              f"{', '.join(c.name for c in CARDS)}", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    if cfg.data.path and Path(cfg.data.path).exists():     # the resolution, channels and classes of the shards
        cfg, source, notes = open_dataset(cfg)
        source.close()
        for line in notes:
            print(f"pdiff info: {line}", file=sys.stderr)
    if args.blocks:
        print("\n".join(network_blocks(cfg.network, cfg.data.resolution, cfg.data.channels)))
        return 0
    d = describe(cfg, card, args.mfu)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    labels = (f" ({d['parameters_unconditional']:,} unconditional + {d['label_embedding_parameters']:,} in the "
              f"{d['label_dim']}-class label embedding)" if d["label_embedding_parameters"] else "")
    print(f"{d['config']}: {d['arch']} at {d['resolution']}x{d['resolution']}x{d['channels']}, "
          f"{d['parameters']:,} parameters{labels}; a step carries train.batch={d['batch_full_images']} x R/s patches")
    print(f"{'patch':>6} {'fwd GFLOP/img':>14} {'train GFLOP/img':>16} {'train GFLOP/step':>17} {'share':>6} "
          f"{'x batch':>8}")
    sch = d["schedule"]
    shares = dict(zip(sch["sizes"], sch["probs"]))
    for s, f in d["forward_gflops_per_image"].items():
        step = d["train_gflops_per_step"].get(s)
        step_s = "-" if step is None else f"{step:,.0f}"
        print(f"{s:>6} {f:>14.3f} {d['train_gflops_per_image'][s]:>16.3f} {step_s:>17} {shares.get(s, 0.0):>6.2f} "
              f"{sch['batch_multiplier'].get(s, '-')!s:>8}")
    print(f"schedule ({sch['mode']}): expected cost per image = {d['cost_per_image_vs_full']:.3f} x full images, "
          f"{d['schedule_train_gflops_per_image']:.1f} train GFLOP per image, "
          f"{d['schedule_train_gflops_per_step']:,.0f} GFLOP per step")
    a = d["at_mfu"]
    print(f"at {a['mfu']:.0%} MFU on one {a['card']} ({a['peak_tflops']:g} TFLOP/s dense bf16): "
          f"{a['schedule_images_per_s']:,.0f} images/s with the schedule, {a['full_images_per_s']:,.0f} full images/s")
    return 0
