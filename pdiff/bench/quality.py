"""`pdiff bench quality`: quality against cost of the patch schedule and of full images (p = 1) on
the user's data, for one budget, so that a user knows before a run whether patches pay.

Every arm (full images, the config's schedule, other patch sets, other p) trains the config's
network from scratch with pdiff.train on the same data and the same budget (device-hours, images
or FLOPs), in chunks: a chunk trains up to the next evaluation point and checkpoints, the EMA is
scored, and the next chunk resumes from the checkpoint (resumption is exact, so the chunks are one
run). Device time is the training loop's own, from its log: wall-clock on a GPU, the process's CPU
time on a CPU (so that other work on a shared machine does not count), without start-up,
checkpoints or evaluations. FLOPs are the FLOP model's (pdiff.flops) summed over the steps
the schedule takes (a pure function of the seed and images seen).

The metric is FID when Inception weights are given; otherwise the Frechet distance in the
features of a small network trained on the same data (pdiff.bench.features), which ranks the arms
but is not comparable with FID.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pdiff.fid import (FeatureStats, FIDEvaluator, RefStats, frechet_distance, inception_features, load_inception,
                       load_stats)
from pdiff.flops import train_flops_by_size
from pdiff.generate import SampleOptions, iter_uint8
from pdiff.schedule import PatchSchedule
from pdiff.snapshot import load_checkpoint
from pdiff.vae import load_run_vae

from .features import data_features, load_images, to_nchw
from .plot import Panel, Series, save_chart
from .runs import NEVER, base_overrides, default_interval_images, run_training, variant
from .timing import BenchError

BUDGET_KINDS = ("hours", "images", "flops")


# ------------------------------------------------------------------------------------------
# What is compared

@dataclass
class Arm:
    name: str
    overrides: list[str]


def parse_patch_sets(text: str, resolution: int) -> list[list[int]]:
    """'R/4,R/2,R;R/2,R' (or sizes in pixels, '8,16,32;16,32') -> lists of patch sizes."""
    sets = []
    for part in str(text).split(";"):
        sizes = []
        for item in part.split(","):
            item = item.strip().upper()
            m = re.fullmatch(r"R(?:/(\d+))?", item)
            try:
                size = resolution // int(m.group(1) or 1) if m else int(item)
            except ValueError:
                raise BenchError(f"--patch-sets {text!r}: {item!r} is not a size (R, R/2, R/4 or pixels)") from None
            sizes.append(size)
        if resolution not in sizes:
            raise BenchError(f"--patch-sets {text!r}: every set needs the full size R = {resolution} (its steps are "
                             "the p share)")
        sets.append(sorted(set(sizes)))
    return sets


def patch_probs(sizes: list[int], resolution: int, p: float) -> list[float]:
    """Probabilities for ``sizes`` (which hold R) with p on R: the paper's 2/5, 3/5 split of 1 - p
    for two smaller sizes, all of it for one, an even split for more."""
    smaller = [s for s in sizes if s != resolution]
    split = {0: [], 1: [1.0], 2: [0.4, 0.6]}.get(len(smaller), [1 / len(smaller)] * len(smaller))
    share = dict(zip(sorted(smaller), [(1 - p) * q for q in split]))
    return [p if s == resolution else share[s] for s in sizes]


def arm_label(sizes: list[int], p: float) -> str:
    return "{" + ",".join(str(s) for s in sizes) + "}" + f" p={p:g}"


def quality_arms(cfg, patch_sets: list[list[int]] | None = None, p_values: list[float] | None = None) -> list[Arm]:
    """Full images, the config's schedule (the paper's default when the config trains full images)
    and, one change at a time from it, each other patch set and each other p."""
    r = cfg.data.resolution
    base_cfg = (cfg if cfg.patch.mode != "full"
                else variant(cfg, ["patch.mode=stochastic", "patch.sizes=[]", "patch.probs=[]"]))
    base = PatchSchedule.from_config(base_cfg)
    # p is the full size's probability: patch.real_p, or the full-size entry of explicit patch.probs
    full_p = base.probs[list(base.sizes).index(r)] if r in base.sizes else base_cfg.patch.real_p
    p = full_p if base_cfg.patch.mode == "stochastic" else None
    arms = [Arm("full (p=1)", ["patch.mode=full"])]
    base_name = (arm_label(base.sizes, p) if p is not None
                 else f"{base_cfg.patch.mode} {{{','.join(map(str, base.sizes))}}}")
    arms.append(Arm(base_name, [f"patch.mode={base_cfg.patch.mode}", f"patch.sizes={list(base.sizes)}",
                                f"patch.probs={list(base.probs)}", f"patch.real_p={full_p}"]))
    p = full_p if p is None else p
    variants = [(sizes, p) for sizes in (patch_sets or []) if sizes != list(base.sizes)]
    variants += [(list(base.sizes), q) for q in (p_values or []) if not math.isclose(q, p)]
    for sizes, q in variants:
        name = arm_label(sizes, q)
        if name not in {a.name for a in arms}:
            arms.append(Arm(name, ["patch.mode=stochastic", f"patch.sizes={sizes}",
                                   f"patch.probs={patch_probs(sizes, r, q)}", f"patch.real_p={q}"]))
    return arms


@dataclass
class Budget:
    kind: str             # hours | images | flops
    value: float

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS or not self.value > 0:
            raise BenchError(f"budget {self.kind}={self.value}: give a positive hours, images or flops budget")

    def describe(self, device_type: str) -> str:
        if self.kind == "hours":
            return f"{self.value:g} {'GPU' if device_type == 'cuda' else 'CPU'}-hours per arm"
        return f"{self.value:,.4g} {self.kind} per arm"


# ------------------------------------------------------------------------------------------
# Cost

class FlopCounter:
    """Training FLOPs of a run up to a number of images seen: the FLOP model's FLOPs per image at
    each patch size summed over the steps the schedule takes (walked once, incrementally)."""

    def __init__(self, schedule: PatchSchedule, train_flops_per_image: dict[int, float]):
        self.flops_per_image = train_flops_per_image
        self.steps = schedule.steps(0)
        self.images, self.flops = 0, 0.0
        self.pending = next(self.steps)

    def _advance(self) -> None:
        st = self.pending
        self.images += st.batch
        self.flops += st.batch * self.flops_per_image[st.patch_size]
        self.pending = next(self.steps)

    def at(self, images: int) -> float:
        """FLOPs after the step that reaches ``images`` images seen."""
        while self.images < images:
            self._advance()
        if self.images != images:
            raise BenchError(f"{images} images is not a step boundary of the schedule (at {self.images})")
        return self.flops

    def images_for(self, flops: float) -> int:
        """Images seen after the first step at which the run has spent ``flops``."""
        while self.flops < flops:
            self._advance()
        return self.images


def arm_flop_counter(cfg) -> FlopCounter:
    return FlopCounter(PatchSchedule.from_config(cfg), train_flops_by_size(cfg))


def chunk_cost(rows: list[dict], start_images: int, device_type: str) -> tuple[int, float, float, float]:
    """(images seen at the end, device seconds, wall seconds, CPU seconds) of the log rows a chunk
    wrote after ``start_images``: device seconds are CPU seconds on a CPU, wall-clock on a GPU."""
    images, wall, cpu = start_images, 0.0, 0.0
    for row in rows:
        if int(row["images_seen"]) <= images or "images_per_s" not in row:
            continue
        wall += (int(row["images_seen"]) - images) / row["images_per_s"]
        cpu += row.get("cpu_seconds", 0.0)
        images = int(row["images_seen"])
    return images, (cpu if device_type == "cpu" else wall), wall, cpu


# ------------------------------------------------------------------------------------------
# Metrics

class FeatureMetric:
    """Frechet distance in the features of a network trained on the data (pdiff.bench.features)."""

    key = "fd_features"
    comparable_to_fid = False

    def __init__(self, feats, images: int, batch: int, steps: int, device):
        self.feats, self.images, self.batch, self.steps, self.device = feats, images, batch, steps, device
        self.name = "Frechet distance in learned features (not FID)"
        self.description = (f"Frechet distance between {images} samples and the data in the features of "
                            f"{feats.description}; it ranks models of this dataset and is NOT comparable with "
                            f"FID or across datasets")

    def score(self, model, cfg) -> float:
        net = self.feats.net.to(self.device)
        feats = [net.features(images) for _, images, _ in iter_uint8(
            model, list(range(self.images)), self.batch, cfg.data.resolution, cfg.data.channels,
            cfg.network.label_dim, sample_options(cfg, self.steps), self.device)]
        f = torch.cat(feats).cpu().numpy()
        return frechet_distance(f.mean(0), np.cov(f, rowvar=False), self.feats.mu, self.feats.sigma)


class InceptionMetric:
    """FID (TF-FID Inception-v3 weights) of ``images`` samples against reference statistics: one
    pdiff.fid.FIDEvaluator (a latent run's VAE loaded once) scores every evaluation."""

    key = "fid"
    comparable_to_fid = True

    def __init__(self, evaluator, images: int, steps: int, ref_source: str):
        self.evaluator, self.images, self.steps = evaluator, images, steps
        self.name = f"FID ({images} samples)"
        self.description = (f"FID of {images} samples against {ref_source} with the given Inception-v3 weights "
                            f"(fewer samples than the usual 50k make it higher than a published FID)")

    def score(self, model, cfg) -> float:
        return self.evaluator.compute(model, cfg)


def sample_options(cfg, steps: int):
    return SampleOptions(sampler=dataclasses.replace(cfg.sample, steps=steps), canvas=0)


def make_metric(cfg, device, images: int, batch: int, steps: int, inception: str | None = None,
                fid_ref: str | None = None, feature_steps: int = 1500, max_data_images: int = 20000):
    """FID when Inception weights are given (reference statistics from --fid-ref, or computed here
    from data.path); else the learned-feature distance, its network trained here on data.path."""
    if inception:
        net = load_inception(inception, device)
        if fid_ref:
            ref, source = load_stats(fid_ref), fid_ref
        else:
            data, _ = load_images(cfg.data.path, max_data_images)
            stats = FeatureStats(device=device)
            for part in to_nchw(data).split(100):
                stats.update(inception_features(net, part))
            mu, sigma = stats.mean_cov()
            ref, source = (RefStats(mu, sigma, stats.count, cfg.data.resolution),
                           f"{stats.count} images of {cfg.data.path}")
        vae = load_run_vae(cfg, None, device)              # a latent run's decoder (None for pixels)
        evaluator = FIDEvaluator(ref, net, images, batch, options=sample_options(cfg, steps), device=device, vae=vae)
        return InceptionMetric(evaluator, images, steps, source)
    if fid_ref:
        raise BenchError("--fid-ref without --inception: FID needs the Inception weights its statistics were made with")
    return FeatureMetric(data_features(cfg.data.path, feature_steps, max_data_images, cfg.train.seed), images, batch,
                         steps, device)


# ------------------------------------------------------------------------------------------
# The runs

def depends_on_duration(cfg) -> bool:
    """Whether the config's schedule draws other sizes when train.duration_images changes (the
    progressive schedule does): chunked runs change it, so they would not be one run."""
    d = max(cfg.train.duration_images, 1 << 20)
    a, b = (PatchSchedule.from_config(variant(cfg, [f"train.duration_images={n}"])) for n in (d, 2 * d))
    return any(a.size_at(i * d // 64) != b.size_at(i * d // 64) for i in range(64))


def quality_overrides(run_dir: Path) -> list[str]:
    """A chunked training run: its own folder, one log row per chunk (its end), the checkpoint and
    snapshot every chunk ends with and nothing else on the way; in-training sample grids at 2
    steps (the evaluation samples with its own settings)."""
    return [*base_overrides(run_dir), f"train.log_every_images={NEVER}", "train.wall_budget_s=0"]


def run_arm(cfg, arm: Arm, device: torch.device, work_dir: Path, budget: Budget, evals: int, metric,
            runner=run_training, on_point=None, probe_steps: int = 4) -> dict:
    """Train one arm in chunks up to each of ``evals`` evenly spaced points of the budget and score
    its EMA at each: the points' images, device/wall/CPU seconds, FLOPs and metric."""
    slug = re.sub(r"[^A-Za-z0-9.=]+", "_", arm.name).strip("_")
    arm_cfg = variant(cfg, [*arm.overrides, *quality_overrides(Path(work_dir) / slug)])
    if depends_on_duration(arm_cfg):
        raise BenchError(f"arm {arm.name}: its schedule ({arm_cfg.patch.mode}) depends on train.duration_images, which "
                         f"the chunked runs change; compare a stochastic schedule (patch.mode=stochastic)")
    flops = arm_flop_counter(arm_cfg)
    schedule = PatchSchedule.from_config(arm_cfg)
    images, device_s, wall_s, cpu_s, rate = 0, 0.0, 0.0, 0.0, None
    points, k = [], 1
    while k <= evals:
        goal = budget.value * k / evals
        if budget.kind == "images":
            target = int(math.ceil(goal))
        elif budget.kind == "flops":
            target = flops.images_for(goal)
        elif rate is None:            # device-hours: a few steps first, to learn the rate
            target = images + default_interval_images(arm_cfg, probe_steps)
        else:
            target = images + max(1, int(rate * (goal * 3600 - device_s)))
        rows = runner(variant(arm_cfg, [f"train.duration_images={target}"]), device)
        end, d_dev, d_wall, d_cpu = chunk_cost(rows, images, device.type)
        if end <= images:
            raise BenchError(f"arm {arm.name}: the chunk to {target} images logged no progress past {images}")
        rate = (end - images) / max(d_dev, 1e-9)
        images, device_s, wall_s, cpu_s = end, device_s + d_dev, wall_s + d_wall, cpu_s + d_cpu
        spent = {"hours": device_s / 3600, "images": images, "flops": flops.at(images)}[budget.kind]
        if spent < 0.9 * goal:        # the device-hours probe stopped short of the point: go on
            continue
        t = time.perf_counter()
        model, run_cfg, _ = load_checkpoint(arm_cfg.train.run_dir, device)
        score = float(metric.score(model, run_cfg))
        point = {"images": images, "device_seconds": device_s, "hours": device_s / 3600, "wall_seconds": wall_s,
                 "cpu_seconds": cpu_s, "flops": flops.at(images), "metric": score,
                 "eval_seconds": time.perf_counter() - t}
        points.append(point)
        if on_point:
            on_point(arm, point)
        while k <= evals and spent >= 0.9 * budget.value * k / evals:
            k += 1
    return {"name": arm.name, "overrides": arm.overrides, "schedule": schedule.summary(),
            "run_dir": str(arm_cfg.train.run_dir), "points": points}


def bench_quality(cfg, device: torch.device, work_dir: str | Path, budget: Budget, evals: int, metric,
                  arms: list[Arm], runner=run_training, on_point=None) -> dict:
    """Every arm under the same budget, then the table at equal cost, the crossovers of each arm
    with full images and the best arm at the end of the budget."""
    if not cfg.data.path:
        raise BenchError("data.path is empty: point it at shards from `pdiff shard`")
    if evals < 1:
        raise BenchError(f"--evals must be at least 1, got {evals}")
    results = [run_arm(cfg, arm, device, Path(work_dir), budget, evals, metric, runner, on_point) for arm in arms]
    return {"config": cfg.name, "resolution": cfg.data.resolution, "device": str(device),
            "budget": {"kind": budget.kind, "value": budget.value, "per_arm": budget.describe(device.type)},
            "evals": evals,
            "metric": {"key": metric.key, "name": metric.name, "description": metric.description,
                       "comparable_to_fid": metric.comparable_to_fid, "lower_is_better": True,
                       "sampler_steps": metric.steps, "samples": metric.images},
            "hours_measure": "GPU wall-clock of the training loop" if device.type == "cuda" else
                             "CPU time of the training process (user + system), training loop only",
            "arms": results, **summarize(results, budget, evals)}


# ------------------------------------------------------------------------------------------
# Reading the curves (pure functions)

def interpolate(points: list[dict], x_key: str, x: float, tolerance: float = 0.0) -> float | None:
    """The metric at cost ``x`` by linear interpolation between measured points; within
    ``tolerance`` outside them, the nearest end point's (a device-hours run lands near, not on, its
    points); None further out."""
    xs = [p[x_key] for p in points]
    if not xs or x < xs[0] - tolerance - 1e-12 or x > xs[-1] + tolerance + 1e-12:
        return None
    return float(np.interp(x, xs, [p["metric"] for p in points]))


def crossovers(a: list[dict], b: list[dict], x_key: str) -> list[dict]:
    """Where the metric curves of ``a`` and ``b`` (lower is better) cross on the common cost range:
    the cost and metric at each crossing and which one is better after it."""
    if not a or not b:
        return []
    lo, hi = max(a[0][x_key], b[0][x_key]), min(a[-1][x_key], b[-1][x_key])
    xs = sorted({p[x_key] for p in a + b if lo <= p[x_key] <= hi} | {lo, hi})
    diffs = [(x, interpolate(a, x_key, x) - interpolate(b, x_key, x)) for x in xs if hi >= lo]
    out = []
    for (x0, d0), (x1, d1) in zip(diffs, diffs[1:]):
        if d0 * d1 < 0 or (d1 == 0 and d0 != 0 and x1 < hi):
            x = x0 + (x1 - x0) * d0 / (d0 - d1)
            out.append({x_key: x, "metric": interpolate(a, x_key, x), "better_after": "a" if d1 < 0 else "b"})
    return out


def summarize(results: list[dict], budget: Budget, evals: int) -> dict:
    """The table at equal cost (metric of every arm at each evaluation point of the budget, by
    interpolation on the budget's own axis, end points taken within a tenth of a step), the crossovers with
    full images in device-hours and
    in FLOPs, and the best arm at the end."""
    x_key = {"hours": "hours", "images": "images", "flops": "flops"}[budget.kind]
    table, tolerance = [], 0.1 * budget.value / evals
    for k in range(1, evals + 1):
        x = float(f"{budget.value * k / evals:.12g}")
        table.append({x_key: x, **{r["name"]: interpolate(r["points"], x_key, x, tolerance) for r in results}})
    full = results[0]
    crossings = {}
    for r in results[1:]:
        crossings[r["name"]] = {}
        for key in ("hours", "flops"):
            crossings[r["name"]][key] = [{**c, "better_after": r["name"] if c["better_after"] == "a" else full["name"]}
                                         for c in crossovers(r["points"], full["points"], key)]
    final = {r["name"]: r["points"][-1]["metric"] if r["points"] else None for r in results}
    best = min((n for n in final if final[n] is not None), key=lambda n: final[n], default=None)
    return {"table": table, "table_axis": x_key, "crossovers_vs_full": crossings, "final_metric": final,
            "best_at_budget": best}


def plot_quality(res: dict, path: str | Path) -> Path:
    """Metric vs device-hours and vs FLOPs, one line per arm, the schedule's crossover(s) with
    full images marked."""
    hours_label = "GPU-hours" if res["device"].startswith("cuda") else "CPU-hours (process CPU time)"
    flops_all = [p["flops"] for r in res["arms"] for p in r["points"]]
    scale, unit = next(((10 ** e, u) for e, u in ((18, "EFLOP"), (15, "PFLOP"), (12, "TFLOP"), (9, "GFLOP"))
                        if max(flops_all, default=0) >= 10 ** e), (1, "FLOP"))
    second = res["arms"][1]["name"] if len(res["arms"]) > 1 else None
    marks = {key: [(c[key] / (scale if key == "flops" else 1),
                    f"crossover {c[key] / (scale if key == 'flops' else 1):.3g}")
                   for c in res["crossovers_vs_full"].get(second, {}).get(key, [])] for key in ("hours", "flops")}
    panels = [
        Panel(f"{res['metric']['name']} vs training cost", hours_label, res["metric"]["name"],
              [Series(r["name"], [p["hours"] for p in r["points"]],
                      [p["metric"] for p in r["points"]]) for r in res["arms"]],
              marks["hours"]),
        Panel(f"{res['metric']['name']} vs training FLOPs", f"training {unit}s (FLOP model)", res["metric"]["name"],
              [Series(r["name"], [p["flops"] / scale for p in r["points"]], [p["metric"] for p in r["points"]])
               for r in res["arms"]], marks["flops"]),
    ]
    note = ("lower is better. " + ("FID." if res["metric"]["comparable_to_fid"] else
                                   "Learned-feature distance: not comparable with FID."))
    title = (f"pdiff bench quality: {res['config']} ({res['resolution']}x{res['resolution']}), "
             f"{res['budget']['per_arm']}")
    return save_chart(path, panels, title, note)
