"""The FLOP model: parameters, FLOPs per image at each patch size (counted on the meta device,
nothing is run), and the schedule's expected cost per image relative to full images."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

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
    """What `pdiff info` prints: parameters, GFLOPs per image at each size, the schedule and its
    expected cost per image relative to full images."""
    with torch.device("meta"):
        model = build_model(cfg)
        # the published counts are of unconditional networks: the label embedding is stated apart
        unconditional = count_parameters(build_model(dataclasses.replace(
            cfg, network=dataclasses.replace(cfg.network, label_dim=0))))
    model.eval()
    r, c = cfg.data.resolution, cfg.data.channels
    sch = PatchSchedule.from_config(cfg)
    sizes = sorted(set(sch.sizes) | {r})
    flops = {s: forward_flops(model, c, s, cfg.network.label_dim) for s in sizes}
    return {
        "config": cfg.name, "arch": cfg.network.arch, "resolution": r, "channels": c,
        "label_dim": cfg.network.label_dim,
        "parameters": count_parameters(model),
        "parameters_unconditional": unconditional,
        "label_embedding_parameters": count_parameters(model) - unconditional,
        "forward_gflops_per_image": {s: flops[s] / 1e9 for s in sizes},
        # Training is forward + backward, about 3x the forward FLOPs.
        "train_gflops_per_image": {s: 3 * flops[s] / 1e9 for s in sizes},
        "schedule": {**sch.summary(), "batch_multiplier": {s: sch.multiplier(s) for s in sch.sizes}},
        "cost_per_image_vs_full": sch.expected_cost_ratio(flops),
    }
