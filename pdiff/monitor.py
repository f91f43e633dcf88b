"""What a person watching a long run sees: TensorBoard scalars and images, a JSONL log with the
same figures, and a console progress line with an ETA. Only rank 0 writes."""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from .distributed import all_reduce_, world_size
from .progress import hms, interval_s

# Loss per noise level: bins of ln(sigma) over where training puts its mass (P_mean +- 3 P_std).
SIGMA_BIN_EDGES = [-4.8, -3.0, -1.8, -1.2, -0.6, 0.6, 2.4]
SIGMA_BIN_NAMES = (["<" + str(SIGMA_BIN_EDGES[0])]
                   + [f"{a}..{b}" for a, b in zip(SIGMA_BIN_EDGES, SIGMA_BIN_EDGES[1:])]
                   + [">" + str(SIGMA_BIN_EDGES[-1])])


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
        for s, loss, c in zip(self.patch_sizes, ls, cs):
            if c > 0:
                out[f"loss_patch/{s}"] = float(loss / c)
        for name, loss, c in zip(SIGMA_BIN_NAMES, lb, cb):
            if c > 0:
                out[f"loss_lnsigma/{name}"] = float(loss / c)
        self.reset()
        return out


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


# TensorBoard groups tags by their first path component: the training figures under train/, speed
# and cost under perf/, the per-patch and per-noise-level losses in their own groups, numbered so
# the cards sort by size and by sigma. log.jsonl keeps the plain keys.
TRAIN_KEYS = ("loss", "grad_norm", "lr", "nonfinite_steps", "images_seen_this_run", "replica_max_param_diff")


def tensorboard_tag(key: str) -> str:
    group, _, name = key.partition("/")
    if group == "loss_patch":
        return f"loss_by_patch/{int(name):03d}"
    if group == "loss_lnsigma":
        return f"loss_by_sigma/{SIGMA_BIN_NAMES.index(name)}_lnsigma{name}"
    if name:
        return key
    return f"train/{key}" if key in TRAIN_KEYS else f"perf/{key}"


def flat_hparams(tree: dict, prefix: str = "") -> dict:
    """A nested config as TensorBoard hparams: dotted keys; lists and None as text."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class IntervalClock:
    """The wall time of one log interval, split into waiting for data, pauses (snapshots, sample
    grids, checkpoints, FID) and the rest; images/s counts only the time not paused. Also the
    process's CPU time (every thread's, not data worker processes'), pauses excluded: what a run
    costs on a CPU shared with other work (pdiff bench quality counts it)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.data_wait, self.paused = time.perf_counter(), 0, 0.0, 0.0
        self.cpu_start, self.cpu_paused = time.process_time(), 0.0

    @contextlib.contextmanager
    def waiting(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait += time.perf_counter() - t0

    def lap(self) -> tuple[dict, float]:
        """The interval's speed figures and its seconds without pauses; starts the next interval."""
        elapsed = max(time.perf_counter() - self.start - self.paused, 1e-9)
        images = max(self.images, 1)
        out = {"images_per_s": self.images / elapsed, "ms_per_image": 1e3 * elapsed / images,
               "data_wait_share": self.data_wait / elapsed,
               "cpu_seconds": time.process_time() - self.cpu_start - self.cpu_paused}
        self.reset()
        return out, elapsed


class Monitor:
    """Rank 0 writes: TensorBoard, log.jsonl and the console. ``wall_budget_s`` and ``started``
    (time.time() when the process started the run) give the ETA its nearer end."""

    def __init__(self, run_dir: str | Path, enabled: bool, total_images: int, start_images: int,
                 console: bool = True, wall_budget_s: float = 0.0, started: float | None = None):
        self.enabled = enabled
        self.total, self.start_images = total_images, start_images
        self.t0 = time.time()
        self.started = self.t0 if started is None else started
        self.wall_budget_s = wall_budget_s
        self.console = console and enabled
        self.heartbeat_s, self.last_line = interval_s(), time.monotonic()
        self.clock = IntervalClock()
        self.pause_s: dict[str, float] = {}      # seconds paused since the last log row, by what
        self.tb = self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            run_dir = Path(run_dir)
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = open(run_dir / "log.jsonl", "a", buffering=1)

    def describe_run(self, config: dict, config_yaml: str) -> None:
        """The resolved config in TensorBoard: as text, and as hparams (filterable in the HParams tab)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams
        self.tb.add_text("config", "```yaml\n" + config_yaml + "```", self.start_images)
        writer = self.tb._get_file_writer()
        for summary in hparams(flat_hparams(config), {"train/loss": float("nan")}):
            writer.add_summary(summary)

    def scalars(self, images_seen: int, values: dict) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(tensorboard_tag(k), v, images_seen)
        # The pauses since the last row: in log.jsonl only (``pause`` wrote each to TensorBoard already).
        paused = {f"{what}_s": s for what, s in self.pause_s.items()}
        self.pause_s = {}
        self.jsonl.write(json.dumps({"images_seen": images_seen, "time": time.time(), **values, **paused}) + "\n")
        if self.console and "loss" in values:
            mfu = values.get("mfu")
            self._line(images_seen, f"loss {values['loss']:.4f}  {values.get('images_per_s', 0):8.1f} img/s  "
                                    f"{values.get('tflop_per_s', 0):.3g} TFLOP/s  "
                                    f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}  "
                                    f"data wait {100 * values.get('data_wait_share', 0):4.1f}%  lr "
                                    f"{values.get('lr', 0):.2e}")
        for key in (k for k in values if k.startswith("fid/")):
            self.say(f"FID of {key.split('/')[1]} samples at {images_seen:,} images: {values[key]:.4f}")

    def heartbeat(self, images_seen: int) -> None:
        """A progress line when none was printed for PDIFF_PROGRESS_SECONDS (a long log interval)."""
        if self.console and time.monotonic() - self.last_line >= self.heartbeat_s:
            done, elapsed = images_seen - self.start_images, time.time() - self.t0
            self._line(images_seen, f"{done / max(elapsed, 1e-9):8.1f} img/s on average in this run")

    def eta_seconds(self, images_seen: int) -> float:
        """Until the run ends: at the current pace for the images left, or when the wall-clock
        budget runs out, whichever comes first."""
        done, elapsed = images_seen - self.start_images, time.time() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = max(self.total - images_seen, 0) / rate if rate > 0 else float("inf")
        if self.wall_budget_s > 0:
            eta = min(eta, max(self.wall_budget_s - (time.time() - self.started), 0.0))
        return eta

    def _line(self, images_seen: int, middle: str) -> None:
        pct = min(100.0, 100.0 * images_seen / max(self.total, 1))
        print(f"[{pct:5.1f}%] {images_seen:>12,d} img  {middle}  ETA {hms(self.eta_seconds(images_seen))}",
              file=sys.stderr, flush=True)
        self.last_line = time.monotonic()

    def say(self, text: str) -> None:
        if self.console:
            print(f"pdiff train: {text}", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    @contextlib.contextmanager
    def pause(self, what: str, images_seen: int, detail: str = ""):
        """Time a pause in training (``what``: snapshot, sample, fid, checkpoint): kept out of
        images/s, logged as perf/<what>_s, announced with its time after the block. The block may set
        the announcement's ``.detail`` on what this yields (e.g. the paths it wrote)."""
        said = types.SimpleNamespace(detail=detail)
        t0, cpu0 = time.perf_counter(), time.process_time()
        yield said
        seconds = time.perf_counter() - t0
        self.clock.paused += seconds
        self.clock.cpu_paused += time.process_time() - cpu0
        self.pause_s[what] = self.pause_s.get(what, 0.0) + seconds
        if self.enabled:
            self.tb.add_scalar(f"perf/{what}_s", seconds, images_seen)
        self.say(f"{what}{' ' + said.detail if said.detail else ''} ({seconds:.1f} s)")

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


def run_summary(images_seen: int, images_this_run: int, seconds: float, snapshot: Path | None,
                checkpoint: Path | None) -> str:
    """The last lines of a run: what it did, where its outputs are and how to sample from them."""
    lines = [f"{images_seen:,} images seen ({images_this_run:,} in this run, {hms(seconds)}, "
             f"{images_this_run / max(seconds, 1e-9):.1f} img/s overall)"]
    if snapshot is not None:
        lines.append(f"  last snapshot    {snapshot}")
    if checkpoint is not None:
        lines.append(f"  last checkpoint  {checkpoint}")
    if snapshot is not None:
        lines.append(f"  sample with      pdiff sample --snapshot {snapshot} --seeds 0-63 --grid grid.png")
    return "\n".join(lines)


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
