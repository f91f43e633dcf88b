"""Timing and the arithmetic of the benchmarks: pure functions of measured seconds and log rows
(tests check them with a fake clock and stubbed runs)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import numpy as np

from pdiff.errors import UserError


class BenchError(UserError, RuntimeError):
    """A benchmark that cannot run as asked (too few log intervals, no data, ...)."""


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
          clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of ``fn``; ``warmup`` calls first, not counted."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t = clock()
        fn()
        if sync:
            sync()
        out.append(clock() - t)
    return out


def per_size_figures(patches: int, seconds: list[float]) -> dict:
    """One patch size's training-step figures from its timed steps (each patch counts as an image)."""
    t = statistics.median(seconds)
    return {"patches": patches, "ms_per_step": 1e3 * t, "images_per_s": patches / t,
            "ms_per_image": 1e3 * t / patches, "repeats": len(seconds),
            "ms_per_step_min": 1e3 * min(seconds), "ms_per_step_max": 1e3 * max(seconds)}


def schedule_figures(schedule, per_size: dict[int, dict]) -> dict:
    """The schedule's cost from per-patch-size step costs: cost per image relative to full images
    (PatchSchedule.expected_cost_ratio on seconds per patch), its images/s, and ms per step."""
    r = schedule.resolution
    if r not in per_size:
        raise BenchError(f"the full size {r} was not measured; it is the reference for the cost ratio")
    ratio = schedule.expected_cost_ratio({s: v["ms_per_image"] for s, v in per_size.items()})
    ms_img = ratio * per_size[r]["ms_per_image"]
    ms_step = sum(q * per_size[s]["ms_per_step"] for s, q in zip(schedule.sizes, schedule.step_shares()))
    return {**schedule.summary(), "cost_per_image_vs_full": ratio, "speedup_per_image_vs_full": 1 / ratio,
            "ms_per_image": ms_img, "images_per_s": 1e3 / ms_img, "ms_per_step": ms_step,
            "full_images_per_s": per_size[r]["images_per_s"]}


def add_flop_figures(per_size: dict[int, dict], schedule_fig: dict | None, schedule, train_flops: dict[int, float],
                     peak_tflops: float | None) -> None:
    """Achieved training TFLOP/s and MFU (None without a peak) into each patch size's figures and the
    schedule's: a step of size s does batch_for(s) * train_flops[s] FLOPs; the schedule's rate is
    its expected FLOPs per step over its expected ms per step."""
    def rate(tflop_per_s):
        return {"tflop_per_s": tflop_per_s, "mfu": None if not peak_tflops else tflop_per_s / peak_tflops}
    for s, v in per_size.items():
        v.update(rate(train_flops[s] * v["images_per_s"] / 1e12))
    if schedule_fig is not None:
        q = schedule.step_shares()
        flops_per_step = sum(p * schedule.batch_for(s) * train_flops[s] for s, p in zip(schedule.sizes, q))
        schedule_fig.update(rate(flops_per_step / (schedule_fig["ms_per_step"] / 1e3) / 1e12))


def time_sizes(make_step: Callable[[int], tuple[Callable[[], object], int]], sizes: Iterable[int],
               repeats: int, warmup: int = 1, sync=None, clock=time.perf_counter) -> dict[int, dict]:
    """``make_step(size) -> (step, patches)``; each step timed ``repeats`` times after ``warmup``."""
    out = {}
    for s in sorted(set(sizes)):
        step, patches = make_step(s)
        out[s] = per_size_figures(patches, timed(step, repeats, warmup, sync, clock))
        del step
    return out


def compare_figures(full: dict, patch: dict) -> dict:
    """Full-image EDM (p = 1) against the patch schedule, from two measured runs: cost per image
    of the schedule relative to full images (< 1: cheaper) and its inverse."""
    ratio = patch["ms_per_image"] / full["ms_per_image"]
    out = {"cost_per_image_vs_full": ratio, "speedup_per_image_vs_full": 1 / ratio,
           "full_ms_per_image": full["ms_per_image"], "patch_ms_per_image": patch["ms_per_image"],
           "full_images_per_s": full["images_per_s"], "patch_images_per_s": patch["images_per_s"],
           "cost_per_image_vs_full_expected_mix": None}
    if patch.get("expected_mix"):
        # the schedule's probabilities instead of the sizes this run drew (see expected_mix)
        out["cost_per_image_vs_full_expected_mix"] = patch["expected_mix"]["ms_per_image"] / full["ms_per_image"]
    return out


def expected_mix(intervals: list[dict], schedule) -> dict | None:
    """Per-step seconds of each patch size, fitted by least squares to the intervals' lengths and
    their step counts per size, and the cost per image with the schedule's own mix of sizes
    (``step_shares``) in place of the mix a short run happened to draw. None when the fit is not
    determined (a size never drawn, too few intervals) or not meaningful (a non-positive fitted cost)."""
    sizes = list(schedule.sizes)
    if not intervals:
        return None
    a = np.array([[i["sizes"].get(s, 0) for s in sizes] for i in intervals], dtype=float)
    y = np.array([i["seconds"] for i in intervals], dtype=float)
    if np.linalg.matrix_rank(a) < len(sizes):
        return None
    tau = np.linalg.lstsq(a, y, rcond=None)[0]
    if (tau <= 0).any():
        return None
    shares = np.array(schedule.step_shares())
    images = np.array([schedule.batch_for(s) for s in sizes], dtype=float)
    ms_img = 1e3 * float(shares @ tau) / float(shares @ images)
    return {"ms_per_image": ms_img, "images_per_s": 1e3 / ms_img,
            "ms_per_step_by_patch_size": {s: 1e3 * float(t) for s, t in zip(sizes, tau)}}


def summarize_log(rows: list[dict], schedule, skip: int = 1) -> dict:
    """Figures of a training run from its log.jsonl rows (pdiff.train writes one per log interval).

    The first ``skip`` intervals (pipeline start, first steps) are left out. Each interval's length
    is its images over its images/s; its steps are recounted from the schedule (a pure function of
    images seen), so ms per step needs nothing the trainer does not log."""
    intervals, prev = [], 0
    for row in rows:
        if "images_per_s" not in row:
            continue
        a, b = prev, int(row["images_seen"])
        prev = b
        seconds = (b - a) / row["images_per_s"]
        sizes: dict[int, int] = {}
        for st in schedule.steps(a, until=b):
            sizes[st.patch_size] = sizes.get(st.patch_size, 0) + 1
        intervals.append({"images": b - a, "seconds": seconds, "steps": sum(sizes.values()), "sizes": sizes,
                          "images_per_s": row["images_per_s"], "data_wait_share": row.get("data_wait_share", 0.0),
                          "peak_memory_gb": row.get("peak_memory_gb"),
                          "recompiles_after_warmup": row.get("recompiles_after_warmup"), "loss": row.get("loss"),
                          "tflop_per_s": row.get("tflop_per_s"), "mfu": row.get("mfu")})
    measured = intervals[skip:]
    if not measured:
        raise BenchError(f"the run logged {len(intervals)} interval(s) and the first {skip} are warm-up: "
                         f"nothing left to measure (raise --intervals, or the wall-clock budget)")
    images = sum(i["images"] for i in measured)
    seconds = sum(i["seconds"] for i in measured)
    steps = sum(i["steps"] for i in measured)
    by_size: dict[int, int] = {}
    for i in measured:
        for s, n in i["sizes"].items():
            by_size[s] = by_size.get(s, 0) + n
    peaks = [i["peak_memory_gb"] for i in intervals if i["peak_memory_gb"] is not None]
    recompiles = [i["recompiles_after_warmup"] for i in intervals if i["recompiles_after_warmup"] is not None]
    def time_weighted(key):         # the run's rate: each interval's, weighted by its length
        if any(i[key] is None for i in measured):
            return None
        return sum(i[key] * i["seconds"] for i in measured) / seconds
    return {
        "images_per_s": images / seconds, "ms_per_image": 1e3 * seconds / images,
        "tflop_per_s": time_weighted("tflop_per_s"), "mfu": time_weighted("mfu"),
        "images_per_s_median": statistics.median(i["images_per_s"] for i in measured),
        "ms_per_step": 1e3 * seconds / max(steps, 1),
        "data_wait_share": time_weighted("data_wait_share"),
        "data_wait_share_median": statistics.median(i["data_wait_share"] for i in measured),
        "intervals": len(measured), "warmup_intervals": len(intervals) - len(measured),
        "warmup_seconds": sum(i["seconds"] for i in intervals[:skip]),
        "images": images, "steps": steps, "seconds": seconds,
        "steps_by_patch_size": {s: by_size[s] for s in sorted(by_size)},
        "peak_memory_gb": max(peaks) if peaks else None,
        "recompiles_after_warmup": max(recompiles) if recompiles else None,
        "final_loss": measured[-1]["loss"],
        "expected_mix": expected_mix(measured, schedule),
    }
