"""Quality per CPU-hour of training recipes, each with patches and with full images, on real data that
installed packages ship: `pdiff bench quality` for every (recipe, dataset, seed), one JSON at the end.

    python benchmarks/quality_recipes.py --recipes ddpmpp,edm2,edm2_dispersive --budget-hours 0.03 \
        --seeds 0,1 --out benchmarks/results/quality-recipes-cpu.json

Datasets (made here, nothing downloaded):
  digits16  scikit-learn's 1,797 8x8 digit scans upscaled to 16x16 grayscale (the demo's data), 10 classes;
  photo32   32x32 RGB tiles cut at a stride of 16 from the two photographs scikit-learn ships
            (china.jpg, flower.jpg, 427x640): 1,950 tiles, unconditional.
Every arm of one (recipe, dataset, seed) trains the same network from scratch under the same budget
(the process's CPU time on a CPU: other work on a shared machine does not count); the metric is the
learned-feature Frechet distance of pdiff.bench.features (ranks arms; not FID). Arms: full images
(p = 1) and the recipe's patch schedule {R/2, R} at p = 0.5.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pdiff.bench import machine, save_json
from pdiff.demo import digits_npz

# recipe -> (preset, overrides): the network and training dynamics compared.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "ddpmpp": ("tiny", []),
    "edm2": ("tiny_edm2", []),
    "edm2_dispersive": ("tiny_edm2", ["repr.loss=dispersive"]),
    "dit": ("tiny_dit", []),
}
# dataset -> its overrides (resolution, channels and classes come from the shards).
DATASETS = {"digits16": [], "photo32": []}


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
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--work", default=".cache/quality-recipes")
    ap.add_argument("--out", default="benchmarks/results/quality-recipes-cpu.json")
    args = ap.parse_args(argv)
    work = Path(args.work)
    rows = []
    started = time.time()
    for dataset in args.datasets.split(","):
        shards = make_shards(dataset, work)
        for recipe in args.recipes.split(","):
            preset, overrides = RECIPES[recipe]
            for seed in [int(s) for s in args.seeds.split(",")]:
                out = work / f"{dataset}-{recipe}-s{seed}.json"
                if not out.exists():
                    cmd = [sys.executable, "-m", "pdiff.cli", "bench", "quality", "--config", preset,
                           "--budget-hours", str(args.budget_hours), "--evals", str(args.evals),
                           "--eval-images", str(args.eval_images), "--patch-sets", "R/2,R", "--p-values", "",
                           "--out", str(out), f"data.path={shards}", f"train.seed={seed}",
                           "patch.sizes=[]", "patch.probs=[]", "patch.real_p=0.5", *overrides]
                    print("+", " ".join(cmd), flush=True)
                    subprocess.run(cmd, check=True)
                result = json.loads(out.read_text())
                for arm in result["results"]["arms"]:
                    rows.append({"dataset": dataset, "recipe": recipe, "seed": seed, "arm": arm["name"],
                                 "metric": result["results"]["metric"], "points": arm["points"]})
    summary = summarize(rows)
    save_json({"benchmark": "quality_recipes", "machine": machine(),
                               "budget_cpu_hours_per_arm": args.budget_hours, "evals": args.evals,
                               "eval_images": args.eval_images, "seconds": time.time() - started,
                               "rows": rows, "summary": summary}, args.out, "quality-recipes")
    for line in summary:
        print(line)
    return 0


def summarize(rows: list[dict]) -> list[str]:
    """One line per (dataset, recipe, arm): the final metric of each seed and their mean."""
    out = []
    keys = sorted({(r["dataset"], r["recipe"], r["arm"]) for r in rows})
    for dataset, recipe, arm in keys:
        finals = [r["points"][-1]["metric"] for r in rows
                  if (r["dataset"], r["recipe"], r["arm"]) == (dataset, recipe, arm)]
        out.append(f"{dataset:9s} {recipe:16s} {arm:22s} " + " ".join(f"{v:8.2f}" for v in finals)
                   + f"   mean {np.mean(finals):8.2f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
