"""The FLOP model: parameters, FLOPs per image at each patch size (counted once on the meta device
with torch's flop counter: nothing is run), the schedule's expected cost per image relative to full
images, and the yardstick every throughput figure is held against: the card's dense peak, so that
images/s become TFLOP/s and model FLOP utilisation (MFU).

Training FLOPs are 3x the forward's (the backward computes gradients for inputs and weights, each
about one forward). MFU = achieved training FLOP/s / (peak FLOP/s x devices), against the dense
(no 2:4 sparsity) tensor-core peak of the precision the step runs in: bf16 for bf16 autocast, TF32
for fp32 (PyTorch runs fp32 convolutions on TF32 tensor cores by default, cudnn.allow_tf32). On a
CPU, or a card not in the table, MFU is None ("n/a"): there is no agreed peak to hold it against.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from pdiff.model import build_model, count_parameters
from pdiff.schedule import PatchSchedule

TRAIN_FLOPS_PER_FORWARD = 3


@dataclass(frozen=True)
class Card:
    """A GPU's dense tensor-core peaks in TFLOP/s (NVIDIA's data sheets halve their "with
    sparsity" figures for these)."""
    name: str
    bf16: float
    tf32: float
    tokens: tuple[str, ...]     # all of them in the device name (upper case) -> this card

    def peak_tflops(self, precision: str) -> float:
        """The peak that the step's precision can reach: bf16 autocast -> bf16, fp32 -> TF32."""
        return self.bf16 if precision == "bf16" else self.tf32


# Most specific first: "H100 PCIe" and "H100 NVL" before the plain "H100" (the SXM part, whose
# device name is e.g. "NVIDIA H100 80GB HBM3").
CARDS = (
    Card("H100 NVL", 835.5, 417.5, ("H100", "NVL")),
    Card("H100 PCIe", 756.5, 378.0, ("H100", "PCIE")),
    Card("H100 SXM", 989.4, 494.7, ("H100",)),
    Card("H200 NVL", 835.5, 417.5, ("H200", "NVL")),
    Card("H200", 989.4, 494.7, ("H200",)),
    Card("A100", 312.0, 156.0, ("A100",)),
    Card("L40S", 362.05, 183.0, ("L40S",)),
)


def find_card(name: str | None) -> Card | None:
    """The table's card for a device name as torch reports it ("NVIDIA H100 80GB HBM3") or as a
    person writes it ("h100", "H100 PCIe", "l40s"); None when the table has no such card."""
    if not name:
        return None
    words = set(name.upper().replace("-", " ").replace("_", " ").split())     # whole words: "A1000" is no A100
    for card in CARDS:
        if all(t in words for t in card.tokens):
            return card
    return None


def device_card(device) -> Card | None:
    """The card ``device`` is (None on a CPU or a card the table lacks)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return find_card(torch.cuda.get_device_name(device))


def mfu(tflop_per_s: float, card: Card | None, precision: str, devices: int = 1) -> float | None:
    """Achieved training TFLOP/s over the peak of ``devices`` such cards; None without a known card."""
    if card is None:
        return None
    return tflop_per_s / (card.peak_tflops(precision) * devices)


def forward_flops(net, channels: int, patch_size: int, label_dim: int) -> int:
    """FLOPs of one forward pass of the network F (``model.net``) on one patch (counted on the meta
    device: nothing is run)."""
    x = torch.zeros(1, channels + 2, patch_size, patch_size, device="meta")
    noise = torch.zeros(1, device="meta")
    labels = torch.zeros(1, label_dim, device="meta") if label_dim else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, noise, labels)
    return int(counter.get_total_flops())


def forward_flops_by_size(cfg, sizes=None) -> dict[int, int]:
    """Forward FLOPs per image at each patch size of the config's schedule and at R (or ``sizes``)."""
    with torch.device("meta"):
        model = build_model(cfg)
    model.eval()
    if sizes is None:
        sizes = set(PatchSchedule.from_config(cfg).sizes) | {cfg.data.resolution}
    return {s: forward_flops(model.net, cfg.data.channels, s, cfg.network.label_dim) for s in sorted(sizes)}


def train_flops_by_size(cfg) -> dict[int, int]:
    """Training FLOPs (forward + backward) per patch at each patch size of the schedule and at R."""
    return {s: TRAIN_FLOPS_PER_FORWARD * f for s, f in forward_flops_by_size(cfg).items()}


class FlopCounter:
    """Training FLOPs of the steps since the last reading, added up on the host from each step's
    patch size and patch count (both host integers: no device sync), and read as TFLOP/s and MFU.
    The counts are global (every rank's patches), so MFU is over ``devices`` cards."""

    def __init__(self, train_flops: dict[int, int], card: Card | None, precision: str, devices: int = 1):
        self.train_flops, self.card, self.precision, self.devices = train_flops, card, precision, devices
        self.flops = 0

    def add(self, patch_size: int, patches: int) -> None:
        self.flops += self.train_flops[patch_size] * patches

    def figures(self, seconds: float) -> dict:
        """{"tflop_per_s", "mfu"} of the FLOPs added since the last call, over ``seconds``; resets."""
        rate = self.flops / max(seconds, 1e-12) / 1e12
        self.flops = 0
        return {"tflop_per_s": rate, "mfu": mfu(rate, self.card, self.precision, self.devices)}


def describe(cfg, card: Card | None = None, target_mfu: float = 0.4) -> dict:
    """What `pdiff info` prints: parameters, GFLOP per image and per step at each size, the schedule
    and its expected cost per image relative to full images, and, for ``card``, the images/s that
    ``target_mfu`` of its bf16 peak would give."""
    with torch.device("meta"):
        model = build_model(cfg)
        # the published counts are of unconditional networks: the label embedding is stated apart
        unconditional = count_parameters(build_model(replace(
            cfg, network=replace(cfg.network, label_dim=0))))
    model.eval()
    r, c = cfg.data.resolution, cfg.data.channels
    sch = PatchSchedule.from_config(cfg)
    sizes = sorted(set(sch.sizes) | {r})
    flops = {s: forward_flops(model.net, c, s, cfg.network.label_dim) for s in sizes}
    train = {s: TRAIN_FLOPS_PER_FORWARD * flops[s] for s in sizes}
    ratio = sch.expected_cost_ratio(flops)
    per_step = {s: sch.batch_for(s) * train[s] for s in sch.sizes}
    out = {
        "config": cfg.name, "arch": cfg.network.arch, "resolution": r, "channels": c,
        "label_dim": cfg.network.label_dim, "batch_full_images": cfg.train.batch,
        "parameters": count_parameters(model),
        "parameters_unconditional": unconditional,
        "label_embedding_parameters": count_parameters(model) - unconditional,
        "forward_gflops_per_image": {s: flops[s] / 1e9 for s in sizes},
        "train_gflops_per_image": {s: train[s] / 1e9 for s in sizes},
        # one step of each size carries batch * R/s patches (the whole global batch, all ranks)
        "train_gflops_per_step": {s: per_step[s] / 1e9 for s in sch.sizes},
        "schedule": {**sch.summary(), "batch_multiplier": {s: sch.multiplier(s) for s in sch.sizes}},
        "cost_per_image_vs_full": ratio,
        "schedule_train_gflops_per_image": ratio * train[r] / 1e9,
        "schedule_train_gflops_per_step": sum(q * per_step[s] for s, q in zip(sch.sizes, sch.step_shares())) / 1e9,
    }
    if card is not None:
        rate = target_mfu * card.bf16 * 1e12
        out["at_mfu"] = {"card": card.name, "precision": "bf16", "peak_tflops": card.bf16, "mfu": target_mfu,
                         "full_images_per_s": rate / train[r], "schedule_images_per_s": rate / (ratio * train[r])}
    return out
