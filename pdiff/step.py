"""The differentiable part of a training step, as one module that DDP wraps and torch.compile
compiles: patches -> fused network input -> F -> fused weighted loss (per sample).

``build_step(cfg, device)`` assembles it the one way the trainer and every benchmark use:
model -> kernels backend -> precision -> PatchLoss -> channels_last -> torch.compile, and
``TrainingStep.warm_up`` compiles every shape a run will see before its first step."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pdiff.kernels import build_net_input, edm_patch_loss, resolve_backend, torch_backend_noise
from pdiff.kernels.net_input import patches_to_float

from .loss import learned_weighting, masked_patch_loss, token_pixel_mask
from .model import build_model
from .networks import find_block
from .networks.edm2 import force_weight_norm_
from .precond import EDMPrecond, c_noise
from .repr import BlockTap, ReprTerm, TappedNetwork, block_channels
from .schedule import PatchSchedule


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, images seen, ...): the same parts, the same seed."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> 1)


def resolve_precision(mode: str, device) -> str:
    """train.precision: "auto" is bf16 autocast on CUDA and fp32 elsewhere."""
    return mode if mode != "auto" else ("bf16" if torch.device(device).type == "cuda" else "fp32")


def net_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def learning_rate(optim, images: int) -> float:
    """optim.lr after a linear warm-up over optim.warmup_images; with optim.schedule=inv_sqrt (EDM2's
    learning_rate_schedule), divided by sqrt(max(images / optim.ref_images, 1)) as well. ``images``:
    the images seen once the step is done (patch steps count batch * R/s)."""
    lr = optim.lr * min(1.0, images / max(optim.warmup_images, 1))
    if optim.schedule == "inv_sqrt":
        lr /= max(images / optim.ref_images, 1.0) ** 0.5
    return lr


class PatchLoss(nn.Module):
    def __init__(self, model: EDMPrecond, resolution: int, backend: str, net_dtype: torch.dtype,
                 channels_last: bool = False, repr_term: ReprTerm | None = None, tap: BlockTap | None = None):
        super().__init__()
        self.model = model
        self.resolution = resolution
        self.backend = backend          # "triton" | "torch" (kernels.resolve_backend)
        self.net_dtype = net_dtype      # bf16 under autocast on CUDA, else fp32
        self.channels_last = channels_last  # the network input's memory layout (match the weights')
        # The representation term (pdiff/repr.py) and the tap on its block: the network then returns
        # (F, the block's output), and forward returns (per-sample loss, weighted per-sample term).
        self.repr_term = repr_term      # a submodule: DDP reduces its head's gradients with the model's
        self.__dict__["tap"] = tap
        self.use_network(TappedNetwork(model.net, tap) if tap is not None else model.net)

    def use_network(self, fn) -> None:
        """Run F through ``fn`` (e.g. torch.compile(model.net)); kept out of the submodules so the
        compiled wrapper's parameters are not registered twice."""
        self.__dict__["net_fn"] = fn

    def forward(self, patches, offsets, sigma, noise, class_labels, seed: int, images_seen: int,
                features=None, repr_weight: float = 0.0):
        """Per-sample loss (B,) of uint8 (B, s, s, C) image patches or float (B, C, s, s) ones (the
        kernels read either). ``noise`` is given on the torch path; on the Triton path it is None and
        both kernels regenerate the same Philox noise from (seed, images_seen). With a repr term:
        (that loss, ``repr_weight`` x the term per sample); ``features`` are the batch's stored feature
        grids (repr.loss=align). A weight of 0 (after repr.until_images) skips the dispersive term;
        align's head still runs, times 0, so that DDP sees a gradient for each of its parameters."""
        sd = self.model.sigma_data
        keep = self.token_keep(patches.shape[0], patches.shape[-2], images_seen)
        if keep is not None:
            return self.masked(patches, offsets, sigma, noise, class_labels, seed, images_seen, keep)
        kw = dict(noise=noise) if noise is not None else dict(seed=seed, images_seen=images_seen)
        net_in = build_net_input(patches, sigma, offsets, self.resolution, sigma_data=sd,
                                 out_dtype=self.net_dtype, channels_last=self.channels_last,
                                 backend=self.backend, **kw)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.net_dtype == torch.bfloat16
                    else contextlib.nullcontext())
        with autocast:
            F = self.net_fn(net_in, c_noise(sigma), class_labels)
        if self.repr_term is not None:
            F, activation = F
        loss = edm_patch_loss(F, patches, sigma, sigma_data=sd, backend=self.backend, **kw)
        if self.model.logvar is not None:       # loss.weighting=learned, on the kernel's per-sample output
            loss = learned_weighting(loss, self.model.logvar(c_noise(sigma)))
        if self.repr_term is None:
            return loss
        align = self.repr_term.kind == "align"
        if (align and features is None) or (not align and repr_weight == 0):
            return loss, torch.zeros_like(loss)
        return loss, self.repr_term(activation, features, offsets, patches.shape[2]) * repr_weight

    def token_keep(self, batch: int, size: int, images_seen: int) -> torch.Tensor | None:
        """MaskDiT (network.mask_ratio > 0, a network with a ``keep`` argument): the sorted indices
        of the tokens each sample keeps this step, drawn from torch's generator (which the trainer
        seeds from (seed, rank, images seen)); None when the step is not masked (no masking, or the
        unmasked phase from network.unmask_after_images on)."""
        net = self.model.net
        ratio = getattr(net, "mask_ratio", 0.0)
        until = getattr(net, "unmask_after_images", 0)
        if ratio <= 0 or (until and images_seen >= until):
            return None
        tokens = (size // net.p) ** 2
        kept = max(1, round(tokens * (1 - ratio)))
        device = next(net.parameters()).device
        return torch.rand(batch, tokens, device=device).argsort(dim=1)[:, :kept].sort(dim=1).values

    def masked(self, patches, offsets, sigma, noise, class_labels, seed, images_seen, keep):
        """A masked step: the noise is materialised (both backends take it as given), the network
        sees the kept tokens, and masked_patch_loss weighs the kept pixels' EDM loss and the dropped
        ones' reconstruction. The loss is computed in torch: the fused loss kernel has no mask."""
        sd, net = self.model.sigma_data, self.model.net
        y = patches_to_float(patches)
        if noise is None:
            noise = torch_backend_noise(seed, images_seen, y.shape, patches.device)
        net_in = build_net_input(patches, sigma, offsets, self.resolution, noise=noise, sigma_data=sd,
                                 out_dtype=self.net_dtype, channels_last=self.channels_last, backend=self.backend)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.net_dtype == torch.bfloat16
                    else contextlib.nullcontext())
        with autocast:
            F = self.net_fn(net_in, c_noise(sigma), class_labels, keep)
        kept = token_pixel_mask(keep, y.shape[-1] // net.p, net.p)
        loss = masked_patch_loss(F, y, sigma, noise, kept, net.mae_weight, sd)
        if self.model.logvar is not None:       # loss.weighting=learned, as on the unmasked path
            loss = learned_weighting(loss, self.model.logvar(c_noise(sigma)))
        return loss

    def phases(self) -> list[int]:
        """An images-seen value in each phase whose step differs in its graphs (masked, then
        unmasked), so that warm_up compiles them all."""
        until = getattr(self.model.net, "unmask_after_images", 0)
        return [0, until] if getattr(self.model.net, "mask_ratio", 0.0) > 0 and until else [0]


def synthetic_patches(n: int, channels: int, size: int, dtype: torch.dtype, device, generator=None) -> torch.Tensor:
    """Random patches in the layout the pipelines deliver: uint8 (n, s, s, C) images, or float
    (n, C, s, s) values in [-1, 1] (latents)."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, size, size, channels), dtype=torch.uint8, device=device, generator=generator)
    return torch.rand(n, channels, size, size, device=device, generator=generator, dtype=dtype) * 2 - 1


def micro_batches(b: int, accum: int) -> list[slice]:
    """Slices (views, no copies) splitting a batch of b into at most ``accum`` micro-batches."""
    size = -(-b // max(1, accum))
    return [slice(i, min(i + size, b)) for i in range(0, b, size)]


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@dataclass
class TrainingStep:
    """What one training step runs, as the config builds it."""
    model: EDMPrecond               # the weights that train: unwrapped, uncompiled (what checkpoints save)
    loss: PatchLoss                 # what DDP wraps: per-sample loss of a batch of patches
    optimizer: torch.optim.Optimizer
    schedule: PatchSchedule
    precision: str                  # "bf16" | "fp32"
    channels: int                   # image channels and classes: the shapes warm_up builds
    label_dim: int
    grad_accum: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def after_optimizer_step(self) -> None:
        """Forced weight normalization (EDM2) of the MP layers the model has (none: nothing to do)."""
        force_weight_norm_(self.model)

    def warm_up(self, world: int = 1, stop=None, patch_dtype: torch.dtype = torch.uint8) -> int:
        """Run every shape the run will see (one per patch size and micro-batch size of this rank)
        once before the first real step, so no step stalls on a compile or a kernel's first launch;
        returns the graph count afterwards, against which the log reports recompiles (there should
        be none). ``stop`` (a StopSignal): once it is requested no further graph is compiled, so a
        scheduler's SIGTERM is acted on within one graph's compile, not all of them. ``patch_dtype``:
        what the pipeline delivers (uint8 HWC images, float32 CHW latents)."""
        device = self.device
        shapes = [(size, n) for size in self.schedule.sizes
                  for n in sorted({sl.stop - sl.start
                                   for sl in micro_batches(self.schedule.batch_for(size) // world, self.grad_accum)})]
        for (size, n), phase in [(shape, phase) for shape in shapes for phase in self.loss.phases()]:
            if stop is not None and stop.requested:
                break
            patches = synthetic_patches(n, self.channels, size, patch_dtype, device)
            offsets = torch.zeros(n, 2, dtype=torch.long, device=device)
            sigma = torch.ones(n, device=device)
            noise = torch.zeros(n, self.channels, size, size, device=device) if self.loss.backend == "torch" else None
            labels = torch.zeros(n, self.label_dim, device=device) if self.label_dim else None
            loss = self.loss(patches, offsets, sigma, noise, labels, 0, phase)   # the network's graph: no repr term
            (loss[0] if isinstance(loss, tuple) else loss).sum().backward()
        self.model.zero_grad(set_to_none=True)
        return compiled_graphs()


def build_step(cfg, device) -> TrainingStep:
    """The training step ``cfg`` describes on ``device``: the model (initial weights from
    train.seed), the kernels backend (train.kernels), the precision (train.precision), PatchLoss,
    channels_last weights (train.channels_last), torch.compile of the network (train.compile) and
    Adam (fused on CUDA)."""
    device = torch.device(device)
    schedule = PatchSchedule.from_config(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device)
    force_weight_norm_(model)       # MP layers start at unit norm, as after every step
    backend = resolve_backend(cfg.train.kernels, device)
    precision = resolve_precision(cfg.train.precision, device)
    term = tap = None
    if cfg.repr.loss != "none":
        block = find_block(model.net, cfg.repr.block)
        width = block_channels(model.net, block, cfg.data.channels, min(schedule.sizes), cfg.network.label_dim)
        term = ReprTerm(cfg.repr, cfg.data.resolution, width, cfg.repr.feature_channels).to(device)
        tap = BlockTap(block)
    loss = PatchLoss(model, cfg.data.resolution, backend, net_dtype(precision), cfg.train.channels_last, term, tap)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # One graph per (patch size, micro-batch size): allow them all without evictions.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(schedule.sizes))
        # the network (with its tap, if any)
        loss.use_network(torch.compile(loss.net_fn, dynamic=False, backend=cfg.train.compile_backend))
    o = cfg.optim
    # The repr head trains with the model (it is not part of it: no EMA, no snapshot).
    trained = list(model.parameters()) + (list(term.parameters()) if term is not None else [])
    optimizer = torch.optim.Adam(trained, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay,
                                 fused=device.type == "cuda")   # one kernel for the whole update on CUDA
    return TrainingStep(model, loss, optimizer, schedule, precision, cfg.data.channels,
                        cfg.network.label_dim, cfg.train.grad_accum)
