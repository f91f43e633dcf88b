"""The measuring library behind `pdiff bench` (pdiff/tools/bench.py) and benchmarks/*.py.

    machine.py   what the figures were measured on (CPU, GPU, versions), the device, JSON output
    timing.py    timing and the arithmetic: per-size step costs, the schedule's cost per image,
                 figures of a training run from its log rows (pure functions: tested with a fake clock)
    runs.py      the runs: the data pipeline, the training step (pdiff.step.build_step, as the trainer
                 builds it), the real training loop (full images against the patch schedule), the sampler
    quality.py   quality against cost: full images, the schedule, other patch sets and p under one
                 budget (chunked training runs, FID or a learned-feature distance, crossovers, plot)
    features.py  the learned-feature distance: a small network trained on the user's data
    plot.py      line charts as PNG (Pillow only)
    report.py    the printed tables

The FLOP model (parameters, FLOPs per patch size, the cards' dense peaks, MFU) is pdiff/flops.py,
below both this package and the trainer, whose log reports MFU.

Warm-up (pipeline start, compilation) is excluded and figures are medians over repeats.
"""
from __future__ import annotations

from pdiff.distributed import resolve_device

from .machine import device_sync, machine, machine_name, save_json
from .report import print_data, print_quality, print_sample, print_step, print_train
from .runs import (FULL_OVERRIDES, NEVER, BenchInterrupted, bench_data, bench_data_online_vae,
                   bench_sample, bench_step, bench_train, compare_train, default_interval_images, measuring_overrides,
                   paper_schedule_overrides,
                   prewarm_kernels, run_training, synthetic_shards, variant)
from .timing import (BenchError, add_flop_figures, compare_figures, expected_mix, per_size_figures, schedule_figures,
                     summarize_log, time_sizes, timed)

__all__ = ["FULL_OVERRIDES", "NEVER", "BenchError", "add_flop_figures", "BenchInterrupted",
           "bench_data", "bench_data_online_vae", "bench_sample", "bench_step", "bench_train", "compare_figures",
           "compare_train",
           "default_interval_images", "device_sync", "expected_mix", "machine", "machine_name",
           "measuring_overrides", "paper_schedule_overrides", "per_size_figures", "prewarm_kernels", "print_data",
           "print_quality", "print_sample",
           "print_step", "print_train", "resolve_device", "run_training", "save_json", "schedule_figures",
           "summarize_log", "synthetic_shards", "time_sizes", "timed", "variant"]
