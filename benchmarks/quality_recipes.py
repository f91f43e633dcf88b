"""Quality per CPU-hour of training recipes, each with patches and with full images, on real data that
installed packages ship: `pdiff bench quality` for every (recipe, dataset, seed), one JSON at the end.

    python benchmarks/quality_recipes.py --recipes ddpmpp,edm2,edm2_dispersive,dit --budget-hours 0.03 \
        --seeds 0,1 --jobs 2 --threads 1 --out benchmarks/results/quality-recipes-cpu.json

(the committed results' command: 16 benches, two at a time, about 1.8 hours of a 2-core machine that was
also running tests; training was 38% of the benches' time, evaluation 28%, the feature networks and
start-up the rest)

Datasets (made here, nothing downloaded):
  digits16  scikit-learn's 1,797 8x8 digit scans upscaled to 16x16 grayscale (the demo's data), 10 classes;
  photo32   32x32 RGB tiles cut at a stride of 16 from the two photographs scikit-learn ships
            (china.jpg, flower.jpg, 427x640): 1,950 tiles, unconditional.
Every arm of one (recipe, dataset, seed) trains the same network from scratch under the same budget
(the process's CPU time on a CPU: other work on a shared machine does not count); the metric is the
learned-feature Frechet distance of pdiff.bench.features (ranks arms; not FID). Arms: full images
(p = 1) and the recipe's patch schedule {R/2, R} at p = 0.5.

`--jobs N` runs N (recipe, dataset, seed) benches at once, each with `--threads` torch threads (on 2
cores: two one-thread benches keep both busy); the budget is each process's CPU time, so the arms
stay equal. The presets' 5,000-image learning-rate warm-up is
shortened to `--warmup-images` for every recipe alike (the budgets here are tens of thousands of
images at most).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pdiff.bench import machine, save_json
from pdiff.bench.quality import interpolate
from pdiff.demo import digits_npz

# recipe -> (preset, overrides): the network and training dynamics compared. {r4} is a quarter of the
# dataset's resolution: the dispersive term sits on tiny_edm2's lowest-resolution encoder block.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "ddpmpp": ("tiny", []),
    "edm2": ("tiny_edm2", []),
    "edm2_dispersive": ("tiny_edm2", ["repr.loss=dispersive", "repr.block=enc.{r4}x{r4}_block0"]),
    "dit": ("tiny_dit", []),
}
# dataset -> its resolution (channels and classes come from the shards).
DATASETS = {"digits16": 16, "photo32": 32}


def photo_tiles_npz(path: Path, size: int = 32, stride: int = 16) -> Path:
    from sklearn.datasets import load_sample_images   # ships china.jpg and flower.jpg
    tiles = []
    for img in load_sample_images().images:
        h, w = img.shape[:2]
        tiles += [img[y:y + size, x:x + size] for y in range(0, h - size + 1, stride)
                  for x in range(0, w - size + 1, stride)]
    np.savez(path, images=np.stack(tiles).astype(np.uint8))
    return path


def make_shards(name: str, work: Path) -> Path:
    out = work / f"{name}-shards"
    if (out / "manifest.json").exists():
        return out
    work.mkdir(parents=True, exist_ok=True)
    src = digits_npz(work / "digits.npz", 16) if name == "digits16" else photo_tiles_npz(work / "photo.npz")
    subprocess.run([sys.executable, "-m", "pdiff.cli", "shard", str(src), str(out)], check=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="ddpmpp,edm2,edm2_dispersive")
    ap.add_argument("--datasets", default="digits16,photo32")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budget-hours", type=float, default=0.03, help="CPU-hours per arm")
    ap.add_argument("--evals", type=int, default=2)
    ap.add_argument("--eval-images", type=int, default=256)
    ap.add_argument("--eval-steps", type=int, default=10, help="sampler steps per evaluation (Heun: 2n-1 NFE)")
    ap.add_argument("--warmup-images", type=int, default=1000, help="optim.warmup_images of every recipe")
    ap.add_argument("--jobs", type=int, default=1, help="benches run at once")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per bench (0: torch's default)")
    ap.add_argument("--work", default=".cache/quality-recipes")
    ap.add_argument("--out", default="benchmarks/results/quality-recipes-cpu.json")
    args = ap.parse_args(argv)
    work = Path(args.work)
    started = time.time()
    datasets = args.datasets.split(",")
    shards = {dataset: make_shards(dataset, work) for dataset in datasets}
    runs = [(dataset, recipe, int(seed)) for dataset in datasets for recipe in args.recipes.split(",")
            for seed in args.seeds.split(",")]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))

    def bench(run: tuple[str, str, int]) -> Path:
        dataset, recipe, seed = run
        preset, overrides = RECIPES[recipe]
        overrides = [o.format(r4=DATASETS[dataset] // 4) for o in overrides]
        out = work / f"{dataset}-{recipe}-s{seed}.json"
        if not out.exists():
            cmd = [sys.executable, "-m", "pdiff.cli", "bench", "quality", "--config", preset,
                   "--budget-hours", str(args.budget_hours), "--evals", str(args.evals),
                   "--eval-images", str(args.eval_images), "--eval-steps", str(args.eval_steps),
                   "--patch-sets", "R/2,R", "--p-values", "", "--out", str(out),
                   f"data.path={shards[dataset]}", f"train.seed={seed}", "patch.sizes=[]", "patch.probs=[]",
                   "patch.real_p=0.5", f"optim.warmup_images={args.warmup_images}", *overrides]
            log = out.with_suffix(".log")
            print("+", " ".join(cmd), f"> {log}", flush=True)
            with open(log, "w") as f:
                subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
            print(f"done {dataset} {recipe} seed {seed}", flush=True)
        return out

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outs = list(pool.map(bench, runs))
    rows = []
    for (dataset, recipe, seed), out in zip(runs, outs):
        result = json.loads(out.read_text())
        # Every arm at the same CPU time: the most that all arms of this bench reached (a chunk ends
        # near, not on, the budget), each arm's metric interpolated there between its measured points.
        arms = result["results"]["arms"]
        hours = min(arm["points"][-1]["hours"] for arm in arms)
        for arm in arms:
            rows.append({"dataset": dataset, "recipe": recipe, "seed": seed, "arm": arm["name"],
                         "metric": result["results"]["metric"], "at_hours": hours,
                         "at_budget": interpolate(arm["points"], "hours", hours), "points": arm["points"]})
    summary = summarize(rows)
    table = markdown_table(rows)
    save_json({"benchmark": "quality_recipes", "machine": machine(), "argv": sys.argv[1:],
               "budget_cpu_hours_per_arm": args.budget_hours, "evals": args.evals,
               "eval_images": args.eval_images, "eval_steps": args.eval_steps,
               "warmup_images": args.warmup_images, "threads_per_bench": args.threads, "jobs": args.jobs,
               "seconds": time.time() - started, "rows": rows, "summary": summary, "table": table},
              args.out, "quality-recipes")
    for line in summary:
        print(line)
    print(table)
    return 0


def summarize(rows: list[dict]) -> list[str]:
    """One line per (dataset, recipe, arm): each seed's metric at equal CPU time (``at_budget``: the
    most CPU time every arm of that bench reached, interpolated between the arm's measured points),
    their mean, and the images each seed's arm had trained on at its last point."""
    out = []
    keys = sorted({(r["dataset"], r["recipe"], r["arm"]) for r in rows})
    for dataset, recipe, arm in keys:
        mine = [r for r in rows if (r["dataset"], r["recipe"], r["arm"]) == (dataset, recipe, arm)]
        finals = [r["at_budget"] for r in mine]
        out.append(f"{dataset:9s} {recipe:16s} {arm:16s} " + " ".join(f"{v:8.2f}" for v in finals)
                   + f"   mean {np.mean(finals):8.2f}   images "
                   + " ".join(f"{r['points'][-1]['images']:,}" for r in mine))
    return out


def markdown_table(rows: list[dict]) -> str:
    """Per (dataset, recipe): each arm's metric at equal CPU time per seed and their mean, the images
    each arm trained on (mean over seeds), and the verdict: an arm wins only where every seed agrees."""
    full = "full (p=1)"
    lines = ["| data | recipe | full images: per seed (mean) | patches: per seed (mean) "
             "| images trained, full / patches | better |", "|---|---|---|---|---|---|"]
    for dataset, recipe in dict.fromkeys((r["dataset"], r["recipe"]) for r in rows):
        mine = [r for r in rows if (r["dataset"], r["recipe"]) == (dataset, recipe)]
        patch = next(r["arm"] for r in mine if r["arm"] != full)
        by_seed = {r["seed"]: {} for r in mine}
        for r in mine:
            by_seed[r["seed"]][r["arm"]] = r
        cells = []
        for arm in (full, patch):
            vals = [by_seed[s][arm]["at_budget"] for s in by_seed]
            cells.append(", ".join(f"{v:.1f}" for v in vals) + f" ({np.mean(vals):.1f})")
        images = [np.mean([by_seed[s][arm]["points"][-1]["images"] for s in by_seed]) for arm in (full, patch)]
        wins = {full if by_seed[s][full]["at_budget"] < by_seed[s][patch]["at_budget"] else patch for s in by_seed}
        verdict = (("full images" if wins == {full} else f"patches {patch.split()[0]}") if len(wins) == 1
                   else "neither (the seeds disagree)")
        lines.append(f"| {dataset} | {recipe} | {cells[0]} | {cells[1]} | {images[0]:,.0f} / {images[1]:,.0f} "
                     f"| {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
