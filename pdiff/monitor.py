"""What a person watching a long run sees: TensorBoard scalars and images, a JSONL log with the
same figures, and a console progress line with an ETA. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Loss per noise level: bins of ln(sigma) over where training puts its mass (P_mean +- 3 P_std).
SIGMA_BIN_EDGES = [-4.8, -3.0, -1.8, -1.2, -0.6, 0.6, 2.4]


class StepStats:
    """Per-step statistics accumulated on the device; read (one host sync) at the log interval."""

    def __init__(self, patch_sizes: list[int], device: torch.device):
        self.patch_sizes = list(patch_sizes)
        self.edges = torch.tensor(SIGMA_BIN_EDGES, device=device)
        self.device = device
        self.reset()

    def reset(self) -> None:
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)
        self.loss_by_size, self.count_by_size = z(len(self.patch_sizes)), z(len(self.patch_sizes))
        nb = len(SIGMA_BIN_EDGES) + 1
        self.loss_by_bin, self.count_by_bin = z(nb), z(nb)
        self.grad_norm_sum, self.steps, self.nonfinite = z(1), z(1), z(1)

    @torch.no_grad()
    def add(self, patch_size: int, per_sample: torch.Tensor, sigma: torch.Tensor,
            grad_norm: torch.Tensor, finite: torch.Tensor) -> None:
        i = self.patch_sizes.index(patch_size)
        per_sample = per_sample.detach().double()
        self.loss_by_size[i] += per_sample.sum()
        self.count_by_size[i] += per_sample.numel()
        bins = torch.bucketize(sigma.detach().log().float(), self.edges)
        self.loss_by_bin.index_add_(0, bins, per_sample)
        self.count_by_bin.index_add_(0, bins, torch.ones_like(per_sample))
        self.grad_norm_sum += torch.where(finite, grad_norm.double(), 0.0)
        self.steps += 1
        self.nonfinite += (~finite).double()

    def reduce(self) -> dict:
        """Sum over ranks and turn into plain numbers (this is the one host sync)."""
        from .distributed import all_reduce_, world_size
        packed = torch.cat([self.loss_by_size, self.count_by_size, self.loss_by_bin,
                            self.count_by_bin, self.grad_norm_sum, self.steps, self.nonfinite])
        all_reduce_(packed)
        v = packed.cpu().numpy()
        n, nb = len(self.patch_sizes), len(SIGMA_BIN_EDGES) + 1
        ls, cs = v[:n], v[n:2 * n]
        lb, cb = v[2 * n:2 * n + nb], v[2 * n + nb:2 * n + 2 * nb]
        gsum, steps, nonfinite = v[-3], v[-2], v[-1]
        world = world_size()
        out = {"loss": float(ls.sum() / max(cs.sum(), 1)),
               "grad_norm": float(gsum / max(steps - nonfinite, 1)),
               "nonfinite_steps": int(round(nonfinite / world))}
        for s, l, c in zip(self.patch_sizes, ls, cs):
            if c > 0:
                out[f"loss_patch/{s}"] = float(l / c)
        labels = ["<" + str(SIGMA_BIN_EDGES[0])] + [f"{a}..{b}" for a, b in zip(SIGMA_BIN_EDGES, SIGMA_BIN_EDGES[1:])] + [">" + str(SIGMA_BIN_EDGES[-1])]
        for name, l, c in zip(labels, lb, cb):
            if c > 0:
                out[f"loss_lnsigma/{name}"] = float(l / c)
        self.reset()
        return out


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class Monitor:
    def __init__(self, run_dir: str | Path, enabled: bool, total_images: int, start_images: int,
                 console: bool = True):
        self.enabled = enabled
        self.total, self.start_images = total_images, start_images
        self.t0 = time.time()
        self.console = console and enabled
        self.tb = self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            run_dir = Path(run_dir)
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = open(run_dir / "log.jsonl", "a", buffering=1)

    def scalars(self, images_seen: int, values: dict) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, images_seen)
        self.jsonl.write(json.dumps({"images_seen": images_seen, "time": time.time(), **values}) + "\n")
        if self.console:
            done = images_seen - self.start_images
            elapsed = time.time() - self.t0
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = max(self.total - images_seen, 0) / rate if rate > 0 else float("inf")
            pct = 100.0 * images_seen / max(self.total, 1)
            eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--"
            mfu = values.get("mfu")
            print(f"[{pct:5.1f}%] {images_seen:>12,d} img  loss {values.get('loss', float('nan')):.4f}  "
                  f"{values.get('images_per_s', 0):8.1f} img/s  {values.get('tflop_per_s', 0):.3g} TFLOP/s  "
                  f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}  "
                  f"data wait {100 * values.get('data_wait_share', 0):4.1f}%  "
                  f"lr {values.get('lr', 0):.2e}  ETA {eta_s}", file=sys.stderr, flush=True)

    def image(self, tag: str, images_seen: int, grid: np.ndarray) -> None:
        """grid: HWC uint8."""
        if self.enabled:
            self.tb.add_image(tag, grid, images_seen, dataformats="HWC")

    def flush(self) -> None:
        if self.enabled:
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def image_grid(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one HWC uint8 grid (1 px gaps)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = torch.zeros(c, ncol * (h + 1) - 1, nrow * (w + 1) - 1, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = x[i]
    out = grid.permute(1, 2, 0).numpy()
    return np.repeat(out, 3, axis=2) if c == 1 else out[..., :3]


def save_png(grid: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """Write an HWC uint8 grid; ``scale`` enlarges it (nearest) so small images can be seen."""
    from PIL import Image
    im = Image.fromarray(grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)
